//! Real PostgreSQL 15 (Debian's `postgresql-15`, in [`BIN`]) for the tests:
//! clusters made with `initdb` in a test folder, run as the `postgres` OS
//! user, each stopped by a drop guard; pgbench; SQL through tokio-postgres.
//! Tests that mount re-run themselves in private namespaces (`support::fuse`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::moto::free_port;
use super::tree::is_root;
use super::{have_tool, run, skip_missing_peer};

/// Debian's PostgreSQL 15 programs.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// uid and gid of the `postgres` OS user.
pub fn postgres_ids() -> (u32, u32) {
    let u = revive::fuse::users::user_named("postgres").expect("user postgres");
    (u.uid, u.gid)
}

/// True when PostgreSQL 15, the postgres user, /dev/fuse, root and the
/// namespace tools are there; else a skip (a failure under CI).
pub fn postgres_peers_or_skip() -> bool {
    let bin = Path::new(BIN);
    let programs = [
        "initdb",
        "pg_ctl",
        "postgres",
        "pg_basebackup",
        "pgbench",
        "pg_amcheck",
    ];
    let ok = programs.iter().all(|p| bin.join(p).is_file())
        && revive::fuse::users::user_named("postgres").is_some()
        && Path::new("/dev/fuse").exists()
        // SAFETY: getuid has no preconditions.
        && unsafe { libc::getuid() } == 0
        && have_tool("unshare")
        && have_tool("ip");
    if !ok {
        skip_missing_peer(
            "PostgreSQL 15 (postgresql-15, postgresql-contrib), root, /dev/fuse, unshare or ip \
             (scripts/install-test-deps.sh)",
        );
    }
    ok
}

/// A temp folder the postgres user can enter (tempfile makes them 0700).
pub fn open_tempdir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    tmp
}

/// A folder owned by the postgres user (mode `mode`).
pub fn postgres_dir(path: &Path, mode: u32) -> PathBuf {
    std::fs::create_dir_all(path).expect("mkdir");
    let (uid, gid) = postgres_ids();
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.to_path_buf()
}

/// A PostgreSQL program run as the postgres user, from `/`.
pub fn as_postgres(program: &str) -> Command {
    let (uid, gid) = postgres_ids();
    let mut cmd = Command::new(Path::new(BIN).join(program));
    cmd.uid(uid)
        .gid(gid)
        .current_dir("/")
        .env("HOME", "/var/lib/postgresql")
        .env_remove("PGDATA")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command that must succeed.
pub fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Where a server answers.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub socket_dir: PathBuf,
    pub port: u16,
}

impl Endpoint {
    /// A connection as database user postgres over the Unix socket.
    pub async fn connect(&self) -> Client {
        self.try_connect()
            .await
            .unwrap_or_else(|e| panic!("connect to port {}: {e}", self.port))
    }

    /// A connection, or the error.
    pub async fn try_connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// One bigint.
    pub async fn int(&self, sql: &str) -> i64 {
        let c = self.connect().await;
        c.query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// One text value.
    pub async fn text(&self, sql: &str) -> String {
        let c = self.connect().await;
        c.query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// `pgbench -i -s SCALE` (run as postgres).
    pub fn pgbench_init(&self, scale: u32) {
        ok(as_postgres("pgbench").args(self.args()).args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "postgres",
        ]));
    }

    /// `pgbench -T secs -c clients`: the transactions it reports processed
    /// (each one a commit acknowledged to it).
    pub fn pgbench(&self, secs: u32, clients: u32) -> u64 {
        let out = ok(as_postgres("pgbench").args(self.args()).args([
            "-n",
            "-T",
            &secs.to_string(),
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "postgres",
        ]));
        processed(&String::from_utf8_lossy(&out.stdout))
    }

    fn args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.socket_dir.to_string_lossy().into_owned(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    /// `pg_amcheck --all` (heap and B-tree checks); panics with its report.
    pub fn amcheck(&self) {
        ok(as_postgres("pg_amcheck").args(self.args()).args([
            "--all",
            "--install-missing",
            "--heapallindexed",
        ]));
    }

    /// Row counts and sums that must survive a migration unchanged.
    pub async fn fingerprint(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for sql in [
            "SELECT count(*) FROM pgbench_accounts",
            "SELECT sum(abalance)::bigint FROM pgbench_accounts",
            "SELECT sum(bbalance)::bigint FROM pgbench_branches",
            "SELECT sum(tbalance)::bigint FROM pgbench_tellers",
            "SELECT count(*) FROM pgbench_history",
            "SELECT coalesce(sum(delta), 0)::bigint FROM pgbench_history",
        ] {
            out.push(self.int(sql).await);
        }
        out
    }
}

/// "number of transactions actually processed: 1234" of pgbench's report.
pub fn processed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(['/', ' ']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no processed count in pgbench's report:\n{report}"))
}

/// A cluster made by `initdb` and started by `pg_ctl`; stopped at drop.
pub struct Cluster {
    pub data: PathBuf,
    pub endpoint: Endpoint,
    log: PathBuf,
}

impl Cluster {
    /// `initdb -A trust` into `data` (created, owned by postgres), then
    /// started on `port` with its socket in `socket_dir`, TCP off.
    pub fn create(data: &Path, port: u16, socket_dir: &Path) -> Cluster {
        postgres_dir(data, 0o700);
        ok(as_postgres("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(data));
        let conf = format!(
            "port = {port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\n\
             shared_buffers = 64MB\nmax_wal_size = 1GB\nfsync = on\n",
            socket_dir.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("read conf");
        text += &conf;
        std::fs::write(&path, text).expect("write conf");
        let c = Cluster {
            data: data.to_path_buf(),
            endpoint: Endpoint {
                socket_dir: socket_dir.to_path_buf(),
                port,
            },
            log: data.with_extension("log"),
        };
        c.start();
        c
    }

    /// `pg_ctl start -w`.
    pub fn start(&self) {
        std::fs::write(&self.log, "").expect("log");
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(&self.log, Some(uid), Some(gid)).expect("chown log");
        ok(as_postgres("pg_ctl")
            .args(["start", "-w", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log));
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) {
        stop_server(&self.data, "fast");
    }

    /// `pg_basebackup -Fp -X stream -c fast` into `dest` (a consistent copy
    /// PostgreSQL starts from, and what the issue backs up).
    pub fn basebackup(&self, dest: &Path) {
        postgres_dir(dest, 0o700);
        ok(as_postgres("pg_basebackup")
            .args([
                "-h",
                &self.endpoint.socket_dir.to_string_lossy(),
                "-p",
                &self.endpoint.port.to_string(),
                "-U",
                "postgres",
                "-Fp",
                "-X",
                "stream",
                "-c",
                "fast",
                "-D",
            ])
            .arg(dest));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_server(&self.data, "immediate");
    }
}

/// `pg_ctl stop -m MODE` of whatever runs on `data`; quiet when nothing does.
pub fn stop_server(data: &Path, mode: &str) {
    if !data.join("postmaster.pid").exists() {
        return;
    }
    let _ = as_postgres("pg_ctl")
        .args(["stop", "-w", "-t", "60", "-m", mode, "-D"])
        .arg(data)
        .output();
}

/// Stops every server on `datas` at drop, whatever the test did (the
/// instances revive started, on its mount and on the destination).
pub struct ServersGuard(pub Vec<PathBuf>);

impl Drop for ServersGuard {
    fn drop(&mut self) {
        for d in &self.0 {
            stop_server(d, "immediate");
        }
    }
}

/// Adds `mib` MiB of incompressible rows (`gen_random_bytes`, 8 KiB each
/// in one row per page) so the database's size is real bytes, not zstd's
/// 23x of pgbench data.
pub async fn add_incompressible(endpoint: &Endpoint, mib: u64) {
    let c = endpoint.connect().await;
    c.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS pgcrypto;
         CREATE TABLE IF NOT EXISTS blobs (id bigserial PRIMARY KEY, data bytea)
           WITH (toast_tuple_target = 8160);
         ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;",
    )
    .await
    .expect("create blobs");
    // 1 MiB per statement: 128 rows of 8000 random bytes (stored uncompressed).
    for _ in 0..mib {
        c.batch_execute(
            "INSERT INTO blobs (data) SELECT gen_random_bytes(1024) || gen_random_bytes(1024) \
             || gen_random_bytes(1024) || gen_random_bytes(1024) || gen_random_bytes(1024) \
             || gen_random_bytes(1024) || gen_random_bytes(1024) || gen_random_bytes(832) \
             FROM generate_series(1, 128)",
        )
        .await
        .expect("insert blobs");
    }
}

/// Waits until `pred` holds, polling every 100 ms; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut pred: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !pred().await {
        assert!(Instant::now() < deadline, "not {what} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Mount points of this mount namespace under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.to_string_lossy().into_owned();
    text.lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|mp| mp.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Debian's PostgreSQL 15 binaries (scripts/install-test-deps.sh).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The OS user clusters run as (created by the postgresql-common package).
pub const PG_USER: &str = "postgres";

/// True when PostgreSQL 15 is installed and this process can run it as the
/// postgres user (root); otherwise a skip (a failure under CI).
pub fn pg_or_skip() -> bool {
    let installed = [
        "initdb",
        "pg_ctl",
        "pg_basebackup",
        "pg_verifybackup",
        "psql",
    ]
    .iter()
    .all(|t| Path::new(PG_BIN).join(t).exists());
    if !installed {
        skip_missing_peer("postgresql-15 (/usr/lib/postgresql/15/bin)");
        return false;
    }
    if !is_root() {
        skip_missing_peer("root, to run PostgreSQL as the postgres user");
        return false;
    }
    true
}

/// `PG_BIN/<tool>` run as the postgres user, in `cwd` (PostgreSQL tools
/// want a working directory they can read).
pub fn pg_command(tool: &str, cwd: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", PG_USER, "--"])
        .arg(Path::new(PG_BIN).join(tool))
        .current_dir(cwd);
    c
}

/// Runs a command and panics with its output unless it succeeds.
pub fn pg_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A folder owned by the postgres user (and `parent` made traversable), for
/// data folders, basebackups and sockets.
pub fn pg_folder(parent: &Path, name: &str) -> PathBuf {
    fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).expect("chmod parent");
    let dir = parent.join(name);
    fs::create_dir_all(&dir).expect("create pg folder");
    pg_ok(Command::new("chown").arg(format!("{PG_USER}:")).arg(&dir));
    dir
}

/// One running cluster; stopped (immediate shutdown) when dropped.
pub struct PgCluster {
    /// Data folder.
    pub data: PathBuf,
    /// Port number of its Unix socket.
    pub port: u16,
    /// Folder holding the socket and the server log.
    pub run_dir: PathBuf,
    running: bool,
}

impl PgCluster {
    /// `initdb` (trust authentication, no fsync: a test cluster) of a new
    /// data folder `data` inside a postgres-owned folder, then start it.
    pub fn init_and_start(data: &Path, run_dir: &Path) -> PgCluster {
        let parent = data.parent().expect("data folder parent");
        pg_ok(
            pg_command("initdb", parent)
                .args(["-A", "trust", "-U", PG_USER, "--no-sync", "-D"])
                .arg(data),
        );
        Self::start(data, run_dir)
    }

    /// Starts PostgreSQL on an existing data folder (`pg_ctl start -w`).
    pub fn start(data: &Path, run_dir: &Path) -> PgCluster {
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses='' -c fsync=off",
            run_dir.display()
        );
        // Running from here on: a start that fails half-way is still stopped on drop.
        let cluster = PgCluster {
            data: data.to_path_buf(),
            port,
            run_dir: run_dir.to_path_buf(),
            running: true,
        };
        pg_ok(
            pg_command("pg_ctl", run_dir)
                .arg("-D")
                .arg(data)
                .arg("-l")
                .arg(run_dir.join(format!("server-{port}.log")))
                .args(["-w", "-t", "120", "-o", &options, "start"]),
        );
        cluster
    }

    /// Runs SQL through psql; returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = pg_ok(
            pg_command("psql", &self.run_dir)
                .arg("-h")
                .arg(&self.run_dir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    PG_USER,
                    "-d",
                    "postgres",
                ])
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `pg_basebackup -Fp -X stream -c fast` into `dest` (a new folder in a
    /// postgres-owned one).
    pub fn basebackup(&self, dest: &Path) {
        pg_ok(
            pg_command("pg_basebackup", &self.run_dir)
                .arg("-h")
                .arg(&self.run_dir)
                .args(["-p", &self.port.to_string(), "-U", PG_USER])
                .args(["-Fp", "-X", "stream", "-c", "fast", "--no-sync", "-D"])
                .arg(dest),
        );
    }

    /// Stops the cluster (fast shutdown), checking that it stopped.
    pub fn stop(&mut self) {
        if self.running {
            pg_ok(
                pg_command("pg_ctl", &self.run_dir)
                    .arg("-D")
                    .arg(&self.data)
                    .args(["-w", "-m", "fast", "stop"]),
            );
            self.running = false;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let stopped = pg_command("pg_ctl", &self.run_dir)
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-m", "immediate", "stop"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !stopped {
            // Last resort: the postmaster's pid is the first line of postmaster.pid.
            if let Ok(text) = fs::read_to_string(self.data.join("postmaster.pid")) {
                if let Some(pid) = text
                    .lines()
                    .next()
                    .and_then(|l| l.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill(2) of the postmaster this cluster started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

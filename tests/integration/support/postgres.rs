//! Real PostgreSQL 15 (Debian's `postgresql-15`, in [`BIN`]) for the tests:
//! clusters made with `initdb` in a test folder, run as the `postgres` OS
//! user, each stopped by a drop guard; pgbench; SQL through tokio-postgres.
//! Tests that mount re-run themselves in private namespaces (`support::fuse`).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::tree::is_root;
use super::{have_tool, skip_missing_peer};

/// Debian's PostgreSQL 15 programs (scripts/install-test-deps.sh).
pub const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The OS user clusters run as (created by the postgresql-common package).
pub const USER: &str = "postgres";

/// uid and gid of the `postgres` OS user.
pub fn postgres_ids() -> (u32, u32) {
    let u = revive::fuse::users::user_named(USER).expect("user postgres");
    (u.uid, u.gid)
}

/// True when PostgreSQL 15 is installed and root can run it as the
/// postgres user (clusters, basebackups, restores); else a skip (a failure
/// under CI).
pub fn pg_or_skip() -> bool {
    peers_or_skip(
        &[
            "initdb",
            "pg_ctl",
            "pg_basebackup",
            "pg_verifybackup",
            "psql",
        ],
        false,
    )
}

/// As [`pg_or_skip`], plus what the FUSE-mounted sessions need: pgbench,
/// pg_amcheck, /dev/fuse and the namespace tools.
pub fn postgres_peers_or_skip() -> bool {
    peers_or_skip(
        &[
            "initdb",
            "pg_ctl",
            "postgres",
            "pg_basebackup",
            "pgbench",
            "pg_amcheck",
        ],
        true,
    )
}

fn peers_or_skip(programs: &[&str], fuse: bool) -> bool {
    let bin = Path::new(BIN);
    let ok = programs.iter().all(|p| bin.join(p).is_file())
        && revive::fuse::users::user_named(USER).is_some()
        && is_root()
        && (!fuse || (Path::new("/dev/fuse").exists() && have_tool("unshare") && have_tool("ip")));
    if !ok {
        skip_missing_peer(if fuse {
            "PostgreSQL 15 (postgresql-15, postgresql-contrib), root, /dev/fuse, unshare or ip \
             (scripts/install-test-deps.sh)"
        } else {
            "PostgreSQL 15 (postgresql-15) and root, to run it as the postgres user"
        });
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
        processed(&self.pgbench_report(secs, clients))
    }

    /// `pgbench -T secs -c clients`: its whole report.
    pub fn pgbench_report(&self, secs: u32, clients: u32) -> String {
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
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SQL through psql (for tests without a runtime): its unaligned,
    /// tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = ok(as_postgres("psql").args(self.args()).args([
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `pg_basebackup -Fp -X stream -c fast` of this server into `dest`
    /// (created 0700 for the postgres user). `-c fast`, as `revive migrate`
    /// runs it: a spread checkpoint would only add its wait.
    pub fn basebackup(&self, dest: &Path) {
        postgres_dir(dest, 0o700);
        ok(as_postgres("pg_basebackup")
            .args(self.args())
            .args(["-Fp", "-X", "stream", "-c", "fast", "-D"])
            .arg(dest));
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
            .args(["-A", "trust", "-U", USER, "--no-sync", "-D"])
            .arg(data));
        Cluster::open(data, port, socket_dir)
    }

    /// Started on an existing data folder (a restored basebackup, whose
    /// backup_label makes it recover first): the same settings appended to
    /// its postgresql.conf.
    pub fn open(data: &Path, port: u16, socket_dir: &Path) -> Cluster {
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
        self.endpoint.basebackup(dest);
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

/// Runs `f` (blocking: CLI calls, polling, pgbench) on a multi-thread
/// runtime's worker without stalling the other tasks.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
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

/// Inserts ids from `base` upwards, one commit each, until an insert fails
/// or `stop` is set; the ids whose commit was acknowledged.
pub async fn acked_writer(endpoint: Endpoint, base: i64, stop: Arc<AtomicBool>) -> Vec<i64> {
    let client = endpoint.connect().await;
    let mut acked = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let id = base + i;
        match client
            .execute("INSERT INTO acked VALUES ($1)", &[&id])
            .await
        {
            Ok(_) => acked.push(id),
            Err(_) => break,
        }
    }
    acked
}

/// The `[[host]]` of a postgres host named `pg1` with everything in `tmp`.
pub fn pg_host_toml(tmp: &Path, socket_dir: &Path) -> String {
    format!(
        "[sessions]\nmin_free_cache = \"64MiB\"\nretries = 0\n\n\
         [[host]]\nname = \"pg1\"\ndriver = \"postgres\"\nrun_dir = {:?}\nsocket_dir = {:?}\n\
         data_parent = {:?}\nlisten_addresses = \"127.0.0.1\"\n",
        tmp.join("run").to_string_lossy(),
        socket_dir.to_string_lossy(),
        tmp.to_string_lossy()
    )
}

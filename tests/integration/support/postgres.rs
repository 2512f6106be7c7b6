//! `PgCluster`: a real PostgreSQL 15 cluster (Debian's postgresql-15, in
//! [`PG_BIN`]) in a test's temp folder, run as the `postgres` OS user,
//! listening on a Unix socket only (in its own socket folder, on a port
//! number that was free, no TCP), and stopped on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::moto::free_port;
use super::tree::is_root;
use super::{run, skip_missing_peer};

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

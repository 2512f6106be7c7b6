//! The host's PostgreSQL programs (`pg_ctl`, `postgres`, `pg_basebackup`),
//! run as the database's OS user, and the postmaster processes they leave.
//!
//! `pg_ctl start` detaches the postmaster (its own session), so a server
//! outlives revive: after a crash revive finds it again by the pid it
//! recorded, checked against `/proc/<pid>/exe` and `/proc/<pid>/cwd` (the
//! postmaster works in its data folder) before anything is signalled.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tracing::{debug, info, warn};

use super::super::{DriverError, DriverResult};
use crate::fuse::users::User;

/// How `pg_ctl stop` shuts a server down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, stop: a clean shutdown.
    Fast,
    /// Stop at once; the next start runs crash recovery. For an instance
    /// whose data is thrown away (the published one at switchover).
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// The PostgreSQL installation of the host and the user it runs as.
#[derive(Debug, Clone)]
pub struct Programs {
    /// Folder of `pg_ctl`, `postgres`, `pg_basebackup`.
    pub bin_dir: PathBuf,
    /// The OS user servers and tools run as.
    pub user: User,
}

impl Programs {
    /// A command for one of the programs, run as the OS user with a clean
    /// working folder (root's may be unreadable to it).
    pub fn command(&self, program: &str) -> Command {
        let mut std_cmd = std::process::Command::new(self.bin_dir.join(program));
        std_cmd
            .uid(self.user.uid)
            .gid(self.user.gid)
            .current_dir("/")
            .env("HOME", &self.user.home)
            .env("USER", &self.user.name)
            .env("LOGNAME", &self.user.name)
            .env_remove("PGDATA")
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .stdin(Stdio::null());
        let mut cmd = Command::from(std_cmd);
        cmd.kill_on_drop(false);
        cmd
    }

    /// Runs a program to completion within `limit`; its output, or an error
    /// naming it with what it printed.
    async fn run(&self, program: &str, args: &[&str], limit: Duration) -> DriverResult<String> {
        let mut cmd = self.command(program);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        debug!(program, ?args, "running");
        let child = cmd.spawn().map_err(|source| DriverError::Io {
            action: "start",
            path: self.bin_dir.join(program),
            source,
        })?;
        let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
            Ok(r) => r.map_err(|source| DriverError::Io {
                action: "wait for",
                path: self.bin_dir.join(program),
                source,
            })?,
            Err(_) => {
                return Err(DriverError::Timeout {
                    host: "localhost".into(),
                    operation: format!("{program} {}", args.join(" ")),
                    seconds: limit.as_secs(),
                })
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(DriverError::Fault {
                operation: format!("{program} {}", args.join(" ")),
                message: format!(
                    "{} ({})",
                    tail(&format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))),
                    out.status
                ),
            });
        }
        Ok(stdout)
    }

    /// The major version of the host's server (`postgres --version`:
    /// "postgres (PostgreSQL) 15.18 (Debian ...)" is 15).
    pub async fn major_version(&self) -> DriverResult<u32> {
        let out = self
            .run("postgres", &["--version"], Duration::from_secs(30))
            .await?;
        parse_major(&out).ok_or_else(|| DriverError::Fault {
            operation: format!("{}/postgres --version", self.bin_dir.display()),
            message: format!("unexpected answer '{}'", out.trim()),
        })
    }

    /// `pg_ctl start -w`: starts a server on `data`, logging to `log`
    /// (created for the OS user), and waits until it accepts connections.
    pub async fn start(&self, data: &Path, log: &Path, limit: Duration) -> DriverResult<()> {
        let (log_path, user) = (log.to_path_buf(), self.user.clone());
        blocking(move || prepare_log(&log_path, &user)).await?;
        let secs = limit.as_secs().max(1).to_string();
        let data_s = data.to_string_lossy();
        let log_s = log.to_string_lossy();
        let result = self
            .run(
                "pg_ctl",
                &["start", "-w", "-t", &secs, "-D", &data_s, "-l", &log_s],
                limit + Duration::from_secs(10),
            )
            .await;
        if let Err(e) = result {
            // pg_ctl only says "could not start server": the reason is in the log.
            let log_path = log.to_path_buf();
            let logged =
                blocking(move || Ok(std::fs::read_to_string(log_path).unwrap_or_default())).await?;
            return Err(DriverError::Fault {
                operation: format!("start PostgreSQL on '{}'", data.display()),
                message: format!("{e}; server log: {}", tail(&logged)),
            });
        }
        info!(data = %data.display(), "PostgreSQL started");
        Ok(())
    }

    /// `pg_ctl stop -m MODE -w`; Ok when no server runs on `data`.
    pub async fn stop(&self, data: &Path, mode: StopMode, limit: Duration) -> DriverResult<()> {
        if postmaster_pid(data).await.is_none() {
            return Ok(());
        }
        let secs = limit.as_secs().max(1).to_string();
        let data_s = data.to_string_lossy();
        match self
            .run(
                "pg_ctl",
                &[
                    "stop",
                    "-w",
                    "-t",
                    &secs,
                    "-m",
                    mode.as_arg(),
                    "-D",
                    &data_s,
                ],
                limit + Duration::from_secs(10),
            )
            .await
        {
            Ok(_) => {
                info!(data = %data.display(), mode = mode.as_arg(), "PostgreSQL stopped");
                Ok(())
            }
            // It stopped between our look and pg_ctl's.
            Err(_) if postmaster_pid(data).await.is_none() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The last lines of a program's output or a server log, for an error message.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(4);
    lines[start..].join(" / ")
}

/// "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" → 15.
fn parse_major(version: &str) -> Option<u32> {
    let number = version
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    number
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Creates (or keeps) a log file the OS user can append to.
fn prepare_log(log: &Path, user: &User) -> DriverResult<()> {
    let io = |source| DriverError::Io {
        action: "create server log",
        path: log.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io)?;
    std::os::unix::fs::chown(log, Some(user.uid), Some(user.gid)).map_err(io)
}

/// The postmaster pid recorded in `data/postmaster.pid`, if the file is
/// there and readable (a dead FUSE mount is not). Read off the async
/// threads: `data` may be a FUSE mount served by this very process.
pub async fn postmaster_pid(data: &Path) -> Option<u32> {
    let path = data.join("postmaster.pid");
    let text = blocking(move || Ok(std::fs::read_to_string(path).ok()))
        .await
        .ok()
        .flatten()?;
    text.lines().next()?.trim().parse().ok()
}

/// Runs file work on the blocking pool. Paths of a published instance are
/// served by this process's own FUSE handlers, which need the async
/// threads free: touching them from an async thread could wait on itself.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> DriverResult<T> + Send + 'static,
) -> DriverResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DriverError::Fault {
            operation: "file work".into(),
            message: e.to_string(),
        })?
}

/// True when `pid` is a live postmaster of `bin_dir` working in `data`.
pub fn is_our_postmaster(pid: u32, bin_dir: &Path, data: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) else {
        return false;
    };
    let exe = exe
        .to_string_lossy()
        .trim_end_matches(" (deleted)")
        .to_string();
    let expected = bin_dir.join("postgres");
    let expected = std::fs::canonicalize(&expected).unwrap_or(expected);
    if Path::new(&exe) != expected {
        return false;
    }
    // A zombie has no working folder; one that is not ours works elsewhere.
    match std::fs::read_link(proc_dir.join("cwd")) {
        Ok(cwd) => {
            let cwd = cwd
                .to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string();
            Path::new(&cwd) == data
        }
        Err(_) => false,
    }
}

/// Removes the socket lock file `<socket_dir>/.s.PGSQL.<port>.lock` when
/// the process it names is gone or a zombie (an orphaned postmaster killed
/// after its grace, not yet reaped): PostgreSQL takes a zombie's pid for a
/// live server and refuses to start. A live owner keeps its lock.
pub fn remove_stale_socket_lock(socket_dir: &Path, port: u16) -> std::io::Result<bool> {
    let lock = socket_dir.join(format!(".s.PGSQL.{port}.lock"));
    let text = match std::fs::read_to_string(&lock) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let owner = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok());
    if owner.is_some_and(process_alive) {
        return Ok(false);
    }
    match std::fs::remove_file(&lock) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// True while a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Stops a postmaster that `pg_ctl` cannot reach (its data folder is a dead
/// mount): SIGQUIT (immediate shutdown; its backends follow), then SIGKILL
/// after `grace`. Waits until it is gone.
pub async fn kill_postmaster(pid: u32, grace: Duration) {
    let signal = |sig| {
        // SAFETY: kill(2) on a pid checked to be our postmaster.
        unsafe { libc::kill(pid as i32, sig) };
    };
    warn!(pid, "stopping an orphaned postmaster");
    signal(libc::SIGQUIT);
    let started = Instant::now();
    while process_alive(pid) {
        if started.elapsed() > grace {
            signal(libc::SIGKILL);
        }
        if started.elapsed() > grace + Duration::from_secs(10) {
            warn!(pid, "postmaster does not die");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_lock_of_a_gone_process_is_removed_and_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(".s.PGSQL.5433.lock");
        // pid_max is at most 2^22: this pid cannot exist.
        std::fs::write(&lock, "4999999\n/data\n").unwrap();
        assert!(remove_stale_socket_lock(dir.path(), 5433).unwrap());
        assert!(!lock.exists());
        std::fs::write(&lock, format!("{}\n/data\n", std::process::id())).unwrap();
        assert!(!remove_stale_socket_lock(dir.path(), 5433).unwrap());
        assert!(lock.exists());
        assert!(!remove_stale_socket_lock(dir.path(), 5434).unwrap());
    }

    #[test]
    fn major_version_is_read_from_the_version_line() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 18.1\n"), Some(18));
        assert_eq!(parse_major("postgres (PostgreSQL) 9.6.24\n"), Some(9));
        assert_eq!(parse_major("nonsense"), None);
    }

    #[test]
    fn liveness_of_this_process_and_of_a_free_pid() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX - 7));
        assert!(!is_our_postmaster(
            std::process::id(),
            Path::new("/usr/lib/postgresql/15/bin"),
            Path::new("/nonexistent")
        ));
    }
}

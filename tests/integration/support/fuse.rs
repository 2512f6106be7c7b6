//! `revive mount` as a child process, and re-running a test in private
//! namespaces so that its FUSE mounts (and the servers using them) never
//! reach the host and die with it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{have_tool, revive, skip_missing_peer};

/// Longest wait for `revive mount` to say it is mounted.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// True when this runs as root with /dev/fuse and `unshare`; else a skip
/// (a failure under CI).
pub fn fuse_peers_or_skip() -> bool {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    if root && Path::new("/dev/fuse").exists() && have_tool("unshare") && have_tool("ip") {
        return true;
    }
    skip_missing_peer("root, /dev/fuse, unshare or ip (FUSE mounts)");
    false
}

/// Re-runs `test` in private mount, pid and network namespaces: its mounts,
/// processes and ports stay inside and die with it. Checks it passed and
/// printed `done`; passes its report lines on.
pub async fn rerun_isolated(test: &str, done: &str, timeout: Duration) {
    let stdout = super::rerun_unshared(
        &[
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
        ],
        test,
        &["--include-ignored", "--nocapture", "--test-threads=1"],
        done,
        timeout,
    )
    .await;
    print!("{stdout}");
}

/// Inside the private network namespace: the loopback interface up.
pub fn loopback_up() {
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .expect("run ip");
    assert!(up.status.success(), "ip link set lo up: {up:?}");
}

/// A running `revive mount`; killed (and its mount detached) on drop.
pub struct MountProcess {
    child: Option<Child>,
    /// Where the restore point is mounted.
    pub mountpoint: PathBuf,
    /// Its "mounted" line (JSON: point, mountpoint, cache).
    pub announced: serde_json::Value,
    /// Its stderr, appended across runs.
    pub log: PathBuf,
    /// Its TMPDIR (where it keeps state and write cache without `--cache`),
    /// private to the test.
    pub tmp: PathBuf,
}

impl MountProcess {
    /// `revive mount --repo REPO --json POINT MOUNTPOINT ARGS...`, once it
    /// says it is mounted.
    pub fn start(repo: &Path, point: &str, mountpoint: &Path, args: &[&str]) -> MountProcess {
        std::fs::create_dir_all(mountpoint).expect("mount point");
        let log = mountpoint.with_extension("log");
        let tmp = mountpoint.with_extension("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let mut cmd = revive();
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .arg("mount")
            .arg("--repo")
            .arg(repo)
            .arg("--json")
            .arg(point)
            .arg(mountpoint)
            .args(args)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn revive mount");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = match rx.recv_timeout(MOUNT_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "revive mount did not mount ({other:?}, {status:?}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let announced =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("mounted line {line:?}: {e}"));
        MountProcess {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            announced,
            log,
            tmp,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Waits for the command to exit on its own (after an external umount).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "revive mount did not exit within {limit:?}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT (Ctrl-C) and the exit status.
    pub fn interrupt(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
        self.wait(Duration::from_secs(30))
    }

    /// `kill -9`: the mount stays behind, dead.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("wait");
        }
    }

    /// Everything it logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = ::revive::fuse::lazy_unmount(&self.mountpoint);
    }
}

/// True when `path` is listed in this namespace's `/proc/self/mounts`.
pub fn is_mounted(path: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let wanted = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|mp| mp == wanted)
}

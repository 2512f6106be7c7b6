//! A real browser for the web console's tests: headless Chromium from
//! Debian's packages (`chromium`, `chromium-driver`), driven by Selenium
//! from PyPI in the venv `scripts/install-test-deps.sh` makes
//! (`/opt/revive-venv`). Never a browser downloaded by a test tool.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::skip_missing_peer;

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's ChromeDriver (same version as [`CHROMIUM`]).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Python of the test venv, where Selenium is installed.
pub const VENV_PYTHON: &str = "/opt/revive-venv/bin/python3";

/// A browser driver script's outcome.
pub struct ScriptRun {
    pub status: ExitStatus,
    /// stdout and stderr, interleaved.
    pub output: String,
}

/// Chromium, ChromeDriver and Selenium, all present.
pub struct Browser {
    python: PathBuf,
}

impl Browser {
    /// The browser, or `None` after a skip (a failure under CI) naming what is missing.
    pub fn find_or_skip() -> Option<Browser> {
        let python = PathBuf::from(VENV_PYTHON);
        let selenium = Command::new(&python)
            .args(["-c", "import selenium"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() && selenium {
            return Some(Browser { python });
        }
        skip_missing_peer(
            "headless Chromium (chromium, chromium-driver) or Selenium in /opt/revive-venv",
        );
        None
    }

    /// Runs a Selenium script with one JSON argument, its output in `log`;
    /// the script, ChromeDriver and Chromium (one process group) are killed
    /// after `limit`.
    pub fn run(
        &self,
        script: &Path,
        args: &serde_json::Value,
        log: &Path,
        limit: Duration,
    ) -> ScriptRun {
        let out = File::create(log).expect("create browser log");
        let err = out.try_clone().expect("clone log");
        let mut cmd = Command::new(&self.python);
        cmd.arg(script)
            .arg(args.to_string())
            .env("PYTHONUNBUFFERED", "1")
            // Selenium Manager is never needed (both paths are given); if a
            // version ever calls it anyway, it must not go online.
            .env("SE_OFFLINE", "true")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: setpgid and prctl are async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn the browser script");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                // SAFETY: kill(2) of the process group this test started.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                break child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // Chromium's helpers may outlive the script when it was killed.
        // SAFETY: as above; ESRCH when the group is already gone.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        ScriptRun {
            status,
            output: std::fs::read_to_string(log).unwrap_or_default(),
        }
    }
}

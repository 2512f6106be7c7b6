//! `MotoServer`: moto's S3 server on a free loopback port, for repositories
//! on object storage; and `TestRepo`, a repository location (a folder or an
//! `s3://` URL with its environment) so one test body runs against both.
//!
//! moto keeps objects in memory: killing it loses the bucket, so "the store
//! is unreachable" is simulated with SIGSTOP/SIGCONT, which keeps the data.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{have_tool, revive, skip_missing_peer};

/// Longest wait for moto to answer after spawning.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `moto_server`; killed on drop.
pub struct MotoServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// Picks a port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

impl MotoServer {
    /// Starts moto, or returns `None` after a skip message when it is not
    /// installed (a failure under CI, see [`skip_missing_peer`]).
    pub fn start_or_skip() -> Option<MotoServer> {
        if !have_tool("moto_server") {
            skip_missing_peer("moto_server (pip install 'moto[s3,server]')");
            return None;
        }
        Some(Self::start())
    }

    /// Starts moto on a free port and waits until it answers.
    pub fn start() -> MotoServer {
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // If the test process dies, moto goes with it.
            // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().expect("spawn moto_server");
            let mut moto = MotoServer { child, port };
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline {
                if moto.child.try_wait().expect("wait").is_some() {
                    break; // port taken meanwhile: try another
                }
                if moto.request("GET", "/").is_ok() {
                    return moto;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("moto_server did not start");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One unsigned HTTP/1.0 request (moto accepts them); returns the status line.
    pub fn request(&self, method: &str, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n",
            self.port
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.lines().next().unwrap_or_default().to_string())
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let status = self
            .request("PUT", &format!("/{bucket}"))
            .expect("create bucket");
        assert!(status.contains(" 200"), "create bucket {bucket}: {status}");
    }

    /// The AWS_* environment that points revive (object_store) at this moto.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Freezes moto (SIGSTOP): connections are accepted by the kernel but
    /// never answered, as with a hung or unreachable store.
    pub fn pause(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    /// Lets a paused moto run again (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A repository location for the CLI: a folder, or a bucket prefix on moto
/// with the environment that reaches it.
pub struct TestRepo {
    /// `--repo` argument.
    pub location: String,
    /// Environment every `revive` command needs.
    pub env: Vec<(String, String)>,
    /// The local folder, for local repositories.
    pub dir: Option<PathBuf>,
}

impl TestRepo {
    /// A local repository folder `dir/repo` (not created).
    pub fn local(dir: &Path) -> TestRepo {
        let repo = dir.join("repo");
        TestRepo {
            location: repo.display().to_string(),
            env: Vec::new(),
            dir: Some(repo),
        }
    }

    /// `s3://<bucket>/<prefix>` on `moto` (bucket created if missing).
    pub fn s3(moto: &MotoServer, bucket: &str, prefix: &str) -> TestRepo {
        let _ = moto.request("PUT", &format!("/{bucket}"));
        TestRepo {
            location: format!("s3://{bucket}/{prefix}"),
            env: moto.env(),
            dir: None,
        }
    }

    /// `revive <sub> --repo <location>` with the environment.
    pub fn cmd(&self, sub: &str) -> Command {
        let mut c = revive();
        c.arg(sub).arg("--repo").arg(&self.location);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// `revive init`.
    pub fn init(&self) {
        super::run_ok(&mut self.cmd("init"));
    }

    /// `revive backup --json`, parsed.
    pub fn backup(&self, path: &Path, name: Option<&str>) -> serde_json::Value {
        let mut cmd = self.cmd("backup");
        cmd.arg("--json");
        if let Some(name) = name {
            cmd.args(["--name", name]);
        }
        cmd.arg(path);
        let out = super::run_ok(&mut cmd);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("backup --json printed {out:?}: {e}"))
    }

    /// `revive restore POINT DEST`.
    pub fn restore(&self, point: &str, dest: &Path) {
        super::run_ok(self.cmd("restore").arg(point).arg(dest));
    }

    /// The library's view of an S3 repository's store (for tests that damage
    /// or inspect objects directly).
    pub fn s3_store(&self) -> Option<revive::store::S3Store> {
        let revive::store::StoreLocation::S3(mut o) =
            revive::store::StoreLocation::parse(&self.location).ok()?
        else {
            return None;
        };
        let get = |k: &str| {
            self.env
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        o.settings.endpoint = get("AWS_ENDPOINT_URL");
        o.settings.access_key_id = get("AWS_ACCESS_KEY_ID");
        o.settings.secret_access_key = get("AWS_SECRET_ACCESS_KEY");
        o.settings.region = get("AWS_REGION");
        o.settings.allow_http = Some(true);
        revive::store::S3Store::open(o).ok()
    }
}

/// Runs `body(repo, tmp)` as two tests, `$name::local` and `$name::s3` (a
/// fresh moto per test; skipped loudly when moto is missing), so a
/// repository test body holds on a folder and on S3 alike.
macro_rules! on_both_stores {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn local() {
                let tmp = tempfile::tempdir().unwrap();
                super::$body(
                    &$crate::support::moto::TestRepo::local(tmp.path()),
                    tmp.path(),
                );
            }

            #[test]
            fn s3() {
                let Some(moto) = $crate::support::moto::MotoServer::start_or_skip() else {
                    return;
                };
                let tmp = tempfile::tempdir().unwrap();
                let repo = $crate::support::moto::TestRepo::s3(&moto, "repo-cli", "r");
                super::$body(&repo, tmp.path());
            }
        }
    };
}
pub(crate) use on_both_stores;

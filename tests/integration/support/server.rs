//! `ReviveServer`: the real `revive serve` as a child process, configured by
//! a test (exports, allow-lists, publications, ports), with its state, write
//! caches, config and log in a folder of the test.
//!
//! The server prints one JSON line with its ports; everything else it says
//! goes to `serve.log` (stderr of every boot, appended), which tests read to
//! check what the operator would see.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::revive;

/// Longest wait for the ports line of a starting server.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One `[[publication]]`.
#[derive(Clone, Debug)]
pub struct PublicationSpec {
    /// Folder name in the export.
    pub name: String,
    /// Restore point spec (`vm@latest`, an id...).
    pub point: String,
    /// Export path; the first export when `None`.
    pub export: Option<String>,
    /// Write cache folder; `<cache_root>/<name>` when `None`.
    pub cache: Option<PathBuf>,
}

/// What a test asks of the server.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// The repository.
    pub repo: PathBuf,
    /// `[[export]]`s: path and allowed client addresses.
    pub exports: Vec<(String, Vec<String>)>,
    /// `[[publication]]`s.
    pub publications: Vec<PublicationSpec>,
    /// Run the portmapper.
    pub portmap: bool,
    /// NFS, MOUNT and portmapper ports (0: any free port).
    pub ports: (u16, u16, u16),
    /// `[datastore] block_cache`, e.g. "64MiB".
    pub block_cache: String,
    /// Serve the HTTP API (sessions, metrics) on a free loopback port with [`API_TOKEN`].
    pub api: bool,
    /// More TOML appended to the config (`[sessions]`, `[[host]]`...).
    pub extra_toml: String,
    /// `RUST_LOG` of the server when the test run sets none (default: warnings).
    pub log_level: Option<String>,
    /// The repository as a URL (`s3://...`) instead of `repo`.
    pub repo_url: Option<String>,
    /// Environment of the server process (AWS_* for an S3 repository).
    pub env: Vec<(String, String)>,
    /// Extra TOML lines of `[repository]` (chunk cache settings).
    pub repository_extra: String,
    /// Body of `[repository.s3]`.
    pub s3_section: String,
    /// Serve NBD (`[nbd]`) on a free loopback port.
    pub nbd: bool,
    /// Serve iSCSI (`[iscsi]`) on a free loopback port.
    pub iscsi: bool,
    /// `RLIMIT_NOFILE` (soft, hard) the server process starts with.
    pub nofile: Option<(u64, u64)>,
    /// Extra TOML lines of `[nfs]` (connection limits, timeouts).
    pub nfs_extra: String,
}

/// The API token of test servers.
pub const API_TOKEN: &str = "test-token";

impl ServerSpec {
    /// Export `/revive` to 127.0.0.1, no publication, no portmapper, any ports.
    pub fn new(repo: &Path) -> ServerSpec {
        ServerSpec {
            repo: repo.to_path_buf(),
            exports: vec![("/revive".into(), vec!["127.0.0.1".into()])],
            publications: Vec::new(),
            portmap: false,
            ports: (0, 0, 0),
            block_cache: "64MiB".into(),
            api: false,
            extra_toml: String::new(),
            log_level: None,
            repo_url: None,
            env: Vec::new(),
            repository_extra: String::new(),
            s3_section: String::new(),
            nbd: false,
            iscsi: false,
            nofile: None,
            nfs_extra: String::new(),
        }
    }

    /// Serves iSCSI on a free loopback port (`[iscsi] enabled`), for block
    /// exports and block sessions.
    pub fn with_iscsi(mut self) -> Self {
        self.iscsi = true;
        self
    }

    /// Adds TOML lines to `[nfs]`.
    pub fn nfs(mut self, lines: &str) -> Self {
        self.nfs_extra.push_str(lines);
        self.nfs_extra.push('\n');
        self
    }

    /// Starts the server with `RLIMIT_NOFILE` set to `soft` and `hard`
    /// (`soft = hard` keeps it from raising its own limit).
    pub fn nofile(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// Serves NBD on a free loopback port (`[nbd] enabled`), for block
    /// exports and block sessions.
    pub fn with_nbd(mut self) -> Self {
        self.nbd = true;
        self
    }

    /// A `[[block_export]]` over NBD of `file` (default: the only disk) of
    /// restore point `point`, for `allowed` clients; serves NBD.
    pub fn block_export(
        mut self,
        name: &str,
        point: &str,
        file: Option<&str>,
        allowed: &[&str],
    ) -> Self {
        self.nbd = true;
        let file = file.map_or(String::new(), |f| format!("file = {f:?}\n"));
        self.extra_toml += &format!(
            "\n[[block_export]]\nname = {name:?}\npoint = {point:?}\n{file}protocol = \"nbd\"\n\
             allowed_clients = {allowed:?}\n"
        );
        self
    }

    /// Logs at `level` (e.g. "revive=info") to `serve.log`, for tests that read it.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.into());
        self
    }

    /// Serves the HTTP API (sessions and metrics).
    pub fn with_api(mut self) -> Self {
        self.api = true;
        self
    }

    /// Appends TOML to the config file.
    pub fn toml(mut self, text: &str) -> Self {
        self.extra_toml.push('\n');
        self.extra_toml.push_str(text);
        self.extra_toml.push('\n');
        self
    }

    /// Serves the repository at an `s3://` URL, reached with `env`.
    pub fn s3(url: &str, env: Vec<(String, String)>) -> ServerSpec {
        let mut spec = ServerSpec::new(Path::new("/nonexistent"));
        spec.repo_url = Some(url.to_string());
        spec.env = env;
        spec
    }

    /// Adds an export with its allow-list.
    pub fn export(mut self, path: &str, allowed: &[&str]) -> Self {
        self.exports
            .push((path.into(), allowed.iter().map(|s| s.to_string()).collect()));
        self
    }

    /// Publishes `point` as folder `name` of the first export.
    pub fn publish(self, name: &str, point: &str) -> Self {
        self.publish_in(name, point, None)
    }

    /// Publishes `point` as folder `name` of `export`.
    pub fn publish_in(mut self, name: &str, point: &str, export: Option<&str>) -> Self {
        self.publications.push(PublicationSpec {
            name: name.into(),
            point: point.into(),
            export: export.map(String::from),
            cache: None,
        });
        self
    }

    /// Puts the write cache of the last publication in `dir`.
    pub fn cache_in(mut self, dir: &Path) -> Self {
        if let Some(p) = self.publications.last_mut() {
            p.cache = Some(dir.to_path_buf());
        }
        self
    }

    /// Fixed ports and the portmapper (for clients that ask port 111).
    pub fn fixed_ports(mut self, nfs: u16, mount: u16, portmap: u16) -> Self {
        self.ports = (nfs, mount, portmap);
        self.portmap = true;
        self
    }
}

/// A running `revive serve`; killed on drop.
pub struct ReviveServer {
    /// Folder holding `revive.toml`, `state/`, `cache/` and `serve.log`.
    pub dir: PathBuf,
    spec: ServerSpec,
    child: Option<Child>,
    /// Ports of the current boot.
    pub nfs_port: u16,
    pub mount_port: u16,
    pub portmap_port: Option<u16>,
    /// API port of the current boot, when the spec asks for the API.
    pub api_port: Option<u16>,
    /// NBD port of the current boot, when NBD is served.
    pub nbd_port: Option<u16>,
    /// iSCSI port, when served.
    pub iscsi_port: Option<u16>,
    /// Spawn to ports line, of the last boot.
    pub startup: Duration,
}

impl ReviveServer {
    /// Starts `revive serve` with its state in `dir` (created).
    pub fn start(dir: &Path, spec: ServerSpec) -> ReviveServer {
        Self::try_start(dir, spec).unwrap_or_else(|e| panic!("{e}"))
    }

    /// As [`ReviveServer::start`], but a server that does not come up is an
    /// error carrying its log.
    pub fn try_start(dir: &Path, spec: ServerSpec) -> Result<ReviveServer, String> {
        fs::create_dir_all(dir).expect("create server folder");
        let mut s = ReviveServer {
            dir: dir.to_path_buf(),
            spec,
            child: None,
            nfs_port: 0,
            mount_port: 0,
            portmap_port: None,
            api_port: None,
            nbd_port: None,
            iscsi_port: None,
            startup: Duration::ZERO,
        };
        let ports = s.spec.ports;
        match s.boot(ports) {
            Ok(()) => Ok(s),
            Err(e) => Err(format!(
                "revive serve did not start: {e}\nlog:\n{}",
                s.log()
            )),
        }
    }

    /// State folder (persisted identity, namespaces).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Default write cache root: one folder per publication.
    pub fn cache_root(&self) -> PathBuf {
        self.dir.join("cache")
    }

    /// Everything the server wrote to stderr, all boots.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// `nfs://127.0.0.1<path>?nfsport=N&mountport=M` for libnfs.
    pub fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1{path}?nfsport={}&mountport={}",
            self.nfs_port, self.mount_port
        )
    }

    fn write_config(&self, ports: (u16, u16, u16)) -> PathBuf {
        let q = |p: &Path| format!("{:?}", p.to_str().expect("utf8 path"));
        let repo_line = match &self.spec.repo_url {
            Some(url) => format!("url = {url:?}"),
            None => format!("path = {}", q(&self.spec.repo)),
        };
        let mut text = format!(
            "[repository]\n{}\n{}\n\n[repository.s3]\n{}\n\n[datastore]\nstate_dir = {}\ncache_root = {}\n\
             block_cache = {:?}\n\n[nfs]\nbind = \"127.0.0.1\"\nnfs_port = {}\n\
             mount_port = {}\nportmap_port = {}\nportmap = {}\n{}\n",
            repo_line,
            self.spec.repository_extra,
            self.spec.s3_section,
            q(&self.state_dir()),
            q(&self.cache_root()),
            self.spec.block_cache,
            ports.0,
            ports.1,
            ports.2,
            self.spec.portmap,
            self.spec.nfs_extra
        );
        if self.spec.api {
            text += &format!("\n[api]\nbind = \"127.0.0.1:0\"\ntoken = {API_TOKEN:?}\n");
        }
        if self.spec.nbd {
            text += "\n[nbd]\nenabled = true\nbind = \"127.0.0.1\"\nport = 0\n";
        }
        if self.spec.iscsi {
            text += "\n[iscsi]\nenabled = true\nbind = \"127.0.0.1\"\nport = 0\n";
        }
        for (path, allowed) in &self.spec.exports {
            text += &format!("\n[[export]]\npath = {path:?}\nallowed_clients = {allowed:?}\n");
        }
        for p in &self.spec.publications {
            text += &format!(
                "\n[[publication]]\nname = {:?}\npoint = {:?}\n",
                p.name, p.point
            );
            if let Some(e) = &p.export {
                text += &format!("export = {e:?}\n");
            }
            if let Some(dir) = &p.cache {
                text += &format!("cache = {}\n", q(dir));
            }
        }
        text += &self.spec.extra_toml;
        let path = self.dir.join("revive.toml");
        fs::write(&path, text).expect("write config");
        path
    }

    /// Spawns the server on `ports` and waits for its ports line.
    fn boot(&mut self, ports: (u16, u16, u16)) -> Result<(), String> {
        let config = self.write_config(ports);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .expect("open log");
        let started = Instant::now();
        let mut cmd = revive();
        if let (Some(level), None) = (&self.spec.log_level, std::env::var_os("RUST_LOG")) {
            cmd.env("RUST_LOG", level);
        }
        // If the test process dies (timeout, abort), the server goes with it.
        let nofile = self.spec.nofile;
        // SAFETY: prctl and setrlimit are async-signal-safe; nothing else
        // runs in pre_exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some((soft, hard)) = nofile {
                    let limit = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        for (k, v) in &self.spec.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                let status = child.wait();
                return Err(format!("no ports line ({other:?}), exit {status:?}"));
            }
        };
        self.startup = started.elapsed();
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("ports line {line:?}: {e}"))?;
        let port = |k: &str| v[k].as_u64().map(|p| p as u16);
        self.nfs_port = port("nfs_port").ok_or("no nfs_port")?;
        self.mount_port = port("mount_port").ok_or("no mount_port")?;
        self.portmap_port = port("portmap_port");
        self.api_port = port("api_port");
        self.nbd_port = port("nbd_port");
        self.iscsi_port = port("iscsi_port");
        self.child = Some(child);
        Ok(())
    }

    /// `nbd://127.0.0.1:PORT/NAME` of a block export of this boot.
    pub fn nbd_url(&self, name: &str) -> String {
        let port = self.nbd_port.expect("server started without NBD");
        format!("nbd://127.0.0.1:{port}/{name}")
    }

    /// `iscsi://127.0.0.1:PORT/IQN/0`, LUN 0 of target `iqn` of this boot.
    pub fn iscsi_url(&self, iqn: &str) -> String {
        let port = self.iscsi_port.expect("server started without iSCSI");
        format!("iscsi://127.0.0.1:{port}/{iqn}/0")
    }

    /// The API's Prometheus text.
    pub async fn metrics(&self) -> String {
        let port = self.api_port.expect("server started without the API");
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .expect("GET /metrics")
            .error_for_status()
            .expect("metrics status")
            .text()
            .await
            .expect("metrics text")
    }

    /// `revive` with `--api` and `--token` of this server, for the session commands.
    pub fn ctl(&self) -> std::process::Command {
        let port = self.api_port.expect("server started without the API");
        let mut cmd = revive();
        cmd.env("REVIVE_API", format!("http://127.0.0.1:{port}"))
            .env("REVIVE_TOKEN", API_TOKEN);
        cmd
    }

    /// Runs a session command with `--json` and parses its output.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let out = super::run_ok(self.ctl().args(args).arg("--json"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Polls `revive session ID` until `done` holds for it, or panics with the
    /// session and the server log after `limit`.
    pub fn wait_session(
        &self,
        id: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.ctl_json(&["session", id]);
            if done(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "session {id}: not {what} after {limit:?}: {s:#}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9`: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("wait");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    assert!(status.success(), "revive serve exited with {status}");
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("revive serve did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the server again with the same config (stopping it first if it
    /// runs), on the same ports if they are still free, else on new ones.
    /// Returns the time from spawn to ports line.
    pub fn restart(&mut self) -> Duration {
        self.stop();
        let same = (
            self.nfs_port,
            self.mount_port,
            self.portmap_port.unwrap_or(0),
        );
        if self.boot(same).is_err() {
            eprintln!("restart: previous ports busy, taking new ones");
            let ports = self.spec.ports;
            if let Err(e) = self.boot(ports) {
                panic!("revive serve did not restart: {e}\nlog:\n{}", self.log());
            }
        }
        self.startup
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    /// A line of `/proc/<pid>/status` (`VmRSS`, `FDSize`...), as its number
    /// (kB for sizes).
    pub fn proc_status(&self, key: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc status:\n{status}"))
    }

    /// Open file descriptors of the running server.
    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("list /proc/<pid>/fd")
            .count()
    }

    /// The soft and hard `RLIMIT_NOFILE` of the running server.
    pub fn nofile_limits(&self) -> (u64, u64) {
        let limits = fs::read_to_string(format!("/proc/{}/limits", self.pid()))
            .expect("read /proc/<pid>/limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files line");
        let mut nums = line
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok());
        (
            nums.next().expect("soft limit"),
            nums.next().expect("hard limit"),
        )
    }

    /// Whether the child is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("wait").is_none(),
            None => false,
        }
    }

    /// Names of the write cache files of publication `name`.
    pub fn cache_files(&self, name: &str) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.cache_root().join(name))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Drop for ReviveServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

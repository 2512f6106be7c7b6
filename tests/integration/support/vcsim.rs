//! `Vcsim`: govmomi's vSphere simulator (built by `scripts/build-vcsim.sh`)
//! as a child process on a free loopback port, in ESX or vCenter mode, with
//! its own CA so tests keep certificate checking on. Killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use revive::drivers::vsphere::api;
use revive::drivers::vsphere::client::{ClientConfig, VimClient};

use super::skip_missing_peer;

/// Longest wait for vcsim to print its URL (it builds its inventory first).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `scripts/build-vcsim.sh` leaves the binary.
const DEFAULT_BINARY: &str = "/var/tmp/revive-vcsim/vcsim";

/// User name and password vcsim accepts in these tests.
pub const USER: &str = "revive";
/// See [`USER`].
pub const PASSWORD: &str = "s3cret";

/// The vcsim binary (`VCSIM`, else the build script's cache), or a skip
/// (see [`skip_missing_peer`]).
pub fn vcsim_or_skip() -> Option<PathBuf> {
    let path = std::env::var_os("VCSIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
    if path.exists() {
        return Some(path);
    }
    skip_missing_peer("vcsim (VCSIM=$(scripts/build-vcsim.sh))");
    None
}

/// ESXi or vCenter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A standalone ESXi host (`ha-datacenter`, host `localhost.localdomain`).
    Esx,
    /// vCenter with one datacenter `DC0`, a standalone host `DC0_H0` and a
    /// cluster of three hosts.
    Vpx,
}

/// A running vcsim.
pub struct Vcsim {
    binary: PathBuf,
    /// ESX or vCenter.
    pub mode: Mode,
    /// `https://127.0.0.1:PORT/sdk`.
    pub url: String,
    /// Port it listens on (kept across [`Vcsim::restart`]).
    pub port: u16,
    /// Folder of `ca.pem`, `server.pem`, `server.key` (kept across restarts).
    pub tls_dir: PathBuf,
    /// Extra command-line arguments (kept across restarts).
    extra: Vec<String>,
    child: Option<Child>,
}

impl Vcsim {
    /// Starts vcsim on a free loopback port; its certificates go to `dir`.
    pub fn start(binary: &Path, mode: Mode, dir: &Path) -> Vcsim {
        Self::start_with(binary, mode, dir, None)
    }

    /// As [`Vcsim::start`]; with `nfs_query_file`, vcsim copies a VM
    /// folder's small files over NFS into the datastore's localPath before
    /// RegisterVM, reading the libnfs URL options (`nfsport=N&mountport=M`)
    /// from that file at the time.
    pub fn start_with(
        binary: &Path,
        mode: Mode,
        dir: &Path,
        nfs_query_file: Option<&Path>,
    ) -> Vcsim {
        let tls_dir = dir.join(match mode {
            Mode::Esx => "vcsim-esx-tls",
            Mode::Vpx => "vcsim-vpx-tls",
        });
        std::fs::create_dir_all(&tls_dir).expect("create vcsim tls dir");
        let mut v = Vcsim {
            binary: binary.to_path_buf(),
            mode,
            url: String::new(),
            port: 0,
            tls_dir,
            extra: nfs_query_file
                .map(|f| {
                    vec![
                        "-nfs-query-file".to_string(),
                        f.to_str().expect("utf8 path").to_string(),
                    ]
                })
                .unwrap_or_default(),
            child: None,
        };
        v.boot();
        v
    }

    /// The CA certificate that signed vcsim's server certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.tls_dir.join("ca.pem")
    }

    fn boot(&mut self) {
        let mut cmd = Command::new(&self.binary);
        if self.mode == Mode::Esx {
            cmd.arg("-esx");
        }
        cmd.arg("-l")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["-username", USER, "-password", PASSWORD])
            .arg("-tls-dir")
            .arg(&self.tls_dir)
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", self.binary));
        let stdout = child.stdout.take().expect("vcsim stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("VCSIM_URL=") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vcsim did not print its URL within {START_TIMEOUT:?}");
            }
        };
        self.port = url
            .split(':')
            .nth(2)
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in vcsim URL {url}"));
        self.url = url;
        self.child = Some(child);
    }

    /// Stops vcsim (SIGKILL) and waits for it; the port stays reserved for
    /// [`Vcsim::restart`] only by convention.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts vcsim again on the same port with the same certificate. Its
    /// inventory starts afresh (vcsim keeps nothing on disk).
    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client of our own, to look at vcsim's inventory.
pub fn client_of(vcsim: &Vcsim) -> VimClient {
    VimClient::new(ClientConfig {
        host: "inspector".into(),
        url: vcsim.url.clone(),
        user: USER.into(),
        password: PASSWORD.into(),
        insecure: false,
        ca_file: Some(vcsim.ca_file()),
    })
    .expect("client")
}

/// What vcsim's inventory holds, read with our client.
pub struct Inventory {
    /// (name, remote host, remote path) of NAS datastores on the test host.
    pub nas: Vec<(String, String, String)>,
    /// (name, power state, datastore names) of VMs whose name starts with the prefix asked for.
    pub vms: Vec<(String, String, Vec<String>)>,
}

/// The test host's NAS datastores and the VMs whose name starts with `vm_prefix`.
pub async fn inventory(vcsim: &Vcsim, vm_prefix: &str) -> Inventory {
    let c = client_of(vcsim);
    let root = c.content().await.expect("login").root_folder;
    let hosts = api::list_hosts(&c, &root).await.expect("hosts");
    let wanted = match vcsim.mode {
        Mode::Esx => None,
        Mode::Vpx => Some("DC0_H0"),
    };
    let host = hosts
        .into_iter()
        .find(|h| wanted.is_none() || h.text("name") == wanted)
        .expect("test host");
    let all = api::host_datastores(&c, &host.obj)
        .await
        .expect("datastores");
    let nas = all
        .iter()
        .filter_map(|d| {
            Some((
                d.name.clone(),
                d.remote_host.clone()?,
                d.remote_path.clone()?,
            ))
        })
        .collect();
    let names: std::collections::HashMap<_, _> = all
        .iter()
        .map(|d| (d.moref.clone(), d.name.clone()))
        .collect();
    let vms = c
        .find_all(&root, "VirtualMachine", &["name"])
        .await
        .expect("vms");
    let mut out = Vec::new();
    for vm in vms {
        let name = vm.text("name").unwrap_or_default().to_string();
        if !name.starts_with(vm_prefix) {
            continue;
        }
        let info = api::vm_info(&c, &vm.obj).await.expect("vm info");
        let ds = info
            .datastores
            .iter()
            .map(|d| names.get(d).cloned().unwrap_or_else(|| d.value.clone()))
            .collect();
        out.push((name, info.power_state, ds));
    }
    out.sort();
    Inventory { nas, vms: out }
}

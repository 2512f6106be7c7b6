//! Support for tests that boot a real VM under QEMU: the tiny boot image of
//! `scripts/build-boot-image.sh`, its serial console, files inside its FAT
//! disk, and re-running a test in private network and pid namespaces so that
//! the server can take ports 111 and 2049 and every QEMU dies with the test.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use revive::drivers::qemu::qmp::Qmp;
use revive::drivers::{VmFile, VmSpec};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{have_tool, qemu_has_nfs, skip_missing_peer};

/// The guest prints this first, once its kernel runs init.
pub const MARKER: &str = "REVIVE-GUEST-BOOTED";

/// The tiny VM folder and the hash of the file its init reads.
pub struct BootImage {
    /// Folder with `tiny.vmx`, `tiny.vmdk`, `tiny-flat.vmdk`.
    pub vm_dir: PathBuf,
    /// SHA-256 of `known.bin` inside the disk.
    pub known_sha256: String,
}

/// True when QEMU (system emulator and nfs block driver), mtools, unshare
/// and ip are there; else a skip (a failure under CI).
pub fn qemu_vm_peers_or_skip() -> bool {
    let ok = qemu_has_nfs()
        && have_tool("qemu-system-x86_64")
        && have_tool("mcopy")
        && have_tool("nfs-ls")
        && have_tool("unshare")
        && have_tool("ip");
    if !ok {
        skip_missing_peer(
            "qemu-system-x86_64, qemu-block-extra, mtools, libnfs-utils, unshare or ip \
             (scripts/install-test-deps.sh)",
        );
    }
    ok
}

/// Builds (or finds cached) the tiny VM with `scripts/build-boot-image.sh`.
pub fn boot_image() -> BootImage {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-boot-image.sh");
    let out = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "build-boot-image.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vm_dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let known = vm_dir.parent().expect("boot dir").join("known.sha256");
    let known_sha256 = std::fs::read_to_string(&known)
        .unwrap_or_else(|e| panic!("read {}: {e}", known.display()))
        .trim()
        .to_string();
    BootImage {
        vm_dir,
        known_sha256,
    }
}

/// The [`VmSpec`] of a VM folder as the controller would describe it after
/// publishing it as `folder` (disks: flat extents and raw images).
pub fn vm_spec(vm_dir: &Path, name: &str, folder: &str, memory_mib: Option<u64>) -> VmSpec {
    let mut files: Vec<VmFile> = std::fs::read_dir(vm_dir)
        .expect("read vm folder")
        .map(|e| {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().into_owned();
            VmFile {
                disk: name.ends_with("-flat.vmdk") || name.ends_with(".img"),
                size: e.metadata().expect("metadata").len(),
                name,
                url: None,
                location: None,
            }
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    VmSpec {
        name: name.into(),
        source_vm: "tiny".into(),
        folder: folder.into(),
        files,
        memory_mib,
        ..VmSpec::default()
    }
}

/// A guest's serial console: QEMU logs it to `serial.log` and serves it on
/// `serial.sock`.
pub struct Serial {
    /// Everything the guest printed.
    pub log: PathBuf,
    /// Connect here to type into the console.
    pub socket: PathBuf,
}

impl Serial {
    /// The console of the VM whose run folder is `dir`.
    pub fn in_dir(dir: &Path) -> Serial {
        Serial {
            log: dir.join("serial.log"),
            socket: dir.join("serial.sock"),
        }
    }

    /// What the guest printed so far (CR removed).
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// Waits until a line starting with `prefix` appears after the first
    /// `skip` such lines; returns that line. Panics with the log on timeout.
    pub fn wait_line(&self, prefix: &str, skip: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if let Some(line) = text.lines().filter(|l| l.starts_with(prefix)).nth(skip) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no serial line {prefix:?} (#{skip}) within {timeout:?}; log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types one command line into the console and waits for the guest's
    /// answer: the `skip`-th line starting with `prefix` (see
    /// [`SerialConsole::wait_line`]). The connection stays open until the
    /// answer is there, so QEMU has read the command whatever the timing.
    pub fn ask(&self, line: &str, prefix: &str, skip: usize, timeout: Duration) -> String {
        let mut s = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket.display()));
        s.write_all(format!("{line}\n").as_bytes())
            .expect("write serial");
        let answer = self.wait_line(prefix, skip, timeout);
        drop(s);
        answer
    }
}

/// The value of a `REVIVE-WROTE <file> <sha256>` line: (file, sha256).
pub fn wrote(line: &str) -> (String, String) {
    let mut parts = line.split_whitespace().skip(1);
    let file = parts.next().expect("file name").to_string();
    let hash = parts.next().expect("hash").to_string();
    (file, hash)
}

/// SHA-256 of file `name` inside the FAT file system of `image` (mtools).
pub fn fat_file_sha256(image: &Path, name: &str) -> String {
    let out = Command::new("mcopy")
        .arg("-i")
        .arg(image)
        .arg(format!("::{name}"))
        .arg("-")
        .output()
        .expect("run mcopy");
    assert!(
        out.status.success(),
        "mcopy {name} out of {}: {}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    hex::encode(Sha256::digest(&out.stdout))
}

/// Re-runs test `test` of this binary in private network, mount and pid
/// namespaces: the server may bind 111 and 2049, and when the test ends (or
/// is killed on `timeout`) the kernel kills every process it started,
/// daemonized QEMUs included. Checks that it passed and printed `done`.
pub async fn rerun_isolated(test: &str, done: &str, timeout: Duration) {
    let stdout = super::rerun_unshared(
        &["--net", "--pid", "--fork", "--kill-child", "--mount-proc"],
        test,
        // --include-ignored: the re-run of an ignored test (a benchmark) runs it too.
        &["--include-ignored", "--nocapture", "--test-threads=1"],
        done,
        timeout,
    )
    .await;
    // Pass the inner run's report lines (benchmark figures) on.
    print!("{stdout}");
}

/// The file a drive reads and writes now, from QMP `query-block`.
pub async fn drive_file(qmp_socket: &Path) -> String {
    let mut qmp = Qmp::connect(qmp_socket).await.expect("qmp");
    let block = qmp.execute("query-block", None).await.expect("query-block");
    block
        .as_array()
        .and_then(|a| a.iter().find(|b| b["device"] == "disk0"))
        .and_then(|b| b.pointer("/inserted/file"))
        .and_then(Value::as_str)
        .expect("disk0 file")
        .to_string()
}

//! The QEMU process of one VM: its state folder, the command line built from
//! the persisted spec, and start, find and kill by pid file.
//!
//! # Layout of `run_dir/<vm>/`
//! ```text
//! spec.json        VmState: disks (nfs:// URL or local path, format), memory
//! migration.json   MigrationState of a live migration, while one exists
//! qmp.sock         QMP monitor (one client at a time)
//! serial.sock      the guest's serial console (connect to type into it)
//! serial.log       everything the guest printed on its serial console
//! qemu.pid         pid of the daemonized QEMU
//! ```
//! QEMU runs with `-daemonize`: it leaves revive's process group and
//! session and is reparented away from revive, so it survives a restart of
//! revive; later calls find it again through the pid file and the QMP socket.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::drivers::{DriverError, DriverResult, LabNetwork};

/// How long a daemonizing QEMU may take to come up (it opens the NFS disk
/// before the parent returns, which includes portmapper and MOUNT calls).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `quit` may take before QEMU is killed.
pub const QUIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Where one VM's files are.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// `run_dir/<vm>`.
    pub dir: PathBuf,
}

impl VmPaths {
    /// Paths of VM `name` under `run_dir`.
    pub fn new(run_dir: &Path, name: &str) -> VmPaths {
        VmPaths {
            dir: run_dir.join(name),
        }
    }
    /// The persisted [`VmState`].
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    /// The persisted migration state.
    pub fn migration(&self) -> PathBuf {
        self.dir.join("migration.json")
    }
    /// The QMP monitor socket.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The serial console socket.
    pub fn serial_socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }
    /// The serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// QEMU's pid file.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

/// One disk as QEMU opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    /// File name in the VM folder (also the name of a migrated copy).
    pub name: String,
    /// `nfs://host/export/folder/name` or a local path.
    pub location: String,
    /// QEMU block format: raw, qcow2, vmdk.
    pub format: String,
    /// Size in bytes, as published.
    pub size: u64,
}

/// What `register_vm` persisted: enough to start QEMU again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The VM's name (the session name).
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks in boot order.
    pub disks: Vec<DiskState>,
    /// A verification boot's isolated network and capturable screen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<LabNetwork>,
}

/// The `-drive` id of disk `index`: the block backend name QMP commands use.
pub fn drive_id(index: usize) -> String {
    format!("disk{index}")
}

/// Settings from the host's config that shape the command line.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// `-accel` value.
    pub accel: &'a str,
    /// Appended verbatim.
    pub extra_args: &'a [String],
}

/// QEMU block format for a disk file name (a VMDK flat extent is raw).
pub fn format_for(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".qcow2") {
        "qcow2"
    } else if lower.ends_with(".vmdk") && !lower.ends_with("-flat.vmdk") {
        "vmdk"
    } else {
        "raw"
    }
}

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is doubled).
fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// The full QEMU command line (without the binary) for `state`.
pub fn qemu_args(state: &VmState, paths: &VmPaths, launch: &Launch<'_>) -> Vec<String> {
    let p = |p: PathBuf| opt(&p.to_string_lossy());
    let mut args: Vec<String> = vec![
        "-name".into(),
        opt(&state.name),
        "-accel".into(),
        launch.accel.into(),
        "-m".into(),
        state.memory_mib.to_string(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        // A guest that reboots or panics stops instead of looping.
        "-no-reboot".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p(paths.qmp())),
        "-chardev".into(),
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            p(paths.serial_socket()),
            p(paths.serial_log())
        ),
        "-serial".into(),
        "chardev:serial0".into(),
        "-daemonize".into(),
        "-pidfile".into(),
        p(paths.pid()),
    ];
    for (i, disk) in state.disks.iter().enumerate() {
        args.push("-drive".into());
        args.push(format!(
            "file={},format={},if=none,id={},cache=writeback",
            opt(&disk.location),
            disk.format,
            drive_id(i)
        ));
        args.push("-device".into());
        args.push(format!(
            "virtio-blk-pci,drive={},bootindex={i}",
            drive_id(i)
        ));
    }
    if let Some(lab) = &state.lab {
        args.extend(lab_args(lab));
    }
    args.extend(launch.extra_args.iter().cloned());
    args
}

/// A lab guest's screen (for `screendump`) and its one NIC, on a user-mode
/// network with `restrict=on`: the guest reaches nothing, not even the
/// host; only the explicit forwards reach in, from 127.0.0.1.
fn lab_args(lab: &LabNetwork) -> Vec<String> {
    let mut netdev = String::from("user,id=lab0,restrict=on");
    for f in &lab.forwards {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            f.host_port, f.guest_port
        ));
    }
    vec![
        "-device".into(),
        "VGA".into(),
        "-netdev".into(),
        netdev,
        "-device".into(),
        "virtio-net-pci,netdev=lab0".into(),
    ]
}

/// Starts QEMU daemonized. QEMU's parent process returns once the VM is
/// set up (disks opened), so a bad disk URL fails here with QEMU's message.
pub async fn spawn(binary: &str, args: &[String], paths: &VmPaths) -> DriverResult<()> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .current_dir(&paths.dir)
        .kill_on_drop(true);
    let out = tokio::time::timeout(START_TIMEOUT, cmd.output())
        .await
        .map_err(|_| DriverError::Timeout {
            host: "localhost".into(),
            operation: "start QEMU".into(),
            seconds: START_TIMEOUT.as_secs(),
        })?
        .map_err(|source| DriverError::Io {
            action: "run QEMU",
            path: PathBuf::from(binary),
            source,
        })?;
    if !out.status.success() {
        return Err(DriverError::Fault {
            operation: "start QEMU".into(),
            message: format!(
                "{} exited with {}: {}",
                binary,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The pid of the VM's QEMU when it runs: the pid file names a live,
/// non-zombie process whose command line has this VM's pid file (so a pid
/// reused by another program is never mistaken for our QEMU).
pub fn running_pid(paths: &VmPaths) -> Option<i32> {
    let text = fs::read_to_string(paths.pid()).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name, which may hold spaces.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let want = paths.pid();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == want.as_os_str().as_encoded_bytes());
    ours.then_some(pid)
}

/// Sends `signal` to `pid`.
pub fn signal(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits until the VM's QEMU no longer runs; false on timeout.
pub async fn wait_gone(paths: &VmPaths, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if running_pid(paths).is_none() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Memory the kernel says new processes can get (`MemAvailable`), in MiB.
pub fn available_memory_mib() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Bytes free for an unprivileged writer in the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    Ok(crate::fsutil::space(dir)?.avail_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> VmState {
        VmState {
            name: "web01-restore".into(),
            memory_mib: 512,
            disks: vec![
                DiskState {
                    name: "web01-flat.vmdk".into(),
                    location: "nfs://127.0.0.1/revive/web01-restore/web01-flat.vmdk".into(),
                    format: "raw".into(),
                    size: 1 << 30,
                },
                DiskState {
                    name: "data.qcow2".into(),
                    location: "/prod/a,b/data.qcow2".into(),
                    format: "qcow2".into(),
                    size: 1 << 20,
                },
            ],
            lab: None,
        }
    }

    #[test]
    fn command_line_boots_the_disks_in_order_with_monitor_and_serial() {
        let paths = VmPaths::new(Path::new("/run/revive"), "web01-restore");
        let extra = vec!["-smp".to_string(), "2".to_string()];
        let args = qemu_args(
            &state(),
            &paths,
            &Launch {
                accel: "tcg",
                extra_args: &extra,
            },
        );
        let line = args.join(" ");
        assert!(line.contains("-accel tcg -m 512"), "{line}");
        assert!(line.contains(
            "-drive file=nfs://127.0.0.1/revive/web01-restore/web01-flat.vmdk,format=raw,if=none,id=disk0"
        ));
        assert!(line.contains("virtio-blk-pci,drive=disk0,bootindex=0"));
        // A comma in a path is doubled, or QEMU would split the option there.
        assert!(line.contains("file=/prod/a,,b/data.qcow2,format=qcow2,if=none,id=disk1"));
        assert!(line.contains("-qmp unix:/run/revive/web01-restore/qmp.sock,server=on,wait=off"));
        assert!(line.contains("logfile=/run/revive/web01-restore/serial.log"));
        assert!(line.contains("-daemonize -pidfile /run/revive/web01-restore/qemu.pid"));
        assert!(line.ends_with("-smp 2"));
    }

    #[test]
    fn formats_follow_file_names() {
        assert_eq!(format_for("web01-flat.vmdk"), "raw");
        assert_eq!(format_for("disk.img"), "raw");
        assert_eq!(format_for("disk.QCOW2"), "qcow2");
        assert_eq!(format_for("sparse.vmdk"), "vmdk");
    }

    #[test]
    fn a_pid_file_of_another_process_is_not_our_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let paths = VmPaths::new(dir.path(), "vm");
        fs::create_dir_all(&paths.dir).unwrap();
        assert_eq!(running_pid(&paths), None);
        // Our own test process is alive but is not QEMU with this pid file.
        fs::write(paths.pid(), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(running_pid(&paths), None);
        fs::write(paths.pid(), "garbage").unwrap();
        assert_eq!(running_pid(&paths), None);
    }

    #[test]
    fn free_space_and_memory_are_read() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
        assert!(available_memory_mib().unwrap() > 0);
    }
}

//! Validation before anything starts: each refusal names its check, so the
//! operator knows what to fix (`validation failed: port - ...`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::path::Path;

use super::super::{DriverError, DriverResult, VmSpec};
use super::PostgresDriver;
use crate::repo::FileReader;

/// The files that make a folder a PostgreSQL data folder.
const MARKERS: [&str; 2] = ["PG_VERSION", "global/pg_control"];

fn check(check: &'static str, reason: String) -> DriverError {
    DriverError::Check { check, reason }
}

/// Every check of a recovery, in the order an operator would fix them.
pub(super) async fn validate(driver: &PostgresDriver, vm: &VmSpec) -> DriverResult<()> {
    let host = &driver.host;
    driver.os_user()?;
    let bin = &driver.config.bin_dir;
    for program in ["pg_ctl", "postgres", "pg_basebackup"] {
        if !bin.join(program).is_file() {
            return Err(check(
                "postgres binaries",
                format!(
                    "no {program} in '{}' on host '{host}' (bin_dir)",
                    bin.display()
                ),
            ));
        }
    }
    for marker in MARKERS {
        if !vm.files.iter().any(|f| f.name == marker) {
            return Err(check(
                "postgres data folder",
                format!(
                    "restore point {} of '{}' is not a PostgreSQL data folder (no {marker})",
                    vm.point, vm.source_vm
                ),
            ));
        }
    }
    let backed_up = backup_major(driver, vm).await?;
    let host_major = driver.programs()?.major_version().await?;
    if backed_up != host_major {
        return Err(check(
            "postgres version",
            format!(
                "restore point {} holds a PostgreSQL {backed_up} cluster (PG_VERSION); \
                 host '{host}' runs PostgreSQL {host_major} ('{}')",
                vm.point,
                bin.display()
            ),
        ));
    }
    let port = vm.port.unwrap_or(driver.config.port);
    if let Some(reason) = port_in_use(
        port,
        &driver.config.listen_addresses,
        &driver.config.socket_dir,
    ) {
        return Err(check(
            "port",
            format!("port {port} on host '{host}' {reason}"),
        ));
    }
    if !driver.config.socket_dir.is_dir() {
        return Err(check(
            "socket folder",
            format!(
                "'{}' does not exist on host '{host}' (socket_dir)",
                driver.config.socket_dir.display()
            ),
        ));
    }
    let size: u64 = vm.files.iter().map(|f| f.size).sum();
    let parent = &driver.config.data_parent;
    let free = free_bytes(parent).map_err(|source| DriverError::Io {
        action: "check free space of",
        path: parent.clone(),
        source,
    })?;
    if free < size {
        return Err(check(
            "destination space",
            format!(
                "'{}' on host '{host}' has {} MiB free; the database needs {} MiB (data_parent)",
                parent.display(),
                free >> 20,
                size.div_ceil(1 << 20)
            ),
        ));
    }
    Ok(())
}

/// The major version in the backup's `PG_VERSION` ("15\n").
async fn backup_major(driver: &PostgresDriver, vm: &VmSpec) -> DriverResult<u32> {
    let repo = driver.datastore.repo();
    let unreadable = |e: &dyn std::fmt::Display| {
        check(
            "postgres data folder",
            format!("read PG_VERSION of restore point {} - {e}", vm.point),
        )
    };
    let point = repo.point(&vm.point).await.map_err(|e| unreadable(&e))?;
    let reader = FileReader::new(repo, &point, "PG_VERSION").map_err(|e| unreadable(&e))?;
    let text = reader
        .read_at(0, reader.size().min(64) as usize)
        .await
        .map_err(|e| unreadable(&e))?;
    String::from_utf8_lossy(&text)
        .trim()
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| {
            check(
                "postgres data folder",
                format!(
                    "PG_VERSION of restore point {} reads '{}', not a version",
                    vm.point,
                    String::from_utf8_lossy(&text).trim()
                ),
            )
        })
}

/// Why `port` cannot be used, if it cannot: a listener on one of the
/// addresses, or a live server's socket file.
pub(super) fn port_in_use(port: u16, listen: &str, socket_dir: &Path) -> Option<String> {
    for addr in listen_ips(listen) {
        if let Err(e) = TcpListener::bind((addr, port)) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Some(format!("is in use ({addr})"));
            }
        }
    }
    let socket = socket_dir.join(format!(".s.PGSQL.{port}"));
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Some(format!(
            "is in use (a server answers on '{}')",
            socket.display()
        ));
    }
    None
}

/// The addresses of a `listen_addresses` value that can be checked here.
fn listen_ips(listen: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for item in listen.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "*" => out.extend([IpAddr::V4(Ipv4Addr::UNSPECIFIED)]),
            "localhost" => out.extend([
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]),
            other => {
                if let Ok(ip) = other.parse() {
                    out.push(ip);
                }
            }
        }
    }
    if out.is_empty() {
        out.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    out
}

/// A free port above `after`, for a standby beside the published instance.
pub(super) fn free_port_after(after: u16, listen: &str, socket_dir: &Path) -> Option<u16> {
    (after.saturating_add(1)..=after.saturating_add(200)).find(|p| {
        port_in_use(*p, listen, socket_dir).is_none()
            && !socket_dir.join(format!(".s.PGSQL.{p}.lock")).exists()
    })
}

/// Bytes free for unprivileged users where `path` (or its nearest existing
/// ancestor) is.
pub(super) fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a zeroed statvfs is a valid out parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_port_is_in_use_and_a_free_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let reason = port_in_use(port, "localhost", dir.path()).expect("in use");
        assert!(reason.contains("127.0.0.1"), "{reason}");
        drop(held);
        assert_eq!(port_in_use(port, "127.0.0.1", dir.path()), None);
        let next = free_port_after(port, "127.0.0.1", dir.path()).unwrap();
        assert!(next > port);
    }

    #[test]
    fn listen_addresses_are_read() {
        assert_eq!(listen_ips("").len(), 1);
        assert_eq!(listen_ips("localhost").len(), 2);
        assert_eq!(
            listen_ips("10.0.0.5, *"),
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            ]
        );
    }
}

//! The settings revive writes into a data folder, for each role the folder
//! plays: the published instance (on the FUSE mount: every change lands in
//! the write cache, the backup is never touched), the standby, and
//! production after the switchover.
//!
//! - `revive.conf`: port, socket folder, listen addresses, the access files
//!   and (except for production) `archive_mode = off`; for the published
//!   instance also `recovery_init_sync_method = syncfs`. Included from the
//!   end of `postgresql.conf` (written when the backup has none, as Debian's
//!   layout keeps it in `/etc`). Keys it sets are commented out of
//!   `postgresql.auto.conf`, which would otherwise win.
//! - `pg_hba.conf` / `pg_ident.conf`: a marked block at the top lets root
//!   (revive's SQL) and the OS user (`pg_basebackup`, the standby) in over
//!   the local socket as the database user; removed from production.
//!
//! Every function here does blocking file work: call it through
//! `process::blocking`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::fuse::users::User;

/// Included from `postgresql.conf`.
pub const REVIVE_CONF: &str = "revive.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'revive.conf'\t# revive";
const BLOCK_BEGIN: &str = "# revive: begin";
const BLOCK_END: &str = "# revive: end";
/// Prefix of `postgresql.auto.conf` lines revive turned off.
const DISABLED: &str = "# revive: ";
/// Keys `revive.conf` sets, which `postgresql.auto.conf` must not override.
const KEYS: [&str; 7] = [
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "hba_file",
    "ident_file",
    "archive_mode",
    "recovery_init_sync_method",
];
/// Keys only copies get: production has the backup's own again.
const COPY_KEYS: [&str; 2] = ["archive_mode", "recovery_init_sync_method"];

/// How one instance is reached and what it must not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Its data folder (as the server sees it).
    pub data: PathBuf,
    /// Port.
    pub port: u16,
    /// Folder of its Unix socket.
    pub socket_dir: PathBuf,
    /// `listen_addresses`.
    pub listen_addresses: String,
    /// Turn WAL archiving off: a copy must not archive into the original
    /// server's archive.
    pub archive_off: bool,
    /// Crash recovery syncs the data folder with one `syncfs` instead of an
    /// open and fsync of every file. For the published instance: through
    /// FUSE the per-file walk costs round trips per file (0.25-0.35 s of a
    /// 1000-file cluster's start), and revive makes the whole write cache durable
    /// itself before every start (`Datastore::sync_publication`).
    pub syncfs_at_start: bool,
}

/// Who may connect while revive manages the instance.
#[derive(Debug, Clone)]
pub struct Access<'a> {
    /// The OS user servers run as (owner of every file written).
    pub os_user: &'a User,
    /// The database user revive and replication connect as.
    pub db_user: &'a str,
}

/// Writes `revive.conf` for `role`, includes it, and opens the access block.
pub fn apply(role: &Role, access: &Access<'_>) -> std::io::Result<()> {
    let data = &role.data;
    let mut conf = String::from(
        "# Written by revive: how this instance is reached while revive manages it.\n",
    );
    conf += &format!("port = {}\n", role.port);
    conf += &format!("listen_addresses = {}\n", quote(&role.listen_addresses));
    conf += &format!(
        "unix_socket_directories = {}\n",
        quote(&role.socket_dir.to_string_lossy())
    );
    conf += &format!(
        "hba_file = {}\n",
        quote(&data.join("pg_hba.conf").to_string_lossy())
    );
    conf += &format!(
        "ident_file = {}\n",
        quote(&data.join("pg_ident.conf").to_string_lossy())
    );
    if role.archive_off {
        conf += "archive_mode = off\n";
    }
    if role.syncfs_at_start {
        conf += "recovery_init_sync_method = syncfs\n";
    }
    write_file(&data.join(REVIVE_CONF), &conf, access.os_user)?;
    include_revive_conf(data, access.os_user)?;
    let keys: Vec<&str> = KEYS
        .iter()
        .copied()
        .filter(|k| match *k {
            "archive_mode" => role.archive_off,
            "recovery_init_sync_method" => role.syncfs_at_start,
            _ => true,
        })
        .collect();
    disable_auto_conf_keys(data, &keys, access.os_user)?;
    open_access(data, access)?;
    Ok(())
}

/// `'text'` with quotes doubled, as postgresql.conf wants strings.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Appends the include of `revive.conf` to `postgresql.conf` (creating it).
fn include_revive_conf(data: &Path, user: &User) -> std::io::Result<()> {
    let path = data.join("postgresql.conf");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::from(
            "# Written by revive: the backup had no postgresql.conf (it lived outside\n\
             # the data folder), so every setting not below has its default.\n",
        ),
        Err(e) => return Err(e),
    };
    if text.lines().any(|l| l.trim() == INCLUDE_LINE) {
        return Ok(());
    }
    let mut out = text;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out += INCLUDE_LINE;
    out.push('\n');
    write_file(&path, &out, user)
}

/// Comments out `postgresql.auto.conf` lines that set a key of `revive.conf`.
fn disable_auto_conf_keys(data: &Path, keys: &[&str], user: &User) -> std::io::Result<()> {
    let path = data.join("postgresql.auto.conf");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut changed = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if sets_key(line, keys) {
                changed = true;
                format!("{DISABLED}{line}")
            } else {
                line.to_string()
            }
        })
        .collect();
    if changed {
        write_file(&path, &(lines.join("\n") + "\n"), user)?;
    }
    Ok(())
}

/// True when a config line sets one of `keys`.
fn sets_key(line: &str, keys: &[&str]) -> bool {
    let line = line.trim_start();
    if line.starts_with('#') {
        return false;
    }
    let key: String = line
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let rest = line[key.len()..].trim_start();
    keys.iter().any(|k| k.eq_ignore_ascii_case(&key)) && !rest.is_empty()
}

/// Puts revive's block at the top of `pg_hba.conf` and `pg_ident.conf`.
fn open_access(data: &Path, access: &Access<'_>) -> std::io::Result<()> {
    let db = access.db_user;
    let os = &access.os_user.name;
    let hba_block = format!(
        "{BLOCK_BEGIN} - revive's SQL (as root) and replication over the local socket\n\
         local   all           {db}   peer map=revive\n\
         local   replication   {db}   peer map=revive\n\
         {BLOCK_END}\n"
    );
    let hba_default = "# Written by revive: the backup had no pg_hba.conf.\n\
         local   all   all                  peer\n\
         host    all   all   127.0.0.1/32   scram-sha-256\n\
         host    all   all   ::1/128        scram-sha-256\n";
    put_block(
        &data.join("pg_hba.conf"),
        &hba_block,
        hba_default,
        access.os_user,
    )?;
    let ident_block = format!(
        "{BLOCK_BEGIN}\n\
         revive   root   {db}\n\
         revive   {os}   {db}\n\
         {BLOCK_END}\n"
    );
    put_block(
        &data.join("pg_ident.conf"),
        &ident_block,
        "",
        access.os_user,
    )
}

/// Replaces revive's block in `path` (or puts it first), creating the file
/// with `default` after the block when it is missing.
fn put_block(path: &Path, block: &str, default: &str, user: &User) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => default.to_string(),
        Err(e) => return Err(e),
    };
    let rest = without_block(&text);
    let out = format!("{block}{rest}");
    if out == text {
        return Ok(());
    }
    write_file(path, &out, user)
}

/// `text` without revive's marked block.
fn without_block(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with(BLOCK_BEGIN) {
            inside = true;
            continue;
        }
        if inside {
            if line.starts_with(BLOCK_END) {
                inside = false;
            }
            continue;
        }
        out += line;
        out.push('\n');
    }
    out
}

/// Removes revive's access blocks (production keeps only its own rules).
pub fn close_access(data: &Path, user: &User) -> std::io::Result<()> {
    for name in ["pg_hba.conf", "pg_ident.conf"] {
        let path = data.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let rest = without_block(&text);
        if rest != text {
            write_file(&path, &rest, user)?;
        }
    }
    Ok(())
}

/// Turns a standby's copy into a primary's: no signal files, no
/// `primary_conninfo`/`primary_slot_name`, and `archive_mode` and
/// `recovery_init_sync_method` as the backup had them (revive's overrides
/// dropped).
pub fn make_primary(data: &Path, user: &User) -> std::io::Result<()> {
    for signal in ["standby.signal", "recovery.signal"] {
        match std::fs::remove_file(data.join(signal)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let path = data.join("postgresql.auto.conf");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kept: Vec<String> = text
        .lines()
        .filter(|l| !sets_key(l, &["primary_conninfo", "primary_slot_name"]))
        .map(|l| match l.strip_prefix(DISABLED) {
            Some(original) if sets_key(original, &COPY_KEYS) => original.to_string(),
            _ => l.to_string(),
        })
        .collect();
    write_file(&path, &(kept.join("\n") + "\n"), user)
}

/// Removes a `postmaster.pid` the backed-up cluster left (a backup of a
/// running or crashed server): its pid means nothing here, and a live
/// process that happens to have it would stop the server from starting.
pub fn remove_stale_pid(data: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(data.join("postmaster.pid")) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes a small file durably (temp file, fsync, rename) owned by the OS
/// user with mode 0600, as PostgreSQL keeps its files.
fn write_file(path: &Path, text: &str, user: &User) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(".revive-tmp");
    let temp = path.with_file_name(temp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::os::unix::fs::chown(&temp, Some(user.uid), Some(user.gid))?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> User {
        crate::fuse::users::user_with_id(unsafe { libc::getuid() }).unwrap()
    }

    /// A copy's role (`copy`: the published instance) or production's.
    fn role(data: &Path, port: u16, copy: bool) -> Role {
        Role {
            data: data.to_path_buf(),
            port,
            socket_dir: "/tmp/sock dir".into(),
            listen_addresses: "localhost".into(),
            archive_off: copy,
            syncfs_at_start: copy,
        }
    }

    #[test]
    fn published_settings_then_production_settings() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        std::fs::write(data.join("postgresql.conf"), "shared_buffers = 64MB").unwrap();
        std::fs::write(
            data.join("postgresql.auto.conf"),
            "# Do not edit this file manually!\nport = '5999'\narchive_mode = 'on'\nrecovery_init_sync_method = fsync\nwork_mem = '8MB'\n",
        )
        .unwrap();
        std::fs::write(data.join("pg_hba.conf"), "local all all trust\n").unwrap();
        let user = me();
        let access = Access {
            os_user: &user,
            db_user: "postgres",
        };
        apply(&role(data, 5433, true), &access).unwrap();
        apply(&role(data, 5433, true), &access).unwrap();
        let conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        assert_eq!(conf.matches("include_if_exists").count(), 1, "{conf}");
        assert!(conf.starts_with("shared_buffers = 64MB\n"));
        let revive = std::fs::read_to_string(data.join(REVIVE_CONF)).unwrap();
        assert!(revive.contains("port = 5433\n"), "{revive}");
        assert!(revive.contains("unix_socket_directories = '/tmp/sock dir'\n"));
        assert!(revive.contains("archive_mode = off\n"));
        assert!(revive.contains("recovery_init_sync_method = syncfs\n"));
        let auto = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        assert!(auto.contains("# revive: port = '5999'"), "{auto}");
        assert!(auto.contains("# revive: recovery_init_sync_method = fsync"));
        assert!(auto.contains("\nwork_mem = '8MB'"), "{auto}");
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        assert_eq!(hba.matches(BLOCK_BEGIN).count(), 1, "{hba}");
        assert!(hba.starts_with(BLOCK_BEGIN) && hba.ends_with("local all all trust\n"));
        let ident = std::fs::read_to_string(data.join("pg_ident.conf")).unwrap();
        assert!(ident.contains("revive   root   postgres"), "{ident}");

        std::fs::write(data.join("standby.signal"), "").unwrap();
        std::fs::write(
            data.join("postgresql.auto.conf"),
            auto + "primary_conninfo = 'host=/x port=5433'\nprimary_slot_name = 'revive_x'\n",
        )
        .unwrap();
        make_primary(data, &user).unwrap();
        apply(&role(data, 5433, false), &access).unwrap();
        close_access(data, &user).unwrap();
        assert!(!data.join("standby.signal").exists());
        let auto = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        assert!(!auto.contains("primary_conninfo") && !auto.contains("primary_slot_name"));
        assert!(auto.contains("\narchive_mode = 'on'"), "{auto}");
        assert!(
            auto.contains("\nrecovery_init_sync_method = fsync"),
            "{auto}"
        );
        let revive = std::fs::read_to_string(data.join(REVIVE_CONF)).unwrap();
        assert!(!revive.contains("archive_mode"), "{revive}");
        assert!(!revive.contains("recovery_init_sync_method"), "{revive}");
        assert_eq!(
            std::fs::read_to_string(data.join("pg_hba.conf")).unwrap(),
            "local all all trust\n"
        );
    }

    #[test]
    fn a_backup_without_config_files_gets_working_ones() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let user = me();
        let access = Access {
            os_user: &user,
            db_user: "postgres",
        };
        apply(&role(data, 6000, true), &access).unwrap();
        let conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        assert!(conf.contains(INCLUDE_LINE));
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        assert!(
            hba.contains("local   all   all                  peer"),
            "{hba}"
        );
        assert!(!remove_stale_pid(data).unwrap());
        std::fs::write(data.join("postmaster.pid"), "123\n").unwrap();
        assert!(remove_stale_pid(data).unwrap());
        assert!(!data.join("postmaster.pid").exists());
    }

    #[test]
    fn only_lines_that_set_a_key_match() {
        assert!(sets_key("port = 5432", &KEYS));
        assert!(sets_key("  Port='5432'", &KEYS));
        assert!(!sets_key("# port = 5432", &KEYS));
        assert!(!sets_key("portable = on", &KEYS));
        assert!(sets_key("primary_conninfo = 'x'", &["primary_conninfo"]));
    }
}

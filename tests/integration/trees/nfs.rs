//! A tree point published over NFS: `nfs-ls -R` (libnfs) lists every
//! folder, file and symlink with the backup's modes, owners and sizes, and
//! `nfs-cat` reads every file's bytes as backed up.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use crate::support::client::run_tool;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::tree::SampleTree;
use crate::support::*;

/// `kind mode uid gid size` of every entry, by path, as `ls -l` spells the mode.
fn local_listing(root: &std::path::Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in walkdir(root) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        let rel = entry
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let size = if meta.is_dir() { 0 } else { meta.size() };
        out.insert(
            rel,
            format!(
                "{:o} {} {} {size}",
                meta.mode() & 0o170777,
                meta.uid(),
                meta.gid()
            ),
        );
    }
    out
}

fn walkdir(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_published_tree_lists_and_reads_like_its_source_over_nfs() {
    if skip_without_libnfs() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = SampleTree::create(tmp.path(), "pgdata", 7);
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &tree.dir, Some("pg"));
    let spec = ServerSpec::new(&repo).publish("pg1", "pg@latest");
    let server = ReviveServer::start(&tmp.path().join("server"), spec);

    let out = run_tool("nfs-ls", &["-R", &server.url("/revive/pg1")]).await;
    assert!(out.status.success(), "nfs-ls: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut listed = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "-rw------- 1 26 26 1234 base/16384/1259" (symlinks: "... path -> target")
        let name = f[5].trim_start_matches('/').to_string();
        listed.insert(
            name,
            (
                f[0].to_string(),
                f[2].to_string(),
                f[3].to_string(),
                f[4].to_string(),
            ),
        );
    }
    let local = local_listing(&tree.dir);
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        local.keys().collect::<Vec<_>>(),
        "the same entries"
    );
    for (path, want) in &local {
        let (mode, uid, gid, size) = &listed[path];
        let want: Vec<&str> = want.split(' ').collect();
        assert_eq!(
            (uid.as_str(), gid.as_str()),
            (want[1], want[2]),
            "{path}: owner"
        );
        if !mode.starts_with('d') {
            assert_eq!(size, want[3], "{path}: size");
        }
        assert_eq!(
            mode_bits(mode),
            u32::from_str_radix(want[0], 8).unwrap() & 0o7777,
            "{path}: mode {mode}"
        );
    }
    for path in walkdir(&tree.dir) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if !meta.is_file() {
            continue;
        }
        let rel = path
            .strip_prefix(&tree.dir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let out = run_tool("nfs-cat", &[&server.url(&format!("/revive/pg1/{rel}"))]).await;
        assert!(out.status.success(), "nfs-cat {rel}: {out:?}");
        assert_eq!(out.stdout, std::fs::read(&path).unwrap(), "{rel}: content");
    }
}

/// Permission bits of an `ls -l` mode string (`drwx--S--T` and friends).
fn mode_bits(s: &str) -> u32 {
    let c: Vec<char> = s.chars().collect();
    let mut m = 0;
    for (i, bit) in [
        (1, 0o400),
        (2, 0o200),
        (4, 0o040),
        (5, 0o020),
        (7, 0o004),
        (8, 0o002),
    ] {
        if c[i] != '-' {
            m |= bit;
        }
    }
    for (i, x, special) in [(3, 0o100, 0o4000), (6, 0o010, 0o2000), (9, 0o001, 0o1000)] {
        match c[i] {
            'x' => m |= x,
            's' | 't' => m |= x | special,
            'S' | 'T' => m |= special,
            _ => {}
        }
    }
    m
}

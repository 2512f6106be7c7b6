//! A tree point published over NFS: `nfs-ls -R` (libnfs) lists every
//! folder, file and symlink with the backup's modes, owners and sizes, and
//! `nfs-cat` reads every file's bytes as backed up.

use std::collections::BTreeMap;

use crate::support::client::{run_tool, sha256};
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::tree::{file_hashes, find_listing, SampleTree};
use crate::support::*;

/// `type mode size uid gid` by path, from `find_listing`'s lines (the link
/// target left out: `nfs-ls` does not show it; the size of a link is its
/// target's length on both sides).
fn local_listing(dir: &std::path::Path) -> BTreeMap<String, String> {
    find_listing(dir)
        .iter()
        .filter(|l| !l.starts_with(' ')) // the root itself
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (uid, gid) = (f[f.len() - 2], f[f.len() - 1]);
            // nfs-ls prints rwx only: setuid, setgid and sticky are not shown.
            let mode = u32::from_str_radix(f[2], 8).expect("octal mode") & 0o777;
            let line = format!("{} {mode:o} {} {uid} {gid}", f[1], f[3]);
            (f[0].to_string(), line)
        })
        .collect()
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
    // "-rw------- 1 26 26 1234 base/16384/1259", in find's spelling.
    let listed: BTreeMap<String, String> = text
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let kind = match f[0].chars().next() {
                Some('d') => "d",
                Some('l') => "l",
                _ => "f",
            };
            let size = if kind == "d" { "-" } else { f[4] };
            (
                f[5].trim_start_matches('/').to_string(),
                format!("{kind} {:o} {size} {} {}", mode_bits(f[0]), f[2], f[3]),
            )
        })
        .collect();
    assert_eq!(listed, local_listing(&tree.dir));
    for (rel, want) in file_hashes(&tree.dir) {
        let out = run_tool("nfs-cat", &[&server.url(&format!("/revive/pg1/{rel}"))]).await;
        assert!(out.status.success(), "nfs-cat {rel}: {out:?}");
        assert_eq!(hex::encode(sha256(&out.stdout)), want, "{rel}: content");
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

//! Support for tests of block exports with real NBD clients: libnbd's tools
//! (`nbdinfo`, `nbdcopy`, `nbdfuse`) and QEMU's (`qemu-io`, `qemu-img`).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use super::client::run_tool_for;
use super::{have_tool, skip_missing_peer};

/// One line of `nbdinfo --map`: offset, length, base:allocation flags.
pub type MapLine = (u64, u64, u32);

/// True when the NBD clients are installed; else a skip (a failure under CI).
pub fn nbd_peers_or_skip() -> bool {
    let ok = ["nbdinfo", "nbdcopy", "nbdfuse", "qemu-io", "qemu-img"]
        .iter()
        .all(|t| have_tool(t));
    if !ok {
        skip_missing_peer(
            "libnbd-bin (nbdinfo, nbdcopy, nbdfuse) or qemu-utils (scripts/install-test-deps.sh)",
        );
    }
    ok
}

/// Runs a tool that must succeed within two minutes; returns stdout.
pub async fn tool_ok(cmd: &str, args: &[&str]) -> String {
    let out = run_tool_for(cmd, args, Duration::from_secs(120)).await;
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool that may fail.
pub async fn tool(cmd: &str, args: &[&str]) -> Output {
    run_tool_for(cmd, args, Duration::from_secs(120)).await
}

/// `nbdinfo --map URL`, parsed.
pub async fn map(url: &str) -> Vec<MapLine> {
    tool_ok("nbdinfo", &["--map", url])
        .await
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let n =
                |i: usize| -> u64 { f[i].parse().unwrap_or_else(|_| panic!("map line {line:?}")) };
            (n(0), n(1), n(2) as u32)
        })
        .collect()
}

/// The map a file of `chunk`-sized chunks should get: all-zero chunks are
/// holes that read as zeros (3), others data (0); adjacent runs merged.
pub fn expected_map(file: &Path, chunk: u64) -> Vec<MapLine> {
    let data = std::fs::read(file).expect("read file");
    let mut out: Vec<MapLine> = Vec::new();
    for (i, c) in data.chunks(chunk as usize).enumerate() {
        let kind = if c.iter().all(|b| *b == 0) { 3 } else { 0 };
        let offset = i as u64 * chunk;
        match out.last_mut() {
            Some(last) if last.2 == kind => last.1 += c.len() as u64,
            _ => out.push((offset, c.len() as u64, kind)),
        }
    }
    out
}

/// `qemu-io -f raw URL -c CMD...`: one connection running every command in
/// order. Returns stdout; fails the test if qemu-io does.
pub async fn qemu_io(url: &str, commands: &[String]) -> String {
    let mut args = vec!["-f", "raw", url];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    tool_ok("qemu-io", &args).await
}

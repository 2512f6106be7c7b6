//! Crash test of the write cache: acknowledged writes survive `kill -9`.
//!
//! The test re-runs its own binary as a child (`REVIVE_CRASH_CHILD` set) that
//! does concurrent writes of known patterns to one write cache, some
//! `FileSync`, some `Unstable` + `commit`, and prints every acknowledged
//! write. Writes cover runs of 2 KiB units (half blocks), so many start or
//! end inside a block and take the copy-on-write path. The parent kills the
//! child with SIGKILL at a random moment, reopens the cache and checks:
//! - every acknowledged write is present (each unit holds that write or a
//!   newer one of the same writer);
//! - every unit holds a whole valid pattern of a write to that very unit, or
//!   the base's pattern if no write to it was ever acknowledged (never zeros
//!   or garbage: data is durable before its bit, and copy-on-write keeps the
//!   base bytes of the rest of a block).
//!
//! The cache is a backup file's cache with a base of known content (gen 0),
//! so partial writes copy base bytes into the cache.
//!
//! Several rounds run on the same cache, so each also tests reopening a cache
//! left by a crash, which replays its journal. Stable writes are made durable
//! by journal appends; some rounds shrink the journal's checkpoint size so
//! that checkpoints (and journal resets) run all the time and kills land in
//! them; some rounds kill the child within milliseconds of its start, while
//! it opens the cache, which is when it replays the previous round's journal.
//! Runs as `harness = false`: `cargo test --test cache_crash`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use revive::cache::{BaseRead, CachePaths, Origin, Stability, WriteCache};

const CHILD_ENV: &str = "REVIVE_CRASH_CHILD";
const BS: u64 = 4096;
/// The unit of patterns and acknowledgements: half a block.
const UNIT: u64 = 2048;
const UNITS_PER_BLOCK: u64 = BS / UNIT;
/// Writer tasks in the child; each owns `REGION` consecutive units.
const WRITERS: u64 = 8;
const REGION: u64 = 64;
const UNITS: u64 = WRITERS * REGION;
const BLOCKS: u64 = UNITS / UNITS_PER_BLOCK;
const ROUNDS: u64 = 10;
/// Unstable writers commit after this many writes.
const COMMIT_EVERY: u64 = 4;

fn paths(dir: &Path) -> CachePaths {
    CachePaths::in_dir(dir, "crash")
}

/// The content of `unit` written with generation `gen`.
fn pattern(unit: u64, gen: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(UNIT as usize);
    out.extend_from_slice(&unit.to_le_bytes());
    out.extend_from_slice(&gen.to_le_bytes());
    let mut x = unit.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ gen ^ 0xD1B5_4A32_D192_ED03;
    while out.len() < UNIT as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The base (backup) of the cached file: unit `u` holds `pattern(u, 0)`.
struct PatternBase;

impl BaseRead for PatternBase {
    async fn read_base(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        if !offset.is_multiple_of(UNIT) || !(len as u64).is_multiple_of(UNIT) {
            return Err(std::io::Error::other(format!(
                "unaligned base read: {len} bytes at {offset}"
            )));
        }
        let first = offset / UNIT;
        let mut out = Vec::with_capacity(len);
        for u in first..first + len as u64 / UNIT {
            out.extend_from_slice(&pattern(u, 0));
        }
        Ok(Bytes::from(out))
    }
}

/// The generation of a valid pattern of `unit` (0 for the base), or why it
/// is not one.
fn decode(unit: u64, bytes: &[u8]) -> Result<u64, String> {
    if bytes.len() != UNIT as usize {
        return Err(format!("unit {unit}: read {} bytes", bytes.len()));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
    let (u, gen) = (word(0), word(8));
    if u != unit || pattern(unit, gen) != bytes {
        return Err(format!(
            "unit {unit}: data is not a pattern of this unit (found unit {u}, gen {gen})"
        ));
    }
    Ok(gen)
}

/// How round `round` runs: the child's journal checkpoint size (`None`: the
/// default) and whether it is killed early, while opening (replaying).
fn round_plan(round: u64) -> (Option<u64>, bool) {
    let checkpoint = match round % 3 {
        0 => None,
        1 => Some(16 << 10),
        _ => Some(256 << 10),
    };
    (checkpoint, round % 4 == 3)
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let round: u64 = std::env::var("REVIVE_CRASH_ROUND")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        child(PathBuf::from(dir), round);
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let size = UNITS * UNIT;
        let cache = WriteCache::create(&paths(dir.path()), size, BS as u32, Origin::Backup)
            .await
            .expect("create cache");
        drop(cache);
    });
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut total_acks = 0;
    for round in 1..=ROUNDS {
        let acks = if round_plan(round).1 {
            run_child_killed_early(dir.path(), round);
            Vec::new()
        } else {
            run_child(dir.path(), round)
        };
        total_acks += acks.len();
        for (unit, n, gen) in acks {
            for u in unit..unit + n {
                let e = acked.entry(u).or_insert(0);
                *e = (*e).max(gen);
            }
        }
        let (cached, newer) = rt.block_on(verify(dir.path(), &acked));
        println!(
            "round {round}: {total_acks} acknowledged writes so far, {cached} blocks cached, \
             {newer} units hold an unacknowledged newer write: ok"
        );
    }
    assert!(total_acks > 0, "the child never acknowledged a write");
    println!("cache_crash: {ROUNDS} rounds of kill -9 passed");
}

/// Runs one child until a random moment after its first acknowledgement,
/// kills it with SIGKILL, and returns its acknowledgements.
fn run_child(dir: &Path, round: u64) -> Vec<(u64, u64, u64)> {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, dir)
        .env("REVIVE_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let f: Vec<&str> = line.split(' ').collect();
            // A line cut by the kill lacks its "end" and is ignored.
            if let ["ack", b, n, g, "end"] = f.as_slice() {
                if let (Ok(b), Ok(n), Ok(g)) = (b.parse(), n.parse(), g.parse()) {
                    if acks.is_empty() {
                        let _ = tx.send(());
                    }
                    acks.push((b, n, g));
                }
            }
        }
        acks
    });
    // Bounded waits, not assertions on speed.
    let started = rx.recv_timeout(Duration::from_secs(20)).is_ok();
    let delay = rand::rng().random_range(0..250);
    std::thread::sleep(Duration::from_millis(delay));
    if let Ok(Some(status)) = child.try_wait() {
        panic!("child of round {round} exited early: {status}");
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap child");
    let acks = reader.join().expect("reader thread");
    assert!(started, "child of round {round} acknowledged nothing");
    println!(
        "round {round}: killed after {delay} ms ({status}), {} acks",
        acks.len()
    );
    acks
}

/// Runs one child and kills it within its first milliseconds: it is then
/// opening the cache, replaying the journal the last round left.
fn run_child_killed_early(dir: &Path, round: u64) {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, dir)
        .env("REVIVE_CRASH_ROUND", round.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let delay = rand::rng().random_range(0..15);
    std::thread::sleep(Duration::from_millis(delay));
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap child");
    println!("round {round}: killed while opening after {delay} ms ({status})");
}

/// Reopens a copy of the cache (so the journal the child left stays for the
/// next child to replay) and checks every block; returns (cached blocks,
/// units holding a newer unacknowledged write).
async fn verify(dir: &Path, acked: &HashMap<u64, u64>) -> (u64, u64) {
    let copy_dir = dir.join("verify");
    let _ = std::fs::remove_dir_all(&copy_dir);
    std::fs::create_dir(&copy_dir).expect("verify folder");
    let (from, to) = (paths(dir), paths(&copy_dir));
    for (f, t) in [
        (from.data, &to.data),
        (from.map, &to.map),
        (from.journal, &to.journal),
    ] {
        std::fs::copy(&f, t).expect("copy cache file");
    }
    let cache = WriteCache::open(&to).await.expect("reopen after kill");
    assert_eq!(cache.len(), UNITS * UNIT, "logical size changed");
    let (mut cached, mut newer) = (0, 0);
    for block in 0..BLOCKS {
        let units = block * UNITS_PER_BLOCK..(block + 1) * UNITS_PER_BLOCK;
        let present = cache.is_cached(block);
        cached += u64::from(present);
        let bytes = cache
            .read_overlay(block * BS, BS, &PatternBase)
            .await
            .expect("read block");
        for (unit, bytes) in units.zip(bytes.chunks(UNIT as usize)) {
            let gen = decode(unit, bytes).unwrap_or_else(|e| panic!("{e}"));
            let Some(want) = acked.get(&unit).copied() else {
                continue;
            };
            assert!(
                present,
                "unit {unit}: write gen {want} was acknowledged but its block is not cached"
            );
            assert!(
                gen >= want,
                "unit {unit}: holds gen {gen}, older than acknowledged gen {want}"
            );
            newer += u64::from(gen > want);
        }
    }
    (cached, newer)
}

/// The child: writers hammer the cache until killed (or for 30 s at most).
fn child(dir: PathBuf, round: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("child runtime");
    rt.block_on(async move {
        let cache = Arc::new(WriteCache::open(&paths(&dir)).await.expect("child open"));
        if let Some(bytes) = round_plan(round).0 {
            cache.set_checkpoint_bytes(bytes);
        }
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let cache = Arc::clone(&cache);
            tasks.push(tokio::spawn(writer(cache, w, round)));
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(tasks)).await;
    });
}

/// One writer: random runs of 1-7 units in its own region, generations
/// increasing; even writers use `FileSync`, odd ones `Unstable` + `commit`.
async fn writer(cache: Arc<WriteCache>, w: u64, round: u64) {
    let sync = w.is_multiple_of(2);
    let mut gen = round << 32;
    let mut pending: Vec<(u64, u64, u64)> = Vec::new();
    loop {
        gen += 1;
        let (start, n) = {
            let mut rng = rand::rng();
            let n = rng.random_range(1..=7u64);
            (w * REGION + rng.random_range(0..=REGION - n), n)
        };
        let mut data = Vec::with_capacity((n * UNIT) as usize);
        for u in start..start + n {
            data.extend_from_slice(&pattern(u, gen));
        }
        let stability = if sync {
            Stability::FileSync
        } else {
            Stability::Unstable
        };
        cache
            .write(start * UNIT, Bytes::from(data), stability, &PatternBase)
            .await
            .expect("child write");
        pending.push((start, n, gen));
        if !sync && pending.len() < COMMIT_EVERY as usize {
            continue;
        }
        if !sync {
            cache.commit().await.expect("child commit");
        }
        for (u, n, g) in pending.drain(..) {
            println!("ack {u} {n} {g} end");
        }
    }
}

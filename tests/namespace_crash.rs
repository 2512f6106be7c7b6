//! Crash test of the namespace and its change log: `kill -9` at any point
//! leaves a consistent namespace holding every acknowledged change.
//!
//! The test re-runs its own binary as a child (`REVIVE_NS_CRASH_CHILD` set)
//! that makes a long seeded sequence of namespace changes the way clients
//! do (mkdir, create, rename over existing names and across folders, remove,
//! rmdir), each committed and waited for, and prints `begin N` before and
//! `ack N` after each. The parent kills it with SIGKILL at a random moment,
//! reopens the namespace (which replays the log) and compares its whole tree
//! with a model that applied the same seeded changes: it must equal the
//! model after every acknowledged change, or after one more (the change in
//! flight may or may not have become durable), never anything else.
//!
//! Rounds continue on the same folder, so each also reopens what the
//! previous crash left; some rounds shrink the checkpoint size so that kills
//! land in checkpoints (snapshot rename, log reset), some kill the child
//! within milliseconds of its start, while it replays the log.
//! Runs as `harness = false`: `cargo test --test namespace_crash`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use revive::datastore::namespace::{Content, Namespace, Node, ROOT_ID};
use revive::datastore::FileId;

const CHILD_ENV: &str = "REVIVE_NS_CRASH_CHILD";
const ROUNDS: u64 = 12;
/// Changes a child makes at most (it is killed long before, usually).
const CHANGES: u64 = 100_000;

/// A tree as (id, parent, name, folder?), sorted: what must match.
type Shape = Vec<(FileId, FileId, String, bool)>;

fn shape(ns: &Namespace) -> Shape {
    let mut out: Shape = ns
        .subtree(ROOT_ID)
        .into_iter()
        .filter_map(|id| ns.get(id).ok())
        .map(|n| (n.id, n.parent, n.name.clone(), n.is_dir()))
        .collect();
    out.sort();
    out
}

fn template(content: Content) -> Node {
    Node::template(content, 0o644, None)
}

/// Applies change `n` of round `round` to `ns` (child and model alike):
/// picks it from the tree as it is, so both pick the same one. A change
/// the namespace refuses (name taken, folder not empty) changes nothing.
fn change(ns: &mut Namespace, round: u64, n: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(round << 32 | n);
    let ids: Vec<FileId> = {
        let mut v = ns.subtree(ROOT_ID);
        v.push(ROOT_ID);
        v.sort_unstable();
        v
    };
    let dirs: Vec<FileId> = ids
        .iter()
        .copied()
        .filter(|id| ns.get(*id).is_ok_and(|n| n.is_dir()))
        .collect();
    let dir = dirs[rng.random_range(0..dirs.len())];
    let name = format!("n{}", rng.random_range(0..12));
    let _ = match rng.random_range(0..10) {
        0 | 1 => ns
            .add(dir, &name, Content::Dir, &template(Content::Dir))
            .map(drop),
        2..=4 => ns
            .add(dir, &name, Content::New, &template(Content::New))
            .map(drop),
        5..=7 => {
            let from = ids[rng.random_range(0..ids.len())];
            match ns.get(from) {
                Ok(node) if from != ROOT_ID => {
                    let (parent, old) = (node.parent, node.name.clone());
                    ns.rename(parent, &old, dir, &name).map(drop)
                }
                _ => Ok(()),
            }
        }
        _ => ns.unlink(dir, &name).map(drop),
    };
}

/// How round `round` runs: checkpoint size (`None`: the default) and whether
/// the child is killed early, while it opens (replays) the namespace.
fn round_plan(round: u64) -> (Option<u64>, bool) {
    let checkpoint = match round % 3 {
        0 => None,
        1 => Some(4 << 10),
        _ => Some(64 << 10),
    };
    (checkpoint, round % 4 == 3)
}

fn child(dir: &Path, round: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut ns = Namespace::open(dir.join("namespace.json")).expect("open namespace");
        if let (Some(bytes), _) = round_plan(round) {
            ns.set_checkpoint_bytes(bytes);
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "opened").expect("stdout");
        for n in 0..CHANGES {
            writeln!(out, "begin {n}").expect("stdout");
            out.flush().expect("stdout");
            change(&mut ns, round, n);
            ns.commit()
                .await
                .expect("commit")
                .wait()
                .await
                .expect("durable");
            writeln!(out, "ack {n}").expect("stdout");
            out.flush().expect("stdout");
        }
    });
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        let round = std::env::var("REVIVE_NS_CRASH_ROUND")
            .ok()
            .and_then(|r| r.parse().ok())
            .expect("round");
        child(Path::new(&dir), round);
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let model_dir = tempfile::tempdir().expect("tempdir");
    let state = work.path().join("ns");
    std::fs::create_dir_all(&state).expect("mkdir");
    // The model replays every round's acknowledged changes, in memory only
    // (its own log is never committed).
    let mut model = Namespace::open(model_dir.path().join("namespace.json")).expect("model");
    let mut rng = rand::rng();
    let mut total_acked = 0;
    for round in 0..ROUNDS {
        let (_, early) = round_plan(round);
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .env(CHILD_ENV, &state)
            .env("REVIVE_NS_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let delay = if early {
            Duration::from_millis(rng.random_range(0..15))
        } else {
            Duration::from_millis(rng.random_range(50..600))
        };
        std::thread::sleep(delay);
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let stdout = child.stdout.take().expect("stdout");
        let _ = child.wait();
        let (mut acked, mut begun) = (None, None);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut parts = line.split_whitespace();
            match (
                parts.next(),
                parts.next().and_then(|n| n.parse::<u64>().ok()),
            ) {
                (Some("begin"), Some(n)) => begun = Some(n),
                (Some("ack"), Some(n)) => acked = Some(n),
                _ => {}
            }
        }
        let done = acked.map_or(0, |n| n + 1);
        for n in 0..done {
            change(&mut model, round, n);
        }
        let expected = shape(&model);
        let reopened = Namespace::open(state.join("namespace.json"))
            .unwrap_or_else(|e| panic!("round {round}: the namespace does not open: {e}"));
        let got = shape(&reopened);
        drop(reopened);
        if got != expected {
            // The change in flight may have become durable before the kill.
            let in_flight = begun.filter(|b| *b == done);
            match in_flight {
                Some(n) => {
                    change(&mut model, round, n);
                    assert_eq!(
                        got,
                        shape(&model),
                        "round {round}: the reopened namespace is neither the {done} acknowledged \
                         changes nor those plus change {n}"
                    );
                }
                None => panic!(
                    "round {round}: the reopened namespace differs from the {done} acknowledged changes"
                ),
            }
        }
        total_acked += done;
        println!(
            "round {round}: killed after {} ms, {done} changes acknowledged, namespace consistent ({} nodes)",
            delay.as_millis(),
            got.len()
        );
    }
    assert!(total_acked > 0, "the child never acknowledged a change");
    println!("namespace_crash: {ROUNDS} rounds, {total_acked} acknowledged changes, all present");
}

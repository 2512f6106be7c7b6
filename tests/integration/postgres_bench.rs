//! Benchmark of PostgreSQL instant recovery (run by
//! `scripts/bench-postgres.sh`, ignored in the test run). For each database
//! size in `REVIVE_PG_BENCH_MIB` (default "1024 4096"): time to first query
//! by `revive recover` vs `revive restore` + `pg_ctl start`; for the first
//! size also pgbench tps on the published instance vs a restored copy on
//! local disk vs another restored copy through bindfs (a plain FUSE
//! passthrough), all three running and measured in turn, `pg_basebackup`
//! throughput from the published instance, and the write downtime of a
//! switchover. Figures go to stdout as `BENCH-PG <key> <value>`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::fuse::{loopback_up, rerun_isolated};
use crate::support::postgres::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::{backup_json, in_netns, init_repo, revive, run_ok};

const DONE: &str = "POSTGRES-BENCH-DONE";
const TEST: &str = "postgres_bench::instant_recovery_vs_restore";
const PORT: u16 = 5433;
/// Seconds of each pgbench run.
const PGBENCH_SECS: u32 = 10;
/// Rounds of the tps comparison (each runs pgbench on every instance once).
const TPS_ROUNDS: usize = 3;

fn report(key: &str, value: f64) {
    println!("BENCH-PG {key} {value:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: scripts/bench-postgres.sh"]
async fn instant_recovery_vs_restore() {
    if in_netns() {
        return bench_inner().await;
    }
    assert!(postgres_peers_or_skip(), "PostgreSQL 15 is needed");
    rerun_isolated(TEST, DONE, Duration::from_secs(7200)).await;
}

/// Polls until `SELECT 1` answers; the time it took since `since`.
async fn first_query(db: &Endpoint, since: Instant) -> Duration {
    loop {
        if let Ok(c) = db.try_connect().await {
            if c.query_one("SELECT 1", &[]).await.is_ok() {
                return since.elapsed();
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(1200),
            "no first query"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn bench_inner() {
    loopback_up();
    let sizes: Vec<u64> = std::env::var("REVIVE_PG_BENCH_MIB")
        .unwrap_or_else(|_| "1024 4096".into())
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    for (i, mib) in sizes.iter().enumerate() {
        bench_size(*mib, i == 0).await;
    }
    println!("{DONE}");
}

async fn bench_size(mib: u64, full: bool) {
    let tmp = open_tempdir();
    let t = tmp.path();
    let sock = postgres_dir(&t.join("sock"), 0o755);
    let source = Cluster::create(&t.join("source"), 5432, &sock);
    source.endpoint.pgbench_init(4);
    add_incompressible(&source.endpoint, mib).await;
    let repo = init_repo(t, None);
    let base = t.join("base");
    source.basebackup(&base);
    source.stop();
    backup_json(&repo, &base, Some("pg"));
    std::fs::remove_dir_all(&base).unwrap();
    drop(source);
    // The page cache holds what the backup just read: drop it, as after a
    // disaster, for both sides alike.
    drop_caches();

    // revive recover: from the command to the first query.
    let mut spec = ServerSpec::new(&repo)
        .with_api()
        .toml(&pg_host_toml(t, &sock));
    if std::env::var_os("REVIVE_PG_BENCH_LOGS").is_some() {
        // The session's steps with their times.
        spec = spec.log_level("revive=info");
    }
    let mut server = ReviveServer::start(&t.join("server"), spec);
    let restored = t.join("restored");
    let run_dir = t.join("run");
    let _servers = ServersGuard(vec![
        run_dir.join("pg-b").join("data"),
        restored.clone(),
        t.join("bindfs"),
        t.join("tps-local"),
        t.join("production"),
    ]);
    let db = Endpoint {
        socket_dir: sock.clone(),
        port: PORT,
    };
    let started = Instant::now();
    let mut recover = server.ctl();
    recover.args([
        "recover",
        "--kind",
        "postgres",
        "--point",
        "pg@latest",
        "--host",
        "pg1",
        "--name",
        "pg-b",
        "--port",
        "5433",
        "--json",
    ]);
    blocking(|| run_ok(&mut recover));
    let recover_secs = first_query(&db, started).await.as_secs_f64();
    report(&format!("recover_first_query_{mib}"), recover_secs);
    if let Ok(keep) = std::env::var("REVIVE_PG_BENCH_LOGS") {
        let keep = Path::new(&keep);
        let _ = std::fs::create_dir_all(keep);
        let _ = std::fs::copy(
            run_dir.join("pg-b").join("published.log"),
            keep.join(format!("published-{mib}.log")),
        );
        let _ = std::fs::write(keep.join(format!("revive-{mib}.log")), server.log());
    }

    if full {
        blocking(|| compare_tps(&repo, t, &sock, &db));
        let copy = t.join("bb-copy");
        let began = Instant::now();
        // As `revive migrate` runs it (see `Endpoint::basebackup`).
        blocking(|| db.basebackup(&copy));
        let secs = began.elapsed().as_secs_f64();
        let bytes = dir_bytes(&copy);
        report("basebackup_mb_s", bytes as f64 / 1e6 / secs);
        std::fs::remove_dir_all(&copy).unwrap();
        report(
            "switchover_downtime",
            switchover_downtime(&server, &db, &t.join("production")).await,
        );
        // Production holds the port the copies below use.
        stop_server(&t.join("production"), "fast");
    }
    blocking(|| server.stop());
    drop_caches();

    // revive restore, then pg_ctl start: from the command to the first query.
    let started = Instant::now();
    let repo_s = repo.to_string_lossy().into_owned();
    let restored_s = restored.to_string_lossy().into_owned();
    blocking(|| run_ok(revive().args(["restore", "--repo", &repo_s, "pg@latest", &restored_s])));
    let local = start_copy(&restored, &sock, PORT);
    let restore_secs = first_query(&local, started).await.as_secs_f64();
    report(&format!("restore_first_query_{mib}"), restore_secs);
    stop_server(&restored, "fast");
}

/// pgbench tps side by side: the published instance `published`, a restored
/// copy on local disk and another restored copy through bindfs (what any
/// FUSE file system costs) run at once; each round runs pgbench on each in
/// turn, so load from elsewhere hits all three alike. Reports the medians
/// and the medians of the per-round ratios.
fn compare_tps(repo: &Path, t: &Path, sock: &Path, published: &Endpoint) {
    let local_dir = t.join("tps-local");
    let bindfs_src = t.join("tps-bindfs-source");
    for dir in [&local_dir, &bindfs_src] {
        run_ok(
            revive()
                .args(["restore", "--repo"])
                .arg(repo)
                .arg("pg@latest")
                .arg(dir),
        );
    }
    let local = start_copy(&local_dir, sock, PORT + 1);
    let mnt: PathBuf = postgres_dir(&t.join("bindfs"), 0o700);
    ok(std::process::Command::new("bindfs")
        .arg(&bindfs_src)
        .arg(&mnt));
    let through = start_copy(&mnt, sock, PORT + 2);
    let mut runs: [Vec<f64>; 3] = Default::default();
    for _ in 0..TPS_ROUNDS {
        for (i, db) in [published, &through, &local].into_iter().enumerate() {
            runs[i].push(tps(db, PGBENCH_SECS));
        }
    }
    stop_server(&local_dir, "fast");
    stop_server(&mnt, "fast");
    ok(std::process::Command::new("umount").arg(&mnt));
    let [published, bindfs, local] = &runs;
    println!("tps by round: published {published:?}, bindfs {bindfs:?}, local {local:?}");
    report("tps_published", median(published));
    report("tps_bindfs", median(bindfs));
    report("tps_local", median(local));
    let ratio = |of: &[f64]| -> f64 {
        median(
            &published
                .iter()
                .zip(of)
                .map(|(p, o)| p / o)
                .collect::<Vec<_>>(),
        )
    };
    report("tps_ratio_bindfs", ratio(bindfs));
    report("tps_ratio_local", ratio(local));
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn drop_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Starts a restored data folder on `port` with its socket in `sock`.
fn start_copy(data: &Path, sock: &Path, port: u16) -> Endpoint {
    let conf = data.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
    text.push_str(&format!(
        "port = {port}\nunix_socket_directories = '{}'\nlisten_addresses = ''\n",
        sock.display()
    ));
    std::fs::write(&conf, text).unwrap();
    ok(std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(data));
    // The socket folder is the postgres user's: its log can go there.
    let name = data
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let log = sock.join(format!("{name}.log"));
    ok(as_postgres("pg_ctl")
        .args(["start", "-w", "-t", "600", "-D"])
        .arg(data)
        .arg("-l")
        .arg(&log));
    Endpoint {
        socket_dir: sock.to_path_buf(),
        port,
    }
}

/// pgbench's tps over `secs` seconds with 4 clients.
fn tps(db: &Endpoint, secs: u32) -> f64 {
    let report = db.pgbench_report(secs, 4);
    report
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's report:\n{report}"))
}

fn dir_bytes(dir: &Path) -> u64 {
    let out = ok(std::process::Command::new("du").args(["-sb"]).arg(dir));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du")
}

/// Migrates the session to `dest`, then switches over while a client writes
/// one row per commit, reconnecting after failures: the longest gap between
/// two acknowledged writes around the switchover, in seconds.
async fn switchover_downtime(server: &ReviveServer, db: &Endpoint, dest: &Path) -> f64 {
    let id = blocking(|| server.ctl_json(&["sessions"]))[0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    db.connect()
        .await
        .batch_execute("CREATE TABLE ticks (at timestamptz DEFAULT now())")
        .await
        .expect("ticks");
    let dest_s = dest.to_string_lossy().into_owned();
    blocking(|| server.ctl_json(&["migrate", &id, "--to", &dest_s, "--wait"]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acks: Vec<Instant> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(c) = db.try_connect().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                while c
                    .execute("INSERT INTO ticks DEFAULT VALUES", &[])
                    .await
                    .is_ok()
                {
                    acks.push(Instant::now());
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                }
            }
            acks
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let view = blocking(|| server.ctl_json(&["switchover", &id, "--wait"]));
    assert_eq!(view["state"], "done", "{view:#}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let acks = writer.await.expect("writer");
    acks.windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .fold(0.0, f64::max)
}

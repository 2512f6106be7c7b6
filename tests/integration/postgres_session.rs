//! Issue 12 acceptance, whole system: a real PostgreSQL 15 database backed
//! up as a tree restore point from `pg_basebackup -Fp`, recovered by
//! `revive recover --kind postgres` straight from the repository (the data
//! folder presented through FUSE, every write in the write cache), checked
//! with `pg_amcheck` and pgbench, carried through a `kill -9` of revive,
//! moved to production by `revive migrate` and `revive switchover`, with
//! every acknowledged commit counted, and nothing left behind.
//!
//! The database is `REVIVE_PG_DB_MIB` MiB of incompressible rows plus
//! pgbench's tables (default 1024: the issue's ~1 GiB).
//!
//! The test re-runs itself in private mount, pid and network namespaces
//! (`support::fuse::rerun_isolated`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::fuse::{loopback_up, rerun_isolated};
use crate::support::postgres::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::{backup_json, in_netns, init_repo, revive, run_ok, sha256_dir};

const RUN_TIMEOUT: Duration = Duration::from_secs(1800);
const DONE: &str = "POSTGRES-SESSION-ACCEPTED";
const TEST: &str =
    "postgres_session::database_recovered_from_backup_survives_kill9_migrates_and_switches_over";
/// Port of the source cluster, then of the recovered database.
const SOURCE_PORT: u16 = 5432;
const RECOVERED_PORT: u16 = 5433;
/// pgbench scale of the source (100,000 accounts per unit).
const SCALE: u32 = 4;

fn database_mib() -> u64 {
    std::env::var("REVIVE_PG_DB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_recovered_from_backup_survives_kill9_migrates_and_switches_over() {
    if in_netns() {
        return session_inner().await;
    }
    if !postgres_peers_or_skip() {
        return;
    }
    rerun_isolated(TEST, DONE, RUN_TIMEOUT).await;
}

async fn session_inner() {
    loopback_up();
    let tmp = open_tempdir();
    let t = tmp.path();
    let sock = postgres_dir(&t.join("sock"), 0o755);
    let mib = database_mib();

    // The source database, its full backup, writes, and an incremental one.
    let source = Cluster::create(&t.join("source"), SOURCE_PORT, &sock);
    source.endpoint.pgbench_init(SCALE);
    add_incompressible(&source.endpoint, mib).await;
    let repo = init_repo(t, None);
    let full = t.join("base-full");
    source.basebackup(&full);
    let first = backup_json(&repo, &full, Some("pg"));
    assert_eq!(first["kind"], "tree", "{first:#}");
    let source_written = source.endpoint.pgbench(3, 2);
    assert!(source_written > 0);
    let incremental = t.join("base-incr");
    source.basebackup(&incremental);
    let second = backup_json(&repo, &incremental, Some("pg"));
    let new_bytes = second["bytes_new"].as_u64().expect("bytes_new");
    let full_bytes = first["bytes_new"].as_u64().expect("bytes_new");
    println!(
        "database {mib} MiB: the full backup stored {full_bytes} new bytes, the second {new_bytes}"
    );
    // What pgbench touched (its tables, new WAL segments), not the database.
    assert!(
        new_bytes < full_bytes / 4,
        "the second backup adds {new_bytes} bytes to a {full_bytes}-byte first one"
    );
    let expected = source.endpoint.fingerprint().await;
    source.stop();
    std::fs::remove_dir_all(&full).unwrap();
    let repo_before = sha256_dir(&repo);

    // Recover: the database answers on its port, straight from the backup.
    let spec = ServerSpec::new(&repo)
        .with_api()
        .toml(&pg_host_toml(t, &sock));
    let mut server = ReviveServer::start(&t.join("server"), spec);
    let dest = t.join("production");
    let run_dir = t.join("run");
    let published_data = run_dir.join("pg-prod").join("data");
    let _servers = ServersGuard(vec![published_data, dest.clone()]);
    let sessions = blocking(|| {
        server.ctl_json(&[
            "recover",
            "--kind",
            "postgres",
            "--point",
            "pg@latest",
            "--host",
            "pg1",
            "--name",
            "pg-prod",
            "--port",
            &RECOVERED_PORT.to_string(),
            "--wait",
        ])
    });
    let session = &sessions[0];
    assert_eq!(session["state"], "running", "{session:#}");
    let id = session["id"].as_str().expect("id").to_string();
    let db = Endpoint {
        socket_dir: sock.clone(),
        port: RECOVERED_PORT,
    };
    assert_eq!(db.fingerprint().await, expected, "the backup's data");
    blocking(|| db.amcheck());
    let mut committed = blocking(|| db.pgbench(5, 4));
    assert!(committed > 0);
    let history = expected[4] + committed as i64;
    assert_eq!(
        db.int("SELECT count(*) FROM pgbench_history").await,
        history,
        "every commit acknowledged to pgbench is in the published database"
    );

    // kill -9 of revive under acknowledged writers: after the restart the
    // session remounts, PostgreSQL recovers, and no acknowledged commit is lost.
    db.connect()
        .await
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .expect("create acked");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| tokio::spawn(acked_writer(db.clone(), w * 1_000_000, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    blocking(|| server.kill9());
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(
        !acked.is_empty(),
        "commits were acknowledged before the kill"
    );
    blocking(|| server.restart());
    blocking(|| {
        server.wait_session(&id, Duration::from_secs(300), "running again", |s| {
            s["state"] == "running"
        })
    });
    wait_until(
        Duration::from_secs(120),
        "answering after the restart",
        || {
            let db = db.clone();
            async move { db.try_connect().await.is_ok() }
        },
    )
    .await;
    let present = db
        .int(&format!(
            "SELECT count(*) FROM acked WHERE id IN ({})",
            acked
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await;
    assert_eq!(present, acked.len() as i64, "acknowledged commits lost");
    stop.store(true, Ordering::SeqCst);

    // Migrate while pgbench writes; the standby streams until switchover.
    let writer = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.pgbench(8, 2))
    };
    let migrating =
        blocking(|| server.ctl_json(&["migrate", &id, "--to", &dest.to_string_lossy(), "--wait"]));
    assert_eq!(migrating["state"], "migrating", "{migrating:#}");
    committed += writer.await.expect("pgbench during the migration");
    committed += blocking(|| db.pgbench(3, 2));
    let before = db.fingerprint().await;
    assert_eq!(before[4], expected[4] + committed as i64);
    let acked_rows = db.int("SELECT count(*) FROM acked").await;
    let view = blocking(|| server.ctl_json(&["switchover", &id, "--wait"]));
    assert_eq!(view["state"], "done", "{view:#}");

    // Production: the session's port, the destination folder, writable, and
    // every commit there.
    let production = db.clone();
    assert_eq!(
        production
            .text("SELECT current_setting('data_directory')")
            .await,
        dest.to_string_lossy()
    );
    assert_eq!(
        production.text("SELECT pg_is_in_recovery()::text").await,
        "false"
    );
    assert_eq!(production.fingerprint().await, before);
    assert_eq!(
        production.int("SELECT count(*) FROM acked").await,
        acked_rows
    );
    assert_eq!(
        production
            .int("SELECT count(*) FROM pg_replication_slots")
            .await,
        0,
        "no replication slot left"
    );
    assert!(
        blocking(|| production.pgbench(2, 2)) > 0,
        "production takes writes"
    );

    // Nothing left: no FUSE mount, no write cache, no session folder; the
    // repository is byte for byte what it was, and verifies.
    assert!(mounts_under(t).is_empty(), "{:?}", mounts_under(t));
    let caches: Vec<_> = std::fs::read_dir(server.cache_root())
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(caches.is_empty(), "write caches left: {caches:?}");
    assert!(
        !run_dir.join("pg-prod").exists(),
        "session folder left in {}",
        run_dir.display()
    );
    blocking(|| server.stop());
    assert_eq!(sha256_dir(&repo), repo_before, "the repository changed");
    let repo_s = repo.to_string_lossy().into_owned();
    run_ok(revive().args(["verify", "--repo", &repo_s]));
    println!("{DONE}");
}

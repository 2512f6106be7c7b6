//! Issue 12: PostgreSQL instant recovery. A real PostgreSQL 15 runs on a
//! restore point through the FUSE frontend (every write in the write cache),
//! pgbench runs against it, a standby built by `pg_basebackup` takes over at
//! switchover, and nothing is left behind.
//!
//! Every test re-runs itself in private mount, pid and network namespaces
//! (`support::fuse::rerun_isolated`): mounts, servers and ports stay
//! inside, and every process dies with the test.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use revive::datastore::{Datastore, DatastoreConfig, ExportConfig};
use revive::drivers::postgres::{PostgresConfig, PostgresDriver};
use revive::drivers::{DatastoreSpec, Driver, MigrationStatus, VmRef, VmSpec};
use revive::repo::Repository;

use crate::support::fuse::{loopback_up, rerun_isolated};
use crate::support::postgres::*;
use crate::support::{backup_json, in_netns, init_repo};

const RUN_TIMEOUT: Duration = Duration::from_secs(900);
const SESSION: &str = "pg-ir";

fn driver_config(tmp: &Path, socket_dir: &Path) -> PostgresConfig {
    let mut config: PostgresConfig = toml::from_str("").expect("defaults");
    config.run_dir = tmp.join("run");
    config.socket_dir = socket_dir.to_path_buf();
    config.data_parent = tmp.to_path_buf();
    config.listen_addresses = "127.0.0.1".into();
    config.port = 5433;
    config
}

async fn datastore(tmp: &Path, repo: &Path) -> Arc<Datastore> {
    let repo = Repository::open_local(repo).await.expect("open repo");
    let config = DatastoreConfig {
        state_dir: tmp.join("state"),
        cache_root: tmp.join("cache"),
        block_cache_bytes: 64 << 20,
        readahead_chunks: 8,
        exports: vec![ExportConfig {
            path: "/revive".into(),
            allowed_clients: Vec::new(),
        }],
    };
    Arc::new(Datastore::open(repo, config).await.expect("datastore"))
}

const DRIVER_DONE: &str = "POSTGRES-DRIVER-CHECKS-PASSED";
const DRIVER_TEST: &str =
    "postgres::driver_runs_pgbench_on_the_mount_then_switches_over_to_a_standby";

/// The driver alone, on a basebackup published as its tree restore point
/// (read through to the chunks, writes in the write cache): register and power on
/// (first query), pgbench on the published instance with every acknowledged
/// commit counted, migrate to a local folder while pgbench writes, switch
/// over; production answers on the same port, writable, not in recovery,
/// with every commit and the same counts and sums; no mount is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn driver_runs_pgbench_on_the_mount_then_switches_over_to_a_standby() {
    if in_netns() {
        return driver_inner().await;
    }
    if !postgres_peers_or_skip() {
        return;
    }
    rerun_isolated(DRIVER_TEST, DRIVER_DONE, RUN_TIMEOUT).await;
}

async fn driver_inner() {
    loopback_up();
    let tmp = open_tempdir();
    let t = tmp.path();
    let sock = postgres_dir(&t.join("sock"), 0o755);
    // A source cluster and its basebackup.
    let source = Cluster::create(&t.join("source"), 5432, &sock);
    source.endpoint.pgbench_init(2);
    let base = t.join("base");
    source.basebackup(&base);
    source.stop();
    // The basebackup as a tree restore point, published as it is: the
    // published instance reads its files from the chunks.
    let repo = init_repo(t, None);
    let backed = backup_json(&repo, &base, Some("pg"));
    assert_eq!(backed["kind"], "tree", "{backed:#}");
    let point = backed["id"].as_str().expect("id").to_string();
    let ds = datastore(t, &repo).await;
    ds.publish("/revive", SESSION, &point, None)
        .await
        .expect("publish");

    let config = driver_config(t, &sock);
    let run_dir = config.run_dir.clone();
    let driver = PostgresDriver::new("pg1", config, ds.clone());
    let data = run_dir.join(SESSION).join("data");
    let dest = t.join("production");
    let _servers = ServersGuard(vec![data.clone(), dest.clone()]);
    let spec = VmSpec {
        name: SESSION.into(),
        source_vm: "pg".into(),
        folder: SESSION.into(),
        point: point.clone(),
        port: Some(5433),
        ..VmSpec::default()
    };
    let datastore_spec = DatastoreSpec {
        name: "revive".into(),
        remote_host: "127.0.0.1".into(),
        remote_path: "/revive".into(),
        local_path: None,
    };
    let vm = driver
        .register_vm(&datastore_spec, &spec)
        .await
        .expect("register");
    assert_eq!(vm, VmRef(SESSION.into()));
    assert_eq!(mounts_under(&run_dir).len(), 1, "one FUSE mount");
    driver.power_on(&vm).await.expect("power on");
    let published = Endpoint {
        socket_dir: sock.clone(),
        port: 5433,
    };
    assert_eq!(
        published.int("SELECT count(*) FROM pgbench_accounts").await,
        200_000
    );
    let committed = published.pgbench(5, 4);
    assert!(committed > 0);
    assert_eq!(
        published.int("SELECT count(*) FROM pgbench_history").await,
        committed as i64,
        "every commit acknowledged to pgbench is there"
    );
    published.amcheck();

    // The FUSE connection dies under a writer (as when revive is killed): a
    // driver of a new process cleans the dead mount, stops the orphaned
    // postmaster, mounts again and restarts PostgreSQL; every acknowledged
    // commit is there.
    published
        .connect()
        .await
        .batch_execute("CREATE TABLE acked (id bigint PRIMARY KEY)")
        .await
        .expect("create acked");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| tokio::spawn(acked_writer(published.clone(), w * 1_000_000, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    abort_fuse_connection(&data).await;
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(!acked.is_empty(), "the writers got commits acknowledged");
    // The old driver is forgotten, not dropped: a killed process unmounts nothing.
    std::mem::forget(driver);
    let driver = PostgresDriver::new("pg1", driver_config(t, &sock), ds.clone());
    driver.resume(&vm).await.expect("resume after the crash");
    assert_eq!(mounts_under(&run_dir).len(), 1, "one live mount again");
    let present = published
        .int(&format!(
            "SELECT count(*) FROM acked WHERE id IN ({})",
            acked
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await;
    assert_eq!(
        present,
        acked.len() as i64,
        "every acknowledged commit survived"
    );
    stop.store(true, Ordering::SeqCst);
    let committed = committed + published.pgbench(2, 2);

    // Migrate while pgbench writes.
    let task = driver
        .start_live_migration(&vm, &dest.to_string_lossy())
        .await
        .expect("start migration");
    let writer = {
        let p = published.clone();
        tokio::task::spawn_blocking(move || p.pgbench(8, 2))
    };
    let mut seen = Vec::new();
    loop {
        let status = driver
            .live_migration_status(&vm, &task)
            .await
            .expect("status");
        seen.push(status.clone());
        match status {
            MigrationStatus::Syncing { .. } => break,
            MigrationStatus::Running { .. } => {}
            other => panic!("migration went {other:?}; seen {seen:?}"),
        }
        assert!(seen.len() < 1200, "standby never streams: {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let committed = committed + writer.await.unwrap();
    let before = published.fingerprint().await;
    assert_eq!(before[4], committed as i64);
    driver
        .complete_live_migration(&vm, &task)
        .await
        .expect("switch over");
    assert_eq!(
        driver
            .live_migration_status(&vm, &task)
            .await
            .expect("status"),
        MigrationStatus::Completed
    );
    // Production: the same port, the destination folder, writable.
    let production = published.clone();
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
        production
            .int("SELECT count(*) FROM pg_replication_slots")
            .await,
        0
    );
    let more = production.pgbench(2, 2);
    assert!(more > 0, "production takes writes");
    assert!(mounts_under(&run_dir).is_empty(), "no mount left");
    println!("{DRIVER_DONE}");
}

/// Aborts the FUSE connection of the mount at `path` (fusectl's `abort`):
/// to its users the mount dies as if its server had been killed.
async fn abort_fuse_connection(path: &Path) {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let connections = Path::new("/sys/fs/fuse/connections");
        if std::fs::read_dir(connections).map_or(true, |mut d| d.next().is_none()) {
            ok(std::process::Command::new("mount")
                .args(["-t", "fusectl", "fusectl"])
                .arg(connections));
        }
        let dev = std::fs::metadata(&path).expect("stat mount").dev();
        let minor = libc::minor(dev);
        std::fs::write(connections.join(minor.to_string()).join("abort"), "1")
            .expect("abort the FUSE connection");
    })
    .await
    .unwrap();
}

const REFUSE_DONE: &str = "POSTGRES-REFUSALS-CHECKED";
const REFUSE_TEST: &str = "postgres::bad_input_is_refused_before_anything_starts";

/// `revive recover --kind postgres` refuses, before anything is published,
/// mounted or started, with the check named: a restore point that is not a
/// PostgreSQL data folder, a full write cache location, a cluster of another
/// major version, and a busy port.
#[tokio::test]
async fn bad_input_is_refused_before_anything_starts() {
    if in_netns() {
        return refuse_inner();
    }
    if !postgres_peers_or_skip() {
        return;
    }
    rerun_isolated(REFUSE_TEST, REFUSE_DONE, RUN_TIMEOUT).await;
}

fn refuse_inner() {
    loopback_up();
    let tmp = open_tempdir();
    let t = tmp.path();
    let sock = postgres_dir(&t.join("sock"), 0o755);
    let repo = init_repo(t, None);
    let vm = crate::support::vm::SampleVm::create(&t.join("src"), "web01", 4 << 20, 3);
    backup_json(&repo, &vm.dir, None);
    let spec = crate::support::server::ServerSpec::new(&repo)
        .with_api()
        .toml(&pg_host_toml(t, &sock));
    let server = crate::support::server::ReviveServer::start(&t.join("server"), spec);
    let refused = |args: &[&str], check: &str| {
        let mut cmd = server.ctl();
        cmd.args([
            "recover", "--kind", "postgres", "--host", "pg1", "--wait", "--json",
        ])
        .args(args);
        let (code, out, _) = crate::support::run_fail(&mut cmd);
        assert_eq!(code, 3, "{out}");
        let sessions: serde_json::Value = serde_json::from_str(&out).expect("json");
        let s = &sessions[0];
        assert_eq!(s["state"], "failed", "{s:#}");
        let error = s["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("validating: validation failed: ") && error.contains(check),
            "{error}"
        );
        assert!(s["cache_bytes"].is_null(), "nothing published: {s:#}");
        error.to_string()
    };
    // A VM folder is not a data folder.
    let error = refused(
        &["--point", "web01@latest", "--port", "5433"],
        "postgres data folder",
    );
    assert!(error.contains("PG_VERSION"), "{error}");
    // A write cache location without room.
    let full = t.join("full");
    std::fs::create_dir_all(&full).unwrap();
    ok(std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&full));
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=16"])
        .arg(format!("of={}", full.join("fill").display()))
        .output();
    let error = refused(
        &[
            "--point",
            "web01@latest",
            "--cache",
            &full.to_string_lossy(),
        ],
        "write cache space",
    );
    assert!(
        error.contains(&full.to_string_lossy().into_owned()),
        "{error}"
    );
    // Data folders (trees) that cannot run here: a PostgreSQL 14 cluster,
    // and a 15 one whose port is taken.
    let fake = |name: &str, version: &str| {
        let dir = t.join(name);
        std::fs::create_dir_all(dir.join("global")).unwrap();
        std::fs::create_dir_all(dir.join("base/1")).unwrap();
        std::fs::write(dir.join("PG_VERSION"), format!("{version}\n")).unwrap();
        std::fs::write(dir.join("global/pg_control"), vec![0u8; 8192]).unwrap();
        backup_json(&repo, &dir, Some(name));
    };
    fake("pg14", "14");
    let error = refused(
        &["--point", "pg14@latest", "--port", "5433"],
        "postgres version",
    );
    assert!(error.contains("PostgreSQL 14"), "{error}");
    fake("pg15", "15");
    let held = std::net::TcpListener::bind(("127.0.0.1", 5433)).expect("hold port 5433");
    let error = refused(&["--point", "pg15@latest", "--port", "5433"], "port");
    assert!(error.contains("port 5433"), "{error}");
    drop(held);
    // Nothing was mounted, published or started.
    assert!(mounts_under(&t.join("run")).is_empty());
    assert!(
        std::fs::read_dir(t.join("run")).map_or(true, |mut d| d.next().is_none()),
        "no session folder"
    );
    assert!(
        std::fs::read_dir(server.cache_root()).map_or(true, |mut d| d.next().is_none()),
        "no write cache"
    );
    println!("{REFUSE_DONE}");
}

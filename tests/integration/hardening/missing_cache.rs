//! Item 4: a missing write cache. When a publication's cache folder was
//! missing at start (production storage not mounted yet), revive silently
//! made an empty one: the guest's writes vanished and files clients had
//! created read as empty, with no log line.

use std::fs;
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{nfsstat3, stable_how};
use serde_json::Value;

use crate::support::client::*;
use crate::support::server::{ReviveServer, ServerSpec, API_TOKEN};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;
/// Longest wait for a session to reach a state.
const LIMIT: Duration = Duration::from_secs(90);

fn state(s: &Value) -> String {
    s["state"].as_str().unwrap_or("?").to_string()
}

fn error(s: &Value) -> String {
    s["error"].as_str().unwrap_or("").to_string()
}

/// Prometheus text of the server's `/metrics`.
async fn metrics(server: &ReviveServer) -> String {
    let port = server.api_port.expect("api");
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// A session whose write cache sits on "production storage" (a folder the
/// test moves away between restarts, as an unmounted datastore would):
/// with the folder missing at start, every call that needs the cache is
/// answered NFS3ERR_JUKEBOX, nothing is created in its place, the session
/// goes to `waiting` naming the folder, the log has an error and
/// `/metrics` counts the publication; once the folder is back the session
/// runs again and every byte the client wrote is there. Gone again, only
/// `revive discard-cache` makes it serve again, from the backup alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_write_cache_is_refused_until_it_is_back_or_discarded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(&tmp.path().join("src"), "miss01", 4 * MIB, 87);
    backup_json(&repo, &vm.dir, None);
    let storage = tmp.path().join("production");
    fs::create_dir_all(&storage).expect("storage");
    let spec = ServerSpec::new(&repo)
        .with_api()
        .log_level("revive=info")
        .toml("[sessions]\nmin_free_cache = \"1MiB\"\nretries = 1000\nretry_interval_secs = 1\n");
    let mut server = ReviveServer::start(&tmp.path().join("server"), spec);
    let sessions = server.ctl_json(&[
        "recover",
        "--vm",
        "miss01",
        "--cache",
        storage.to_str().expect("utf8"),
        "--wait",
    ]);
    let session = &sessions.as_array().expect("sessions")[0];
    let id = session["id"].as_str().expect("id").to_string();
    let name = session["name"].as_str().expect("name").to_string();
    let cache = storage.join(&name);

    // The client writes a new file and a block of the disk.
    let note = b"written by the guest".to_vec();
    let block = pattern(64 * 1024, 88);
    let (disk_fh, note_fh) = {
        let conn = mount_at(server.nfs_port, server.mount_port, "/revive")
            .await
            .expect("mount");
        let root = conn.root_nfs_fh3();
        let mut c = conn.into_nfs3_client();
        let folder = lookup(&mut c, &root, &name).await.expect("folder");
        let disk = lookup(&mut c, &folder, "miss01-flat.vmdk")
            .await
            .expect("disk");
        let note_fh = create(&mut c, &folder, "note.txt").await.expect("create");
        write(&mut c, &note_fh, 0, &note, stable_how::FILE_SYNC).await;
        write(&mut c, &disk, MIB, &block, stable_how::FILE_SYNC).await;
        (disk, note_fh)
    };
    assert!(
        cache.is_dir(),
        "the session's write cache is at {}",
        cache.display()
    );

    // The production storage is not there when revive starts.
    server.stop();
    let away = tmp.path().join("unmounted");
    fs::rename(&cache, &away).expect("move the cache away");
    server.restart();
    let mut c = client_at(server.nfs_port).await;
    assert_eq!(
        read(&mut c, &disk_fh, MIB, 4096).await.err(),
        Some(nfsstat3::NFS3ERR_JUKEBOX),
        "READ of the disk without its write cache"
    );
    assert_eq!(
        getattr(&mut c, &note_fh).await.map(|a| a.size),
        Err(nfsstat3::NFS3ERR_JUKEBOX),
        "GETATTR of a created file without its write cache"
    );
    assert!(
        !cache.exists(),
        "nothing may be created in place of the missing cache"
    );
    let waiting = server.wait_session(&id, LIMIT, "waiting on its write cache", |s| {
        state(s) == "waiting" && error(s).contains(cache.to_str().expect("utf8"))
    });
    assert!(error(&waiting).contains("missing"), "{waiting:#}");
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("write cache") && l.contains(&name)),
        "no error in the log:\n{log}"
    );
    let text = metrics(&server).await;
    let gauge =
        format!("revive_write_cache_missing{{export=\"/revive\",publication=\"{name}\"}} 1");
    assert!(text.contains(&gauge), "{gauge} not in:\n{text}");
    assert!(
        !cache.exists(),
        "nothing may be created in place of the missing cache"
    );

    // The storage comes back: served again, with every byte written.
    fs::rename(&away, &cache).expect("move the cache back");
    server.wait_session(&id, LIMIT, "running again", |s| state(s) == "running");
    let back = read(&mut c, &disk_fh, MIB, 64 * 1024)
        .await
        .expect("read the disk");
    assert!(back == block, "the disk's write is back");
    assert_eq!(read(&mut c, &note_fh, 0, 4096).await, Ok(note.clone()));
    let text = metrics(&server).await;
    let gauge =
        format!("revive_write_cache_missing{{export=\"/revive\",publication=\"{name}\"}} 0");
    assert!(text.contains(&gauge), "{gauge} not in:\n{text}");

    // Gone for good: a retry does not discard it, discard-cache does.
    drop(c);
    server.stop();
    fs::remove_dir_all(&cache).expect("lose the cache");
    server.restart();
    server.wait_session(&id, LIMIT, "waiting", |s| state(s) == "waiting");
    run_ok(server.ctl().args(["retry", &id]));
    let mut c = client_at(server.nfs_port).await;
    assert_eq!(
        read(&mut c, &disk_fh, MIB, 4096).await.err(),
        Some(nfsstat3::NFS3ERR_JUKEBOX),
        "a retry must not discard the cache"
    );
    assert!(!cache.exists(), "a retry must not create a cache");
    run_ok(server.ctl().args(["discard-cache", &id]));
    server.wait_session(&id, LIMIT, "running from the backup", |s| {
        state(s) == "running"
    });
    let disk = fs::read(vm.flat()).expect("flat disk");
    let want = disk[MIB as usize..][..64 * 1024].to_vec();
    let back = read(&mut c, &disk_fh, MIB, 64 * 1024)
        .await
        .expect("read the disk");
    assert!(back == want, "the disk reads as the backup");
    assert_eq!(getattr(&mut c, &note_fh).await.map(|a| a.size), Ok(0));
    assert!(cache.is_dir(), "discard-cache starts an empty write cache");
    let log = server.log();
    assert!(log.contains("discarded"), "the discard is logged:\n{log}");
    run_ok(server.ctl().args(["stop", &id, "--wait"]));
    server.stop();
}

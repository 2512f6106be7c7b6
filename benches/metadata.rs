//! Namespace changes through the NFS server: the time of one CREATE + REMOVE
//! pair (issue 18 item 6, the number to compare before and after the
//! metadata log).
//!
//! - `create_remove/vm_folder`: a `.lck`-style file created and removed in
//!   a published VM folder of an export holding nothing else.
//! - `create_remove/files_1000`: the same with 1000 more files in the
//!   export: a change that rewrites the whole namespace costs more with
//!   every file; a logged change does not.
//!
//! The datastore and NFS server are the library's, as `revive serve` runs
//! them, on loopback ports; the client is `nfs3_client`, one call at a time.
//! State, repository and write caches live under `REVIVE_BENCH_DIR`
//! (default `target/`), so every fsync reaches the real disk.
//!
//! Run: `scripts/bench-metadata.sh` (or `cargo bench --bench metadata`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nfs3_client::nfs3_types::nfs3::{self, nfs_fh3, Nfs3Option, Nfs3Result};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::{Nfs3Client, Nfs3ConnectionBuilder};
use revive::datastore::{Datastore, DatastoreConfig, ExportConfig};
use revive::nfs::{NfsListeners, NfsServer};
use revive::progress::NoProgress;
use revive::repo::{self, BackupOptions, Repository};
use revive::store::LocalStore;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Name of the published VM and its folder.
const VM: &str = "meta";

fn bench_dir() -> tempfile::TempDir {
    let root = std::env::var_os("REVIVE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    std::fs::create_dir_all(&root).expect("bench folder");
    tempfile::tempdir_in(root).expect("temp dir")
}

fn dirop(dir: &nfs_fh3, name: &str) -> nfs3::diropargs3<'static> {
    nfs3::diropargs3 {
        dir: dir.clone(),
        name: nfs3::filename3(Opaque::owned(name.as_bytes().to_vec())),
    }
}

/// A running server publishing a small VM, and a mounted client.
struct Setup {
    _tmp: tempfile::TempDir,
    client: Nfs3Client<TokioIo<TcpStream>>,
    root: nfs_fh3,
    folder: nfs_fh3,
}

async fn setup() -> Setup {
    let tmp = bench_dir();
    let vm = tmp.path().join("src").join(VM);
    std::fs::create_dir_all(&vm).expect("vm folder");
    std::fs::write(vm.join(format!("{VM}.vmx")), "displayName = \"meta\"\n").expect("vmx");
    std::fs::write(vm.join(format!("{VM}-flat.vmdk")), vec![7u8; 1 << 20]).expect("disk");
    let store = Arc::new(LocalStore::open(tmp.path().join("repo")).expect("store"));
    let repository = Repository::init(store, repo::default_chunk_size())
        .await
        .expect("init");
    repo::backup(&repository, &vm, &BackupOptions::default(), &NoProgress)
        .await
        .expect("backup");
    let config = DatastoreConfig {
        state_dir: tmp.path().join("state"),
        cache_root: tmp.path().join("cache"),
        block_cache_bytes: 16 << 20,
        readahead_chunks: 0,
        exports: vec![ExportConfig {
            path: "/revive".into(),
            allowed_clients: vec![IpAddr::from(Ipv4Addr::LOCALHOST)],
        }],
    };
    let datastore = Arc::new(Datastore::open(repository, config).await.expect("open"));
    datastore
        .publish("/revive", VM, &format!("{VM}@latest"), None)
        .await
        .expect("publish");
    let nfs = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let listeners = NfsListeners {
        nfs,
        mount: None,
        portmap_tcp: None,
        portmap_udp: None,
    };
    let port = listeners.ports().expect("ports").nfs;
    tokio::spawn(NfsServer::new(datastore).serve(listeners, std::future::pending()));
    let cred = opaque_auth::auth_unix(&auth_unix {
        stamp: 1,
        machinename: Opaque::borrowed(b"bench"),
        uid: 0,
        gid: 0,
        gids: vec![],
    });
    let conn = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", "/revive")
        .mount_port(port)
        .nfs3_port(port)
        .connect_from_privileged_port(false)
        .credential(cred)
        .mount()
        .await
        .expect("mount");
    let root = conn.root_nfs_fh3();
    let mut client = conn.into_nfs3_client();
    let folder = match client
        .lookup(&nfs3::LOOKUP3args {
            what: dirop(&root, VM),
        })
        .await
        .expect("lookup rpc")
    {
        Nfs3Result::Ok(ok) => ok.object,
        Nfs3Result::Err((stat, _)) => panic!("lookup {VM}: {stat:?}"),
    };
    Setup {
        _tmp: tmp,
        client,
        root,
        folder,
    }
}

async fn create(c: &mut Nfs3Client<TokioIo<TcpStream>>, dir: &nfs_fh3, name: &str) {
    let res = c
        .create(&nfs3::CREATE3args {
            where_: dirop(dir, name),
            how: nfs3::createhow3::GUARDED(nfs3::sattr3::default()),
        })
        .await
        .expect("create rpc");
    assert!(matches!(res, Nfs3Result::Ok(_)), "create {name}: {res:?}");
}

async fn remove(c: &mut Nfs3Client<TokioIo<TcpStream>>, dir: &nfs_fh3, name: &str) {
    let res = c
        .remove(&nfs3::REMOVE3args {
            object: dirop(dir, name),
        })
        .await
        .expect("remove rpc");
    assert!(matches!(res, Nfs3Result::Ok(_)), "remove {name}: {res:?}");
}

fn create_remove(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("create_remove");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    for extra in [0usize, 1000] {
        let mut s = rt.block_on(setup());
        rt.block_on(async {
            // Filler files in a folder of their own at the export root.
            if extra > 0 {
                let res = s
                    .client
                    .mkdir(&nfs3::MKDIR3args {
                        where_: dirop(&s.root, "filler"),
                        attributes: nfs3::sattr3::default(),
                    })
                    .await
                    .expect("mkdir rpc");
                let Nfs3Result::Ok(ok) = res else {
                    panic!("mkdir: {res:?}")
                };
                let Nfs3Option::Some(filler) = ok.obj else {
                    panic!("mkdir returned no handle")
                };
                for i in 0..extra {
                    create(&mut s.client, &filler, &format!("f{i:05}")).await;
                }
            }
        });
        let name = if extra == 0 {
            "vm_folder".to_string()
        } else {
            format!("files_{extra}")
        };
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        let name = format!(".lck-{i:016x}");
                        create(&mut s.client, &s.folder, &name).await;
                        remove(&mut s.client, &s.folder, &name).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, create_remove);
criterion_main!(benches);

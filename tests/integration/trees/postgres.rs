//! A real PostgreSQL 15 basebackup (`pg_basebackup -Fp -X stream`) backed up
//! as a tree, restored, checked by `pg_verifybackup` against its own
//! backup_manifest, and started: it answers queries with the data it had.

use std::fs;

use crate::support::moto::free_port;
use crate::support::moto::TestRepo;
use crate::support::postgres::{as_postgres, ok, open_tempdir, pg_or_skip, postgres_dir, Cluster};
use crate::support::tree::assert_same_tree;
use crate::support::*;

#[test]
fn a_restored_basebackup_passes_pg_verifybackup_and_starts() {
    if !pg_or_skip() {
        return;
    }
    let tmp = open_tempdir();
    let pg = postgres_dir(&tmp.path().join("pg"), 0o755);
    let primary = Cluster::create(&pg.join("primary"), free_port(), &pg);
    primary.endpoint.psql(
        "create table t as select i, md5(i::text) as h from generate_series(1, 20000) i; \
         create index on t (i);",
    );
    let expected = primary
        .endpoint
        .psql("select count(*), sum(i), md5(string_agg(h, '' order by i)) from t");
    let bb1 = pg.join("basebackup-1");
    primary.basebackup(&bb1);

    let repo = TestRepo::local(tmp.path());
    repo.init();
    let first = repo.backup(&bb1, Some("pg-prod"));
    assert_eq!(first["kind"], "tree", "{first}");
    assert!(first["counts"]["files"].as_u64().unwrap() > 900, "{first}");

    // A second basebackup after a few writes: most of it is deduplicated.
    primary
        .endpoint
        .psql("insert into t select i, md5(i::text) from generate_series(20001, 20100) i");
    let bb2 = pg.join("basebackup-2");
    primary.basebackup(&bb2);
    primary.stop();
    let second = repo.backup(&bb2, Some("pg-prod"));
    assert_eq!(second["parent"], first["id"]);
    let (new, size) = (
        second["bytes_new"].as_u64().unwrap(),
        second["logical_size"].as_u64().unwrap(),
    );
    assert!(
        new * 4 < size,
        "second basebackup stored {new} new bytes of {size}"
    );

    let restored = pg.join("restored");
    repo.restore(first["id"].as_str().unwrap(), &restored);
    assert_same_tree(&bb1, &restored, &[], 0);
    let verify = ok(as_postgres("pg_verifybackup").arg("-n").arg(&restored));
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(said.contains("successfully verified"), "{said}");
    assert!(run_ok(&mut repo.cmd("verify")).contains(": ok"));

    // PostgreSQL starts on the restored copy (recovering from the backup
    // label) and answers with the data of the first basebackup.
    let copy = Cluster::open(&restored, free_port(), &pg);
    assert_eq!(
        copy.endpoint
            .psql("select count(*), sum(i), md5(string_agg(h, '' order by i)) from t"),
        expected
    );
    assert_eq!(copy.endpoint.psql("select pg_is_in_recovery()"), "f");
    drop(copy);
    assert!(fs::metadata(restored.join("PG_VERSION")).is_ok());
}

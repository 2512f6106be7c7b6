//! libiscsi's conformance suite (`iscsi-test-cu`) against revive's target
//! and against tgtd on the same selection, each test bounded in time:
//! revive must pass every test tgtd passes. The default run takes a
//! bounded selection; `scripts/iscsi-conformance.sh` runs the whole suite
//! (`REVIVE_ISCSI_SUITE=full`, the ignored test below).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::iscsi::{
    cu_log, libiscsi_or_skip, loopback_access, run_cu, suite_tests, tgtd_or_skip, CuOutcome,
    InProcessTarget, PublishedDisk, Tgtd,
};
use crate::support::vm::SampleVm;
use crate::support::{backup_json, init_repo};

/// The disk both targets serve: 64 MiB.
const DISK: u64 = 64 << 20;

/// Longest run of one test (the CmdSN tests wait 3 s for a timeout, the
/// task management ones up to 5 s).
const TEST_LIMIT: Duration = Duration::from_secs(60);

/// The selection of the default test run: every area of the target
/// (inquiry and VPD, capacity, reads and writes, write same, unmap, LBA
/// status, mode pages, reservations, residuals, CmdSN and DataSN checks,
/// task management), about a minute and a half for both targets together.
/// Left out: GetLBAStatus.UnmapSingle (libiscsi 1.19 expects the first
/// descriptor at the next physical block rather than at the LBA asked for,
/// which SBC-3 requires), iSCSIDataSnInvalid and LUNResetSimpleAsync (their
/// 1.19 versions fail against any target: the first reconnects with the
/// negotiated settings the test had overridden, the second asserts before
/// the reset is answered); the full suite runs them all.
const SELECTION: &[&str] = &[
    "ALL.Inquiry.Standard",
    "ALL.Inquiry.AllocLength",
    "ALL.Inquiry.EVPD",
    "ALL.Inquiry.BlockLimits",
    "ALL.Inquiry.MandatoryVPDSBC",
    "ALL.Inquiry.SupportedVPD",
    "ALL.Inquiry.VersionDescriptors",
    "ALL.Mandatory.MandatorySBC",
    "ALL.ReadCapacity10.Simple",
    "ALL.ReadCapacity16.Simple",
    "ALL.ReadCapacity16.Alloclen",
    "ALL.TestUnitReady.Simple",
    "ALL.Read6.Simple",
    "ALL.Read10.Simple",
    "ALL.Read10.BeyondEol",
    "ALL.Read10.Async",
    "ALL.Read12.Simple",
    "ALL.Read16.Simple",
    "ALL.Read16.BeyondEol",
    "ALL.Write10.Simple",
    "ALL.Write10.BeyondEol",
    "ALL.Write10.DpoFua",
    "ALL.Write10.Async",
    "ALL.Write12.Simple",
    "ALL.Write16.Simple",
    "ALL.Prefetch10.Simple",
    "ALL.Verify10.Simple",
    "ALL.Verify10.Mismatch",
    "ALL.WriteVerify10.Simple",
    "ALL.WriteSame10.Simple",
    "ALL.WriteSame10.Unmap",
    "ALL.WriteSame10.UnmapUntilEnd",
    "ALL.WriteSame16.Simple",
    "ALL.WriteSame16.Unmap",
    "ALL.Unmap.Simple",
    "ALL.Unmap.ZeroBlocks",
    "ALL.GetLBAStatus.Simple",
    "ALL.CompareAndWrite.Simple",
    "ALL.CompareAndWrite.Miscompare",
    "ALL.ModeSense6.AllPages",
    "ALL.ModeSense6.Control",
    "ALL.ModeSense6.Residuals",
    "ALL.ModeSense6.Control-SWP",
    "ALL.ReportSupportedOpcodes.Simple",
    "ALL.Reserve6.Simple",
    "ALL.Reserve6.2Initiators",
    "ALL.ProutRegister.Simple",
    "ALL.ProutReserve.Simple",
    "ALL.PrinReadKeys.Simple",
    "ALL.ProutClear.Simple",
    "ALL.iSCSIResiduals.Read10Residuals",
    "ALL.iSCSIResiduals.Write10Residuals",
    "ALL.iSCSIResiduals.Write16Residuals",
    "ALL.iSCSIcmdsn.iSCSICmdSnTooHigh",
    "ALL.iSCSIcmdsn.iSCSICmdSnTooLow",
    "ALL.iSCSITMF.AbortTaskSimpleAsync",
];

/// Tests libiscsi 1.19 gets wrong, which revive fails where tgtd skips
/// (tgtd lacks thin provisioning): GET LBA STATUS from an LBA inside a
/// physical block must describe that LBA first (SBC-3), the test expects
/// the next physical block.
const TEST_BUGS: &[&str] = &["ALL.GetLBAStatus.UnmapSingle"];

/// Runs `tests` against both targets; returns (test, revive, tgtd).
async fn run(tests: &[String]) -> Vec<(String, CuOutcome, CuOutcome)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = std::env::var_os("REVIVE_ISCSI_LOGS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&logs).expect("log folder");
    let iqn = "iqn.2024-01.dev.revive:conformance";
    // revive serves a restore point's disk through the block layer's
    // device of a presented file; tgtd a plain copy of the same disk.
    let vm = SampleVm::create(&dir.path().join("src"), "conf", DISK, 5);
    let repo = init_repo(dir.path(), None);
    backup_json(&repo, &vm.dir, None);
    let published = PublishedDisk::open(
        &repo,
        &dir.path().join("ds"),
        "conf@latest",
        "conf",
        "conf-flat.vmdk",
    )
    .await;
    let revive = InProcessTarget::start(iqn, published.disk.clone(), loopback_access()).await;
    let file = dir.path().join("tgtd.img");
    std::fs::copy(vm.flat(), &file).expect("tgtd disk");
    let tgtd = Tgtd::start(&file, "iqn.2024-01.dev.revive:tgtd", &logs.join("tgtd.log"));
    let revive_url = revive.url(iqn, 0);
    let tgtd_url = tgtd.url();
    let tests = tests.to_vec();
    let logs2 = logs.clone();
    let results = tokio::task::spawn_blocking(move || {
        tests
            .iter()
            .map(|t| {
                let r = run_cu(&revive_url, t, TEST_LIMIT, &cu_log(&logs2, "revive", t));
                let g = run_cu(&tgtd_url, t, TEST_LIMIT, &cu_log(&logs2, "tgtd", t));
                println!("{t:<50} revive {r:?}  tgtd {g:?}");
                (t.clone(), r, g)
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("run suite");
    drop(tgtd);
    revive.stop().await;
    results
}

/// Prints the counts and fails on every test tgtd passes and revive does not.
fn judge(results: &[(String, CuOutcome, CuOutcome)]) {
    let mut counts: BTreeMap<(&str, CuOutcome), usize> = BTreeMap::new();
    for (_, r, g) in results {
        *counts.entry(("revive", *r)).or_default() += 1;
        *counts.entry(("tgtd", *g)).or_default() += 1;
    }
    let count = |who, o| counts.get(&(who, o)).copied().unwrap_or(0);
    for who in ["revive", "tgtd"] {
        println!(
            "iscsi-conformance {who}: {} tests, {} passed, {} passed by skipping, {} failed, {} timed out",
            results.len(),
            count(who, CuOutcome::Pass),
            count(who, CuOutcome::Skip),
            count(who, CuOutcome::Fail),
            count(who, CuOutcome::Timeout)
        );
    }
    let behind: Vec<&str> = results
        .iter()
        .filter(|(t, r, g)| {
            (*g == CuOutcome::Pass && *r != CuOutcome::Pass)
                || (*g == CuOutcome::Skip
                    && !matches!(r, CuOutcome::Pass | CuOutcome::Skip)
                    && !TEST_BUGS.contains(&t.as_str()))
        })
        .map(|(t, _, _)| t.as_str())
        .collect();
    let hung: Vec<&str> = results
        .iter()
        .filter(|(_, r, _)| *r == CuOutcome::Timeout)
        .map(|(t, _, _)| t.as_str())
        .collect();
    assert!(
        behind.is_empty(),
        "tgtd passes but revive does not: {behind:?}"
    );
    assert!(hung.is_empty(), "revive hung on: {hung:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_selection_against_tgtd() {
    if !libiscsi_or_skip() || !tgtd_or_skip() {
        return;
    }
    let tests: Vec<String> = match std::env::var("REVIVE_ISCSI_TESTS") {
        Ok(list) => list.split(',').map(String::from).collect(),
        Err(_) => SELECTION.iter().map(|s| s.to_string()).collect(),
    };
    let results = run(&tests).await;
    judge(&results);
}

/// The whole suite (about 230 tests per target); run by
/// `scripts/iscsi-conformance.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full suite takes minutes: scripts/iscsi-conformance.sh"]
async fn conformance_full_suite_against_tgtd() {
    if !libiscsi_or_skip() || !tgtd_or_skip() {
        return;
    }
    let results = run(&suite_tests()).await;
    judge(&results);
}

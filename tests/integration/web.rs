//! Issue 15: the web console in a real browser. `revive serve` with its API
//! serves a demo-like repository; headless Chromium (Debian's), driven by
//! Selenium (`web/console.py`), logs in (a wrong token first), recovers the
//! VM from the recover form, watches it run, starts a copy migration and
//! follows its progress bar to done; a VM named with markup shows as text
//! and its session's retry and stop buttons work; the metrics page draws its
//! charts; a token the server refuses returns to the login page. Screenshots
//! of every page (desktop and phone width) land in `target/web-screenshots/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::support::browser::Browser;
use crate::support::server::{ReviveServer, ServerSpec, API_TOKEN};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;
/// The VM the browser recovers and migrates.
const VM: &str = "web01";
/// A VM whose name is markup: the console must show it as text.
const XSS_VM: &str = "<script>alert(1)</script>";
/// Bound of the whole browser run (it takes about half a minute).
const BROWSER_LIMIT: Duration = Duration::from_secs(300);

/// Where the screenshots go: `<target>/web-screenshots/`.
fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target folder")
        .join("web-screenshots")
}

#[test]
fn console_recovers_and_migrates_in_a_browser() {
    let Some(browser) = Browser::find_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    // As scripts/demo.sh: a full backup, 1% of the disk changed, an
    // incremental. 48 MiB copied at 8 MiB/s gives the progress bar a few
    // seconds to move.
    let vm = SampleVm::create(&tmp.path().join("src"), VM, 48 * MIB, 15);
    backup_json(&repo, &vm.dir, None);
    vm.change_blocks(MIB, 1, 16);
    backup_json(&repo, &vm.dir, None);
    let xss = SampleVm::create(&tmp.path().join("src"), "xss", MIB, 17);
    backup_json(&repo, &xss.dir, Some(XSS_VM));
    let expected = sha256_dir(&vm.dir);

    let spec = ServerSpec::new(&repo)
        .with_api()
        .log_level("revive=info")
        .toml("[sessions]\nmin_free_cache = \"1MiB\"\nmigration_bandwidth = \"8MiB\"\n");
    let server = ReviveServer::start(&tmp.path().join("server"), spec);
    let port = server.api_port.expect("api port");
    let dest = tmp.path().join("production");

    let shots = screenshots();
    let _ = std::fs::remove_dir_all(&shots);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/web/console.py");
    let run = browser.run(
        &script,
        &json!({
            "url": format!("http://127.0.0.1:{port}/"),
            "token": API_TOKEN,
            "vm": VM,
            "xss_vm": XSS_VM,
            "dest": dest.to_str().expect("utf8"),
            "shots": shots.to_str().expect("utf8"),
        }),
        &tmp.path().join("browser.log"),
        BROWSER_LIMIT,
    );
    println!("{}", run.output);
    assert!(
        run.status.success() && run.output.contains("console test: done"),
        "the browser run failed ({}):\n{}\nserver log:\n{}",
        run.status,
        run.output,
        server.log()
    );

    // The migration the browser started copied the VM, hash for hash.
    assert_eq!(sha256_dir(&dest.join(format!("{VM}-ir"))), expected);
    // And the API agrees with what the page showed.
    let sessions = server.ctl_json(&["sessions"]);
    let states: Vec<(String, String)> = sessions
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("?").to_string(),
                s["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            (format!("{XSS_VM}-ir"), "cancelled".to_string()),
            (format!("{VM}-ir"), "done".to_string()),
        ]
    );
    // Every byte the bulk pass read counts, not only the last block of each
    // progress save.
    let files: u64 = std::fs::read_dir(&vm.dir)
        .expect("vm folder")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    let copied = sessions[1]["migration"]["bytes_copied"]
        .as_u64()
        .expect("bytes_copied");
    assert!(
        copied >= files,
        "bytes_copied {copied} < {files} bytes of files"
    );
    for page in [
        "login",
        "login-wrong-token",
        "overview",
        "overview-phone",
        "recover",
        "recover-phone",
        "sessions-migrating",
        "sessions-migrating-phone",
        "sessions-done",
        "metrics",
        "metrics-phone",
        "login-token-refused",
    ] {
        let png = shots.join(format!("{page}.png"));
        let head = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert!(head.starts_with(b"\x89PNG"), "{} is no PNG", png.display());
    }
}

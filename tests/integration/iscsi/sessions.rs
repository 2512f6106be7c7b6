//! iSCSI exports of `revive serve` from the one block export registry: a
//! `[[block_export]] protocol = "iscsi"` with its allowed initiators, and a
//! block recovery session `revive recover --kind block --protocol iscsi`
//! whose disk initiators write to and `migrate --method copy` moves to
//! production storage, the export removed at switchover.

use std::time::Duration;

use crate::nbd::repo_objects;
use crate::support::client::run_tool_for;
use crate::support::iscsi::{libiscsi_or_skip, TEST_INITIATORS};
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;
const INTRUDER: &str = "iqn.2024-01.org.example:intruder";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_export_and_block_session_over_iscsi() {
    if !libiscsi_or_skip() || !have_tool("qemu-io") {
        if have_tool("iscsi-inq") {
            skip_missing_peer("qemu-io (qemu-utils)");
        }
        return;
    }
    let limit = Duration::from_secs(60);
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(&tmp.path().join("src"), "sql01", 16 * MIB, 41);
    backup_json(&repo, &vm.dir, None);
    let repo_before = repo_objects(&repo);
    let server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .with_api()
            .with_iscsi()
            .log_level("revive=info")
            .toml(&format!(
                "[sessions]\nmin_free_cache = \"1MiB\"\n\
                 [[block_export]]\nname = \"sql01-disk\"\npoint = \"sql01@latest\"\n\
                 protocol = \"iscsi\"\nallowed_clients = [\"127.0.0.1\"]\n\
                 allowed_initiators = [{:?}]\n",
                TEST_INITIATORS[0]
            )),
    );
    // The configured export: its target, for its initiator only.
    let iqn = "iqn.2024-01.dev.revive:sql01-disk";
    let url = server.iscsi_url(iqn);
    let inq = run_tool_for("iscsi-inq", &["-i", TEST_INITIATORS[0], &url], limit).await;
    assert!(
        inq.status.success(),
        "{}\nlog:\n{}",
        text(&inq),
        server.log()
    );
    let refused = run_tool_for("iscsi-inq", &["-i", INTRUDER, &url], limit).await;
    assert!(
        !refused.status.success(),
        "intruder got in: {}",
        text(&refused)
    );
    let copy = tmp.path().join("cfg.img");
    let out = run_tool_for(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            copy.to_str().expect("utf8"),
        ],
        limit,
    )
    .await;
    // qemu's initiator name is not on that export's list.
    assert!(!out.status.success(), "qemu-img got in: {}", text(&out));

    // A block session over iSCSI: any initiator from the NFS export's clients.
    let sessions = server.ctl_json(&[
        "recover",
        "--vm",
        "sql01",
        "--kind",
        "block",
        "--protocol",
        "iscsi",
        "--wait",
    ]);
    let s = &sessions[0];
    assert_eq!(s["state"], "running", "{s:#}\nlog:\n{}", server.log());
    let id = s["id"].as_str().expect("id").to_string();
    let name = s["name"].as_str().expect("name").to_string();
    let url = s["block"]["url"].as_str().expect("block url").to_string();
    assert_eq!(
        url,
        server.iscsi_url(&format!("iqn.2024-01.dev.revive:{name}"))
    );
    let portal = format!("iscsi://127.0.0.1:{}", server.iscsi_port.expect("port"));
    let listed = text(&run_tool_for("iscsi-ls", &["-i", TEST_INITIATORS[1], &portal], limit).await);
    assert!(
        listed.contains(&name) && !listed.contains("sql01-disk"),
        "{listed}"
    );

    // FUA writes and a flush (SYNCHRONIZE CACHE) through QEMU's initiator.
    let writes: Vec<(u64, u8)> = (0..16u64)
        .map(|i| ((i * 389 + 3) % 4096 * 4096, i as u8 + 1))
        .collect();
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for (off, fill) in &writes {
        args.extend(["-c".into(), format!("write -f -P {fill} {off} 4k")]);
    }
    args.extend(["-c".into(), "flush".into(), url.clone()]);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool_for("qemu-io", &argv, limit).await;
    assert!(out.status.success(), "qemu-io: {}", text(&out));
    let mut expected = std::fs::read(vm.flat()).expect("read disk");
    for (off, fill) in &writes {
        expected[*off as usize..(*off + 4096) as usize].fill(*fill);
    }

    let dest = tmp.path().join("prod");
    let done = server.ctl_json(&[
        "migrate",
        &id,
        "--method",
        "copy",
        "--to",
        dest.to_str().expect("utf8"),
        "--wait",
    ]);
    assert_eq!(done["state"], "done", "{done:#}\nlog:\n{}", server.log());
    let disk = format!("{}-flat.vmdk", vm.name);
    let copied = std::fs::read(dest.join(&name).join(&disk)).expect("read copy");
    assert!(
        copied == expected,
        "the copy lacks writes or differs from the backup"
    );
    let gone = run_tool_for("iscsi-inq", &[&url], limit).await;
    assert!(
        !gone.status.success(),
        "target still served after switchover"
    );
    assert_eq!(repo_objects(&repo), repo_before, "the repository changed");
}

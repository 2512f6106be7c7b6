//! Support for tests of block exports with real NBD clients: libnbd's tools
//! (`nbdinfo`, `nbdcopy`, `nbdfuse`) and QEMU's (`qemu-io`, `qemu-img`).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use super::client::run_tool_for;
use super::{have_tool, skip_missing_peer};

/// One line of `nbdinfo --map`: offset, length, base:allocation flags.
pub type MapLine = (u64, u64, u32);

/// True when the NBD clients are installed; else a skip (a failure under CI).
pub fn nbd_peers_or_skip() -> bool {
    let ok = ["nbdinfo", "nbdcopy", "nbdfuse", "qemu-io", "qemu-img"]
        .iter()
        .all(|t| have_tool(t));
    if !ok {
        skip_missing_peer(
            "libnbd-bin (nbdinfo, nbdcopy, nbdfuse) or qemu-utils (scripts/install-test-deps.sh)",
        );
    }
    ok
}

/// Runs a tool that must succeed within two minutes; returns stdout.
pub async fn tool_ok(cmd: &str, args: &[&str]) -> String {
    let out = run_tool_for(cmd, args, Duration::from_secs(120)).await;
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool that may fail.
pub async fn tool(cmd: &str, args: &[&str]) -> Output {
    run_tool_for(cmd, args, Duration::from_secs(120)).await
}

/// `nbdinfo --map URL`, parsed.
pub async fn map(url: &str) -> Vec<MapLine> {
    tool_ok("nbdinfo", &["--map", url])
        .await
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let n =
                |i: usize| -> u64 { f[i].parse().unwrap_or_else(|_| panic!("map line {line:?}")) };
            (n(0), n(1), n(2) as u32)
        })
        .collect()
}

/// The map a file of `chunk`-sized chunks should get: all-zero chunks are
/// holes that read as zeros (3), others data (0); adjacent runs merged.
pub fn expected_map(file: &Path, chunk: u64) -> Vec<MapLine> {
    let data = std::fs::read(file).expect("read file");
    let mut out: Vec<MapLine> = Vec::new();
    for (i, c) in data.chunks(chunk as usize).enumerate() {
        let kind = if c.iter().all(|b| *b == 0) { 3 } else { 0 };
        let offset = i as u64 * chunk;
        match out.last_mut() {
            Some(last) if last.2 == kind => last.1 += c.len() as u64,
            _ => out.push((offset, c.len() as u64, kind)),
        }
    }
    out
}

/// `qemu-io -f raw URL -c CMD...`: one connection running every command in
/// order. Returns stdout; fails the test if qemu-io does.
pub async fn qemu_io(url: &str, commands: &[String]) -> String {
    let mut args = vec!["-f", "raw", url];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    tool_ok("qemu-io", &args).await
}

/// A minimal NBD client on the wire (NBD_OPT_EXPORT_NAME, simple replies),
/// for what the tools cannot do: hold a connection open with unflushed
/// writes while another connection flushes.
pub struct RawNbd {
    stream: tokio::net::TcpStream,
    handle: u64,
}

impl RawNbd {
    /// Connects to `addr` and enters transmission on `export`.
    pub async fn connect(addr: std::net::SocketAddr, export: &str) -> RawNbd {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).await.expect("greeting");
        // Fixed newstyle, no zeroes.
        stream.write_u32(3).await.expect("client flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        stream.write_all(&opt).await.expect("NBD_OPT_EXPORT_NAME");
        let mut size_flags = [0u8; 10];
        stream
            .read_exact(&mut size_flags)
            .await
            .expect("export size and flags");
        RawNbd { stream, handle: 0 }
    }

    /// One request (with data for a write); returns the reply's error.
    async fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.stream.write_all(&req).await.expect("request");
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).await.expect("reply");
        assert_eq!(
            &reply[..4],
            &0x6744_6698u32.to_be_bytes(),
            "simple reply magic"
        );
        assert_eq!(&reply[8..], &self.handle.to_be_bytes(), "reply handle");
        u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"))
    }

    /// NBD_CMD_WRITE, without FUA; returns the reply's error.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(1, 0, offset, data.len() as u32, data).await
    }

    /// NBD_CMD_FLUSH; returns the reply's error.
    pub async fn flush(&mut self) -> u32 {
        self.request(3, 0, 0, 0, &[]).await
    }
}

//! A small QMP client: one connection to a QEMU monitor socket, the
//! capabilities handshake, and commands with ids whose replies are matched
//! to them while asynchronous events are set aside.
//!
//! # Wire
//! ```text
//! <- {"QMP": {"version": {...}, "capabilities": [...]}}      greeting
//! -> {"execute": "qmp_capabilities"}                          leave negotiation mode
//! <- {"return": {}}
//! -> {"execute": "query-jobs", "id": 2}
//! <- {"event": "JOB_STATUS_CHANGE", ...}                      any time, set aside
//! <- {"return": [...], "id": 2}    or   {"error": {"class": ..., "desc": ...}, "id": 2}
//! ```
//! One JSON object per line. QEMU serves one client per monitor socket at a
//! time, so callers keep sessions short.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest wait for one reply. QMP commands of this driver return at once
/// (block jobs run in the background), so a silent monitor is a hung QEMU.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest line accepted from the monitor: replies here are a few KiB
/// (query-block of a handful of disks); a runaway line is a broken peer.
const MAX_LINE: u64 = 4 << 20;

/// Failures talking to a QEMU monitor.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket is missing or nobody listens: QEMU does not run.
    #[error("connect to QMP socket '{path}' - {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket i/o - {0}")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection (e.g. after `quit`).
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU did not answer within [`REPLY_TIMEOUT`].
    #[error("QEMU did not answer '{command}' within {} s", REPLY_TIMEOUT.as_secs())]
    Timeout { command: String },
    /// Something that is not QMP arrived.
    #[error("unexpected QMP message - {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QMP '{command}' failed - {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

impl QmpError {
    /// True when QEMU is simply not running (no socket, or nobody listening).
    pub fn not_running(&self) -> bool {
        match self {
            QmpError::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            QmpError::Closed => true,
            _ => false,
        }
    }
}

/// An open, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the monitor at `path`, reads the greeting and leaves
    /// capabilities negotiation.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("greeting {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let msg = self.read_message(command).await?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            // Replies without our id belong to nobody here (QEMU echoes the
            // id of every command we send); skip rather than misattribute.
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("reply {msg}")));
        }
    }

    /// The events received so far, oldest first; the list is emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Reads one JSON object (one line), within [`REPLY_TIMEOUT`].
    async fn read_message(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let mut limited = (&mut self.reader).take(MAX_LINE);
        let read = limited.read_line(&mut line);
        let n = tokio::time::timeout(REPLY_TIMEOUT, read)
            .await
            .map_err(|_| QmpError::Timeout {
                command: command.to_string(),
            })??;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if !line.ends_with('\n') {
            return Err(QmpError::Protocol(format!(
                "line longer than {MAX_LINE} bytes"
            )));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake monitor: greets, then answers each request by `reply(request)`
    /// (a list of raw lines to send back).
    async fn fake_qmp(
        dir: &Path,
        reply: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> PathBuf {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: Value = serde_json::from_str(&line).unwrap();
                for out in reply(&req) {
                    w.write_all(out.as_bytes()).await.unwrap();
                    w.write_all(b"\r\n").await.unwrap();
                }
            }
        });
        path
    }

    #[tokio::test]
    async fn replies_match_ids_and_events_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qmp(dir.path(), |req| {
            let id = req["id"].clone();
            match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![json!({"return": {}, "id": id}).to_string()],
                "query-jobs" => vec![
                    json!({"event": "JOB_STATUS_CHANGE", "data": {"status": "ready"}}).to_string(),
                    // A stale reply to someone else's id is skipped.
                    json!({"return": "stale", "id": 999}).to_string(),
                    json!({"return": [{"id": "m0", "status": "ready"}], "id": id}).to_string(),
                ],
                _ => vec![
                    json!({"error": {"class": "GenericError", "desc": "no such job"}, "id": id})
                        .to_string(),
                ],
            }
        })
        .await;
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let jobs = qmp.execute("query-jobs", None).await.unwrap();
        assert_eq!(jobs[0]["status"], "ready");
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event"], "JOB_STATUS_CHANGE");
        let err = qmp
            .execute("job-complete", Some(json!({"id": "m0"})))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { class, desc, .. } if class == "GenericError" && desc == "no such job"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_means_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qmp::connect(&dir.path().join("none.sock"))
            .await
            .err()
            .unwrap();
        assert!(err.not_running(), "{err}");
    }

    #[tokio::test]
    async fn a_closed_connection_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_qmp(dir.path(), |req| {
            let id = req["id"].clone();
            match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![json!({"return": {}, "id": id}).to_string()],
                // Answer nothing and let the next read see the close below.
                _ => vec!["not json".to_string()],
            }
        })
        .await;
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let err = qmp.execute("quit", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Protocol(_)), "{err}");
    }
}

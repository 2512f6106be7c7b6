//! Running a storage system's own CLI (`btrfs`, `rbd`): its Rust bindings
//! are stale or absent, and its CLI is what operators know. Every failure
//! names the command line, so the error says what to run by hand.

use std::process::Stdio;
use std::time::Duration;

use tracing::debug;

use super::{SnapResult, SnapshotError};

/// Longest a storage command may take: clone and delete are O(1) on both
/// providers, so a command still running after this is stuck (an
/// unreachable Ceph monitor, say).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A storage CLI with the arguments every call carries (`-c ceph.conf`...).
#[derive(Debug, Clone)]
pub struct StorageCommand {
    /// Snapshot source it serves (for error messages).
    pub source: String,
    /// The program: a name on PATH or a path.
    pub program: String,
    /// Arguments put before every call's own.
    pub base_args: Vec<String>,
}

impl StorageCommand {
    /// `program` for source `source`.
    pub fn new(source: &str, program: &str) -> StorageCommand {
        StorageCommand {
            source: source.to_string(),
            program: program.to_string(),
            base_args: Vec::new(),
        }
    }

    fn line(&self, args: &[&str]) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.base_args.iter().map(String::as_str))
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command; its stdout on success.
    ///
    /// # Errors
    /// [`SnapshotError::CommandMissing`] when the program is not there,
    /// [`SnapshotError::CommandFailed`] on a non-zero exit or a timeout,
    /// both naming the command line.
    pub async fn run(&self, args: &[&str]) -> SnapResult<String> {
        let line = self.line(args);
        debug!(source = %self.source, command = %line, "storage command");
        let child = tokio::process::Command::new(&self.program)
            .args(&self.base_args)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
            Err(_) => {
                return Err(SnapshotError::CommandFailed {
                    command: line,
                    status: format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
                    stderr: String::new(),
                })
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::CommandMissing {
                    source_name: self.source.clone(),
                    command: self.program.clone(),
                })
            }
            Ok(Err(e)) => {
                return Err(SnapshotError::CommandFailed {
                    command: line,
                    status: "could not start".into(),
                    stderr: e.to_string(),
                })
            }
            Ok(Ok(out)) => out,
        };
        if !out.status.success() {
            return Err(SnapshotError::CommandFailed {
                command: line,
                status: out.status.to_string(),
                stderr: last_lines(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the command and parses its stdout as JSON (`--format json`).
    pub async fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> SnapResult<T> {
        let text = self.run(args).await?;
        // Some commands print nothing rather than `[]` or `{}` when empty.
        let text = if text.trim().is_empty() {
            "null"
        } else {
            &text
        };
        serde_json::from_str(text).map_err(|e| SnapshotError::BadOutput {
            command: self.line(args),
            reason: e.to_string(),
        })
    }
}

/// The last few lines of a tool's stderr: where it says what went wrong
/// (progress lines come first).
fn last_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(3);
    let text = lines[start..].join(" / ");
    if text.is_empty() {
        "no message".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_name_the_command() {
        let missing = StorageCommand::new("pool1", "/nonexistent/btrfs");
        let err = missing.run(&["subvolume", "list", "/"]).await.unwrap_err();
        assert!(matches!(err, SnapshotError::CommandMissing { .. }));
        let text = err.to_string();
        assert!(text.contains("/nonexistent/btrfs"), "{text}");
        assert!(text.contains("pool1"), "{text}");

        let mut sh = StorageCommand::new("pool1", "sh");
        sh.base_args = vec!["-c".into()];
        let err = sh
            .run(&["echo progress >&2; echo 'ERROR: no such snapshot' >&2; exit 3"])
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("no such snapshot"), "{text}");
        assert!(text.contains('3'), "{text}");

        assert_eq!(sh.run(&["printf ok"]).await.unwrap(), "ok");
        let v: Option<Vec<u32>> = sh.json(&["true"]).await.unwrap();
        assert_eq!(v, None);
        let err = sh.json::<Vec<u32>>(&["echo nope"]).await.unwrap_err();
        assert!(matches!(err, SnapshotError::BadOutput { .. }), "{err}");
    }
}

//! The success signals of a verification boot: a console line matching a
//! pattern, a guest TCP port that answers, a user's script that exits 0.
//! Each is checked again and again until it holds or the boot times out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use regex::bytes::Regex;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// What must be seen for a boot to count as ok (every configured signal).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signals {
    /// A regular expression one console line must match (e.g. `login:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<String>,
    /// A guest TCP port that must answer on the lab network (e.g. 22, 5432).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_port: Option<u16>,
    /// A script run against the booted guest; exit status 0 is success. It
    /// gets REVIVE_VERIFY_VM, REVIVE_VERIFY_POINT, REVIVE_VERIFY_CONSOLE (a
    /// file with the console output) and, with `tcp_port`,
    /// REVIVE_VERIFY_ADDRESS (host:port reaching the guest's port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<PathBuf>,
}

impl Signals {
    /// True when no signal is configured (nothing could prove a boot).
    pub fn is_empty(&self) -> bool {
        self.console.is_none() && self.tcp_port.is_none() && self.script.is_none()
    }

    /// `self`, with every signal `over` sets replacing ours.
    pub fn overridden_by(&self, over: &Signals) -> Signals {
        Signals {
            console: over.console.clone().or_else(|| self.console.clone()),
            tcp_port: over.tcp_port.or(self.tcp_port),
            script: over.script.clone().or_else(|| self.script.clone()),
        }
    }

    /// The console pattern compiled; an error names the pattern.
    pub fn console_regex(&self) -> Result<Option<Regex>, String> {
        self.console
            .as_deref()
            .map(|p| Regex::new(p).map_err(|e| format!("console pattern '{p}' - {e}")))
            .transpose()
    }
}

/// The console line that matches `re`, if one does.
pub fn console_match(re: &Regex, console: &[u8]) -> Option<String> {
    console
        .split(|b| *b == b'\n')
        .find(|line| re.is_match(line))
        .map(|line| String::from_utf8_lossy(line).trim().to_string())
}

/// The last non-empty console line (for a failure's reason).
pub fn last_line(console: &[u8]) -> Option<String> {
    console
        .split(|b| *b == b'\n')
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .rfind(|l| !l.is_empty())
}

/// True when something in the guest answers on `addr`.
///
/// The lab network accepts a forwarded connection on the host side before
/// it knows whether the guest listens, and closes it at once if not. So a
/// connection counts as an answer when the guest sends bytes (an SSH
/// banner) or keeps it open for a moment (a server that waits for its
/// client, like PostgreSQL); an immediate close is no answer.
pub async fn tcp_answers(addr: SocketAddr) -> bool {
    let connect = tokio::net::TcpStream::connect(addr);
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
        return false;
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(700), stream.read(&mut byte)).await {
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
        Err(_) => true,
    }
}

/// What a script run said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptOutcome {
    /// Exit status 0.
    Passed,
    /// Another exit status (or a signal), with the tail of its output.
    Failed(String),
}

/// Runs the user's check script with the boot's details in its environment.
pub async fn run_script(
    script: &std::path::Path,
    env: &[(&str, String)],
    timeout: Duration,
) -> ScriptOutcome {
    let mut cmd = tokio::process::Command::new(script);
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => ScriptOutcome::Failed(format!("ran longer than {} s", timeout.as_secs())),
        Ok(Err(e)) => ScriptOutcome::Failed(format!("could not run - {e}")),
        Ok(Ok(out)) if out.status.success() => ScriptOutcome::Passed,
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if text.is_empty() {
                text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            let tail: String = text
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            ScriptOutcome::Failed(format!("{}: {tail}", out.status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_line_matches_and_the_last_line_is_found() {
        let re = Regex::new("login:|REVIVE-GUEST-BOOTED").unwrap();
        let log = b"SeaBIOS\r\nBooting from Hard Disk...\r\nREVIVE-GUEST-BOOTED\r\n\r\n";
        assert_eq!(
            console_match(&re, log).as_deref(),
            Some("REVIVE-GUEST-BOOTED")
        );
        assert_eq!(console_match(&re, b"No bootable device.\n"), None);
        assert_eq!(last_line(log).as_deref(), Some("REVIVE-GUEST-BOOTED"));
        assert_eq!(last_line(b"\n\n"), None);
    }

    #[test]
    fn overrides_replace_only_what_they_set_and_bad_patterns_are_named() {
        let base = Signals {
            console: Some("login:".into()),
            tcp_port: None,
            script: None,
        };
        let over = Signals {
            tcp_port: Some(22),
            ..Signals::default()
        };
        let both = base.overridden_by(&over);
        assert_eq!(both.console.as_deref(), Some("login:"));
        assert_eq!(both.tcp_port, Some(22));
        let bad = Signals {
            console: Some("(".into()),
            ..Signals::default()
        };
        assert!(bad.console_regex().unwrap_err().contains("'('"));
        assert!(Signals::default().is_empty());
    }

    #[tokio::test]
    async fn a_port_answers_when_its_server_speaks_or_waits_not_when_it_closes() {
        use tokio::io::AsyncWriteExt;
        let speaks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let speaks_addr = speaks.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = speaks.accept().await.unwrap();
            s.write_all(b"SSH-2.0-test\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        assert!(tcp_answers(speaks_addr).await);

        let waits = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let waits_addr = waits.local_addr().unwrap();
        tokio::spawn(async move {
            let (_s, _) = waits.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
        });
        assert!(tcp_answers(waits_addr).await);

        let closes = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closes_addr = closes.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = closes.accept().await.unwrap();
            drop(s);
        });
        assert!(!tcp_answers(closes_addr).await);

        // Nothing listening at all.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let free_addr = free.local_addr().unwrap();
        drop(free);
        assert!(!tcp_answers(free_addr).await);
    }

    #[tokio::test]
    async fn a_script_passes_on_exit_zero_and_fails_with_its_words() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("check.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n[ \"$REVIVE_VERIFY_VM\" = tiny ] && exit 0\necho \"not tiny: $REVIVE_VERIFY_VM\" >&2\nexit 3\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let t = Duration::from_secs(10);
        assert_eq!(
            run_script(&script, &[("REVIVE_VERIFY_VM", "tiny".into())], t).await,
            ScriptOutcome::Passed
        );
        match run_script(&script, &[("REVIVE_VERIFY_VM", "web".into())], t).await {
            ScriptOutcome::Failed(why) => assert!(why.contains("not tiny: web"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}

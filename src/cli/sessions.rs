//! Session commands (`recover`, `sessions`, `session`, `migrate`, `retry`,
//! `stop`): clients of the API of a running `revive serve`, so a recovery
//! keeps going when the terminal closes.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use revive::config::Config;
use revive::controller::{MigrateRequest, RecoverRequest, SessionState, SessionView};
use serde::de::DeserializeOwned;

use super::Outcome;

/// How to reach the API: `--api`/`--token`, else the config file's `[api]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// Configuration file of the running `revive serve` (for its [api] address and token).
    #[arg(long, env = revive::config::CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// API base URL (default: http://<[api] bind>).
    #[arg(long, env = "REVIVE_API", value_name = "URL")]
    pub api: Option<String>,
    /// API token (default: [api] token).
    #[arg(long, env = "REVIVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A connected API client.
pub(super) struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiArgs {
    pub(super) fn client(&self) -> anyhow::Result<Client> {
        let config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let base = self
            .api
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.api.bind));
        let token = self
            .token
            .clone()
            .or(config.api.token)
            .filter(|t| !t.is_empty())
            .context("no API token: pass --config with the file `revive serve` uses, or --token / REVIVE_TOKEN")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("create HTTP client")?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }
}

impl Client {
    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach revive at {} - is `revive serve` running with an [api] token? ({e})",
                self.base
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.context("read API answer")?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| text.trim().to_string());
            bail!("{message} (HTTP {})", status.as_u16());
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected API answer from {url}"))
    }

    async fn session(&self, id: &str) -> anyhow::Result<SessionView> {
        self.call(
            reqwest::Method::GET,
            &format!("/api/v1/sessions/{id}"),
            None,
        )
        .await
    }
}

/// `revive recover`.
pub async fn recover(
    api: &ApiArgs,
    req: RecoverRequest,
    wait: bool,
    json: bool,
) -> anyhow::Result<Outcome> {
    let client = api.client()?;
    let body = serde_json::to_value(&req)?;
    let mut sessions: Vec<SessionView> = client
        .call(reqwest::Method::POST, "/api/v1/sessions", Some(body))
        .await?;
    if wait {
        for s in sessions.iter_mut() {
            *s = wait_for(&client, &s.session.id, |v| {
                v.session.state == SessionState::Running
            })
            .await?;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
    } else {
        for s in &sessions {
            println!(
                "session {} - VM {} as '{}' on host {}: {}",
                s.session.id, s.session.vm, s.session.name, s.session.host, s.session.state
            );
            if let Some(url) = s.session.block.as_ref().and_then(|b| b.url.as_ref()) {
                println!("  disk served at {url}");
            }
        }
    }
    Ok(settled(&sessions, wait, SessionState::Running))
}

/// `revive sessions`.
pub async fn list(api: &ApiArgs, json: bool) -> anyhow::Result<Outcome> {
    let client = api.client()?;
    let sessions: Vec<SessionView> = client
        .call(reqwest::Method::GET, "/api/v1/sessions", None)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sessions)?);
        return Ok(Outcome::Ok);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<12}  {:<20}  {:<16}  {:<22}  {:>8}  {:>10}  ERROR",
        "ID", "NAME", "VM", "STATE", "PROGRESS", "CACHE"
    )?;
    for s in &sessions {
        writeln!(out, "{}", row(s))?;
    }
    Ok(Outcome::Ok)
}

fn state_text(s: &SessionView) -> String {
    let r = &s.session.retries;
    match s.session.state {
        SessionState::Waiting if r.next_at.is_some() => {
            format!("waiting ({}/{})", r.attempt, r.max)
        }
        SessionState::Waiting => "waiting (revive retry)".into(),
        other => other.to_string(),
    }
}

fn row(s: &SessionView) -> String {
    let progress = s
        .session
        .migration
        .as_ref()
        .map(|m| format!("{}%", m.percent))
        .unwrap_or_else(|| "-".into());
    let cache = s
        .cache_bytes
        .map(|b| indicatif::HumanBytes(b).to_string())
        .unwrap_or_else(|| "-".into());
    format!(
        "{:<12}  {:<20}  {:<16}  {:<22}  {:>8}  {:>10}  {}",
        s.session.id,
        s.session.name,
        s.session.vm,
        state_text(s),
        progress,
        cache,
        s.session.error.as_deref().unwrap_or("")
    )
}

/// `revive session ID`.
pub async fn show(api: &ApiArgs, id: &str, json: bool) -> anyhow::Result<Outcome> {
    let client = api.client()?;
    let s = client.session(id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(Outcome::Ok);
    }
    let x = &s.session;
    println!("session   {}", x.id);
    println!("name      {}", x.name);
    println!("vm        {} (restore point {})", x.vm, x.point);
    println!(
        "host      {} ({} driver), datastore {} = {}:{}",
        x.host, x.driver, x.datastore.name, x.datastore.remote_host, x.datastore.remote_path
    );
    println!("state     {}", state_text(&s));
    if let Some(b) = &x.block {
        println!(
            "block     {} over {}: {}",
            b.disk.as_deref().unwrap_or("(the only disk)"),
            b.protocol,
            b.url.as_deref().unwrap_or("not exported yet")
        );
    }
    if let Some(at) = x.retries.next_at {
        println!("next try  {at}");
    }
    if let Some(e) = &x.error {
        println!("error     {e}");
    }
    println!(
        "cache     {} in {}",
        s.cache_bytes
            .map(|b| indicatif::HumanBytes(b).to_string())
            .unwrap_or_else(|| "-".into()),
        x.cache_dir.display()
    );
    if let Some(port) = x.port {
        println!("port      {port}");
    }
    if let Some(ms) = x.ready_ms {
        println!("ready     {:.2} s after recover", ms as f64 / 1000.0);
    }
    if let Some(m) = &x.migration {
        println!(
            "migration {:?} to {}: {}% ({} copied)",
            m.method,
            m.destination,
            m.percent,
            indicatif::HumanBytes(m.bytes_copied)
        );
        if let Some(lag) = m.lag_bytes {
            let next = if m.switchover {
                "switching over"
            } else {
                "in sync; `revive switchover` when ready"
            };
            println!("standby   {} behind; {next}", indicatif::HumanBytes(lag));
        }
    }
    Ok(Outcome::Ok)
}

/// `revive migrate`.
pub async fn migrate(
    api: &ApiArgs,
    id: &str,
    req: MigrateRequest,
    wait: bool,
    json: bool,
) -> anyhow::Result<Outcome> {
    let client = api.client()?;
    let body = serde_json::to_value(req)?;
    let mut s: SessionView = client
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sessions/{id}/migrate"),
            Some(body),
        )
        .await?;
    // Without a switchover to wait for, a streaming copy in sync is the goal.
    let hold = s.session.migration.as_ref().is_some_and(|m| !m.switchover);
    if wait {
        s = wait_for(&client, id, |v| {
            v.session.state == SessionState::Done || (hold && in_sync(v))
        })
        .await?;
    }
    print_one(&s, json)?;
    let reached = s.session.state == SessionState::Done || (hold && in_sync(&s));
    Ok(if wait && !reached {
        Outcome::Unfinished
    } else {
        Outcome::Ok
    })
}

/// A migrating session whose copy follows its source live.
fn in_sync(v: &SessionView) -> bool {
    v.session.state == SessionState::Migrating
        && v.session.migration.as_ref().is_some_and(|m| m.in_sync)
}

/// `revive retry` and `revive stop`.
pub async fn action(
    api: &ApiArgs,
    id: &str,
    verb: &str,
    wait: bool,
    json: bool,
) -> anyhow::Result<Outcome> {
    let client = api.client()?;
    let mut s: SessionView = client
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/sessions/{id}/{verb}"),
            None,
        )
        .await?;
    if wait && verb == "stop" {
        s = wait_for(&client, id, |v| v.session.state == SessionState::Cancelled).await?;
    }
    if wait && verb == "switchover" {
        s = wait_for(&client, id, |v| v.session.state == SessionState::Done).await?;
        print_one(&s, json)?;
        return Ok(settled(std::slice::from_ref(&s), wait, SessionState::Done));
    }
    print_one(&s, json)?;
    Ok(Outcome::Ok)
}

fn print_one(s: &SessionView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
    } else {
        println!(
            "session {} ({}): {}",
            s.session.id,
            s.session.name,
            state_text(s)
        );
        if let Some(e) = &s.session.error {
            println!("error: {e}");
        }
    }
    Ok(())
}

/// With `--wait`, a session that stopped short of the goal is an error exit.
fn settled(sessions: &[SessionView], waited: bool, goal: SessionState) -> Outcome {
    if waited && sessions.iter().any(|s| s.session.state != goal) {
        Outcome::Unfinished
    } else {
        Outcome::Ok
    }
}

/// Polls a session until `goal` holds or it cannot progress without the
/// operator (failed, waiting for `revive retry`, cancelled, done), showing
/// progress on a terminal.
async fn wait_for(
    client: &Client,
    id: &str,
    goal: impl Fn(&SessionView) -> bool,
) -> anyhow::Result<SessionView> {
    let bar = ProgressBar::hidden();
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    }
    if let Ok(style) = ProgressStyle::with_template("{prefix} {wide_bar} {pos}% {msg}") {
        bar.set_style(style);
    }
    bar.set_length(100);
    bar.set_prefix(id.to_string());
    loop {
        let s = client.session(id).await?;
        let state = s.session.state;
        bar.set_message(state_text(&s));
        bar.set_position(s.session.migration.as_ref().map_or(0, |m| m.percent as u64));
        let stuck = match state {
            SessionState::Failed | SessionState::Cancelled | SessionState::Done => true,
            SessionState::Waiting => s.session.retries.next_at.is_none(),
            _ => false,
        };
        if goal(&s) || stuck {
            bar.finish_and_clear();
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

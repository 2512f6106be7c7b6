//! `revive verify --boot`: starts verification boots through the API of the
//! running `revive serve`, follows them with one progress bar per point,
//! and reports each verdict (a table, or `--json`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use revive::controller::{BootJobView, BootPhase, VerifyBootRequest};
use revive::repo::BootVerdict;

use super::sessions::ApiArgs;
use super::Outcome;

/// Starts the job, follows it to the end, prints the report.
pub async fn run(api: &ApiArgs, req: VerifyBootRequest, json: bool) -> anyhow::Result<Outcome> {
    let client = api.client()?;
    let body = serde_json::to_value(&req)?;
    let mut job: BootJobView = client
        .call(reqwest::Method::POST, "/api/v1/verify-boots", Some(body))
        .await?;
    let bars = Bars::new(&job, !json && std::io::stderr().is_terminal());
    let path = format!("/api/v1/verify-boots/{}", job.id);
    while !job.finished {
        tokio::time::sleep(Duration::from_millis(500)).await;
        job = client.call(reqwest::Method::GET, &path, None).await?;
        bars.show(&job);
    }
    bars.finish();
    if json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        println!(
            "{:<20}  {:<16}  {:<7}  {:>7}  DETAILS",
            "POINT", "VM", "RESULT", "SECONDS"
        );
        for item in &job.items {
            let Some(r) = &item.result else { continue };
            let details = match r.verdict {
                BootVerdict::Ok => r.signals.join("; "),
                BootVerdict::Failed => r.reason.clone(),
            };
            println!(
                "{:<20}  {:<16}  {:<7}  {:>7.1}  {details}",
                r.point,
                r.vm,
                r.verdict.as_str(),
                r.seconds
            );
        }
    }
    Ok(if job.all_ok() {
        Outcome::Ok
    } else {
        Outcome::BootFailed
    })
}

/// One bar per point (seconds against its timeout) on a terminal; one log
/// line per phase change elsewhere.
struct Bars {
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
    phases: std::sync::Mutex<HashMap<usize, BootPhase>>,
}

impl Bars {
    fn new(job: &BootJobView, terminal: bool) -> Bars {
        let multi = terminal.then(MultiProgress::new);
        let style = ProgressStyle::with_template("{prefix:<28} [{bar:30}] {pos:>4}/{len} s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bars = job
            .items
            .iter()
            .map(|item| {
                let bar = ProgressBar::new(item.timeout_secs).with_style(style.clone());
                bar.set_prefix(item.spec.clone());
                match &multi {
                    Some(m) => m.add(bar),
                    None => ProgressBar::hidden(),
                }
            })
            .collect();
        Bars {
            multi,
            bars,
            phases: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn show(&self, job: &BootJobView) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        for (i, item) in job.items.iter().enumerate() {
            let text = match &item.result {
                Some(r) => r.verdict.as_str().to_string(),
                None => format!("{:?}", item.phase).to_lowercase(),
            };
            if let Some(bar) = self.bars.get(i) {
                bar.set_position(item.seconds as u64);
                bar.set_message(text.clone());
            }
            if self.multi.is_none() && phases.insert(i, item.phase) != Some(item.phase) {
                eprintln!("{}: {text} ({:.0} s)", item.spec, item.seconds);
            }
        }
    }

    fn finish(&self) {
        for bar in &self.bars {
            bar.finish();
        }
    }
}

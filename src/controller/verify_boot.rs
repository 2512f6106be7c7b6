//! Verification boots: prove that restore points boot, without touching
//! production. Each point becomes an ordinary session (the same states,
//! drivers and cleanup as an instant recovery) with a throwaway write cache
//! and an isolated lab network; the boot is watched for its success signals
//! until a timeout, a screenshot is taken, the session is stopped (VM off
//! and unregistered, folder unpublished, cache deleted) and the verdict is
//! stored in the repository beside the point ([`crate::repo::BootRecord`]).
//!
//! Several points run at once up to a limit; a job collects them and is
//! what the API shows while they run.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::boot_signals::{self, ScriptOutcome, Signals};
use super::{Controller, ControllerError, RecoverRequest, SessionState};
use crate::drivers::{LabNetwork, PortForward};
use crate::repo::{BootRecord, BootVerdict};

/// `[verify]`: defaults of `revive verify --boot`.
// No `deny_unknown_fields`: serde does not support it with `flatten`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct VerifyBootConfig {
    /// The `[[host]]` verification boots run on (a qemu host); default: the only qemu host.
    pub host: Option<String>,
    /// Seconds a boot may take to show its signals.
    pub timeout_secs: u64,
    /// Points booted at once.
    pub parallel: usize,
    /// Where the throwaway write caches go (default: `<state_dir>/verify-cache`).
    pub cache: Option<PathBuf>,
    /// Signals for every VM.
    #[serde(flatten)]
    pub signals: Signals,
    /// Signals of particular VMs (`[[verify.vm]] name = "..."`), replacing the defaults they set.
    #[serde(rename = "vm")]
    pub vms: Vec<VmSignals>,
}

impl Default for VerifyBootConfig {
    fn default() -> Self {
        VerifyBootConfig {
            host: None,
            timeout_secs: 300,
            parallel: 2,
            cache: None,
            signals: Signals {
                // A login prompt on the serial console: what most Linux
                // guests print once they are up.
                console: Some("login:".into()),
                tcp_port: None,
                script: None,
            },
            vms: Vec::new(),
        }
    }
}

/// `[[verify.vm]]`: the signals of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmSignals {
    /// The VM's name as backed up.
    pub name: String,
    /// Its own timeout, in seconds.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Its signals.
    #[serde(flatten)]
    pub signals: Signals,
}

/// A `verify --boot` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyBootRequest {
    /// Restore points (id, prefix, VM@latest).
    #[serde(default)]
    pub points: Vec<String>,
    /// Also the latest point of every VM (the nightly run).
    #[serde(default)]
    pub all_latest: bool,
    /// Points booted at once (default: `[verify] parallel`).
    #[serde(default)]
    pub parallel: Option<usize>,
    /// Host to boot on (default: `[verify] host`).
    #[serde(default)]
    pub host: Option<String>,
    /// Timeout per boot in seconds (default: per VM, else `[verify] timeout_secs`).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Signals replacing the configured ones for every point of this request.
    #[serde(default)]
    pub signals: Signals,
}

/// Where one point's verification is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootPhase {
    /// Waiting for a free slot.
    Queued,
    /// Publishing, registering, powering on.
    Starting,
    /// Powered on; watching for the signals.
    Watching,
    /// Stopping the VM and cleaning up.
    CleaningUp,
    /// Verdict recorded.
    Finished,
}

/// One point of a job, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootItem {
    /// The point as asked for.
    pub spec: String,
    /// Its id, once resolved.
    pub point: Option<String>,
    /// Its VM, once resolved.
    pub vm: Option<String>,
    /// The session booting it.
    pub session: Option<String>,
    /// Where it is.
    pub phase: BootPhase,
    /// Seconds since it started (or the time it took, once finished).
    pub seconds: f64,
    /// Its timeout, in seconds.
    pub timeout_secs: u64,
    /// The verdict, once finished.
    pub result: Option<BootRecord>,
}

/// A set of verification boots started by one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootJobView {
    /// Job id.
    pub id: String,
    /// When it started.
    pub started: DateTime<Utc>,
    /// Every point has its verdict.
    pub finished: bool,
    /// The points, in request order.
    pub items: Vec<BootItem>,
}

impl BootJobView {
    /// True when every point booted ok.
    pub fn all_ok(&self) -> bool {
        self.items
            .iter()
            .all(|i| matches!(&i.result, Some(r) if r.verdict == BootVerdict::Ok))
    }
}

/// A running job: its view, updated as the boots progress.
pub(super) struct BootJob {
    view: Mutex<BootJobView>,
    clocks: Mutex<Vec<Option<Instant>>>,
}

impl BootJob {
    fn set(&self, index: usize, change: impl FnOnce(&mut BootItem)) {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(item) = view.items.get_mut(index) {
            change(item);
        }
    }

    fn start_clock(&self, index: usize) {
        let mut clocks = self.clocks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clocks.get_mut(index) {
            *c = Some(Instant::now());
        }
    }

    fn view(&self) -> BootJobView {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let clocks = self.clocks.lock().unwrap_or_else(|p| p.into_inner());
        for (item, clock) in view.items.iter_mut().zip(clocks.iter()) {
            if let (Some(start), None) = (clock, &item.result) {
                item.seconds = start.elapsed().as_secs_f64();
            }
        }
        view
    }
}

/// The jobs of this server's life.
pub(super) type BootJobs = DashMap<String, Arc<BootJob>>;

/// How one point is booted, resolved from the request and the config.
struct Plan {
    point: String,
    vm: String,
    host: String,
    cache: PathBuf,
    timeout: Duration,
    signals: Signals,
}

impl Controller {
    /// Starts verification boots of the request's points; returns at once
    /// with the job, which [`Controller::verify_boot_job`] follows.
    pub async fn verify_boot(
        &self,
        req: VerifyBootRequest,
    ) -> Result<BootJobView, ControllerError> {
        let config = self.inner.config.verify.clone();
        let repo = self.inner.datastore.repo().clone();
        let mut specs = req.points.clone();
        if req.all_latest {
            let points = repo.points().await.map_err(ControllerError::from)?;
            let mut vms: Vec<String> = points.iter().map(|p| p.vm.clone()).collect();
            vms.sort();
            vms.dedup();
            specs.extend(vms.into_iter().map(|vm| format!("{vm}@latest")));
        }
        if specs.is_empty() {
            return Err(ControllerError::BadRequest(
                "name restore points to verify, or ask for --all-latest".into(),
            ));
        }
        let host = self.pick_host(req.host.as_deref().or(config.host.as_deref()), Some("qemu"))?;
        let cache = config
            .cache
            .clone()
            .unwrap_or_else(|| self.inner.config.state_dir.join("verify-cache"));
        // Resolve everything first: a bad point or pattern fails the request
        // before anything boots.
        let mut plans = Vec::new();
        for spec in &specs {
            let point = repo.resolve(spec).await.map_err(|e| {
                ControllerError::BadRequest(format!("restore point '{spec}' - {e}"))
            })?;
            let per_vm = config.vms.iter().find(|v| v.name == point.vm);
            let mut signals = config.signals.clone();
            if let Some(v) = per_vm {
                signals = signals.overridden_by(&v.signals);
            }
            signals = signals.overridden_by(&req.signals);
            signals
                .console_regex()
                .map_err(ControllerError::BadRequest)?;
            if signals.is_empty() {
                return Err(ControllerError::BadRequest(format!(
                    "no success signal for VM '{}': set a console pattern, a TCP port or a script",
                    point.vm
                )));
            }
            let timeout = req
                .timeout_secs
                .or(per_vm.and_then(|v| v.timeout_secs))
                .unwrap_or(config.timeout_secs);
            plans.push(Plan {
                point: point.id.clone(),
                vm: point.vm.clone(),
                host: host.clone(),
                cache: cache.clone(),
                timeout: Duration::from_secs(timeout.max(1)),
                signals,
            });
        }
        let id = super::new_id();
        let items = specs
            .iter()
            .zip(&plans)
            .map(|(spec, plan)| BootItem {
                spec: spec.clone(),
                point: Some(plan.point.clone()),
                vm: Some(plan.vm.clone()),
                session: None,
                phase: BootPhase::Queued,
                seconds: 0.0,
                timeout_secs: plan.timeout.as_secs(),
                result: None,
            })
            .collect::<Vec<_>>();
        let job = Arc::new(BootJob {
            clocks: Mutex::new(vec![None; items.len()]),
            view: Mutex::new(BootJobView {
                id: id.clone(),
                started: Utc::now(),
                finished: false,
                items,
            }),
        });
        self.inner.boot_jobs.insert(id.clone(), job.clone());
        let parallel = req.parallel.unwrap_or(config.parallel).max(1);
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
        info!(job = %id, points = plans.len(), parallel, host = %host, "verification boots started");
        let controller = self.clone();
        let runner_job = job.clone();
        tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for (index, plan) in plans.into_iter().enumerate() {
                let (controller, job, slots) =
                    (controller.clone(), runner_job.clone(), slots.clone());
                tasks.spawn(async move {
                    let Ok(_slot) = slots.acquire_owned().await else {
                        return;
                    };
                    controller.verify_one(&job, index, plan).await;
                });
            }
            while tasks.join_next().await.is_some() {}
            let mut view = runner_job.view.lock().unwrap_or_else(|p| p.into_inner());
            view.finished = true;
            info!(job = %view.id, ok = view.all_ok(), "verification boots finished");
        });
        Ok(job.view())
    }

    /// A verification job of this server's life.
    pub fn verify_boot_job(&self, id: &str) -> Result<BootJobView, ControllerError> {
        self.inner
            .boot_jobs
            .get(id)
            .map(|j| j.view())
            .ok_or_else(|| ControllerError::BadRequest(format!("no verification job '{id}'")))
    }

    /// Boots one point, watches it, cleans up and records the verdict.
    async fn verify_one(&self, job: &BootJob, index: usize, plan: Plan) {
        job.start_clock(index);
        job.set(index, |i| i.phase = BootPhase::Starting);
        let started = Utc::now();
        let clock = Instant::now();
        let mut watch = self.boot_and_watch(job, index, &plan).await;
        let seconds = clock.elapsed().as_secs_f64();
        job.set(index, |i| i.phase = BootPhase::CleaningUp);
        if let Some(session) = &watch.session {
            if let Err(e) = self.stop_and_wait(session).await {
                warn!(session = %session, cause = %e, "verification boot: cleanup did not finish");
                if watch.reason.is_empty() {
                    watch.reason = format!("cleanup did not finish - {e}");
                }
                watch.ok = false;
            }
        }
        let record = BootRecord {
            point: plan.point.clone(),
            vm: plan.vm.clone(),
            verdict: if watch.ok {
                BootVerdict::Ok
            } else {
                BootVerdict::Failed
            },
            reason: if watch.ok {
                String::new()
            } else {
                watch.reason
            },
            signals: watch.seen,
            started,
            seconds,
            host: plan.host.clone(),
            screenshot: watch.screenshot.is_some(),
        };
        let screenshot = watch.screenshot.map(bytes::Bytes::from);
        if let Err(e) = self
            .inner
            .datastore
            .repo()
            .record_boot(&record, screenshot)
            .await
        {
            warn!(point = %plan.point, cause = %e, "could not record the verification boot");
        }
        if record.verdict == BootVerdict::Ok {
            info!(point = %plan.point, vm = %plan.vm, seconds, "verification boot ok");
        } else {
            warn!(point = %plan.point, vm = %plan.vm, reason = %record.reason, "verification boot failed");
        }
        job.set(index, |i| {
            i.phase = BootPhase::Finished;
            i.seconds = seconds;
            i.result = Some(record);
        });
    }

    /// Publishes and powers on the point in a lab session and watches its
    /// signals until they all hold or the timeout passes.
    async fn boot_and_watch(&self, job: &BootJob, index: usize, plan: &Plan) -> Watch {
        let mut watch = Watch::default();
        let deadline = Instant::now() + plan.timeout;
        let forward = match plan.signals.tcp_port {
            Some(guest_port) => match free_loopback_port() {
                Ok(host_port) => Some(PortForward {
                    host_port,
                    guest_port,
                }),
                Err(e) => {
                    watch.reason = format!("no free port for the lab network - {e}");
                    return watch;
                }
            },
            None => None,
        };
        let req = RecoverRequest {
            vms: vec![plan.vm.clone()],
            point: Some(plan.point.clone()),
            host: Some(plan.host.clone()),
            cache: Some(plan.cache.clone()),
            name: Some(session_name(&plan.vm, &plan.point)),
            power_on: true,
            lab: Some(LabNetwork {
                forwards: forward.into_iter().collect(),
            }),
            ..RecoverRequest::default()
        };
        let session = match self.recover(req).await {
            Ok(mut views) if !views.is_empty() => views.remove(0).session,
            Ok(_) => {
                watch.reason = "the controller made no session".into();
                return watch;
            }
            Err(e) => {
                watch.reason = format!("could not start the boot - {e}");
                return watch;
            }
        };
        watch.session = Some(session.id.clone());
        job.set(index, |i| i.session = Some(session.id.clone()));

        // Until the VM runs: a session that fails or waits is a failed boot
        // (a verification never waits for retries).
        let vm_ref = loop {
            let view = match self.get(&session.id).await {
                Ok(v) => v.session,
                Err(e) => {
                    watch.reason = e.to_string();
                    return watch;
                }
            };
            match view.state {
                SessionState::Running => match view.vm_ref {
                    Some(r) => break r,
                    None => {
                        watch.reason = "the session runs without a VM".into();
                        return watch;
                    }
                },
                SessionState::Failed | SessionState::Waiting => {
                    watch.reason = format!(
                        "the VM did not start - {}",
                        view.error.unwrap_or_else(|| view.state.to_string())
                    );
                    return watch;
                }
                SessionState::Cancelled | SessionState::Done => {
                    watch.reason = "the session ended before the VM ran".into();
                    return watch;
                }
                _ => {}
            }
            if Instant::now() > deadline {
                watch.reason = format!(
                    "the VM was not running after {} s (session {})",
                    plan.timeout.as_secs(),
                    view.state
                );
                return watch;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        job.set(index, |i| i.phase = BootPhase::Watching);
        let driver = match self.inner.drivers.get(&plan.host) {
            Some(Ok(d)) => d.clone(),
            _ => {
                watch.reason = format!("host '{}' has no driver", plan.host);
                return watch;
            }
        };
        let console_re = plan.signals.console_regex().ok().flatten();
        let address = forward.map(|f| std::net::SocketAddr::from(([127, 0, 0, 1], f.host_port)));
        let console_file = plan.cache.join(format!("{}.console", session.name));
        let mut console_seen: Option<String> = None;
        let mut port_seen = false;
        let mut script_said: Option<String> = None;
        let mut console = Vec::new();
        loop {
            if let Ok(out) = driver.console_output(&vm_ref).await {
                console = out;
            }
            if let (Some(re), None) = (&console_re, &console_seen) {
                if let Some(line) = boot_signals::console_match(re, &console) {
                    watch.seen.push(format!("console: {line}"));
                    console_seen = Some(line);
                }
            }
            if let (Some(addr), false) = (address, port_seen) {
                if boot_signals::tcp_answers(addr).await {
                    watch
                        .seen
                        .push(format!("tcp port {} answered", addr.port()));
                    port_seen = true;
                }
            }
            let others_hold = (console_re.is_none() || console_seen.is_some())
                && (address.is_none() || port_seen);
            let mut done = others_hold;
            if let (Some(script), true) = (&plan.signals.script, others_hold) {
                let _ = tokio::fs::write(&console_file, &console).await;
                let mut env = vec![
                    ("REVIVE_VERIFY_VM", plan.vm.clone()),
                    ("REVIVE_VERIFY_POINT", plan.point.clone()),
                    (
                        "REVIVE_VERIFY_CONSOLE",
                        console_file.to_string_lossy().into_owned(),
                    ),
                ];
                if let Some(addr) = address {
                    env.push(("REVIVE_VERIFY_ADDRESS", addr.to_string()));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match boot_signals::run_script(script, &env, left.max(Duration::from_secs(1))).await
                {
                    ScriptOutcome::Passed => {
                        watch
                            .seen
                            .push(format!("script {} passed", script.display()));
                    }
                    ScriptOutcome::Failed(why) => {
                        script_said = Some(why);
                        done = false;
                    }
                }
            }
            if done {
                watch.ok = true;
                break;
            }
            if Instant::now() > deadline {
                let secs = plan.timeout.as_secs();
                let mut missing = Vec::new();
                if let (Some(p), None) = (&plan.signals.console, &console_seen) {
                    missing.push(format!("no console line matched '{p}'"));
                }
                if let (Some(addr), false) = (address, port_seen) {
                    missing.push(format!(
                        "guest port {} did not answer",
                        plan.signals.tcp_port.unwrap_or(addr.port())
                    ));
                }
                if let Some(why) = &script_said {
                    missing.push(format!("the script failed ({why})"));
                }
                let last = boot_signals::last_line(&console)
                    .map(|l| format!("; last console line: '{l}'"))
                    .unwrap_or_else(|| "; the console stayed empty".into());
                watch.reason = format!("{} within {secs} s{last}", missing.join(", "));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = tokio::fs::remove_file(&console_file).await;
        match driver.screenshot(&vm_ref).await {
            Ok(png) => watch.screenshot = Some(png),
            Err(e) => {
                warn!(session = %session.id, cause = %e, "no screenshot of the verification boot")
            }
        }
        watch
    }

    /// Stops a verification session and waits until it is cleaned up.
    async fn stop_and_wait(&self, id: &str) -> Result<(), ControllerError> {
        self.stop(id).await?;
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let view = self.get(id).await?;
            match view.session.state {
                SessionState::Cancelled | SessionState::Done => return Ok(()),
                SessionState::Failed | SessionState::Waiting => {
                    return Err(ControllerError::BadRequest(format!(
                        "stopping session {id}: {}",
                        view.session.error.unwrap_or_default()
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(ControllerError::BadRequest(format!(
                        "session {id} still {} after 180 s",
                        view.session.state
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

/// What watching one boot found.
#[derive(Default)]
struct Watch {
    session: Option<String>,
    ok: bool,
    reason: String,
    seen: Vec<String>,
    screenshot: Option<Vec<u8>>,
}

/// The session name of a verification boot: recognisable, unique per point.
fn session_name(vm: &str, point: &str) -> String {
    // The whole id: ids of points made in the same second share their first half.
    let vm: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("verify-{vm}-{point}")
}

/// A loopback port nobody uses now, for a lab forward.
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_folder_names_and_differ_per_point() {
        let a = session_name("web 01/x", "0123456789abcdef");
        assert_eq!(a, "verify-web_01_x-0123456789abcdef");
        assert!(crate::datastore::namespace::check_name(&a).is_ok());
        assert_ne!(a, session_name("web 01/x", "01234567ffffffff"));
    }

    #[test]
    fn config_reads_defaults_and_per_vm_signals() {
        let c: VerifyBootConfig = toml::from_str(
            "host = \"lab\"\ntimeout_secs = 60\nconsole = \"READY\"\n[[vm]]\nname = \"db\"\ntcp_port = 5432\n",
        )
        .unwrap();
        assert_eq!(c.host.as_deref(), Some("lab"));
        assert_eq!(c.parallel, 2);
        assert_eq!(c.signals.console.as_deref(), Some("READY"));
        let db = c.signals.overridden_by(&c.vms[0].signals);
        assert_eq!(
            (db.console.as_deref(), db.tcp_port),
            (Some("READY"), Some(5432))
        );
        assert_eq!(
            VerifyBootConfig::default().signals.console.as_deref(),
            Some("login:")
        );
    }
}

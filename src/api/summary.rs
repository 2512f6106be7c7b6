//! `GET /api/v1/metrics/summary`: the counters of `/metrics` a person looks
//! at (throughput of each frontend, block cache hit ratio, migration bytes,
//! sessions by state) as JSON, with the rates of the last minutes.
//!
//! A sampler task reads the same atomics `/metrics` reads every
//! [`SAMPLE_INTERVAL`] and keeps [`HISTORY_LEN`] samples of the rates
//! between two readings, so a chart shows the last minutes as soon as it
//! opens; nothing is stored on disk.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ApiState;

/// Time between two samples: fine enough to see a copy migration start and
/// stop, coarse enough that the history costs nothing.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// Samples kept: the last five minutes.
pub const HISTORY_LEN: usize = 150;

/// The routes, relative to the API root.
pub(super) fn routes() -> Router<ApiState> {
    Router::new().route("/api/v1/metrics/summary", get(summary))
}

/// Bytes moved by one frontend since start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendTotals {
    /// "nfs" (and "nbd" once block exports report counters).
    pub name: String,
    /// Bytes returned to clients.
    pub read_bytes: u64,
    /// Bytes clients wrote (into write caches).
    pub written_bytes: u64,
    /// Requests answered.
    pub calls: u64,
}

/// The block cache since start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockCacheTotals {
    /// Chunk reads served from memory.
    pub hits: u64,
    /// Chunk reads fetched from the repository.
    pub misses: u64,
    /// Hits over all lookups; `None` before the first lookup.
    pub hit_ratio: Option<f64>,
    /// Bytes of chunks held in memory now.
    pub bytes: u64,
    /// Plain bytes fetched from the repository.
    pub fetched_bytes: u64,
}

/// Rates of one frontend over one interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// Bytes per second read by clients.
    pub read_bps: f64,
    /// Bytes per second written by clients.
    pub write_bps: f64,
    /// Requests per second.
    pub calls_per_sec: f64,
}

/// Rates over one sample interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// End of the interval.
    pub time: DateTime<Utc>,
    /// Length of the interval.
    pub seconds: f64,
    /// Each frontend's rates, by name.
    pub frontends: BTreeMap<String, Rates>,
    /// Block cache hits over lookups in the interval; `None` without lookups.
    pub hit_ratio: Option<f64>,
    /// Bytes per second fetched from the repository.
    pub backup_read_bps: f64,
    /// Bytes per second written by copy migrations.
    pub migration_bps: f64,
}

/// What the summary endpoint answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsSummary {
    /// When the counters were read.
    pub time: DateTime<Utc>,
    /// Every frontend this server runs.
    pub frontends: Vec<FrontendTotals>,
    /// The block cache.
    pub block_cache: BlockCacheTotals,
    /// Bytes copied to production storage by copy migrations.
    pub migration_bytes: u64,
    /// Session steps scheduled for an automatic retry.
    pub session_retries: u64,
    /// Sessions by state; states without sessions are left out.
    pub sessions: BTreeMap<String, u64>,
    /// Seconds between two samples of `history`.
    pub sample_interval_secs: u64,
    /// Seconds a full history covers.
    pub history_secs: u64,
    /// Rates of the last minutes, oldest first.
    pub history: Vec<Sample>,
}

/// Cumulative counters at one moment.
#[derive(Debug, Clone, Default)]
struct Counters {
    /// Totals of each frontend.
    frontends: Vec<FrontendTotals>,
    hits: u64,
    misses: u64,
    backup_read: u64,
    migration: u64,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Counters {
    fn read(state: &ApiState) -> Counters {
        let bc = state.datastore.block_cache().stats();
        Counters {
            frontends: frontend_totals(state),
            hits: load(&bc.hits),
            misses: load(&bc.misses),
            backup_read: load(&bc.bytes_fetched),
            migration: load(&state.controller.metrics().migration_bytes),
        }
    }
}

/// Every frontend's totals: the one place a new frontend's counters are added.
fn frontend_totals(state: &ApiState) -> Vec<FrontendTotals> {
    let nfs = &state.nfs;
    vec![FrontendTotals {
        name: "nfs".into(),
        read_bytes: load(&nfs.bytes_read),
        written_bytes: load(&nfs.bytes_written),
        calls: nfs.procs().map(|(_, s)| load(&s.calls)).sum(),
    }]
}

fn ratio(hits: u64, misses: u64) -> Option<f64> {
    let all = hits + misses;
    (all > 0).then(|| hits as f64 / all as f64)
}

/// The rates between two readings `seconds` apart.
fn rates(before: &Counters, after: &Counters, seconds: f64, time: DateTime<Utc>) -> Sample {
    let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    let frontends = after
        .frontends
        .iter()
        .map(|now| {
            let then = before.frontends.iter().find(|f| f.name == now.name);
            let (r, w, c) = then.map_or((0, 0, 0), |t| (t.read_bytes, t.written_bytes, t.calls));
            let rates = Rates {
                read_bps: per_sec(r, now.read_bytes),
                write_bps: per_sec(w, now.written_bytes),
                calls_per_sec: per_sec(c, now.calls),
            };
            (now.name.clone(), rates)
        })
        .collect();
    Sample {
        time,
        seconds,
        frontends,
        hit_ratio: ratio(
            after.hits.saturating_sub(before.hits),
            after.misses.saturating_sub(before.misses),
        ),
        backup_read_bps: per_sec(before.backup_read, after.backup_read),
        migration_bps: per_sec(before.migration, after.migration),
    }
}

/// The rates of the last minutes.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<HistoryInner>,
}

#[derive(Debug, Default)]
struct HistoryInner {
    last: Option<(Instant, Counters)>,
    samples: VecDeque<Sample>,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, HistoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a reading: the first one only sets the baseline, each later
    /// one adds the rates since the previous reading.
    fn record(&self, at: Instant, time: DateTime<Utc>, counters: Counters) {
        let mut inner = self.lock();
        if let Some((then, before)) = &inner.last {
            let seconds = at.saturating_duration_since(*then).as_secs_f64();
            if seconds > 0.0 {
                let sample = rates(before, &counters, seconds, time);
                if inner.samples.len() == HISTORY_LEN {
                    inner.samples.pop_front();
                }
                inner.samples.push_back(sample);
            }
        }
        inner.last = Some((at, counters));
    }

    /// Every sample kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.iter().cloned().collect()
    }
}

/// Reads the counters every [`SAMPLE_INTERVAL`] into `state.history`, until
/// the task is aborted (the API server owns it).
pub(super) async fn sample_forever(state: ApiState) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state
            .history
            .record(Instant::now(), Utc::now(), Counters::read(&state));
    }
}

async fn summary(State(state): State<ApiState>) -> Json<MetricsSummary> {
    let now = Counters::read(&state);
    let sessions = state
        .controller
        .state_counts()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| (s.as_str().to_string(), n))
        .collect();
    Json(MetricsSummary {
        time: Utc::now(),
        block_cache: BlockCacheTotals {
            hits: now.hits,
            misses: now.misses,
            hit_ratio: ratio(now.hits, now.misses),
            bytes: state.datastore.block_cache().bytes() as u64,
            fetched_bytes: now.backup_read,
        },
        frontends: now.frontends,
        migration_bytes: now.migration,
        session_retries: load(&state.controller.metrics().retries),
        sessions,
        sample_interval_secs: SAMPLE_INTERVAL.as_secs(),
        history_secs: SAMPLE_INTERVAL.as_secs() * HISTORY_LEN as u64,
        history: state.history.samples(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(nfs_read: u64, hits: u64, misses: u64, migration: u64) -> Counters {
        Counters {
            frontends: vec![FrontendTotals {
                name: "nfs".into(),
                read_bytes: nfs_read,
                written_bytes: 0,
                calls: nfs_read / 4096,
            }],
            hits,
            misses,
            backup_read: misses << 20,
            migration,
        }
    }

    #[test]
    fn history_keeps_rates_of_the_last_minutes() {
        let history = History::default();
        let start = Instant::now();
        let time = Utc::now();
        history.record(start, time, counters(0, 0, 0, 0));
        assert!(
            history.samples().is_empty(),
            "the first reading is a baseline"
        );
        history.record(
            start + Duration::from_secs(2),
            time,
            counters(8 << 20, 3, 1, 4 << 20),
        );
        let s = &history.samples()[0];
        assert_eq!(s.frontends["nfs"].read_bps, (4 << 20) as f64);
        assert_eq!(s.frontends["nfs"].calls_per_sec, 1024.0);
        assert_eq!(s.hit_ratio, Some(0.75));
        assert_eq!(s.migration_bps, (2 << 20) as f64);
        assert_eq!(s.backup_read_bps, (512 << 10) as f64);
        // An idle interval has no hit ratio rather than a made-up one.
        history.record(
            start + Duration::from_secs(4),
            time,
            counters(8 << 20, 3, 1, 4 << 20),
        );
        assert_eq!(history.samples()[1].hit_ratio, None);
        for i in 3..HISTORY_LEN as u64 + 10 {
            history.record(
                start + Duration::from_secs(2 * i),
                time,
                counters(8 << 20, 3, 1, 4 << 20),
            );
        }
        assert_eq!(history.samples().len(), HISTORY_LEN);
    }
}

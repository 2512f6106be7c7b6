//! Counters of the NFS layer: calls, errors and latency per procedure.
//!
//! Plain atomics, updated with relaxed ordering on every call (a few
//! nanoseconds); the API layer reads them to render Prometheus text.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Names of the 22 NFSv3 procedures, indexed by procedure number.
pub const PROC_NAMES: [&str; 22] = [
    "null",
    "getattr",
    "setattr",
    "lookup",
    "access",
    "readlink",
    "read",
    "write",
    "create",
    "mkdir",
    "symlink",
    "mknod",
    "remove",
    "rmdir",
    "rename",
    "link",
    "readdir",
    "readdirplus",
    "fsstat",
    "fsinfo",
    "pathconf",
    "commit",
];

/// Upper bounds (inclusive, microseconds) of the latency buckets. Chosen to
/// separate cache hits (tens of µs) from store fetches and fsyncs (ms).
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

/// Counters of one NFS procedure.
#[derive(Debug, Default)]
pub struct ProcStats {
    /// Calls answered.
    pub calls: AtomicU64,
    /// Calls answered with a status other than NFS3_OK.
    pub errors: AtomicU64,
    /// Sum of latencies, microseconds.
    pub latency_sum_us: AtomicU64,
    /// Calls per latency bucket (not cumulative); the last slot counts calls
    /// slower than every bound in [`LATENCY_BUCKETS_US`].
    pub buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
}

/// All counters of one NFS server.
#[derive(Debug, Default)]
pub struct NfsMetrics {
    procs: [ProcStats; 22],
    /// MOUNT calls answered.
    pub mount_calls: AtomicU64,
    /// Portmapper calls answered (TCP and UDP).
    pub portmap_calls: AtomicU64,
    /// Calls answered with GARBAGE_ARGS, PROG_UNAVAIL, PROC_UNAVAIL or an
    /// RPC/auth rejection.
    pub rejected_calls: AtomicU64,
    /// Retransmitted non-idempotent calls answered from the duplicate
    /// request cache (or dropped while the original still ran).
    pub drc_hits: AtomicU64,
    /// Connections closed because their byte stream was not valid RPC.
    pub framing_errors: AtomicU64,
    /// TCP connections accepted since start.
    pub connections_accepted: AtomicU64,
    /// TCP connections open now.
    pub connections_open: AtomicU64,
    /// TCP connections closed at accept: from an address on no allow-list
    /// (outside the portmapper) or over a connection cap.
    pub connections_refused: AtomicU64,
    /// TCP connections closed for idling, or for a record sent too slowly.
    pub connections_timed_out: AtomicU64,
    /// Bytes returned by READ.
    pub bytes_read: AtomicU64,
    /// Bytes accepted by WRITE (they land in write caches).
    pub bytes_written: AtomicU64,
}

impl NfsMetrics {
    /// Record one answered NFS call.
    pub fn record(&self, proc_num: u32, elapsed: Duration, ok: bool) {
        let Some(s) = self.procs.get(proc_num as usize) else {
            return;
        };
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        s.calls.fetch_add(1, Ordering::Relaxed);
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        let idx = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        s.buckets[idx].fetch_add(1, Ordering::Relaxed);
    }

    /// Counters of one procedure (by number, 0..=21).
    pub fn proc_stats(&self, proc_num: u32) -> Option<&ProcStats> {
        self.procs.get(proc_num as usize)
    }

    /// `(name, counters)` for every procedure, in procedure order.
    pub fn procs(&self) -> impl Iterator<Item = (&'static str, &ProcStats)> {
        PROC_NAMES.iter().copied().zip(self.procs.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_into_buckets() {
        let m = NfsMetrics::default();
        m.record(6, Duration::from_micros(30), true);
        m.record(6, Duration::from_secs(5), false);
        m.record(99, Duration::from_micros(1), true); // unknown: ignored
        let read = m.proc_stats(6).expect("read");
        assert_eq!(read.calls.load(Ordering::Relaxed), 2);
        assert_eq!(read.errors.load(Ordering::Relaxed), 1);
        assert_eq!(read.buckets[1].load(Ordering::Relaxed), 1);
        assert_eq!(
            read.buckets[LATENCY_BUCKETS_US.len()].load(Ordering::Relaxed),
            1
        );
        assert_eq!(m.procs().nth(6).map(|(n, _)| n), Some("read"));
    }
}

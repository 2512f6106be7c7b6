//! Prometheus text exposition of revive's counters: NFS calls and latency,
//! block cache hits and fetches, publications, write caches, sessions and
//! migrations, block exports.
//!
//! [`render`] writes one family after another; each family is a small
//! function over an [`Exposition`], which owns the text format (HELP and
//! TYPE lines, label quoting), so a new frontend adds its families without
//! repeating it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::controller::Controller;
use crate::datastore::{Datastore, FileOps};
use crate::nfs::metrics::LATENCY_BUCKETS_US;
use crate::nfs::NfsMetrics;

/// Prometheus text format 0.0.4 being written.
pub struct Exposition {
    out: String,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Exposition {
    fn new() -> Exposition {
        Exposition {
            out: String::with_capacity(16 * 1024),
        }
    }

    /// Starts a family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample; `labels` as `key="value"` pairs (values escaped here).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Renders every counter as Prometheus text format 0.0.4.
pub async fn render(nfs: &NfsMetrics, datastore: &Datastore, controller: &Controller) -> String {
    let mut e = Exposition::new();
    nfs_calls(&mut e, nfs);
    nfs_latency(&mut e, nfs);
    nfs_counters(&mut e, nfs);
    block_cache(&mut e, datastore);
    publications(&mut e, datastore).await;
    write_caches(&mut e, datastore).await;
    sessions(&mut e, controller);
    block_exports(&mut e, controller);
    snapshot_clones(&mut e, controller).await;
    e.out
}

/// Calls and error replies by procedure.
fn nfs_calls(e: &mut Exposition, nfs: &NfsMetrics) {
    e.family(
        "revive_nfs_calls_total",
        "counter",
        "NFSv3 calls by procedure.",
    );
    for (name, s) in nfs.procs() {
        e.sample("revive_nfs_calls_total", &[("proc", name)], load(&s.calls));
    }
    e.family(
        "revive_nfs_errors_total",
        "counter",
        "NFSv3 calls answered with an error status.",
    );
    for (name, s) in nfs.procs() {
        e.sample(
            "revive_nfs_errors_total",
            &[("proc", name)],
            load(&s.errors),
        );
    }
}

/// The latency histogram of every procedure that was called.
fn nfs_latency(e: &mut Exposition, nfs: &NfsMetrics) {
    const NAME: &str = "revive_nfs_latency_seconds";
    e.family(NAME, "histogram", "NFSv3 call latency by procedure.");
    for (name, s) in nfs.procs().filter(|(_, s)| load(&s.calls) > 0) {
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += load(&s.buckets[i]);
            let le = (*bound as f64 / 1e6).to_string();
            e.sample(
                &format!("{NAME}_bucket"),
                &[("proc", name), ("le", &le)],
                cumulative,
            );
        }
        cumulative += load(&s.buckets[LATENCY_BUCKETS_US.len()]);
        e.sample(
            &format!("{NAME}_bucket"),
            &[("proc", name), ("le", "+Inf")],
            cumulative,
        );
        e.sample(
            &format!("{NAME}_sum"),
            &[("proc", name)],
            load(&s.latency_sum_us) as f64 / 1e6,
        );
        e.sample(&format!("{NAME}_count"), &[("proc", name)], cumulative);
    }
}

/// The NFS server's plain counters and its open connections.
fn nfs_counters(e: &mut Exposition, nfs: &NfsMetrics) {
    for (name, help, value) in [
        (
            "revive_mount_calls_total",
            "MOUNT protocol calls.",
            &nfs.mount_calls,
        ),
        (
            "revive_portmap_calls_total",
            "Portmapper calls.",
            &nfs.portmap_calls,
        ),
        (
            "revive_nfs_rejected_calls_total",
            "Calls refused by the export allow-lists.",
            &nfs.rejected_calls,
        ),
        (
            "revive_nfs_framing_errors_total",
            "Connections closed for malformed records.",
            &nfs.framing_errors,
        ),
        (
            "revive_nfs_connections_total",
            "TCP connections accepted.",
            &nfs.connections_accepted,
        ),
        (
            "revive_nfs_connections_refused_total",
            "TCP connections closed at accept: from an address on no allow-list, or over a connection cap.",
            &nfs.connections_refused,
        ),
        (
            "revive_nfs_connections_timed_out_total",
            "TCP connections closed for idling or for a call sent too slowly.",
            &nfs.connections_timed_out,
        ),
        (
            "revive_nfs_read_bytes_total",
            "Bytes returned to NFS clients by READ.",
            &nfs.bytes_read,
        ),
        (
            "revive_cache_written_bytes_total",
            "Bytes NFS clients wrote (into write caches).",
            &nfs.bytes_written,
        ),
    ] {
        e.single(name, "counter", help, load(value));
    }
    e.single(
        "revive_nfs_connections_open",
        "gauge",
        "TCP connections open now.",
        load(&nfs.connections_open),
    );
}

/// The in-memory block cache of backup chunks.
fn block_cache(e: &mut Exposition, datastore: &Datastore) {
    let bc = datastore.block_cache().stats();
    let (hits, misses) = (load(&bc.hits), load(&bc.misses));
    e.single(
        "revive_block_cache_hits_total",
        "counter",
        "Backup chunk reads served from memory.",
        hits,
    );
    e.single(
        "revive_block_cache_misses_total",
        "counter",
        "Backup chunk reads fetched from the repository.",
        misses,
    );
    e.single(
        "revive_backup_read_bytes_total",
        "counter",
        "Plain bytes read from the backup repository.",
        load(&bc.bytes_fetched),
    );
    let ratio = if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    };
    e.single(
        "revive_block_cache_hit_ratio",
        "gauge",
        "Hits over all block cache lookups since start.",
        ratio,
    );
    e.single(
        "revive_block_cache_bytes",
        "gauge",
        "Bytes of verified chunks held in memory.",
        datastore.block_cache().bytes(),
    );
}

/// Published restore points by export.
async fn publications(e: &mut Exposition, datastore: &Datastore) {
    e.family(
        "revive_publications",
        "gauge",
        "Published restore points by export.",
    );
    for export in datastore.exports() {
        let n = datastore
            .publications(&export.path)
            .await
            .map(|p| p.len())
            .unwrap_or(0);
        e.sample("revive_publications", &[("export", &export.path)], n);
    }
}

/// Write caches: publications whose cache folder is missing, and how many
/// caches hold open files against their process-wide bound.
async fn write_caches(e: &mut Exposition, datastore: &Datastore) {
    const MISSING: &str = "revive_write_cache_missing";
    e.family(
        MISSING,
        "gauge",
        "1 while a publication's write cache folder is missing (its files are refused with JUKEBOX).",
    );
    for (export, publication, missing) in datastore.cache_states().await {
        e.sample(
            MISSING,
            &[("export", &export), ("publication", &publication)],
            u8::from(missing),
        );
    }
    e.single(
        "revive_write_caches_open",
        "gauge",
        "Write caches with open files (at most revive_write_caches_open_max).",
        crate::cache::open_caches(),
    );
    e.single(
        "revive_write_caches_open_max",
        "gauge",
        "Most write caches with open files at once (a tenth of the open file limit).",
        crate::cache::max_open_caches(),
    );
}

/// Sessions by state, their retries and what migrations copied.
fn sessions(e: &mut Exposition, controller: &Controller) {
    let m = controller.metrics();
    e.single(
        "revive_migration_bytes_total",
        "counter",
        "Bytes copied to production storage by copy migrations.",
        load(&m.migration_bytes),
    );
    e.single(
        "revive_session_retries_total",
        "counter",
        "Session steps that failed transiently and were scheduled for a retry.",
        load(&m.retries),
    );
    e.family(
        "revive_sessions",
        "gauge",
        "Instant-recovery sessions by state.",
    );
    for (state, n) in controller.state_counts() {
        e.sample("revive_sessions", &[("state", state.as_str())], n);
    }
}

/// Per block export: bytes, requests, errors, connections.
fn block_exports(e: &mut Exposition, controller: &Controller) {
    let exports = controller.block_exports().all();
    type Pick = fn(&crate::block::BlockMetrics) -> &AtomicU64;
    let families: [(&str, &str, &str, Pick); 7] = [
        (
            "revive_block_read_bytes_total",
            "counter",
            "Bytes block clients read.",
            |m| &m.bytes_read,
        ),
        (
            "revive_block_written_bytes_total",
            "counter",
            "Bytes block clients wrote (into write caches).",
            |m| &m.bytes_written,
        ),
        (
            "revive_block_requests_total",
            "counter",
            "Block requests answered.",
            |m| &m.requests,
        ),
        (
            "revive_block_errors_total",
            "counter",
            "Block requests answered with an error.",
            |m| &m.errors,
        ),
        (
            "revive_block_connections_total",
            "counter",
            "Connections that chose the export.",
            |m| &m.connections,
        ),
        (
            "revive_block_connections_open",
            "gauge",
            "Connections serving the export now.",
            |m| &m.connections_open,
        ),
        (
            "revive_block_refused_total",
            "counter",
            "Clients refused by the export's allow-list.",
            |m| &m.refused,
        ),
    ];
    for (name, kind, help, pick) in families {
        e.family(name, kind, help);
        for x in &exports {
            e.sample(
                name,
                &[("export", &x.name), ("protocol", x.protocol.as_str())],
                load(pick(&x.metrics)),
            );
        }
    }
}

/// Clones of storage snapshots and the sessions using them, by source.
async fn snapshot_clones(e: &mut Exposition, controller: &Controller) {
    let counts = controller.clone_counts().await;
    e.family(
        "revive_snapshot_clones",
        "gauge",
        "Writable clones of storage snapshots that revive holds, by snapshot source.",
    );
    for (source, clones, _) in &counts {
        e.sample("revive_snapshot_clones", &[("source", source)], clones);
    }
    e.family(
        "revive_snapshot_clone_users",
        "gauge",
        "Sessions running from clones of storage snapshots, by snapshot source.",
    );
    for (source, _, users) in &counts {
        e.sample("revive_snapshot_clone_users", &[("source", source)], users);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_families_have_help_and_type() {
        let mut e = Exposition::new();
        e.family("x_total", "counter", "Things.");
        e.sample("x_total", &[("export", "/a\"b\\c")], 3);
        e.single("y", "gauge", "One.", 1.5);
        assert_eq!(
            e.out,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{export=\"/a\\\"b\\\\c\"} 3\n\
             # HELP y One.\n# TYPE y gauge\ny 1.5\n"
        );
    }
}

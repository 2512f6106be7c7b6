//! Prometheus text exposition of revive's counters: NFS calls and latency,
//! block cache hits and fetches, write cache usage.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::controller::Controller;
use crate::datastore::Datastore;
use crate::nfs::metrics::LATENCY_BUCKETS_US;
use crate::nfs::NfsMetrics;

/// Appends one metric family header.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every counter as Prometheus text format 0.0.4.
pub async fn render(nfs: &NfsMetrics, datastore: &Datastore, controller: &Controller) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);

    family(
        &mut out,
        "revive_nfs_calls_total",
        "counter",
        "NFSv3 calls by procedure.",
    );
    for (name, s) in nfs.procs() {
        let _ = writeln!(
            out,
            "revive_nfs_calls_total{{proc=\"{name}\"}} {}",
            load(&s.calls)
        );
    }
    family(
        &mut out,
        "revive_nfs_errors_total",
        "counter",
        "NFSv3 calls answered with an error status.",
    );
    for (name, s) in nfs.procs() {
        let _ = writeln!(
            out,
            "revive_nfs_errors_total{{proc=\"{name}\"}} {}",
            load(&s.errors)
        );
    }
    family(
        &mut out,
        "revive_nfs_latency_seconds",
        "histogram",
        "NFSv3 call latency by procedure.",
    );
    for (name, s) in nfs.procs().filter(|(_, s)| load(&s.calls) > 0) {
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
            cumulative += load(&s.buckets[i]);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(
                out,
                "revive_nfs_latency_seconds_bucket{{proc=\"{name}\",le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += load(&s.buckets[LATENCY_BUCKETS_US.len()]);
        let _ = writeln!(
            out,
            "revive_nfs_latency_seconds_bucket{{proc=\"{name}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "revive_nfs_latency_seconds_sum{{proc=\"{name}\"}} {}",
            load(&s.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "revive_nfs_latency_seconds_count{{proc=\"{name}\"}} {cumulative}"
        );
    }
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
        (
            "revive_migration_bytes_total",
            "Bytes copied to production storage by copy migrations.",
            &controller.metrics().migration_bytes,
        ),
        (
            "revive_session_retries_total",
            "Session steps that failed transiently and were scheduled for a retry.",
            &controller.metrics().retries,
        ),
    ] {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", load(value));
    }
    family(
        &mut out,
        "revive_nfs_connections_open",
        "gauge",
        "TCP connections open now.",
    );
    let _ = writeln!(
        out,
        "revive_nfs_connections_open {}",
        load(&nfs.connections_open)
    );

    let bc = datastore.block_cache().stats();
    let (hits, misses) = (load(&bc.hits), load(&bc.misses));
    family(
        &mut out,
        "revive_block_cache_hits_total",
        "counter",
        "Backup chunk reads served from memory.",
    );
    let _ = writeln!(out, "revive_block_cache_hits_total {hits}");
    family(
        &mut out,
        "revive_block_cache_misses_total",
        "counter",
        "Backup chunk reads fetched from the repository.",
    );
    let _ = writeln!(out, "revive_block_cache_misses_total {misses}");
    family(
        &mut out,
        "revive_backup_read_bytes_total",
        "counter",
        "Plain bytes read from the backup repository.",
    );
    let _ = writeln!(
        out,
        "revive_backup_read_bytes_total {}",
        load(&bc.bytes_fetched)
    );
    family(
        &mut out,
        "revive_block_cache_hit_ratio",
        "gauge",
        "Hits over all block cache lookups since start.",
    );
    let ratio = if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    };
    let _ = writeln!(out, "revive_block_cache_hit_ratio {ratio}");
    family(
        &mut out,
        "revive_block_cache_bytes",
        "gauge",
        "Bytes of verified chunks held in memory.",
    );
    let _ = writeln!(
        out,
        "revive_block_cache_bytes {}",
        datastore.block_cache().bytes()
    );

    family(
        &mut out,
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
        let _ = writeln!(out, "revive_publications{{export=\"{}\"}} {n}", export.path);
    }
    family(
        &mut out,
        "revive_write_cache_missing",
        "gauge",
        "1 while a publication's write cache folder is missing (its files are refused with JUKEBOX).",
    );
    for (export, publication, missing) in datastore.cache_states().await {
        let _ = writeln!(
            out,
            "revive_write_cache_missing{{export=\"{export}\",publication=\"{publication}\"}} {}",
            u8::from(missing)
        );
    }
    family(
        &mut out,
        "revive_write_caches_open",
        "gauge",
        "Write caches with open files (at most revive_write_caches_open_max).",
    );
    let _ = writeln!(
        out,
        "revive_write_caches_open {}",
        crate::cache::open_caches()
    );
    family(
        &mut out,
        "revive_write_caches_open_max",
        "gauge",
        "Most write caches with open files at once (a tenth of the open file limit).",
    );
    let _ = writeln!(
        out,
        "revive_write_caches_open_max {}",
        crate::cache::max_open_caches()
    );
    family(
        &mut out,
        "revive_sessions",
        "gauge",
        "Instant-recovery sessions by state.",
    );
    for (state, n) in controller.state_counts() {
        let _ = writeln!(out, "revive_sessions{{state=\"{state}\"}} {n}");
    }
    out
}

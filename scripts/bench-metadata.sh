#!/bin/bash
# Time CREATE + REMOVE pairs through the NFS server (issue 18: the number
# to compare before and after the namespace's metadata log).
#
#   scripts/bench-metadata.sh            # release build, criterion's report
#
# Runs `cargo bench --bench metadata`: the library's datastore and NFS server
# on loopback, driven one call at a time by the nfs3_client crate, in a
# published VM folder (`create_remove/vm_folder`) and with 1000 more files in
# the export (`create_remove/files_1000`). Criterion prints the time of one
# pair (CREATE then REMOVE); pairs/s = 1 / that time.
#
# Environment: REVIVE_BENCH_DIR (where state, repository and write caches
# go, default target/: keep it on the disk you care about, fsyncs hit it),
# BENCH_FILTER (criterion filter, default all).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec cargo bench --bench metadata -- ${BENCH_FILTER:-}

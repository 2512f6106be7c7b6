#!/bin/sh
# Boot time of the tiny VM (scripts/build-boot-image.sh) under QEMU/TCG,
# from revive's NFS export vs the same disk as a local file, in one run:
# the qemu driver's power on to the guest's marker on its serial console,
# alternating nfs and local, REPEATS times each (default 3). Prints every
# run, the medians and the ratio nfs/local; writes nothing else.
#   scripts/bench-boot.sh [REPEATS]
# Runs the ignored test qemu::boot_time_from_the_datastore_vs_a_local_file,
# which re-runs itself in private network and pid namespaces (port 111).
set -eu
REPEATS=${1:-3}
cd "$(dirname "$0")/.."
scripts/build-boot-image.sh >/dev/null
OUT=$(REVIVE_BENCH_REPEATS=$REPEATS cargo test --release --test integration -- \
    --ignored --exact qemu::boot_time_from_the_datastore_vs_a_local_file --nocapture 2>&1) || {
    echo "$OUT" >&2
    exit 1
}
# The first line may follow the test harness's "test ... " on one line.
echo "$OUT" | grep -o 'BENCH-BOOT [a-z]* [0-9.]*' | awk -v repeats="$REPEATS" '
    { t[$2] = t[$2] " " $3; print "  " $2 " run: " $3 " s" }
    END {
        for (mode in t) {
            n = split(substr(t[mode], 2), v, " ")
            # insertion sort, then the middle value
            for (i = 2; i <= n; i++) { x = v[i]; j = i - 1; while (j > 0 && v[j] > x) { v[j+1] = v[j]; j-- } v[j+1] = x }
            med[mode] = (n % 2) ? v[(n+1)/2] : (v[n/2] + v[n/2+1]) / 2
            lo[mode] = v[1]; hi[mode] = v[n]
        }
        printf "median boot to marker, %d runs each: nfs %.2f s (%.2f-%.2f), local %.2f s (%.2f-%.2f), nfs/local %.3f\n",
            repeats, med["nfs"], lo["nfs"], hi["nfs"], med["local"], lo["local"], hi["local"], med["nfs"] / med["local"]
    }'

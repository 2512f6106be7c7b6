#!/bin/sh
# Storage snapshot benchmark (issue 13), in one run, release build:
#  - clone time of a btrfs and a Ceph RBD snapshot, of a 256 MiB volume
#    (random data) and a 20 GiB one (sparse), through revive's providers
#    (storage CLI call included); goal O(1), under 1 s;
#  - power on to the guest's marker of the tiny VM (scripts/build-boot-image.sh,
#    TCG) booted from a snapshot's clone (btrfs over revive's NFS; RBD opened
#    by QEMU) vs the same disk as a local copy, alternating; goal <= 1.1x.
# REPEATS runs of each (default 3). Prints every run, the medians and the
# ratios; writes nothing else. Needs root (loop mounts, namespaces) and the
# peers of scripts/install-test-deps.sh; starts (or reuses) the Ceph cluster
# of scripts/ceph-single-host.sh.
#   scripts/bench-snapshots.sh [REPEATS]
set -eu
REPEATS=${1:-3}
cd "$(dirname "$0")/.."
scripts/build-boot-image.sh >/dev/null
scripts/ceph-single-host.sh >/dev/null
run() {
    REVIVE_BENCH_REPEATS=$REPEATS cargo test --release --test integration -- \
        --ignored --exact "snapshots::bench::$1" --nocapture 2>&1 || {
        echo "snapshots::bench::$1 failed" >&2
        return 1
    }
}
OUT=$(run clone_time_of_small_and_large_snapshots)
# The clone run removes many snapshots and clones, after which memstore's
# accounting may call the OSD full: start the boots on a fresh cluster.
scripts/ceph-single-host.sh stop
scripts/ceph-single-host.sh >/dev/null
OUT="$OUT
$(run boot_from_a_btrfs_clone_vs_a_local_copy | sed 's/BENCH-BOOT local/BENCH-BOOT local-vs-btrfs/')"
OUT="$OUT
$(run boot_from_an_rbd_clone_vs_a_local_copy | sed 's/BENCH-BOOT local/BENCH-BOOT local-vs-rbd/')"

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) { print "nan"; exit } print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2 }'; }
range() { sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }

echo "clone time (${REPEATS} runs each; median, range in seconds):"
for provider in btrfs rbd; do
    for size in 256MiB 20GiB; do
        v=$(echo "$OUT" | grep -o "BENCH-CLONE $provider $size [0-9.]*" | awk '{ print $4 }')
        printf "  %-5s %-6s %s s (%s)\n" "$provider" "$size" "$(echo "$v" | median)" "$(echo "$v" | range)"
    done
done
echo "power on to marker (${REPEATS} runs each; median, range in seconds):"
for pair in "btrfs-nfs local-vs-btrfs" "rbd local-vs-rbd"; do
    set -- $pair
    c=$(echo "$OUT" | grep -o "BENCH-BOOT $1 [0-9.]*" | awk '{ print $3 }')
    l=$(echo "$OUT" | grep -o "BENCH-BOOT $2 [0-9.]*" | awk '{ print $3 }')
    mc=$(echo "$c" | median)
    ml=$(echo "$l" | median)
    printf "  %-9s clone %s s (%s), local copy %s s (%s), clone/local %s\n" "$1" "$mc" "$(echo "$c" | range)" \
        "$ml" "$(echo "$l" | range)" "$(awk -v a="$mc" -v b="$ml" 'BEGIN { printf "%.3f", a / b }')"
done

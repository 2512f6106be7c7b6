#!/bin/bash
# Benchmark revive's iSCSI target against tgtd (package tgt), side by side
# in one run on this machine, through the same initiator: QEMU's iscsi
# block driver (libiscsi) in qemu-storage-daemon, exported on a unix socket
# to fio's nbd engine (Debian's fio has no iSCSI engine).
#
#   scripts/bench-iscsi.sh          # prints the table, writes docs/bench-iscsi.md
#
# (a) revive (release build) serves restore point disk@latest of a 256 MiB
#     disk of mixed data from the deduplicated repository as the iSCSI
#     export "disk" (`[[block_export]] protocol = "iscsi"`, LUN 0).
# (b) tgtd serves the same bytes as a plain file (LUN 1, rdwr backing store,
#     page cache).
# Both listen on 127.0.0.1; fio, the two qemu-storage-daemons and the
# targets share the machine's cores. Both are measured warm: a sequential
# read runs unmeasured first (revive's block cache, tgtd's page cache).
#
# Environment: BENCH_RUNTIME (seconds per fio run, default 5), BENCH_REPEAT
# (runs per line, default 3; cells show median and range), BENCH_DIR (work
# folder, default /var/tmp/revive-bench-iscsi), BENCH_MD (report, default
# docs/bench-iscsi.md; empty: do not write), BENCH_SKIP_BUILD=1 (use the
# existing release binary).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${BENCH_RUNTIME:-5}
REPEAT=${BENCH_REPEAT:-3}
WORK=${BENCH_DIR:-/var/tmp/revive-bench-iscsi}
MD=${BENCH_MD-$ROOT/docs/bench-iscsi.md}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
REVIVE=$TARGET/release/revive
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
INITIATOR=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test

log() { echo "bench: $*" >&2; }
die() {
    log "$*"
    exit 1
}

for t in tgtd tgtadm qemu-storage-daemon fio python3; do
    command -v "$t" >/dev/null || die "missing $t (scripts/install-test-deps.sh)"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PIDS=()
TGTD_PID=""
cleanup() {
    set +e
    local p
    # tgtd ignores SIGTERM while it has targets.
    [ -n "$TGTD_PID" ] && kill -KILL "$TGTD_PID" 2>/dev/null
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    PIDS=()
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --bin revive >&2)
fi
[ -x "$REVIVE" ] || die "no release binary at $REVIVE"

rm -rf "$WORK"
mkdir -p "$WORK/plain" "$WORK/src"
log "making a 256 MiB disk of mixed data"
# Per MiB, in a repeating pattern of 8: random (3), compressible text (2),
# zeros (1), a duplicate of an earlier random MiB (2), as bench-block.sh.
set +o pipefail
{
    head -c $((1 << 20)) /dev/urandom >"$WORK/dup.bin"
    for i in $(seq 0 31); do
        head -c $((3 << 20)) /dev/urandom
        head -c $((3 << 19)) /dev/urandom | base64 -w 76 | head -c $((2 << 20))
        head -c $((1 << 20)) /dev/zero
        cat "$WORK/dup.bin" "$WORK/dup.bin"
    done
} >"$WORK/src/disk.img"
set -o pipefail
cp "$WORK/src/disk.img" "$WORK/plain/disk.img"
"$REVIVE" init --repo "$WORK/repo" >&2
"$REVIVE" backup --repo "$WORK/repo" --name disk "$WORK/src/disk.img" >&2

cat >"$WORK/revive.toml" <<EOF
[repository]
path = "$WORK/repo"

[datastore]
state_dir = "$WORK/state"
cache_root = "$WORK/cache"
block_cache = "320MiB"

[nfs]
bind = "127.0.0.1"
nfs_port = 0
mount_port = 0
portmap = false

[iscsi]
bind = "127.0.0.1"
port = 0

[[export]]
path = "/revive"
allowed_clients = ["127.0.0.1"]

[[block_export]]
name = "disk"
point = "disk@latest"
protocol = "iscsi"
allowed_clients = ["127.0.0.1"]
EOF

"$REVIVE" serve --config "$WORK/revive.toml" >"$WORK/ports.json" 2>>"$WORK/revive.log" &
PIDS+=($!)
for i in $(seq 300); do
    [ -s "$WORK/ports.json" ] && break
    sleep 0.1
done
ISCSI_PORT=$(head -n1 "$WORK/ports.json" | python3 -c 'import json, sys; print(json.load(sys.stdin)["iscsi_port"])') \
    || die "revive failed to start: $(cat "$WORK/revive.log")"
REVIVE_IQN=iqn.2024-01.dev.revive:disk

TGT_PORT=$(free_port)
TGT_CONTROL=$((1000 + TGT_PORT % 30000))
TGT_IQN=iqn.2024-01.dev.revive:bench-tgtd
mkdir -p /var/run/tgtd
tgtd -f -C "$TGT_CONTROL" --iscsi "portal=127.0.0.1:$TGT_PORT" >"$WORK/tgtd.log" 2>&1 &
TGTD_PID=$!
PIDS+=($!)
adm() { tgtadm -C "$TGT_CONTROL" --lld iscsi "$@"; }
for i in $(seq 100); do
    adm --op show --mode target >/dev/null 2>&1 && break
    sleep 0.1
done
adm --op new --mode target --tid 1 -T "$TGT_IQN"
adm --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/plain/disk.img"
adm --op bind --mode target --tid 1 -I ALL

# qsd NAME PORT IQN LUN: QEMU's iscsi initiator, exported as NBD on a socket.
qsd() {
    local sock="$WORK/$1.sock"
    qemu-storage-daemon \
        --blockdev "driver=iscsi,transport=tcp,portal=127.0.0.1:$2,target=$3,lun=$4,initiator-name=$INITIATOR,node-name=disk" \
        --nbd-server "addr.type=unix,addr.path=$sock" \
        --export type=nbd,id=e0,node-name=disk,name=disk >/dev/null 2>>"$WORK/qsd-$1.log" &
    PIDS+=($!)
    for i in $(seq 100); do
        [ -S "$sock" ] && break
        sleep 0.1
    done
    [ -S "$sock" ] || die "qemu-storage-daemon failed for $1: $(cat "$WORK/qsd-$1.log")"
    echo "nbd+unix:///disk?socket=$sock"
}
URI_REVIVE=$(qsd revive "$ISCSI_PORT" "$REVIVE_IQN" 0)
URI_TGTD=$(qsd tgtd "$TGT_PORT" "$TGT_IQN" 1)

# run_fio URI ARGS...: prints "iops MiB/s" of the reads.
run_fio() {
    local uri=$1 out
    shift
    out=$(timeout $((RUNTIME + 60)) fio --name=bench --ioengine=nbd "--uri=$uri" --size=256m \
        --time_based "--runtime=$RUNTIME" --output-format=terse --terse-version=3 "$@") \
        || die "fio failed: $uri $*"
    echo "$out" | grep '^3;' | tail -n1 | awk -F';' '{printf "%.0f %.0f\n", $8, $7 / 1024}'
}

log "warming both (sequential read)"
run_fio "$URI_REVIVE" --rw=read --bs=1m --iodepth=4 >/dev/null
run_fio "$URI_TGTD" --rw=read --bs=1m --iodepth=4 >/dev/null

stats() { sort -g | awk '{v[NR]=$1} END {printf "%s %s %s", v[int((NR+1)/2)], v[1], v[NR]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print 0 }'; }
RESULTS=()
# measure LABEL FIELD(1 iops|2 mibs) ARGS...
measure() {
    local label=$1 field=$2 i r t rvs="" tvs="" rt=""
    shift 2
    for i in $(seq "$REPEAT"); do
        r=$(run_fio "$URI_REVIVE" "$@" | cut -d' ' -f"$field")
        t=$(run_fio "$URI_TGTD" "$@" | cut -d' ' -f"$field")
        log "$label [$i/$REPEAT]: revive $r, tgtd $t"
        rvs+="$r"$'\n'
        tvs+="$t"$'\n'
        rt+=$(ratio "$r" "$t")$'\n'
    done
    RESULTS+=("$label|$field|$(printf %s "$rvs" | stats)|$(printf %s "$tvs" | stats)|$(printf %s "$rt" | stats)")
}
measure "4 KiB random read, qd16" 1 --rw=randread --bs=4k --iodepth=16
measure "1 MiB sequential read, qd4" 2 --rw=read --bs=1m --iodepth=4
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

cell() { if [ "$REPEAT" -gt 1 ]; then echo "$1$4 ($2-$3)"; else echo "$1$4"; fi; }
table() {
    echo "| workload (fio through qemu-storage-daemon's iscsi driver, 256 MiB disk, ${RUNTIME} s per run, median of $REPEAT) | revive | tgtd | revive / tgtd |"
    echo "|---|---:|---:|---:|"
    local line label field r t rt u
    for line in "${RESULTS[@]}"; do
        IFS='|' read -r label field r t rt <<<"$line"
        u=" IOPS"
        [ "$field" = 2 ] && u=" MiB/s"
        # shellcheck disable=SC2086
        echo "| $label | $(cell $r "$u") | $(cell $t "$u") | $(cell $rt x) |"
    done
}
TABLE=$(table)
echo "$TABLE"
echo "load average before: $LOAD_BEFORE, after: $LOAD_AFTER"

if [ -n "$MD" ]; then
    CPU=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
    cat >"$MD" <<EOF
# iSCSI benchmark: revive's target vs tgtd

Produced by \`scripts/bench-iscsi.sh\` (BENCH_RUNTIME=$RUNTIME BENCH_REPEAT=$REPEAT) on $(date -u '+%Y-%m-%d %H:%M UTC'), revive \`$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)\`.

Machine: $(nproc) cores ($CPU), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(. /etc/os-release && echo "$PRETTY_NAME"); load average before the run: $LOAD_BEFORE, after: $LOAD_AFTER (other builds share the machine).
fio $(fio --version | sed 's/^fio-//'), QEMU $(qemu-storage-daemon --version | head -n1 | awk '{print $3}'), libiscsi $(dpkg-query -W -f '${Version}' libiscsi7 2>/dev/null || echo unknown), tgt $(dpkg-query -W -f '${Version}' tgt 2>/dev/null || echo unknown).

$TABLE

- One run, same machine: each repeat runs revive then tgtd; ratios are medians of the per-repeat ratios.
- revive serves restore point \`disk@latest\` (256 MiB: 3/8 random, 2/8 text, 1/8 zeros, 2/8 duplicates) from its deduplicated repository through the block layer's device of a presented file (the datastore's read path, 320 MiB block cache); tgtd serves the same bytes from a plain file in the page cache. Both warm.
- The initiator is the same for both: QEMU's iscsi driver in a qemu-storage-daemon, whose NBD export on a unix socket fio's nbd engine drives.
EOF
    log "wrote $MD"
fi

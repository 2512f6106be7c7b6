#!/bin/bash
# Benchmark revive's NBD block exports against nbdkit (file plugin), side by
# side in one run on this machine, with fio's nbd engine (libnbd), and
# against revive's own NFS datastore serving the same restore point.
#
#   scripts/bench-block.sh          # prints the table, writes docs/bench-block.md
#
# (a) revive (release build) serves restore point disk@latest of a 256 MiB
#     disk of mixed data (random, compressible, duplicate and zero MiBs) from
#     the deduplicated repository, as NBD export "disk"; writes go to its
#     write cache.
# (b) nbdkit's file plugin serves the same bytes as a plain file.
# (c) revive's NFS datastore serves the same publication (the same file and
#     write cache as (a)) to fio's nfs engine (scripts/build-fio-nfs.sh).
# (d) nbdkit's null plugin (no storage at all: writes are dropped, reads
#     are zeros): what fio's nbd engine reaches against a server that does
#     no work but sleeps between requests as nbdkit does, the ceiling of
#     any line the client bounds.
#
# All four listen on 127.0.0.1 (free ports); fio and the servers share the
# machine's cores. Both data sets sit on the same filesystem and in the page
# cache.
#
# Environment: BENCH_RUNTIME (seconds per fio run, default 4), BENCH_REPEAT
# (runs per line, default 3; cells show median and range), BENCH_DIR (work
# folder, default /var/tmp/revive-bench-block), BENCH_MD (report, default
# docs/bench-block.md; empty: do not write), BENCH_SKIP_BUILD=1 (use the
# existing release binary), BENCH_LINES (subset of: cold1 cold16 seqread
# warm1 warm16 seqwrite; default all), BENCH_NBD_POLL_US (revive's [nbd]
# poll_us; default: revive's default, 100).
#
# Exit status: 0 on success, 1 when a server fails to start or a job fails.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${BENCH_RUNTIME:-4}
REPEAT=${BENCH_REPEAT:-3}
WORK=${BENCH_DIR:-/var/tmp/revive-bench-block}
MD=${BENCH_MD-$ROOT/docs/bench-block.md}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
REVIVE=$TARGET/release/revive
CMDLINE="${BENCH_NBD_POLL_US:+BENCH_NBD_POLL_US=$BENCH_NBD_POLL_US }${BENCH_RUNTIME:+BENCH_RUNTIME=$BENCH_RUNTIME }${BENCH_REPEAT:+BENCH_REPEAT=$BENCH_REPEAT }${BENCH_LINES:+BENCH_LINES=\"$BENCH_LINES\" }scripts/bench-block.sh"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

log() { echo "bench: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# ---------------------------------------------------------------- tools --
missing=()
for p in nbdkit fio libnbd-bin python3; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd engine"
FIO_NBD=$(command -v fio)
FIO_NFS=$("$ROOT/scripts/build-fio-nfs.sh")

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until something accepts TCP on 127.0.0.1:$1 while pid $2 lives.
wait_port() {
    local port=$1 pid=$2 i
    for i in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

REVIVE_PID=""
NBDKIT_PID=""
NULL_PID=""
cleanup() {
    set +e
    [ -n "$REVIVE_PID" ] && kill -TERM "$REVIVE_PID" 2>/dev/null && wait "$REVIVE_PID" 2>/dev/null
    [ -n "$NBDKIT_PID" ] && kill -TERM "$NBDKIT_PID" 2>/dev/null && wait "$NBDKIT_PID" 2>/dev/null
    [ -n "$NULL_PID" ] && kill -TERM "$NULL_PID" 2>/dev/null && wait "$NULL_PID" 2>/dev/null
    REVIVE_PID=""
    NBDKIT_PID=""
    NULL_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- peers --
start_revive() {
    local i line=""
    "$REVIVE" serve --config "$WORK/revive.toml" >"$WORK/ports.json" 2>>"$WORK/revive.log" &
    REVIVE_PID=$!
    for i in $(seq 300); do
        line=$(head -n1 "$WORK/ports.json" 2>/dev/null || true)
        [ -n "$line" ] && break
        kill -0 "$REVIVE_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -n "$line" ] || {
        cat "$WORK/revive.log" >&2
        die "revive failed to start"
    }
    read -r NBD_PORT NFS_PORT MOUNT_PORT < <(echo "$line" | python3 -c \
        'import json, sys; p = json.load(sys.stdin); print(p["nbd_port"], p["nfs_port"], p["mount_port"])')
    REVIVE_NBD="nbd://127.0.0.1:$NBD_PORT/disk"
    REVIVE_NFS="nfs://127.0.0.1/revive?nfsport=$NFS_PORT&mountport=$MOUNT_PORT"
}

stop_revive() {
    kill -TERM "$REVIVE_PID"
    wait "$REVIVE_PID" || true
    REVIVE_PID=""
}

# start_nbdkit PLUGIN ARGS...: starts nbdkit on a free port; sets
# STARTED_PID and STARTED_NBD.
start_nbdkit() {
    local port
    port=$(free_port)
    nbdkit -f -i 127.0.0.1 -p "$port" "$@" 2>>"$WORK/nbdkit.log" &
    STARTED_PID=$!
    wait_port "$port" "$STARTED_PID" || {
        cat "$WORK/nbdkit.log" >&2
        die "nbdkit $1 failed to start"
    }
    STARTED_NBD="nbd://127.0.0.1:$port/"
}

# ------------------------------------------------------------------ fio --
# run_fio nbd URL ARGS... | run_fio nfs URL ARGS...: prints
# "read_iops read_kibs write_iops write_kibs server_cpu_ticks", the last the
# CPU time (user + system, clock ticks) the server process $SERVER_PID used
# while fio ran.
#
# fio's nfs engine sometimes never finishes its unmount after a sequential
# read (see docs/bench-nfs.md): terse stats are printed every second and the
# last line counts; a fio still there 10 s after its run time is killed.
run_fio() {
    local kind=$1 url=$2 out
    shift 2
    local engine=()
    case $kind in
    nbd) engine=("$FIO_NBD" --ioengine=nbd "--uri=$url") ;;
    nfs) engine=("$FIO_NFS" --ioengine=nfs "--nfs_url=$url" --filename=/bench/disk.img) ;;
    esac
    setsid timeout -s INT -k 3 $((RUNTIME + 10)) stdbuf -oL "${engine[@]}" --name=bench \
        --size=256m --time_based "--runtime=$RUNTIME" --randrepeat=0 --output-format=terse \
        --terse-version=3 --status-interval=1 "$@" >"$WORK/fio.out" 2>"$WORK/fio.err" &
    local pid=$! cpu_before cpu_after
    cpu_before=$(cpu_ticks "$SERVER_PID")
    wait "$pid" || true
    cpu_after=$(cpu_ticks "$SERVER_PID")
    kill -KILL -- "-$pid" 2>/dev/null || true
    out=$(grep '^3;' "$WORK/fio.out" | tail -n1)
    if [ -z "$out" ]; then
        cat "$WORK/fio.err" >&2
        die "fio failed: $kind $*"
    fi
    # terse v3: 7/8 read KiB/s and IOPS, 48/49 write KiB/s and IOPS.
    echo "$out" | awk -F';' -v cpu=$((cpu_after - cpu_before)) '{print $8, $7, $49, $48, cpu}'
}

# CPU time (user + system, all threads) process $1 has used, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# ---------------------------------------------------------------- setup --
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release >&2)
fi
[ -x "$REVIVE" ] || die "no release binary at $REVIVE"

rm -rf "$WORK"
mkdir -p "$WORK/plain" "$WORK/src"
log "making a 256 MiB disk of mixed data"
# Per MiB, in a repeating pattern of 8: random (3), compressible text (2),
# zeros (1), a duplicate of an earlier random MiB (2), as bench-nfs.sh.
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
[ "$(stat -c %s "$WORK/src/disk.img")" = $((256 << 20)) ] || die "disk image has the wrong size"
cp "$WORK/src/disk.img" "$WORK/plain/disk.img"

"$REVIVE" init --repo "$WORK/repo" >&2
"$REVIVE" backup --repo "$WORK/repo" --name disk "$WORK/src/disk.img" >&2
REPO_BYTES=$(du -sb "$WORK/repo" | awk '{print $1}')

cat >"$WORK/revive.toml" <<EOF
[repository]
path = "$WORK/repo"

[datastore]
state_dir = "$WORK/state"
cache_root = "$WORK/cache"
block_cache = "256MiB"

[nfs]
bind = "127.0.0.1"
nfs_port = 0
mount_port = 0
portmap = false

[nbd]
bind = "127.0.0.1"
port = 0
${BENCH_NBD_POLL_US:+poll_us = $BENCH_NBD_POLL_US}

[[export]]
path = "/revive"
allowed_clients = ["127.0.0.1"]

[[publication]]
name = "bench"
point = "disk@latest"

[[block_export]]
name = "disk"
publication = "bench"
protocol = "nbd"
allowed_clients = ["127.0.0.1"]
EOF

start_nbdkit file "$WORK/plain/disk.img"
NBDKIT_PID=$STARTED_PID
NBDKIT_NBD=$STARTED_NBD
start_nbdkit null size=256M
NULL_PID=$STARTED_PID
NULL_NBD=$STARTED_NBD
log "nbdkit up (file and null)"

# ------------------------------------------------------------------ run --
RANDREAD1=(--rw=randread --bs=4k --iodepth=1)
RANDREAD16=(--rw=randread --bs=4k --iodepth=16)
SEQREAD=(--rw=read --bs=1m --iodepth=4)
SEQWRITE=(--rw=write --bs=1m --iodepth=4)

RESULTS=()
# Median and range of numbers on stdin: "median min max".
stats() { sort -g | awk '{v[NR]=$1} END {printf "%s %s %s", v[int((NR+1)/2)], v[1], v[NR]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print 0 }'; }

# measure LABEL UNIT(iops|mibs) DIR(read|write) COLD(0|1) ARGS...
# Per repeat: revive over NBD and nbdkit (revive first in odd repeats,
# nbdkit first in even ones, so neither always runs on what the other left
# behind: a warm CPU, the host's mood), then revive over NFS, then
# nbdkit's null plugin; a cold line restarts revive (empty block cache)
# before each of its two runs.
measure() {
    local label=$1 unit=$2 dir=$3 cold=$4 i r k n z rv kv nv zv rvs="" kvs="" nvs="" zvs="" rk="" rn="" rc=""
    shift 4
    pick() {
        set -- $1
        case "$dir/$unit" in
        read/iops) echo "$1" ;;
        read/mibs) awk -v k="$2" 'BEGIN{printf "%.0f", k/1024}' ;;
        write/iops) echo "$3" ;;
        write/mibs) awk -v k="$4" 'BEGIN{printf "%.0f", k/1024}' ;;
        esac
    }
    cpu() { set -- $1; echo "$5"; }
    fresh() {
        if [ "$cold" = 1 ]; then
            stop_revive
            start_revive
        fi
        settle
    }
    # A write line starts every run from the same page cache: nothing of
    # either server's file cached and nothing dirty. Otherwise a run pays
    # for writing back what the run before it dirtied, and overwrites
    # whatever folios earlier lines left (nbdkit's file was read in 4 KiB
    # pieces, revive's data file is new), which moved this line's ratio by
    # more than 10 % in manual runs.
    settle() {
        [ "$dir" = write ] || return 0
        sync
        if ! echo 1 2>/dev/null >/proc/sys/vm/drop_caches; then
            [ -n "${SETTLE_WARNED:-}" ] || log "cannot drop the page cache (not root): write runs start from whatever the last run left"
            SETTLE_WARNED=1
        fi
    }
    for i in $(seq "$REPEAT"); do
        if [ $((i % 2)) = 1 ]; then
            fresh
            r=$(SERVER_PID=$REVIVE_PID run_fio nbd "$REVIVE_NBD" "$@")
            settle
            k=$(SERVER_PID=$NBDKIT_PID run_fio nbd "$NBDKIT_NBD" "$@")
        else
            settle
            k=$(SERVER_PID=$NBDKIT_PID run_fio nbd "$NBDKIT_NBD" "$@")
            fresh
            r=$(SERVER_PID=$REVIVE_PID run_fio nbd "$REVIVE_NBD" "$@")
        fi
        fresh
        n=$(SERVER_PID=$REVIVE_PID run_fio nfs "$REVIVE_NFS" "$@")
        settle
        z=$(SERVER_PID=$NULL_PID run_fio nbd "$NULL_NBD" "$@")
        rv=$(pick "$r")
        kv=$(pick "$k")
        nv=$(pick "$n")
        zv=$(pick "$z")
        log "$label [$i/$REPEAT]: revive nbd $rv, nbdkit $kv, revive nfs $nv, nbdkit null $zv ($unit); server CPU ticks: revive nbd $(cpu "$r"), nbdkit $(cpu "$k")"
        rvs+="$rv"$'\n'
        kvs+="$kv"$'\n'
        nvs+="$nv"$'\n'
        zvs+="$zv"$'\n'
        rk+=$(ratio "$rv" "$kv")$'\n'
        rn+=$(ratio "$rv" "$nv")$'\n'
        # CPU per unit of work, revive over nbdkit: (cpu_r / rv) / (cpu_k / kv).
        rc+=$(ratio "$(cpu "$r")" "$(awk -v c="$(cpu "$k")" -v k="$kv" -v r="$rv" 'BEGIN{printf "%.6f", (k > 0) ? c * r / k : 0}')")$'\n'
    done
    RESULTS+=("$label|$unit|$(printf %s "$rvs" | stats)|$(printf %s "$kvs" | stats)|$(printf %s "$rk" | stats)|$(printf %s "$rc" | stats)|$(printf %s "$nvs" | stats)|$(printf %s "$rn" | stats)|$(printf %s "$zvs" | stats)")
}

LINES=" ${BENCH_LINES:-cold1 cold16 seqread warm1 warm16 seqwrite} "
want() { [[ "$LINES" == *" $1 "* ]]; }

start_revive
log "revive up: $REVIVE_NBD"
want cold1 && measure "4 KiB random read, qd1, cold block cache" iops read 1 "${RANDREAD1[@]}"
want cold16 && measure "4 KiB random read, qd16, cold block cache" iops read 1 "${RANDREAD16[@]}"
if want seqread; then
    measure "1 MiB sequential read, qd4" mibs read 0 "${SEQREAD[@]}"
elif want warm1 || want warm16; then
    log "warming revive's block cache"
    SERVER_PID=$REVIVE_PID run_fio nbd "$REVIVE_NBD" "${SEQREAD[@]}" >/dev/null
fi
want warm1 && measure "4 KiB random read, qd1, warm block cache" iops read 0 "${RANDREAD1[@]}"
want warm16 && measure "4 KiB random read, qd16, warm block cache" iops read 0 "${RANDREAD16[@]}"
want seqwrite && measure "1 MiB sequential write, qd4" mibs write 0 "${SEQWRITE[@]}"
cleanup
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --------------------------------------------------------------- report --
cell() {
    # $1 median $2 min $3 max $4 unit suffix
    if [ "$REPEAT" -gt 1 ]; then
        echo "$1$4 ($2-$3)"
    else
        echo "$1$4"
    fi
}
table() {
    echo "| workload (fio, 256 MiB disk, ${RUNTIME} s per run, median of $REPEAT) | revive NBD | nbdkit file | revive NBD / nbdkit | server CPU per op, revive / nbdkit | revive NFS | revive NBD / NFS | nbdkit null (no storage) |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    local line label unit r k rk rc n rn z u
    for line in "${RESULTS[@]}"; do
        IFS='|' read -r label unit r k rk rc n rn z <<<"$line"
        u=" IOPS"
        [ "$unit" = mibs ] && u=" MiB/s"
        # shellcheck disable=SC2086
        echo "| $label | $(cell $r "$u") | $(cell $k "$u") | $(cell $rk x) | $(cell $rc x) | $(cell $n "$u") | $(cell $rn x) | $(cell $z "$u") |"
    done
}

TABLE=$(table)
echo "$TABLE"

if [ -n "$MD" ]; then
    CPU=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
    LIBNBD_VERSION=$(dpkg-query -W -f '${Version}' libnbd0 2>/dev/null || echo unknown)
    NBDKIT_VERSION=$(dpkg-query -W -f '${Version}' nbdkit 2>/dev/null || echo unknown)
    cat >"$MD" <<EOF
# Block benchmark: revive's NBD exports vs nbdkit, and vs revive's NFS

Produced by \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), revive \`$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)\`.

Machine: $(nproc) cores ($CPU), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r); load average before the run: $LOAD_BEFORE, after: $LOAD_AFTER.
fio $(fio --version | sed 's/^fio-//') (nbd engine, libnbd $LIBNBD_VERSION; nfs engine from scripts/build-fio-nfs.sh), nbdkit $NBDKIT_VERSION (file plugin).

$TABLE

- Same machine, one run: each line runs revive over NBD and nbdkit (revive first in odd repeats, nbdkit first in even ones), then revive over NFS, then nbdkit's null plugin, $REPEAT times; cells show the median and (range). Ratio columns are medians of the per-repeat ratios (runs seconds apart). "Server CPU per op" is the server process's CPU time (user + system, all threads, from /proc) during its run divided by the operations (or MiB) it served, revive's over nbdkit's: above 1.0x revive spends more CPU for each request. fio and the servers share the $(nproc) cores with whatever else runs, so absolute figures are noisy.
- revive serves restore point \`disk@latest\` of a 256 MiB disk (3/8 random, 2/8 compressible text, 1/8 zeros, 2/8 duplicates) from its deduplicated repository ($((REPO_BYTES >> 20)) MiB on disk), 1 MiB chunks, zstd, BLAKE3-verified when they enter the 256 MiB block cache; NBD export \`disk\` and NFS publication \`bench\` are the same file and write cache. nbdkit's file plugin serves the same bytes as a plain file on the same filesystem, in the page cache.
- "cold" lines restart revive before each of its runs (empty block cache; the cache fills while the job runs). The sequential read loads every chunk, so the "warm" lines read only memory. nbdkit's cold and warm lines are the same workload run twice.
- Each NBD connection is served by threads of its own (nbdkit's model). revive's reader polls its socket for up to [nbd] \`poll_us\` (here ${BENCH_NBD_POLL_US:-100} µs) for the next request of a client with nothing else in flight that answered its last reply within that time, instead of sleeping in recv; nbdkit sleeps. Polling saves the two cross-CPU wake-ups of each queue-depth-1 request and costs CPU while such a client is busy: the CPU column shows how much.
- Writes: fio's nbd engine sends plain NBD_CMD_WRITEs (no FUA, no flush during the run). revive receives a write's data into a buffer of the connection's own pool, reused as soon as the write is stored, and lands it in the write cache's data file (page cache; writes of up to 256 KiB are also queued as journal records, longer ones leave the next flush a checkpoint); nbdkit's file plugin receives into a buffer of its own and writes the plain file (page cache). Before each write run the script writes back and drops the page cache (\`sync; echo 1 > /proc/sys/vm/drop_caches\`, as root), so that every run starts with nothing of either file cached and nothing dirty: otherwise a run pays for writing back what the run before it dirtied, and finds folios of whatever size earlier lines left in the page cache for its file.
- "nbdkit null (no storage)" is nbdkit's null plugin (writes dropped, reads answered with zeros) on the same client job, run after revive's NFS in each repeat: a server that does no storage work but sleeps between requests, as nbdkit does. Where it is not above both servers, the client (fio's single thread) or the protocol bounds the line, not the server; revive's polling can beat it at queue depth 1.
EOF
    log "wrote $MD"
fi

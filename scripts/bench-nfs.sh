#!/bin/bash
# Benchmark revive's NFS datastore against NFS-Ganesha 4.3, side by side, in
# one run on this machine, with fio's nfs engine (libnfs, no kernel client).
#
#   scripts/bench-nfs.sh            # prints the table, writes docs/bench-nfs.md
#
# (a) revive serves a restore point of a 256 MiB disk of mixed data (random,
#     compressible, duplicate and zero MiBs) from the deduplicated repository
#     (release build); writes go to its write cache.
# (b) NFS-Ganesha 4.3 (FSAL VFS) serves the same disk as a plain file.
#
# Fairness: each server runs in a private network namespace (plus mount and
# pid namespaces) with fio entered into that network namespace, so both are
# reached over an identical, private loopback; Ganesha also gets its own
# rpcbind and a tmpfs /run there, as it refuses to start without rpcbind.
# Both data sets sit on the same filesystem and in the page cache.
#
# fio's nfs engine opens files without O_SYNC even with --sync=1, so writes
# are always UNSTABLE. The script builds a copy of fio with a one-line patch
# that passes O_SYNC when --sync=1 (libnfs then sends FILE_SYNC writes).
#
# Environment: BENCH_RUNTIME (seconds per fio run, default 4), BENCH_REPEAT
# (runs per line, default 3; the table shows median and range), BENCH_DIR (work
# folder, default /var/tmp/revive-bench), BENCH_MD (report, default
# docs/bench-nfs.md; empty: do not write), BENCH_SKIP_BUILD=1 (use the
# existing release binary), BENCH_LINES (space-separated subset of: cold1
# cold16 seqread warm1 warm16 syncwrite seqwrite; default all. A warm line
# without seqread warms the block cache with an unmeasured sequential read).
#
# Exit status: 0 on success, 1 when a peer fails to start or a job fails.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${BENCH_RUNTIME:-4}
REPEAT=${BENCH_REPEAT:-3}
WORK=${BENCH_DIR:-/var/tmp/revive-bench}
MD=${BENCH_MD-$ROOT/docs/bench-nfs.md}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
REVIVE=$TARGET/release/revive
CMDLINE="${BENCH_RUNTIME:+BENCH_RUNTIME=$BENCH_RUNTIME }${BENCH_REPEAT:+BENCH_REPEAT=$BENCH_REPEAT }${BENCH_LINES:+BENCH_LINES=\"$BENCH_LINES\" }scripts/bench-nfs.sh"
NFS_PORT=2049
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
MOUNT_PORT=20048

log() { echo "bench: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# ---------------------------------------------------------------- tools --
install_peers() {
    local missing=()
    for p in nfs-ganesha nfs-ganesha-vfs rpcbind iproute2 util-linux; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
    # The packages may start host-wide daemons on systems with an init; the
    # benchmark uses only its own, inside namespaces.
}

# fio with the nfs engine, patched to open with O_SYNC when --sync=1.
build_fio() {
    local base dir
    base=$("$ROOT/scripts/build-fio-nfs.sh")
    dir=${FIO_SYNC_DIR:-/var/tmp/revive-fio-sync}
    if [ ! -x "$dir/fio" ] || ! grep -q 'sync_io' "$dir/engines/nfs.c"; then
        log "building fio with O_SYNC support in the nfs engine ($dir)"
        rm -rf "$dir"
        cp -a "$(dirname "$base")" "$dir"
        sed -i 's/^\tret = nfs_open(options->context, f->file_name, flags,/\tif (td->o.sync_io)\n\t\tflags |= O_SYNC;\n&/' \
            "$dir/engines/nfs.c"
        grep -q 'sync_io' "$dir/engines/nfs.c" || die "patching fio's nfs engine failed"
        make -C "$dir" -j2 >&2
    fi
    FIO=$dir/fio
}

# ----------------------------------------------------------- namespaces --
# Starts `bash -c "$1"` as pid 1 of new net+mount+pid namespaces; sets NS to
# "UNSHARE_PID PID1_HOST_PID" (the second is the nsenter target). When pid 1
# exits, the kernel kills everything else in its pid namespace: nothing is
# left behind.
start_ns() {
    local script=$1 log=$2 upid child="" i
    unshare --net --mount --pid --fork --mount-proc --propagation private \
        bash -c "$script" >"$log" 2>&1 &
    upid=$!
    for i in $(seq 50); do
        child=$(cat "/proc/$upid/task/$upid/children" 2>/dev/null | awk '{print $1}')
        [ -n "$child" ] && break
        sleep 0.1
    done
    [ -n "$child" ] || die "namespace did not start (see $log)"
    NS="$upid $child"
}

stop_ns() {
    local upid=$1 child=$2
    kill -TERM "$child" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$upid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$child" 2>/dev/null || true
    wait "$upid" 2>/dev/null || true
}

# Waits until something accepts TCP on 127.0.0.1:$2 inside namespace $1.
wait_port() {
    local ns=$1 port=$2 what=$3 i
    for i in $(seq 300); do
        if nsenter -t "$ns" -n bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; then
            return 0
        fi
        kill -0 "$ns" 2>/dev/null || return 1
        sleep 0.1
    done
    log "$what: nothing listens on port $port after 30 s"
    return 1
}

REVIVE_NS=""
GANESHA_NS=""
cleanup() {
    set +e
    [ -n "$REVIVE_NS" ] && stop_ns $REVIVE_NS
    [ -n "$GANESHA_NS" ] && stop_ns $GANESHA_NS
    REVIVE_NS=""
    GANESHA_NS=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- peers --
start_revive() {
    local ns
    start_ns "ip link set lo up && exec '$REVIVE' serve --config '$WORK/revive.toml' --repo '$WORK/repo'" \
        "$WORK/revive.log"
    REVIVE_NS=$NS
    ns=${REVIVE_NS#* }
    if ! wait_port "$ns" $NFS_PORT revive; then
        cat "$WORK/revive.log" >&2
        die "revive failed to start"
    fi
    REVIVE_PID=$ns
}

stop_revive() {
    stop_ns $REVIVE_NS
    REVIVE_NS=""
}

start_ganesha() {
    local ns
    start_ns "set -e
        ip link set lo up
        mount -t tmpfs tmpfs /run
        mkdir -p /run/rpcbind /run/ganesha /var/lib/nfs/ganesha
        rpcbind -f &
        for i in \$(seq 50); do [ -S /run/rpcbind.sock ] && break; sleep 0.1; done
        ganesha.nfsd -F -f '$WORK/ganesha.conf' -L /dev/stderr -p /run/ganesha/ganesha.pid -N NIV_EVENT &
        wait -n
        echo 'a peer exited' >&2" "$WORK/ganesha.log"
    GANESHA_NS=$NS
    ns=${GANESHA_NS#* }
    if ! wait_port "$ns" $NFS_PORT ganesha || ! wait_port "$ns" $MOUNT_PORT ganesha-mount; then
        cat "$WORK/ganesha.log" >&2
        die "NFS-Ganesha failed to start"
    fi
    GANESHA_PID=$ns
}

# ------------------------------------------------------------------ fio --
# run_fio NSPID URL FILE ARGS...: prints "read_iops read_kibs write_iops write_kibs".
#
# fio's nfs engine sometimes never finishes its unmount after a 1 MiB
# sequential read (the job's I/O is over by then; libnfs gets the reply to
# its NULL ping and never sends the UMNT, see docs/bench-nfs.md), so
# fio prints cumulative terse stats every second and the last line before
# the run's end is used; a fio that is still there 10 s after its run time
# is killed.
run_fio() {
    local ns=$1 url=$2 file=$3 out
    shift 3
    # Own process group (setsid), so a hung fio job process is killed too.
    setsid timeout -s INT -k 3 $((RUNTIME + 10)) nsenter -t "$ns" -n stdbuf -oL "$FIO" --name=bench --ioengine=nfs \
        "--nfs_url=$url" "--filename=$file" --size=256m --time_based "--runtime=$RUNTIME" \
        --randrepeat=0 --output-format=terse --terse-version=3 --status-interval=1 "$@" \
        >"$WORK/fio.out" 2>"$WORK/fio.err" &
    local pid=$!
    wait "$pid" || true
    kill -KILL -- "-$pid" 2>/dev/null || true
    out=$(grep '^3;' "$WORK/fio.out" | tail -n1)
    if [ -z "$out" ]; then
        cat "$WORK/fio.err" >&2
        die "fio failed: $*"
    fi
    # terse v3: 7/8 read KiB/s and IOPS, 48/49 write KiB/s and IOPS.
    echo "$out" | awk -F';' '{print $8, $7, $49, $48}'
}

# ---------------------------------------------------------------- setup --
install_peers
build_fio
if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release >&2)
fi
[ -x "$REVIVE" ] || die "no release binary at $REVIVE"

rm -rf "$WORK"
mkdir -p "$WORK/ganesha" "$WORK/src"
log "making a 256 MiB disk of mixed data"
# Per MiB, in a repeating pattern of 8: random (3), compressible text (2),
# zeros (1), a duplicate of an earlier random MiB (2). Deterministic enough;
# the exact bytes do not matter. (No pipefail here: `head` closes the pipe.)
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
cp "$WORK/src/disk.img" "$WORK/ganesha/disk.img"

"$REVIVE" init --repo "$WORK/repo" >&2
"$REVIVE" backup --repo "$WORK/repo" --name disk "$WORK/src/disk.img" >&2
REPO_BYTES=$(du -sb "$WORK/repo" | awk '{print $1}')

cat >"$WORK/revive.toml" <<EOF
[datastore]
state_dir = "$WORK/state"
cache_root = "$WORK/cache"
block_cache = "256MiB"

[nfs]
bind = "127.0.0.1"
nfs_port = $NFS_PORT
mount_port = $MOUNT_PORT
portmap = false

[[export]]
path = "/revive"
allowed_clients = ["127.0.0.1"]

[[publication]]
name = "bench"
point = "disk@latest"
EOF

cat >"$WORK/ganesha.conf" <<EOF
NFS_CORE_PARAM {
    Protocols = 3;
    NFS_Port = $NFS_PORT;
    MNT_Port = $MOUNT_PORT;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Mount_Path_Pseudo = true;
}
NFSV4 { Graceless = true; }
EXPORT {
    Export_Id = 1;
    Path = "$WORK/ganesha";
    Pseudo = "/export";
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3;
    Transports = TCP;
    FSAL { Name = VFS; }
}
LOG { Default_Log_Level = EVENT; }
EOF

REVIVE_URL="nfs://127.0.0.1/revive?nfsport=$NFS_PORT&mountport=$MOUNT_PORT"
REVIVE_FILE=/bench/disk.img
GANESHA_URL="nfs://127.0.0.1/export?nfsport=$NFS_PORT&mountport=$MOUNT_PORT"
GANESHA_FILE=/disk.img

start_ganesha
log "ganesha up"

# ------------------------------------------------------------------ run --
# Each line: label, unit, and fio arguments. Revive is restarted (empty block
# cache) before each "cold" line; the 1 MiB sequential read then warms it.
RANDREAD1=(--rw=randread --bs=4k --iodepth=1)
RANDREAD16=(--rw=randread --bs=4k --iodepth=16)
SEQREAD=(--rw=read --bs=1m --iodepth=4)
SYNCWRITE=(--rw=randwrite --bs=4k --iodepth=16 --sync=1)
SEQWRITE=(--rw=write --bs=1m --iodepth=4)

RESULTS=()
# Median and range of numbers on stdin: "median min max".
stats() { sort -g | awk '{v[NR]=$1} END {printf "%s %s %s", v[int((NR+1)/2)], v[1], v[NR]}'; }

# measure LABEL UNIT(iops|mibs) DIR(read|write) COLD(0|1) ARGS...
# Runs revive then Ganesha, REPEAT times; the ratio of each repeat compares
# two runs a few seconds apart, which cancels most of the machine's noise.
measure() {
    local label=$1 unit=$2 dir=$3 cold=$4 i r g rv gv rvs="" gvs="" ratios=""
    shift 4
    pick() {
        # $1: "riops rkib wiops wkib"
        set -- $1
        case "$dir/$unit" in
        read/iops) echo "$1" ;;
        read/mibs) awk -v k="$2" 'BEGIN{printf "%.0f", k/1024}' ;;
        write/iops) echo "$3" ;;
        write/mibs) awk -v k="$4" 'BEGIN{printf "%.0f", k/1024}' ;;
        esac
    }
    for i in $(seq "$REPEAT"); do
        if [ "$cold" = 1 ]; then
            stop_revive
            start_revive
        fi
        r=$(run_fio "$REVIVE_PID" "$REVIVE_URL" "$REVIVE_FILE" "$@")
        g=$(run_fio "$GANESHA_PID" "$GANESHA_URL" "$GANESHA_FILE" "$@")
        rv=$(pick "$r")
        gv=$(pick "$g")
        log "$label [$i/$REPEAT]: revive $rv, ganesha $gv ($unit)"
        rvs+="$rv"$'\n'
        gvs+="$gv"$'\n'
        ratios+=$(awk -v a="$rv" -v b="$gv" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print 0 }')$'\n'
    done
    RESULTS+=("$label|$unit|$(printf %s "$rvs" | stats)|$(printf %s "$gvs" | stats)|$(printf %s "$ratios" | stats)")
}

LINES=" ${BENCH_LINES:-cold1 cold16 seqread warm1 warm16 syncwrite seqwrite} "
want() { [[ "$LINES" == *" $1 "* ]]; }

start_revive
want cold1 && measure "4 KiB random read, qd1, cold block cache" iops read 1 "${RANDREAD1[@]}"
want cold16 && measure "4 KiB random read, qd16, cold block cache" iops read 1 "${RANDREAD16[@]}"
if want seqread; then
    measure "1 MiB sequential read, qd4" mibs read 0 "${SEQREAD[@]}"
elif want warm1 || want warm16; then
    log "warming revive's block cache"
    run_fio "$REVIVE_PID" "$REVIVE_URL" "$REVIVE_FILE" "${SEQREAD[@]}" >/dev/null
fi
want warm1 && measure "4 KiB random read, qd1, warm block cache" iops read 0 "${RANDREAD1[@]}"
want warm16 && measure "4 KiB random read, qd16, warm block cache" iops read 0 "${RANDREAD16[@]}"
want syncwrite && measure "4 KiB random write, FILE_SYNC, qd16" iops write 0 "${SYNCWRITE[@]}"
want seqwrite && measure "1 MiB sequential write, qd4" mibs write 0 "${SEQWRITE[@]}"
cleanup

# --------------------------------------------------------------- report --
# Cells: median, and the range over the repeats when there are several.
cell() {
    # $1 median $2 min $3 max $4 unit suffix
    if [ "$REPEAT" -gt 1 ]; then
        echo "$1$4 ($2-$3)"
    else
        echo "$1$4"
    fi
}
table() {
    echo "| workload (fio nfs engine, 256 MiB file, ${RUNTIME} s per run, median of $REPEAT) | revive | NFS-Ganesha 4.3 | revive / Ganesha |"
    echo "|---|---:|---:|---:|"
    local line label unit r g q u
    for line in "${RESULTS[@]}"; do
        IFS='|' read -r label unit r g q <<<"$line"
        u=" IOPS"
        [ "$unit" = mibs ] && u=" MiB/s"
        # shellcheck disable=SC2086
        echo "| $label | $(cell $r "$u") | $(cell $g "$u") | $(cell $q x) |"
    done
}

TABLE=$(table)
echo "$TABLE"

if [ -n "$MD" ]; then
    GANESHA_VERSION=$(dpkg-query -W -f '${Version}' nfs-ganesha)
    CPU=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
    cat >"$MD" <<EOF
# NFS benchmark: revive vs NFS-Ganesha

Produced by \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC'), revive \`$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)\`.

Machine: $(nproc) cores ($CPU), $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r); load average before the run: $LOAD_BEFORE.
fio 3.33 (nfs engine, libnfs $(dpkg-query -W -f '${Version}' libnfs13 2>/dev/null)), NFS-Ganesha $GANESHA_VERSION (FSAL VFS).

$TABLE

- Same machine, one run: each line runs revive then Ganesha, $REPEAT times; cells show the median and (range). The ratio column is the median of the per-repeat ratios (two runs seconds apart), less noisy than the absolute figures. fio and the server share the $(nproc) cores with whatever else runs, so absolute figures are noisy.
- Each server runs in its own private network namespace and fio is entered into it: both are reached over an identical loopback.
- revive serves restore point \`disk@latest\` of a 256 MiB disk (3/8 random, 2/8 compressible text, 1/8 zeros, 2/8 duplicates) from its deduplicated repository ($((REPO_BYTES >> 20)) MiB on disk), 1 MiB chunks, zstd, BLAKE3-verified when they enter the 256 MiB block cache; writes go to the write cache on the same ext4 filesystem. Ganesha serves the same bytes as a plain file there. Both data sets are in the page cache.
- "cold" lines restart revive before every run (empty block cache); the cache fills while the job runs (256 chunk misses of about 1 ms each, decompress and BLAKE3 verify). The sequential read then loads every chunk, so the "warm" lines read only memory. Ganesha's cold and warm lines are the same workload run twice.
- FILE_SYNC: fio's nfs engine ignores \`--sync=1\`; the script patches it to open with O_SYNC, so libnfs sends every WRITE as FILE_SYNC (revive: the write's journal record fsynced before the reply, concurrent writes share one journal sync; data file and bitmap catch up in checkpoints). Repeats after the first rewrite some blocks already in revive's write cache.
EOF
    log "wrote $MD"
fi

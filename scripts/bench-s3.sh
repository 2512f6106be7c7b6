#!/bin/bash
# Benchmark reads over NFS from a repository on S3 (moto on loopback), cold
# and with the local chunk cache warm, next to the same restore point in a
# local-directory repository, in one run, with fio's nfs engine (libnfs).
#
#   scripts/bench-s3.sh             # prints the table, writes docs/bench-s3.md
#
# Everything (moto, three `revive serve`, fio) runs inside one private network
# namespace (the script re-runs itself under `unshare --net`), so nothing binds
# a host port. Each measurement restarts revive, so its in-memory block cache
# is empty and only the store, or the on-disk chunk cache, can answer:
#   local      the repository in a folder (page cache warm after the first run)
#   s3 cold    S3 repository, no chunk cache: every chunk is a GET to moto
#   s3 warm    S3 repository, chunk cache filled beforehand (a full read), then
#              revive restarted: chunks come from local disk, not from moto
#
# Environment: BENCH_RUNTIME (seconds per fio run, default 3), BENCH_BLOCK_CACHE
# (revive's in-memory block cache, default 16MiB), BENCH_DIR (work
# folder, default /var/tmp/revive-bench-s3), BENCH_MD (report, default
# docs/bench-s3.md; empty: do not write), BENCH_PROFILE (cargo profile of the
# revive binary, default release), BENCH_SKIP_BUILD=1 (use the existing
# binary), FIO_NFS (fio with the nfs engine; default: scripts/build-fio-nfs.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNTIME=${BENCH_RUNTIME:-3}
WORK=${BENCH_DIR:-/var/tmp/revive-bench-s3}
MD=${BENCH_MD-$ROOT/docs/bench-s3.md}
PROFILE=${BENCH_PROFILE:-release}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$PROFILE" in
dev | debug) REVIVE=$TARGET/debug/revive ;;
*) REVIVE=$TARGET/$PROFILE/revive ;;
esac
# The in-memory block cache is kept far below the 256 MiB disk: a 3 s job
# reads the disk several times over, and a cache holding all of it would
# measure memory after the first pass instead of the store behind it.
BLOCK_CACHE=${BENCH_BLOCK_CACHE:-16MiB}
MOTO_PORT=5000
NFS_PORT=2049

log() { echo "bench-s3: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# ------------------------------------------------------- outside: setup --
if [ -z "${BENCH_S3_INNER:-}" ]; then
    command -v moto_server >/dev/null || die "moto_server missing: run scripts/install-test-deps.sh"
    FIO_NFS=${FIO_NFS:-$("$ROOT/scripts/build-fio-nfs.sh")}
    [ -x "$FIO_NFS" ] || die "no fio with the nfs engine"
    if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
        log "cargo build --profile $PROFILE"
        (cd "$ROOT" && cargo build --locked --profile "$PROFILE" >&2)
    fi
    [ -x "$REVIVE" ] || die "no revive binary at $REVIVE"
    export FIO_NFS REVIVE BENCH_S3_INNER=1
    exec unshare --net -- "$0" "$@"
fi

# ------------------------------------------------ inside the namespace --
ip link set lo up
export AWS_ENDPOINT_URL=http://127.0.0.1:$MOTO_PORT AWS_ACCESS_KEY_ID=bench \
    AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
    local port=$1 i
    for i in $(seq 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

rm -rf "$WORK"
mkdir -p "$WORK/src"
moto_server -H 127.0.0.1 -p $MOTO_PORT >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_port $MOTO_PORT || die "moto did not start"
python3 -c "import urllib.request as u; u.urlopen(u.Request('$AWS_ENDPOINT_URL/bench', method='PUT'))"

log "making a 256 MiB disk of mixed data"
# Per MiB, in a repeating pattern of 8: random (3), compressible text (2),
# zeros (1), a duplicate of an earlier random MiB (2), as scripts/bench-nfs.sh.
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

S3_URL=s3://bench/repo
"$REVIVE" init --repo "$WORK/repo" >&2
"$REVIVE" backup --repo "$WORK/repo" --name disk "$WORK/src/disk.img" >&2
"$REVIVE" init --repo "$S3_URL" >&2
"$REVIVE" backup --repo "$S3_URL" --name disk "$WORK/src/disk.img" >&2

# write_config NAME REPO_LINES
write_config() {
    cat >"$WORK/$1.toml" <<EOF
[repository]
$2

[datastore]
state_dir = "$WORK/$1/state"
cache_root = "$WORK/$1/cache"
block_cache = "$BLOCK_CACHE"

[nfs]
bind = "127.0.0.1"
nfs_port = $NFS_PORT
mount_port = $NFS_PORT
portmap = false

[[export]]
path = "/revive"
allowed_clients = ["127.0.0.1"]

[[publication]]
name = "bench"
point = "disk@latest"
EOF
}
write_config local "path = \"$WORK/repo\""
write_config s3cold "url = \"$S3_URL\""
write_config s3warm "url = \"$S3_URL\"
chunk_cache_dir = \"$WORK/chunk-cache\"
chunk_cache_bytes = \"1GiB\""

SERVER=""
start_revive() {
    "$REVIVE" serve --config "$WORK/$1.toml" >"$WORK/$1.out" 2>>"$WORK/$1.log" &
    SERVER=$!
    PIDS+=("$SERVER")
    wait_port $NFS_PORT || { cat "$WORK/$1.log" >&2; die "revive ($1) did not start"; }
}
stop_revive() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
}

URL="nfs://127.0.0.1/revive?nfsport=$NFS_PORT&mountport=$NFS_PORT"
FILE=/bench/disk.img
# run_fio ARGS...: prints "read_iops read_kibs" (fio terse v3 fields 8 and 7).
# fio's nfs engine may hang in its final UMNT; stats are printed every second
# and the last line is used (see scripts/bench-nfs.sh).
run_fio() {
    setsid timeout -s INT -k 3 $((RUNTIME + 10)) stdbuf -oL "$FIO_NFS" --name=bench --ioengine=nfs \
        "--nfs_url=$URL" "--filename=$FILE" --size=256m --time_based "--runtime=$RUNTIME" \
        --randrepeat=0 --output-format=terse --terse-version=3 --status-interval=1 "$@" \
        >"$WORK/fio.out" 2>"$WORK/fio.err" &
    local pid=$!
    wait "$pid" || true
    kill -KILL -- "-$pid" 2>/dev/null || true
    local out
    out=$(grep '^3;' "$WORK/fio.out" | tail -n1)
    [ -n "$out" ] || { cat "$WORK/fio.err" >&2; die "fio failed: $*"; }
    echo "$out" | awk -F';' '{print $8, $7}'
}

SEQ=(--rw=read --bs=1m --iodepth=4)
RAND=(--rw=randread --bs=4k --iodepth=16)
declare -A RESULT
# measure CONFIG: both jobs, each on a freshly started revive.
measure() {
    local cfg=$1 r
    start_revive "$cfg"
    r=$(run_fio "${SEQ[@]}")
    RESULT[$cfg/seq]=$(echo "$r" | awk '{printf "%.0f", $2/1024}')
    stop_revive
    start_revive "$cfg"
    r=$(run_fio "${RAND[@]}")
    RESULT[$cfg/rand]=$(echo "$r" | awk '{print $1}')
    stop_revive
    log "$cfg: ${RESULT[$cfg/seq]} MiB/s sequential, ${RESULT[$cfg/rand]} IOPS random"
}

measure local
measure s3cold
# Fill the chunk cache with one full sequential pass, then measure with an
# empty block cache and a warm chunk cache.
start_revive s3warm
timeout 120 nfs-cat "nfs://127.0.0.1/revive/bench/disk.img?nfsport=$NFS_PORT&mountport=$NFS_PORT" >/dev/null 2>&1 ||
    run_fio --rw=read --bs=1m --iodepth=4 >/dev/null
stop_revive
sleep 1 # the chunk cache is written behind the reads
CACHED=$(du -sb "$WORK/chunk-cache" | awk '{print $1}')
measure s3warm

TABLE=$(
    echo "| repository | 1 MiB sequential read, QD 4 | 4 KiB random read, QD 16 |"
    echo "|---|---|---|"
    echo "| local directory | ${RESULT[local/seq]} MiB/s | ${RESULT[local/rand]} IOPS |"
    echo "| S3 (moto), cold | ${RESULT[s3cold/seq]} MiB/s | ${RESULT[s3cold/rand]} IOPS |"
    echo "| S3 (moto), chunk cache warm | ${RESULT[s3warm/seq]} MiB/s | ${RESULT[s3warm/rand]} IOPS |"
)
echo "$TABLE"
if [ -n "$MD" ]; then
    cat >"$MD" <<EOF
# NFS reads from an S3 repository

Produced by \`scripts/bench-s3.sh\` (BENCH_RUNTIME=$RUNTIME, revive built with profile \`$PROFILE\`) on $(date -u '+%Y-%m-%d %H:%M UTC'), revive \`$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)\`.
Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, load before the run $(cut -d' ' -f1-3 /proc/loadavg); shared with other work, so figures are noisy.
moto $({ /opt/revive-venv/bin/python -c 'import moto; print(moto.__version__)' || python3 -c 'import moto; print(moto.__version__)'; } 2>/dev/null || echo '(version unknown)') on loopback; fio 3.33 nfs engine (libnfs).

$TABLE

- One 256 MiB disk of mixed data (3/8 random, 2/8 compressible, 1/8 zeros, 2/8 duplicates), 1 MiB chunks, backed up into both repositories.
- Each job (${RUNTIME} s) runs against a freshly started \`revive serve\` whose in-memory block cache is empty and small ($BLOCK_CACHE): a job reads the disk several times over, so nearly every chunk it touches comes from the repository's store (or the chunk cache), not from memory.
- "cold": no chunk cache; every chunk the job touches is a GET from moto (a Python server: its per-request cost dominates).
- "chunk cache warm": the on-disk chunk cache ($((CACHED >> 20)) MiB after one full read) survives the restart and answers instead of moto.
- "local directory": chunks are files; the page cache is warm.
EOF
    log "wrote $MD"
fi

#!/bin/sh
# A single-host Ceph cluster for the RBD snapshot tests and benchmark: one
# monitor and one OSD whose object store lives in memory (memstore), both on
# 127.0.0.1, one pool "rbd". Debian's ceph 16 packages. cephx is on (the
# admin key is in the folder, named by ceph.conf): with authentication off,
# the ceph CLI intermittently got EPERM fetching command descriptions.
#
#   scripts/ceph-single-host.sh [start]  -> prints the ceph.conf path (reuses a running cluster)
#   scripts/ceph-single-host.sh stop     -> stops it (its data is gone: it lived in memory)
#   scripts/ceph-single-host.sh status   -> exit 0 when it answers
#
# Installed once and started once: packages are installed only when missing,
# and a cluster that already answers is reused (its images survive between
# test runs until it stops). A fresh start takes ~10 s; the OSD holds at most
# REVIVE_CEPH_MEMORY bytes of data (default 2 GiB), ~3 GiB of memory in all.
# Daemons detach: start this outside any pid namespace a test kills.
# Ports: monitor 127.0.0.1:$REVIVE_CEPH_PORT (default 16789), daemons
# 16800-16900, away from a real cluster's 6789 and 6800-7300.
set -eu
export DEBIAN_FRONTEND=noninteractive

DIR=${REVIVE_CEPH_DIR:-/var/tmp/revive-ceph}
PORT=${REVIVE_CEPH_PORT:-16789}
MEMORY=${REVIVE_CEPH_MEMORY:-2147483648}
CONF=$DIR/ceph.conf
ACTION=${1:-start}

have() { command -v "$1" >/dev/null 2>&1; }

# Answers, and takes writes: memstore's space accounting can go wrong after
# many snapshots and clones are removed (the OSD then reports itself "full",
# "-2147483648% full" in its log, and every write hangs), so a full cluster
# counts as down and is replaced by a fresh one.
answers() {
    [ -f "$CONF" ] || return 1
    health=$(timeout 15 ceph -c "$CONF" health 2>/dev/null) || return 1
    case "$health" in *full*) return 1 ;; esac
    timeout 15 rbd -c "$CONF" ls -p rbd >/dev/null 2>&1
}

stop() {
    for pid in "$DIR"/run/*.pid; do
        [ -f "$pid" ] || continue
        kill "$(cat "$pid")" 2>/dev/null || true
        rm -f "$pid"
    done
    # Give them a moment to release their ports.
    i=0
    while [ $i -lt 20 ] && pgrep -f "ceph-(mon|osd) -c $CONF" >/dev/null 2>&1; do
        sleep 0.5
        i=$((i + 1))
    done
}

case "$ACTION" in
status)
    answers
    exit $?
    ;;
stop)
    stop
    exit 0
    ;;
start) ;;
*)
    echo "usage: $0 [start|stop|status]" >&2
    exit 2
    ;;
esac

if ! have ceph-mon || ! have ceph-osd || ! have rbd || ! have monmaptool; then
    apt-get update >&2
    apt-get install -y --no-install-recommends ceph-mon ceph-osd ceph-common >&2
fi

if answers; then
    echo "$CONF"
    exit 0
fi

stop
rm -rf "$DIR"
mkdir -p "$DIR/run" "$DIR/log" "$DIR/mon/mon.a" "$DIR/osd/osd.0"
FSID=$(cat /proc/sys/kernel/random/uuid)
cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon_host = v1:127.0.0.1:$PORT
public_addr = 127.0.0.1
ms_bind_port_min = 16800
ms_bind_port_max = 16900
keyring = $DIR/keyring
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
# A test cluster on a shared disk: a full disk must not stop the monitor.
mon_data_avail_warn = 1
mon_data_avail_crit = 0
osd_crush_chooseleaf_type = 0
osd_objectstore = memstore
memstore_device_bytes = $MEMORY
run_dir = $DIR/run
log_file = $DIR/log/\$name.log
mon_data = $DIR/mon/\$name
osd_data = $DIR/osd/\$name

# Daemons only: every client (rbd, QEMU) gets admin sockets of its own.
[mon]
admin_socket = $DIR/run/\$name.asok
pid_file = $DIR/run/\$name.pid

[osd]
admin_socket = $DIR/run/\$name.asok
pid_file = $DIR/run/\$name.pid
keyring = $DIR/osd/\$name/keyring
EOF

monmaptool --create --add a "v1:127.0.0.1:$PORT" --fsid "$FSID" "$DIR/monmap" >/dev/null
ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring"
ceph-mon -c "$CONF" -i a 2>>"$DIR/log/start.log"
OSD_ID=$(timeout 60 ceph -c "$CONF" osd create)
mkdir -p "$DIR/osd/osd.$OSD_ID"
ceph-osd -c "$CONF" -i "$OSD_ID" --no-mon-config --mkfs --mkkey --osd-uuid "$(cat /proc/sys/kernel/random/uuid)" 2>"$DIR/log/osd-mkfs.log"
timeout 60 ceph -c "$CONF" auth add "osd.$OSD_ID" osd 'allow *' mon 'allow profile osd' \
    -i "$DIR/osd/osd.$OSD_ID/keyring" >/dev/null 2>&1
ceph-osd -c "$CONF" -i "$OSD_ID" 2>>"$DIR/log/start.log"
i=0
until timeout 10 ceph -c "$CONF" osd stat 2>/dev/null | grep -q "1 up"; do
    i=$((i + 1))
    if [ $i -gt 60 ]; then
        echo "ceph-single-host: the OSD did not come up; see $DIR/log" >&2
        exit 1
    fi
    sleep 0.5
done
timeout 60 ceph -c "$CONF" osd pool create rbd 8 >/dev/null 2>&1
timeout 60 rbd -c "$CONF" pool init rbd
if ! answers; then
    echo "ceph-single-host: the cluster does not answer; see $DIR/log" >&2
    exit 1
fi
echo "$CONF"

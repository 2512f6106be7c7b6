#!/bin/sh
# Install the peers the integration tests drive (Debian 12 bookworm, root).
# Idempotent: installs only what is missing.
#   libnfs-utils      nfs-ls, nfs-cat, nfs-cp   (tests/integration/nfs_proto.rs)
#   qemu-utils +      qemu-img with the nfs     (tests/integration/nfs_proto/qemu.rs;
#   qemu-block-extra  block driver                only in bookworm-backports)
#   util-linux, iproute2: unshare, ip           (private network namespace for port 111)
#   qemu-system-x86   (bookworm-backports, the   (tests/integration/qemu.rs: a tiny VM boots
#                     same QEMU as qemu-block-extra)  from the datastore, scripts/bench-boot.sh)
#   busybox-static, syslinux, mtools, dosfstools, cpio: scripts/build-boot-image.sh,
#                                                which this script runs to build the tiny VM
#   python3                                     (scripts/demo.sh makes its sample VM with it)
#   moto_server       S3 peer on loopback       (tests/integration/s3.rs): pip, in the venv
#                                                 /opt/revive-venv (Debian 12's Python is
#                                                 externally managed, PEP 668), linked
#                                                 into /usr/local/bin
#   golang-go + golang-github-vmware-govmomi-dev  vcsim, built by scripts/build-vcsim.sh
#                                               (tests/integration/vsphere.rs; VCSIM=<binary>)
#   libnbd-bin        nbdinfo, nbdcopy, nbdfuse  (tests/integration/nbd.rs)
#   fuse3, e2fsprogs  fusermount3, mkfs.ext4     (nbdfuse + loop mount of an ext4 image)
#   nbdkit, fio       reference NBD server and fio's nbd engine (scripts/bench-block.sh)
#   libiscsi-bin      iscsi-test-cu, iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-perf
#                                               (tests/integration/iscsi.rs); QEMU's iscsi
#                                               driver is in qemu-block-extra (above)
#   tgt               tgtd, the reference iSCSI target (conformance comparison,
#                                               scripts/bench-iscsi.sh)
#   chromium, chromium-driver, fonts-dejavu-core  headless browser for the web console
#                                               (tests/integration/web.rs), driven by
#   selenium          (pip, in /opt/revive-venv)  Selenium through Debian's chromedriver
#                                                 (never a browser downloaded by a tool)
#   postgresql-15     initdb, pg_ctl, pg_basebackup, pg_verifybackup, psql in
#                     /usr/lib/postgresql/15/bin   (tests/integration/trees/postgres.rs);
#                     installed without the default cluster (create_main_cluster = false),
#                     so nothing listens on 5432: tests start their own clusters
#   btrfs-progs       mkfs.btrfs, btrfs         (tests/integration/snapshots.rs: a btrfs file
#                                                system on a loop device, its snapshots and clones)
#   ceph-mon, ceph-osd, ceph-common (rbd)       (tests/integration/snapshots/boot.rs: RBD clones;
#                                                ~51 packages, ~51 MB; the cluster itself is
#                                                started by scripts/ceph-single-host.sh)
set -eu
export DEBIAN_FRONTEND=noninteractive

have() { command -v "$1" >/dev/null 2>&1; }
qemu_nfs() { have qemu-img && qemu-img --help 2>/dev/null | grep -qw nfs; }
nbd_tools() { have nbdinfo && have nbdcopy && have nbdfuse && have nbdkit && have fio \
    && have fusermount3 && have mkfs.ext4; }
iscsi_tools() { have iscsi-test-cu && have iscsi-inq && have iscsi-ls && have iscsi-readcapacity16 \
    && have tgtd && have tgtadm && have qemu-storage-daemon; }
boot_tools() { have busybox && have syslinux && have mcopy && have mkfs.fat && have cpio \
    && dpkg -s busybox-static >/dev/null 2>&1; }

BACKPORTS=/etc/apt/sources.list.d/revive-backports.sources
if { ! qemu_nfs || ! have qemu-system-x86_64; } && [ ! -e "$BACKPORTS" ]; then
    cat >"$BACKPORTS" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

VENV=/opt/revive-venv
install_moto() {
    have moto_server && return 0
    if [ ! -x "$VENV/bin/pip" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet 'moto[s3,server]'
    ln -sf "$VENV/bin/moto_server" /usr/local/bin/moto_server
}
have_selenium() { [ -x "$VENV/bin/python3" ] && "$VENV/bin/python3" -c 'import selenium' 2>/dev/null; }
install_selenium() {
    have_selenium && return 0
    if [ ! -x "$VENV/bin/pip" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install --quiet 'selenium>=4.11,<5'
}
browser() { have chromium && have chromedriver && [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; }

PG_BIN=/usr/lib/postgresql/15/bin
have_pg() { [ -x "$PG_BIN/pg_verifybackup" ] && [ -x "$PG_BIN/initdb" ] && [ -x "$PG_BIN/psql" ]; }
install_postgres() {
    have_pg && return 0
    apt-get install -y --no-install-recommends postgresql-common
    sed -ri 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf
    apt-get install -y --no-install-recommends postgresql-15
}

HERE=$(dirname "$0")

# vcsim first: it installs its own packages, and is a no-op when built.
"$HERE/build-vcsim.sh" >/dev/null

snapshot_tools() { have mkfs.btrfs && have btrfs && have ceph-mon && have ceph-osd && have rbd; }

if have nfs-ls && have nfs-cat && have nfs-cp && qemu_nfs && have unshare && have ip && have python3 \
    && have moto_server && have qemu-system-x86_64 && boot_tools && nbd_tools && iscsi_tools && browser \
    && have_selenium && have_pg && snapshot_tools; then
    "$HERE/build-boot-image.sh" >/dev/null
    echo "install-test-deps: everything already installed"
    exit 0
fi

apt-get update
apt-get install -y --no-install-recommends libnfs-utils util-linux iproute2 python3 python3-venv
apt-get install -y --no-install-recommends busybox-static syslinux syslinux-common mtools dosfstools cpio
apt-get install -y --no-install-recommends libnbd-bin nbdkit fio fuse3 e2fsprogs
apt-get install -y --no-install-recommends libiscsi-bin tgt
apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core
apt-get install -y --no-install-recommends btrfs-progs ceph-mon ceph-osd ceph-common
if ! qemu_nfs || ! have qemu-system-x86_64; then
    apt-get install -y --no-install-recommends -t bookworm-backports qemu-utils qemu-block-extra \
        qemu-system-x86
fi
install_moto
install_selenium
install_postgres
"$HERE/build-boot-image.sh" >/dev/null
echo "install-test-deps: done"

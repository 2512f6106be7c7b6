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
#   btrfs-progs       mkfs.btrfs, btrfs         (tests/integration/snapshots.rs: a btrfs file
#                                                system on a loop device, its snapshots and clones)
#   ceph-mon, ceph-osd, ceph-common (rbd)       (tests/integration/snapshots/boot.rs: RBD clones;
#                                                ~51 packages, ~51 MB; the cluster itself is
#                                                started by scripts/ceph-single-host.sh)
set -eu
export DEBIAN_FRONTEND=noninteractive

have() { command -v "$1" >/dev/null 2>&1; }
qemu_nfs() { have qemu-img && qemu-img --help 2>/dev/null | grep -qw nfs; }
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

HERE=$(dirname "$0")

# vcsim first: it installs its own packages, and is a no-op when built.
"$HERE/build-vcsim.sh" >/dev/null

snapshot_tools() { have mkfs.btrfs && have btrfs && have ceph-mon && have ceph-osd && have rbd; }

if have nfs-ls && have nfs-cat && have nfs-cp && qemu_nfs && have unshare && have ip && have python3 \
    && have moto_server && have qemu-system-x86_64 && boot_tools && snapshot_tools; then
    "$HERE/build-boot-image.sh" >/dev/null
    echo "install-test-deps: everything already installed"
    exit 0
fi

apt-get update
apt-get install -y --no-install-recommends libnfs-utils util-linux iproute2 python3 python3-venv
apt-get install -y --no-install-recommends busybox-static syslinux syslinux-common mtools dosfstools cpio
apt-get install -y --no-install-recommends btrfs-progs ceph-mon ceph-osd ceph-common
if ! qemu_nfs || ! have qemu-system-x86_64; then
    apt-get install -y --no-install-recommends -t bookworm-backports qemu-utils qemu-block-extra \
        qemu-system-x86
fi
install_moto
"$HERE/build-boot-image.sh" >/dev/null
echo "install-test-deps: done"

#!/bin/sh
# Build a tiny bootable VM from Debian packages for the qemu driver's tests
# and scripts/bench-boot.sh (Debian 12, root). Idempotent: the result is
# cached under $REVIVE_BOOT_DIR (default /var/tmp/revive-boot) and rebuilt
# only when this script changes. Prints the VM folder's path.
#
# The VM folder has the shape ESXi stores (what `revive backup` expects):
#   tiny.vmx         memSize = 256
#   tiny.vmdk        VMDK descriptor naming the flat extent
#   tiny-flat.vmdk   64 MiB raw disk: a FAT file system (no partition table)
#                    with syslinux in its boot sector, the Debian kernel, a
#                    busybox-static initramfs and known.bin (4 MiB random)
# and beside it known.sha256 (the hash the guest must print).
#
# The guest's init, on the serial console (ttyS0):
#   REVIVE-GUEST-BOOTED                 the marker, first thing after the kernel
#   REVIVE-KNOWN <sha256 of known.bin>  read from its own disk
#   REVIVE-WROTE w1.bin <sha256>        1 MiB written to its disk, fsynced
#   REVIVE-READY                        now takes commands, one per line:
#     ping        -> pong <n>
#     sync-write  -> REVIVE-WROTE w<n>.bin <sha256>
#     poweroff    -> syncs and powers off
set -eu
export DEBIAN_FRONTEND=noninteractive

OUT=${REVIVE_BOOT_DIR:-/var/tmp/revive-boot}
SELF_HASH=$(sha256sum "$0" | cut -d' ' -f1)
VM="$OUT/tiny"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$SELF_HASH" ] && [ -f "$VM/tiny-flat.vmdk" ]; then
    echo "$VM"
    exit 0
fi

have() { command -v "$1" >/dev/null 2>&1; }
{
    if ! have busybox || ! have syslinux || ! have mcopy || ! have mkfs.fat || ! have cpio \
        || [ ! -e /bin/busybox ] || ! dpkg -s busybox-static >/dev/null 2>&1; then
        apt-get update
        apt-get install -y --no-install-recommends busybox-static syslinux syslinux-common \
            mtools dosfstools cpio
    fi

    WORK="$OUT/work"
    rm -rf "$WORK" "$VM"
    mkdir -p "$WORK/dl" "$VM"
    cd "$WORK/dl"
    # The kernel package linux-image-amd64 points at today.
    KPKG=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[^ ]*\)/\1/p' | head -n1)
    [ -n "$KPKG" ] || { echo "no linux-image package found" >&2; exit 1; }
    # _apt cannot write into a root-only folder; it is a warning, not an error.
    apt-get download "$KPKG"
    dpkg-deb -x ./*.deb kernel
    KVER=$(ls kernel/lib/modules | head -n1)
    MODS=kernel/lib/modules/$KVER/kernel

    # initramfs: busybox-static, the modules for virtio-blk and vfat (in
    # dependency order: no modprobe, no modules.dep), and our init.
    R="$WORK/root"
    mkdir -p "$R/bin" "$R/dev" "$R/proc" "$R/sys" "$R/mnt" "$R/lib/modules"
    cp /bin/busybox "$R/bin/busybox"
    for a in sh mount umount insmod sleep cat cut dd sha256sum sync echo mkdir poweroff ls; do
        ln -sf busybox "$R/bin/$a"
    done
    for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
        virtio_blk fat vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859-1; do
        f=$(find "$MODS" -name "$m.ko" | head -n1)
        [ -n "$f" ] || { echo "module $m missing from $KPKG" >&2; exit 1; }
        cp "$f" "$R/lib/modules/"
        echo "$m" >>"$R/lib/modules/order"
    done
    # The kernel opens /dev/console for init's stdio before devtmpfs exists.
    mknod -m 600 "$R/dev/console" c 5 1
    cat >"$R/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "REVIVE-GUEST-BOOTED"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t vfat /dev/vda /mnt; then
    echo "REVIVE-ERROR cannot mount /dev/vda"
fi
echo "REVIVE-KNOWN $(sha256sum /mnt/known.bin | cut -d' ' -f1)"
n=0
write() {
    n=$((n+1))
    # 1 MiB of fresh bytes, fsynced, then sync for the FAT and directory.
    dd if=/dev/urandom of=/mnt/w$n.bin bs=65536 count=16 conv=fsync 2>/dev/null
    sync
    echo "REVIVE-WROTE w$n.bin $(sha256sum /mnt/w$n.bin | cut -d' ' -f1)"
}
write
echo "REVIVE-READY"
pings=0
while read -r cmd; do
    case "$cmd" in
        ping) pings=$((pings+1)); echo "pong $pings" ;;
        sync-write) write ;;
        poweroff) sync; umount /mnt; poweroff -f ;;
        *) ;;
    esac
done
INIT
    chmod 755 "$R/init"
    (cd "$R" && find . | cpio -o -H newc --quiet | gzip -9) >"$WORK/initrd.img"

    # The disk: FAT over the whole image (no partition table: SeaBIOS loads
    # syslinux's boot sector from sector 0 as it would an MBR).
    DISK="$VM/tiny-flat.vmdk"
    mkfs.fat -C -n REVIVE "$DISK" 65536 >/dev/null
    head -c $((4 * 1024 * 1024)) /dev/urandom >"$WORK/known.bin"
    cat >"$WORK/syslinux.cfg" <<'CFG'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.img console=ttyS0 quiet panic=-1
CFG
    mcopy -i "$DISK" "kernel/boot/vmlinuz-$KVER" ::vmlinuz
    mcopy -i "$DISK" "$WORK/initrd.img" ::initrd.img
    mcopy -i "$DISK" "$WORK/syslinux.cfg" ::syslinux.cfg
    mcopy -i "$DISK" "$WORK/known.bin" ::known.bin
    syslinux --install "$DISK"
    sha256sum "$WORK/known.bin" | cut -d' ' -f1 >"$OUT/known.sha256"

    cat >"$VM/tiny.vmdk" <<'VMDK'
# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW 131072 VMFS "tiny-flat.vmdk"

# The Disk Data Base
ddb.adapterType = "lsilogic"
ddb.virtualHWVersion = "14"
VMDK
    cat >"$VM/tiny.vmx" <<'VMX'
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "tiny"
memSize = "256"
numvcpus = "1"
guestOS = "otherlinux-64"
scsi0.present = "TRUE"
scsi0.virtualDev = "lsilogic"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "tiny.vmdk"
VMX
    rm -rf "$WORK"
    echo "$SELF_HASH" >"$OUT/stamp"
} >&2
echo "$VM"

#!/usr/bin/env bash
# The main job on the embedded defaults: make a sample VM folder, back it up,
# change 1% of its disk, back it up again, list, verify and restore, and check
# every restored byte. Usage: scripts/demo.sh [WORKDIR]   (default: ./work/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-work/demo}

cargo build --release --locked --quiet
revive=$PWD/target/release/revive
rm -rf "$work"; mkdir -p "$work/web01"
cd "$work"

echo "== making a sample VM folder (web01, 256 MiB flat disk of mixed data)"
python3 - <<'PY'
import os, random
random.seed(7)
mib = 1 << 20
with open("web01/web01-flat.vmdk", "wb") as f:
    pattern = random.randbytes(mib)
    for i in range(256):
        kind = random.choice("rrzzpt")
        chunk = {"r": lambda: random.randbytes(mib), "z": lambda: bytes(mib), "p": lambda: pattern,
                 "t": lambda: ((b"web01 log line %06d\n" % i) * (mib // 22 + 1))[:mib]}[kind]()
        f.write(chunk)
open("web01/web01.vmdk", "w").write(
    '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n\n'
    '# Extent description\nRW 524288 VMFS "web01-flat.vmdk"\n\nddb.adapterType = "lsilogic"\n')
open("web01/web01.vmx", "w").write(
    'displayName = "web01"\nmemSize = "1024"\nguestOS = "otherlinux-64"\nscsi0:0.fileName = "web01.vmdk"\n')
open("web01/web01.nvram", "wb").write(random.randbytes(8684))
open("web01/vmware.log", "w").write("2026-11-23T00:00:00Z| vmx| Log for VMware ESX\n")
PY

echo "== revive init"
"$revive" init --repo repo
echo "== revive backup (full)"
"$revive" backup --repo repo --json web01
echo "== changing 1% of the disk (3 MiB) and backing up again (incremental)"
python3 - <<'PY'
import random
random.seed(8)
with open("web01/web01-flat.vmdk", "r+b") as f:
    for block in random.sample(range(256), 3):
        f.seek(block << 20); f.write(random.randbytes(1 << 20))
PY
"$revive" backup --repo repo --json web01
echo "== revive points"
"$revive" points --repo repo
echo "== revive verify"
"$revive" verify --repo repo
echo "== revive restore web01@latest"
"$revive" restore --repo repo web01@latest restored
(cd web01 && sha256sum -- *) > expected.sha256
(cd restored && sha256sum -c --quiet ../expected.sha256)
echo "== every restored file matches its SHA-256; repository size: $(du -sh repo | cut -f1) for two 256 MiB restore points"

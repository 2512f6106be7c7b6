#!/usr/bin/env bash
# The main job on the embedded defaults: make a sample VM folder, back it up,
# change 1% of its disk, back it up again, list, verify and restore; then
# publish the latest restore point over NFSv3 with `revive serve`, read the VM
# folder with a real NFS client (libnfs), write into it, and show that the
# repository is untouched. Every byte is checked by SHA-256. The web console
# is served on the API port while the demo runs (its URL is printed).
# Usage: scripts/demo.sh [WORKDIR]   (default: ./work/demo)
#        DEMO_KEEP_SERVING=1 scripts/demo.sh   keeps `revive serve` (and the
#        console) running at the end, until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-work/demo}

if ! command -v nfs-cat >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends libnfs-utils python3
fi
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

echo "== revive serve: the NFS datastore and the session API (token in the config)"
cat > revive.toml <<TOML
[repository]
path = "$PWD/repo"
[datastore]
state_dir = "$PWD/state"
cache_root = "$PWD/cache"
[nfs]
bind = "127.0.0.1"
nfs_port = 0
mount_port = 0
portmap = false
[api]
bind = "127.0.0.1:0"
token = "demo-token"
[sessions]
min_free_cache = "64MiB"
[[export]]
path = "/revive"
allowed_clients = ["127.0.0.1"]
TOML
"$revive" serve --config revive.toml > serve.json 2> serve.log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s serve.json ] && break; sleep 0.1; done
port=$(python3 -c 'import json; print(json.load(open("serve.json"))["nfs_port"])')
api=$(python3 -c 'import json; print(json.load(open("serve.json"))["api_port"])')
export REVIVE_API="http://127.0.0.1:$api" REVIVE_TOKEN=demo-token
echo "== web console: http://127.0.0.1:$api/  (log in with the API token: demo-token)"
echo "== revive recover --vm web01 --wait (publish-only host: mount it by hand)"
"$revive" recover --vm web01 --wait
"$revive" sessions
id=$("$revive" sessions --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
name=$("$revive" session "$id" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["name"])')
url() { echo "nfs://127.0.0.1/revive/$name/$1?nfsport=$port&mountport=$port"; }
echo "== nfs-ls $(url "")"
nfs-ls "$(url "")"
echo "== reading the flat disk over NFS, straight from the chunks"
want=$(sha256sum web01/web01-flat.vmdk | cut -d" " -f1)
got=$(nfs-cat "$(url web01-flat.vmdk)" | sha256sum | cut -d" " -f1)
[ "$want" = "$got" ] || { echo "MISMATCH: $got != $want"; exit 1; }
echo "web01-flat.vmdk over NFS: $got (matches the backed-up disk)"
echo "== writing a file into the published folder (it lands in the write cache)"
echo "written over NFS at $(date -u +%FT%TZ)" > note.txt
nfs-cp note.txt "$(url note.txt)"
nfs-cat "$(url note.txt)" | cmp - note.txt && echo "note.txt reads back over NFS"
"$revive" session "$id"
echo "== revive migrate $id --to $PWD/production --method copy --wait"
"$revive" migrate "$id" --to "$PWD/production" --method copy --wait
(cd "production/$name" && sha256sum -c --quiet ../../expected.sha256 && cmp note.txt ../../note.txt)
echo "== production/$name holds the VM's files and the client's write, hash-checked; the session is done:"
"$revive" sessions
if [ -n "${DEMO_KEEP_SERVING:-}" ]; then
  echo "== the repository is untouched by client writes:"
  "$revive" verify --repo repo
  echo "== revive serve keeps running: web console at http://127.0.0.1:$api/ (token: demo-token); Ctrl-C stops it"
  wait $server || true
  exit 0
fi
kill $server; wait $server 2>/dev/null || true; trap - EXIT
echo "== the repository is untouched by client writes:"
"$revive" verify --repo repo

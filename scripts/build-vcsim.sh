#!/bin/sh
# Build vcsim (govmomi's vSphere simulator) for the vsphere driver's tests.
# Debian ships govmomi's simulator package but not the vcsim command, so we
# build our own small main (scripts/vcsim/main.go) against it in GOPATH mode.
# Idempotent: rebuilds only when main.go changed. Prints the binary's path.
#   scripts/build-vcsim.sh            -> /var/tmp/revive-vcsim/vcsim
# The binary: vcsim [-esx] [-l 127.0.0.1:0] [-username U] [-password P] [-tls-dir DIR]
# prints VCSIM_URL=https://127.0.0.1:PORT/sdk when ready.
set -eu
export DEBIAN_FRONTEND=noninteractive

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=/var/tmp/revive-vcsim
BIN=$OUT/vcsim
STAMP=$OUT/main.go.sha256

if ! command -v go >/dev/null 2>&1 || [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then
    apt-get update >&2
    apt-get install -y --no-install-recommends golang-go golang-github-vmware-govmomi-dev >&2
fi

SUM=$(sha256sum "$HERE/vcsim/main.go" | cut -d' ' -f1)
if [ -x "$BIN" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SUM" ]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$OUT/gopath/src/revive-vcsim" "$OUT/cache"
cp "$HERE/vcsim/main.go" "$OUT/gopath/src/revive-vcsim/main.go"
cd "$OUT/gopath/src/revive-vcsim"
GOPATH="$OUT/gopath:/usr/share/gocode" GO111MODULE=off GOCACHE="$OUT/cache" \
    go build -o "$BIN.tmp" . >&2
mv "$BIN.tmp" "$BIN"
echo "$SUM" >"$STAMP"
echo "$BIN"

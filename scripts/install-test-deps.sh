#!/bin/sh
# Install the peers the integration tests drive (Debian 12). Idempotent.
#   libnfs-utils: nfs-ls, nfs-cat, nfs-cp (real NFSv3 client for tests/integration/nfs_proto.rs)
set -eu
if command -v nfs-ls >/dev/null 2>&1 && command -v nfs-cat >/dev/null 2>&1 && command -v nfs-cp >/dev/null 2>&1; then
    echo "install-test-deps: libnfs-utils already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends libnfs-utils

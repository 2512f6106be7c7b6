#!/bin/sh
# Build fio with the nfs (libnfs) engine; Debian's fio 3.33 lacks it.
# Idempotent. Prints the binary's path; use it as FIO_NFS for the tests:
#   FIO_NFS=$(scripts/build-fio-nfs.sh) cargo test --test integration nfs
set -eu
export DEBIAN_FRONTEND=noninteractive
DIR=${FIO_BUILD_DIR:-/var/tmp/revive-fio}
if ls "$DIR"/fio-*/fio >/dev/null 2>&1; then
    ls "$DIR"/fio-*/fio | head -n1
    exit 0
fi
SRC=/etc/apt/sources.list.d/revive-src.sources
if [ ! -e "$SRC" ]; then
    cat >"$SRC" <<'S'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
S
fi
{
    apt-get update
    apt-get install -y --no-install-recommends dpkg-dev build-essential libnfs-dev libaio-dev zlib1g-dev
    mkdir -p "$DIR"
    cd "$DIR"
    apt-get source fio
    cd fio-*/
    ./configure --disable-native --enable-libnfs
    make -j2
} >&2
ls "$DIR"/fio-*/fio | head -n1

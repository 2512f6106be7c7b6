#!/usr/bin/env bash
# Sets up everything the tests need and runs them all: unit tests, whole-system
# tests with real peers, and the lint gates. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
# fio with the nfs engine for the fio tests (built once, then reused).
FIO_NFS=$(sh scripts/build-fio-nfs.sh)
export FIO_NFS
# vcsim for the vsphere driver tests (built once, then reused).
VCSIM=$(sh scripts/build-vcsim.sh)
export VCSIM
# The single-host Ceph cluster the RBD snapshot tests start (once, then
# reused by every test) holds ~3 GiB of memory: stop it when this run
# started it.
if ! sh scripts/ceph-single-host.sh status 2>/dev/null; then
    trap 'sh scripts/ceph-single-host.sh stop' EXIT
fi

export CARGO_TERM_COLOR=never
# Every peer was installed above: a test that finds one missing must fail,
# not skip (see skip_missing_peer in tests/integration/support).
export CI=1
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked -- --test-threads=2

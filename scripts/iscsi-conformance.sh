#!/bin/bash
# libiscsi's whole conformance suite (iscsi-test-cu, about 230 tests)
# against revive's iSCSI target (a restore point's disk through the block
# layer) and against tgtd (package tgt) on a plain copy of the same disk,
# test by test, each bounded to 60 s. Fails when tgtd passes a test revive
# does not, or when revive hangs. The default test run (scripts/test.sh)
# runs a bounded selection of the same comparison.
#
#   scripts/iscsi-conformance.sh              # prints one line per test and the counts
#   REVIVE_ISCSI_LOGS=/tmp/cu scripts/iscsi-conformance.sh   # keeps every test's output
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CI=1 cargo test --test integration iscsi::conformance::conformance_full_suite_against_tgtd \
    -- --ignored --exact --nocapture 2>&1 | tee "${TMPDIR:-/tmp}/iscsi-conformance.log" \
    | grep -E '^(ALL\.|iscsi-conformance|test result|thread)'

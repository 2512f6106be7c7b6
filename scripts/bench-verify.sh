#!/bin/sh
# Verification boots (revive verify --boot) of the tiny VM
# (scripts/build-boot-image.sh) under QEMU/TCG: wall time for 1 restore
# point, then for 4 points with --parallel 2, in one run. Each boot is
# published, powered on, watched until its console marker, screenshotted,
# stopped and cleaned up; the time includes all of it.
#   scripts/bench-verify.sh
# Runs the ignored test verify_boot::time_to_verify_one_vs_four_points_two_at_a_time,
# which re-runs itself in private network and pid namespaces (port 111).
set -eu
cd "$(dirname "$0")/.."
scripts/build-boot-image.sh >/dev/null
OUT=$(cargo test ${BENCH_PROFILE:---release} --test integration -- --ignored --exact \
    verify_boot::time_to_verify_one_vs_four_points_two_at_a_time --nocapture 2>&1) || {
    echo "$OUT" >&2
    exit 1
}
echo "$OUT" | grep -o 'BENCH-VERIFY [0-9]* [0-9.]*' | awk '
    { t[$2] = $3; printf "  %d point(s): %.1f s\n", $2, $3 }
    END { printf "4 points (--parallel 2) / 1 point: %.2f\n", t[4] / t[1] }'

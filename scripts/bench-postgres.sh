#!/bin/sh
# PostgreSQL instant recovery vs restore, on a real PostgreSQL 15:
# - time to first query: `revive recover --kind postgres` vs `revive restore`
#   + `pg_ctl start`, for each size in REVIVE_PG_BENCH_MIB (MiB of
#   incompressible rows, default "1024 4096"), page cache dropped before each;
# - pgbench tps (4 clients, 10 s, 3 rounds) on the published instance vs a
#   restored copy on local disk vs another through bindfs (plain FUSE
#   passthrough), all three running, measured in turn each round;
# - pg_basebackup throughput from the published instance;
# - switchover write downtime (longest gap between acknowledged commits).
#   scripts/bench-postgres.sh            # all figures (about 6 min here)
#   REVIVE_PG_BENCH_MIB=256 scripts/bench-postgres.sh   # a quick look
# REVIVE_PG_BENCH_LOGS=DIR keeps the published server's log and revive's log of
# each size there (where the time to first query goes; revive logs at info).
# Runs the ignored test postgres_bench::instant_recovery_vs_restore, which
# re-runs itself in private mount, pid and network namespaces.
set -eu
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh >/dev/null
command -v bindfs >/dev/null || apt-get install -y bindfs >/dev/null
OUT=$(cargo test ${BENCH_PROFILE:---release} --test integration -- --ignored --exact \
    postgres_bench::instant_recovery_vs_restore --nocapture 2>&1) || {
    echo "$OUT" >&2
    exit 1
}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "$OUT" | grep -o 'BENCH-PG [a-z_0-9]* [0-9.]*' | awk '
    { v[$2] = $3; order[n++] = $2 }
    END {
        print "| database | revive recover: first query | restore + pg_ctl start: first query | ratio |"
        print "|---|---:|---:|---:|"
        for (i = 0; i < n; i++) {
            k = order[i]
            if (k ~ /^recover_first_query_/) {
                mib = substr(k, 21)
                r = v["restore_first_query_" mib]
                printf "| %s MiB | %.2f s | %.1f s | %.0fx |\n", mib, v[k], r, r / v[k]
            }
        }
        printf "\n| pgbench, 4 clients, 10 s, median of 3 rounds | tps |\n|---|---:|\n"
        printf "| published (revive, FUSE + write cache) | %.0f |\n", v["tps_published"]
        printf "| restored copy, local disk | %.0f |\n", v["tps_local"]
        printf "| restored copy through bindfs | %.0f |\n", v["tps_bindfs"]
        printf "\npublished / bindfs: %.2fx; published / local: %.2fx (medians of the per-round ratios)\n", v["tps_ratio_bindfs"], v["tps_ratio_local"]
        printf "pg_basebackup from the published instance: %.0f MB/s\n", v["basebackup_mb_s"]
        printf "switchover write downtime: %.2f s\n", v["switchover_downtime"]
    }'
echo "$OUT" | grep "^tps by round" || true

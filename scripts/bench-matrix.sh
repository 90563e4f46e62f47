#!/usr/bin/env bash
# Exchange throughput and latency across stores and concurrency: `latchkey-bench` (jwt backend)
# on SQLite and on PostgreSQL, at 1, 32 and 64 connections, one after the other, and a table.
#
#   scripts/bench-matrix.sh                  # 20 s measured per run
#   scripts/bench-matrix.sh 10s              # shorter runs
#   LATCHKEY_BENCH_PG=postgres://postgres@127.0.0.1:5432/postgres scripts/bench-matrix.sh
#
# PostgreSQL: each run gets a fresh database on the server LATCHKEY_BENCH_PG names (default: the
# local server on 127.0.0.1:5432 as user postgres, trust auth), dropped afterwards. Without a
# server answering there, the PostgreSQL rows are skipped. See docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-20s}
PG=${LATCHKEY_BENCH_PG:-postgres://postgres@127.0.0.1:5432/postgres}
CONNECTIONS=(1 32 64)

echo "building latchkey and latchkey-bench (release)..." >&2
cargo build --release --locked --bin latchkey --bin latchkey-bench >&2
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bench="${target_dir:-target}/release/latchkey-bench"

results=$(mktemp -d "${TMPDIR:-/tmp}/latchkey-bench-matrix.XXXXXX")
databases=()
cleanup() {
  local db
  for db in "${databases[@]}"; do
    psql "$PG" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$results"
}
trap cleanup EXIT

stores=(sqlite)
if command -v psql >/dev/null && psql "$PG" -qc "SELECT 1" >/dev/null 2>&1; then
  stores+=(postgres)
else
  echo "bench-matrix: no PostgreSQL at $PG: the postgres rows are skipped" >&2
fi

for store in "${stores[@]}"; do
  for n in "${CONNECTIONS[@]}"; do
    url="sqlite://latchkey.db"
    if [[ $store == postgres ]]; then
      db="latchkey_bench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
      psql "$PG" -qc "CREATE DATABASE $db" >/dev/null
      databases+=("$db")
      url="${PG%/*}/$db"
    fi
    echo "== $store, $n connections" >&2
    # The table reports; latchkey-bench's own verdict (targets at 16 connections) is not applied.
    "$bench" --store "$url" --concurrency "$n" --duration "$DURATION" --json \
      >"$results/$store-$n.json" || echo "bench-matrix: the $store run at $n connections failed" >&2
  done
done

python3 - "$results" "${stores[@]}" <<'PY'
import json, sys, pathlib
results, stores = pathlib.Path(sys.argv[1]), sys.argv[2:]
print("| store | connections | exchanges/s | p50 ms | p99 ms | p99.9 ms | failed | server CPU | client CPU |")
print("|---|---|---|---|---|---|---|---|---|")
for store in stores:
    for n in (1, 32, 64):
        f = results / f"{store}-{n}.json"
        try:
            r = json.loads(f.read_text())
        except Exception:
            print(f"| {store} | {n} | (no result) | | | | | | |")
            continue
        lat = r["latency_ms"]
        print(f"| {store} | {n} | {r['throughput_per_s']:,.0f} | {lat['p50']:.2f} | {lat['p99']:.2f} "
              f"| {lat['p99_9']:.2f} | {r['exchanges']['failed']} | {r['server']['cpu_cores']:.2f} | {r['loadgen']['cpu_cores']:.2f} |")
PY

#!/usr/bin/env bash
# What latchkey adds to a backend. At each concurrency, one run of latchkey-bench --backend aws:
# exchanges through latchkey's aws backend to moto's STS (AssumeRole), then the same closed-loop
# load on moto's AssumeRole called directly by the load generator, on the same moto; then one
# table of both and the difference.
#
#   scripts/bench-moto.sh                  1 and 16 connections, 3 s warm-up, 20 s measured, each
#   scripts/bench-moto.sh 10s              shorter runs
#   LATCHKEY_BENCH_CONNECTIONS="1 4 16 32" scripts/bench-moto.sh
#
# moto (PyPI moto[server], enforcing IAM) is installed, started and stopped by scripts/test.sh,
# as for the tests; its broker user signs both loads. `latchkey-bench --backend aws --moto URL`
# prints one run's full report. See docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-20s}
read -r -a CONNECTIONS <<<"${LATCHKEY_BENCH_CONNECTIONS:-1 16}"
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bench="${target_dir:-target}/release/latchkey-bench"

if [[ -z ${LATCHKEY_TEST_AWS_URL:-} ]]; then
  echo "building latchkey and latchkey-bench (release)..." >&2
  cargo build --release --locked --bin latchkey --bin latchkey-bench >&2
  # Run again under test.sh, which starts moto, exports its URL and the broker's AWS
  # credentials, and stops moto when this ends.
  exec scripts/test.sh --with-peers aws "$0" "$@"
fi

results=$(mktemp -d "${TMPDIR:-/tmp}/latchkey-bench-moto.XXXXXX")
trap 'rm -rf "$results"' EXIT
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for n in "${CONNECTIONS[@]}"; do
  echo "== $n connections: through latchkey, then directly" >&2
  "$bench" --backend aws --moto "$LATCHKEY_TEST_AWS_URL" --concurrency "$n" --duration "$DURATION" --json \
    >"$results/$n.json" || echo "bench-moto: the run at $n connections failed" >&2
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$results" "${CONNECTIONS[@]}" <<'PY'
import json, sys, pathlib
results, connections = pathlib.Path(sys.argv[1]), sys.argv[2:]
print()
print("| connections | via latchkey /s | p50 ms | p99 ms | direct AssumeRole /s | p50 ms | p99 ms "
      "| latchkey adds, p50 | p99 | median ratio | latchkey CPU | moto and others CPU | result |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
warnings = []
for n in connections:
    try:
        r = json.loads((results / f"{n}.json").read_text())
    except Exception:
        print(f"| {n} | (no result) |" + " |" * 11)
        continue
    lk, d, o = r["latchkey"], r["direct"], r["overhead"]
    print(f"| {n} | {lk['throughput_per_s']:,.0f} | {lk['latency_ms']['p50']:.2f} | {lk['latency_ms']['p99']:.2f} "
          f"| {d['throughput_per_s']:,.0f} | {d['latency_ms']['p50']:.2f} | {d['latency_ms']['p99']:.2f} "
          f"| {o['p50_added_ms']:+.2f} ms | {o['p99_added_ms']:+.2f} ms | {o['p50_ratio']:.2f}x "
          f"| {lk['server']['cpu_cores']:.2f} | {lk['machine']['other_cpu_cores']:.2f} / {d['machine']['other_cpu_cores']:.2f} "
          f"| {r['result']} |")
    for phase in ("latchkey", "direct"):
        for w in r[phase]["warnings"]:
            warnings.append(f"warning ({n} connections, {phase}): {w}")
print("\n".join(warnings))
PY
echo "bench-moto: $(nproc) cores; load average before: $load_before; after: $load_after" >&2

#!/usr/bin/env bash
# Time to contain: an agent holds N×5 live credentials spread over the four backends (GitHub
# double, OpenBao, moto, latchkey JWTs); it is killed; the benchmark prints the time from the
# kill call to the first refused exchange and to the last confirmed revocation.
#
#   scripts/bench-kill.sh [EXCHANGES] [JOB_CONCURRENCY]     default: 2,000 exchanges (10,000
#                                                           credentials), 16 concurrent jobs per backend
#
# The peers are the test peers, started and stopped by scripts/test.sh; the broker runs
# in-process in the test binary (debug build, dependencies optimised), on SQLite, as in
# docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export LATCHKEY_BENCH_KILL=${1:-2000}
export LATCHKEY_BENCH_JOBS=${2:-16}

if [[ -z ${LATCHKEY_TEST_AWS_URL:-} ]]; then
  # Run again under test.sh, with only the peers the test needs and none of its checks.
  exec scripts/test.sh --with-peers github,aws,vault "$0" "$@"
fi

echo "bench-kill: $(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
log=$(mktemp "${TMPDIR:-/tmp}/latchkey-bench-kill.XXXXXX")
trap 'rm -f "$log"' EXIT
rc=0
LATCHKEY_TEST_STORE=sqlite cargo test --locked --test it -- kill_everywhere::time_to_contain --exact \
  --nocapture 2>&1 | tee "$log" || rc=$?
echo "bench-kill: load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
printf '\nsummary (%s exchanges, job concurrency %s):\n' "$LATCHKEY_BENCH_KILL" "$LATCHKEY_BENCH_JOBS"
grep '^bench: ' "$log" | grep -v '^bench: report ' || echo "  (no figures: the test did not get that far)"
exit "$rc"

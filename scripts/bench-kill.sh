#!/usr/bin/env bash
# Time to contain: an agent holds N×5 live credentials spread over the four backends (GitHub
# double, OpenBao, moto, latchkey JWTs); it is killed; the benchmark prints the time from the
# kill call to the first refused exchange and to the last confirmed revocation.
#
#   scripts/bench-kill.sh [EXCHANGES] [JOB_CONCURRENCY]     default: 200 exchanges (1,000
#                                                           credentials), 32 concurrent jobs
#
# The peers are the test peers, started by scripts/test.sh; the broker runs in-process in the
# test binary (debug build, dependencies optimised), as in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export LATCHKEY_BENCH_KILL=${1:-200}
export LATCHKEY_BENCH_JOBS=${2:-32}
exec scripts/test.sh -- kill_everywhere::time_to_contain --no-capture

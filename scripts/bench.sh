#!/usr/bin/env bash
# Builds latchkey and its load generator in release mode, then measures `POST /v1/token`.
#
#   scripts/bench.sh                      # 16 connections, 3 s warm-up, 20 s measured
#   scripts/bench.sh --duration 60s       # any latchkey-bench argument passes through
#   scripts/bench.sh --json > bench.json  # machine-readable summary on stdout
#   scripts/bench.sh --strict             # exit 1 when a target is missed (CI)
#   scripts/bench.sh --profile            # also record perf.data of the server
#
# The first release build of this dependency set takes several minutes. See docs/BENCHMARKS.md.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ "$(uname -s)" != Linux ]]; then
    echo "bench.sh: the benchmark reads /proc and runs on Linux only" >&2
    exit 2
fi

echo "building latchkey and latchkey-bench (release)..." >&2
cargo build --release --locked --bin latchkey --bin latchkey-bench >&2

target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
target_dir="${target_dir:-target}"

exec "$target_dir/release/latchkey-bench" --latchkey "$target_dir/release/latchkey" "$@"

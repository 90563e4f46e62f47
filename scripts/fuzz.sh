#!/usr/bin/env bash
# Builds and runs every fuzz target in fuzz/ for a while each. Not part of CI.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     default 60
#   scripts/fuzz.sh 600 glob policy          only the named targets
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes nightly-only flags
# (sanitizers), so the stable toolchain runs it with RUSTC_BOOTSTRAP=1.
#
# Corpora grow in fuzz/corpus/<target>/. A crash stops its target and leaves the input in
# fuzz/artifacts/<target>/crash-*; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-...
# then turn it into a unit test beside the code it broke. Both folders are git-ignored.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECONDS_PER_TARGET=${1:-60}
shift || true
TARGETS=("$@")
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz.sh: cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

cd "$ROOT/fuzz"
if ((${#TARGETS[@]} == 0)); then
  mapfile -t TARGETS < <(cargo fuzz list)
fi
cargo fuzz build

failed=()
for target in "${TARGETS[@]}"; do
  echo "== $target: ${SECONDS_PER_TARGET}s"
  mkdir -p "corpus/$target"
  # -rss_limit_mb and -timeout make memory blow-ups and slow inputs count as crashes too.
  if ! cargo fuzz run "$target" -- -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1; then
    failed+=("$target")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
echo "fuzz.sh: no crash in ${TARGETS[*]}"

#!/usr/bin/env bash
# Run the fuzz targets (fuzz/fuzz_targets): each for RUNS executions (default 1,000,000),
# or only those named. Installs cargo-fuzz if missing. libFuzzer needs nightly features:
# RUSTC_BOOTSTRAP=1 lets the stable toolchain build them (no other toolchain needed).
#
#   scripts/fuzz.sh                      # every target, 1M runs each
#   RUNS=100000 scripts/fuzz.sh manifest proto_frames
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-1000000}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (crates.io)..." >&2
  cargo install cargo-fuzz --locked >&2
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  start=$(date +%s)
  log="target/fuzz-$t.log"
  mkdir -p target
  if cargo fuzz run "$t" "fuzz/corpus/$t" -- -runs="$RUNS" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
    done_line=$(grep -E "^Done [0-9]+ runs" "$log" | tail -1)
    echo "$t: ${done_line:-done} ($(( $(date +%s) - start )) s)"
  else
    echo "$t: FAILED, see $log" >&2
    grep -E "panicked|ERROR|SUMMARY" "$log" | head -5 >&2
    exit 1
  fi
done

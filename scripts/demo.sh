#!/usr/bin/env bash
# The quickstart demo (run by `make demo` after deps, build and guest binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./target/release/forage-bench demo "$@"

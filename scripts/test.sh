#!/usr/bin/env bash
# The test suite (run by `make test` after deps and guest binaries). Boots real guests under
# QEMU (TCG where KVM cannot run them); FORAGE_SKIP_VM_TESTS=1 skips those for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"

#!/usr/bin/env bash
# The test suite (run by `make test` after deps and guest binaries): formatting, lints,
# then the tests (among them, the import-circle check in forage-testkit). The tests boot
# real guests under QEMU (TCG where KVM cannot run them); FORAGE_SKIP_VM_TESTS=1 skips
# those for a quick run.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*" >&2; }
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo test"
cargo test --workspace --locked "$@"

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
# The VM tests write guest images, disks and substrates under target/: a full disk shows
# up as a test failing with "No space left on device", so say up front how much room
# there is.
free_gib=$(( $(df --output=avail -k . | tail -1) / 1048576 ))
echo "disk: ${free_gib} GiB free under $(pwd); /dev/shm: $(df --output=avail -h /dev/shm | tail -1 | tr -d ' ') free" >&2
if (( free_gib < 20 )); then
    echo "warning: the VM tests need about 20 GiB of free disk; they may fail for lack of room" >&2
fi
cargo test --workspace --locked "$@"

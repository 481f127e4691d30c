#!/usr/bin/env bash
# Install what forage needs on a Debian bookworm host, if it is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
updated=0
install() {
  [ $# -gt 0 ] || return 0
  echo "installing: $*"
  if [ $updated = 0 ]; then apt-get update -qq; updated=1; fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86 qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v cpio >/dev/null || need+=(cpio)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v ip >/dev/null || need+=(iproute2)
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
# The overlay bench runs the paper's baseline and zstd for real.
command -v xdelta3 >/dev/null || need+=(xdelta3)
command -v zstd >/dev/null || need+=(zstd)
command -v xz >/dev/null || need+=(xz-utils)
# The discovery test checks the announcement with the standard tools (avahi-browse,
# against a private bus and daemon of its own: nothing is started system-wide).
command -v avahi-browse >/dev/null || need+=(avahi-daemon avahi-utils)
command -v dbus-daemon >/dev/null || need+=(dbus)
install "${need[@]}"
# Installing QEMU 7.2 removes a newer qemu-utils if the image had one: check again.
command -v qemu-img >/dev/null || install qemu-utils
# `forage image build` resolves the guest kernel package with apt-cache: make sure apt
# has package lists (a fresh container may have none).
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -qq
fi
command -v cargo >/dev/null || { echo "cargo (Rust) is required" >&2; exit 1; }

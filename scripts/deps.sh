#!/usr/bin/env bash
# Install what forage needs on a Debian bookworm host, if it is missing.
#
# FORAGE_DEPS_DRY_RUN=1 only shows what apt would do (apt-get -s), changing nothing.
#
# Prerequisites (README "Quickstart"): Debian 12 bookworm with its own package sources
# (bookworm main; bookworm-security optional), root, git, make, and the Rust toolchain
# (cargo) installed by rustup. Everything else comes from here.
#
# QEMU must be bookworm's 7.2. A machine may already carry a newer qemu-utils (10.x from
# bookworm-backports, whose source is usually not configured): bookworm's
# qemu-system-common 7.2 and that qemu-utils `Breaks:` each other and apt will not
# downgrade on its own, so the QEMU packages are installed together, pinned to the 7.2
# version apt offers, with --allow-downgrades. Every apt step is simulated first (a plan
# apt cannot make changes nothing), downloads before it unpacks, and QEMU is checked after.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

log=$(mktemp /tmp/forage-deps.XXXXXX.log)
trap 'rm -f "$log"' EXIT

fail() {
  echo "deps.sh: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || fail "must run as root (it installs Debian packages; the tests create network namespaces): run it with sudo"
command -v apt-get >/dev/null || fail "apt-get not found: forage's scripts support Debian 12 (bookworm) only"
command -v cargo >/dev/null || fail "cargo not found: install the Rust toolchain with rustup (https://rustup.rs) and open a new shell"

updated=0
apt_update() {
  [ $updated = 0 ] || return 0
  if ! apt-get update -qq >"$log" 2>&1; then
    fail "apt-get update failed ($(grep -m1 -E '^(E|W):' "$log" || tail -n1 "$log")): check the network and /etc/apt/sources.list.d"
  fi
  updated=1
}

# The first line of apt's explanation that names a package ("pkg : Depends: ..."),
# else its first error line.
apt_reason() {
  grep -m1 -E '^ +[a-z0-9][a-z0-9.+-]* :' "$1" | sed 's/^ *//' || true
  grep -m1 -E '^E:' "$1" || true
}

# apt_install [--allow-downgrades] PKG[=VERSION]...: simulate, download, install; one line
# naming the packages and what to do on any failure.
apt_install() {
  local opts=(-y -qq --no-install-recommends)
  if [ "${1:-}" = --allow-downgrades ]; then opts+=(--allow-downgrades); shift; fi
  [ $# -gt 0 ] || return 0
  apt_update
  echo "installing: $*"
  if ! apt-get -s install "${opts[@]}" "$@" >"$log" 2>&1; then
    fail "apt cannot install $* ($(apt_reason "$log" | head -n1)): fix the package named there (apt-cache policy PACKAGE), then rerun"
  fi
  # Removing packages that are not QEMU's own is not ours to decide.
  local removed
  removed=$(awk '/^Remv /{print $2}' "$log" | grep -v '^qemu-' || true)
  if [ -n "$removed" ]; then
    fail "installing $* would remove $(echo $removed): remove or upgrade those yourself, then rerun"
  fi
  if [ -n "${FORAGE_DEPS_DRY_RUN:-}" ]; then
    grep -E '^(Inst|Remv) ' "$log" | sed 's/^/  would: /'
    return 0
  fi
  if ! apt-get install --download-only "${opts[@]}" "$@" >"$log" 2>&1; then
    fail "downloading $* failed ($(apt_reason "$log" | head -n1)): check the network and rerun (nothing was changed)"
  fi
  if ! apt-get install "${opts[@]}" "$@" >"$log" 2>&1; then
    cp "$log" /tmp/forage-deps-failed.log
    fail "installing $* failed ($(apt_reason "$log" | head -n1)): see /tmp/forage-deps-failed.log, run 'dpkg --configure -a && apt-get -f install', then rerun"
  fi
}

# --- QEMU 7.2 --------------------------------------------------------------------------
qemu_is_72() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null &&
    qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 7\.2\.' &&
    qemu-img --version 2>/dev/null | grep -q 'version 7\.2\.'
}

# The 7.2 version apt offers from bookworm (highest first in madison's list).
qemu_72_version() {
  apt-cache madison qemu-system-x86 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2)} $2 ~ /^1:7\.2/ {print $2; exit}'
}

if ! qemu_is_72; then
  # Fresh lists first: a version read from stale ones may no longer be downloadable.
  apt_update
  v=$(qemu_72_version)
  [ -n "$v" ] || fail "qemu-system-x86 7.2 is not offered by apt: add Debian bookworm's main source (deb.debian.org/debian bookworm main), then rerun"
  pkgs=(qemu-system-x86="$v" qemu-system-common="$v" qemu-utils="$v")
  # Packages built from the same QEMU source that this machine has must move with it.
  for p in qemu-block-extra qemu-system-gui qemu-system-modules-opengl qemu-system-modules-spice; do
    if dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -q '^installed$'; then
      if apt-cache madison "$p" | grep -q " $v "; then pkgs+=("$p=$v"); fi
    fi
  done
  installed=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  if [ -n "$installed" ] && [ "$installed" != "$v" ]; then
    echo "qemu-utils $installed is installed; forage needs bookworm's QEMU $v: installing it in its place"
  fi
  apt_install --allow-downgrades "${pkgs[@]}"
  [ -n "${FORAGE_DEPS_DRY_RUN:-}" ] || qemu_is_72 || fail "QEMU 7.2 still not usable after installing it ($(qemu-system-x86_64 --version 2>&1 | head -n1)): check 'apt-cache policy qemu-system-x86 qemu-utils'"
fi

# --- everything else -------------------------------------------------------------------
need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v cpio >/dev/null || need+=(cpio)
[ -x /bin/busybox ] || need+=(busybox-static)
# The debian-12 guest image is built by mmdebstrap from deb.debian.org, checked against
# Debian's archive keys.
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
command -v ip >/dev/null || need+=(iproute2)
command -v tc >/dev/null || need+=(iproute2)
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
# The overlay bench runs the paper's baseline and zstd for real.
command -v xdelta3 >/dev/null || need+=(xdelta3)
command -v zstd >/dev/null || need+=(zstd)
command -v xz >/dev/null || need+=(xz-utils)
# Substrates go to many cloudlets at once by UDP multicast with loss recovery: udpcast.
command -v udp-sender >/dev/null || need+=(udpcast)
# The discovery test checks the announcement with the standard tools (avahi-browse,
# against a private bus and daemon of its own: nothing is started system-wide).
command -v avahi-browse >/dev/null || need+=(avahi-daemon avahi-utils)
command -v dbus-daemon >/dev/null || need+=(dbus)
# The web UI's browser tests drive Debian's Chromium, headless, through its WebDriver
# (chromedriver, the same version: chromium-driver depends on its chromium); a font, so
# that their screenshots show text.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
# Disk images as bases: the cloud-init NoCloud seed is an ISO 9660 image labelled cidata
# (genisoimage, as cloud-localds makes it); the disk-image test partitions a disk (sfdisk,
# fdisk package) and puts GRUB for BIOS boot into it (grub-pc-bin: the i386-pc images and
# modules, grub-common: grub-mkimage; nothing touches the host's own boot).
command -v genisoimage >/dev/null || need+=(genisoimage)
command -v sfdisk >/dev/null || need+=(fdisk)
[ -f /usr/lib/grub/i386-pc/boot.img ] || need+=(grub-pc-bin)
command -v grub-mkimage >/dev/null || need+=(grub-common)
# shellcheck disable=SC2207
need=($(printf '%s\n' "${need[@]}" | sort -u))
apt_install "${need[@]}"

# --- etcd ------------------------------------------------------------------------------
# A cloudlet of many hosts (docs/cluster.md) keeps membership and placement in etcd,
# Debian's etcd-server 3.4. The tests start their own members in network namespaces:
# the package's system service must not run or be enabled. A policy-rc.d that refuses
# every start keeps the postinst from starting it (removed again after), and the unit is
# disabled (symlinks only: works without a running systemd).
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ -z "${FORAGE_DEPS_DRY_RUN:-}" ] && [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  rc=0
  (apt_install etcd-server etcd-client) || rc=$?
  [ $own_policy = 0 ] || rm -f "$policy"
  [ $rc = 0 ] || exit $rc
  if [ -z "${FORAGE_DEPS_DRY_RUN:-}" ]; then
    if command -v systemctl >/dev/null; then
      systemctl disable etcd.service >/dev/null 2>&1 || true
      systemctl stop etcd.service >/dev/null 2>&1 || true
    fi
    command -v etcd >/dev/null || fail "etcd still missing after installing etcd-server: check 'apt-cache policy etcd-server'"
  fi
fi

# `forage image build` resolves the guest kernel package with apt-cache: make sure apt
# has package lists (a fresh container may have none).
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt_update
fi
[ -z "${FORAGE_DEPS_DRY_RUN:-}" ] || exit 0
echo "deps: QEMU $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'), everything else present"

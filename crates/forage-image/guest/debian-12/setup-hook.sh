#!/bin/sh
# mmdebstrap setup hook for the debian-12 image: runs on the host before any package is
# installed; $1 is the guest's root. The kernel package builds its initramfs while it is
# installed, so initramfs-tools' configuration must be there first: only the modules the
# root disk needs (virtio-pci, virtio-blk; ext4 is built into the cloud kernel), no
# resume device to wait for, lz4 (the fastest to unpack under TCG).
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
cat > "$1/etc/initramfs-tools/conf.d/forage.conf" <<'CONF'
MODULES=list
RESUME=none
COMPRESS=lz4
CONF
printf 'virtio_pci\nvirtio_blk\n' > "$1/usr/share/initramfs-tools/modules.d/forage.conf"

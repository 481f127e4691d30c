#!/bin/bash
# A Debian bookworm disk image as an operator or a cloud ships one, for the disk-image
# tests and docs (docs/import-disk-image.md): an MBR partition table, one ext4 root
# partition labelled "root", GRUB for BIOS boot (as grub-install --target=i386-pc
# lays it out: boot.img in the MBR, core.img after it), Debian's cloud kernel, cloud-init (NoCloud and
# None only) and qemu-guest-agent. Nothing of forage is inside.
#
#   scripts/debian-disk-image.sh OUT.raw DEB_CACHE [SIZE_MIB]
#
# DEB_CACHE holds the .debs of earlier builds (forage's own debian-12 build uses the same
# folder: DATA/cache/mmdebstrap), so a second build is offline. Needs root (mmdebstrap
# root mode), mmdebstrap, sfdisk, grub-pc-bin (no loop device, nothing mounted). OUT is
# written only when complete (OUT.partial-* renamed).
set -euo pipefail
out=$1
cache=$2
size_mib=${3:-2048}

work=$(mktemp -d "$out.partial-XXXXXX")
cleanup() {
  for m in $(awk -v t="$work/tree" '$2 ~ "^"t {print $2}' /proc/self/mounts | sort -r); do umount -l "$m"; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$cache"

# initramfs-tools' configuration before the kernel's postinst builds the initramfs: the
# root disk's modules only, lz4 (fast to unpack under TCG).
cat > "$work/setup-hook.sh" <<'HOOK'
#!/bin/sh
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
printf 'MODULES=list\nRESUME=none\nCOMPRESS=lz4\n' > "$1/etc/initramfs-tools/conf.d/disk-image.conf"
printf 'virtio_pci\nvirtio_blk\n' > "$1/usr/share/initramfs-tools/modules.d/disk-image.conf"
HOOK
cat > "$work/customize-hook.sh" <<'HOOK'
#!/bin/sh
set -eu
root=$1
echo 'LABEL=root / ext4 defaults,discard,errors=remount-ro 0 1' > "$root/etc/fstab"
echo debian > "$root/etc/hostname"
# cloud-init looks for NoCloud seeds only (no network metadata services to wait for), and
# sets the locale C.UTF-8 (its default, en_US.UTF-8, needs the locales package).
mkdir -p "$root/etc/cloud/cloud.cfg.d"
printf 'datasource_list: [ NoCloud, None ]\nlocale: C.UTF-8\n' > "$root/etc/cloud/cloud.cfg.d/90-disk-image.cfg"
chroot "$root" systemctl enable --quiet systemd-networkd.service
chroot "$root" systemctl mask --quiet apt-daily.timer apt-daily-upgrade.timer man-db.timer \
  e2scrub_all.timer systemd-networkd-wait-online.service
: > "$root/etc/machine-id"
HOOK
chmod +x "$work/setup-hook.sh" "$work/customize-hook.sh"

mmdebstrap --mode=root --variant=minbase --format=directory --skip=essential/unlink \
  --include=systemd,systemd-sysv,udev,kmod,linux-image-cloud-amd64,initramfs-tools,lz4,cloud-init,qemu-guest-agent,iproute2,procps \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --setup-hook="$work/setup-hook.sh \"\$1\"" \
  --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
  --setup-hook="sync-in '$cache' /var/cache/apt/archives/" \
  --customize-hook="$work/customize-hook.sh \"\$1\"" \
  --customize-hook="sync-out /var/cache/apt/archives '$cache'" \
  bookworm "$work/tree" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main" >"$work/mmdebstrap.log" 2>&1 ||
  { tail -n 20 "$work/mmdebstrap.log" >&2; exit 1; }
rm -rf "$work/tree/var/cache/apt/archives/"*.deb

kernel=$(cd "$work/tree/boot" && ls vmlinuz-* | head -n1)
initrd=$(cd "$work/tree/boot" && ls initrd.img-* | head -n1)

# GRUB for BIOS boot, as grub-install lays it out, without a loop device: its modules and
# configuration in the root file system's /boot/grub; core.img (grub-mkimage: the disk
# driver, MBR partitions, ext2, and where the rest is) in the gap after the MBR, where
# GRUB's boot.img in the MBR loads it from (sector 1, the rest from sector 2: the images'
# defaults); the partition table kept (only boot.img's first 440 bytes are written).
mkdir -p "$work/tree/boot/grub"
cp -r /usr/lib/grub/i386-pc "$work/tree/boot/grub/"
cat > "$work/tree/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry 'Debian GNU/Linux 12' {
  search --no-floppy --label root --set=root
  linux /boot/$kernel root=LABEL=root ro console=tty0 console=ttyS0,115200
  initrd /boot/$initrd
}
CFG
grub-mkimage -O i386-pc -o "$work/core.img" -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2
[ "$(stat -c %s "$work/core.img")" -lt $((2047 * 512)) ] || { echo "core.img does not fit before 1 MiB" >&2; exit 1; }

# The disk: MBR, one bootable Linux partition from 1 MiB, ext4 made from the tree in place.
disk="$work/disk.raw"
truncate -s "${size_mib}M" "$disk"
echo 'start=2048, type=83, bootable' | sfdisk --quiet "$disk"
mkfs.ext4 -q -F -L root -b 4096 -d "$work/tree" -E offset=1048576 "$disk" "$((size_mib - 1))M"
dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none
mv "$disk" "$out"
echo "$out: ${size_mib} MiB, $(du -m "$out" | cut -f1) MiB allocated, kernel $kernel"

#!/bin/sh
# mmdebstrap customize hook for the debian-12 image: runs on the host after every package
# is installed and forage's files were copied in; $1 is the guest's root.
set -eu
root=$1
in_guest() { chroot "$root" "$@"; }

# forage's services, and systemd-networkd for the static address of QEMU user networking.
in_guest systemctl enable --quiet systemd-networkd.service \
  forage-agent.service forage-apps.service forage-heartbeat.service forage-ready.service

# Fast boot under TCG, and a quiet guest (what it writes ends up in overlays): no timers,
# no login prompts (nobody logs in; forage reaches the guest through its agents), no wait
# for "online", no logind (there is no D-Bus), no first-boot cache rebuilds (their caches
# were built when the packages were installed), no file systems or modules nothing here
# uses, no utmp records, no persistent journal or random seed on the disk.
in_guest systemctl mask --quiet \
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
  fstrim.timer man-db.timer systemd-tmpfiles-clean.timer \
  e2scrub_reap.service getty.target getty@tty1.service getty-static.service \
  serial-getty@ttyS0.service systemd-networkd-wait-online.service systemd-logind.service \
  ldconfig.service systemd-hwdb-update.service systemd-journal-catalog-update.service \
  systemd-update-done.service systemd-sysusers.service systemd-firstboot.service \
  systemd-update-utmp.service systemd-update-utmp-runlevel.service \
  systemd-random-seed.service systemd-journal-flush.service systemd-pstore.service \
  systemd-network-generator.service systemd-modules-load.service systemd-remount-fs.service \
  modprobe@dm_mod.service modprobe@efi_pstore.service modprobe@loop.service \
  modprobe@fuse.service modprobe@configfs.service \
  sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
  sys-fs-fuse-connections.mount dev-hugepages.mount proc-sys-fs-binfmt_misc.automount

# Generators of units for things this guest does not have (GPT auto-mounts, SysV scripts,
# encrypted or verity volumes, hibernation): each is a process run at every boot.
mkdir -p "$root/etc/systemd/system-generators"
for g in systemd-cryptsetup-generator systemd-debug-generator systemd-getty-generator \
  systemd-gpt-auto-generator systemd-hibernate-resume-generator \
  systemd-integritysetup-generator systemd-rc-local-generator systemd-run-generator \
  systemd-system-update-generator systemd-sysv-generator systemd-veritysetup-generator; do
  ln -sf /dev/null "$root/etc/systemd/system-generators/$g"
done

mkdir -p "$root/data/apps"

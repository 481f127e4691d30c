#!/bin/busybox sh
# forage tiny guest: PID 1. Mounts the basics, loads the virtio modules, brings up the
# user-mode network, mounts the data disk, starts the agent and any installed apps,
# prints a heartbeat, and announces readiness on the serial console.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /data
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/bin:/sbin HOME=/root
for m in $(cat /etc/forage/modules); do
  insmod "/lib/modules/$m.ko" || echo "forage-init: cannot load module $m"
done
# Report free pages to the host from 4 KiB up (the default is 2 MiB blocks), so memory the
# guest frees (e.g. the page cache of a deleted file) leaves the memory file promptly.
# After virtio_balloon: registering reporting resets the order.
echo 0 > /sys/module/page_reporting/parameters/page_reporting_order 2>/dev/null
ip link set lo up
net_up() {
  ip link set eth0 up && { ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2; true; } 2>/dev/null
}
net_up
# A VM booted to be docked as a substrate (kernel argument forage.nichotplug=1) loses its
# NIC at dock, and activation plugs in a new one: a new eth0 (another ifindex) gets the
# same configuration. This guest has no udev and the kernel no uevent helper, so a watch:
# every 20 ms, shell built-ins but for the sleep. Other VMs run without it.
case " $(cat /proc/cmdline) " in
*" forage.nichotplug=1 "*)
  (idx=; [ -e /sys/class/net/eth0/ifindex ] && read idx < /sys/class/net/eth0/ifindex
   while true; do
     sleep 0.02
     [ -e /sys/class/net/eth0/ifindex ] || continue
     read now < /sys/class/net/eth0/ifindex
     [ "$now" = "$idx" ] || { net_up && idx=$now; }
   done) &
  ;;
esac
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
mount -t ext4 -o discard /dev/vda /data || echo "forage-init: no data disk on /dev/vda"
mkdir -p /data/apps
/sbin/forage-agent 7000 >/run/agent.log 2>&1 &
for start in /data/apps/*/start; do
  [ -x "$start" ] || continue
  app=${start%/start}
  (cd "$app" && ./start >>"$app/log" 2>&1 &)
done
(n=0; while true; do n=$((n + 1)); echo "forage-tick $n"; sleep 1; done) &
echo "FORAGE-READY"
while true; do wait; sleep 60; done

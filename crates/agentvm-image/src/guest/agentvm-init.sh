#!/bin/sh
# agentvm-init: PID 1 of agentvm guests (installed by agentvm-image).
#
# Mounts the kernel filesystems, loads the virtio drivers, grows the root
# file system to the disk, brings up lo and DHCP on every e* NIC (in the background; isolated guests have none), keeps
# qemu-guest-agent running on the org.qemu.guest_agent.0 virtio port and
# agentvm-guest on org.agentvm.agent.0, and then reaps zombies forever. No systemd, no udev: this is all a guest needs
# to answer the host's guest agent.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
LANG=C.UTF-8
export PATH HOME LANG

log() {
    echo "agentvm-init: $*" >/dev/console 2>/dev/null || echo "agentvm-init: $*"
}

# Mount $3 on $2 with type $1 and options $4, unless something is already there.
mount_fs() {
    mkdir -p "$2"
    if ! mountpoint -q "$2" 2>/dev/null; then
        mount -t "$1" -o "$4" "$3" "$2" || log "mounting $1 on $2 failed"
    fi
}

mount_fs proc /proc proc nosuid,nodev,noexec
mount_fs sysfs /sys sysfs nosuid,nodev,noexec
mount_fs devtmpfs /dev devtmpfs mode=0755,nosuid
mount_fs devpts /dev/pts devpts gid=5,mode=0620,ptmxmode=0666
mount_fs tmpfs /dev/shm tmpfs mode=1777,nosuid,nodev
mount_fs tmpfs /run tmpfs mode=0755,nosuid,nodev
mount_fs tmpfs /tmp tmpfs mode=1777,nosuid,nodev
# cgroup v2: a run's program is started in a cgroup of its own, so the guest kernel accounts
# its CPU time apart from the guest's own work (the host reads cpu.stat through the agent).
mount_fs cgroup2 /sys/fs/cgroup cgroup2 nosuid,nodev,noexec
# devtmpfs has no /dev/fd and friends (bash process substitution needs them).
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock /var/lib/dhcp

if [ -s /etc/hostname ]; then
    hostname "$(cat /etc/hostname)" 2>/dev/null || true
fi

for module in virtio_console virtio_net virtio_blk virtio_balloon virtio_rng; do
    modprobe -q "$module" 2>/dev/null || true
done

ip link set lo up 2>/dev/null || true

# Grow the root file system (ext4 directly on /dev/vda) to the whole disk: a VM's disk is an
# overlay on the image with its pool's size (diskGib), usually larger than the image's file
# system. Online, and before the guest agent starts, so a VM is never parked at its golden
# state with the image's size. A no-op when the file system already fills the disk.
if ! resize2fs /dev/vda >/dev/console 2>&1; then
    log "resize2fs /dev/vda failed: the root file system keeps the image's size"
fi

# DHCP on every e* NIC, without blocking the boot (-nw: background at once).
for nic in /sys/class/net/e*; do
    [ -e "$nic" ] || continue
    name=${nic##*/}
    ip link set "$name" up 2>/dev/null || true
    dhclient -nw -q "$name" >/dev/null 2>&1 </dev/null || log "dhclient on $name failed"
done

# Prints /dev/vportNpM of the virtio port named $1.
port_named() {
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] || continue
        if [ "$(cat "$port/name")" = "$1" ]; then
            echo "/dev/${port##*/}"
            return 0
        fi
    done
    return 1
}

# qemu-ga, restarted whenever it exits. The port can show up a little after
# the driver loads, so poll for it quickly at first.
(
    waited=0
    while :; do
        if port=$(port_named org.qemu.guest_agent.0) && [ -c "$port" ]; then
            qemu-ga -m virtio-serial -p "$port" </dev/null
            log "qemu-ga exited with status $?; restarting"
            sleep 1
        else
            if [ "$waited" -eq 100 ]; then
                log "no virtio port named org.qemu.guest_agent.0 yet; still waiting"
            fi
            waited=$((waited + 1))
            sleep 0.1
        fi
    done
) &

# agentvm-guest, agentvm's own agent (exec, streams, terminal, files), on its
# own port; restarted whenever it exits. A VM defined without the port (older
# agentvm) is served by qemu-ga alone.
(
    waited=0
    while :; do
        if port=$(port_named org.agentvm.agent.0) && [ -c "$port" ]; then
            /usr/local/sbin/agentvm-guest --port "$port" </dev/null >/dev/console 2>&1
            log "agentvm-guest exited with status $?; restarting"
            sleep 1
        else
            if [ "$waited" -eq 100 ]; then
                log "no virtio port named org.agentvm.agent.0; qemu-ga serves alone"
            fi
            waited=$((waited + 1))
            if [ "$waited" -lt 100 ]; then sleep 0.1; else sleep 10; fi
        fi
    done
) &

log "up"

# PID 1: reap zombies forever. dash's wait (and its wait for the foreground
# sleep) calls waitpid(-1), so adopted orphans are reaped too.
while :; do
    wait
    sleep 1
done

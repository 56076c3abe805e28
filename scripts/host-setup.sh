#!/usr/bin/env bash
# Prepare a Debian 12 host for agentvm: system packages and the libvirt daemons.
# Idempotent: re-running only does what is missing, and says what it did.
#
# Usage: scripts/host-setup.sh [--packages-only] [--netns NAME]
#   --packages-only  install packages, start nothing
#   --netns NAME     start libvirtd inside network namespace NAME (tests only)
set -euo pipefail

packages_only=0
netns=""
while [ $# -gt 0 ]; do
  case "$1" in
    --packages-only) packages_only=1 ;;
    --netns) netns="$2"; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "host-setup: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "host-setup: $*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "host-setup: must run as root (it installs packages and starts libvirtd)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
PKGS=(libvirt-daemon-system libvirt-dev libvirt-clients libvirt-daemon-driver-qemu
      qemu-system-x86 dnsmasq-base iptables ebtables debootstrap
      linux-image-cloud-amd64 pkg-config e2fsprogs iproute2 procps libxml2-utils
      systemd     # systemd-analyze checks the controller's unit (tests)
      protobuf-compiler libprotobuf-dev  # build the etcd client (cluster store)
      etcd-server)       # the cluster store's tests run a real etcd

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-utils must match qemu-system-x86 (Debian 12 ships 7.2; a newer backport conflicts).
qsys_ok=1
dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "install ok installed" || qsys_ok=0

if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  apt-get update -q >/dev/null
  extra=()
  if [ $qsys_ok -eq 0 ]; then
    qutils=$(apt-cache policy qemu-utils | awk '/^ +(\*\*\* )?1:7\.2/ {for(i=1;i<=NF;i++) if ($i ~ /^1:7\.2/) {print $i; exit}}')
    if [ -n "$qutils" ]; then extra+=("qemu-utils=$qutils"); fi
  fi
  apt-get install -y -q --no-install-recommends --allow-downgrades "${missing[@]}" "${extra[@]}" >/tmp/agentvm-apt.log 2>&1 || {
    echo "host-setup: apt-get install failed; last lines of /tmp/agentvm-apt.log:" >&2
    tail -20 /tmp/agentvm-apt.log >&2
    exit 1
  }
  say "packages installed"
else
  say "packages already installed"
fi

# libvirt's packaged "default" network would autostart a bridge with NAT and
# DHCP in this namespace. agentvm declares its own networks; keep it off.
if [ -e /etc/libvirt/qemu/networks/autostart/default.xml ]; then
  rm -f /etc/libvirt/qemu/networks/autostart/default.xml
  say "disabled autostart of libvirt's packaged 'default' network"
fi

[ $packages_only -eq 1 ] && exit 0

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive /run/virtlogd.pid; then
  say "virtlogd already running (pid $(cat /run/virtlogd.pid))"
else
  virtlogd -d
  say "started virtlogd"
fi

if alive /run/libvirtd.pid; then
  pid=$(cat /run/libvirtd.pid)
  if [ -n "$netns" ] && [ "$(readlink /proc/$pid/ns/net)" != "$(ip netns exec "$netns" readlink /proc/self/ns/net)" ]; then
    echo "host-setup: libvirtd (pid $pid) already runs outside network namespace $netns;" >&2
    echo "host-setup: stop it first so tests cannot create networks in this namespace" >&2
    exit 1
  fi
  say "libvirtd already running (pid $pid)"
else
  if [ -n "$netns" ]; then
    # `ip netns exec` gives libvirtd its own mount namespace, a slave of this one: with `/`
    # shared (systemd's default; not on hosts without systemd), file systems mounted here
    # later (a test's small tmpfs for VM files) are seen by libvirtd and QEMU too.
    mount --make-rshared /
    ip netns exec "$netns" libvirtd -d
    say "started libvirtd in network namespace $netns"
  else
    libvirtd -d
    say "started libvirtd"
  fi
  for _ in $(seq 1 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
  done
  # Remember that agentvm started this daemon (scripts/test.sh may restart it in its namespace).
  cat /run/libvirtd.pid > /run/agentvm-started-libvirtd 2>/dev/null || true
  virsh -c qemu:///system version >/dev/null 2>&1 || { echo "host-setup: libvirtd did not answer" >&2; exit 1; }
fi

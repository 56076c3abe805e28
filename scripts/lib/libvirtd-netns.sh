# Sourced by scripts/test.sh and scripts/bench.sh: runs libvirtd inside network namespace $NS
# (created here when missing), so that the networks VMs get (bridges, NAT, DHCP) never touch
# the host's own network. `libvirtd_netns_up` starts it; `libvirtd_netns_down` stops what it
# started and removes the namespace it created. Needs root and scripts/host-setup.sh.

started_libvirtd=""
created_ns=""

libvirtd_netns_up() {
  if ! ip netns list | grep -qw "$NS"; then
    ip netns add "$NS"
    created_ns=$NS
  fi
  ip netns exec "$NS" ip link set lo up
  if [ -f /run/libvirtd.pid ] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; then
    local pid running
    pid=$(cat /run/libvirtd.pid)
    if [ "$(readlink /proc/$pid/ns/net)" != "$(ip netns exec "$NS" readlink /proc/self/ns/net)" ]; then
      running=$(virsh -c qemu:///system list --name 2>/dev/null | grep -c . || true)
      if [ "$(cat /run/agentvm-started-libvirtd 2>/dev/null)" != "$pid" ] || [ "$running" -ne 0 ]; then
        echo "libvirtd (pid $pid) runs in another network namespace; agentvm needs it inside $NS" >&2
        echo "so that the networks it creates cannot touch this host's network." >&2
        echo "Stop it (kill $pid, after stopping its VMs) and run this again." >&2
        exit 1
      fi
      # agentvm's own host setup started it and no VM runs: move it into the namespace.
      echo "restarting libvirtd (pid $pid, started by scripts/host-setup.sh) inside $NS"
      kill "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      started_libvirtd=1
    fi
  else
    started_libvirtd=1
  fi
  bash scripts/host-setup.sh --netns "$NS"
}

# Removes leftover domains whose files live under $1 (a state directory of this run) or under
# an end-to-end test's directory (/var/lib/agentvm-e2e-*: a test killed before its own cleanup
# ran), then stops the libvirtd and removes the namespace this script started or created.
libvirtd_netns_down() {
  local state_dir=$1 d pid
  for d in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep '^agentvm-'); do
    virsh -c qemu:///system dumpxml "$d" 2>/dev/null | grep -qE "($state_dir|/var/lib/agentvm-e2e-[^/]*)/" || continue
    virsh -c qemu:///system destroy "$d" >/dev/null 2>&1
    virsh -c qemu:///system undefine "$d" --snapshots-metadata --managed-save >/dev/null 2>&1
    echo "removed leftover domain $d"
  done
  if [ -n "$started_libvirtd" ]; then
    pid=$(cat /run/libvirtd.pid 2>/dev/null)
    if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "stopped libvirtd (pid $pid)"
    fi
  fi
  if [ -n "$created_ns" ]; then
    if [ -z "$(ip netns pids "$created_ns" 2>/dev/null)" ]; then
      ip netns delete "$created_ns" && echo "deleted network namespace $created_ns"
    else
      echo "network namespace $created_ns still has processes; left in place" >&2
    fi
  fi
}

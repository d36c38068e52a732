#!/usr/bin/env bash
# Sets up everything dmavisor needs on a Debian machine (as root): Debian packages, the guest
# kernel and initramfs, the dmavisor binary and, where this host's KVM cannot run stock
# guests, the sandbox host. Each step is skipped when its output is up to date.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
./resources/install-deps.sh
./resources/build-guest.sh
echo "==> building dmavisor (cargo build --release -p vmm)"
cargo build --release -p vmm
./resources/sandbox/build.sh

#!/usr/bin/env bash
# The main job: set everything up and boot the demo guest, which shows its CMA state (the
# DMA window the VMM gave it, allocations through the kernel's own CMA heap) and reboots.
#
# Runs dmavisor directly where /dev/kvm can run stock guests, else inside the sandbox host.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. resources/host-kvm.sh
./resources/setup.sh
config=resources/demo.toml
if host_runs_stock_guests; then
  echo "==> booting the demo guest: target/release/dmavisor run --config $config"
  exec target/release/dmavisor run --config "$config"
else
  echo "==> this host's KVM cannot run stock guests; booting the demo guest inside the sandbox host"
  exec ./resources/sandbox/run.sh --with target/guest/kernel --with target/guest/initramfs.cpio.gz \
    -- dmavisor run --config "$config"
fi

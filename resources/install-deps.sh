#!/usr/bin/env bash
# Installs the Debian packages dmavisor needs to build its guest kernel, its sandbox
# host and to run guests. Idempotent: a second run with everything present is a no-op.
set -euo pipefail

PKGS=(
  build-essential flex bison bc libelf-dev cpio xz-utils zstd kmod python3
  rsync  # the guest tree's headers_install, for the kernel's dma-buf heap selftest
  linux-source-6.12
  busybox-static
  qemu-system-x86
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "==> Debian packages present"
fi

# The Rust toolchain: the machine ships one via rustup; say so plainly if it is missing.
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install a Rust toolchain (https://rustup.rs) and re-run." >&2
  exit 1
fi

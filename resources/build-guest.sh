#!/usr/bin/env bash
# Builds the guest side: the guest kernel (from Debian's linux-source-6.12 with the project's
# config fragment) and the busybox-static initramfs with our scenario init and test programs.
#
# Outputs:  target/guest/kernel            the bzImage the VMM boots
#           target/guest/initramfs.cpio.gz the guest's root filesystem
# Each is rebuilt only when its inputs change (a hash of the inputs is kept beside it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/target/guest"
SRC_TAR=/usr/src/linux-source-6.12.tar.xz
GUEST="$ROOT/resources/guest"
mkdir -p "$OUT"

log() { echo "==> [guest] $*"; }

inputs_hash() { cat "$@" | sha256sum | cut -d' ' -f1; }

# ---------------------------------------------------------------- kernel
build_kernel() {
  [ -f "$SRC_TAR" ] || { echo "error: $SRC_TAR missing; run resources/install-deps.sh" >&2; exit 1; }
  local driver_files=()
  if [ -d "$GUEST/driver" ]; then
    mapfile -t driver_files < <(find "$GUEST/driver" -type f | sort)
  fi
  local hash
  hash=$( (ls -l --time-style=+ "$SRC_TAR" | awk '{print $5}'; inputs_hash "$GUEST/kernel.fragment" "$0" "${driver_files[@]}") | sha256sum | cut -d' ' -f1)
  if [ -f "$OUT/kernel" ] && [ "$(cat "$OUT/kernel.hash" 2>/dev/null)" = "$hash" ]; then
    log "kernel up to date ($OUT/kernel)"
    return
  fi

  local tree="$OUT/linux"
  if [ ! -f "$tree/Makefile" ]; then
    log "extracting $SRC_TAR (about 30 s)"
    rm -rf "$tree.tmp" && mkdir -p "$tree.tmp"
    tar -xf "$SRC_TAR" -C "$tree.tmp" --strip-components=1
    mv "$tree.tmp" "$tree"
  fi

  # The virtio-dma guest driver is built into the kernel: cma_alloc is not exported to modules.
  if [ -d "$GUEST/driver" ]; then
    "$GUEST/driver/install-into-tree.sh" "$tree"
  fi

  log "configuring: tinyconfig + resources/guest/kernel.fragment"
  make -C "$tree" -s tinyconfig >/dev/null
  (cd "$tree" && ./scripts/kconfig/merge_config.sh -m .config "$GUEST/kernel.fragment" >/dev/null)
  make -C "$tree" -s olddefconfig >/dev/null

  # A fragment option that Kconfig silently dropped (a missing dependency) is a build error here,
  # not a mystery at boot.
  local bad=0
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=n)
        if grep -q "^${line%=n}=" "$tree/.config"; then echo "error: $line did not stick in .config" >&2; bad=1; fi ;;
      CONFIG_*=*)
        if ! grep -qx "$line" "$tree/.config"; then echo "error: $line did not stick in .config" >&2; bad=1; fi ;;
    esac
  done < "$GUEST/kernel.fragment"
  [ $bad -eq 0 ] || exit 1

  log "building bzImage with $(nproc) jobs (about 2.5 minutes on 2 cores; progress every 15 s)"
  local blog="$OUT/kernel-build.log"
  (make -C "$tree" -j"$(nproc)" bzImage >"$blog" 2>&1; echo $? >"$blog.rc") &
  local pid=$! t=0
  while kill -0 $pid 2>/dev/null; do
    sleep 1; t=$((t + 1))
    if [ $((t % 15)) -eq 0 ]; then
      log "  ${t}s: $(grep -c -E '^\s+(CC|AS|LD|AR)' "$blog" || true) objects built"
    fi
  done
  wait $pid || true
  if [ "$(cat "$blog.rc")" != 0 ]; then
    tail -40 "$blog" >&2
    echo "error: guest kernel build failed; full log in $blog" >&2
    exit 1
  fi
  cp "$tree/arch/x86/boot/bzImage" "$OUT/kernel"
  cp "$tree/.config" "$OUT/kernel.config"
  echo "$hash" >"$OUT/kernel.hash"
  log "kernel built in ${t}s: $OUT/kernel ($(stat -c %s "$OUT/kernel") bytes)"
}

# ---------------------------------------------------------------- initramfs
build_initramfs() {
  local progs=()
  # Programs may include a driver's ioctl header (resources/guest/driver/*_uapi.h).
  mapfile -t progs < <(find "$GUEST/programs" "$GUEST/driver" -name '*.c' -path '*/programs/*' -o -name '*.h' | sort)
  local hash
  # The kernel's own dma-buf heap selftest, from the guest's tree (run by the dmabuf-selftest
  # scenario against every heap the guest has, virtio-dma's included).
  local tree="$OUT/linux"
  local selftest="$tree/tools/testing/selftests/dmabuf-heaps/dmabuf-heap.c"
  hash=$(inputs_hash "$GUEST/init" "$0" "${progs[@]}" /bin/busybox "$selftest")
  if [ -f "$OUT/initramfs.cpio.gz" ] && [ "$(cat "$OUT/initramfs.hash" 2>/dev/null)" = "$hash" ]; then
    log "initramfs up to date ($OUT/initramfs.cpio.gz)"
    return
  fi
  log "building initramfs (busybox-static + scenario init + test programs)"
  local root="$OUT/rootfs"
  rm -rf "$root"
  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,usr/bin,usr/sbin}
  cp /bin/busybox "$root/bin/busybox"
  for app in $("$root/bin/busybox" --list); do
    [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"
  done
  install -m 0755 "$GUEST/init" "$root/init"
  for c in "$GUEST"/programs/*.c; do
    local name
    name=$(basename "$c" .c)
    gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/$name" "$c"
  done
  # Against the tree's exported uapi headers (drm/drm.h, linux/dma-heap.h), as kselftest builds it.
  make -s -C "$tree" headers_install INSTALL_HDR_PATH="$OUT/uapi" >/dev/null
  gcc -static -O2 -Wall -I "$tree/tools/testing/selftests" -I "$OUT/uapi/include" \
    -o "$root/bin/dmabuf-heap-selftest" "$selftest"
  (cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -9) >"$OUT/initramfs.cpio.gz.tmp"
  mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
  echo "$hash" >"$OUT/initramfs.hash"
  log "initramfs built: $OUT/initramfs.cpio.gz ($(stat -c %s "$OUT/initramfs.cpio.gz") bytes)"
}

case "${1:-all}" in
  kernel) build_kernel ;;
  initramfs) build_initramfs ;;
  all) build_kernel; build_initramfs ;;
  *) echo "usage: $0 [kernel|initramfs|all]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Builds the sandbox host: a kernel and a busybox initramfs that QEMU (TCG, emulated AMD CPU with
# SVM) boots on hosts whose /dev/kvm cannot run stock guests. Inside it, KVM gives a real nested
# /dev/kvm, and dmavisor runs there exactly as on a real KVM host.
#
# usage: resources/sandbox/build.sh [project|debian]   (default: $DMAVISOR_SANDBOX_KERNEL, else project)
#
# Two host kernels:
#   project  built here from Debian's linux-source-6.12 (tinyconfig + host-kernel.fragment): KVM,
#            CMA with the host's CMA dma-buf heap, 1 GiB huge pages, the IOMMU and vfio-pci, all built
#            in. The tests' default.
#   debian   Debian's own linux-image (6.1 today), kvm-amd and loop loaded as modules. CMA is off
#            in it, so the host CMA tests skip on it, saying so. The fallback.
#
# Outputs: target/sandbox/<kernel>/{vmlinuz,base.cpio.gz}, each rebuilt only when its inputs change.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/resources/sandbox"
kind=${1:-${DMAVISOR_SANDBOX_KERNEL:-project}}
case "$kind" in
  project|debian) ;;
  *) echo "error: unknown sandbox kernel '$kind'; use project or debian" >&2; exit 2 ;;
esac
OUT="$ROOT/target/sandbox/$kind"
mkdir -p "$OUT"
log() { echo "==> [sandbox:$kind] $*"; }

# ---------------------------------------------------------------- project kernel
SRC_TAR=/usr/src/linux-source-6.12.tar.xz
FRAGMENT="$HERE/host-kernel.fragment"
build_project_kernel() {
  [ -f "$SRC_TAR" ] || { echo "error: $SRC_TAR missing; run resources/install-deps.sh" >&2; exit 1; }
  local hash
  hash=$( (stat -c %s "$SRC_TAR"; cat "$FRAGMENT"; sed -n '/^# ---.*project kernel/,/^# ---.*end project kernel/p' "$0") | sha256sum | cut -d' ' -f1)
  if [ -f "$OUT/vmlinuz" ] && [ "$(cat "$OUT/kernel.hash" 2>/dev/null)" = "$hash" ]; then
    log "kernel up to date ($OUT/vmlinuz)"
    return
  fi
  # Its own tree: the guest's tree (target/guest/linux) has another .config and our driver in it.
  local tree="$ROOT/target/sandbox/linux"
  if [ ! -f "$tree/Makefile" ]; then
    log "extracting $SRC_TAR (about 30 s)"
    rm -rf "$tree.tmp" && mkdir -p "$tree.tmp"
    tar -xf "$SRC_TAR" -C "$tree.tmp" --strip-components=1
    mv "$tree.tmp" "$tree"
  fi
  log "configuring: tinyconfig + resources/sandbox/host-kernel.fragment"
  make -C "$tree" -s tinyconfig >/dev/null
  (cd "$tree" && ./scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >/dev/null)
  make -C "$tree" -s olddefconfig >/dev/null
  # An option Kconfig silently dropped (a missing dependency) is a build error, not a surprise
  # inside the sandbox.
  local bad=0 line
  while IFS= read -r line; do
    case "$line" in
      CONFIG_*=*) grep -qx "$line" "$tree/.config" || { echo "error: $line did not stick in .config" >&2; bad=1; } ;;
    esac
  done <"$FRAGMENT"
  [ $bad -eq 0 ] || exit 1
  log "building bzImage with $(nproc) jobs (about 3 minutes on 2 cores; progress every 15 s)"
  local blog="$OUT/kernel-build.log" t=0
  (make -C "$tree" -j"$(nproc)" bzImage >"$blog" 2>&1; echo $? >"$blog.rc") &
  local pid=$!
  while kill -0 $pid 2>/dev/null; do
    sleep 1; t=$((t + 1))
    [ $((t % 15)) -ne 0 ] || log "  ${t}s: $(grep -c -E '^\s+(CC|AS|LD|AR)' "$blog" || true) objects built"
  done
  wait $pid || true
  if [ "$(cat "$blog.rc")" != 0 ]; then
    tail -40 "$blog" >&2
    echo "error: sandbox host kernel build failed; full log in $blog" >&2
    exit 1
  fi
  cp "$tree/arch/x86/boot/bzImage" "$OUT/vmlinuz"
  cp "$tree/.config" "$OUT/kernel.config"
  echo "$hash" >"$OUT/kernel.hash"
  log "kernel built in ${t}s: $OUT/vmlinuz ($(stat -c %s "$OUT/vmlinuz") bytes)"
}
# ---------------------------------------------------------------- end project kernel

# ---------------------------------------------------------------- debian kernel
debian_version() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {sub("linux-image-", "", $2); print $2; exit}'
}
version=""
if [ "$kind" = debian ]; then
  version=$(debian_version)
  if [ -z "$version" ]; then
    apt-get update -q >/dev/null
    version=$(debian_version)
  fi
  [ -n "$version" ] || { echo "error: cannot find the Debian kernel version (apt-cache depends linux-image-amd64)" >&2; exit 1; }
fi

fetch_debian_kernel() {
  local pkg="linux-image-$version-unsigned" deb
  deb=$(ls "$OUT"/"${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
  if [ -z "$deb" ]; then
    log "downloading $pkg"
    (cd "$OUT" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null)
    deb=$(ls "$OUT"/"${pkg}"_*.deb | head -n 1)
  fi
  log "extracting $deb"
  rm -rf "$OUT/pkg" && mkdir -p "$OUT/pkg"
  dpkg-deb -x "$deb" "$OUT/pkg"
  cp "$OUT/pkg/boot/vmlinuz-$version" "$OUT/vmlinuz"
}

# kvm-amd, loop and what they depend on, decompressed, in load order (Debian's kernel only: the
# project's has them built in).
add_debian_modules() {
  local root=$1 moddir="$OUT/pkg/lib/modules/$version"
  declare -A seen=()
  local order=()
  add_module() {
    local name=$1 file dep
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    # Module names use '_' where file names may use '-'.
    file=$(find "$moddir" -regex ".*/${name//_/[-_]}\.ko\(\.xz\|\.zst\)?" | head -n 1)
    [ -n "$file" ] || { echo "error: module $name not found in $moddir" >&2; exit 1; }
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
    case "$file" in
      *.xz) xz -dc "$file" >"$root/lib/modules/$name.ko" ;;
      *.zst) zstd -qdc "$file" >"$root/lib/modules/$name.ko" ;;
      *) cp "$file" "$root/lib/modules/$name.ko" ;;
    esac
    order+=("$name")
  }
  add_module kvm_amd
  # Loop devices: block devices in RAM for the tests' O_DIRECT host I/O (tmpfs has no O_DIRECT).
  add_module loop
  printf '%s\n' "${order[@]}" >"$root/lib/modules/order"
  log "modules: ${order[*]}"
}
# ---------------------------------------------------------------- end debian kernel

if [ "$kind" = project ]; then
  build_project_kernel
  base_inputs="project"
else
  base_inputs="$version"
fi

# Host-side test tools (independent checks of what dmavisor reports), also for tests run directly.
TOOLS="$ROOT/target/tools"
mkdir -p "$TOOLS"
for c in "$HERE"/tools/*.c; do
  gcc -static -O2 -Wall -Wextra -Werror -o "$TOOLS/$(basename "$c" .c)" "$c"
done

hash=$( (echo "$base_inputs"; cat "$HERE/init" "$0" /bin/busybox "$HERE"/tools/*.c) | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/base.cpio.gz" ] && [ -f "$OUT/vmlinuz" ] && [ "$(cat "$OUT/base.hash" 2>/dev/null)" = "$hash" ]; then
  log "sandbox host up to date"
  exit 0
fi
[ "$kind" = project ] || fetch_debian_kernel

root="$OUT/rootfs"
rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,lib64,lib/x86_64-linux-gnu,mnt}
cp /bin/busybox "$root/bin/"
for app in $("$root/bin/busybox" --list); do [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"; done
install -m 0755 "$HERE/init" "$root/init"
cp "$TOOLS"/* "$root/bin/"
echo "$kind" >"$root/kernel-kind"
if [ "$kind" = debian ]; then add_debian_modules "$root"; else : >"$root/lib/modules/order"; fi

# The C library dmavisor links against (it is copied in per run, see run.sh).
for lib in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/{libc.so.6,libm.so.6,libgcc_s.so.1}; do
  cp -L "$lib" "$root$lib"
done

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$OUT/base.cpio.gz"
echo "$hash" >"$OUT/base.hash"
log "sandbox host built: $(stat -c %s "$OUT/base.cpio.gz") bytes of initramfs"

#!/usr/bin/env bash
# Builds the sandbox host: a Debian kernel and a busybox initramfs that QEMU (TCG, emulated AMD
# CPU with SVM) boots on hosts whose /dev/kvm cannot run stock guests. Inside it, kvm-amd gives
# a real nested /dev/kvm, and dmavisor runs there exactly as on a real KVM host.
#
# Outputs: target/sandbox/vmlinuz and target/sandbox/base.cpio.gz (rebuilt when inputs change).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/target/sandbox"
HERE="$ROOT/resources/sandbox"
mkdir -p "$OUT"
log() { echo "==> [sandbox] $*"; }

# The Debian kernel that linux-image-amd64 currently points at.
version=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {sub("linux-image-", "", $2); print $2; exit}')
if [ -z "$version" ]; then
  apt-get update -q >/dev/null
  version=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {sub("linux-image-", "", $2); print $2; exit}')
fi
[ -n "$version" ] || { echo "error: cannot find the Debian kernel version (apt-cache depends linux-image-amd64)" >&2; exit 1; }

hash=$( (echo "$version"; cat "$HERE/init" "$0" /bin/busybox) | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/base.cpio.gz" ] && [ "$(cat "$OUT/base.hash" 2>/dev/null)" = "$hash" ]; then
  log "sandbox host up to date (kernel $version)"
  exit 0
fi

pkg="linux-image-$version-unsigned"
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

root="$OUT/rootfs"
rm -rf "$root" && mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules,lib64,lib/x86_64-linux-gnu,mnt}
cp /bin/busybox "$root/bin/"
for app in $("$root/bin/busybox" --list); do [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"; done
install -m 0755 "$HERE/init" "$root/init"

# kvm-amd and everything it depends on, decompressed, in load order.
moddir="$OUT/pkg/lib/modules/$version"
declare -A seen=()
order=()
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

# The C library dmavisor links against (it is copied in per run, see run.sh).
for lib in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/{libc.so.6,libm.so.6,libgcc_s.so.1}; do
  cp -L "$lib" "$root$lib"
done

(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$OUT/base.cpio.gz"
echo "$hash" >"$OUT/base.hash"
log "sandbox host built: kernel $version, $(stat -c %s "$OUT/base.cpio.gz") bytes of initramfs"

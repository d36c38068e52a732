#!/usr/bin/env bash
# Runs a command inside the sandbox host (QEMU TCG with an emulated AMD CPU with SVM, where
# kvm-amd provides a real nested /dev/kvm) and streams its console here.
#
# usage: resources/sandbox/run.sh [--timeout SECONDS] [--log FILE] [--with PATH]... [--vfio MODE] -- COMMAND...
#   e.g. resources/sandbox/run.sh -- dmavisor run --kernel target/guest/kernel --initrd target/guest/initramfs.cpio.gz
#
# --vfio MODE (or $DMAVISOR_SANDBOX_VFIO=MODE) gives the sandbox DMA-capable PCI devices for the
# VFIO tests; without it the sandbox is the plain `pc` machine it always was. MODE is:
#   edu      `-machine q35` with an emulated Intel IOMMU (`-device intel-iommu,intremap=on`; TCG
#            needs no kernel-irqchip setting) and `intel_iommu=on iommu=pt` on the sandbox kernel's
#            command line. The devices, at fixed addresses:
#              0000:00:04.0  edu 1234:11e8 (dma_mask lifted to 64 bits), its own IOMMU group: bound
#                            to vfio-pci by the init, so /dev/vfio/<group> is viable. The good device.
#              0000:00:05.0  pci-bridge 1b36:0001, a conventional PCI bridge (no driver needed):
#                            devices behind it alias to it, so it and they share one IOMMU group.
#              0000:01:01.0  edu 1234:11e8 behind the bridge, bound to vfio-pci by the init, in
#                            the bridge's group, which is NOT viable (VFIO_GROUP_SET_CONTAINER:
#                            EPERM) because the group also holds:
#              0000:01:02.0  pci-serial 1b36:0002 behind the bridge (on a null chardev), bound to
#                            the kernel's own 8250 `serial` driver.
#            q35's own devices (00:00.0 host bridge, 00:1f.0 LPC, 00:1f.2 SATA, 00:1f.3 SMBus) are
#            there too. Group numbers are the kernel's choice: read them from
#            /sys/bus/pci/devices/<addr>/iommu_group, or from the init's SANDBOX-VFIO line.
#   noiommu  the same machine and devices with no IOMMU (no intel-iommu, no intel_iommu=on): no
#            device has an iommu_group, the bind to vfio-pci fails (EINVAL; the kernel has no VFIO
#            no-IOMMU mode) and the edus stay unbound, for the "no IOMMU" error test.
# The init binds every edu (1234:11e8) to vfio-pci and prints `ls -l /dev/vfio` and one line
#   SANDBOX-VFIO mode=MODE <sysfs path>=<vendor>:<device>,driver=<name|none>,group=<N|none> ...
# for every PCI device (in edu mode today: groups 1 for 00:04.0 and 2 for the bridge's group).
# Only the project's host kernel has VFIO built in: MODE needs DMAVISOR_SANDBOX_KERNEL=project.
# On a host with real VT-d/AMD-Vi and a spare device bound to vfio-pci, dmavisor's
# --device vfio=/sys/bus/pci/devices/... works directly, without this sandbox.
#
# The host kernel is $DMAVISOR_SANDBOX_KERNEL: `project` (default; built by build.sh with CMA, the
# host CMA heap and 1 GiB pages) or `debian` (Debian's own kernel, CMA off).
# $DMAVISOR_SANDBOX_APPEND adds sandbox kernel arguments (e.g. for stall reports, see
# resources/bench/stalls.sh).
# The dmavisor binary (target/release/dmavisor, or $DMAVISOR_BIN) is available as `dmavisor`.
# Every argument that names an existing file, and every --with PATH, is copied into the sandbox
# at the same absolute path. Exit status: the command's, 124 on timeout, 125 if the sandbox
# never reported one.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
kind=${DMAVISOR_SANDBOX_KERNEL:-project}
OUT="$ROOT/target/sandbox/$kind"
timeout=600
log=""
with=()
vfio=${DMAVISOR_SANDBOX_VFIO:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --with) with+=("$2"); shift 2 ;;
    --vfio) vfio=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; usage: $0 [--timeout S] [--log FILE] [--with PATH]... [--vfio edu|noiommu] -- COMMAND..." >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "error: no command given; usage: $0 [options] -- COMMAND..." >&2; exit 2; }
[ -f "$OUT/base.cpio.gz" ] || { echo "error: sandbox host not built; run resources/sandbox/build.sh $kind" >&2; exit 2; }
# A stalled or oopsed sandbox kernel panics and so ends the run at once (it does not recover
# under emulation; docs/benchmarks.md), rather than at the time limit.
panics="softlockup_panic=1 panic_on_oops=1 sysctl.kernel.panic_on_rcu_stall=1"
case "$kind" in
  # 1 GiB for the host's CMA heap (/dev/dma_heap/reserved), and one 1 GiB huge page reserved at
  # boot. Not from hugetlb_cma=: the kernel never long-term pins a page in a CMA area
  # (folio_is_longterm_pinnable), so io_uring and VFIO could not pin a 1 GiB page from there.
  project) mem=6144; append="cma=1G hugepagesz=1G hugepages=1" ;;
  debian) mem=3072; append="" ;;
  *) echo "error: DMAVISOR_SANDBOX_KERNEL=$kind; use project or debian" >&2; exit 2 ;;
esac
# QEMU's default machine (`pc`), or q35 with the VFIO test devices (see the header) on --vfio.
machine=()
case "$vfio" in
  "") ;;
  edu|noiommu)
    [ "$kind" = project ] || { echo "error: --vfio needs the project's sandbox kernel (VFIO built in), not DMAVISOR_SANDBOX_KERNEL=$kind" >&2; exit 2; }
    machine=(-machine q35)
    # The IOMMU must come before the devices it translates for.
    if [ "$vfio" = edu ]; then
      machine+=(-device intel-iommu,intremap=on)
      append+=" intel_iommu=on iommu=pt"
    fi
    machine+=(
      -device edu,addr=04.0,dma_mask=0xffffffffffffffff
      -device pci-bridge,id=vfio-bridge,chassis_nr=1,shpc=off,addr=05.0
      -device edu,bus=vfio-bridge,addr=01.0,dma_mask=0xffffffffffffffff
      -chardev null,id=vfio-peer -device pci-serial,bus=vfio-bridge,addr=02.0,chardev=vfio-peer
    )
    append+=" dmavisor.vfio=$vfio"
    ;;
  *) echo "error: --vfio $vfio; use edu or noiommu" >&2; exit 2 ;;
esac
bin=${DMAVISOR_BIN:-$ROOT/target/release/dmavisor}
[ -x "$bin" ] || { echo "error: $bin missing; run: cargo build --release -p vmm" >&2; exit 2; }

work=$(mktemp -d /tmp/dmavisor-sandbox.XXXXXX)
qemu=""
trap 'if [ -n "$qemu" ]; then kill $qemu 2>/dev/null || true; fi; rm -rf "$work"' EXIT
stage="$work/stage"
mkdir -p "$stage/bin"
cp "$bin" "$stage/bin/dmavisor"

# Copies a file to the same absolute path inside the sandbox; a symlink keeps its own name
# (shared libraries are found by their soname links).
abs_path() { echo "$(readlink -f "$(dirname "$1")")/$(basename "$1")"; }
add_file() {
  local abs
  abs=$(abs_path "$1")
  mkdir -p "$stage$(dirname "$abs")"
  cp -L "$abs" "$stage$abs"
}
quoted=""
for arg in "$@"; do
  if [ -f "$arg" ]; then
    add_file "$arg"
    arg=$(abs_path "$arg")
  fi
  # Also files given as --opt=PATH.
  case "$arg" in --*=*) v=${arg#*=}; [ -f "$v" ] && add_file "$v" && arg="${arg%%=*}=$(abs_path "$v")" ;; esac
  quoted+=" $(printf '%q' "$arg")"
done
for f in "${with[@]}"; do add_file "$f"; done
# Run from the same directory as here, so relative paths (in config files too) still resolve.
mkdir -p "$stage$PWD"
printf '#!/bin/sh\ncd %q\n%s\n' "$PWD" "$quoted" >"$stage/run.sh"

(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) >"$work/run.cpio.gz"
# The kernel unpacks concatenated archives; zero padding between them keeps each aligned.
cat "$OUT/base.cpio.gz" >"$work/initrd"
truncate -s %512 "$work/initrd"
cat "$work/run.cpio.gz" >>"$work/initrd"

log=${log:-$work/console.log}
: >"$log"
# DMAVISOR_SANDBOX_TCG=single runs both sandbox CPUs on one host thread (a control for the
# sandbox stall study, resources/bench/stalls.sh); multi-threaded TCG is the default.
timeout "$timeout" qemu-system-x86_64 -accel tcg,thread=${DMAVISOR_SANDBOX_TCG:-multi} -smp 2 -cpu EPYC,+svm -m "$mem" \
  "${machine[@]}" -nodefaults -display none -no-reboot -serial "file:$log" \
  -kernel "$OUT/vmlinuz" -initrd "$work/initrd" \
  -append "console=ttyS0 panic=-1 quiet $panics $append ${DMAVISOR_SANDBOX_APPEND:-}" </dev/null >"$work/qemu.out" 2>&1 &
qemu=$!
tail -n +1 -f --pid=$qemu "$log" &
tailer=$!
qemu_rc=0
wait $qemu || qemu_rc=$?
wait $tailer 2>/dev/null || true
rc=$(tr -d '\r' <"$log" | sed -n 's/.*SANDBOX-EXIT rc=\([0-9]*\).*/\1/p' | tail -n 1)
if [ -z "$rc" ]; then
  if [ "$qemu_rc" = 124 ]; then
    echo "sandbox: timed out after ${timeout}s" >&2
    exit 124
  fi
  echo "sandbox: no exit status reported; QEMU exited with $qemu_rc and said:" >&2
  grep -v "TCG doesn't support" "$work/qemu.out" >&2 || true
  exit 125
fi
exit "$rc"

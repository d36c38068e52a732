#!/usr/bin/env bash
# Runs a command inside the sandbox host (QEMU TCG with an emulated AMD CPU with SVM, where
# kvm-amd provides a real nested /dev/kvm) and streams its console here.
#
# usage: resources/sandbox/run.sh [--timeout SECONDS] [--log FILE] [--with PATH]... -- COMMAND...
#   e.g. resources/sandbox/run.sh -- dmavisor run --kernel target/guest/kernel --initrd target/guest/initramfs.cpio.gz
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
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --with) with+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1; usage: $0 [--timeout S] [--log FILE] [--with PATH]... -- COMMAND..." >&2; exit 2 ;;
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
  -nodefaults -display none -no-reboot -serial "file:$log" \
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

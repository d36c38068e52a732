#!/usr/bin/env bash
# Host-side pins and migration (issue 5), measured on real guests:
#  1. the seed 001 loop (56 x 1 MiB allocated then freed, over and over, for SECONDS_PER_HEAP
#     per heap) under memory-heavy guest load and host transient-pin churn (O_DIRECT I/O under
#     allocator pins): in one guest the kernel's own CMA heap then virtio-dma (seed001), in
#     another virtio-dma-failfast then virtio-dma (seed004);
#  2. the host MAP latency against the memcpy time of the bytes each MAP moved;
#  3. forced migrations of pattern-filled guest pages: throughput against plain memcpy of the
#     same bytes, measured in the same run (the guest checks every byte afterwards).
# Prints Markdown tables.
#
# usage: resources/bench/pins.sh   (ROUNDS=2 SECONDS_PER_HEAP=20 by default)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. resources/host-kvm.sh
./resources/setup.sh >/dev/null
mkdir -p target/bench
rounds=${ROUNDS:-2}
export SECONDS_PER_HEAP=${SECONDS_PER_HEAP:-20}
# PINS_SESSION=FILE and DMAVISOR_BIN=FILE run another revision's session script and binary
# against this one's guest, for same-run comparisons (docs/benchmarks.md).
session_script=${PINS_SESSION:-resources/bench/pins-session.sh}
# One guest run; a run that did not end cleanly is tried once more, saying so (the sandbox host
# has been seen to stall now and then under emulation, see docs/benchmarks.md).
session() {
  local out
  out=$(session_once "$1") || true
  if ! grep -q 'VMM-RC=0' <<<"$out"; then
    echo "WARNING: the $1 run did not end cleanly; running it again. Its output:" >&2
    tail -n 20 <<<"$out" >&2
    out=$(session_once "$1") || true
  fi
  printf '%s\n' "$out"
}
session_once() {
  if host_runs_stock_guests; then
    PATH="$ROOT/target/release:$PATH" sh "$session_script" "$1" target/guest/kernel target/guest/initramfs.cpio.gz
  else
    ./resources/sandbox/run.sh --timeout 900 -- env SECONDS_PER_HEAP="$SECONDS_PER_HEAP" \
      sh "$session_script" "$1" target/guest/kernel target/guest/initramfs.cpio.gz
  fi
}
if host_runs_stock_guests; then where="directly on this host"; else
  where="inside the sandbox host (nested KVM under QEMU TCG)"; fi

seed_log=target/bench/pins-seeds.log
: >"$seed_log"
for r in $(seq "$rounds"); do
  for mode in seed001 seed004; do
    echo "==> $mode round $r of $rounds" >&2
    session $mode | tr -d '\r' | sed "s/^/$mode.$r /" | tee -a "$seed_log" |
      grep --line-buffered -E 'seed001 heap|memfill_mib' >&2
  done
done
mig_log=target/bench/pins-migrate.log
echo "==> forced migrations" >&2
session migrate | tr -d '\r' | tee "$mig_log" | grep --line-buffered -E 'API migrate|memfill_mib' >&2

echo
echo "The seed 001 loop (56 x 1 MiB, then free all) under memory-heavy guest load and host pin churn, $where ($(date -u +%F)); $rounds rounds; per guest run (scenario seed001 or seed004) the heaps run ${SECONDS_PER_HEAP}s each, one after the other:"
echo
python3 resources/bench/pins-tables.py seeds < <(grep 'DMAVISOR-RESULT seed001 ' "$seed_log")
echo
echo "Host side of the same runs: virtio-dma MAP latency in the VMM, all MAPs and those that moved bytes (migrated lent pages, or copied the range), against the memcpy time of the bytes moved (p99, at the memcpy speed measured below):"
echo
memcpy=$(grep -o '"memcpy_mib_s":[0-9.]*' "$mig_log" | cut -d: -f2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
python3 resources/bench/pins-tables.py maps "$memcpy" < <(grep 'API stat => ' "$seed_log" | sed 's/ API stat => / /')
echo
echo "Forced migrations of the guest's pattern-filled window pages (write-protect, copy, remap), against plain memcpy of the same bytes in the same VMM right after:"
echo
python3 resources/bench/pins-tables.py migrate < <(grep -o 'API migrate frames=32 => .*' "$mig_log" | sed 's/^.* => //')
grep -o 'DMAVISOR-RESULT memfill_mib.*' "$mig_log" | sed 's/^DMAVISOR-RESULT /guest check after the migrations: /'

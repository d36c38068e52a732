#!/usr/bin/env bash
# The region backings side by side (issue: a real host CMA region, item 8), in one sandbox session
# each, the same day: the host's CMA heap (dma-heap), 1 GiB pages, 2 MiB pages, memfd.
#  1. Reserve a 512 MiB region (1 GiB pages: 1 GiB, the smallest such region) behind a window of
#     the same size; the guest asks for one virtio-dma buffer of each size from the window's size
#     down to 2 MiB: the largest it got is the largest contiguous MAP.
#  2. Seed 001 (56 x 1 MiB, allocate all then free all, in a loop, under memory-heavy guest load
#     and guest-side pins; the kernel's own CMA heap then virtio-dma in the same guest), with host
#     pin churn where the kernel can pin the region (not a dma-buf); the window is 56 MiB (1 GiB
#     pages: 1 GiB). Its moving MAPs' latency, against twice the memcpy time of the bytes they
#     moved, at the memcpy speed the same VMM measures right after.
# usage: resources/bench/backings.sh   (SECONDS_PER_HEAP=20 by default)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. resources/host-kvm.sh
./resources/setup.sh >/dev/null
mkdir -p target/bench
export SECONDS_PER_HEAP=${SECONDS_PER_HEAP:-20}
log=target/bench/backings.log
: >"$log"
k=target/guest/kernel i=target/guest/initramfs.cpio.gz
run() {
  if host_runs_stock_guests; then
    PATH="$ROOT/target/release:$PATH" "$@"
  else
    ./resources/sandbox/run.sh --timeout 900 --with resources/bench/backings-session.sh -- "$@"
  fi
}
sizes() {
  local top=$1 s out=""
  for s in $top $((top * 3 / 4)) $((top / 2)) $((top / 4)) 67108864 33554432 16777216 8388608 4194304 2097152; do
    [ "$s" -le "$top" ] && out+="$s "
  done
  echo $out
}
for b in dma-heap hugetlb-1g hugetlb memfd; do
  size=536870912 window=56M churn=1
  [ $b = hugetlb-1g ] && size=1073741824 window=1G
  [ $b = dma-heap ] && churn=0
  echo "==> $b: reserve $size and the largest MAP" >&2
  run sh resources/bench/backings-session.sh $b $size "$(sizes $size)" $k $i 2>&1 | tr -d '\r' | sed "s/^/$b contig /" >>"$log" || true
  echo "==> $b: seed 001 (host pin churn: $churn)" >&2
  run env SECONDS_PER_HEAP="$SECONDS_PER_HEAP" CHURN=$churn BACKING=$b WINDOW=$window MEMCPY=1 \
    sh resources/bench/pins-session.sh seed001 $k $i 2>&1 | tr -d '\r' | sed "s/^/$b seed /" >>"$log" || true
done
if host_runs_stock_guests; then where="directly on this host"; else
  where="inside the sandbox host ($(grep -a -m1 -o 'kernel=[a-z]* [^ ]*' "$log" || true), nested KVM under QEMU TCG)"; fi
echo
echo "Region backings, $where, $(date -u +%F); seed 001 with SECONDS_PER_HEAP=$SECONDS_PER_HEAP:"
echo
python3 resources/bench/backings-table.py <"$log"

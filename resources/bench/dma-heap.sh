#!/usr/bin/env bash
# In-guest allocation latency of a dma-buf heap allocation (DMA_HEAP_IOCTL_ALLOC, measured by
# the guest program dmaheap-test) through virtio-dma, side by side with the kernel's own CMA
# heap (/dev/dma_heap/reserved) on the same CMA area, in the same guest run, rounds interleaved.
# The ratio is the cost of the host round-trip. Prints a Markdown table.
#
# usage: resources/bench/dma-heap.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. resources/host-kvm.sh
./resources/setup.sh >/dev/null
mkdir -p target/bench
log=target/bench/dma-heap.log
args=(run --kernel target/guest/kernel --initrd target/guest/initramfs.cpio.gz
  --cmdline "console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=dma-bench")
if host_runs_stock_guests; then
  where="directly on this host"
  target/release/dmavisor "${args[@]}" </dev/null | tee "$log" | grep --line-buffered RESULT
else
  where="inside the sandbox host (nested KVM under QEMU TCG)"
  ./resources/sandbox/run.sh --timeout 900 -- dmavisor "${args[@]}" | tee "$log" | grep --line-buffered RESULT
fi
region=$(grep -o 'host region reserved.*' "$log" | head -n 1 || true)

echo
echo "dma-buf heap allocation latency in the guest, $where ($(date -u +%F)); 3 rounds x 12 allocations per heap and size:"
echo
echo "| size | reserved p50 µs | reserved p99 µs | virtio-dma p50 µs | virtio-dma p99 µs | p50 ratio |"
echo "|---|---|---|---|---|---|"
tr -d '\r' <"$log" | grep -o 'DMAVISOR-RESULT heap=.*' | awk '
  { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    h = (v["heap"] ~ /virtio/) ? "v" : "r"; k = h SUBSEP v["size"]
    p50[k, ++n[k]] = v["alloc_us_p50"]; if (v["alloc_us_p99"] > p99[k]) p99[k] = v["alloc_us_p99"]
    sizes[v["size"]] = 1 }
  function med(k,   i, j, x, a, m) { m = n[k]; for (i = 1; i <= m; i++) a[i] = p50[k, i]
    for (i = 2; i <= m; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return a[int((m + 1) / 2)] }
  END { for (s in sizes) order[++ns] = s + 0
    for (i = 2; i <= ns; i++) { x = order[i]; for (j = i - 1; j >= 1 && order[j] > x; j--) order[j + 1] = order[j]; order[j + 1] = x }
    for (i = 1; i <= ns; i++) { s = order[i]; r = med("r" SUBSEP s); q = med("v" SUBSEP s)
      printf "| %d KiB | %d | %d | %d | %d | %.1fx |\n", s / 1024, r, p99["r" SUBSEP s], q, p99["v" SUBSEP s], q / r } }'

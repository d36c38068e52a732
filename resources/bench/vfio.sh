#!/usr/bin/env bash
# VFIO passthrough benchmark, in the sandbox host with QEMU's edu device behind an emulated
# Intel IOMMU (resources/sandbox/run.sh --vfio edu), all in one sandbox run, interleaved:
#
# 1. Start: time from VMM start to the guest init's first line, the VMM's resident memory and
#    what it has locked/pinned (VmLck: VFIO's type1 IOMMU accounts its pins there), with the
#    device passed through, for guest RAM of 512M, 1G and 2G: dmavisor dma=mapped, dmavisor
#    dma=all, and QEMU (-M pc, -device vfio-pci) booting the same kernel and initramfs.
# 2. MAP cost: the guest's dma-buf allocation latency (a MAP, the IOMMU map with a device, and
#    the UNMAP at free) at 64 KiB, 1 MiB and 16 MiB, with the device (dma=mapped) and without,
#    rounds interleaved in the same sandbox; and the host's own mean IOMMU map/unmap time.
#
# usage: resources/bench/vfio.sh [RUNS]   (default 5)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
runs=${1:-5}
./resources/setup.sh >/dev/null
mkdir -p target/bench
gcc -static -O2 -Wall -o target/bench/firstline resources/bench/firstline.c

kernel=$ROOT/target/guest/kernel
initrd=$ROOT/target/guest/initramfs.cpio.gz
qemu=$(command -v qemu-system-x86_64)
dev=0000:00:04.0
cmdline="console=ttyS0 panic=-1 quiet dmavisor.scenario=info"
inner=target/bench/vfio-inner.sh
cat >"$inner" <<INNER
#!/bin/sh
fl() { $ROOT/target/bench/firstline --marker DMAVISOR-INIT --timeout 300 --guest-min-kb 65536 "\$@"; }
for i in \$(seq 1 $runs); do
  for size in 512M 1G 2G; do
    fl --label mapped-\$size --run \$i -- dmavisor run --kernel $kernel --initrd $initrd \\
      --memory size=\$size --dma-window size=64M --region backing=hugetlb \\
      --device vfio=$dev,dma=mapped --cmdline "$cmdline reboot=k"
    fl --label all-\$size --run \$i -- dmavisor run --kernel $kernel --initrd $initrd \\
      --memory size=\$size --dma-window size=64M --region backing=hugetlb \\
      --device vfio=$dev,dma=all --cmdline "$cmdline reboot=k"
    fl --label qemu-\$size --run \$i -- $qemu -M pc -enable-kvm -cpu host -m \$size -smp 1 \\
      -nodefaults -no-user-config -display none -serial stdio -no-reboot \\
      -kernel $kernel -initrd $initrd -device vfio-pci,host=$dev \\
      -append "$cmdline reboot=t cma=64M"
  done
done
# MAP cost: the guest's dma-bench scenario (dma-buf allocations at 64K, 1M, 16M), with and
# without the device, alternating.
for i in 1 2 3; do
  for with in device none; do
    extra=""; [ \$with = device ] && extra="--device vfio=$dev"
    sock=/tmp/vfio-bench.sock; rm -f \$sock
    dmavisor run --kernel $kernel --initrd $initrd --memory size=512M --dma-window size=64M \\
      --region backing=hugetlb \$extra --api-sock \$sock \\
      --cmdline "console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=dma-bench" \\
      > /tmp/vfio-bench.out 2>&1 &
    vmm=\$!
    # The IOMMU counters only grow: the last reply before the VM ends has (nearly) all.
    last=""
    while kill -0 \$vmm 2>/dev/null; do
      s=\$(dmavisor stat --api-sock \$sock --json 2>/dev/null) && last=\$s
      sleep 1
    done
    echo "IOMMU-STAT with=\$with \$last"
    wait \$vmm || true
    grep -o 'DMAVISOR-RESULT heap=.*' /tmp/vfio-bench.out | sed "s/^/MAPCOST with=\$with /"
  done
done
INNER
chmod +x "$inner"

log=target/bench/vfio.log
withs=(--with "$kernel" --with "$initrd" --with target/bench/firstline --with "$qemu")
for lib in $(ldd "$qemu" | awk '/=> \// {print $3} /^\s*\/lib/ {print $1}'); do withs+=(--with "$lib"); done
for f in /usr/share/qemu/* /usr/share/seabios/*; do [ -f "$f" ] && withs+=(--with "$f"); done
./resources/sandbox/run.sh --vfio edu --timeout 3000 "${withs[@]}" -- sh "$inner" | tee "$log" |
  grep --line-buffered -E "BENCH|MAPCOST|firstline"

echo
echo "Start with a device passed through (edu behind the sandbox's emulated VT-d), $runs runs each, interleaved ($(date -u +%F)):"
echo
echo "| guest RAM | VMM | start median ms | p90 ms | max ms | failed | RSS median MiB | locked (pinned) median MiB |"
echo "|---|---|---|---|---|---|---|---|"
for size in 512M 1G 2G; do
  for vmm in mapped all qemu; do
    label=$vmm-$size
    tr -d '\r' <"$log" | grep -o "BENCH label=$label .*" | awk -v size="$size" -v vmm="$vmm" 'BEGIN { n = 0; failed = 0 }
      { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        if (v["first_line_ms"] < 0) { failed++; next }
        t[n] = v["first_line_ms"]; r[n] = v["rss_total_kb"]; l[n] = v["locked_kb"]; n++ }
      function sort(a, k,   i, j, x) { for (i = 1; i < k; i++) { x = a[i]; for (j = i - 1; j >= 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x } }
      function pct(a, k, p) { return a[int((k - 1) * p + 0.5)] }
      END { name = (vmm == "qemu") ? "QEMU -device vfio-pci" : "dmavisor dma=" vmm
        if (n == 0) { printf "| %s | %s | - | - | - | %d | - | - |\n", size, name, failed; exit }
        sort(t, n); sort(r, n); sort(l, n)
        printf "| %s | %s | %.0f | %.0f | %.0f | %d | %.0f | %.0f |\n", size, name, pct(t, n, 0.5), pct(t, n, 0.9), t[n - 1], failed, pct(r, n, 0.5) / 1024, pct(l, n, 0.5) / 1024 }'
  done
done

echo
echo "dma-buf allocation in the guest (MAP; with the device also the IOMMU map; UNMAP at free), 3 rounds x 12 per size and case, alternating:"
echo
echo "| size | no device p50 µs | no device p99 µs | dma=mapped p50 µs | dma=mapped p99 µs | p50 ratio |"
echo "|---|---|---|---|---|---|"
tr -d '\r' <"$log" | grep -o 'MAPCOST with=.*' | grep 'heap=/dev/dma_heap/virtio-dma ' | awk '
  { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    k = v["with"] SUBSEP v["size"]; p50[k, ++n[k]] = v["alloc_us_p50"]
    if (v["alloc_us_p99"] > p99[k]) p99[k] = v["alloc_us_p99"]; sizes[v["size"]] = 1 }
  function med(k,   i, j, x, a, m) { m = n[k]; for (i = 1; i <= m; i++) a[i] = p50[k, i]
    for (i = 2; i <= m; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return a[int((m + 1) / 2)] }
  END { for (s in sizes) order[++ns] = s + 0
    for (i = 2; i <= ns; i++) { x = order[i]; for (j = i - 1; j >= 1 && order[j] > x; j--) order[j + 1] = order[j]; order[j + 1] = x }
    for (i = 1; i <= ns; i++) { s = order[i]; a = med("none" SUBSEP s); b = med("device" SUBSEP s)
      printf "| %d KiB | %d | %d | %d | %d | %.2f |\n", s / 1024, a, p99["none", s], b, p99["device", s], (a > 0) ? b / a : 0 } }'
echo
echo "Host side, per MAP (the VMM's own latency of each MAP, which with the device includes the IOMMU map; UNMAPs are answered without the guest waiting):"
echo
echo "| run | case | MAPs | MAP p50 µs | MAP p99 µs | IOMMU maps | IOMMU map mean µs | IOMMU unmap mean µs |"
echo "|---|---|---|---|---|---|---|---|"
tr -d '\r' <"$log" | grep -o 'IOMMU-STAT with=.*' | sed 's/IOMMU-STAT with=//' |
  python3 -c '
import json, sys
runs = {}
for line in sys.stdin:
    case, _, text = line.partition(" ")
    runs[case] = runs.get(case, 0) + 1
    try:
        st = json.loads(text)
    except ValueError:
        print("| %d | %s | (no stat) | | | | | |" % (runs[case], case))
        continue
    m = st.get("maps") or {}
    lat = m.get("latency_us") or {}
    io = st.get("iommu") or {}
    print("| %d | %s | %s | %s | %s | %s | %s | %s |" % (runs[case], "dma=mapped" if case == "device" else "no device",
        m.get("count"), lat.get("p50"), lat.get("p99"), io.get("maps", "-"), io.get("map_us_mean", "-"), io.get("unmap_us_mean", "-")))'

#!/usr/bin/env bash
# Boot-time and memory benchmark: time from VMM start to the first line the guest's init
# prints, for dmavisor and for QEMU -M microvm (qboot firmware, no option ROMs) booting the
# same kernel and initramfs with the same RAM, interleaved, in the same host (the sandbox host
# where this machine's KVM cannot run stock guests). Also dmavisor's resident memory outside
# guest RAM and the DMA window. Prints a Markdown table.
#
# usage: resources/bench/boot-time.sh [RUNS]   (default 7)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. resources/host-kvm.sh
runs=${1:-7}
./resources/setup.sh >/dev/null
mkdir -p target/bench
gcc -static -O2 -Wall -o target/bench/firstline resources/bench/firstline.c

kernel=$ROOT/target/guest/kernel
initrd=$ROOT/target/guest/initramfs.cpio.gz
qemu=$(command -v qemu-system-x86_64)
# The same guest for dmavisor and QEMU: 608M of RAM with cma=96M inside it. A third row runs
# dmavisor as the product is meant to be run: 512M of RAM plus a 96M DMA window (the guest's CMA
# area), which also reserves and populates a 96M host region while the guest boots.
# Mappings of 96M or more are guest memory or the region, both left out of the VMM's overhead.
cmdline="console=ttyS0 panic=-1 quiet dmavisor.scenario=info"
inner=target/bench/boot-time-inner.sh
cat >"$inner" <<INNER
#!/bin/sh
for i in \$(seq 1 $runs); do
  $ROOT/target/bench/firstline --label dmavisor --run \$i --marker DMAVISOR-INIT --timeout 60 --guest-min-kb 98304 -- \\
    dmavisor run --kernel $kernel --initrd $initrd --memory size=608M --dma-window size=0 \\
      --cmdline "$cmdline reboot=k cma=96M"
  $ROOT/target/bench/firstline --label qemu-microvm --run \$i --marker DMAVISOR-INIT --timeout 60 --guest-min-kb 98304 -- \\
    $qemu -M microvm,x-option-roms=off,rtc=off -enable-kvm -cpu host -m 608M -smp 1 \\
      -nodefaults -no-user-config -display none -serial stdio -no-reboot \\
      -bios /usr/share/qemu/qboot.rom -kernel $kernel -initrd $initrd \\
      -append "$cmdline reboot=t cma=96M"
  $ROOT/target/bench/firstline --label dmavisor-window --run \$i --marker DMAVISOR-INIT --timeout 60 --guest-min-kb 98304 -- \\
    dmavisor run --kernel $kernel --initrd $initrd --memory size=512M --dma-window size=96M \\
      --cmdline "$cmdline reboot=k"
done
INNER
chmod +x "$inner"

log=target/bench/boot-time.log
if host_runs_stock_guests; then
  where="directly on this host"
  PATH="$ROOT/target/release:$PATH" sh "$inner" | tee "$log"
else
  where="inside the sandbox host (nested KVM under QEMU TCG)"
  withs=(--with "$kernel" --with "$initrd" --with target/bench/firstline --with "$qemu" --with /usr/share/qemu/qboot.rom)
  for lib in $(ldd "$qemu" | awk '/=> \// {print $3} /^\s*\/lib/ {print $1}'); do withs+=(--with "$lib"); done
  ./resources/sandbox/run.sh --timeout 1500 "${withs[@]}" -- sh "$inner" | tee "$log" | grep --line-buffered BENCH
fi

echo
echo "Boot to the guest init's first line, $runs runs each, $where ($(date -u +%F)):"
echo
echo "| VMM | median ms | p90 ms | min ms | max ms | failed | RSS outside guest memory, median KiB |"
echo "|---|---|---|---|---|---|---|"
for label in dmavisor qemu-microvm dmavisor-window; do
  tr -d '\r' <"$log" | grep -o "BENCH label=$label .*" | awk 'BEGIN { n = 0; failed = 0 }
    { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      if (v["first_line_ms"] < 0) { failed++; next }
      t[n] = v["first_line_ms"]; m[n] = v["rss_overhead_kb"]; n++ }
    function sort(a, k,   i, j, x) { for (i = 1; i < k; i++) { x = a[i]; for (j = i - 1; j >= 0 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x } }
    function pct(a, k, p) { return a[int((k - 1) * p + 0.5)] }
    END { sort(t, n); sort(m, n)
      printf "| %s | %.0f | %.0f | %.0f | %.0f | %d | %d |\n", label, pct(t, n, 0.5), pct(t, n, 0.9), t[0], t[n - 1], failed, pct(m, n, 0.5) }' label="$label"
done
# Runs are interleaved, so each dmavisor run has a QEMU run next to it under the same load:
# the paired ratio is the least noisy comparison.
for label in dmavisor dmavisor-window; do
  tr -d '\r' <"$log" | grep -o "BENCH label=.*" | awk -v want="$label" '
    { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      if (v["first_line_ms"] < 0) next
      if (v["label"] == want) d[v["run"]] = v["first_line_ms"]
      else if (v["label"] == "qemu-microvm") q[v["run"]] = v["first_line_ms"] }
    END { n = 0; won = 0
      for (r in d) if (r in q) { ratio[n++] = d[r] / q[r]; if (d[r] <= q[r]) won++ }
      for (i = 1; i < n; i++) { x = ratio[i]; for (j = i - 1; j >= 0 && ratio[j] > x; j--) ratio[j + 1] = ratio[j]; ratio[j + 1] = x }
      printf "Paired runs, %s vs qemu-microvm: at or below QEMU in %d of %d; median ratio %.2f\n", want, won, n, ratio[int((n - 1) / 2)] }'
done

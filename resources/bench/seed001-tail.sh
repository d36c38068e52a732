#!/usr/bin/env bash
# The seed 001 tail: the allocation latency of 56 x 1 MiB allocated then freed, over and over,
# under memory-heavy guest load, guest-side pins and host pin churn (as the seed001 test), for
# the kernel's CMA heap ("reserved", the baseline) and virtio-dma, with 1 MiB buffers allocated
# as asked ("exact": one cma_alloc() and one MAP of 1 MiB, inside a 2 MiB granule with
# VIRTIO_DMA_F_SUB_GRANULE) and in shared 2 MiB chunks ("pooled": one cma_alloc() and MAP per
# two buffers, the driver before). In each guest run the three alternate in short segments, in
# alternating order (scenario seed001-ab), so drift falls on all alike. Prints Markdown tables.
#
# usage: resources/bench/seed001-tail.sh   (ROUNDS=2 guest runs, SEGMENTS=3 per run,
#        SECONDS_PER_HEAP=8 per segment by default)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
. resources/host-kvm.sh
./resources/setup.sh >/dev/null
mkdir -p target/bench
rounds=${ROUNDS:-2}
export SECONDS_PER_HEAP=${SECONDS_PER_HEAP:-8} SEGMENTS=${SEGMENTS:-3}
run_once() {
  if host_runs_stock_guests; then
    PATH="$ROOT/target/release:$PATH" sh resources/bench/pins-session.sh seed001-ab \
      target/guest/kernel target/guest/initramfs.cpio.gz
  else
    ./resources/sandbox/run.sh --timeout 900 -- env SECONDS_PER_HEAP="$SECONDS_PER_HEAP" \
      SEGMENTS="$SEGMENTS" sh resources/bench/pins-session.sh seed001-ab \
      target/guest/kernel target/guest/initramfs.cpio.gz
  fi
}
log=target/bench/seed001-tail.log
: >"$log"
retries=0
for r in $(seq "$rounds"); do
  echo "==> guest run $r of $rounds" >&2
  out=$(run_once | tr -d '\r') || true
  if ! grep -q 'VMM-RC=0' <<<"$out"; then
    retries=$((retries + 1))
    echo "WARNING: guest run $r did not end cleanly; running it again. Its last lines:" >&2
    tail -n 8 <<<"$out" >&2
    out=$(run_once | tr -d '\r') || true
  fi
  grep 'DMAVISOR-RESULT seed001 ' <<<"$out" | sed "s/^/run$r /" | tee -a "$log" >&2 || true
done
if host_runs_stock_guests; then where="directly on this host"; else
  where="inside the sandbox host (nested KVM under QEMU TCG)"; fi
echo
echo "Seed 001 allocation latency, $where ($(date -u +%F)): $rounds guest runs x $SEGMENTS segments x ${SECONDS_PER_HEAP}s per heap, interleaved; $retries guest run(s) repeated:"
echo
python3 - "$log" <<'PY'
import re, statistics, sys
rows = []
for line in open(sys.argv[1]):
    kv = dict(re.findall(r'(\w+)=(\S+)', line))
    if 'label' in kv and 'p99_us' in kv:
        rows.append((line.split()[0], kv))
labels = ['reserved', 'exact', 'pooled']
names = {'reserved': 'kernel CMA heap (baseline)', 'exact': 'virtio-dma, exact 1 MiB',
         'pooled': 'virtio-dma, pooled 2 MiB chunks'}
print('| heap | segments | loops | failed loops | p50 median ms | p99 median ms | p99 worst segment ms | max ms |')
print('|---|---|---|---|---|---|---|---|')
for l in labels:
    seg = [kv for _, kv in rows if kv['label'] == l]
    if not seg:
        continue
    ms = lambda k: [int(kv[k]) / 1000 for kv in seg]
    print(f"| {names[l]} | {len(seg)} | {sum(int(kv['loops']) for kv in seg)} | "
          f"{sum(int(kv['failed_loops']) for kv in seg)} | {statistics.median(ms('p50_us')):.1f} | "
          f"{statistics.median(ms('p99_us')):.1f} | {max(ms('p99_us')):.1f} | {max(ms('max_us')):.1f} |")
# Segment by segment: each virtio-dma segment against the kernel heap's in the same segment.
print()
seg_of = {}
for run, kv in rows:
    seg_of.setdefault(run, []).append(kv)
for l in ['exact', 'pooled']:
    wins = total = 0
    ratios = []
    for run, kvs in seg_of.items():
        base = [int(k['p99_us']) for k in kvs if k['label'] == 'reserved']
        ours = [int(k['p99_us']) for k in kvs if k['label'] == l]
        for b, o in zip(base, ours):
            total += 1
            wins += o <= b
            ratios.append(o / b)
    if total:
        print(f"- {names[l]}: p99 at or below the kernel heap's in {wins} of {total} segments; "
              f"p99 ratio to the kernel heap median {statistics.median(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
PY

"""Tables for resources/bench/backings.sh from its log (lines 'BACKING contig|seed TEXT')."""
import json
import re
import sys

runs = {}
order = []
for line in sys.stdin:
    m = re.match(r"(\S+) (contig|seed) (.*)", line.rstrip("\n"))
    if not m:
        continue
    b, kind, text = m.groups()
    if b not in runs:
        runs[b] = {"contig": [], "seed": []}
        order.append(b)
    runs[b][kind].append(text)


def mib(x):
    return f"{x / 2**20:.0f} MiB"


def ms(us):
    return f"{us / 1000:.1f}"


print("| backing | region | reserve (ms) | host extents, largest | largest guest MAP | seed 001 host pin churn | virtio-dma failed loops | virtio-dma p50 / p99 (ms) | kernel CMA heap p50 / p99 (ms), same guest | moving MAPs | moving MAP p50 / p99 (ms) | bytes moved p99 | 2x memcpy of those (ms) | moving p99 by phase: claim / alloc / remap / release (ms) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for b in order:
    c, s = runs[b]["contig"], runs[b]["seed"]
    stats = [json.loads(t.split(" ", 2)[2]) for t in c if t.startswith("STAT ") and t.split(" ", 2)[2].startswith("{")]
    got = [int(m.group(1)) for t in c
           for m in [re.search(r"DMAVISOR-RESULT heap=/dev/dma_heap/virtio-dma size=(\d+) count=1 ok=1 ", t)] if m]
    region = next((st["region"] for st in stats if st.get("region")), None)
    results = {}
    for t in s:
        m = re.search(r"DMAVISOR-RESULT seed001 heap=(\S+) (.*)", t)
        if m:
            results[m.group(1)] = dict(kv.split("=", 1) for kv in m.group(2).split())
    ours = results.get("/dev/dma_heap/virtio-dma", {})
    kern = results.get("/dev/dma_heap/reserved", {})
    stat = next((json.loads(t.split(" => ", 1)[1]) for t in s if t.startswith("API stat => ")), {})
    mig = next((json.loads(t.split(" => ", 1)[1]) for t in s if t.startswith("API migrate ") and "{" in t), {})
    churn = next((t.split(" => ", 1)[1] for t in s if t.startswith("API pin-churn-stop => ")), None)
    mv = (stat.get("maps") or {}).get("moving") or {}
    memcpy = mig.get("memcpy_mib_s")
    p99b = (mv.get("moved_bytes") or {}).get("p99", 0)
    base = f"{2 * p99b / (memcpy * 2**20) * 1000:.1f}" if memcpy and p99b else "–"
    ph = mv.get("phases_us") or {}
    phases = " / ".join(ms((ph.get(k) or {}).get("p99", 0)) for k in ("claim", "alloc", "remap", "release")) if mv.get("count") else "–"
    print("| " + " | ".join([
        b,
        mib(region["size"]) if region else "failed",
        str(region["reserve_ms"]) if region else "–",
        f"{len(region['extents'])}, {mib(region['largest_extent'])}" if region else "–",
        mib(max(got)) if got else "none",
        ("yes" if churn and '"pins":0' not in churn else "no (the kernel cannot pin a dma-buf)" if b == "dma-heap" else "no"),
        f"{ours.get('failed_loops', '?')} of {ours.get('loops', '?')}",
        f"{ms(int(ours['p50_us']))} / {ms(int(ours['p99_us']))}" if ours else "–",
        f"{ms(int(kern['p50_us']))} / {ms(int(kern['p99_us']))}" if kern else "–",
        str(mv.get("count", 0)),
        f"{ms(mv['latency_us']['p50'])} / {ms(mv['latency_us']['p99'])}" if mv.get("count") else "–",
        mib(p99b) if mv.get("count") else "–",
        base if mv.get("count") else "–",
        phases,
    ]) + " |")

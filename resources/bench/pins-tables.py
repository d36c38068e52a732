"""Markdown tables from the control API's JSON replies, for resources/bench/pins.sh."""
import json
import sys


def seeds():
    print("| run | heap | loops | failed loops | failed allocations | p50 µs | p99 µs | max µs |")
    print("|---|---|---|---|---|---|---|---|")
    for line in sys.stdin:
        label, rest = line.split(" ", 1)
        v = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
        print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            label, v["heap"], v["loops"], v["failed_loops"], v["failed_allocs"], v["p50_us"],
            v["p99_us"], v["max_us"]))


def maps(memcpy_mib_s):
    print("| run | MAPs | in place | all: p50 µs | all: p99 µs | all: max µs "
          "| moving MAPs | moving: p99 µs | moving: max µs | bytes moved p99 KiB "
          "| memcpy of that µs | moving p99 / (2 x memcpy) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in sys.stdin:
        r, reply = line.split(" ", 1)
        m = json.loads(reply)["maps"]
        lat, mv = m["latency_us"], m["moving"]
        moved = mv["moved_bytes"]["p99"]
        copy_us = moved / (memcpy_mib_s * 2**20) * 1e6 if memcpy_mib_s else 0.0
        ratio = "%.2f" % (mv["latency_us"]["p99"] / (2 * copy_us)) if copy_us else "n/a"
        print("| %s | %d | %d | %d | %d | %d | %d | %d | %d | %d | %.0f | %s |" % (
            r, m["count"], m["in_place"], lat["p50"], lat["p99"], lat["max"], mv["count"],
            mv["latency_us"]["p99"], mv["latency_us"]["max"], moved // 1024, copy_us, ratio))


def migrate():
    print("| run | pages moved | MiB | migration MiB/s | memcpy MiB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r, line in enumerate(sys.stdin, 1):
        m = json.loads(line)
        print("| %d | %d | %d | %.0f | %.0f | %.2f |" % (
            r, m["moved"], m["bytes"] >> 20, m["migrate_mib_s"], m["memcpy_mib_s"],
            m["migrate_mib_s"] / m["memcpy_mib_s"]))


if __name__ == "__main__":
    if sys.argv[1] == "seeds":
        seeds()
    elif sys.argv[1] == "maps":
        maps(float(sys.argv[2] or 0))
    else:
        migrate()

"""Markdown tables from the control API's JSON replies, for resources/bench/pins.sh."""
import json
import sys


def maps(memcpy_mib_s):
    print("| round | MAPs | in place | MAP p50 µs | MAP p99 µs | MAP max µs | moved p99 KiB "
          "| memcpy of that µs | p99 / (2 x memcpy) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r, line in enumerate(sys.stdin, 1):
        m = json.loads(line)["maps"]
        lat, moved = m["latency_us"], m["moved_bytes"]["p99"]
        copy_us = moved / (memcpy_mib_s * 2**20) * 1e6 if memcpy_mib_s else 0.0
        ratio = "%.1f" % (lat["p99"] / (2 * copy_us)) if copy_us else "n/a (nothing moved)"
        print("| %d | %d | %d | %d | %d | %d | %d | %.0f | %s |" % (
            r, m["count"], m["in_place"], lat["p50"], lat["p99"], lat["max"], moved // 1024,
            copy_us, ratio))


def migrate():
    print("| run | pages moved | MiB | migration MiB/s | memcpy MiB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r, line in enumerate(sys.stdin, 1):
        m = json.loads(line)
        print("| %d | %d | %d | %.0f | %.0f | %.2f |" % (
            r, m["moved"], m["bytes"] >> 20, m["migrate_mib_s"], m["memcpy_mib_s"],
            m["migrate_mib_s"] / m["memcpy_mib_s"]))


if __name__ == "__main__":
    if sys.argv[1] == "maps":
        maps(float(sys.argv[2] or 0))
    else:
        migrate()

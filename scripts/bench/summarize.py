"""Summarize oha JSON results of scripts/bench/proxy.sh.

    python3 summarize.py row NAME FILE.json   # one line, while running
    python3 summarize.py table OUT_DIR        # the markdown tables
"""
import json
import os
import sys

PAIRS = [
    ("Unary, fixed rate", "unary_direct", "unary_spillway"),
    ("Unary, fixed rate, info log", "unary_direct", "unary_spillway_info"),
    ("Streaming, fixed rate", "stream_direct", "stream_spillway"),
    ("Streaming, paced tokens", "stream_paced_direct", "stream_paced_spillway"),
    ("Unary, fixed rate, Redis store", "unary_direct", "unary_spillway_redis"),
    ("Streaming, fixed rate, Redis store", "stream_direct", "stream_spillway_redis"),
    ("Unary, fixed rate, Redis store, no leases", "unary_direct", "unary_spillway_redis_nolease"),
    ("Streaming, fixed rate, Redis store, no leases", "stream_direct",
     "stream_spillway_redis_nolease"),
]
MAX = [
    ("Unary, closed loop", "unary_max_direct", "unary_max_spillway"),
    ("Unary, closed loop, info log", "unary_max_direct", "unary_max_spillway_info"),
    ("Streaming, closed loop", "stream_max_direct", "stream_max_spillway"),
]
PCTS = ["p50", "p90", "p99", "p99.9"]


def load(path):
    with open(path) as f:
        d = json.load(f)
    s = d["summary"]
    codes = d.get("statusCodeDistribution", {})
    errors = sum(d.get("errorDistribution", {}).values())
    non200 = sum(v for k, v in codes.items() if k != "200")
    ms = lambda x: None if x is None else x * 1000.0
    return {
        "rate": s["requestsPerSec"],
        "ok": codes.get("200", 0),
        "errors": errors + non200,
        "errdist": d.get("errorDistribution", {}),
        "codes": codes,
        "lat": {p: ms(d["latencyPercentiles"].get(p)) for p in PCTS},
        "max": ms(s["slowest"]),
        "fb": {p: ms((d.get("firstBytePercentiles") or {}).get(p)) for p in PCTS},
    }


def fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def row(name, path):
    r = load(path)
    lat = " ".join(f"{p}={fmt(r['lat'][p])}" for p in PCTS)
    print(f"{name:28s} rate={r['rate']:9.1f}/s ok={r['ok']} errors={r['errors']} "
          f"{lat} max={fmt(r['max'])} ms  first-byte p50={fmt(r['fb']['p50'])} p99={fmt(r['fb']['p99'])}")
    if r["errdist"]:
        print("  errors:", r["errdist"])


def table(out):
    res = {}
    for f in os.listdir(out):
        if f.endswith(".json"):
            res[f[:-5]] = load(os.path.join(out, f))
    print("### Latency, fixed rate (ms; time to full body; coordinated-omission corrected)\n")
    print("| run | path | rate/s | ok | errors | p50 | p90 | p99 | p99.9 | max | first byte p50 | first byte p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for title, d, s in PAIRS:
        if d not in res or s not in res:
            continue
        for label, key in (("direct", d), ("Spillway", s)):
            r = res[key]
            print(f"| {title} | {label} | {r['rate']:.1f} | {r['ok']} | {r['errors']} | "
                  + " | ".join(fmt(r["lat"][p]) for p in PCTS)
                  + f" | {fmt(r['max'])} | {fmt(r['fb']['p50'])} | {fmt(r['fb']['p99'])} |")
        a, b = res[d], res[s]
        print(f"| {title} | **added** | | | | "
              + " | ".join(f"**{fmt(b['lat'][p] - a['lat'][p])}**" for p in PCTS)
              + f" | {fmt(b['max'] - a['max'])} | {fmt(b['fb']['p50'] - a['fb']['p50'])} | "
              f"{fmt(b['fb']['p99'] - a['fb']['p99'])} |")
    shared = [(t, m, r) for t, m, r in (
        ("Unary", "unary_spillway", "unary_spillway_redis"),
        ("Streaming", "stream_spillway", "stream_spillway_redis"),
        ("Unary, no leases", "unary_spillway", "unary_spillway_redis_nolease"),
        ("Streaming, no leases", "stream_spillway", "stream_spillway_redis_nolease"))
        if m in res and r in res]
    if shared:
        print("\n### What the Redis store adds over the in-memory one (ms, same run)\n")
        print("| run | " + " | ".join(PCTS) + " |")
        print("|---|" + "---|" * len(PCTS))
        for title, m, r in shared:
            print(f"| {title} | " + " | ".join(
                fmt(res[r]["lat"][p] - res[m]["lat"][p]) for p in PCTS) + " |")
    print("\n### Throughput, closed loop\n")
    print("| run | path | requests/s | ok | errors | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|")
    for title, d, s in MAX:
        if d not in res or s not in res:
            continue
        for label, key in (("direct", d), ("Spillway", s)):
            r = res[key]
            print(f"| {title} | {label} | {r['rate']:.0f} | {r['ok']} | {r['errors']} | "
                  f"{fmt(r['lat']['p50'])} | {fmt(r['lat']['p99'])} | {fmt(r['max'])} |")
        print(f"| {title} | Spillway / direct | {res[s]['rate'] / res[d]['rate']:.2f} | | | | | |")
    leases = os.path.join(out, "redis_leases.txt")
    if os.path.exists(leases):
        print("\n### Leases in the Redis runs (the gateway's counters)\n\n```")
        print(open(leases).read().rstrip())
        print("```")
    mem = os.path.join(out, "memory.txt")
    if os.path.exists(mem):
        print("\n### Memory (spillway-bench open-streams)\n\n```")
        print(open(mem).read().rstrip())
        print("```")


if __name__ == "__main__":
    if sys.argv[1] == "row":
        row(sys.argv[2], sys.argv[3])
    else:
        table(sys.argv[2])

"""Turn bench/run's raw measurements into the results table and its CSV.

    python bench/report.py RAW.csv OUT.csv --keys N --small M [--info INFO.txt]

RAW.csv lines are ``measurement,target,round,value,busy_pct`` (no header). Each figure
is the median over its rounds; each ratio is the median of the figure over the median
of its reference, both measured in the same run. Prints the table (after INFO.txt,
when given) and writes OUT.csv. Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict

Target = tuple[str, str | None, str | None, float | tuple[str, str] | None]


def kn(n: int) -> str:
    """A key count as the scale rows name it; bench/run's kn() gives the same names."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def scenarios(keys: int, small: int) -> list[tuple[str, str, str, list[Target]]]:
    """(measurement, title, unit, [(target, reference target, goal kind, goal)])

    The goals are issue 12's (README, Performance).

    goal kind "min_ratio": ratio to the reference must be >= goal;
    "max_value": the figure itself must be <= goal;
    "min_ratio_of": ratio to the reference must be >= the ratio of goal's (target, reference)
    pair in the same measurement, measured in the same run.
    """
    big, sm = kn(keys), kn(small)
    return [
        ("resp_hit_P1", "RESP GET hit, redis-benchmark -P 1", "ops/s", [
            ("redis-server", None, None, None),
            ("twemproxy", "redis-server", None, None),
            ("redisp c=1", "redis-server", "min_ratio", 0.6),
            ("redisp c=64", "redis-server", None, None),
        ]),
        ("resp_hit_P16", "RESP GET hit, redis-benchmark -P 16", "ops/s", [
            ("redis-server", None, None, None),
            ("twemproxy", "redis-server", None, None),
            ("redisp c=1", "twemproxy", "min_ratio", 1.5),
            ("redisp c=64", "twemproxy", None, None),
        ]),
        ("resp_miss_P16", "RESP GET miss (redisp --capacity 0), -P 16, random keys", "ops/s", [
            ("twemproxy", None, None, None),
            ("redisp c=64", "twemproxy", "min_ratio", 0.8),
        ]),
        ("resp_set_P16", "RESP SET forwarded (redisp --capacity 0), -P 16, random keys",
         "ops/s", [
            ("twemproxy", None, None, None),
            ("redisp c=64", "twemproxy", "min_ratio", 0.9),
        ]),
        ("http_hit", "HTTP GET hit, wrk (webdis: GET /GET/key)", "req/s", [
            ("webdis", None, None, None),
            ("redisp c=1", "webdis", "min_ratio", 1.5),
        ]),
        ("memory", f"memory, {keys} cached keys of 16 B + 100 B values", "B/entry", [
            ("redisp", None, "max_value", 150.0),
        ]),
        ("scale", f"scale, RESP GET hit -P 16, random keys: over {big} (all cached in redisp) "
         f"and over {sm}", "ops/s", [
            (f"twemproxy {big}", None, None, None),
            (f"redisp {big}", f"twemproxy {big}", "min_ratio", 1.0),
            (f"redis-server {sm}", None, None, None),
            (f"redis-server {big}", f"redis-server {sm}", None, None),
            (f"redisp {sm}", None, None, None),
            (f"redisp {big}", f"redisp {sm}", "min_ratio_of",
             (f"redis-server {big}", f"redis-server {sm}")),
        ]),
    ]


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}"


def short(x: float) -> str:
    return f"{x / 1000:.1f}k" if abs(x) >= 10000 else f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("out")
    ap.add_argument("--keys", type=int, required=True)
    ap.add_argument("--small", type=int, required=True)
    ap.add_argument("--info")
    ap.add_argument("--stamp", default="")
    a = ap.parse_args()

    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    busy: dict[tuple[str, str], list[int]] = defaultdict(list)
    extra: list[tuple[str, str, float]] = []
    with open(a.raw, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            m, t, rnd, v, b = (row + [""] * 5)[:5]
            if rnd == "info":
                extra.append((m, t, float(v)))
                continue
            values[(m, t)].append(float(v))
            if b.isdigit():
                busy[(m, t)].append(int(b))

    def med(m: str, t: str | None) -> float | None:
        vs = values.get((m, t or ""))
        return statistics.median(vs) if vs else None

    rows = []
    for m, title, unit, targets in scenarios(a.keys, a.small):
        for t, ref, kind, goal in targets:
            v = med(m, t)
            rv = med(m, ref) if ref else None
            ratio = v / rv if v is not None and rv else None
            if kind == "min_ratio_of":
                # the goal is another pair's ratio in this run (redisp's own 10^6/10^3 keys
                # ratio against redis-server's)
                assert isinstance(goal, tuple)
                gv, gr = med(m, goal[0]), med(m, goal[1])
                g = gv / gr if gv is not None and gr else None
                goal_s = "" if g is None else f">= {g:.2f}x"
                result = "n/a" if ratio is None or g is None else "PASS" if ratio >= g else "FAIL"
            elif kind == "min_ratio":
                goal_s = f">= {goal:g}x"
                result = "n/a" if ratio is None else "PASS" if ratio >= goal else "FAIL"
            elif kind == "max_value":
                goal_s = f"<= {goal:g}"
                result = "n/a" if v is None else "PASS" if v <= goal else "FAIL"
            else:
                goal_s, result = "", ""
            rows.append({
                "measurement": m, "title": title, "target": t, "value": v, "unit": unit,
                "rounds": values.get((m, t), []), "reference": ref or "", "reference_value": rv,
                "ratio": ratio, "goal": goal_s, "result": result,
                "busy_max_pct": max(busy[(m, t)]) if busy.get((m, t)) else "",
            })

    if a.info:
        with open(a.info) as f:
            sys.stdout.write(f.read())
    print()
    hdr = ("target", "median", "unit", "rounds", "ratio", "vs", "goal", "result")
    w = (20, 11, 8, 22, 6, 17, 8, 6)
    line = "  ".join(h.ljust(n) for h, n in zip(hdr, w, strict=True))
    print(line)
    print("-" * len(line))
    last = None
    for r in rows:
        if r["title"] != last:
            print(f"{r['title']}:")
            last = r["title"]
        cells = (
            r["target"], fmt(r["value"]), r["unit"], " ".join(short(x) for x in r["rounds"]) or "-",
            f"{r['ratio']:.2f}" if r["ratio"] is not None else "-", r["reference"] or "-",
            r["goal"] or "-", r["result"] or "-",
        )
        print("  ".join(str(c).ljust(n) for c, n in zip(cells, w, strict=True)).rstrip())
    for m, what, v in extra:
        print(f"  ({m}) {what}: {fmt(v)}")
    fails = [r for r in rows if r["result"] == "FAIL"]
    missing = [r for r in rows if r["result"] == "n/a"]
    passes = [r for r in rows if r["result"] == "PASS"]
    tail = f", {len(missing)} not measured" if missing else ""
    print(f"\ntargets: {len(passes)} PASS, {len(fails)} FAIL{tail}")

    with open(a.out, "w", newline="") as f:
        w_ = csv.writer(f)
        w_.writerow(["timestamp", "measurement", "target", "value", "unit", "reference",
                     "reference_value", "ratio", "goal", "result", "rounds", "busy_max_pct"])
        for r in rows:
            w_.writerow([
                a.stamp, r["measurement"], r["target"],
                "" if r["value"] is None else f"{r['value']:.1f}", r["unit"], r["reference"],
                "" if r["reference_value"] is None else f"{r['reference_value']:.1f}",
                "" if r["ratio"] is None else f"{r['ratio']:.3f}", r["goal"], r["result"],
                ";".join(f"{x:.1f}" for x in r["rounds"]), r["busy_max_pct"],
            ])
        for m, what, v in extra:
            w_.writerow([a.stamp, m, what, f"{v:.1f}", "", "", "", "", "", "", "", ""])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/chaos's judge: one table per run from the events, the load's records and
the writer's history.

Phases: ``baseline`` from the start to the first fault, then each fault from
its start to the next fault (its settle time included).  A request belongs to
the phase it was sent in.  Per phase:

* hung: no answer within ``redis_timeout + 1`` s (answered later, or given up);
* wrong: a reply that is neither an error nor a value Redis held during the
  request: for the writer's keys, a value it never wrote (or wrote after the
  reply came back, or that Redis refused), null, or a value older than a
  write acknowledged before the request was sent (tracking is on, so that is
  a stale read); for static keys, anything but the exact value;
* errors by kind (timeout, unavailable, reset, closed, ...): expected while
  Redis is away, listed, not judged;
* recovery: from Redis answering again (the prober's first answer after the
  restart / SIGCONT) to the first correct answer to a guaranteed miss through
  redisp (HTTP: with ``X-Cache: MISS``).  For CLIENT KILL (Redis never goes
  away): the longest time from a kill to the next correct miss; "tracking
  back" is the longest time from a kill to the new tracking connection seen
  in CLIENT LIST (informative).

Targets: 0 hung and 0 wrong in every phase, recovery <= 1 s.  Exit 0 when all
are met, 3 when one is missed.

    python bench/chaos_report.py TITLE EVENTS LOAD_JSON WRITES REDIS_TIMEOUT
"""

from __future__ import annotations

import bisect
import json
import sys
from collections import Counter, defaultdict

RECOVERY_TARGET = 1.0
LABEL = {"kill9": "kill -9 + restart", "sigstop": "SIGSTOP", "clientkill": "CLIENT KILL x"}


def read_events(path: str) -> list[tuple[float, str, list[str]]]:
    events = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                events.append((float(parts[0]), parts[1], parts[2:]))
    return events


class History:
    """Every write of the writer, per key, in counter order."""

    def __init__(self, path: str) -> None:
        per_key: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
        with open(path) as f:
            for line in f:
                k, v, t_send, t_ack = line.split()
                per_key[int(k)].append((int(v), float(t_send), float(t_ack)))
        self.values = {k: [w[0] for w in ws] for k, ws in per_key.items()}
        self.writes = dict(per_key)
        # per key: for each write, the earliest ack among it and the writes after it
        # (the writer is sequential, so acks increase; kept general all the same)
        self.next_ack: dict[int, list[float]] = {}
        for k, ws in per_key.items():
            acc, inf = [], float("inf")
            for _, _, t_ack in reversed(ws):
                inf = min(inf, t_ack if t_ack >= 0 else float("inf"))
                acc.append(inf)
            self.next_ack[k] = acc[::-1]

    def check(self, k: int, v: int | None, t0: float, t1: float) -> str | None:
        """Why value v of key k read during [t0, t1] is wrong, or None."""
        if v is None:
            return "null for a key that always exists"
        vals = self.values.get(k, [])
        i = bisect.bisect_left(vals, v)
        if i == len(vals) or vals[i] != v:
            return f"value {v} never written to this key"
        _, t_send, t_ack = self.writes[k][i]
        if t_ack == -2.0:
            return f"value {v} was refused by Redis"
        if t_send > t1:
            return f"value {v} written {t_send - t1:.3f}s after the reply"
        if i + 1 < len(vals) and self.next_ack[k][i + 1] < t0:
            return (f"stale: value {v}, a newer write was acknowledged "
                    f"{(t0 - self.next_ack[k][i + 1]) * 1000:.1f} ms before the read")
        return None


def main(title: str, events_path: str, load_path: str, writes_path: str, timeout: float) -> int:
    events = read_events(events_path)
    with open(load_path) as f:
        load = json.load(f)
    history = History(writes_path)
    hang = timeout + 1.0
    probe_ok = sorted(load["probe_ok"])

    start = next(t for t, name, _ in events if name == "start")
    end = next(t for t, name, _ in events if name == "end")
    faults = [(t, args[0]) for t, name, args in events if name == "fault"]
    bounds = [start] + [t for t, _ in faults] + [end]
    names = ["baseline"] + [f for _, f in faults]
    phase_t = bounds[:-1]

    def phase_of(t: float) -> int:
        return max(0, bisect.bisect_right(phase_t, t) - 1)

    rows = [{"requests": 0, "ok": 0, "hung": 0, "max": 0.0, "wrong": 0, "errors": Counter(),
             "examples": []} for _ in names]
    good_misses: list[float] = []
    for door, kind, ident, t0, t1, outcome, value, x_cache in load["requests"]:
        if t0 < start or t0 >= end:
            continue
        row = rows[phase_of(t0)]
        row["requests"] += 1
        latency = t1 - t0
        row["max"] = max(row["max"], latency)
        if latency > hang or outcome == "hung":
            row["hung"] += 1
        why = None
        if kind == "w" and outcome in ("value", "nil"):
            why = history.check(ident, value, t0, t1)
        elif outcome == "wrong":
            why = f"{kind} key s:{ident}: got {value!r}"
        if why is not None:
            row["wrong"] += 1
            if len(row["examples"]) < 5:
                row["examples"].append(f"{door} {kind}:{ident} at +{t0 - start:.3f}s: {why}")
        elif outcome in ("value", "ok"):
            row["ok"] += 1
            if kind == "m" and (door == "resp" or x_cache == "MISS"):
                good_misses.append(t1)
        elif outcome != "nil":
            row["errors"][outcome] += 1
    good_misses.sort()

    def first_after(times: list[float], t: float) -> float | None:
        i = bisect.bisect_left(times, t)
        return times[i] if i < len(times) else None

    def during(i: int, kind: str) -> list[tuple[float, list[str]]]:
        """Events of one kind within phase i."""
        return [(t, a) for t, n, a in events if n == kind and bounds[i] <= t < bounds[i + 1]]

    for i, name in enumerate(names):
        row = rows[i]
        row["recovery"] = row["note"] = None
        if name in ("kill9", "sigstop"):
            resumed = [t for t, _ in during(i, "resume")]
            back = first_after(probe_ok, resumed[0]) if resumed else None
            miss = first_after(good_misses, back) if back is not None else None
            row["recovery"] = (miss - back) if miss is not None else float("inf")
            if back is not None:
                row["note"] = (f"Redis answered {(back - resumed[0]) * 1000:.0f} ms "
                               "after the restart / SIGCONT")
        elif name == "clientkill":
            kills = [t for t, _ in during(i, "kill_tracking")]
            backs = [float(a[0]) for _, a in during(i, "tracking_back")]
            worst = 0.0
            for t in kills:
                miss = first_after(good_misses, t)
                worst = max(worst, (miss - t) if miss is not None else float("inf"))
            row["recovery"] = worst if kills else float("inf")
            row["note"] = f"{len(kills)} kills"
            if backs:
                row["note"] += f"; tracking back after max {max(backs) * 1000:.0f} ms"
            lost = len(during(i, "tracking_not_back"))
            if lost:
                row["note"] += f"; {lost} times not back within 5 s"

    print(f"\n{title}")
    fmt = "{:<19} {:>8} {:>7} {:>5} {:>8} {:>6} {:>11}  {:<6} {}"
    print(fmt.format("phase", "requests", "ok", "hung", "max_ms", "wrong", "recovery_ms",
                     "result", "errors"))
    failed = False
    for i, name in enumerate(names):
        row = rows[i]
        misses = []
        if row["hung"]:
            misses.append("hung")
        if row["wrong"]:
            misses.append("wrong")
        rec = row["recovery"]
        if rec is not None and rec > RECOVERY_TARGET:
            misses.append("recovery")
        failed |= bool(misses)
        label = LABEL.get(name, name)
        if name == "clientkill":
            label += str(len(during(i, "kill_tracking")))
        elif name == "sigstop":
            stop = during(i, "fault")
            label += f" {stop[0][1][1]}s" if stop and len(stop[0][1]) > 1 else ""
        errors = ", ".join(f"{k} {v}" for k, v in sorted(row["errors"].items())) or "-"
        rec_s = "-" if rec is None else ("never" if rec == float("inf") else f"{rec * 1000:.0f}")
        print(fmt.format(label, row["requests"], row["ok"], row["hung"],
                         f"{row['max'] * 1000:.0f}", row["wrong"], rec_s,
                         "FAIL" if misses else "PASS", errors))
        if misses:
            print(f"{'':<19} missed: {', '.join(misses)}")
        if row["note"]:
            print(f"{'':<19} {row['note']}")
        for ex in row["examples"]:
            print(f"{'':<19} wrong: {ex}")
    print(f"targets: 0 hung (answer within redis_timeout + 1 = {hang:g} s), 0 wrong, "
          f"recovery <= {RECOVERY_TARGET * 1000:.0f} ms: {'MISSED' if failed else 'met'}")
    return 3 if failed else 0


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) != 5:
        raise SystemExit(__doc__)
    sys.exit(main(a[0], a[1], a[2], a[3], float(a[4])))

"""bench/report.py's scale rows: redisp against twemproxy at 10^6 keys, and its own
10^6/10^3 ratio against redis-server's own ratio from the same run (issue 12)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "bench" / "report.py"


def scale_rows(tmp_path: Path, raw: str, keys: int = 1_000_000, small: int = 1000) -> dict:
    (tmp_path / "raw.csv").write_text(raw)
    out = tmp_path / "out.csv"
    subprocess.run(
        [sys.executable, str(REPORT), str(tmp_path / "raw.csv"), str(out),
         "--keys", str(keys), "--small", str(small)],
        check=True, capture_output=True, timeout=60,
    )
    with out.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["measurement"] == "scale"]
    return {(r["target"], r["reference"]): r for r in rows}


def raw_run(twem: float, rs_small: float, rs_big: float, rp_small: float, rp_big: float) -> str:
    return "".join(
        f"scale,{t},{rnd},{v},\n"
        for rnd in (1, 2, 3)
        for t, v in (("redis-server 1k", rs_small), ("redisp 1k", rp_small),
                     ("redis-server 1M", rs_big), ("twemproxy 1M", twem), ("redisp 1M", rp_big))
    )


def test_both_scale_targets_pass(tmp_path):
    rows = scale_rows(tmp_path, raw_run(200_000, 600_000, 240_000, 500_000, 300_000))
    vs_twem = rows[("redisp 1M", "twemproxy 1M")]
    assert (vs_twem["ratio"], vs_twem["goal"], vs_twem["result"]) == ("1.500", ">= 1x", "PASS")
    own = rows[("redisp 1M", "redisp 1k")]
    assert (own["ratio"], own["goal"], own["result"]) == ("0.600", ">= 0.40x", "PASS")
    assert rows[("redis-server 1M", "redis-server 1k")]["ratio"] == "0.400"
    assert rows[("redis-server 1M", "redis-server 1k")]["result"] == ""


def test_own_ratio_fails_below_redis_servers(tmp_path):
    # redisp beats twemproxy, but loses more than redis-server going from 10^3 to 10^6 keys
    rows = scale_rows(tmp_path, raw_run(200_000, 600_000, 300_000, 800_000, 320_000))
    assert rows[("redisp 1M", "twemproxy 1M")]["result"] == "PASS"
    own = rows[("redisp 1M", "redisp 1k")]
    assert (own["goal"], own["result"]) == (">= 0.50x", "FAIL")


def test_below_twemproxy_fails(tmp_path):
    rows = scale_rows(tmp_path, raw_run(300_000, 600_000, 240_000, 500_000, 290_000))
    assert rows[("redisp 1M", "twemproxy 1M")]["result"] == "FAIL"
    assert rows[("redisp 1M", "redisp 1k")]["result"] == "PASS"


def test_unmeasured_reference_is_not_a_pass(tmp_path):
    # no redis-server figures: the own-ratio target has no goal, so it is not judged
    raw = "scale,redisp 1k,1,500000,\nscale,redisp 1M,1,300000,\nscale,twemproxy 1M,1,200000,\n"
    own = scale_rows(tmp_path, raw)[("redisp 1M", "redisp 1k")]
    assert (own["goal"], own["result"]) == ("", "n/a")


def test_targets_named_by_key_count(tmp_path):
    # QUICK=1's 10^5 keys: bench/run's kn() names them 100k, as report.py must
    raw = "scale,twemproxy 100k,1,200000,\nscale,redisp 100k,1,250000,\n"
    rows = scale_rows(tmp_path, raw, keys=100_000)
    assert rows[("redisp 100k", "twemproxy 100k")]["ratio"] == "1.250"


def test_run_and_report_name_key_counts_alike():
    # bench/run records the scale figures under names its kn() makes; report.py looks them
    # up under its own kn()'s names
    run = (REPORT.parent / "run").read_text()
    kn_sh = next(line for line in run.splitlines() if line.startswith("kn() {"))
    counts = [1000, 1500, 100_000, 1_000_000, 2_000_000, 2_500_000, 999]
    got = subprocess.run(
        ["bash", "-c", kn_sh + "\nfor n in " + " ".join(map(str, counts)) + "; do kn $n; done"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.split()
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert got == [report.kn(n) for n in counts]
    assert got == ["1k", "1500", "100k", "1M", "2M", "2500k", "999"]

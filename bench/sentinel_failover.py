"""Requests lost and time to recover while Sentinel fails the master over.

Starts the tests' Sentinel deployment (tests/sentinel_support.py: a master,
one replica, three ``redis-server --sentinel`` on free loopback ports) and
``twistd -n redisp`` in front of it (``invalidation: tracking``), then, for
each ROUNDS, fails over (``SENTINEL FAILOVER``, then a SIGKILLed master)
while one client runs requests through redisp back to back:

* ``SET k <n>`` then ``GET k`` through redisp: an error is a **failed
  request**; a GET that does not return the value the SET just had
  acknowledged is a **wrong answer**, unless it is an older value of ours:
  a write the old master acknowledged after the promotion, which the new
  master never got, is lost by Redis's asynchronous replication itself
  (counted apart as ``lost_writes``);
* once Sentinel has announced the new master: ``SET probe <n>`` directly on
  it, then ``GET probe`` through redisp: a reply other than ``p<n>`` is a
  **stale read** (the old cached value, or the old master's).

Printed per failover: when Sentinel announced the new master (from the
trigger), the failed requests, the window they span and when the last one
failed (from the trigger), the recovery time
(last failure after the announcement, minus the announcement; 0 when none
failed after it), wrong answers, lost writes, stale reads.

    .venv/bin/python bench/sentinel_failover.py [--rounds N] [--seconds S]

Loopback only, bounded: each failover is followed for at most S seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import redis  # noqa: E402

from tests.sentinel_support import PASSWORD, SERVICE, SentinelDeployment  # noqa: E402
from tests.support import free_port, read_until  # noqa: E402

HOST = "127.0.0.1"


def start_redisp(url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "redisp", "--redis", url, "--http", "none",
         "--resp", f"tcp:{port}:interface={HOST}", "--invalidation", "tracking"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tempfile.mkdtemp(),
    )
    read_until(proc, b"tracking active")
    return proc, port


class Announcements(threading.Thread):
    """Times each +switch-master a Sentinel publishes."""

    def __init__(self, sentinel_port: int) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis(host=HOST, port=sentinel_port, protocol=2)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe("+switch-master")
        self.seen: list[tuple[float, int]] = []

    def run(self) -> None:
        for message in self.pubsub.listen():
            if message["type"] == "message":
                parts = message["data"].split()
                if parts[0].decode() == SERVICE:
                    self.seen.append((time.monotonic(), int(parts[4])))


def follow(redisp_port: int, announcements: Announcements, trigger, seconds: float) -> dict:
    proxy = redis.Redis(host=HOST, port=redisp_port, protocol=2, socket_timeout=5)
    before = len(announcements.seen)
    failures: list[float] = []
    wrong = lost = stale = probes = requests = 0
    direct = None
    started = time.monotonic()
    trigger()
    announced_at = None
    n = 0
    while time.monotonic() - started < seconds:
        n += 1
        if announced_at is None and len(announcements.seen) > before:
            announced_at, port = announcements.seen[before]
            direct = redis.Redis(host=HOST, port=port, password=PASSWORD, protocol=2,
                                 socket_timeout=5)
        requests += 2
        try:
            proxy.set("k", n)
            acked = True
        except redis.RedisError:
            failures.append(time.monotonic())
            acked = False
        try:
            got = proxy.get("k")
            if acked and got != str(n).encode():
                if got is not None and got.isdigit() and int(got) < n:
                    lost += 1  # an older write of ours: the new master never had n
                else:
                    wrong += 1
        except redis.RedisError:
            failures.append(time.monotonic())
        if direct is not None:
            try:
                direct.set("probe", f"p{n}")
            except redis.RedisError:
                continue
            probes += 1
            requests += 1
            try:
                if proxy.get("probe") != f"p{n}".encode():
                    stale += 1
            except redis.RedisError:
                failures.append(time.monotonic())
        if announced_at is not None and time.monotonic() - announced_at > 3.0:
            break  # well past recovery
    after = [t for t in failures if announced_at is not None and t >= announced_at]
    return {
        "announced_after_s": round(announced_at - started, 3) if announced_at else None,
        "requests": requests,
        "failed": len(failures),
        "failed_window_s": round(failures[-1] - failures[0], 3) if failures else 0.0,
        "last_failure_s": round(failures[-1] - started, 3) if failures else None,
        "recovery_after_announce_s": round(after[-1] - announced_at, 3) if after else 0.0,
        "wrong_answers": wrong,
        "lost_writes": lost,
        "stale_reads": stale,
        "probes": probes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    deployment = SentinelDeployment()
    proc = None
    bad = 0
    try:
        deployment.wait_healthy()
        proc, port = start_redisp(deployment.url)
        announcements = Announcements(deployment.sentinels[0].port)
        announcements.start()
        for _ in range(args.rounds):
            for kind in ("SENTINEL FAILOVER", "master killed"):
                killed: list[int] = []

                def trigger(kind=kind, killed=killed) -> None:
                    if kind == "SENTINEL FAILOVER":
                        with deployment.sentinels[0].client() as c:
                            c.execute_command("SENTINEL", "FAILOVER", SERVICE)
                    else:
                        killed.append(deployment.master_port())
                        node = deployment.nodes[killed[0]]
                        node.proc.kill()
                        node.proc.wait()
                        node.proc.stdout.close()
                        node.proc = None

                result = follow(port, announcements, trigger, args.seconds)
                print(f"{kind:18} {result}", flush=True)
                bad += result["wrong_answers"] + result["stale_reads"]
                if killed:
                    deployment.restart_as_replica(killed[0])
                deployment.wait_healthy()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        deployment.stop()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

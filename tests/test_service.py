"""Wiring that is about the process, not a door: the listen backlog, the
open-file limit against ``max_clients``, and how listeners are named."""

from __future__ import annotations

import resource
import shutil
import subprocess

import pytest
import pytest_twisted

from redisp import service
from redisp.service import BACKLOG, fit_open_files, with_backlog

# listen backlog (Redis's tcp-backlog, 511)


@pytest.mark.parametrize("given, expected", [
    ("tcp:6380", "tcp:6380:backlog=511"),
    ("tcp:6380:interface=127.0.0.1", "tcp:6380:interface=127.0.0.1:backlog=511"),
    ("TCP:6380", "TCP:6380:backlog=511"),
    ("tcp6:6380:interface=\\:\\:1", "tcp6:6380:interface=\\:\\:1:backlog=511"),
    ("unix:/tmp/a\\:b.sock", "unix:/tmp/a\\:b.sock:backlog=511"),
    ("ssl:443:privateKey=k.pem", "ssl:443:privateKey=k.pem:backlog=511"),
])
def test_endpoints_that_take_a_backlog_get_redis_default(given, expected):
    assert with_backlog(given) == expected


@pytest.mark.parametrize("given", [
    "tcp:6380:backlog=64",
    "tcp:backlog=64:6380",
    "unix:/tmp/r.sock:backlog=1",
    "systemd:domain=INET:index=0",  # an inherited socket: its backlog is set already
    "nonsense",
])
def test_a_backlog_given_or_not_taken_is_left_alone(given):
    assert with_backlog(given) == given


def listen_queue(kind: str, where: str) -> int | None:
    """The backlog the kernel holds for a listening socket (``ss``'s Send-Q)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-lnH", kind, "src", where], capture_output=True, text=True,
                         timeout=30).stdout.split()
    return int(out[out.index("LISTEN") + 2]) if "LISTEN" in out else None


@pytest.fixture
def running(redis_server):
    """running(**config) -> the started proxy's listening ports by door name
    (tests.support's RunningProxy knows TCP ports only)."""
    from twisted.internet import reactor

    from redisp.service import build_proxy
    from tests.support import proxy_config

    started = []

    def start(**overrides):
        proxy = build_proxy(proxy_config(redis_server.url, **overrides), reactor)
        proxy.service.startService()
        started.append(proxy)
        return {s.name: s for s in proxy.service if getattr(s, "port", None)}

    yield start
    for proxy in started:
        pytest_twisted.blockon(proxy.service.stopService())


def test_both_doors_listen_with_a_backlog_of_511(tmp_path, running):
    sock = tmp_path / "http.sock"
    listeners = running(http=f"unix:{sock}", resp="tcp:0:interface=127.0.0.1")
    assert listeners["http"].port.backlog == listeners["resp"].port.backlog == BACKLOG
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    resp = f"127.0.0.1:{listeners['resp'].port.getHost().port}"
    for kind, where in (("-x", str(sock)), ("-t", resp)):
        kernel = listen_queue(kind, where)
        assert kernel in (None, min(BACKLOG, somaxconn)), (kind, kernel)


def test_a_backlog_set_in_the_endpoint_string_wins(running):
    listeners = running(resp="tcp:0:interface=127.0.0.1:backlog=64", http=None)
    port = listeners["resp"].port
    assert port.backlog == 64
    assert listen_queue("-t", f"127.0.0.1:{port.getHost().port}") in (None, 64)


# the open-file limit and max_clients (SPEC §9, as Redis)


class FakeLimits:
    """resource.getrlimit/setrlimit for RLIMIT_NOFILE, refusing a hard limit
    above ``ceiling`` (what an unprivileged process gets)."""

    def __init__(self, soft: int, hard: int, ceiling: int | None = None):
        self.limits = (soft, hard)
        self.ceiling = hard if ceiling is None else ceiling

    def getrlimit(self, which):
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which, limits):
        soft, hard = limits
        if soft > hard or hard > max(self.ceiling, self.limits[1]):
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


@pytest.fixture
def limits(monkeypatch):
    def install(soft, hard, ceiling=None, open_now=10):
        fake = FakeLimits(soft, hard, ceiling)
        monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
        monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
        monkeypatch.setattr(service, "_descriptors_open", lambda: open_now)
        return fake
    return install


def test_the_soft_limit_is_raised_to_fit_max_clients(limits):
    fake = limits(1024, 65536)
    assert fit_open_files(10_000, own=4) == (10_000, None)
    assert fake.limits == (10_000 + 4 + 32 + 10, 65536)


def test_a_soft_limit_large_enough_is_left_alone(limits):
    fake = limits(100_000, 100_000)
    assert fit_open_files(10_000, own=4) == (10_000, None)
    assert fake.limits == (100_000, 100_000)


def test_below_the_hard_limit_max_clients_is_lowered_with_one_line(limits):
    fake = limits(1024, 4096)
    fits, line = fit_open_files(10_000, own=4)
    assert fits == 4096 - 46 and fake.limits == (4096, 4096)
    assert "max_clients lowered from 10000 to 4050" in line
    assert "open-file limit is 4096" in line and "10046" in line


def test_root_may_raise_the_hard_limit_too(limits):
    fake = limits(1024, 4096, ceiling=1 << 20)
    assert fit_open_files(10_000, own=4) == (10_000, None)
    assert fake.limits == (10_046, 10_046)


def test_a_limit_that_leaves_nothing_for_clients_stops_start_up(limits):
    limits(40, 40)
    with pytest.raises(SystemExit, match="leaves no descriptor for clients"):
        fit_open_files(10_000, own=4)


def test_the_lowered_max_clients_is_the_one_enforced(limits, redis_server):
    from twisted.internet import reactor

    from redisp.service import build_proxy
    from tests.support import proxy_config

    limits(100, 100)
    proxy = build_proxy(proxy_config(redis_server.url, max_clients=10_000), reactor)
    own = 2 + 1  # two listeners, one backing connection
    assert proxy.slots.limit == proxy.config.max_clients == 100 - own - 32 - 10
    assert "max_clients lowered" in proxy.service.fd_warning


# how listeners are named in the start-up line


def test_listeners_are_named_by_address_and_unix_ones_by_path(tmp_path, running):
    sock = tmp_path / "r.sock"
    listeners = running(http="tcp:0:interface=127.0.0.1", resp=f"unix:{sock}")
    port = listeners["http"].port.getHost().port
    names = {name: listener.address() for name, listener in listeners.items()}
    assert names == {"http": f"127.0.0.1:{port}", "resp": str(sock)}

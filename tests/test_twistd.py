"""`twistd redisp` as a user runs it: plugin discovery, help, start-up, config
errors and SIGTERM, in a subprocess of the venv's own twistd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import RedisServer, free_port, read_until

TWISTD = str(Path(sys.executable).parent / "twistd")


def twistd(*args: str, cwd: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, *args], cwd=cwd, env=env or clean_env(), capture_output=True,
                          timeout=60, **kw)


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("REDISP_")}


def test_twistd_help_lists_the_plugin(tmp_path):
    out = twistd("--help", cwd=str(tmp_path))
    assert out.returncode == 0
    assert b"redisp" in out.stdout


def test_plugin_help_documents_every_option(tmp_path):
    from redisp.config import FILE_ONLY, PARSERS

    out = twistd("redisp", "--help", cwd=str(tmp_path))
    assert out.returncode == 0
    for key in ["config", *(key for key in PARSERS if key not in FILE_ONLY)]:
        assert f"--{key.replace('_', '-')}".encode() in out.stdout, key


def test_plugin_module_stays_lazy():
    code = ("import sys; import twisted.plugins.redisp_plugin; "
            "bad = [m for m in ('twisted.internet.reactor', 'txredisapi', 'redisp.service') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("conf, words", [
    ("capacity: -5\n", b"capacity"),
    ("bogus: 1\n", b"unknown key 'bogus'"),
    ("ttl: [\n", b"not valid YAML"),

])
def test_bad_configuration_stops_start_up_with_one_line(tmp_path, conf, words):
    (tmp_path / "conf.yaml").write_text(conf)
    out = twistd("-n", "--pidfile=", "redisp", cwd=str(tmp_path))
    assert out.returncode != 0
    assert words in out.stderr
    assert b"Traceback" not in out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_unreadable_config_file_is_named(tmp_path):
    out = twistd("-n", "--pidfile=", "redisp", "--config", "missing.yaml", cwd=str(tmp_path))
    assert out.returncode != 0 and b"missing.yaml" in out.stderr
    assert b"Traceback" not in out.stdout + out.stderr


def test_bad_option_value_on_the_command_line(tmp_path):
    out = twistd("-n", "--pidfile=", "redisp", "--ttl", "soon", cwd=str(tmp_path))
    assert out.returncode != 0 and b"--ttl" in out.stderr
    assert b"Traceback" not in out.stdout + out.stderr


def test_port_in_use_stops_start_up_with_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = twistd("-n", "--pidfile=", "redisp", "--resp", f"tcp:{port}:interface=127.0.0.1",
                     "--http", "none", cwd=str(tmp_path))
    # logging has started by then, so the line goes to the log (stdout with -n)
    assert out.returncode != 0 and b"cannot listen for resp" in out.stdout + out.stderr
    assert b"Traceback" not in out.stdout + out.stderr


@pytest.fixture
def own_redis():
    server = RedisServer().start()
    yield server
    server.stop()


def test_serves_logs_its_setup_and_stops_cleanly_on_sigterm(tmp_path, own_redis):
    """The start-up line names every listener (a UNIX socket by its path), and
    a clean stop logs no warning: closing the backing and tracking
    connections on purpose is not losing them."""
    own_redis.client().set("abc", "xyz")
    resp_port = free_port()
    sock = tmp_path / "http.sock"
    env = clean_env() | {"REDISP_TTL": "30"}
    (tmp_path / "conf.yaml").write_text("capacity: 123\n")
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "redisp", "--http", f"unix:{sock}",
         "--resp", f"tcp:{resp_port}:interface=127.0.0.1", "--redis",
         f"redis://127.0.0.1:{own_redis.port}/0", "--invalidation", "tracking"],
        cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        log = read_until(proc, b"backing redis")
        log += read_until(proc, b"tracking active")
        line = next(x for x in log.decode().splitlines() if "concurrency" in x)
        for part in (f"http on {sock},", f"127.0.0.1:{resp_port}",
                     f"127.0.0.1:{own_redis.port}/0", "ttl 30s", "capacity 123",
                     "concurrency 1", "invalidation tracking"):
            assert part in line, (part, line)
        assert "b'" not in line
        import redis

        client = redis.Redis(port=resp_port)
        assert client.get("abc") == b"xyz"
        client.close()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in log + rest
    assert proc.returncode in (-signal.SIGTERM, 0, 128 + signal.SIGTERM)
    assert b"Main loop terminated" in rest
    for word in (b"connection lost", b"#warn]", b"#error]", b"#critical]"):
        assert word not in rest, rest.decode()


def test_a_low_open_file_limit_lowers_max_clients_and_keeps_the_backing(tmp_path, own_redis):
    """Under ulimit -n 128 and max_clients 10000, as Redis: one line, a lower
    max_clients, clients past it refused, and the backing connection still
    works and still comes back, since it never has to compete for a
    descriptor."""
    import re
    import resource
    import socket

    limit = 128
    client = own_redis.client()
    resp_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "redisp", "--max-clients", "10000",
         "--http", f"tcp:{http_port}:interface=127.0.0.1",
         "--resp", f"tcp:{resp_port}:interface=127.0.0.1",
         "--redis", f"redis://127.0.0.1:{own_redis.port}/0"],
        cwd=str(tmp_path), env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
    )
    sockets: list[socket.socket] = []

    def connect() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", resp_port), timeout=20)
        sockets.append(s)
        return s

    def ask(s: socket.socket, request: bytes) -> bytes:
        s.sendall(request)
        reply = b""
        while not reply.endswith(b"\r\n") or (
                reply.startswith(b"$") and reply != b"$-1\r\n" and reply.count(b"\r\n") < 2):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply

    def get(s: socket.socket, key: bytes) -> bytes:
        return ask(s, b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))

    try:
        log = read_until(proc, b"connected")
        line = next(x for x in log.decode().splitlines() if "max_clients lowered" in x)
        fits = int(re.search(r"max_clients lowered from 10000 to (\d+)", line)[1])
        assert 0 < fits < limit and f"open-file limit is {limit}" in line
        admitted = [connect() for _ in range(fits)]
        assert ask(admitted[-1], b"PING\r\n") == b"+PONG\r\n"  # all were admitted
        for _ in range(30):
            assert connect().recv(100) == b"-ERR max number of clients reached\r\n"
        refused_http = socket.create_connection(("127.0.0.1", http_port), timeout=20)
        assert refused_http.recv(100).startswith(b"HTTP/1.1 503")
        refused_http.close()
        client.set("fresh", "1")
        assert get(admitted[0], b"fresh") == b"$1\r\n1\r\n"  # a miss: the backing works
        assert client.client_kill_filter(_type="normal") >= 1  # cut redisp's backing connection
        for _ in range(30):
            connect().recv(100)  # refusals while it reconnects
        client.set("fresher", "2")
        deadline = time.monotonic() + 20
        while (reply := get(admitted[1], b"fresher")) != b"$1\r\n2\r\n":
            assert b"unavailable" in reply and time.monotonic() < deadline, reply
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        for s in sockets:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Too many open files" not in log + rest
    assert b"Traceback" not in log + rest


def test_tracking_against_a_redis_without_client_tracking_stops_start_up(tmp_path):
    server = RedisServer(None, "--rename-command", "CLIENT", "").start()
    try:
        out = twistd("-n", "--pidfile=", "redisp", "--invalidation", "tracking",
                     "--redis", server.url, "--http", "none", "--resp", "none",
                     cwd=str(tmp_path))
    finally:
        server.stop()
    assert out.returncode != 0
    assert b"tracking needs Redis >= 6" in out.stderr
    assert b"Traceback" not in out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_twistd_entry_point_tunes_the_garbage_collector():
    import gc

    from redisp.tap import tune_garbage_collector

    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold()[0] == 50_000
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_full_collection_runs_on_a_timer(monkeypatch):
    """The oldest generation is collected every FULL_COLLECTION_INTERVAL
    seconds, whatever the thresholds put off (bench/soak)."""
    from twisted.internet import task

    from redisp import tap

    clock = task.Clock()
    calls = []
    monkeypatch.setattr(tap.gc, "collect", lambda *a: calls.append(a) or 0)
    service = tap.full_collections(clock)
    service.startService()
    try:
        first = len(calls)
        clock.advance(tap.FULL_COLLECTION_INTERVAL)
        clock.advance(tap.FULL_COLLECTION_INTERVAL)
        assert len(calls) == first + 2
    finally:
        service.stopService()

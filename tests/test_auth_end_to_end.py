"""Security end to end (SPEC §1, §8): the HTTP door with real clients from
another loopback address, curl with credentials, and ``twistd redisp`` with
passwords given every way, whose whole log, INFO, /metrics and process
title must never show one."""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import subprocess
import time

import pytest
import pytest_twisted
import redis
from twisted.internet import threads

from redisp.config import Secret, UserConfig
from tests.support import RedisServer, free_port, read_until, until
from tests.test_twistd import TWISTD, clean_env

inline = pytest_twisted.inlineCallbacks
LIMIT = 20.0


def http_get(port: int, path: str, headers: dict | None = None, source: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LIMIT,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@inline
def test_http_from_another_loopback_address_is_403_in_protected_mode(redis_db, start_proxy):
    p = start_proxy()
    yield until(lambda: p.proxy.backing.up)
    status, headers, body = yield threads.deferToThread(
        http_get, p.http_port, "/get?key=k", None, "127.0.0.2")
    assert status == 403 and b"protected mode" in body
    status, _, _ = yield threads.deferToThread(http_get, p.http_port, "/get?key=k")
    assert status == 404


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@needs_curl
@inline
def test_curl_with_a_bearer_token_or_a_user_and_revalidation(redis_db, start_proxy):
    redis_db.set("k", "value")
    p = start_proxy(password=Secret("pw"), users=(UserConfig("ro", Secret("ro pw"), "read"),))
    yield until(lambda: p.proxy.backing.up)
    url = f"http://127.0.0.1:{p.http_port}/get?key=k"

    def curl(*args: str) -> str:
        out = subprocess.run(["curl", "-s", "-i", *args, url], capture_output=True,
                             timeout=LIMIT, check=True)
        return out.stdout.decode()

    refused = yield threads.deferToThread(curl)
    assert refused.startswith("HTTP/1.1 401")
    assert 'WWW-Authenticate: Bearer realm="redisp"' in refused
    first = yield threads.deferToThread(curl, "-H", "Authorization: Bearer pw")
    assert first.startswith("HTTP/1.1 200") and first.endswith("\r\n\r\nvalue")
    etag = next(line.split(": ", 1)[1] for line in first.splitlines()
                if line.startswith("ETag: "))
    again = yield threads.deferToThread(curl, "-u", "ro:ro pw", "-H", f"If-None-Match: {etag}")
    assert again.startswith("HTTP/1.1 304") and "X-Cache: HIT" in again
    assert "Cache-Control: max-age=" in again and "\r\nAge: " in again
    health = yield threads.deferToThread(
        http_get, p.http_port, "/healthz")
    assert health[0] == 200


def test_passwords_never_reach_the_log_info_metrics_or_the_process_title(tmp_path):
    """``--password`` and a password in ``--redis``: one warning, then none
    of the log (start-up, wrong AUTHs, 401s, the backing restarting, the
    stop), INFO, /metrics or ``ps`` shows either."""
    client_pw, backing_pw = "cl13nt-s3cret", "b4ck1ng-s3cret"
    backing = RedisServer(None, "--requirepass", backing_pw).start()
    resp_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "redisp", "--password", client_pw,
         "--redis", f"redis://:{backing_pw}@127.0.0.1:{backing.port}/0",
         "--resp", f"tcp:{resp_port}:interface=127.0.0.1",
         "--http", f"tcp:{http_port}:interface=127.0.0.1"],
        cwd=str(tmp_path), env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        log = read_until(proc, b"must authenticate")
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            title = f.read()
        for wrong in ("nope", client_pw[:-1]):  # raw: redis-py retries a failed connect
            with socket.create_connection(("127.0.0.1", resp_port), timeout=LIMIT) as sock:
                sock.sendall(b"AUTH %s\r\n" % wrong.encode())
                assert sock.recv(100).startswith(b"-WRONGPASS")
        client = redis.Redis(port=resp_port, password=client_pw)
        deadline = time.monotonic() + LIMIT
        while True:
            try:
                client.set("k", "v")
                break
            except redis.ResponseError:  # the backing connection is still being made
                assert time.monotonic() < deadline
        info = client.execute_command("INFO")
        assert http_get(http_port, "/get?key=k")[0] == 401
        assert http_get(http_port, "/get?key=k", {"Authorization": "Bearer x"})[0] == 401
        status, _, metrics = http_get(http_port, "/metrics",
                                      {"Authorization": f"Bearer {client_pw}"})
        assert status == 200, metrics
        assert b"redisp_auth_failures_total 3.0" in metrics
        client.close()
        backing.stop()  # the backing going away is logged: never with its URL's password
        backing = RedisServer(backing.port, "--requirepass", backing_pw).start()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        backing.stop()
    whole = log + rest
    assert whole.count(b"can be read by every local user") == 1
    for secret in (client_pw, backing_pw):
        for where, text in (("log", whole), ("INFO", info), ("/metrics", metrics)):
            assert secret.encode() not in text, f"{where} shows a password"
    assert b"Traceback" not in whole
    pytest.importorskip("setproctitle")  # without it the warning is all there is
    assert client_pw.encode() not in title and backing_pw.encode() not in title
    assert b"--password ***" in title and b"redis://:***@" in title


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not installed")
@inline
def test_redis_cli_with_a_password_or_a_user(redis_db, start_proxy):
    import os

    redis_db.set("k", "value")
    p = start_proxy(password=Secret("pw"), users=(UserConfig("ro", Secret("ro-pw"), "read"),))
    yield until(lambda: p.proxy.backing.up)
    yield until(lambda: p.proxy.forwarder.table is not None)

    def cli(*args: str, env: dict | None = None) -> str:
        out = subprocess.run(["redis-cli", "-p", str(p.resp_port), *args], capture_output=True,
                             timeout=LIMIT, env={**os.environ, **(env or {})})
        return (out.stdout + out.stderr).decode().strip()

    assert (yield threads.deferToThread(cli, "GET", "k")) == (
        "NOAUTH Authentication required.")
    assert (yield threads.deferToThread(cli, "GET", "k", env={"REDISCLI_AUTH": "pw"})) == "value"
    assert (yield threads.deferToThread(cli, "--user", "ro", "--pass", "ro-pw",
                                        "--no-auth-warning", "GET", "k")) == "value"
    refused = yield threads.deferToThread(cli, "--user", "ro", "--pass", "ro-pw",
                                          "--no-auth-warning", "SET", "k", "v")
    assert refused == "NOPERM this user has no permissions to run the 'set' command"

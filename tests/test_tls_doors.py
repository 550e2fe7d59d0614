"""TLS on the front doors (SPEC §8): ``ssl:`` listeners used by the clients
people use (redis-cli --tls, redis-py ``ssl=True``, curl), and mutual TLS
with ``tls_client_ca``.  Certificates are made by the test
(tests/tls_support.py); the backing is the session's plain redis-server.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import pytest_twisted
import redis
from twisted.internet import threads
from twisted.logger import globalLogPublisher

from tests.support import STARTUP_LIMIT, proxy_config, until
from tests.tls_support import make_tls_files

inline = pytest_twisted.inlineCallbacks


def in_thread(f, *args, **kwargs):
    return threads.deferToThread(f, *args, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls-doors"))


def ssl_endpoint(files) -> str:
    return f"ssl:0:interface=127.0.0.1:certKey={files.server_cert}:privateKey={files.server_key}"


@pytest.fixture
def tls_proxy(files, start_proxy, redis_db):
    """start_proxy with both doors on ssl: listeners."""
    def start(**overrides):
        return start_proxy(http=ssl_endpoint(files), resp=ssl_endpoint(files), **overrides)
    return start


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=STARTUP_LIMIT)


def redis_cli(port: int, files, *args: str, cert: tuple[str, str] | None = None):
    tls = ["--tls", "--cacert", files.ca]
    if cert is not None:
        tls += ["--cert", cert[0], "--key", cert[1]]
    return run(shutil.which("redis-cli") or "redis-cli", "-h", "localhost", "-p", str(port),
               *tls, *args)


def curl(port: int, files, path: str, cert: tuple[str, str] | None = None):
    extra = ["--cert", cert[0], "--key", cert[1]] if cert is not None else []
    return run("curl", "-sS", "--max-time", "10", "--cacert", files.ca, *extra,
               "-o", "-", "-w", "\n%{http_code}", f"https://localhost:{port}{path}")


def tls_redis_py(port: int, files, cert: tuple[str, str] | None = None, **kw):
    extra = {"ssl_certfile": cert[0], "ssl_keyfile": cert[1]} if cert is not None else {}
    return redis.Redis(host="localhost", port=port, ssl=True, ssl_ca_certs=files.ca,
                       socket_timeout=STARTUP_LIMIT, **extra, **kw)


needs_cli = pytest.mark.skipif(not shutil.which("redis-cli"), reason="redis-cli not installed")
needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")


# -- ssl: listeners --------------------------------------------------------------------------


@needs_cli
@inline
def test_redis_cli_tls_reads_and_writes_through_the_ssl_resp_door(files, tls_proxy, redis_db):
    redis_db.set("k", "v")
    p = tls_proxy()
    yield until(lambda: p.proxy.backing.up)
    out = yield in_thread(redis_cli, p.resp_port, files, "GET", "k")
    assert (out.returncode, out.stdout) == (0, b"v\n"), out.stderr
    out = yield in_thread(redis_cli, p.resp_port, files, "SET", "k", "w")
    assert out.stdout == b"OK\n" and redis_db.get("k") == b"w"
    out = yield in_thread(redis_cli, p.resp_port, files, "GET", "k")
    assert out.stdout == b"w\n"
    assert p.proxy.metrics.cache_misses == 2


@pytest.mark.parametrize("protocol", [2, 3])
@inline
def test_redis_py_with_ssl_true(files, tls_proxy, redis_db, protocol):
    redis_db.set("k", b"\x00\xff")
    p = tls_proxy()
    yield until(lambda: p.proxy.backing.up)
    client = tls_redis_py(p.resp_port, files, protocol=protocol)
    assert (yield in_thread(client.get, "k")) == b"\x00\xff"
    assert (yield in_thread(client.get, "k")) == b"\x00\xff"
    assert (yield in_thread(client.mget, "k", "absent")) == [b"\x00\xff", None]
    assert p.proxy.metrics.cache_hits >= 2
    client.close()


@needs_curl
@inline
def test_curl_over_https(files, tls_proxy, redis_db):
    redis_db.set("k", "hello")
    p = tls_proxy()
    yield until(lambda: p.proxy.backing.up)
    out = yield in_thread(curl, p.http_port, files, "/get?key=k")
    assert (out.returncode, out.stdout) == (0, b"hello\n200"), out.stderr
    out = yield in_thread(curl, p.http_port, files, "/healthz")
    assert out.stdout.endswith(b"\n200")
    out = yield in_thread(curl, p.http_port, files, "/get?key=absent")
    assert out.stdout.endswith(b"\n404")


@inline
def test_a_plain_text_client_on_the_tls_port_gets_nothing_and_breaks_nothing(
        files, tls_proxy, redis_db, logged):
    import socket

    redis_db.set("k", "v")
    p = tls_proxy()
    yield until(lambda: p.proxy.backing.up)

    def plain():
        with socket.create_connection(("127.0.0.1", p.resp_port), timeout=STARTUP_LIMIT) as s:
            s.sendall(b"GET k\r\n")
            data = s.recv(4096)
            while data and b"v" not in data:
                more = s.recv(4096)
                if not more:
                    break
                data += more
            return data

    assert b"$1\r\nv" not in (yield in_thread(plain))
    client = tls_redis_py(p.resp_port, files)
    assert (yield in_thread(client.get, "k")) == b"v"
    client.close()
    yield until(lambda: p.proxy.metrics.connected_clients == 0)
    assert [e for e in logged if "log_failure" in e] == []


# -- mutual TLS: tls_client_ca ---------------------------------------------------------------


@needs_cli
@inline
def test_with_tls_client_ca_redis_cli_needs_a_certificate_of_that_ca(
        files, tls_proxy, redis_db, logged):
    redis_db.set("k", "v")
    p = tls_proxy(tls_client_ca=files.ca)
    yield until(lambda: p.proxy.backing.up)
    mine = (files.client_cert, files.client_key)
    stranger = (files.other_client_cert, files.other_client_key)
    out = yield in_thread(redis_cli, p.resp_port, files, "GET", "k", cert=mine)
    assert (out.returncode, out.stdout) == (0, b"v\n"), out.stderr
    for cert in (None, stranger):
        out = yield in_thread(redis_cli, p.resp_port, files, "GET", "k", cert=cert)
        assert b"v\n" != out.stdout, cert
        assert out.returncode != 0 or b"error" in (out.stdout + out.stderr).lower()
    yield until(lambda: p.proxy.metrics.connected_clients == 0)
    assert [e for e in logged if "log_failure" in e] == []


@inline
def test_with_tls_client_ca_redis_py_needs_a_certificate_of_that_ca(files, tls_proxy, redis_db):
    redis_db.set("k", "v")
    p = tls_proxy(tls_client_ca=files.ca)
    yield until(lambda: p.proxy.backing.up)
    good = tls_redis_py(p.resp_port, files, cert=(files.client_cert, files.client_key))
    assert (yield in_thread(good.get, "k")) == b"v"
    good.close()
    for cert in (None, (files.other_client_cert, files.other_client_key)):
        refused = tls_redis_py(p.resp_port, files, cert=cert, protocol=2)
        with pytest.raises(redis.ConnectionError):
            yield in_thread(refused.get, "k")
        refused.close()


@needs_curl
@inline
def test_with_tls_client_ca_curl_needs_a_certificate_of_that_ca(files, tls_proxy, redis_db):
    redis_db.set("k", "v")
    p = tls_proxy(tls_client_ca=files.ca)
    yield until(lambda: p.proxy.backing.up)
    out = yield in_thread(curl, p.http_port, files, "/get?key=k",
                          cert=(files.client_cert, files.client_key))
    assert out.stdout == b"v\n200", out.stderr
    out = yield in_thread(curl, p.http_port, files, "/get?key=k")
    assert out.returncode != 0 and not out.stdout.startswith(b"v")
    out = yield in_thread(curl, p.http_port, files, "/healthz",
                          cert=(files.other_client_cert, files.other_client_key))
    assert out.returncode != 0


def test_tls_client_ca_without_an_ssl_listener_stops_start_up(files, redis_server):
    from twisted.internet import reactor

    from redisp.service import build_proxy

    with pytest.raises(SystemExit, match="tls_client_ca is set but no listener is an ssl: "):
        build_proxy(proxy_config(redis_server.url, tls_client_ca=files.ca), reactor)


def test_an_unreadable_tls_client_ca_stops_start_up_naming_it(files, redis_server, tmp_path):
    from twisted.internet import reactor

    from redisp.service import build_proxy

    config = proxy_config(redis_server.url, resp=ssl_endpoint(files),
                          tls_client_ca=str(tmp_path / "nope.pem"))
    with pytest.raises(SystemExit, match=r"tls_client_ca: cannot read .*nope.pem"):
        build_proxy(config, reactor)


# -- twistd: one line for a TLS mistake --------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--redis", "rediss://127.0.0.1:1/0", "--redis-tls-ca", "missing-ca.pem"],
     b"redis_tls_ca: cannot read missing-ca.pem"),
    (["--redis", "redis://127.0.0.1:1/0", "--redis-tls-ca", "ca.pem"],
     b"redis_tls_ca is set but the backing URL is redis://"),
    (["--redis", "rediss://127.0.0.1:1/0", "--redis-tls-cert", "{client_cert}",
      "--redis-tls-key", "{encrypted_key}"], b"is encrypted"),
    (["--tls-client-ca", "{ca}"], b"tls_client_ca is set but no listener is an ssl:"),
])
def test_twistd_stops_with_one_line_for_a_tls_mistake(files, tmp_path, args, words):
    from dataclasses import asdict

    from tests.test_twistd import twistd

    argv = [a.format(**asdict(files)) for a in args]
    out = twistd("-n", "--pidfile=", "redisp", "--http", "tcp:0:interface=127.0.0.1",
                 "--resp", "tcp:0:interface=127.0.0.1", *argv, cwd=str(tmp_path))
    assert out.returncode != 0
    assert words in out.stderr, out.stderr
    assert b"Traceback" not in out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr

"""CLIENT LIST, INFO and KILL speak of redisp's own clients (commands/client_list.py):
the ids CLIENT ID hands out, and never redisp's own backing connections."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.resp_client import connect
from tests.support import until
from tests.test_forwarding import proxy  # noqa: F401 (a fixture)

inline = pytest_twisted.inlineCallbacks


def fields(line: bytes) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.decode().split(" "))


def listed(frame: bytes) -> list[dict[str, str]]:
    body = frame.split(b"\r\n", 1)[1][:-2]
    return [fields(line) for line in body.split(b"\n") if line]


def own_id(frame: bytes) -> int:
    return int(frame[1:-2])


@inline
def test_client_list_shows_redisps_clients_with_their_own_ids(proxy, clients):  # noqa: F811
    # cmd= names a subcommand from the backing's table (client|setname)
    yield until(lambda: proxy.proxy.forwarder.table is not None)
    a = yield clients(proxy.resp_port)
    b = yield clients(proxy.resp_port)
    id_a = own_id((yield a.call("CLIENT", "ID")))
    id_b = own_id((yield b.call("CLIENT", "ID")))
    yield b.call("CLIENT", "SETNAME", "bee")
    entries = {int(e["id"]): e for e in listed((yield a.call("CLIENT", "LIST")))}
    assert {id_a, id_b} <= set(entries)
    assert entries[id_b]["name"] == "bee" and entries[id_b]["cmd"] == "client|setname"
    assert entries[id_a]["cmd"] == "client|list"
    assert entries[id_a]["laddr"].endswith(f":{proxy.resp_port}")
    only_b = listed((yield a.call("CLIENT", "LIST", "ID", str(id_b))))
    assert [int(e["id"]) for e in only_b] == [id_b]
    info = fields((yield b.call("CLIENT", "INFO")).split(b"\r\n", 1)[1][:-3])
    assert int(info["id"]) == id_b and info["name"] == "bee"


@inline
def test_client_kill_by_id_closes_that_client_and_nothing_of_redisps(proxy, clients):  # noqa: F811
    a = yield clients(proxy.resp_port)
    b = yield clients(proxy.resp_port)
    id_b = own_id((yield b.call("CLIENT", "ID")))
    flushes = proxy.proxy.metrics.invalidation_flushes
    assert (yield a.call("CLIENT", "KILL", "ID", str(id_b))) == b":1\r\n"
    yield b.hung_up()
    ids = [int(e["id"]) for e in listed((yield a.call("CLIENT", "LIST")))]
    assert id_b not in ids
    assert (yield a.call("CLIENT", "KILL", "ID", str(id_b))) == b":0\r\n"
    assert (yield a.call("PING")) == b"+PONG\r\n"
    assert proxy.proxy.metrics.invalidation_flushes == flushes


@inline
def test_client_kill_self_answers_then_closes(proxy, clients):  # noqa: F811
    a = yield clients(proxy.resp_port)
    id_a = own_id((yield a.call("CLIENT", "ID")))
    assert (yield a.call("CLIENT", "KILL", "ID", str(id_a))) == b":0\r\n"  # SKIPME yes
    assert (yield a.call("CLIENT", "KILL", "ID", str(id_a), "SKIPME", "no")) == b":1\r\n"
    yield a.hung_up()


@inline
def test_client_kill_by_address(proxy, clients):  # noqa: F811
    a = yield clients(proxy.resp_port)
    b = yield clients(proxy.resp_port)
    id_b = own_id((yield b.call("CLIENT", "ID")))
    [entry] = listed((yield a.call("CLIENT", "LIST", "ID", str(id_b))))
    assert (yield a.call("CLIENT", "KILL", entry["addr"])) == b"+OK\r\n"
    yield b.hung_up()
    assert (yield a.call("CLIENT", "KILL", entry["addr"])) == b"-ERR No such client\r\n"


@pytest.mark.parametrize("args,reply", [
    (("CLIENT", "KILL", "ID", "0"), b"-ERR client-id should be greater than 0\r\n"),
    (("CLIENT", "KILL", "NOSUCH", "x"), b"-ERR syntax error\r\n"),
    (("CLIENT", "LIST", "TYPE", "x"), b"-ERR Unknown client type 'x'\r\n"),
])
@inline
def test_client_errors_as_redis(proxy, clients, redis_server, args, reply):  # noqa: F811
    a = yield clients(proxy.resp_port)
    direct = yield connect(redis_server.port)
    try:
        assert (yield direct.call(*args)) == reply
        assert (yield a.call(*args)) == reply
    finally:
        direct.transport.loseConnection()
        yield until(lambda: direct.lost)


@inline
def test_client_kill_self_in_a_pipeline_runs_nothing_after_it_as_redis(
        proxy, clients, redis_server):  # noqa: F811
    """Redis closes a client that killed itself once its reply is written,
    and runs nothing it sent after the CLIENT KILL (processInputBuffer
    stops at CLIENT_CLOSE_AFTER_REPLY): same bytes, same (absent) write."""
    seen = []
    for port in (redis_server.port, proxy.resp_port):
        c = yield connect(port)
        own = own_id((yield c.call("CLIENT", "ID")))
        c.send(("CLIENT", "KILL", "ID", str(own), "SKIPME", "no"),
               ("SET", "killed:after", "1"), ("PING",))
        yield c.hung_up()
        seen.append(list(c._frames))
    assert seen[0] == seen[1] == [b":1\r\n"]
    checker = yield clients(redis_server.port)
    assert (yield checker.call("EXISTS", "killed:after")) == b":0\r\n"

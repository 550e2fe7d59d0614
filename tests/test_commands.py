"""The RESP door's commands, run on a Session with a fake reader: each
command's reply in RESP2 and RESP3, and Redis's wording for every error."""

from __future__ import annotations

from dataclasses import replace

import hiredis
import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

import redisp
from redisp.backing.connection import BackingReplyError, BackingTimeout, BackingUnavailable
from redisp.commands.dispatch import execute
from redisp.commands.local import TABLE
from redisp.commands.session import Session
from redisp.config import Config
from redisp.metrics import Metrics
from redisp.protocol.codec import RESP2, RESP3


class FakeReader:
    """Stands in for CachedReader.

    Keys in ``values`` are cache hits answered at once; keys in ``later``
    are answered with a Deferred the test fires with ``answer``; keys in
    ``failures`` fail with that error.
    """

    def __init__(self, values: dict[bytes, bytes] | None = None) -> None:
        self.values = dict(values or {})
        self.later: set[bytes] = set()
        self.failures: dict[bytes, Exception] = {}
        self.waiting: dict[bytes, list[Deferred]] = {}
        self.waiting_many: list[tuple[list[bytes], Deferred]] = []

    def get(self, key: bytes, owner=None):
        if key in self.failures:
            return fail(self.failures[key])
        if key in self.later:
            d: Deferred = Deferred()
            self.waiting.setdefault(key, []).append(d)
            return d
        return self.values.get(key), key in self.values

    def read(self, key: bytes):
        """CachedReader.read: only a hit is answered at once."""
        if key in self.failures or key in self.later or self.values.get(key) is None:
            return None
        return self.values[key], True

    def read_packet(self, keys: list[bytes], done, owner=None) -> None:
        """CachedReader.read_packet over ``get``: one answer once all are in."""
        results: list = [None] * len(keys)
        owed = [len(keys) + 1]
        hits = 0

        def got(index, answer):
            results[index] = answer if isinstance(answer, Failure) else answer[0]
            owed[0] -= 1
            if not owed[0]:
                done(results, hits)

        for index, key in enumerate(keys):
            result = self.get(key)
            if isinstance(result, tuple):
                results[index] = result[0]
                hits += result[1]
                owed[0] -= 1
            else:
                result.addBoth(lambda answer, index=index: got(index, answer))
        owed[0] -= 1
        if not owed[0]:
            done(results, hits)

    def cached(self, keys: list[bytes]) -> list[bytes] | None:
        if all(self.values.get(key) is not None and key not in self.later
               and key not in self.failures
               for key in keys):
            return [self.values[key] for key in keys]
        return None

    def get_many(self, keys: list[bytes], owner=None):
        if any(key in self.later for key in keys):
            d: Deferred = Deferred()
            self.waiting_many.append((keys, d))
            return d
        return [self.values.get(key) for key in keys]

    def answer(self, key: bytes, value: bytes | None = None, hit: bool = False) -> None:
        self.waiting[key].pop(0).callback((value, hit))

    def fail(self, key: bytes, error: BaseException) -> None:
        self.waiting[key].pop(0).errback(error)


def make_session(reader: FakeReader | None = None, clock: task.Clock | None = None,
                 config: Config | None = None, metrics: Metrics | None = None) -> Session:
    clock = clock or task.Clock()
    metrics = metrics or Metrics(started=clock.seconds())
    return Session(7, reader or FakeReader(), metrics, config or Config(), clock)


def run(session: Session, *argv: bytes) -> tuple[bytes, str]:
    """A command that answers at once: its (reply, outcome)."""
    result = execute(session, list(argv))
    assert isinstance(result, tuple), result
    return result


def reply(session: Session, *argv: bytes) -> bytes:
    return run(session, *argv)[0]


def settled(d: Deferred) -> tuple[bytes, str]:
    results: list = []
    d.addBoth(results.append)
    assert len(results) == 1, "the Deferred has not fired"
    return results[0]


def decode(data: bytes):
    reader = hiredis.Reader()
    reader.feed(data)
    value = reader.gets()
    assert reader.gets() is False, "more than one reply"
    return value


@pytest.fixture
def session() -> Session:
    return make_session(FakeReader({b"k": b"value"}))


@pytest.fixture
def resp3(session: Session) -> Session:
    run(session, b"HELLO", b"3")
    return session


# -- GET and MGET ------------------------------------------------------------------


def test_get_hit(session):
    assert run(session, b"GET", b"k") == (b"$5\r\nvalue\r\n", "hit")


def test_get_absent_resp2(session):
    assert run(session, b"GET", b"nope") == (b"$-1\r\n", "absent")


def test_get_absent_resp3(resp3):
    """After HELLO 3 a null is ``_``: redis-py's RESP3 parser hangs on ``$-1``."""
    assert run(resp3, b"GET", b"nope") == (b"_\r\n", "absent")


def test_get_miss_answers_later(session):
    session.reader.later.add(b"slow")
    d = execute(session, [b"GET", b"slow"])
    session.reader.answer(b"slow", b"fetched", hit=False)
    assert settled(d) == (b"$7\r\nfetched\r\n", "miss")


def test_get_later_absent(session):
    session.reader.later.add(b"slow")
    d = execute(session, [b"GET", b"slow"])
    session.reader.answer(b"slow", None)
    assert settled(d) == (b"$-1\r\n", "absent")


def test_get_keeps_the_protocol_it_was_asked_in(session):
    """A HELLO 3 pipelined behind a slow GET does not change that GET's reply."""
    session.reader.later.add(b"slow")
    d = execute(session, [b"GET", b"slow"])
    run(session, b"HELLO", b"3")
    session.reader.answer(b"slow", None)
    assert settled(d) == (b"$-1\r\n", "absent")


def test_get_key_is_binary(session):
    session.reader.values[b"\x00\r\n\xff"] = b"\r\n"
    assert reply(session, b"GET", b"\x00\r\n\xff") == b"$2\r\n\r\n\r\n"


def test_get_wrongtype_keeps_redis_error_code(session):
    text = "WRONGTYPE Operation against a key holding the wrong kind of value"
    session.reader.failures[b"list"] = BackingReplyError(text)
    assert settled(execute(session, [b"GET", b"list"])) == (
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        "backing_error",
    )


def test_get_backing_reply_error_without_code_gets_err(session):
    session.reader.failures[b"k2"] = BackingReplyError("something odd")
    assert settled(execute(session, [b"GET", b"k2"]))[0] == b"-ERR something odd\r\n"


def test_get_backing_unavailable(session):
    session.reader.failures[b"k2"] = BackingUnavailable(
        "backing redis unavailable (Connection refused)")
    assert settled(execute(session, [b"GET", b"k2"])) == (
        b"-ERR backing redis unavailable (Connection refused)\r\n", "backing_error",
    )


def test_get_backing_timeout(session):
    session.reader.failures[b"k2"] = BackingTimeout("backing redis timed out after 2s")
    assert settled(execute(session, [b"GET", b"k2"]))[0] == (
        b"-ERR backing redis timed out after 2s\r\n"
    )


def test_get_unexpected_failure_is_left_to_the_server(session):
    """Only BackingErrors are replies; anything else is a bug, which the
    server answers with ``-ERR internal error`` and logs."""
    session.reader.failures[b"k2"] = ZeroDivisionError()
    result = settled(execute(session, [b"GET", b"k2"]))
    assert result.check(ZeroDivisionError)


def test_mget_hits(session):
    assert run(session, b"MGET", b"k", b"nope") == (b"*2\r\n$5\r\nvalue\r\n$-1\r\n", "hit")


def test_mget_resp3_nulls(resp3):
    assert reply(resp3, b"MGET", b"nope", b"k") == b"*2\r\n_\r\n$5\r\nvalue\r\n"


def test_mget_later(session):
    session.reader.later.add(b"slow")
    d = execute(session, [b"MGET", b"k", b"slow"])
    keys, waiting = session.reader.waiting_many.pop()
    assert keys == [b"k", b"slow"]
    waiting.callback([b"value", b"v2"])
    assert settled(d) == (b"*2\r\n$5\r\nvalue\r\n$2\r\nv2\r\n", "miss")


def test_mget_later_all_absent(session):
    session.reader.later.add(b"slow")
    d = execute(session, [b"MGET", b"slow"])
    session.reader.waiting_many.pop()[1].callback([None])
    assert settled(d) == (b"*1\r\n$-1\r\n", "absent")


# -- connection commands -----------------------------------------------------------------


def test_ping(session):
    assert run(session, b"PING") == (b"+PONG\r\n", "other")
    assert reply(session, b"PING", b"hi") == b"$2\r\nhi\r\n"


def test_ping_resp3(resp3):
    assert reply(resp3, b"PING") == b"+PONG\r\n"


def test_ping_with_two_arguments(session):
    assert run(session, b"PING", b"a", b"b") == (
        b"-ERR wrong number of arguments for 'ping' command\r\n", "bad_request",
    )


def test_echo(session):
    assert reply(session, b"ECHO", b"a\r\nb") == b"$4\r\na\r\nb\r\n"


def test_quit(session):
    assert reply(session, b"QUIT") == b"+OK\r\n"
    assert session.closing


def test_select_zero(session):
    assert reply(session, b"SELECT", b"0") == b"+OK\r\n"


def test_select_other_db(session):
    """The proxy serves one database, the one --redis names."""
    answer, outcome = run(session, b"SELECT", b"1")
    assert answer.startswith(b"-ERR DB index is out of range")
    assert b"--redis" in answer
    assert outcome == "bad_request"


def test_select_not_a_number(session):
    assert reply(session, b"SELECT", b"x") == b"-ERR value is not an integer or out of range\r\n"


# -- HELLO -----------------------------------------------------------------------------


def test_hello_without_version_stays_resp2(session):
    assert decode(reply(session, b"HELLO")) == [
        b"server", b"redis", b"version", b"7.0.0", b"proto", 2, b"id", 7,
        b"mode", b"standalone", b"role", b"master", b"modules", [],
    ]
    assert session.encoder is RESP2


def test_hello_3_switches_and_answers_a_map(session):
    answer = reply(session, b"HELLO", b"3")
    assert answer.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert decode(answer) == {
        b"server": b"redis", b"version": b"7.0.0", b"proto": 3, b"id": 7,
        b"mode": b"standalone", b"role": b"master", b"modules": [],
    }
    assert session.encoder is RESP3


def test_hello_2_switches_back(resp3):
    assert reply(resp3, b"HELLO", b"2").startswith(b"*14\r\n")
    assert resp3.encoder is RESP2
    assert reply(resp3, b"GET", b"nope") == b"$-1\r\n"


def test_hello_unsupported_version(session):
    assert run(session, b"HELLO", b"4") == (
        b"-NOPROTO unsupported protocol version\r\n", "bad_request",
    )
    assert run(session, b"HELLO", b"1")[0] == b"-NOPROTO unsupported protocol version\r\n"
    assert session.encoder is RESP2


def test_hello_version_not_a_number(session):
    assert reply(session, b"HELLO", b"x") == (
        b"-ERR Protocol version is not an integer or out of range\r\n"
    )


def test_hello_auth_default_is_accepted_without_passwords(session):
    """No password and no users: the default user takes any password, as on
    a Redis without requirepass (tests/test_auth.py has the rest)."""
    assert decode(reply(session, b"HELLO", b"3", b"AUTH", b"default", b"secret"))[b"proto"] == 3


def test_hello_auth_needs_two_arguments(session):
    assert reply(session, b"HELLO", b"3", b"AUTH", b"x") == (
        b"-ERR Syntax error in HELLO option 'AUTH'\r\n"
    )
    assert session.encoder is RESP2


def test_hello_setname(session):
    reply(session, b"HELLO", b"3", b"setname", b"worker-1")
    assert session.name == b"worker-1"


def test_hello_bad_name(session):
    assert reply(session, b"HELLO", b"3", b"SETNAME", b"a b") == (
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    )


def test_hello_unknown_option(session):
    assert reply(session, b"HELLO", b"3", b"FOO") == b"-ERR Syntax error in HELLO option 'FOO'\r\n"


# -- CLIENT --------------------------------------------------------------------------


def test_client_name(session):
    assert reply(session, b"CLIENT", b"GETNAME") == b"$-1\r\n"
    assert reply(session, b"CLIENT", b"SETNAME", b"app") == b"+OK\r\n"
    assert reply(session, b"client", b"getname") == b"$3\r\napp\r\n"
    assert reply(session, b"CLIENT", b"SETNAME", b"") == b"+OK\r\n"
    assert reply(session, b"CLIENT", b"GETNAME") == b"$-1\r\n"


def test_client_getname_resp3(resp3):
    assert reply(resp3, b"CLIENT", b"GETNAME") == b"_\r\n"


def test_client_setname_refuses_blanks(session):
    assert reply(session, b"CLIENT", b"SETNAME", b"a\nb") == (
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    )


def test_client_id(session):
    assert reply(session, b"CLIENT", b"ID") == b":7\r\n"


def test_client_setinfo(session):
    """redis-py sends these on connect (and ignores errors)."""
    assert reply(session, b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py") == b"+OK\r\n"
    assert reply(session, b"CLIENT", b"SETINFO", b"lib-ver", b"8.1.0") == b"+OK\r\n"
    assert (session.lib_name, session.lib_ver) == (b"redis-py", b"8.1.0")


def test_client_setinfo_unknown_option(session):
    assert reply(session, b"CLIENT", b"SETINFO", b"color", b"red") == (
        b"-ERR Unrecognized option 'color'\r\n"
    )


def test_client_setinfo_bad_value(session):
    assert reply(session, b"CLIENT", b"SETINFO", b"lib-name", b"a b") == (
        b"-ERR lib-name cannot contain spaces, newlines or special characters.\r\n"
    )


def test_client_unknown_subcommand(session):
    assert run(session, b"CLIENT", b"nosuch", b"x") == (
        b"-ERR unknown subcommand 'nosuch'. Try CLIENT HELP.\r\n", "bad_request",
    )


def test_client_subcommand_arity(session):
    """Redis names subcommands ``container|sub`` in arity errors."""
    assert reply(session, b"CLIENT", b"SETNAME") == (
        b"-ERR wrong number of arguments for 'client|setname' command\r\n"
    )
    assert reply(session, b"CLIENT", b"ID", b"x") == (
        b"-ERR wrong number of arguments for 'client|id' command\r\n"
    )


def test_client_alone(session):
    assert reply(session, b"CLIENT") == b"-ERR wrong number of arguments for 'client' command\r\n"


def test_client_help(session):
    assert decode(reply(session, b"CLIENT", b"HELP"))[0].startswith(b"CLIENT <subcommand>")


# -- COMMAND ---------------------------------------------------------------------------


def test_command_count(session):
    assert reply(session, b"COMMAND", b"COUNT") == b":%d\r\n" % len(TABLE)


def test_command_docs_is_empty(session):
    """redis-cli 7 accepts an empty array or map; an error would make it fall
    back to hints for every Redis command."""
    assert reply(session, b"COMMAND", b"DOCS") == b"*0\r\n"
    assert reply(session, b"COMMAND", b"DOCS", b"get") == b"*0\r\n"


def test_command_docs_resp3_is_a_map(resp3):
    assert reply(resp3, b"COMMAND", b"DOCS") == b"%0\r\n"


def test_command_info(session):
    entries = decode(reply(session, b"COMMAND", b"INFO", b"get", b"nosuch", b"MGET"))
    get, nosuch, mget = entries
    assert get[:7] == [b"get", 2, [b"readonly", b"fast"], 1, 1, 1,
                       [b"@read", b"@string", b"@fast"]]
    assert nosuch is None
    assert mget[:6] == [b"mget", -2, [b"readonly", b"fast"], 1, -1, 1]


def test_command_info_unknown_is_null_in_resp2(session):
    assert reply(session, b"COMMAND", b"INFO", b"nosuch") == b"*1\r\n$-1\r\n"


def test_command_info_resp3_uses_sets_and_maps(resp3):
    answer = reply(resp3, b"COMMAND", b"INFO", b"get")
    assert answer.startswith(b"*1\r\n*10\r\n$3\r\nget\r\n:2\r\n~2\r\n+readonly\r\n+fast\r\n")
    assert decode(answer)[0][8][0][b"begin_search"] == {
        b"type": b"index", b"spec": {b"index": 1},
    }


def test_command_info_subcommand(session):
    assert decode(reply(session, b"COMMAND", b"INFO", b"client|setname"))[0][:2] == [
        b"client|setname", 3,
    ]


def test_command_lists_every_command(session):
    entries = decode(reply(session, b"COMMAND"))
    assert [entry[0].decode() for entry in entries] == list(TABLE)
    client = next(entry for entry in entries if entry[0] == b"client")
    assert b"client|setinfo" in [sub[0] for sub in client[9]]


def test_command_unknown_subcommand(session):
    assert reply(session, b"COMMAND", b"FOO") == (
        b"-ERR unknown subcommand 'FOO'. Try COMMAND HELP.\r\n"
    )


def test_command_count_arity(session):
    assert reply(session, b"COMMAND", b"COUNT", b"x") == (
        b"-ERR wrong number of arguments for 'command|count' command\r\n"
    )


# -- unknown commands and arity ------------------------------------------------------------


def test_unknown_command_wording(session):
    """Redis 7's exact text, down to the blank after the last argument."""
    assert run(session, b"SET", b"a", b"b") == (
        b"-ERR unknown command 'SET', with args beginning with: 'a' 'b' \r\n", "bad_request",
    )


def test_unknown_command_without_arguments(session):
    assert reply(session, b"foo") == b"-ERR unknown command 'foo', with args beginning with: \r\n"


def test_unknown_command_arguments_are_cut_at_128_bytes(session):
    """Each argument is printed with what is left of 128 bytes (checked
    against redis-server 7.0)."""
    answer = reply(session, b"x", b"a" * 100, b"b" * 100, b"c")
    assert answer == (
        b"-ERR unknown command 'x', with args beginning with: '" + b"a" * 100 + b"' '"
        + b"b" * 25 + b"' \r\n"
    )


def test_unknown_command_keeps_the_reply_on_one_line(session):
    assert reply(session, b"a\r\nb", b"c\nd") == (
        b"-ERR unknown command 'a  b', with args beginning with: 'c d' \r\n"
    )


def test_command_names_are_case_insensitive(session):
    assert reply(session, b"gEt", b"k") == b"$5\r\nvalue\r\n"
    assert reply(session, b"ping") == b"+PONG\r\n"


def test_wrong_arity_names_the_command_in_lower_case(session):
    assert run(session, b"GET") == (
        b"-ERR wrong number of arguments for 'get' command\r\n", "bad_request",
    )
    assert reply(session, b"gEt", b"a", b"b") == (
        b"-ERR wrong number of arguments for 'get' command\r\n"
    )
    assert reply(session, b"MGET") == b"-ERR wrong number of arguments for 'mget' command\r\n"
    assert reply(session, b"ECHO") == b"-ERR wrong number of arguments for 'echo' command\r\n"


# -- INFO ----------------------------------------------------------------------------


def info_text(session: Session, *sections: bytes) -> str:
    answer = reply(session, b"INFO", *sections)
    assert answer.startswith(b"$"), "INFO must be a bulk string"
    value = decode(answer)
    assert isinstance(value, bytes)
    return value.decode()


def fields(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)


def test_info_is_a_bulk_string_with_every_section(session):
    text = info_text(session)
    assert text.startswith("# Server\r\nredis_version:7.0.0\r\n")
    for section in ("# Clients", "# Memory", "# Stats", "# Keyspace", "# Proxy"):
        assert f"\r\n\r\n{section}\r\n" in text
    assert text.endswith("\r\n") and not text.endswith("\r\n\r\n")


def test_info_is_a_bulk_string_in_resp3_too(resp3):
    """Redis sends a verbatim string in RESP3; redis-cli asserts on a bulk."""
    assert reply(resp3, b"INFO").startswith(b"$")


def test_info_proxy_section():
    clock = task.Clock()
    clock.advance(1000)
    metrics = Metrics(started=clock.seconds())
    config = replace(Config(), ttl=2.5, capacity=7, concurrency=3, invalidation="tracking")
    session = make_session(clock=clock, metrics=metrics, config=config)
    metrics.connected_clients = 4
    metrics.cache_size = lambda: 5
    metrics.backing_up = lambda: True
    metrics.cache_hits, metrics.cache_misses = 10, 11
    metrics.cache_evictions, metrics.cache_expirations, metrics.cache_invalidations = 1, 2, 3
    metrics.invalidation_state = lambda: "active"
    metrics.invalidation_messages, metrics.invalidation_flushes = 6, 1
    clock.advance(90061)
    text = info_text(session, b"proxy")
    assert text.startswith("# Proxy\r\n")
    assert fields(text) == {
        "redisp_version": redisp.__version__, "uptime_in_seconds": "90061",
        "connected_clients": "4", "cache_size": "5", "cache_hits": "10", "cache_misses": "11",
        "cache_evictions": "1", "cache_expirations": "2", "cache_invalidations": "3",
        "backing_redis": "redis://127.0.0.1:6379/0", "backing_status": "up",
        "ttl": "2.5", "capacity": "7", "concurrency": "3", "invalidation": "tracking",
        "invalidation_state": "active", "invalidation_messages": "6", "invalidation_flushes": "1",
        "pinned_clients": "0", "write_invalidations": "0", "write_flushes": "0",
        "forwarded_commands": "0", "topology": "single 127.0.0.1:6379", "forward": "all",
        "auth_failures": "0",
    }
    server = fields(info_text(session, b"server"))
    assert (server["uptime_in_seconds"], server["uptime_in_days"]) == ("90061", "1")
    stats = fields(info_text(session, b"stats"))
    assert (stats["keyspace_hits"], stats["keyspace_misses"]) == ("10", "11")


def test_info_has_the_fields_clients_and_tools_read(session):
    """redis-py's test suite reads arch_bits; redis-cli --stat reads these."""
    text = fields(info_text(session))
    for name in ("redis_version", "arch_bits", "uptime_in_seconds", "connected_clients",
                 "blocked_clients", "used_memory", "total_commands_processed",
                 "total_connections_received", "keyspace_hits", "keyspace_misses"):
        assert name in text, name
    assert int(text["used_memory"]) > 0


def test_info_backing_down(session):
    assert fields(info_text(session, b"proxy"))["backing_status"] == "down"


def test_info_sections_are_case_insensitive(session):
    text = info_text(session, b"SERVER", b"Clients")
    assert text.startswith("# Server\r\n")
    assert "\r\n\r\n# Clients\r\n" in text
    assert "# Proxy" not in text


@pytest.mark.parametrize("word", [b"all", b"default", b"EVERYTHING"])
def test_info_all_sections(session, word):
    assert info_text(session, word) == info_text(session)


def test_info_unknown_section_is_empty(session):
    assert reply(session, b"INFO", b"nosuch") == b"$0\r\n\r\n"

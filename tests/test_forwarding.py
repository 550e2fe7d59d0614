"""Forwarding end to end (SPEC §7): redisp in front of a real redis-server.

Every other command goes to the backing and comes back as the bytes Redis
sends (compared side by side with a connection to Redis itself, RESP2 and
RESP3); writes drop what they touch before their reply; connection state
(MULTI, WATCH, blocking commands, pub/sub, SELECT, CLIENT REPLY, MONITOR)
lives on a pinned backing connection that goes when the state or the client
does.

The clients are raw RESP connections on the reactor (``RespClient``): reply
frames as bytes, in order, push frames included, so a test sees exactly
what a client would.  Clients that block (redis-py) run in threads.  No
sleeps: tests wait on replies, or poll with a deadline (``until``).
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
import redis
from twisted.internet import defer, threads

from redisp.protocol.frames import decode
from tests.resp_client import connect
from tests.support import STARTUP_LIMIT, RunningProxy, proxy_config, until

inline = pytest_twisted.inlineCallbacks


@pytest.fixture(scope="module")
def proxy(redis_server):
    """One proxy for the module (forward: all, concurrency 1)."""
    p = RunningProxy(proxy_config(redis_server.url))
    yield p
    pytest_twisted.blockon(p.stop())


@pytest.fixture
def direct(redis_server):
    """A redis-py client straight to the backing (for checks behind redisp's back)."""
    client = redis_server.client()
    yield client
    client.close()


def backing_clients(direct) -> list[dict]:
    return direct.client_list()


def in_thread(f, *args, **kwargs) -> defer.Deferred:
    return threads.deferToThread(f, *args, **kwargs)


@defer.inlineCallbacks
def run_on(port: int, requests, resp3: bool):
    client = yield connect(port)
    try:
        if resp3:
            yield client.call("HELLO", "3")
        frames = yield client.pipeline(*requests)
    finally:
        yield client.close()
    return frames


# -- parity: the same bytes as Redis -------------------------------------------------------

BIG = b"x" * 300_000  # several reads' worth: the relay sees it in pieces

#: deterministic commands of every data type; each reply is compared byte for byte
PARITY = [
    # strings
    ["SET", "s", "hello"], ["GET", "s"], ["APPEND", "s", " world"], ["STRLEN", "s"],
    ["GETRANGE", "s", "0", "4"], ["SETRANGE", "s", "0", "J"], ["GET", "s"],
    ["INCR", "n"], ["INCRBY", "n", "41"], ["INCRBYFLOAT", "f", "1.5"], ["DECR", "n"],
    ["MSET", "m1", "a", "m2", "b"], ["MGET", "m1", "m2", "nope"], ["GETDEL", "m2"],
    ["SET", "s2", "v", "NX"], ["SET", "s2", "w", "NX"], ["SET", "s2", "w", "XX", "GET"],
    ["SETEX", "e", "100", "v"], ["TTL", "e"], ["PERSIST", "e"], ["TTL", "e"], ["PTTL", "nope"],
    ["EXISTS", "s", "n", "nope"], ["TYPE", "s"], ["OBJECT", "ENCODING", "n"],
    ["SET", "big", BIG], ["GET", "big"], ["STRLEN", "big"],
    ["SETBIT", "bits", "7", "1"], ["GETBIT", "bits", "7"], ["BITCOUNT", "bits"],
    ["PFADD", "hll", "a", "b", "c"], ["PFCOUNT", "hll"],
    # hashes
    ["HSET", "h", "a", "1", "b", "2"], ["HGET", "h", "a"], ["HGETALL", "h"],
    ["HMGET", "h", "a", "zz"], ["HINCRBY", "h", "a", "5"], ["HINCRBYFLOAT", "h", "b", "0.25"],
    ["HKEYS", "h"], ["HVALS", "h"], ["HLEN", "h"], ["HEXISTS", "h", "a"], ["HDEL", "h", "a"],
    ["HSTRLEN", "h", "b"], ["HSCAN", "h", "0"],
    # lists
    ["RPUSH", "l", "1", "2", "3", "2"], ["LPUSH", "l", "0"], ["LRANGE", "l", "0", "-1"],
    ["LPOS", "l", "2", "COUNT", "0"], ["LINDEX", "l", "1"], ["LLEN", "l"], ["LPOP", "l", "2"],
    ["RPOP", "l"], ["LMPOP", "1", "l", "LEFT"], ["LMOVE", "l", "l2", "LEFT", "RIGHT"],
    ["RPUSH", "bigl", BIG, BIG], ["LRANGE", "bigl", "0", "-1"],
    # sets
    ["SADD", "st", "x", "y", "z"], ["SMEMBERS", "st"], ["SISMEMBER", "st", "x"],
    ["SMISMEMBER", "st", "x", "q"], ["SCARD", "st"], ["SADD", "st2", "y"],
    ["SINTER", "st", "st2"], ["SREM", "st", "x"], ["SDIFF", "st", "st2"],
    # sorted sets (RESP3: doubles)
    ["ZADD", "z", "1.5", "a", "2", "b", "-3.25", "c"], ["ZSCORE", "z", "a"],
    ["ZMSCORE", "z", "a", "nope"], ["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    ["ZRANGEBYSCORE", "z", "-inf", "+inf", "WITHSCORES"], ["ZINCRBY", "z", "1", "a"],
    ["ZRANK", "z", "b"], ["ZCARD", "z"], ["ZPOPMIN", "z"], ["ZRANGE", "z", "0", "-1"],
    ["ZADD", "z", "INCR", "1", "b"],
    # streams
    ["XADD", "x", "1-1", "f", "v"], ["XADD", "x", "2-1", "g", "w", "h", "u"], ["XLEN", "x"],
    ["XRANGE", "x", "-", "+"], ["XREVRANGE", "x", "+", "-", "COUNT", "1"],
    ["XREAD", "COUNT", "5", "STREAMS", "x", "0"], ["XGROUP", "CREATE", "x", "g1", "0"],
    ["XREADGROUP", "GROUP", "g1", "c1", "COUNT", "1", "STREAMS", "x", ">"],
    ["XPENDING", "x", "g1"], ["XINFO", "GROUPS", "x"],
    # geo, scripting, keyspace
    ["GEOADD", "geo", "13.361389", "38.115556", "Palermo", "15.087269", "37.502669", "Catania"],
    ["GEODIST", "geo", "Palermo", "Catania"], ["GEOPOS", "geo", "Palermo"],
    ["EVAL", "return {1, 'two', {3}}", "0"],
    ["EVAL", "return redis.call('GET', KEYS[1])", "1", "s"],
    ["EVAL", "redis.setresp(3); return {double=1.5}", "0"],
    ["RENAME", "s2", "s3"], ["DEL", "s3", "nope"], ["UNLINK", "m1"], ["DBSIZE"],
    ["COPY", "n", "n2"], ["GET", "n2"], ["KEYS", "m*"],
    ["CONFIG", "GET", "maxmemory"], ["LOLWUT", "VERSION", "5", "1", "1", "1"],
    ["OBJECT", "HELP"], ["COMMAND", "DOCS", "get"], ["ECHO", "e"], ["PING"], ["PING", "p"],
    # errors: Redis's own, unchanged
    ["GET", "h"], ["INCR", "s"], ["LPUSH", "h", "x"], ["FOOBAR", "a", "b"], ["GET"],
    ["GET", "a", "b"], ["SET", "k"], ["SET", "k", "v", "NX", "XX"], ["RENAME", "nope", "x"],
    ["OBJECT", "NOPE"], ["EVALSHA", "0" * 40, "0"], ["HSET", "h", "only"],
    ["XADD", "x", "1-1", "f", "v"], ["ZADD", "z", "nan", "m"],
]


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@inline
def test_replies_are_the_bytes_redis_sends(proxy, redis_server, resp3):
    yield until(lambda: proxy.proxy.backing.up)
    # FLUSHALL through redisp: it empties Redis and the cache alike
    yield run_on(proxy.resp_port, [["FLUSHALL"]], resp3=False)
    expected = yield run_on(redis_server.port, PARITY, resp3)
    yield run_on(proxy.resp_port, [["FLUSHALL"]], resp3=False)
    got = yield run_on(proxy.resp_port, PARITY, resp3)
    assert len(got) == len(expected)
    for argv, want, frame in zip(PARITY, expected, got):
        assert frame == want, f"{[a[:20] for a in argv]}"
    if resp3:  # the RESP3 types really were there
        kinds = {frame[:1] for frame in got}
        assert {b"%", b"~", b",", b"="} <= kinds
    yield run_on(proxy.resp_port, [["FLUSHALL"]], resp3=False)


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@inline
def test_command_table_is_the_backings_own(proxy, redis_server, resp3):
    requests = [["COMMAND", "COUNT"], ["COMMAND", "INFO", "get", "set", "blpop", "nosuch"],
                ["COMMAND", "INFO"], ["COMMAND"], ["COMMAND", "GETKEYS", "SET", "a", "b"]]
    expected = yield run_on(redis_server.port, requests, resp3)
    got = yield run_on(proxy.resp_port, requests, resp3)
    assert got == expected
    assert decode(got[0]) > 200


@inline
def test_inline_requests_are_forwarded(proxy, clients):
    c = yield clients(proxy.resp_port)
    c.transport.write(b"SET inl:k 42\r\nINCR inl:k\r\nGET inl:k\r\n")
    assert (yield c.read(3)) == [b"+OK\r\n", b":43\r\n", b"$2\r\n43\r\n"]


# -- writes drop what they touch -----------------------------------------------------------


@inline
def test_a_write_drops_the_cached_key_before_its_reply(proxy, clients):
    reader = yield clients(proxy.resp_port)
    writer = yield clients(proxy.resp_port)
    yield writer.call("SET", "w:k", "old")
    assert (yield reader.call("GET", "w:k")) == b"$3\r\nold\r\n"
    hits = proxy.proxy.metrics.cache_hits
    assert (yield reader.call("GET", "w:k")) == b"$3\r\nold\r\n"
    assert proxy.proxy.metrics.cache_hits == hits + 1  # cached
    for write in (["SET", "w:k", "new"], ["APPEND", "w:k", "!"], ["SETRANGE", "w:k", "0", "N"],
                  ["INCRBYFLOAT", "w:n", "1"], ["RENAME", "w:n", "w:k"]):
        before = yield reader.call("GET", "w:k")
        yield writer.call(*write)
        after = yield reader.call("GET", "w:k")
        assert after != before or write[0] == "INCRBYFLOAT", write
    assert (yield reader.call("GET", "w:k")) == b"$1\r\n1\r\n"
    yield writer.call("DEL", "w:k")
    assert (yield reader.call("GET", "w:k")) == b"$-1\r\n"


@inline
def test_flushall_flushdb_and_keyless_scripts_flush_the_cache(proxy, clients):
    c = yield clients(proxy.resp_port)
    for i, flush in enumerate((["FLUSHDB"], ["FLUSHALL"], ["SWAPDB", "0", "0"],
                               ["EVAL", "redis.call('SET', 'fl:k', 'script') return 1", "0"])):
        yield c.call("SET", "fl:k", f"v{i}")
        assert (yield c.call("GET", "fl:k")) == b"$2\r\nv%d\r\n" % i
        assert proxy.proxy.cache.get(b"fl:k") is not None
        yield c.call(*flush)
        assert proxy.proxy.cache.get(b"fl:k") is None, flush


@inline
def test_movable_key_writes_drop_the_keys_the_backing_names(proxy, clients):
    """SORT … STORE: key specs cannot say, COMMAND GETKEYSANDFLAGS does;
    the answer comes in the SORT's order, before a GET pipelined behind it."""
    c = yield clients(proxy.resp_port)
    yield c.pipeline(["DEL", "mv:l", "mv:dst"], ["RPUSH", "mv:l", "3", "1", "2"],
                     ["SET", "mv:dst", "stale"])
    assert (yield c.call("GET", "mv:dst")) == b"$5\r\nstale\r\n"
    assert proxy.proxy.cache.get(b"mv:dst") is not None
    got = yield c.pipeline(["SORT", "mv:l", "STORE", "mv:dst"], ["TYPE", "mv:dst"],
                           ["GET", "mv:dst"])
    assert got[:2] == [b":3\r\n", b"+list\r\n"]
    assert got[2].startswith(b"-WRONGTYPE")
    assert proxy.proxy.cache.get(b"mv:dst") is None


@pytest.mark.parametrize("concurrency", [1, 64])
@inline
def test_read_your_writes_with_concurrent_writers_and_readers(start_proxy, redis_db,
                                                              concurrency):
    """Every read sent after a write's reply has come back returns that
    write or a newer one (invalidation: off: only redisp's own write path
    keeps the cache right).

    Each key has one writer, so its values have an order: ``states[key]``
    lists them (None for deleted) in the order they were written, and
    ``acked[key]`` is the index of the newest one whose reply has come.
    A read notes ``acked`` when it is sent; what it returns must be that
    state or a later one.  Counters (INCR) are checked the same way on
    their value.  A writer also pipelines SET+GET on one connection and
    must read its own value.
    """
    p = start_proxy(concurrency=concurrency, invalidation="off")
    yield until(lambda: p.proxy.backing.up)
    rng = random.Random(9 + concurrency)
    writers, readers, keys_per_writer, rounds = 6, 6, 3, 60
    keys = {w: [b"ryw:%d:%d" % (w, i) for i in range(keys_per_writer)] for w in range(writers)}
    counters = [b"ryw:n:%d" % w for w in range(writers)]
    all_keys = [k for ks in keys.values() for k in ks]
    states: dict[bytes, list] = {k: [None] for k in all_keys}
    acked: dict[bytes, int] = {k: 0 for k in all_keys}
    counted: dict[bytes, int] = {k: 0 for k in counters}
    failures: list[str] = []
    reads = [0]

    def value_index(key: bytes, frame: bytes, floor: int) -> bool:
        value = decode(frame)
        history = states[key]
        if value is None:
            return any(history[i] is None for i in range(floor, len(history)))
        return value in history[floor:]

    @defer.inlineCallbacks
    def writer(w: int):
        c = yield connect(p.resp_port)
        mine = keys[w]
        for n in range(rounds):
            key = rng.choice(mine)
            op = rng.random()
            if op < 0.35:
                value = b"%d:%d" % (w, n)
                states[key].append(value)
                index = len(states[key]) - 1
                yield c.call("SET", key, value)
            elif op < 0.5:
                other = rng.choice(mine)
                value = b"%d:%d" % (w, n)
                states[key].append(value)
                states[other].append(value)
                index = len(states[key]) - 1
                other_index = len(states[other]) - 1
                yield c.call("MSET", key, value, other, value)
                acked[other] = max(acked[other], other_index)
            elif op < 0.6:
                states[key].append(None)
                index = len(states[key]) - 1
                yield c.call("DEL", key)
            elif op < 0.7:
                # EXPIRE 0 deletes at once (a write through redisp); a key
                # already gone stays gone
                states[key].append(None)
                index = len(states[key]) - 1
                yield c.call("EXPIRE", key, "0")
            elif op < 0.85:
                value = b"%d:%d:p" % (w, n)
                states[key].append(value)
                index = len(states[key]) - 1
                got = yield c.pipeline(["SET", key, value], ["GET", key])
                if got != [b"+OK\r\n", b"$%d\r\n%b\r\n" % (len(value), value)]:
                    failures.append(f"pipelined SET+GET {key!r}: {got!r}")
            else:
                frame = yield c.call("INCR", counters[w])
                counted[counters[w]] = max(counted[counters[w]], decode(frame))
                continue
            acked[key] = max(acked[key], index)
        yield c.close()

    @defer.inlineCallbacks
    def reader(r: int):
        c = yield connect(p.resp_port)
        for _ in range(rounds * 2):
            if rng.random() < 0.8:
                key = rng.choice(all_keys)
                floor = acked[key]
                frame = yield c.call("GET", key)
                if not value_index(key, frame, floor):
                    failures.append(f"GET {key!r} -> {frame!r}, older than state {floor} "
                                    f"of {states[key]!r}")
            elif rng.random() < 0.5:
                some = rng.sample(all_keys, 3)
                floors = [acked[k] for k in some]
                frame = yield c.call("MGET", *some)
                for key, floor, value in zip(some, floors, decode(frame)):
                    if not value_index(key, encode_value(value), floor):
                        failures.append(f"MGET {key!r} -> {value!r}, older than state {floor}")
            else:
                counter = rng.choice(counters)
                floor = counted[counter]
                frame = yield c.call("GET", counter)
                value = decode(frame)
                if floor and (value is None or int(value) < floor):
                    failures.append(f"GET {counter!r} -> {value!r}, below {floor}")
            reads[0] += 1
        yield c.close()

    yield defer.gatherResults([writer(w) for w in range(writers)]
                              + [reader(r) for r in range(readers)], consumeErrors=True)
    assert not failures, failures[:5]
    assert reads[0] == readers * rounds * 2
    m = p.proxy.metrics
    assert m.cache_hits > 0 and m.write_invalidations > 0  # the cache was in play


def encode_value(value) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%b\r\n" % (len(value), value)


# -- MULTI / EXEC / WATCH ------------------------------------------------------------------


@inline
def test_multi_exec_and_discard(proxy, clients, direct):
    c = yield clients(proxy.resp_port)
    yield c.call("SET", "tx:k", "1")
    assert (yield c.call("GET", "tx:k")) == b"$1\r\n1\r\n"  # cached now
    got = yield c.pipeline(["MULTI"], ["INCR", "tx:k"], ["GET", "tx:k"], ["SET", "tx:j", "x"],
                           ["EXEC"], ["GET", "tx:k"])
    assert got == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n",
                   b"*3\r\n:2\r\n$1\r\n2\r\n+OK\r\n", b"$1\r\n2\r\n"]
    other = yield clients(proxy.resp_port)
    assert (yield other.call("GET", "tx:k")) == b"$1\r\n2\r\n"  # EXEC dropped the cached 1
    yield until(lambda: c.unread == 0 and proxy.proxy.metrics.pinned_clients == 0)
    got = yield c.pipeline(["MULTI"], ["SET", "tx:k", "discarded"], ["DISCARD"], ["GET", "tx:k"])
    assert got == [b"+OK\r\n", b"+QUEUED\r\n", b"+OK\r\n", b"$1\r\n2\r\n"]
    assert direct.get("tx:k") == b"2"
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    # an error inside MULTI aborts EXEC, as Redis
    got = yield c.pipeline(["MULTI"], ["SET", "tx:k"], ["EXEC"])
    assert got[1].startswith(b"-ERR wrong number") and got[2].startswith(b"-EXECABORT")
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


@inline
def test_watch_then_a_conflicting_write_makes_exec_nil(proxy, clients):
    c = yield clients(proxy.resp_port)
    other = yield clients(proxy.resp_port)
    yield c.call("SET", "wt:k", "1")
    assert (yield c.call("WATCH", "wt:k")) == b"+OK\r\n"
    assert proxy.proxy.metrics.pinned_clients >= 1
    assert (yield other.call("SET", "wt:k", "2")) == b"+OK\r\n"
    got = yield c.pipeline(["MULTI"], ["SET", "wt:k", "mine"], ["EXEC"], ["GET", "wt:k"])
    assert got == [b"+OK\r\n", b"+QUEUED\r\n", b"*-1\r\n", b"$1\r\n2\r\n"]
    # WATCH then UNWATCH: pinned, then let go
    yield c.call("WATCH", "wt:k")
    yield c.call("UNWATCH")
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    # no conflict: EXEC runs
    got = yield c.pipeline(["WATCH", "wt:k"], ["MULTI"], ["INCR", "wt:n"], ["EXEC"])
    assert got[3] == b"*1\r\n:1\r\n"


@inline
def test_commands_before_and_after_a_pin_keep_their_order(proxy, clients):
    """Pipelined SET (shared pool) then WATCH (pinned): the WATCH must not
    overtake the SET, or EXEC would abort on the client's own write."""
    c = yield clients(proxy.resp_port)
    for i in range(5):
        got = yield c.pipeline(["SET", "ord:k", str(i)], ["WATCH", "ord:k"], ["MULTI"],
                               ["INCR", "ord:k"], ["EXEC"], ["GET", "ord:k"])
        assert got[4] == b"*1\r\n:%d\r\n" % (i + 1), got
        assert got[5] == b"$1\r\n%d\r\n" % (i + 1)


@inline
def test_a_client_leaving_mid_multi_applies_nothing(proxy, clients, direct):
    c = yield clients(proxy.resp_port)
    yield c.call("SET", "mid:k", "before")
    got = yield c.pipeline(["MULTI"], ["SET", "mid:k", "after"], ["INCR", "mid:n"])
    assert got == [b"+OK\r\n", b"+QUEUED\r\n", b"+QUEUED\r\n"]
    assert any(cl["multi"] != "-1" for cl in backing_clients(direct))
    yield c.close()
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    yield until(lambda: all(cl["multi"] == "-1" for cl in backing_clients(direct)))
    other = yield clients(proxy.resp_port)
    assert (yield other.pipeline(["GET", "mid:k"], ["GET", "mid:n"])) == [
        b"$6\r\nbefore\r\n", b"$-1\r\n"]


@inline
def test_redis_py_transaction_pipeline(proxy):
    client = proxy.redis_py()

    def transaction():
        client.set("rp:k", "1")
        with client.pipeline(transaction=True) as pipe:
            pipe.incr("rp:k").get("rp:k").set("rp:j", "x")
            first = pipe.execute()
        # the optimistic-locking recipe: WATCH, read, MULTI, write, EXEC
        def bump(pipe):
            value = int(pipe.get("rp:k"))
            pipe.multi()
            pipe.set("rp:k", value * 10)
        client.transaction(bump, "rp:k")
        return first, client.get("rp:k")

    try:
        first, final = yield in_thread(transaction)
    finally:
        client.close()
    assert first == [2, b"2", True]
    assert final == b"20"
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


# -- blocking commands ---------------------------------------------------------------------


@inline
def test_blpop_waits_outside_the_gate(proxy, clients, direct):
    """concurrency 1: a client blocked in BLPOP 0 does not stall the others."""
    assert proxy.proxy.config.concurrency == 1
    blocked = yield clients(proxy.resp_port)
    others = yield clients(proxy.resp_port)
    yield others.call("DEL", "bl:q")
    blocked.send(["BLPOP", "bl:q", "0"])
    yield until(lambda: any(cl["cmd"] == "blpop" for cl in backing_clients(direct)))
    for i in range(5):  # served while the BLPOP waits
        assert (yield others.pipeline(["SET", "bl:k", str(i)], ["GET", "bl:k"])) == [
            b"+OK\r\n", b"$1\r\n%d\r\n" % i]
    assert blocked.unread == 0
    assert (yield others.call("LPUSH", "bl:q", "job")) == b":1\r\n"
    assert (yield blocked.read()) == [b"*2\r\n$4\r\nbl:q\r\n$3\r\njob\r\n"]
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    # a BLPOP with its own timeout answers nil when it runs out
    assert (yield blocked.call("BLPOP", "bl:q", "0.05")) == b"*-1\r\n"
    # commands pipelined behind a blocking one wait for it, in order
    blocked.send(["BLPOP", "bl:q", "0"], ["GET", "bl:k"])
    yield until(lambda: any(cl["cmd"] == "blpop" for cl in backing_clients(direct)))
    assert (yield others.call("RPUSH", "bl:q", "a")) == b":1\r\n"
    assert (yield blocked.read(2)) == [b"*2\r\n$4\r\nbl:q\r\n$1\r\na\r\n", b"$1\r\n4\r\n"]


@inline
def test_a_client_leaving_while_blocked_frees_its_pinned_connection(proxy, clients, direct):
    blocked = yield clients(proxy.resp_port)
    blocked.send(["BRPOP", "lv:q", "0"])
    yield until(lambda: any(cl["cmd"] == "brpop" for cl in backing_clients(direct)))
    assert proxy.proxy.metrics.pinned_clients == 1
    yield blocked.close()
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    yield until(lambda: not any(cl["cmd"] == "brpop" for cl in backing_clients(direct)))
    other = yield clients(proxy.resp_port)
    assert (yield other.call("LPUSH", "lv:q", "x")) == b":1\r\n"  # nobody took it
    assert direct.llen("lv:q") == 1


# -- pub/sub -------------------------------------------------------------------------------


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@inline
def test_subscribe_psubscribe_unsubscribe(proxy, redis_server, clients, resp3):
    sub = yield clients(proxy.resp_port)
    ref = yield clients(redis_server.port)  # the same through Redis directly
    pub = yield clients(proxy.resp_port)
    if resp3:
        yield sub.call("HELLO", "3")
        yield ref.call("HELLO", "3")

    @defer.inlineCallbacks
    def both(requests, n):
        a = yield sub.pipeline(*requests) if n is None else _send_read(sub, requests, n)
        b = yield ref.pipeline(*requests) if n is None else _send_read(ref, requests, n)
        assert a == b, requests
        return a

    # one SUBSCRIBE of two channels then a PING: confirmations first, in order
    got = yield both([["SUBSCRIBE", "ps:a", "ps:b"], ["PSUBSCRIBE", "ps:p*"], ["PING"]], 4)
    assert got[0].startswith(b">3" if resp3 else b"*3")
    assert proxy.proxy.metrics.pinned_clients >= 1
    assert (yield pub.call("PUBLISH", "ps:a", "hello")) == b":2\r\n"  # sub and ref
    got = yield both([], 1)
    kind = b">" if resp3 else b"*"
    assert got == [kind + b"3\r\n$7\r\nmessage\r\n$4\r\nps:a\r\n$5\r\nhello\r\n"]
    yield pub.call("PUBLISH", "ps:pq", "pat")
    got = yield both([], 1)
    assert got[0].startswith(kind + b"4\r\n$8\r\npmessage")
    if resp3:  # RESP3: any command, in between messages
        got = yield both([["SET", "ps:k", "v"], ["GET", "ps:k"]], 2)
        assert got == [b"+OK\r\n", b"$1\r\nv\r\n"]
    got = yield both([["UNSUBSCRIBE"]], 2)
    assert decode(got[1])[2] == 1  # the pattern is left
    assert proxy.proxy.metrics.pinned_clients >= 1
    got = yield both([["PUNSUBSCRIBE"], ["PING"]], 2)
    assert got[1] in (b"+PONG\r\n",)
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    yield pub.call("PUBLISH", "ps:a", "nobody")
    assert (yield sub.call("PING")) == b"+PONG\r\n"  # no stray message before it


def _send_read(client, requests, n):
    client.send(*requests)
    return client.read(n)


@inline
def test_redis_py_pubsub(proxy):
    client = proxy.redis_py()

    def listen():
        pubsub = client.pubsub()
        pubsub.subscribe("rps:ch")
        pubsub.psubscribe("rps:*")
        confirmations = [pubsub.get_message(timeout=STARTUP_LIMIT) for _ in range(2)]
        publisher = proxy.redis_py()
        publisher.publish("rps:ch", "one")
        publisher.close()
        messages = []
        while len(messages) < 2:
            message = pubsub.get_message(timeout=STARTUP_LIMIT)
            assert message is not None
            messages.append((message["type"], message["data"]))
        pubsub.unsubscribe()
        pubsub.punsubscribe()
        pubsub.close()
        return confirmations, messages

    try:
        confirmations, messages = yield in_thread(listen)
    finally:
        client.close()
    assert [m["type"] for m in confirmations] == ["subscribe", "psubscribe"]
    assert sorted(messages) == [("message", b"one"), ("pmessage", b"one")]
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


# -- SELECT, CLIENT REPLY, RESET, MONITOR --------------------------------------------------


@inline
def test_select_another_db_pins_and_select_back_unpins(proxy, clients, direct):
    c = yield clients(proxy.resp_port)
    yield c.call("DEL", "sel:k")
    assert (yield c.call("SELECT", "1")) == b"+OK\r\n"
    assert proxy.proxy.metrics.pinned_clients == 1
    assert (yield c.pipeline(["SET", "sel:k", "one"], ["GET", "sel:k"])) == [
        b"+OK\r\n", b"$3\r\none\r\n"]
    assert direct.get("sel:k") is None
    db1 = redis.Redis(port=direct.connection_pool.connection_kwargs["port"], db=1)
    try:
        assert db1.get("sel:k") == b"one"
        db1.delete("sel:k")
    finally:
        db1.close()
    assert proxy.proxy.cache.get(b"sel:k") is None  # db 1's values never enter the cache
    assert (yield c.call("SELECT", "0")) == b"+OK\r\n"
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    assert (yield c.call("GET", "sel:k")) == b"$-1\r\n"
    assert (yield c.call("SELECT", "nope")) == b"-ERR value is not an integer or out of range\r\n"


@inline
def test_client_reply_off_on_skip(proxy, clients, direct):
    c = yield clients(proxy.resp_port)
    c.send(["CLIENT", "REPLY", "OFF"], ["SET", "cr:k", "1"], ["INCR", "cr:k"])
    assert (yield c.call("CLIENT", "REPLY", "ON")) == b"+OK\r\n"  # the first reply since
    assert direct.get("cr:k") == b"2"
    c.send(["CLIENT", "REPLY", "SKIP"], ["INCR", "cr:k"])
    assert (yield c.call("GET", "cr:k")) == b"$1\r\n3\r\n"
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    # under OFF, RESET answers and turns replies back on
    c.send(["CLIENT", "REPLY", "OFF"], ["SET", "cr:k", "x"])
    assert (yield c.call("RESET")) == b"+RESET\r\n"
    assert (yield c.call("GET", "cr:k")) == b"$1\r\nx\r\n"
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


@inline
def test_reset_drops_the_state_and_the_pin(proxy, clients, direct):
    c = yield clients(proxy.resp_port)
    yield c.call("HELLO", "3")
    got = yield c.pipeline(["MULTI"], ["SET", "rs:k", "queued"], ["RESET"], ["GET", "rs:k"],
                           ["HGETALL", "rs:none"])
    # RESET answers in order and back in RESP2 (HGETALL: an array, not a map)
    assert got == [b"+OK\r\n", b"+QUEUED\r\n", b"+RESET\r\n", b"$-1\r\n", b"*0\r\n"]
    assert direct.get("rs:k") is None
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)
    yield c.call("SUBSCRIBE", "rs:ch")
    assert (yield c.call("RESET")) == b"+RESET\r\n"
    assert (yield c.call("SET", "rs:k", "1")) == b"+OK\r\n"  # out of pub/sub mode
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


@inline
def test_monitor_sees_commands(proxy, clients):
    m = yield clients(proxy.resp_port)
    assert (yield m.call("MONITOR")) == b"+OK\r\n"
    other = yield clients(proxy.resp_port)
    yield other.call("SET", "mon:k", "seen")
    for _ in range(50):  # redisp's own commands may come first
        [line] = yield m.read()
        if b'"mon:k"' in line:
            break
    assert line.startswith(b"+") and b'"SET" "mon:k" "seen"' in line
    yield m.close()
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


# -- a pinned connection lost with its state -----------------------------------------------


@inline
def test_a_subscriber_whose_pinned_connection_dies_is_hung_up_on(proxy, clients, direct):
    """It must not wait for messages that will never come: as if Redis had
    closed its connection, so its library reconnects and subscribes again."""
    sub = yield clients(proxy.resp_port)
    yield sub.call("SUBSCRIBE", "hu:ch")
    assert direct.client_kill_filter(_type="pubsub") >= 1
    yield sub.hung_up()
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


@inline
def test_a_multi_whose_pinned_connection_dies_is_hung_up_on(proxy, clients, direct):
    c = yield clients(proxy.resp_port)
    assert (yield c.pipeline(["MULTI"], ["SET", "hu:a", "1"])) == [b"+OK\r\n", b"+QUEUED\r\n"]
    [pinned] = [cl for cl in backing_clients(direct) if cl["multi"] != "-1"]
    direct.client_kill_filter(_id=pinned["id"])
    yield c.hung_up()
    assert direct.get("hu:a") is None
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@inline
def test_client_tracking_on_a_pinned_connection(proxy, clients, resp3):
    """CLIENT TRACKING pins: the client's GETs go to its own connection
    (Redis must see them to track them) and invalidations come back to it."""
    c = yield clients(proxy.resp_port)
    writer = yield clients(proxy.resp_port)
    yield writer.call("SET", "tr:k", "1")
    if resp3:
        yield c.call("HELLO", "3")
        assert (yield c.call("CLIENT", "TRACKING", "ON")) == b"+OK\r\n"
    else:  # RESP2: invalidations go to another connection, subscribed to them
        inv = yield clients(proxy.resp_port)
        yield inv.call("SUBSCRIBE", "__redis__:invalidate")
        [info] = [cl for cl in backing_clients_of(proxy) if cl["cmd"] == "subscribe"]
        assert (yield c.call("CLIENT", "TRACKING", "ON", "REDIRECT", info["id"])) == b"+OK\r\n"
    assert (yield c.call("GET", "tr:k")) == b"$1\r\n1\r\n"
    yield writer.call("SET", "tr:k", "2")
    if resp3:
        [push] = yield c.read()
        assert push == b">2\r\n$10\r\ninvalidate\r\n*1\r\n$4\r\ntr:k\r\n"
    else:
        [message] = yield inv.read()
        assert message == (b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n"
                           b"*1\r\n$4\r\ntr:k\r\n")
    assert (yield c.call("GET", "tr:k")) == b"$1\r\n2\r\n"
    assert proxy.proxy.metrics.pinned_clients >= 1
    assert (yield c.call("RESET")) == b"+RESET\r\n"
    if not resp3:
        yield inv.call("UNSUBSCRIBE")
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


def backing_clients_of(proxy) -> list[dict]:
    client = redis.Redis(port=proxy.proxy.config.redis.port)
    try:
        return client.client_list()
    finally:
        client.close()


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@inline
def test_unsubscribe_when_not_subscribed(proxy, redis_server, resp3):
    """RESP3 answers it with a push frame: on a shared pool connection that
    frame would be taken for a push and every later reply shifted by one."""
    requests = [["UNSUBSCRIBE"], ["PUNSUBSCRIBE", "x"], ["SUNSUBSCRIBE"], ["GET", "un:k"],
                ["PING"]]
    expected = yield run_on(redis_server.port, requests, resp3)
    got = yield run_on(proxy.resp_port, requests, resp3)
    assert got == expected
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)


@inline
def test_resp3_messages_arrive_while_a_command_is_owed(proxy, redis_server, clients, direct):
    """RESP3 allows any command while subscribed: a message published while
    the client's BLPOP waits reaches it at once, before the BLPOP's reply,
    as Redis sends them."""
    c = yield clients(proxy.resp_port)
    pub = yield clients(proxy.resp_port)
    yield c.call("HELLO", "3")
    yield c.call("SUBSCRIBE", "m3:ch")
    yield pub.call("DEL", "m3:q")
    c.send(["BLPOP", "m3:q", "0"])
    yield until(lambda: any(cl["cmd"] == "blpop" for cl in backing_clients(direct)))
    yield pub.call("PUBLISH", "m3:ch", "first")
    [message] = yield c.read()
    assert message == b">3\r\n$7\r\nmessage\r\n$5\r\nm3:ch\r\n$5\r\nfirst\r\n"
    yield pub.call("LPUSH", "m3:q", "x")
    assert (yield c.read()) == [b"*2\r\n$4\r\nm3:q\r\n$1\r\nx\r\n"]
    assert (yield c.call("RESET")) == b"+RESET\r\n"
    yield until(lambda: proxy.proxy.metrics.pinned_clients == 0)

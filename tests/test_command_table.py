"""The command table learnt from the backing's COMMAND reply.

Unit tests run on a recorded redis-server 7.0 reply (tests/data, recorded
with ``python -m tests.raw_redis``); the key positions and write keys are
then checked against what a real redis-server says for the same argv
(``COMMAND GETKEYSANDFLAGS``), for a corpus of real commands.
"""

from __future__ import annotations

import shlex

import pytest

from redisp.protocol.frames import ErrorReply, decode
from redisp.routing.command_table import (
    FLUSH,
    CommandInfo,
    CommandTable,
    getkeys_request,
    keys_from_getkeys,
)
from tests.raw_redis import COMMAND_REPLY_FILE, replies


@pytest.fixture(scope="module")
def table() -> CommandTable:
    return CommandTable.from_command_reply(decode(COMMAND_REPLY_FILE.read_bytes()))


def argv_of(line: str) -> list[bytes]:
    return [a.encode() for a in shlex.split(line)]


# -- reading the reply -------------------------------------------------------------


def test_every_command_and_subcommand_is_read(table):
    assert len(table) > 200
    assert b"get" in table and b"GET" in table
    client = table.commands[b"client"]
    assert b"kill" in client.subcommands
    assert client.subcommands[b"kill"].name == b"client|kill"


def test_the_same_table_from_a_live_resp2_and_resp3_reply(redis_server, table):
    """RESP3 gives maps and sets where RESP2 gives flat arrays: same table."""
    [resp2] = replies(redis_server.port, [["COMMAND"]])
    [resp3] = replies(redis_server.port, [["COMMAND"]], resp3=True)
    assert resp3 != resp2
    live2 = CommandTable.from_command_reply(decode(resp2))
    live3 = CommandTable.from_command_reply(decode(resp3))
    assert live2.commands == live3.commands
    [info] = replies(redis_server.port, [["INFO", "server"]])
    if b"redis_version:7.0." in info:
        assert live2.commands == table.commands  # the recording is what 7.0 says


def test_command_info_reply_with_an_unknown_name():
    """COMMAND INFO answers nil for names it does not know: skipped."""
    reply = decode(b"*2\r\n*-1\r\n*7\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n"
                   b":1\r\n:1\r\n:1\r\n*0\r\n")
    table = CommandTable.from_command_reply(reply)
    assert list(table.commands) == [b"get"]


@pytest.mark.parametrize("reply", [b"+OK\r\n", b"*1\r\n:1\r\n", b"*1\r\n*2\r\n:1\r\n:2\r\n",
                                   b"-ERR unknown command\r\n"])
def test_a_reply_that_is_not_a_command_table_is_refused(reply):
    with pytest.raises(ValueError):
        CommandTable.from_command_reply(decode(reply))


def test_legacy_redis_6_entries_use_first_last_step():
    """Redis 6 has no key specs: the legacy range, and None for movable keys."""
    reply = decode(
        b"*3\r\n"
        b"*7\r\n$4\r\nmset\r\n:-3\r\n*2\r\n+write\r\n+denyoom\r\n:1\r\n:-1\r\n:2\r\n*0\r\n"
        b"*7\r\n$4\r\neval\r\n:-3\r\n*2\r\n+noscript\r\n+movablekeys\r\n:0\r\n:0\r\n:0\r\n"
        b"*1\r\n+@scripting\r\n"
        b"*7\r\n$3\r\nget\r\n:2\r\n*1\r\n+readonly\r\n:1\r\n:1\r\n:1\r\n*0\r\n")
    table = CommandTable.from_command_reply(reply)
    mset = argv_of("MSET a 1 b 2")
    assert table.lookup(mset).keys(mset) == [1, 3]
    assert table.lookup(mset).write_keys(mset) == [1, 3]
    get = argv_of("GET a")
    assert table.lookup(get).keys(get) == [1]
    assert table.lookup(get).write_keys(get) == []
    evalsha = argv_of("EVAL s 1 k")
    assert table.lookup(evalsha).keys(evalsha) is None


# -- lookup, arity, flags --------------------------------------------------------------


def test_lookup_is_case_insensitive_and_resolves_subcommands(table):
    assert table.lookup(argv_of("gEt k")).name == b"get"
    assert table.lookup(argv_of("client KILL x")).name == b"client|kill"
    assert table.lookup(argv_of("OBJECT encoding k")).name == b"object|encoding"
    assert table.lookup(argv_of("client nosuch")).name == b"client"  # Redis answers the error
    assert table.lookup(argv_of("client")).name == b"client"
    assert table.lookup(argv_of("nosuchcommand a")) is None
    assert table.lookup([]) is None


def test_arity(table):
    get = table.lookup(argv_of("get k"))
    assert get.arity_ok(argv_of("get k"))
    assert not get.arity_ok(argv_of("get"))
    assert not get.arity_ok(argv_of("get a b"))
    mset = table.lookup(argv_of("mset a 1"))
    assert mset.arity_ok(argv_of("mset a 1")) and mset.arity_ok(argv_of("mset a 1 b 2"))
    assert not mset.arity_ok(argv_of("mset a"))
    kill = table.lookup(argv_of("client kill x"))
    assert kill.arity_ok(argv_of("client kill x")) and not kill.arity_ok(argv_of("client kill"))


def names(table: CommandTable, attribute: str) -> set[bytes]:
    found = set()
    for info in table.commands.values():
        for each in (info, *info.subcommands.values()):
            if getattr(each, attribute):
                found.add(each.name)
    return found


def test_flags(table):
    """What dispatch asks of a command comes from the backing's flags."""
    assert {b"blpop", b"brpop", b"blmove", b"bzpopmin", b"xread", b"wait"} <= names(
        table, "blocking")
    assert b"get" not in names(table, "blocking")
    assert {b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"publish"} <= names(
        table, "pubsub")
    assert {b"get", b"mget", b"exists", b"ttl", b"scan", b"hget"} <= names(table, "readonly")
    assert {b"set", b"del", b"expire"} <= names(table, "write")
    assert not names(table, "readonly") & names(table, "write")


def test_keyspace_wide_and_scripts_from_flags_and_categories(table):
    """FLUSHDB & co. change keys they do not name; function management does not."""
    assert names(table, "keyspace_wide") == {b"flushdb", b"flushall", b"swapdb"}
    assert names(table, "script") == {b"eval", b"evalsha", b"fcall"}


@pytest.mark.parametrize("line,expected", [
    ("FLUSHDB", FLUSH),
    ("FLUSHALL ASYNC", FLUSH),
    ("SWAPDB 0 1", FLUSH),
    ("EVAL s 0", FLUSH),  # a script that names no key may touch any
    ("EVALSHA abc 0 x", FLUSH),
    ("FCALL f 0", FLUSH),
    ("EVAL s 2 a b x", [3, 4]),  # one that names its keys touches those
    ("EVAL_RO s 0", []),
    ("FCALL_RO f 1 a", []),
    ("FUNCTION LOAD code", []),
    ("SCRIPT FLUSH", []),
    ("SET k v", [1]),
    ("GET k", []),
    ("PFCOUNT h1 h2", [1, 2]),  # rewrites the cached cardinality: the key spec says RW
    ("ZUNIONSTORE d 2 a b", [1]),
    ("SORT k STORE d", None),  # only Redis can find STORE: ask it
    ("PUBLISH ch msg", []),
    ("EVAL s notanumber", None),
])
def test_invalidation(table, line, expected):
    argv = argv_of(line)
    assert table.lookup(argv).invalidation(argv) == expected


def test_keys_from_getkeys(table):
    """The backing's answer for movable keys, in both forms."""
    sort = table.lookup(argv_of("SORT k STORE d"))
    with_flags = [[b"k", [b"RO", b"access"]], [b"d", [b"OW", b"update"]]]
    assert keys_from_getkeys(sort, with_flags) == [b"d"]
    assert keys_from_getkeys(sort, [b"k", b"d"]) == [b"k", b"d"]  # GETKEYS: no flags
    assert keys_from_getkeys(sort, ErrorReply(b"ERR Invalid arguments")) == []
    get = table.lookup(argv_of("GET k"))
    assert keys_from_getkeys(get, [b"k"]) == []
    script = table.lookup(argv_of("EVAL s 0"))
    assert keys_from_getkeys(script, []) is FLUSH
    assert getkeys_request(argv_of("SORT k STORE d")) == argv_of(
        "COMMAND GETKEYSANDFLAGS SORT k STORE d")


# -- against a real redis-server -----------------------------------------------------

CORPUS = """
GET k
SET k v
SET k v GET
SET k v EX 10 NX
SETNX k v
SETEX k 10 v
PSETEX k 100 v
GETSET k v
GETDEL k
GETEX k PERSIST
GETRANGE k 0 1
SETRANGE k 0 v
APPEND k v
STRLEN k
INCR k
INCRBY k 2
INCRBYFLOAT k 1.5
DECR k
DECRBY k 2
MGET a b c
MSET a 1 b 2 c 3
MSETNX a 1 b 2
DEL a b c
UNLINK a b
EXISTS a b
TYPE k
TOUCH a b
EXPIRE k 10
PEXPIRE k 100 NX
EXPIREAT k 1
PERSIST k
TTL k
PTTL k
EXPIRETIME k
RENAME a b
RENAMENX a b
COPY a b REPLACE
MOVE k 1
DUMP k
RESTORE k 0 payload REPLACE
OBJECT ENCODING k
OBJECT FREQ k
OBJECT IDLETIME k
MEMORY USAGE k SAMPLES 5
LCS a b
HSET h f v f2 v2
HGET h f
HMGET h f g
HGETALL h
HDEL h f
HINCRBY h f 1
HEXISTS h f
HSCAN h 0
LPUSH l a b
RPUSH l a
LPOP l
RPOP l 2
LRANGE l 0 -1
LINDEX l 0
LSET l 0 v
LREM l 0 v
LTRIM l 0 1
LLEN l
LMOVE a b LEFT RIGHT
RPOPLPUSH a b
BLPOP a b 0
BRPOP a 1.5
BLMOVE a b LEFT LEFT 0
LMPOP 2 a b LEFT COUNT 2
BLMPOP 0 2 a b RIGHT
SADD s a b
SREM s a
SMEMBERS s
SISMEMBER s a
SINTER a b c
SINTERSTORE d a b
SUNIONSTORE d a b
SDIFFSTORE d a b
SMOVE a b m
SINTERCARD 2 a b LIMIT 1
ZADD z 1 a
ZINCRBY z 1 a
ZSCORE z a
ZRANGE z 0 -1 WITHSCORES
ZRANGESTORE d z 0 -1
ZUNIONSTORE d 2 a b WEIGHTS 1 2
ZINTERSTORE d 3 a b c AGGREGATE MAX
ZDIFFSTORE d 2 a b
ZUNION 2 a b
ZINTER 2 a b
ZDIFF 2 a b
ZINTERCARD 2 a b
ZMPOP 2 a b MIN
BZMPOP 1 2 a b MAX
BZPOPMIN a b 0
ZREM z a
PFADD h a b
PFCOUNT h1 h2
PFMERGE d h1 h2
SETBIT b 7 1
GETBIT b 7
BITCOUNT b
BITOP AND d a b c
BITOP NOT d a
BITFIELD b SET u8 0 1
BITFIELD b GET u8 0
BITFIELD_RO b GET u8 0
BITPOS b 1
GEOADD g 1 2 m
GEODIST g a b
GEORADIUS g 1 2 10 km
GEORADIUS g 1 2 10 km STORE d
GEORADIUS g 1 2 10 km STOREDIST d
GEORADIUSBYMEMBER g m 10 km STORE d
GEOSEARCH g FROMMEMBER m BYRADIUS 10 km
GEOSEARCHSTORE d g FROMMEMBER m BYRADIUS 10 km
XADD s * f v
XLEN s
XRANGE s - +
XREAD COUNT 2 STREAMS s1 s2 0 0
XREAD BLOCK 0 STREAMS s 0
XREADGROUP GROUP g c COUNT 1 STREAMS s1 s2 > >
XGROUP CREATE s g $ MKSTREAM
XGROUP DESTROY s g
XGROUP CREATECONSUMER s g c
XACK s g 1-0
XDEL s 1-0
XTRIM s MAXLEN 10
XINFO STREAM s
XINFO GROUPS s
XCLAIM s g c 0 1-0
XAUTOCLAIM s g c 0 0
XPENDING s g
EVAL script 2 a b arg
EVAL script 0
EVALSHA sha 1 a
EVAL_RO script 1 a
FCALL f 2 a b
FCALL_RO f 1 a
SORT k
SORT k BY w_* GET o_* STORE d
SORT k LIMIT 0 1 store d
SORT_RO k BY w_*
MIGRATE host 6379 k 0 1000
MIGRATE host 6379 "" 0 1000 COPY REPLACE KEYS a b c
MIGRATE host 6379 "" 0 1000 AUTH pw KEYS a b
WATCH a b
SPUBLISH ch msg
PUBLISH ch msg
PING
FLUSHDB
SWAPDB 0 1
DBSIZE
SCAN 0 MATCH * COUNT 10
KEYS *
RANDOMKEY
CLIENT KILL ID 1
CLIENT LIST
INFO keyspace
"""


#: where write_keys() drops more than Redis's own key finder calls written
CONSERVATIVE = {
    # one RW key spec for both forms: a read-only BITFIELD drops its key too
    b"bitfield": "variable_flags",
    # a write command whose key spec says RO (it changes the consumer group,
    # not what a read returns): every key of a write command is dropped
    b"xreadgroup": "write flag, RO key spec",
}


def getkeysandflags(port: int, argvs: list[list[bytes]]) -> list:
    frames = replies(port, [getkeys_request(argv) for argv in argvs])
    return [decode(frame) for frame in frames]


def test_keys_and_write_keys_match_redis(redis_server):
    """For each argv of the corpus, keys() and write_keys() name the keys
    redis-server's own COMMAND GETKEYSANDFLAGS names; where the key specs
    cannot tell (None), the backing's answer read by keys_from_getkeys does.
    The table is that redis-server's, as redisp would read it."""
    [reply] = replies(redis_server.port, [["COMMAND"]])
    table = CommandTable.from_command_reply(decode(reply))
    argvs = [argv_of(line) for line in CORPUS.strip().splitlines()]
    assert len(argvs) >= 100
    answers = getkeysandflags(redis_server.port, argvs)
    asked = 0
    for argv, answer in zip(argvs, answers):
        info = table.lookup(argv)
        assert info is not None and info.arity_ok(argv), argv
        keys = info.keys(argv)
        if isinstance(answer, ErrorReply):
            # "The command has no key arguments", or Redis's own specs give
            # up where we say "no keys" (a keynum of 0: EVAL script 0)
            assert keys == [] and info.write_keys(argv) == [], (argv, answer)
            continue
        theirs = [key for key, _flags in answer]
        theirs_written = sorted(key for key, flags in answer
                                if {b"RW", b"OW", b"RM", b"insert", b"update", b"delete"}
                                & set(flags))
        if keys is None:
            asked += 1
            assert sorted(keys_from_getkeys(info, answer)) == theirs_written, argv
            written = info.write_keys(argv)
            if written is not None:  # no need to ask when no key spec writes: SORT_RO
                assert written == [] and theirs_written == [], argv
            continue
        assert sorted(argv[i] for i in keys) == sorted(theirs), argv
        ours_written = sorted(argv[i] for i in info.write_keys(argv))
        if argv[0].lower() in CONSERVATIVE:
            assert set(theirs_written) <= set(ours_written), argv
        else:
            assert ours_written == theirs_written, argv
    assert asked == 6  # every SORT and SORT_RO, and MIGRATE's KEYS forms


def test_generated_argvs_never_crash(table):
    """keys() and invalidation() take any argv of a known command without error."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    commands = sorted(table.commands.values(), key=lambda i: i.name)
    every = [c for info in commands for c in (info, *info.subcommands.values())]
    words = st.sampled_from([b"0", b"1", b"2", b"-1", b"x", b"STORE", b"KEYS", b"STREAMS",
                             b"BY", b"GET", b"99999999999999999999"])

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(every), st.lists(words, max_size=8))
    def check(info: CommandInfo, rest: list[bytes]):
        argv = info.name.split(b"|") + rest
        if info.subcommands and rest and rest[0].lower() in info.subcommands:
            info = info.subcommands[rest[0].lower()]  # SLOWLOG GET is slowlog|get
        assert table.lookup(argv) is info
        for found in (info.keys(argv), info.write_keys(argv)):
            assert found is None or all(0 < i < len(argv) for i in found)
        info.invalidation(argv)

    check()

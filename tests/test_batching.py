"""GetBatcher: the GETs of one reactor turn leave as one MGET, with GET's answers."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from redisp.backing.batching import MAX_BATCH, GetBatcher
from redisp.backing.connection import BackingReplyError, BackingTimeout


class RecordingCall:
    """Backing.call stand-in: records each command; the test answers it."""

    def __init__(self):
        self.commands: list[tuple[bytes, ...]] = []
        self.replies: list[Deferred] = []

    def __call__(self, *args):
        self.commands.append(args)
        self.replies.append(Deferred())
        return self.replies[-1]


def make():
    clock = Clock()
    call = RecordingCall()
    return GetBatcher(call, clock), call, clock


def test_nothing_leaves_before_the_end_of_the_turn():
    batcher, call, clock = make()
    batcher.fetch(b"a", lambda _: None)
    assert call.commands == []
    clock.advance(0)
    assert call.commands == [(b"GET", b"a")]


def test_a_lone_key_is_a_plain_get_with_its_answer():
    batcher, call, clock = make()
    got = []
    batcher.fetch(b"a", got.append)
    clock.advance(0)
    call.replies[0].callback(None)
    assert got == [None]


def test_the_fetches_of_one_turn_share_one_mget_in_order():
    batcher, call, clock = make()
    got = {}
    for key in (b"a", b"b", b"a"):
        batcher.fetch(key, lambda value, key=key: got.setdefault(key, []).append(value))
    clock.advance(0)
    assert call.commands == [(b"MGET", b"a", b"b", b"a")]
    call.replies[0].callback([b"1", b"2", b"1"])
    assert got == {b"a": [b"1", b"1"], b"b": [b"2"]}
    batcher.fetch(b"c", lambda _: None)
    clock.advance(0)
    assert call.commands[-1] == (b"GET", b"c"), "the next turn starts a new batch"


def test_a_nil_is_asked_again_with_get_which_tells_absent_from_wrongtype():
    batcher, call, clock = make()
    got = {}
    for key in (b"str", b"absent", b"list"):
        batcher.fetch(key, lambda value, key=key: got.__setitem__(key, value))
    clock.advance(0)
    call.replies[0].callback([b"v", None, None])
    assert got == {b"str": b"v"}
    assert call.commands[1:] == [(b"GET", b"absent"), (b"GET", b"list")]
    call.replies[1].callback(None)
    wrongtype = BackingReplyError("WRONGTYPE Operation against a key holding the wrong kind")
    call.replies[2].errback(wrongtype)
    assert got[b"absent"] is None
    assert isinstance(got[b"list"], Failure) and got[b"list"].value is wrongtype


def test_a_failed_mget_fails_every_fetch_of_the_batch():
    batcher, call, clock = make()
    got = []
    for key in (b"a", b"b"):
        batcher.fetch(key, got.append)
    clock.advance(0)
    call.replies[0].errback(BackingTimeout("backing redis timed out after 2s"))
    assert len(got) == 2 and all(f.check(BackingTimeout) for f in got)
    assert len(call.commands) == 1


def test_a_large_turn_is_split_into_batches_of_max_batch_keys():
    batcher, call, clock = make()
    got = []
    keys = [b"k%d" % i for i in range(MAX_BATCH * 2 + 1)]
    for key in keys:
        batcher.fetch(key, got.append)
    clock.advance(0)
    assert [len(c) - 1 for c in call.commands] == [MAX_BATCH, MAX_BATCH, 1]
    assert [c[0] for c in call.commands] == [b"MGET", b"MGET", b"GET"]
    call.replies[0].callback(keys[:MAX_BATCH])
    call.replies[1].callback(keys[MAX_BATCH:-1])
    call.replies[2].callback(keys[-1])
    assert got == keys

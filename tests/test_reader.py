"""CachedReader: the one place where gate, cache and coalesced fetches meet."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from redisp.backing.connection import BackingUnavailable
from redisp.core.cache import Cache
from redisp.core.gate import Gate
from redisp.core.reader import CachedReader
from redisp.metrics import Metrics


class FakeBacking:
    """Records every call; each reply is released by the test."""

    def __init__(self):
        self.calls: list[tuple[bytes, ...]] = []
        self.pending: list[Deferred] = []

    def fetch(self, key, done):
        self.calls.append((b"GET", key))
        self.pending.append(Deferred().addBoth(done))

    def mget(self, keys):
        self.calls.append((b"MGET", *keys))
        self.pending.append(Deferred())
        return self.pending[-1]


def make(concurrency=1, capacity=100, ttl=10.0):
    clock = Clock()
    metrics = Metrics(started=0)
    cache = Cache(capacity, ttl, clock, metrics)
    backing = FakeBacking()
    reader = CachedReader(cache, Gate(concurrency, clock), backing, metrics)
    return reader, backing, cache, clock, metrics


def result_of(value):
    """The result of a Lookup or an already-fired Deferred."""
    if not isinstance(value, Deferred):
        return value
    out = []
    value.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_miss_fetches_stores_and_then_hits_synchronously():
    reader, backing, cache, clock, metrics = make()
    d = reader.get(b"k")
    assert isinstance(d, Deferred)
    backing.pending[0].callback(b"v")
    assert result_of(d) == (b"v", False)
    clock.advance(0)
    assert reader.get(b"k") == (b"v", True)
    assert (metrics.cache_hits, metrics.cache_misses) == (1, 1)
    assert backing.calls == [(b"GET", b"k")]


def test_absent_key_is_not_cached():
    reader, backing, _, clock, _ = make()
    d = reader.get(b"k")
    backing.pending[0].callback(None)
    assert result_of(d) == (None, False)
    clock.advance(0)
    reader.get(b"k")
    assert len(backing.calls) == 2


def test_hit_arriving_while_a_miss_is_in_flight_waits_its_turn():
    """Single client: the fast path must not let a hit overtake a running miss."""
    reader, backing, cache, clock, _ = make(concurrency=1)
    cache.put(b"cached", b"c")
    order = []
    reader.get(b"slow").addCallback(lambda r: order.append(("slow", r)))
    hit = reader.get(b"cached")
    assert isinstance(hit, Deferred)
    hit.addCallback(lambda r: order.append(("cached", r)))
    clock.advance(0)
    assert order == []
    backing.pending[0].callback(b"s")
    clock.advance(0)
    assert order == [("slow", (b"s", False)), ("cached", (b"c", True))]


def test_concurrent_misses_of_one_key_share_one_fetch():
    reader, backing, _, clock, metrics = make(concurrency=8)
    ds = [reader.get(b"k") for _ in range(5)]
    assert backing.calls == [(b"GET", b"k")]
    backing.pending[0].callback(b"v")
    assert [result_of(d) for d in ds] == [(b"v", False)] * 5
    assert metrics.cache_misses == 5


def test_a_failed_fetch_fails_every_waiter_and_caches_nothing():
    reader, backing, cache, clock, _ = make(concurrency=4)
    ds = [reader.get(b"k") for _ in range(3)]
    backing.pending[0].errback(BackingUnavailable("backing redis unavailable (down)"))
    for d in ds:
        failure = result_of(d)
        assert isinstance(failure, Failure) and failure.check(BackingUnavailable)
    assert len(cache) == 0
    clock.advance(0)
    reader.get(b"k")
    assert len(backing.calls) == 2, "the failed fetch must not stay in flight"


def test_get_many_serves_hits_and_fetches_misses_with_one_mget():
    reader, backing, cache, clock, metrics = make()
    cache.put(b"a", b"1")
    d = reader.get_many([b"a", b"b", b"c", b"b"])
    assert backing.calls == [(b"MGET", b"b", b"c")]
    backing.pending[0].callback([b"2", None])
    assert result_of(d) == [b"1", b"2", None, b"2"]
    clock.advance(0)
    assert reader.get_many([b"a", b"b"]) == [b"1", b"2"]
    assert metrics.cache_misses == 3


def test_capacity_zero_is_pass_through():
    reader, backing, _, clock, _ = make(capacity=0)
    for i in range(3):
        d = reader.get(b"k")
        backing.pending[i].callback(b"v")
        assert result_of(d) == (b"v", False)
        clock.advance(0)
    assert len(backing.calls) == 3


def test_invalidation_during_a_fetch_keeps_the_fetched_value_out_of_the_cache():
    """Read, invalidate, then store: the store must not happen."""
    reader, backing, cache, clock, _ = make(concurrency=4)
    first = reader.get(b"k")
    reader.invalidate(b"k")  # the write landed while the GET was in flight
    later = reader.get(b"k")  # must not join the fetch that predates the write
    assert backing.calls == [(b"GET", b"k"), (b"GET", b"k")]
    backing.pending[0].callback(b"old")
    assert result_of(first) == (b"old", False)
    assert len(cache) == 0
    backing.pending[1].callback(b"new")
    assert result_of(later) == (b"new", False)
    clock.advance(0)
    assert reader.get(b"k") == (b"new", True)


def test_invalidate_all_poisons_every_fetch_and_clears_the_cache():
    reader, backing, cache, clock, _ = make(concurrency=4)
    cache.put(b"x", b"1")
    d = reader.get(b"k")
    assert reader.invalidate_all() == 1
    backing.pending[0].callback(b"old")
    assert result_of(d) == (b"old", False)
    assert len(cache) == 0


def test_an_invalidation_during_an_mget_stores_none_of_it():
    reader, backing, cache, _, _ = make()
    d = reader.get_many([b"a", b"b"])
    reader.invalidate(b"zzz")
    backing.pending[0].callback([b"1", b"2"])
    assert result_of(d) == [b"1", b"2"]
    assert len(cache) == 0


def test_nothing_is_stored_while_caching_is_off():
    reader, backing, cache, clock, _ = make()
    reader.caching = False
    d = reader.get(b"k")
    backing.pending[0].callback(b"v")
    assert result_of(d) == (b"v", False)
    d = reader.get_many([b"a"])
    clock.advance(0)
    backing.pending[1].callback([b"1"])
    assert len(cache) == 0


def test_invalidate_drops_a_cached_key():
    reader, _, cache, _, metrics = make()
    cache.put(b"k", b"v")
    reader.invalidate(b"k")
    assert len(cache) == 0 and metrics.cache_invalidations == 1


class FailingBacking(FakeBacking):
    """Fails at once, the way Backing does while Redis is known to be down."""

    def fetch(self, key, done):
        self.calls.append((b"GET", key))
        done(Failure(BackingUnavailable("backing redis unavailable (refused)")))


class RaisingBacking(FailingBacking):
    def mget(self, keys):
        raise BackingUnavailable("backing redis unavailable (not connected)")


def test_a_fetch_that_fails_at_once_answers_and_frees_the_gate():
    """A synchronous failure must reach the caller, or the gate stays held forever."""
    for backing_class in (FailingBacking, RaisingBacking):
        clock = Clock()
        metrics = Metrics(started=0)
        gate = Gate(1, clock)
        reader = CachedReader(Cache(10, 10, clock, metrics), gate, backing_class(), metrics)
        for _ in range(3):
            failure = result_of(reader.get(b"k"))
            assert isinstance(failure, Failure) and failure.check(BackingUnavailable)
            clock.advance(0)
        failure = result_of(reader.get_many([b"a"])) if backing_class is RaisingBacking else None
        if failure is not None:
            assert failure.check(BackingUnavailable)
            clock.advance(0)
        assert gate.idle() and reader._inflight == {}


def test_cached_answers_a_batch_of_hits_only_while_the_gate_is_idle():
    reader, backing, cache, clock, metrics = make()
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    assert reader.cached([b"a", b"b", b"a"]) == [b"1", b"2", b"1"]
    assert metrics.cache_hits == 3
    assert reader.cached([b"a", b"missing"]) is None
    assert metrics.cache_hits == 3
    reader.get(b"slow")  # a miss holds the gate: hits must wait their turn
    assert reader.cached([b"a"]) is None
    backing.pending[0].callback(b"v")
    clock.advance(0)
    assert reader.cached([b"a", b"slow"]) == [b"1", b"v"]


def packet_answers():
    answers = []
    return answers, lambda results, hits: answers.append((list(results), hits))


def test_read_packet_answers_hits_and_fetched_values_in_key_order_once():
    reader, backing, cache, clock, metrics = make(concurrency=8)
    cache.put(b"hot", b"H")
    answers, done = packet_answers()
    reader.read_packet([b"a", b"hot", b"b"], done)
    assert backing.calls == [(b"GET", b"a"), (b"GET", b"b")]
    backing.pending[1].callback(None)
    assert answers == []
    backing.pending[0].callback(b"A")
    assert answers == [([b"A", b"H", None], 1)]
    assert (metrics.cache_hits, metrics.cache_misses) == (1, 2)
    clock.advance(0)
    assert reader._gate.idle() and reader._gate._free == 8
    assert cache.get(b"a") == b"A"


def test_read_packet_joins_fetches_in_flight_and_keeps_failures_per_key():
    reader, backing, cache, clock, _ = make(concurrency=8)
    single = reader.get(b"a")
    answers, done = packet_answers()
    reader.read_packet([b"a", b"bad"], done)
    assert backing.calls == [(b"GET", b"a"), (b"GET", b"bad")], "a joins the GET in flight"
    backing.pending[1].errback(BackingUnavailable("backing redis unavailable (refused)"))
    backing.pending[0].callback(b"A")
    assert result_of(single) == (b"A", False)
    ((results, hits),) = answers
    assert results[0] == b"A" and hits == 0
    assert isinstance(results[1], Failure) and results[1].check(BackingUnavailable)
    clock.advance(0)
    assert reader._gate.idle()


def test_read_packet_all_hits_or_failing_at_once_answers_exactly_once():
    for backing_class in (FakeBacking, FailingBacking):
        clock = Clock()
        metrics = Metrics(started=0)
        cache = Cache(10, 10, clock, metrics)
        cache.put(b"hot", b"H")
        reader = CachedReader(cache, Gate(4, clock), backing_class(), metrics)
        answers, done = packet_answers()
        keys = [b"hot", b"hot"] if backing_class is FakeBacking else [b"x", b"hot", b"y"]
        reader.read_packet(keys, done)
        assert len(answers) == 1
        clock.advance(0)
        assert reader._gate.idle() and reader._gate._free == 4


def test_read_packet_waits_its_turn_behind_a_miss_under_concurrency_1():
    reader, backing, cache, clock, _ = make(concurrency=1)
    cache.put(b"hot", b"H")
    slow = reader.get(b"slow")
    answers, done = packet_answers()
    reader.read_packet([b"hot"], done)
    assert answers == [], "a hit behind a miss in flight waits for the gate"
    backing.pending[0].callback(b"S")
    clock.advance(0)
    assert result_of(slow) == (b"S", False) and answers == [([b"H"], 1)]


# -- pending invalidations are read before the first lookup of a reactor turn ----------


def draining(**kw):
    """A reader with ``k`` cached as ``old`` and a drain hook that takes in the
    invalidations "waiting in the socket" (``waiting``); ``k``'s is there."""
    reader, backing, cache, clock, metrics = make(**kw)
    cache.put(b"k", b"old")
    drains, waiting = [], [b"k"]

    def drain():
        drains.append(clock.seconds())
        while waiting:
            reader.invalidate(waiting.pop())

    reader.drain_before_hits(drain, clock)
    return reader, backing, cache, clock, drains, waiting


def test_read_takes_in_pending_invalidations_before_the_lookup():
    reader, backing, cache, clock, drains, waiting = draining()
    assert reader.read(b"k") is None, "the stale entry is gone before the lookup"
    assert drains == [0]


def test_cached_takes_in_pending_invalidations_before_the_lookup():
    reader, backing, cache, clock, drains, waiting = draining()
    assert reader.cached([b"k"]) is None
    assert drains == [0]


def test_get_many_takes_in_pending_invalidations_before_the_lookup():
    reader, backing, cache, clock, drains, waiting = draining()
    d = reader.get_many([b"k"])
    assert isinstance(d, Deferred) and backing.calls == [(b"MGET", b"k")]
    assert len(drains) == 1, "once per turn, even across cached and _lookup_many"


def test_a_packet_takes_in_pending_invalidations_before_its_lookups():
    reader, backing, cache, clock, drains, waiting = draining()
    got = []
    reader.read_packet([b"k"], lambda results, hits: got.append((results, hits)))
    assert backing.calls == [(b"GET", b"k")] and drains == [0]
    backing.pending[0].callback(b"new")
    assert got == [([b"new"], 0)]


def test_a_queued_lookup_takes_in_invalidations_pending_when_it_is_admitted():
    reader, backing, cache, clock, drains, waiting = draining()
    waiting.clear()
    first = reader.get(b"x")  # a miss holds the only token
    queued = reader.get(b"k")  # waits at the gate: k is still fresh
    assert isinstance(queued, Deferred) and drains == [0]
    waiting.append(b"k")  # k is written while it waits
    clock.advance(0)  # the turn is over
    backing.pending[0].callback(b"xv")
    clock.advance(0)  # the token comes back: the lookup of k runs
    assert backing.calls == [(b"GET", b"x"), (b"GET", b"k")], "k was fetched, not served stale"
    assert len(drains) == 2
    assert result_of(first) == (b"xv", False)


def test_pending_invalidations_are_read_once_per_reactor_turn():
    reader, backing, cache, clock, drains, waiting = draining()
    cache.put(b"other", b"v")
    for _ in range(3):
        assert reader.read(b"other") == (b"v", True)
    assert drains == [0]
    clock.advance(0)
    assert reader.read(b"other") == (b"v", True)
    assert drains == [0, 0]
    reader.drain_before_hits(None)
    clock.advance(0)
    reader.read(b"other")
    assert drains == [0, 0], "no hook, no drain"


def test_a_settled_fetch_admits_the_waiters_before_answering_its_own_callers():
    # concurrency N: the tokens freed by a reply go to the waiting requests
    # first, so their fetches join the batch of this reactor turn before the
    # finished request's reply is handed over (Gate.leave_now)
    reader, backing, _, clock, _ = make(concurrency=2, capacity=0)
    order = []

    def answered(results, hits):
        order.append((results, backing.calls[2:]))

    reader.read_packet([b"a", b"b"], answered)
    reader.read_packet([b"c", b"d"], answered)
    assert backing.calls == [(b"GET", b"a"), (b"GET", b"b")]
    backing.pending[0].callback(b"A")
    backing.pending[1].callback(b"B")
    # when the first packet was answered, the second's keys were already asked for
    assert order == [([b"A", b"B"], [(b"GET", b"c"), (b"GET", b"d")])]
    assert not clock.getDelayedCalls()  # no turn waited for


def test_under_concurrency_1_the_next_request_starts_after_the_answer():
    reader, backing, _, clock, _ = make(concurrency=1, capacity=0)
    order = []
    reader.get(b"a").addCallback(lambda r: order.append(("answered a", backing.calls[:])))
    reader.get(b"b").addCallback(lambda r: order.append(("answered b", backing.calls[:])))
    backing.pending[0].callback(b"A")
    assert order == [("answered a", [(b"GET", b"a")])]
    assert backing.calls == [(b"GET", b"a"), (b"GET", b"b")]  # at once, not a turn later

"""The cache: global TTL from insertion, LRU by read or store, capacity in keys."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from redisp.cache import Cache
from redisp.metrics import Metrics


def make(capacity=3, ttl=10.0):
    clock = Clock()
    metrics = Metrics(started=0)
    return Cache(capacity, ttl, clock, metrics), clock, metrics


def test_stored_value_is_read_back():
    cache, _, _ = make()
    cache.put(b"k", b"v")
    assert cache.get(b"k") == b"v"
    assert cache.get(b"other") is None


def test_entry_expires_ttl_after_store_and_reads_do_not_extend_it():
    cache, clock, metrics = make(ttl=10)
    cache.put(b"k", b"v")
    clock.advance(9.999)
    assert cache.get(b"k") == b"v"
    clock.advance(0.001)
    assert cache.get(b"k") is None
    assert metrics.cache_expirations == 1
    assert len(cache) == 0


def test_storing_again_restarts_the_ttl():
    cache, clock, _ = make(ttl=10)
    cache.put(b"k", b"v1")
    clock.advance(6)
    cache.put(b"k", b"v2")
    clock.advance(6)
    assert cache.get(b"k") == b"v2"


def test_least_recently_used_key_is_evicted_at_capacity():
    cache, _, metrics = make(capacity=3)
    for k in (b"a", b"b", b"c"):
        cache.put(k, k)
    cache.get(b"a")  # b is now least recently used
    cache.put(b"d", b"d")
    assert cache.get(b"b") is None
    assert [cache.get(k) for k in (b"a", b"c", b"d")] == [b"a", b"c", b"d"]
    assert metrics.cache_evictions == 1
    assert len(cache) == 3


def test_store_counts_as_use():
    cache, _, _ = make(capacity=2)
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    cache.put(b"a", b"3")  # a is now most recent
    cache.put(b"c", b"4")
    assert cache.get(b"b") is None
    assert cache.get(b"a") == b"3"


def test_capacity_zero_caches_nothing():
    cache, _, _ = make(capacity=0)
    cache.put(b"k", b"v")
    assert cache.get(b"k") is None
    assert len(cache) == 0


def test_evicting_an_expired_entry_counts_as_expiration():
    cache, clock, metrics = make(capacity=1, ttl=1)
    cache.put(b"a", b"1")
    clock.advance(2)
    cache.put(b"b", b"2")
    assert (metrics.cache_expirations, metrics.cache_evictions) == (1, 0)


def test_discard_counts_an_invalidation():
    cache, _, metrics = make()
    cache.put(b"k", b"v")
    assert cache.discard(b"k") is True
    assert cache.discard(b"k") is False
    assert cache.get(b"k") is None
    assert metrics.cache_invalidations == 1


def test_clear_drops_everything():
    cache, _, _ = make()
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    assert cache.clear() == 2
    assert len(cache) == 0


def test_sweep_drops_expired_entries_from_the_lru_end_within_its_limit():
    cache, clock, metrics = make(capacity=10, ttl=5)
    for i in range(4):
        cache.put(b"%d" % i, b"v")
    clock.advance(3)
    cache.put(b"fresh", b"v")
    clock.advance(3)
    assert cache.sweep(limit=2) == 2
    assert len(cache) == 3
    assert cache.sweep() == 2
    assert len(cache) == 1
    assert metrics.cache_expirations == 4


def test_empty_value_is_cached():
    cache, _, _ = make()
    cache.put(b"k", b"")
    assert cache.get(b"k") == b""


operations = st.lists(
    st.tuples(
        st.sampled_from(["get", "put", "tick"]),
        st.sampled_from([b"a", b"b", b"c", b"d", b"e"]),
        st.integers(0, 3),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 4), ops=operations)
def test_cache_agrees_with_a_reference_model(capacity, ops):
    """A plain list-based LRU with explicit expiry times gives the same answers."""
    ttl = 4
    cache, clock, _ = make(capacity=capacity, ttl=ttl)
    model: list[tuple[bytes, bytes, float]] = []  # LRU first
    for n, (op, key, amount) in enumerate(ops):
        now = clock.seconds()
        if op == "tick":
            clock.advance(amount)
            continue
        found = [e for e in model if e[0] == key]
        if op == "get":
            expected = None
            if found:
                model.remove(found[0])
                if found[0][2] > now:
                    model.append(found[0])
                    expected = found[0][1]
            assert cache.get(key) == expected
        else:
            value = b"%d" % n
            cache.put(key, value)
            if capacity == 0:
                continue
            if found:
                model.remove(found[0])
            elif len(model) >= capacity:
                model.pop(0)
            model.append((key, value, now + ttl))
        assert len(cache) == len(model)


def test_get_all_answers_only_when_every_key_is_alive():
    cache, clock, metrics = make(capacity=3, ttl=10)
    cache.put(b"a", b"1")
    clock.advance(5)
    cache.put(b"b", b"2")
    assert [e[8:] for e in cache.get_all([b"a", b"b", b"a"])] == [b"1", b"2", b"1"]
    assert cache.get_all([b"a", b"x"]) is None
    assert cache.get_all([]) is None
    clock.advance(5)  # a expires exactly now: stored at 0 with ttl 10
    assert cache.get_all([b"b", b"a"]) is None
    assert len(cache) == 2 and metrics.cache_expirations == 0  # nothing dropped
    assert cache.get(b"a") is None and metrics.cache_expirations == 1


def test_get_all_marks_every_key_used():
    cache, _, _ = make(capacity=2)
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    cache.get_all([b"a"])
    cache.put(b"c", b"3")  # b is the least recently used now
    assert cache.get(b"b") is None and cache.get(b"a") == b"1"

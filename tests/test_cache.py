"""The cache: global TTL from insertion, LRU by read or store, capacity in keys.

Every test runs on both of the cache's containers: the C ``LruDict`` (when
built) and the ``OrderedDict`` it falls back to.
"""

from collections import OrderedDict

import pytest
from twisted.internet.task import Clock

import redisp.core.cache
from redisp.core.cache import Cache
from redisp.metrics import Metrics

try:
    from redisp.core._lru import LruDict
except ImportError:
    LruDict = None


@pytest.fixture(autouse=True, scope="module", params=["LruDict", "OrderedDict"])
def container(request):
    """Module-scoped (not monkeypatch) so that hypothesis tests may use it."""
    if request.param == "LruDict":
        if LruDict is None:
            pytest.skip("redisp.core._lru was not built (no C compiler)")
        kind = LruDict
    else:
        kind = OrderedDict
    built = redisp.core.cache._Entries
    redisp.core.cache._Entries = kind
    yield kind
    redisp.core.cache._Entries = built


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


def test_sweep_drops_expired_entries_from_the_oldest_store_within_its_limit():
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


def test_get_all_answers_only_when_every_key_is_alive():
    cache, clock, metrics = make(capacity=3, ttl=10)
    cache.put(b"a", b"1")
    clock.advance(5)
    cache.put(b"b", b"2")
    assert cache.get_all([b"a", b"b", b"a"]) == [b"1", b"2", b"1"]
    assert cache.get_all([b"a", b"x"]) is None
    assert cache.get_all([]) is None
    clock.advance(5)  # a expires exactly now: stored at 0 with ttl 10
    assert cache.get_all([b"b", b"a"]) is None
    assert len(cache) == 2 and metrics.cache_expirations == 0  # nothing dropped
    assert cache.get(b"a") is None and metrics.cache_expirations == 1


def test_get_all_hands_out_large_values_of_a_large_batch_uncopied():
    """An MGET of many large values must not copy them all in one turn."""
    from redisp.core.cache import BY_REFERENCE, COPIED

    cache, _, _ = make(capacity=3)
    big = b"b" * (BY_REFERENCE + 1)
    cache.put(b"big", big)
    cache.put(b"edge", b"e" * BY_REFERENCE)
    cache.put(b"small", b"s")
    few = cache.get_all([b"big", b"small"] * (COPIED // 2))
    assert few == [big, b"s"] * (COPIED // 2)
    assert all(type(v) is bytes for v in few)
    many = cache.get_all([b"big", b"edge", b"small"] * COPIED)
    assert many == [big, b"e" * BY_REFERENCE, b"s"] * COPIED
    assert [type(v) for v in many[:3]] == [memoryview, bytes, bytes]
    assert many[0].obj is cache._entries.get(b"big")  # a view of the entry itself
    only_small = cache.get_all([b"edge", b"small"] * COPIED)
    assert all(type(v) is bytes for v in only_small)


def test_get_all_marks_every_key_used():
    cache, _, _ = make(capacity=2)
    cache.put(b"a", b"1")
    cache.put(b"b", b"2")
    cache.get_all([b"a"])
    cache.put(b"c", b"3")  # b is the least recently used now
    assert cache.get(b"b") is None and cache.get(b"a") == b"1"


# expired entries before live ones (SPEC §4)


def test_a_full_cache_drops_an_expired_entry_before_evicting_a_live_one():
    """The issue's case, capacity 2 and ttl 1: the expired key was read more
    recently than the live one, so LRU alone would evict the live one."""
    cache, clock, metrics = make(capacity=2, ttl=1)
    cache.put(b"old", b"1")
    clock.advance(0.5)
    cache.put(b"live", b"2")
    clock.advance(0.4)
    assert cache.get(b"old") == b"1"  # "live" is now the least recently used
    clock.advance(0.3)  # old expired at 1.0; live lives until 1.5
    cache.put(b"new", b"3")
    assert cache.get(b"live") == b"2" and cache.get(b"new") == b"3"
    assert cache.get(b"old") is None
    assert (metrics.cache_expirations, metrics.cache_evictions) == (1, 0)


def test_the_expired_entry_is_found_behind_stale_records():
    """Keys stored again, discarded or evicted leave records behind; the
    oldest store still alive is found past them."""
    cache, clock, metrics = make(capacity=3, ttl=10)
    cache.put(b"a", b"1")
    cache.put(b"b", b"1")
    clock.advance(1)
    cache.put(b"a", b"2")  # a's first record is stale now
    cache.discard(b"b")  # and b's
    cache.put(b"c", b"1")
    clock.advance(1)
    cache.put(b"d", b"1")
    cache.get(b"a")
    cache.get(b"c")  # d is the least recently used; a was stored first
    clock.advance(9.5)  # a and c (stored at 1) expired; d (stored at 2) lives
    cache.put(b"e", b"1")
    assert cache.get(b"d") == b"1" and cache.get(b"e") == b"1"
    assert len(cache) == 3 and metrics.cache_evictions == 0


def test_a_full_cache_of_live_entries_evicts_the_least_recently_used():
    cache, clock, metrics = make(capacity=2, ttl=10)
    cache.put(b"a", b"1")
    clock.advance(1)
    cache.put(b"b", b"1")
    cache.get(b"a")
    cache.put(b"c", b"1")
    assert cache.get(b"b") is None and cache.get(b"a") == b"1"
    assert (metrics.cache_expirations, metrics.cache_evictions) == (0, 1)


def test_storing_one_key_again_at_one_instant_adds_no_record():
    cache, _, _ = make(capacity=10)
    for i in range(10_000):
        cache.put(b"k", b"%d" % i)
    assert cache.get(b"k") == b"9999"
    assert len(cache._stored) == 1


def test_stale_records_stay_bounded_under_churn():
    """Evictions of keys read since, and stores of keys again, leave stale
    records behind a live head; compaction keeps them within a few times
    the entry count, whatever the number of operations."""
    import random

    rng = random.Random(8)
    cache, clock, _ = make(capacity=100, ttl=1_000_000)
    for i in range(200_000):
        k = b"%d" % rng.randrange(300)
        if cache.get(k) is None:
            cache.put(k, b"v")
        if i % 100 == 0:
            clock.advance(0.001)
        assert len(cache._expiries) <= 4 * 100 + 2048
    assert len(cache) == 100


def test_a_record_keeps_no_dropped_value_alive():
    """Records hold the key and the expiry time only: evicted, expired,
    discarded and cleared values are freed at once."""
    import tracemalloc

    cache, clock, _ = make(capacity=2, ttl=10)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        big = 4 << 20
        cache.put(b"a", bytes(big))
        cache.put(b"b", bytes(big))
        cache.get(b"a")
        cache.put(b"c", b"small")  # evicts b
        cache.discard(b"a")
        clock.advance(11)
        cache.put(b"d", bytes(big))
        assert cache.get(b"c") is None  # expired
        cache.clear()
        assert tracemalloc.get_traced_memory()[0] - base < big // 4
    finally:
        tracemalloc.stop()


def test_clear_forgets_the_records_too():
    cache, clock, _ = make(capacity=2, ttl=1)
    cache.put(b"a", b"1")
    cache.put(b"b", b"1")
    cache.clear()
    assert len(cache._stored) == 0
    clock.advance(2)
    cache.put(b"c", b"1")
    cache.put(b"d", b"1")
    assert cache.get(b"c") == b"1" and cache.get(b"d") == b"1"


# max_item_bytes


def test_a_value_over_max_item_bytes_is_not_stored():
    clock = Clock()
    cache = Cache(10, 10, clock, Metrics(started=0), max_item_bytes=4)
    cache.put(b"fits", b"1234")
    cache.put(b"big", b"12345")
    assert cache.get(b"fits") == b"1234"
    assert cache.get(b"big") is None and len(cache) == 1


def test_a_value_over_max_item_bytes_drops_the_older_cached_one():
    clock = Clock()
    cache = Cache(10, 10, clock, Metrics(started=0), max_item_bytes=4)
    cache.put(b"k", b"old")
    cache.put(b"k", b"newer")
    assert cache.get(b"k") is None


def test_max_item_bytes_zero_is_no_limit():
    cache, _, _ = make()
    cache.put(b"k", bytes(1 << 20))
    assert len(cache.get(b"k")) == 1 << 20

"""The cache against a reference model, on each of its containers.

Apart from tests/test_cache.py, whose fixture runs every test once per
container: a hypothesis test run a second time that way fails inside
pytest-twisted's wrapper, so here hypothesis draws the container.
"""

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

import redisp.core.cache
from tests.test_cache import make

try:
    from redisp.core._lru import LruDict
except ImportError:
    LruDict = None

KINDS = [OrderedDict] + ([LruDict] if LruDict is not None else [])


operations = st.lists(
    st.tuples(
        st.sampled_from(["get", "put", "put", "tick", "discard", "sweep"]),
        st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f"]),
        st.integers(0, 3),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(kind=st.sampled_from(KINDS), capacity=st.integers(0, 5), ops=operations)
def test_cache_agrees_with_a_reference_model(kind, capacity, ops):
    """A plain list-based LRU with explicit expiry times gives the same answers:
    when full, the entry that expired first goes, else the least recently used."""
    ttl = 4
    built = redisp.core.cache._Entries
    redisp.core.cache._Entries = kind
    try:
        check_against_the_model(capacity, ttl, ops)
    finally:
        redisp.core.cache._Entries = built


def check_against_the_model(capacity, ttl, ops):
    cache, clock, metrics = make(capacity=capacity, ttl=ttl)
    model: list[tuple[bytes, bytes, float, int]] = []  # LRU first; (key, value, expiry, stored)
    expirations = evictions = 0
    for n, (op, key, amount) in enumerate(ops):
        # every store at its own time: among entries that expired at the very
        # same instant the cache may drop any one (all are expired), where the
        # model would have to guess which
        clock.advance(0.001)
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
                else:
                    expirations += 1
            assert cache.get(key) == expected
        elif op == "discard":
            assert cache.discard(key) == bool(found)
            if found:
                model.remove(found[0])
        elif op == "sweep":
            expired = [e for e in model if e[2] <= now]
            assert cache.sweep() == len(expired)
            expirations += len(expired)
            model = [e for e in model if e[2] > now]
        else:
            value = b"%d" % n
            cache.put(key, value)
            if capacity == 0:
                continue
            if found:
                model.remove(found[0])
            elif len(model) >= capacity:
                expired = [e for e in model if e[2] <= now]
                if expired:
                    # the first stored among them: equal expiry times tie in store order
                    model.remove(min(expired, key=lambda e: (e[2], e[3])))
                    expirations += 1
                else:
                    model.pop(0)
                    evictions += 1
            model.append((key, value, now + ttl, n))
        assert len(cache) == len(model)
        assert (metrics.cache_expirations, metrics.cache_evictions) == (expirations, evictions)
    assert len(cache._stored) <= 4 * max(len(model), 1) + 2048  # stale records stay bounded

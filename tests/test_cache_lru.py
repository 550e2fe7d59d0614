"""redisp.core._lru.LruDict, the cache's compact container, against OrderedDict.

Every operation the cache uses, in random sequences over enough keys to make
the index grow and probe chains form and shift back on deletion, gives the
same answers and leaves the same order as an OrderedDict.
"""

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

import redisp.core.cache
from redisp.metrics import Metrics
from tests.compiled import compiled

LruDict = compiled("core._lru").LruDict  # required where it could be built (CI), else skipped

keys = st.integers(0, 60).map(lambda i: b"k%d" % i)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, st.binary(max_size=3)),
        st.tuples(st.just("set"), keys, st.binary(max_size=3)),
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("move"), keys),
        st.tuples(st.just("del"), keys),
        st.tuples(st.just("pop"), keys),
        st.tuples(st.just("popitem"), st.booleans()),
        st.tuples(st.just("contains"), keys),
        st.tuples(st.just("clear")),
        st.tuples(st.just("touch_all"), st.lists(keys, max_size=20),
                  st.binary(max_size=2)),
    ),
    max_size=300,
)


def apply(d, op, args):
    """What ``op`` answers on ``d``: its result, or the KeyError it raised."""
    try:
        if op == "set":
            d[args[0]] = args[1]
            return None
        if op == "get":
            return d.get(args[0]), d.get(args[0], b"default")
        if op == "move":
            return d.move_to_end(args[0])
        if op == "del":
            del d[args[0]]
            return None
        if op == "pop":
            return d.pop(args[0], b"none")
        if op == "popitem":
            return d.popitem(args[0])
        if op == "contains":
            return args[0] in d
        if op == "touch_all":  # LruDict's, or the cache's Python one on an OrderedDict
            if isinstance(d, OrderedDict):
                return redisp.core.cache.touch_all(d, list(args[0]), args[1])
            return d.touch_all(list(args[0]), args[1])
        return d.clear()
    except KeyError as e:
        return ("KeyError", e.args)


@settings(max_examples=400, deadline=None)
@given(ops=ops)
def test_lru_dict_agrees_with_ordered_dict(ops):
    ours, model = LruDict(), OrderedDict()
    for op, *args in ops:
        assert apply(ours, op, args) == apply(model, op, args), (op, args)
        assert len(ours) == len(model)
        assert ours.keys() == list(model)
    for key in model:
        assert ours[key] == model[key]


def test_many_keys_through_growth_and_churn():
    """Index resizes and long probe chains, then deletions that shift them."""
    ours, model = LruDict(), OrderedDict()
    for i in range(20_000):
        key = b"key:%d" % (i * 7919 % 5000)
        if key in model and i % 3 == 0:
            ours.move_to_end(key)
            model.move_to_end(key)
        ours[key] = model[key] = b"%d" % i
        if len(model) > 3000:
            assert ours.popitem(False) == model.popitem(last=False)
        if i % 11 == 0:
            assert ours.pop(b"key:%d" % (i % 5000), None) == model.pop(b"key:%d" % (i % 5000), None)
    assert ours.keys() == list(model)
    assert all(ours[k] == v for k, v in model.items())


def test_keys_and_values_must_be_bytes():
    d = LruDict()
    with pytest.raises(TypeError):
        d["str"] = b"v"
    with pytest.raises(TypeError):
        d[b"k"] = "str"
    with pytest.raises(TypeError):
        d.get(memoryview(b"k"))
    assert len(d) == 0


def test_an_empty_lru_dict_pops_a_key_error():
    with pytest.raises(KeyError):
        LruDict().popitem(False)


def test_values_are_freed_when_dropped():
    import sys

    value = b"x" * 1000
    d = LruDict()
    base = sys.getrefcount(value)
    d[b"a"] = value
    d[b"b"] = value
    assert sys.getrefcount(value) == base + 2
    del d[b"a"]
    d.popitem(False)
    assert sys.getrefcount(value) == base
    d[b"c"] = value
    d.clear()
    assert sys.getrefcount(value) == base
    d[b"d"] = value
    del d
    assert sys.getrefcount(value) == base


def test_the_cache_uses_it_when_built():
    assert redisp.core.cache._Entries is LruDict
    cache = redisp.core.cache.Cache(2, 10.0, Clock(), Metrics(started=0))
    assert type(cache._entries) is LruDict


def test_churn_at_a_fixed_size_takes_no_more_memory():
    """Deletion leaves no tombstones, so a full cache that keeps evicting and
    storing stays at the memory of its first fill (a dict under churn grows
    to three times its entries at its next resize)."""
    import tracemalloc

    value = b"v"
    d = LruDict()
    for i in range(5000):
        d[b"key:%d" % i] = value
    tracemalloc.start()
    try:
        for i in range(5000, 50_000):
            d.popitem(False)
            d[b"key:%d" % i] = value
            d.move_to_end(b"key:%d" % (i - 100))
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # the 5000 key objects that replaced the first ones, about 40 bytes each;
    # an OrderedDict here: 796 kB
    assert grown < 5000 * 64


def test_touch_all_checks_its_arguments_and_takes_long_batches():
    d = LruDict()
    for i in range(200):
        d[b"k%d" % i] = b"v%d" % i
    wanted = [b"k%d" % i for i in range(199, -1, -1)]  # past the stack's 64
    assert d.touch_all(wanted, b"") == [b"v%d" % i for i in range(199, -1, -1)]
    assert d.keys() == wanted
    assert d.touch_all(wanted + [b"nope"], b"") is None and d.keys() == wanted
    with pytest.raises(TypeError):
        d.touch_all((b"k1",), b"")
    with pytest.raises(TypeError):
        d.touch_all([b"k1", "k2"], b"")
    with pytest.raises(TypeError):
        d.touch_all([b"k1"], "floor")
    assert d.touch_all([], b"") == []


def test_touch_all_leaks_no_reference():
    import sys

    d = LruDict()
    value = b"v" * 40
    d[b"k"] = value
    before = sys.getrefcount(value)
    for _ in range(1000):
        d.touch_all([b"k", b"k"], b"")
        d.touch_all([b"k", b"missing"], b"")
        d.touch_all([b"k"], b"w")  # below the floor
    assert sys.getrefcount(value) == before

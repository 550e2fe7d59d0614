"""The GETs of one reactor turn leave for Redis as one MGET.

txredisapi spends several times more Python on every command it sends
(building it, two Deferreds and a reply queue per call) than on one more key
of an MGET (``bench/batching_micro.py``; figures in bench/NOTES-perf.md,
"Miss path and HTTP door").  So the misses fetched in one reactor turn --
under ``concurrency: N`` up to N of them, admitted together -- are sent as
one MGET, with one timeout and one latency observation for the lot.  A lone
key goes as a plain GET, so at ``concurrency: 1`` nothing changes.

MGET and GET differ in one way: MGET answers nil for a key that holds
another type, where GET answers WRONGTYPE.  Every nil of a batch is therefore
asked again with GET, whose answer (absent, a value written meanwhile, or
Redis's own WRONGTYPE error) is the one the client gets.  An absent key read
under load thus costs a second round trip; a present one, the common case
of a cache miss, does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

#: what a fetch hands its ``done``: the value, None when absent, or a Failure
#: (a BackingError) when Redis could not say
Done = Callable[[Any], None]

#: keys in one MGET at most; a larger turn is split (Redis itself takes any
#: number, but one huge reply would hold up every smaller request behind it)
MAX_BATCH = 256


class GetBatcher:
    """Collects ``fetch(key, done)`` calls until the end of the reactor turn."""

    def __init__(self, call: Callable[..., Deferred], clock: IReactorTime) -> None:
        self._call = call  # Backing.call: typed errors and a timeout per command
        self._clock = clock
        self._keys: list[bytes] = []
        self._dones: list[Done] = []
        self._flush_call: IDelayedCall | None = None

    def fetch(self, key: bytes, done: Done) -> None:
        """Ask Redis for ``key`` with the other fetches of this turn."""
        self._keys.append(key)
        self._dones.append(done)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        keys, dones = self._keys, self._dones
        self._keys, self._dones = [], []
        for start in range(0, len(keys), MAX_BATCH):
            self._send(keys[start:start + MAX_BATCH], dones[start:start + MAX_BATCH])

    def _send(self, keys: list[bytes], dones: list[Done]) -> None:
        if len(keys) == 1:
            self._call(b"GET", keys[0]).addBoth(dones[0])
        else:
            self._call(b"MGET", *keys).addBoth(self._answered, keys, dones)

    def _answered(self, values: list | Failure, keys: list[bytes], dones: list[Done]) -> None:
        if values.__class__ is not list:  # a Failure: every key of the batch shares it
            for done in dones:
                done(values)
            return
        call = self._call
        for key, value, done in zip(keys, values, dones):
            if value is None:
                call(b"GET", key).addBoth(done)  # absent, or WRONGTYPE: GET tells
            else:
                done(value)

"""What the door tests share: the Backing they put under the real reader,
gate and cache, so each door is tested over the layers it really stands on
and only the bottom one (Redis) is scripted."""

from __future__ import annotations

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class ScriptedRedis:
    """The Backing under the real reader, gate and cache: what Redis holds and
    how it answers (the one fake of these tests, one layer down).

    A fetch of a key in ``failures`` fails at once (a backing known to be
    down); of a key in ``later``, waits until the test calls ``answer`` or
    ``fail``; of any other key, answers at once with its value in ``values``
    or None.  ``mget`` likewise, waiting in ``waiting_many`` if any key is
    ``later``.  Every call is kept in ``calls``.
    """

    def __init__(self, values: dict[bytes, bytes], clock: task.Clock) -> None:
        self.values = dict(values)
        self.clock = clock
        self.later: set[bytes] = set()
        self.failures: dict[bytes, Exception] = {}
        self.waiting: dict[bytes, list] = {}
        self.waiting_many: list[tuple[list[bytes], Deferred]] = []
        self.calls: list[tuple[bytes, ...]] = []

    def fetch(self, key: bytes, done) -> None:
        self.calls.append((b"GET", key))
        if key in self.failures:
            done(Failure(self.failures[key]))
        elif key in self.later:
            self.waiting.setdefault(key, []).append(done)
        else:
            done(self.values.get(key))

    def mget(self, keys: list[bytes]):
        self.calls.append((b"MGET", *keys))
        if any(key in self.later for key in keys):
            d: Deferred = Deferred()
            self.waiting_many.append((keys, d))
            return d
        return [self.values.get(key) for key in keys]

    def answer(self, key: bytes, value: bytes | None = None, end_turn: bool = True) -> None:
        """Redis answers the oldest fetch of ``key`` waiting; a reply from the
        backing ends the reactor turn it arrived in (late replies are flushed,
        and the gate hands its token on, at a turn's end)."""
        self.waiting[key].pop(0)(value)
        if end_turn:
            self.clock.advance(0)

    def fail(self, key: bytes, error: BaseException, end_turn: bool = True) -> None:
        self.waiting[key].pop(0)(Failure(error))
        if end_turn:
            self.clock.advance(0)

"""The request gate shared by both front doors (SPEC §4, "single client").

``concurrency: 1`` is a ``DeferredLock``: FIFO, one request at a time across
every client.  ``concurrency: N`` is a ``DeferredSemaphore`` with N tokens.

Release happens on the next reactor turn.  Releasing synchronously hands the
lock to the next waiter inside the releaser's call stack; when that waiter
finishes synchronously too (a cache hit), it releases in turn, and so on: a
few thousand queued hits behind one slow miss overflow the stack and leave
the lock held for good (Twisted #9304; ``redis-benchmark -P 16`` is enough).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")


class Gate:
    """Admits at most ``concurrency`` requests at once, in arrival order."""

    def __init__(self, concurrency: int, clock: IReactorTime) -> None:
        self.concurrency = concurrency
        self._clock = clock
        self._lock: DeferredLock | DeferredSemaphore = (
            DeferredLock() if concurrency == 1 else DeferredSemaphore(concurrency)
        )
        self._outstanding = 0  # admitted or waiting, not yet released
        self._drain_waiters: list[Deferred] = []

    def idle(self) -> bool:
        """True when a request arriving now would start at once.

        A request that completes synchronously may then skip the gate: running
        it through acquire/release would give the same observable order.
        """
        lock = self._lock
        if isinstance(lock, DeferredLock):
            return not lock.locked
        return lock.tokens > 0

    @property
    def waiting(self) -> int:
        """Requests queued behind the running ones."""
        return len(self._lock.waiting)

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)`` once admitted; release when its result settles."""
        self._outstanding += 1
        return self._lock.acquire().addCallback(self._admitted, f, args)

    def _admitted(self, _: object, f: Callable[..., Any], args: tuple) -> Deferred:
        return maybeDeferred(f, *args).addBoth(self._release)

    def _release(self, result: T) -> T:
        self._clock.callLater(0, self._released)
        return result

    def _released(self) -> None:
        self._lock.release()
        self._outstanding -= 1
        if not self._outstanding:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def drained(self, timeout: float) -> Deferred:
        """Fires once every admitted and queued request has finished, or after
        ``timeout`` seconds, whichever comes first (shutdown waits on it)."""
        if not self._outstanding:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._drain_waiters.append(waiter)
        waiter.addTimeout(timeout, self._clock)
        waiter.addErrback(lambda _: None)
        return waiter

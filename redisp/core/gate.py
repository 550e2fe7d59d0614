"""The request gate shared by both front doors (SPEC §4, "single client").

A FIFO semaphore: ``concurrency`` tokens, shared by every client; with one
token it is the single-client lock.  Requests past the tokens wait in a deque
in arrival order.

Release happens on the next reactor turn.  Releasing synchronously hands the
token to the next waiter inside the releaser's call stack; when that waiter
finishes synchronously too (a cache hit), it releases in turn, and so on: a
few thousand queued hits behind one slow miss overflow the stack and leave
the lock held for good (Twisted #9304; ``redis-benchmark -P 16`` is enough).
Every release due is counted and one ``callLater(0)`` hands them all over:
a burst of replies from the backing Redis costs one timer, not one each.

``leave_now`` is the exception, for a request finished by a backing reply
(core/reader.py, routing/forwarding.py): the waiters it lets in are admitted at once,
before its own reply is handed to the client, so their commands reach Redis
in the same reactor turn as the reply that freed the tokens, not a turn (and
an ``epoll`` call) later.  Under ``concurrency: N`` the backing holds only N
requests at a time: a turn between a reply and the next command costs
system calls, and time Redis sits unused wherever it has a core of its own
(bench/NOTES-perf.md, "Issue 12: from a backing reply to the next batch").
It cannot recurse: the admission loop runs once per stack, and a request
finishing inside it only gives its tokens back to that loop.

A request may name its ``Owner`` (one per client connection).  Once the owner
is gone (the client disconnected) its requests still waiting are dropped when
they reach the head of the queue: never run, no token taken (SPEC §4; a
client that pipelined 200 misses and left used to keep everyone at
``concurrency: 1`` waiting behind 200 backing calls).  Dropping is a flag, so
a disconnect costs nothing per queued request; the skip costs one check per
queued entry.

Hand-written rather than ``DeferredLock``/``DeferredSemaphore``: admitting a
request with a free token runs it at once, with no acquire Deferred and no
callback hop, and only a queued request gets a Deferred of its own, where
``DeferredSemaphore`` dominated the pass-through profile (see
bench/NOTES-perf.md, "Figures moved out of the code").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T")

#: ``Gate._head`` while the queue is empty or the admission loop runs: more
#: than any token count
_NEVER = float("inf")


class Owner:
    """Whose requests wait at the gate; ``gone`` drops those not yet admitted."""

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False


class Gate:
    """Admits at most ``concurrency`` requests at once, in arrival order.

    Two ways in: ``run`` for code that speaks Deferreds, and ``enter``/``leave``
    for the GET miss path, which threads plain callbacks through the gate,
    the cache and the backing fetch with no Deferred at all (issue 4: after
    GETs were batched into MGETs, Deferred callback chains were the largest
    share of a miss, bench/profile WORKLOAD=miss).
    """

    def __init__(self, concurrency: int, clock: IReactorTime) -> None:
        self.concurrency = concurrency
        self._clock = clock
        self._free = concurrency  # tokens not held by a running request
        # (tokens, f, args, owner or None)
        self._queue: deque[tuple[int, Callable[..., Any], tuple, Owner | None]] = deque()
        self._waiting = 0  # requests in the queue
        self._due = 0  # releases waiting for the next reactor turn
        self._release_call: IDelayedCall | None = None
        # what leave_now waits for before admitting: the tokens the queue's
        # head asks for; never reached while the queue is empty or the
        # admission loop is on the stack (which admits what it can itself)
        self._head = _NEVER
        self._admitting = False  # the admission loop is on the stack
        self._outstanding = 0  # admitted or waiting, not yet released
        self._drain_waiters: list[Deferred] = []

    def idle(self) -> bool:
        """True when a request arriving now would start at once.

        A request that completes synchronously may then skip the gate: running
        it through acquire/release would give the same observable order.
        """
        return self._free > 0 and not self._queue

    @property
    def waiting(self) -> int:
        """Requests queued behind the running ones."""
        return self._waiting

    def enter(self, f: Callable[..., Any], *args: Any, owner: Owner | None = None) -> None:
        """Call ``f(*args)`` once admitted: now if a token is free, else in turn
        (never, if ``owner`` is gone by then).

        ``f`` holds a token until it (or whatever it hands the work to) calls
        ``leave`` exactly once; it must not raise.
        """
        self.enter_many(1, f, *args, owner=owner)

    def enter_many(
        self, count: int, f: Callable[..., Any], *args: Any, owner: Owner | None = None
    ) -> None:
        """``enter`` for ``count`` requests at once (at most ``concurrency``):
        ``f(*args)`` once ``count`` tokens are free, in arrival order, and
        each of the requests calls ``leave`` once.

        One queue entry and one admission for a client's packet of pipelined
        GETs instead of one per request (bench/miss_micro.py).  A packet
        waiting for more tokens than are free holds back those behind it:
        strict arrival order, as with single requests.
        """
        self._outstanding += count
        if self._free >= count and not self._queue:
            self._free -= count
            f(*args)
        else:
            queue = self._queue
            if not queue and not self._admitting:
                self._head = count
            queue.append((count, f, args, owner))
            self._waiting += count

    def leave(self, count: int = 1) -> None:
        """Give back the tokens of ``count`` entered requests, on the next reactor turn."""
        self._due += count
        if self._release_call is None:
            self._release_call = self._clock.callLater(0, self._released)

    def leave_now(self, count: int = 1) -> None:
        """``leave``, with the waiters the tokens let in admitted now, in
        order (inside an admission already running: by that one, once the
        admitted call that finished these requests has returned).

        For the caller that still has work to do for the finished requests
        (answering their clients) and wants the next ones' commands sent
        first; ``f`` of a waiter runs inside this call.  While the head of
        the queue still waits for more tokens it costs two additions and a
        comparison (one call per settled backing fetch), so a head whose
        client has gone is dropped only once its tokens are free, or by the
        next ``leave``'s turn.
        """
        self._outstanding -= count
        self._free += count
        if self._free >= self._head:
            self._admit()
        elif not self._outstanding and self._drain_waiters:
            self.leave(0)  # shutdown goes on next turn, once the replies are out

    def run(self, f: Callable[..., Any], *args: Any, owner: Owner | None = None) -> Deferred:
        """Run ``f(*args)`` once admitted; release when its result settles.

        If ``owner`` is gone before admission, the Deferred never fires.
        """
        if self._free and not self._queue:  # the common case, without the closure below
            self._outstanding += 1
            self._free -= 1
            return maybeDeferred(f, *args).addBoth(self._release)
        waiter: Deferred = Deferred()
        self.enter(self._run_admitted, waiter, f, args, owner=owner)
        return waiter

    def _run_admitted(self, waiter: Deferred, f: Callable[..., Any], args: tuple) -> None:
        maybeDeferred(f, *args).addBoth(self._release).chainDeferred(waiter)

    def _release(self, result: T) -> T:
        self.leave()
        return result

    def _released(self) -> None:
        self._release_call = None
        due, self._due = self._due, 0
        self._outstanding -= due
        self._free += due
        if self._admitting:  # (a clock advanced inside an admission: tests only)
            return
        self._admit()
        if not self._outstanding:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _admit(self) -> None:
        """Admit waiters, in order, while tokens allow.

        A request that finishes at once while admitted gives its tokens
        back for later: ``leave`` on the next turn (no recursion however
        long the queue), ``leave_now`` to this loop, which sees them once the
        admitted call has returned."""
        self._head = _NEVER
        self._admitting = True
        queue = self._queue
        try:
            while queue:
                count, f, args, owner = queue[0]
                if owner is not None and owner.gone:  # its client left: drop, unrun
                    queue.popleft()
                    self._waiting -= count
                    self._outstanding -= count
                    continue
                if count > self._free:
                    break
                queue.popleft()
                self._free -= count
                self._waiting -= count
                f(*args)
        finally:
            self._admitting = False
            self._head = queue[0][0] if queue else _NEVER

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

"""event_loop.lean_dispatch: Twisted's epoll reactor dispatching each event
with the log context built once a poll.  Differential: the same events
through Twisted's own ``doPoll`` and the lean one, on real sockets, give the
same reads, the same log context in each handler, the same logged errors
and the same disconnections."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import context
from twisted.python.log import ILogContext

from redisp.event_loop import _do_poll, lean_dispatch

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Reader(FileDescriptor):
    """One end of a socketpair: records what it reads and under which log
    ``system``; may raise in ``doRead`` or in ``logPrefix``."""

    def __init__(self, sock: socket.socket, reactor, prefix: str | None, fails: bool) -> None:
        super().__init__(reactor=reactor)
        self.sock, self.prefix, self.fails = sock, prefix, fails
        self.seen: list[tuple[bytes, str]] = []
        self.lost: str | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        if self.prefix is None:
            raise RuntimeError("no prefix")
        return self.prefix

    def doRead(self):
        self.seen.append((self.sock.recv(100), context.get(ILogContext)["system"]))
        if self.fails:
            raise ValueError("a bug in a handler")
        return None

    def connectionLost(self, reason) -> None:
        self.lost = reason.type.__name__


def close(reactor) -> None:
    """Everything a reactor that never ran holds: its selectables, its waker, its epoll."""
    reactor.removeAll()
    waker = reactor.waker
    reactor.removeReader(waker)
    waker.connectionLost(None)
    reactor._poller.close()


def run_events(lean: bool) -> tuple:
    """Three sockets ready at once, one handler failing and one selectable
    with a broken logPrefix, dispatched by one poll; what everyone saw."""
    reactor = epollreactor.EPollReactor()
    if lean:
        assert lean_dispatch(reactor)
    pairs = [socket.socketpair() for _ in range(3)]
    readers = [Reader(a, reactor, prefix, fails) for (a, _), (prefix, fails) in zip(
        pairs, [("one", False), (None, False), ("three", True)], strict=True)]
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for reader, (_, b) in zip(readers, pairs, strict=True):
            reactor.addReader(reader)
            b.send(b"data for " + str(reader.prefix).encode())
        reactor.doIteration(0)
        after = context.get(ILogContext)
    finally:
        globalLogPublisher.removeObserver(events.append)
        close(reactor)
        for a, b in pairs:
            a.close()
            b.close()
    errors = sorted(  # legacy log.err events carry "failure", not "log_failure"
        (e["log_system"], e["failure"].type.__name__) for e in events if "failure" in e)
    return ([(r.seen, r.lost) for r in readers], errors, after)


def test_the_lean_loop_dispatches_as_twisted_does():
    twisted_own = run_events(lean=False)
    lean = run_events(lean=True)
    assert lean == twisted_own
    readers, errors, after = lean
    assert readers[0] == ([(b"data for one", "one")], None)
    assert readers[1][0] == [(b"data for None", "(buggy logPrefix method)")]
    assert readers[2] == ([(b"data for three", "three")], "ValueError")
    assert errors == [("(buggy logPrefix method)", "RuntimeError"), ("three", "ValueError")]
    assert after == {"system": "-"}  # every context pushed was popped


def test_an_interrupted_poll_is_a_turn_without_events():
    class Interrupted:
        def poll(self, timeout, most):
            raise InterruptedError(4, "EINTR")

    class Broken:
        def poll(self, timeout, most):
            raise OSError(9, "EBADF")

    reactor = MemoryReactorClock()
    reactor._selectables, reactor._doReadOrWrite = {}, None
    reactor._poller = Interrupted()
    _do_poll(reactor, None)
    reactor._poller = Broken()
    with pytest.raises(OSError):
        _do_poll(reactor, 0)


def test_only_twisted_s_own_epoll_loop_is_replaced():
    assert not lean_dispatch(MemoryReactorClock())

    class Custom(epollreactor.EPollReactor):
        def doPoll(self, timeout):
            return super().doPoll(timeout)

    for reactor in (Custom(), epollreactor.EPollReactor()):
        try:
            if isinstance(reactor, Custom):
                assert not lean_dispatch(reactor)
            else:
                assert lean_dispatch(reactor)
                assert reactor.doIteration.__func__ is _do_poll
                assert lean_dispatch(reactor)  # twice: still the lean one, once
                assert reactor.doIteration.__func__ is _do_poll
        finally:
            close(reactor)


def test_the_twistd_plugin_gives_its_reactor_the_lean_loop(tmp_path, monkeypatch):
    from redisp.tap import Options, makeService

    monkeypatch.chdir(tmp_path)  # no ./conf.yaml
    for name in [n for n in os.environ if n.startswith("REDISP_")]:
        monkeypatch.delenv(name)
    options = Options()
    options.parseOptions(["--http", "none", "--resp", "none", "--redis", "redis://127.0.0.1:1"])
    reactor = epollreactor.EPollReactor()
    try:
        makeService(options, reactor)
        assert reactor.doIteration.__func__ is _do_poll
    finally:
        close(reactor)

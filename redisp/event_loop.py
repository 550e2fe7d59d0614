"""Twisted's epoll reactor, each ready socket handed to its handler without
rebuilding the log context from scratch for every event.

``EPollReactor.doPoll`` calls ``log.callWithLogger`` once per ready
descriptor: that reads the current ``ILogContext`` (a walk down the context
stack, keyed by an interface), copies it, updates the copy with the
selectable's ``logPrefix``, and pushes it through a thread-local tracker,
in five Python calls.  For a client that sends one request and waits for the
answer (wrk on the HTTP door, ``redis-benchmark -P 1`` on the RESP door)
that is paid once a request, a large share of a cache hit's instructions
(bench/NOTES-perf.md, "w-http").

``lean_dispatch`` swaps in a ``doPoll`` that does the same per event with
what cannot change between the events of one poll read once: the tracker's
stack and the context below it.  Each handler still runs with
``{"system": logPrefix}`` over that context (legacy log lines keep their
``[_Channel,3,127.0.0.1]`` label), an error in a handler or in
``logPrefix`` is logged the same way, and everything else (the poll, the
lookup, ``_doReadOrWrite``) is Twisted's own.

It reads three private attributes of ``EPollReactor`` (``_poller``,
``_selectables``, ``_doReadOrWrite``); setup.cfg bounds Twisted to the
versions tested with them, and ``lean_dispatch`` leaves any reactor whose
``doPoll`` is not the one it replaces as it is.
"""

from __future__ import annotations

import errno
from types import MethodType
from typing import Any

from twisted.python import context, log
from twisted.python.log import ILogContext

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll on this system: nothing to replace
    EPollReactor = None


def _do_poll(self: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` with ``log.callWithLogger`` unrolled (see the module docstring)."""
    if timeout is None:
        timeout = -1  # wait indefinitely
    try:
        events = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    if not events:
        return
    selectables = self._selectables
    handle = self._doReadOrWrite
    stack = context.theContextTracker.currentContext().contexts
    below = context.get(ILogContext)
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            prefix = selectable.logPrefix()
        except KeyboardInterrupt:
            raise
        except BaseException:
            prefix = "(buggy logPrefix method)"
            log.err(system=prefix)
        logged = below.copy()
        logged["system"] = prefix
        stack.append({ILogContext: logged})
        try:
            try:
                handle(selectable, fd, event)
            finally:
                stack.pop()
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.err(system=prefix)


def lean_dispatch(reactor: Any) -> bool:
    """Give ``reactor`` the lean ``doPoll`` if it is Twisted's epoll reactor
    with its own; True when it now has it."""
    if EPollReactor is None or not isinstance(reactor, EPollReactor):
        return False
    if type(reactor).doPoll is not EPollReactor.doPoll or reactor.doIteration != reactor.doPoll:
        return False  # a subclass or someone else has changed the loop: leave it alone
    reactor.doIteration = reactor.doPoll = MethodType(_do_poll, reactor)
    return True

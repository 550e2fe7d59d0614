"""Classify one RESP request and send it down its route (SPEC §3, §7, §8).

The one place where a request's route is chosen: answered here by a command
of ``commands/local.py`` (local, or cached: GET/MGET through the reader),
forwarded or pinned by ``routing/forwarding.py``, or denied (unknown,
wrong arity, not authenticated, not permitted) with Redis's own error, in
Redis's order.  ``execute`` takes one request; ``execute_packet`` a whole
packet that would all be forwarded, in one step.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from redisp.backing.connection import BackingError
from redisp.commands.auth import (
    NOAUTH,
    no_permission,
)
from redisp.commands.local import (
    CLIENT_SUBCOMMANDS,
    COMMANDS,
    OWN_CLIENT_SUBCOMMANDS,
    harmless_client,
)
from redisp.commands.session import (
    BACKING_ERROR,
    BAD_REQUEST,
    Command,
    Reply,
    Session,
    backing_error_reply,
    unknown_command,
    unknown_subcommand,
    wrong_arity,
)
from redisp.protocol.codec import (
    error,
)
from redisp.routing.forwarding import Pending, as_deferred


def execute(session: Session, argv: list[bytes]) -> Reply:
    """Run one request: answered here, from the cache, or by the backing.

    This is the one place where a request's route is chosen (SPEC §3, §7).
    """
    session.last = argv  # CLIENT LIST's cmd=
    command = COMMANDS.get(argv[0])
    if command is None:
        command = COMMANDS.get(argv[0].lower())
    if session.restricted:
        refused = _refusal(session, argv, command)
        if refused is not None:
            return refused
    forwarder = session.forwarder
    if forwarder is not None and (
        command is None
        or command.route == "forwarded"
        or (command.route == "cached" and not session.plain)
        or (session.pin is not None and command.route != "local")
    ):
        return forwarder.forward(session, argv)
    if command is None:
        return error(unknown_command(argv)), BAD_REQUEST
    arity = command.arity
    if (arity > 0 and len(argv) != arity) or len(argv) < -arity:
        return error(wrong_arity(command.name)), BAD_REQUEST
    return command.handler(session, argv)


def execute_packet(session: Session, requests: list[list[bytes]], data: bytes) -> Pending | None:
    """``execute`` for a whole packet (``data``, canonical: ``RequestParser.
    whole``) when ``execute`` would forward every request of it, in one
    ``Forwarder.forward_packet``; None, with nothing done, otherwise.

    The same route as ``execute``'s, decided for the packet: an unrestricted,
    unpinned client; each command unknown here or ``forwarded``, or
    ``cached`` once the session is no longer plain (a forwarded command
    before it in the packet, or one still in flight).
    """
    forwarder = session.forwarder
    if forwarder is None or session.restricted or session.pin is not None:
        return None
    plain = not session.forwarding  # (unrestricted: authenticated)
    routes = _PACKET_ROUTES
    for argv in requests:
        route = routes.get(argv[0])
        if route is None:
            route = _packet_route(argv[0])
        if route != _FORWARDED and (route != _CACHED or plain):
            return None
        plain = False
    result = forwarder.forward_packet(session, requests, data)
    if result is not None:
        session.last = requests[-1]  # CLIENT LIST's cmd=
    return result


_FORWARDED = "forwarded"
_CACHED = "cached"
#: a command's name as sent -> its route for ``execute_packet`` (bounded:
#: clients choose the spelling)
_PACKET_ROUTES: dict[bytes, str] = {}


def _packet_route(name: bytes) -> str:
    command = COMMANDS.get(name)
    if command is None:
        command = COMMANDS.get(name.lower())
    route = _FORWARDED if command is None or command.route == "forwarded" else command.route
    if len(_PACKET_ROUTES) < 1024:
        _PACKET_ROUTES[name] = route
    return route


# -- authentication and permissions (SPEC §8, commands/auth.py) ---------------------------------


def _refusal(session: Session, argv: list[bytes], command: Command | None) -> Reply | None:
    """What Redis answers a restricted connection for ``argv``, or None when
    it may run it.

    Redis's order (src/server.c ``processCommand``): an unknown command or a
    wrong number of arguments first, then authentication, then the user's
    permissions.  Which commands exist, their arity and which only read come
    from the backing's own table (``Forwarder.table``) once it is known, so
    the errors are the backing's.  A ``read`` user may run what redisp
    answers itself (GET, MGET, PING, HELLO, INFO, COMMAND, its own CLIENT
    subcommands …) and what the backing flags ``readonly``.
    """
    forwarder = session.forwarder
    table = forwarder.table if forwarder is not None else None
    info = table.lookup(argv) if table is not None else None
    problem = _existence(argv, command, table, info, forwarder is None)
    if problem is not None:
        return _rejected(argv, error(problem)), BAD_REQUEST
    if session.user is None:
        if command is not None and "no_auth" in command.flags:
            return None  # AUTH, HELLO, QUIT, RESET
        return _rejected(argv, NOAUTH), BAD_REQUEST
    # a ``read`` user
    if command is not None and (command.name != "client" or harmless_client(argv)):
        return None  # answered here (COMMAND: the backing's table, read only)
    if forwarder is None:
        return None  # nothing is forwarded: CLIENT KILL … is an unknown subcommand here
    if table is None:
        return _after_table(session, argv)
    if info is not None and info.readonly:
        return None
    name = info.name if info is not None else argv[0].lower()
    return _rejected(argv, no_permission(name)), BAD_REQUEST


def _existence(
    argv: list[bytes], command: Command | None, table: Any, info: Any, alone: bool
) -> bytes | str | None:
    """Redis's error for an unknown command or subcommand or a wrong arity:
    from redisp's own table for what redisp answers itself (CLIENT SETINFO
    exists here whatever the backing's version), else from the backing's
    table when known (``alone``: nothing is forwarded, so redisp's table is
    all there is)."""
    if command is not None and command.name == "client" and len(argv) > 1:
        sub = argv[1].lower()
        if sub in OWN_CLIENT_SUBCOMMANDS or alone:
            command = CLIENT_SUBCOMMANDS.get(sub)
            if command is None:
                return unknown_subcommand("CLIENT", argv)
        else:
            command = None  # the backing's
    elif command is not None and command.route == "forwarded":
        command = None if info is not None else command
    if command is not None:
        arity = command.arity
        if (arity > 0 and len(argv) != arity) or len(argv) < -arity:
            return wrong_arity(command.name)
        return None
    if info is not None:
        if info.subcommands and len(argv) > 1 and argv[1].lower() not in info.subcommands:
            return unknown_subcommand(info.name.decode("latin-1").upper(), argv)
        if not info.arity_ok(argv):
            return wrong_arity(info.name.decode("latin-1"))
        return None
    return unknown_command(argv) if table is not None or alone else None


def _rejected(argv: list[bytes], reply: bytes) -> bytes:
    """The error ``reply``; EXEC's as Redis words it (``execCommandAbort``)."""
    if argv[0].lower() != b"exec":
        return reply
    reason = reply[1:]
    if reason.startswith(b"ERR "):
        reason = reason[4:]
    return b"-EXECABORT Transaction discarded because of: " + reason


def _after_table(session: Session, argv: list[bytes]) -> Deferred:
    """A ``read`` user's command that only the backing's table can judge,
    run once the table is known (it is read when the backing first answers)."""
    known: Deferred = Deferred()
    session.forwarder._with_table(known.callback)

    def judge(table: Any) -> Reply:
        if isinstance(table, BackingError):
            return backing_error_reply(table), BACKING_ERROR
        return as_deferred(execute(session, argv))

    return known.addCallback(judge)


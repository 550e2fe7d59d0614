"""The commands of the RESP door: one table of name -> arity and handler.

Every command a Redis client needs to connect and read is here, answered the
way Redis 7 answers it, down to the error wording (src/server.c
``commandCheckExistence``/``commandCheckArity``, src/networking.c for HELLO
and CLIENT), because client libraries and tools match on that text.

A handler takes the connection's ``Session`` and the request's arguments and
returns a ``Reply``: ``(encoded reply, outcome)`` when it can answer at once,
or a Deferred firing with that pair (a forwarded command: a ``Pending``,
forwarding.py).  The outcome is the metrics label (``Metrics.OUTCOMES``).
Handlers encode with the encoder the connection had when the request
arrived, so a ``HELLO 3`` pipelined behind a slow GET does not change how
that GET is answered.

Version: HELLO and INFO report ``redis_version`` 7.0.0, the Redis release
whose client-facing behaviour this door follows (RESP3, HELLO, COMMAND DOCS),
not the version of the backing Redis.  CLIENT SETINFO (Redis 7.2) is
accepted too, because redis-py sends it on every connection.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

import redisp
from redisp.auth import (
    DEFAULT_USER,
    EVERYONE,
    HELLO_NOAUTH,
    NO_PASSWORD_CONFIGURED,
    NOAUTH,
    WRONGPASS,
    no_permission,
)
from redisp.backing import BackingError, BackingReplyError
from redisp.client_list import ClientRegistry, client_info, client_kill, client_list
from redisp.config import Config
from redisp.forwarding import Pending, as_deferred
from redisp.frames import decode
from redisp.gate import Owner
from redisp.metrics import Metrics
from redisp.replies import LARGE, Chunked, bulk_reply, values_array
from redisp.resp import (
    EMPTY_ARRAY,
    OK,
    PONG,
    RESP2,
    Encoder,
    array,
    bulk,
    encode_command,
    encoder_for,
    error,
    integer,
    parse_integer,
    simple,
)

#: the Redis version this door imitates (see the module docstring)
REDIS_VERSION = "7.0.0"

# outcomes, as Metrics.OUTCOMES spells them
HIT = "hit"
MISS = "miss"
ABSENT = "absent"
BACKING_ERROR = "backing_error"
BAD_REQUEST = "bad_request"
PROTOCOL_ERROR = "protocol_error"
OTHER = "other"

#: what a handler returns: (encoded reply, outcome), or a Deferred of that,
#: or for a forwarded command a ``Pending`` of that (forwarding.py);
#: GET and MGET answer a large reply as a ``Chunked`` (replies.py)
Reply = tuple[bytes | Chunked, str] | Deferred | Pending
Handler = Callable[["Session", list[bytes]], Reply]


class Session:
    """One RESP connection as its commands see it, plus the proxy it talks to.

    The connection's own state (protocol, name, id) lives here rather than on
    the Twisted protocol so commands can be tested without a transport.
    """

    def __init__(
        self,
        client_id: int,
        reader: Any,
        metrics: Metrics,
        config: Config,
        clock: IReactorTime,
    ) -> None:
        self.id = client_id
        self.reader = reader
        self.metrics = metrics
        self.config = config
        self.clock = clock
        #: replies are encoded with this; HELLO switches it
        self.encoder: Encoder = RESP2
        self.name: bytes | None = None
        self.lib_name: bytes | None = None
        self.lib_ver: bytes | None = None
        #: set by QUIT: close once every reply so far has been written
        self.closing = False
        #: the connection's requests at the gate, dropped if it goes away
        self.owner: Owner | None = None
        #: forwarding (forwarding.py): None under ``forward: none``
        self.forwarder: Any = None
        self.pin: Any = None  # the client's own backing connection while it holds state
        self.lane = 0  # its connection of the shared pool
        self.forwarding = 0  # forwarded commands in flight: GETs follow them to Redis
        self.gone = False  # the client left: its forwarded commands not yet sent are dropped
        #: write a push frame (pub/sub message) to the client, in order with
        #: replies: ``push(frame, owed)``, see RespProtocol.push
        self.push: Callable[..., None] = lambda frame, owed=0: None
        #: close the connection once every reply owed is written (the
        #: client's pinned connection was lost with its state)
        self.hang_up: Callable[[], None] = lambda: None
        #: who the client is (auth.py): None until it has authenticated
        self.user: Any = EVERYONE
        #: True while a command may be refused (not authenticated, or a
        #: ``read`` user): the one flag the request path reads
        self.restricted = False
        self.auth: Any = None  # the proxy's Authenticator; None: no authentication
        # for CLIENT LIST / INFO / KILL (client_list.py), set by the door
        self.clients: Any = ClientRegistry()
        self.created = clock.seconds()
        self.addresses: tuple[Any, Any] = (None, None)  # (peer, local)
        self.last: list[bytes] = [b"NULL"]  # the last request run through execute()
        self.kill: Callable[[bool], None] = lambda itself: None
        #: the door is told the client must authenticate again (RESET)
        self.unauthenticated: Callable[[], None] = lambda: None

    @property
    def plain(self) -> bool:
        """True when a GET may be served from the cache: an authenticated
        client, with no pinned connection and no forwarded command of its own
        still in flight (a GET pipelined behind the client's own SET must see
        it).  The RESP door's GET fast paths run only while this holds."""
        return self.pin is None and not self.forwarding and self.user is not None


@dataclass(frozen=True)
class Command:
    """One entry of the table, with what ``COMMAND INFO`` reports about it."""

    name: str  # Redis's full name: "get", "client|setname"
    arity: int  # as Redis: N = exactly N arguments, -N = at least N (name included)
    handler: Handler
    flags: tuple[str, ...] = ()
    acl: tuple[str, ...] = ()
    keys: tuple[int, int, int] = (0, 0, 0)  # first key, last key, step
    subcommands: dict[bytes, Command] = field(default_factory=dict)
    #: where forwarding is on: ``local`` always answered here, even for a
    #: pinned client; ``cached`` (GET, MGET) answered here only while the
    #: session is plain; ``session`` answered here unless the client is
    #: pinned (PING answers differently in pub/sub mode); ``forwarded``
    #: never answered here (COMMAND: the backing's own table)
    route: str = "local"


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


# -- authentication and permissions (SPEC §8, auth.py) ---------------------------------


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
    if command is not None and (command.name != "client" or _harmless_client(argv)):
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
        if sub in _OWN_CLIENT_SUBCOMMANDS or alone:
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


def _auth(session: Session, argv: list[bytes]) -> Reply:
    """AUTH [user] password, as Redis 7 (src/acl.c ``authCommand``)."""
    if len(argv) > 3:
        return error("ERR syntax error"), BAD_REQUEST
    if len(argv) == 2:
        if session.auth is None or not session.auth.required:
            return NO_PASSWORD_CONFIGURED, BAD_REQUEST
        name, password = DEFAULT_USER, argv[1]
    else:
        name, password = argv[1], argv[2]
    if _login(session, name, password):
        return OK, OTHER
    return WRONGPASS, BAD_REQUEST


def _login(session: Session, name: bytes, password: bytes) -> bool:
    """The connection becomes ``name`` if ``password`` is its; else it stays
    whoever it was (without an Authenticator: a Redis without passwords)."""
    if session.auth is None:
        return name == DEFAULT_USER
    return session.auth.login(session, name, password)


# -- Redis's error wording ----------------------------------------------------------


def unknown_command(argv: list[bytes]) -> bytes:
    """``ERR unknown command 'x', with args beginning with: 'a' 'b' ``.

    As Redis formats it: the name and the quoted arguments each cut at 128
    bytes in all, each argument followed by a blank, C strings (so cut at a
    NUL byte as well).
    """
    args = b""
    for arg in argv[1:]:
        if len(args) >= 128:
            break
        args += b"'" + _c_string(arg)[:128 - len(args)] + b"' "
    name = _c_string(argv[0])[:128]
    return b"ERR unknown command '" + name + b"', with args beginning with: " + args


def unknown_subcommand(container: str, argv: list[bytes]) -> bytes:
    """``ERR unknown subcommand 'x'. Try CLIENT HELP.``"""
    sub = _c_string(argv[1])[:128]
    return b"ERR unknown subcommand '" + sub + b"'. Try " + container.encode() + b" HELP."


def wrong_arity(name: str) -> str:
    """Redis names the command in lower case, subcommands as ``client|setname``."""
    return f"ERR wrong number of arguments for '{name}' command"


def _c_string(arg: bytes) -> bytes:
    nul = arg.find(b"\0")
    return arg if nul < 0 else arg[:nul]


#: "WRONGTYPE ...", "ERR ...", "NOAUTH ...": a reply that already has its code
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]*(?: |$)")


def backing_error_reply(exc: BackingError) -> bytes:
    """The error reply for a failed backing call.

    Redis's own errors pass through with their code (``-WRONGTYPE ...``);
    everything else is ours and gets ``ERR`` (``-ERR backing redis
    unavailable (...)``).
    """
    text = str(exc)
    if isinstance(exc, BackingReplyError) and _ERROR_CODE.match(text):
        return error(text)
    return error("ERR " + text)


def _backing_failed(failure: Failure) -> tuple[bytes, str]:
    """Errback of reads: BackingErrors become replies, anything else goes on
    (the server answers it with ``-ERR internal error`` and logs it)."""
    failure.trap(BackingError)
    return backing_error_reply(failure.value), BACKING_ERROR


# -- keys ----------------------------------------------------------------------------


def _get(session: Session, argv: list[bytes]) -> Reply:
    result = session.reader.get(argv[1], session.owner)
    if result.__class__ is tuple:  # a cache hit, answered at once: the hot path
        return get_answer(result, session.encoder)
    return result.addBoth(get_answer, session.encoder)


def get_answer(
    result: tuple[bytes | None, bool] | Failure, encoder: Encoder
) -> tuple[bytes | Chunked, str]:
    """GET's reply and outcome for the reader's Lookup or Failure; raises
    anything but a BackingError (the server answers it as an internal error).

    Shared by ``_get`` and the RESP door's path for packets of GETs.
    """
    if result.__class__ is Failure:
        return _backing_failed(result)  # type: ignore[arg-type]
    value, hit = result  # type: ignore[misc]
    if value is None:
        return encoder.null, ABSENT
    if len(value) > LARGE:  # kept by reference, sent as the client reads it
        return bulk_reply(value), HIT if hit else MISS
    return bulk(value), HIT if hit else MISS


def _mget(session: Session, argv: list[bytes]) -> Reply:
    """MGET, counted as one request: ``hit`` when answered at once from the
    cache, ``absent`` when no key had a value, else ``miss`` (the reader does
    not say which keys came from where)."""
    encoder = session.encoder
    result = session.reader.get_many(argv[1:], session.owner)
    if result.__class__ is list:
        return values_array(result, encoder.null), HIT
    return result.addCallbacks(_got_many, _backing_failed, callbackArgs=(encoder,))


def _got_many(values: list, encoder: Encoder) -> tuple[bytes | Chunked, str]:
    outcome = ABSENT if all(value is None for value in values) else MISS
    return values_array(values, encoder.null), outcome


# -- connection ------------------------------------------------------------------------


def _ping(session: Session, argv: list[bytes]) -> Reply:
    if len(argv) == 1:
        return PONG, OTHER
    if len(argv) == 2:
        return bulk(argv[1]), OTHER
    return error(wrong_arity("ping")), BAD_REQUEST


def _echo(session: Session, argv: list[bytes]) -> Reply:
    return bulk(argv[1]), OTHER


def _quit(session: Session, argv: list[bytes]) -> Reply:
    session.closing = True
    return OK, OTHER


def _select(session: Session, argv: list[bytes]) -> Reply:
    index = parse_integer(argv[1])
    if index is None:
        return error("ERR value is not an integer or out of range"), BAD_REQUEST
    if index == session.config.redis.db:
        return OK, OTHER  # the database the cache holds: nothing to change
    if session.forwarder is not None:
        return session.forwarder.forward(session, argv)  # pins the client to that db
    # forward: none: the proxy serves the one database of --redis
    return error(
        f"ERR DB index is out of range (redisp serves one database, "
        f"db {session.config.redis.db}, the one chosen by --redis)"
    ), BAD_REQUEST


def _reset(session: Session, argv: list[bytes]) -> Reply:
    """As Redis: the connection back to its first state.  A pinned client's
    RESET goes to its pinned connection, after what the client sent before
    it (a BLPOP still blocked, an open MULTI): Redis drops the state and
    answers, and the pin is let go (forwarding.py)."""
    reply: Reply = (simple("RESET"), OTHER)
    if session.pin is not None:
        reply = session.forwarder.forward(session, argv)
    session.encoder = RESP2
    session.name = None
    if session.auth is not None:
        session.auth.admit(session)  # as Redis: back to the default user, unauthenticated
    return reply


def _hello(session: Session, argv: list[bytes]) -> Reply:
    version = 0
    if len(argv) >= 2:
        version = parse_integer(argv[1])  # type: ignore[assignment]
        if version is None:
            return error("ERR Protocol version is not an integer or out of range"), BAD_REQUEST
        if version not in (2, 3):
            return error("NOPROTO unsupported protocol version"), BAD_REQUEST
    j = 2
    while j < len(argv):
        option = argv[j].lower()
        more = len(argv) - 1 - j
        if option == b"auth" and more >= 2:
            # checked as AUTH is, at its place among the options: a SETNAME
            # before it has taken effect already, as in Redis 7.0
            if not _login(session, argv[j + 1], argv[j + 2]):
                return WRONGPASS, BAD_REQUEST
            j += 3
        elif option == b"setname" and more >= 1:
            if not _valid_attribute(argv[j + 1]):
                return error(_BAD_NAME), BAD_REQUEST
            session.name = argv[j + 1] or None
            j += 2
        else:
            return error(b"ERR Syntax error in HELLO option '" + _c_string(argv[j]) + b"'"), \
                BAD_REQUEST
    if session.user is None:
        return HELLO_NOAUTH, BAD_REQUEST
    if version:
        session.encoder = encoder_for(version)
    encoder = session.encoder  # the reply already speaks the new protocol, as in Redis
    return encoder.map([
        (bulk(b"server"), bulk(b"redis")),
        (bulk(b"version"), bulk(REDIS_VERSION.encode())),
        (bulk(b"proto"), integer(encoder.version)),
        (bulk(b"id"), integer(session.id)),
        (bulk(b"mode"), bulk(b"standalone")),
        (bulk(b"role"), bulk(b"master")),
        (bulk(b"modules"), EMPTY_ARRAY),
    ]), OTHER


_BAD_NAME = "ERR Client names cannot contain spaces, newlines or special characters."


def _valid_attribute(value: bytes) -> bool:
    """Redis keeps names printable and blank-free so CLIENT LIST stays
    splittable; the empty string is allowed (it clears the name)."""
    return all(0x21 <= byte <= 0x7E for byte in value)


def _client(session: Session, argv: list[bytes]) -> Reply:
    """CLIENT SETNAME/GETNAME/ID/SETINFO are about the client's connection to
    redisp; every other subcommand (LIST, KILL, TRACKING …) is the backing's."""
    if session.forwarder is not None and argv[1].lower() not in _OWN_CLIENT_SUBCOMMANDS:
        return session.forwarder.forward(session, argv)
    return _subcommand(session, argv, "CLIENT", CLIENT_SUBCOMMANDS)


def _harmless_client(argv: list[bytes]) -> bool:
    """A CLIENT subcommand redisp answers that a ``read`` user may run: not
    LIST or KILL (``admin``, as in Redis's ACL categories)."""
    sub = CLIENT_SUBCOMMANDS.get(argv[1].lower()) if argv[1].lower() in \
        _OWN_CLIENT_SUBCOMMANDS else None
    return sub is not None and "admin" not in sub.flags


_OWN_CLIENT_SUBCOMMANDS = frozenset((b"setname", b"getname", b"id", b"setinfo",
                                     b"list", b"info", b"kill"))


def _subcommand(
    session: Session, argv: list[bytes], container: str, table: dict[bytes, Command]
) -> Reply:
    command = table.get(argv[1].lower())
    if command is None:
        return error(unknown_subcommand(container, argv)), BAD_REQUEST
    arity = command.arity
    if (arity > 0 and len(argv) != arity) or len(argv) < -arity:
        return error(wrong_arity(command.name)), BAD_REQUEST
    return command.handler(session, argv)


def _client_setname(session: Session, argv: list[bytes]) -> Reply:
    if not _valid_attribute(argv[2]):
        return error(_BAD_NAME), BAD_REQUEST
    session.name = argv[2] or None
    return OK, OTHER


def _client_getname(session: Session, argv: list[bytes]) -> Reply:
    if session.name is None:
        return session.encoder.null, OTHER
    return bulk(session.name), OTHER


def _client_id(session: Session, argv: list[bytes]) -> Reply:
    return integer(session.id), OTHER


def _client_setinfo(session: Session, argv: list[bytes]) -> Reply:
    attribute, value = argv[2], argv[3]
    which = attribute.lower()
    if which not in (b"lib-name", b"lib-ver"):
        return error(b"ERR Unrecognized option '" + _c_string(attribute) + b"'"), BAD_REQUEST
    if not _valid_attribute(value):
        return error(
            b"ERR " + _c_string(attribute)
            + b" cannot contain spaces, newlines or special characters."
        ), BAD_REQUEST
    if which == b"lib-name":
        session.lib_name = value or None
    else:
        session.lib_ver = value or None
    return OK, OTHER


def _help(lines: list[str]) -> Handler:
    reply = array([simple(line) for line in lines])

    def handler(session: Session, argv: list[bytes]) -> Reply:
        return reply, OTHER

    return handler


# -- introspection ----------------------------------------------------------------------


def _command(session: Session, argv: list[bytes]) -> Reply:
    if len(argv) == 1:
        return _command_infos(session.encoder, list(TABLE)), OTHER
    return _subcommand(session, argv, "COMMAND", COMMAND_SUBCOMMANDS)


def _command_count(session: Session, argv: list[bytes]) -> Reply:
    return integer(len(TABLE)), OTHER


def _command_info(session: Session, argv: list[bytes]) -> Reply:
    names = [name.lower().decode("latin-1") for name in argv[2:]] or list(TABLE)
    return _command_infos(session.encoder, names), OTHER


def _command_docs(session: Session, argv: list[bytes]) -> Reply:
    # No docs: an empty reply makes redis-cli build its hints from nothing,
    # where an error would make it fall back to hints for all of Redis.
    return session.encoder.map([]), OTHER


def _command_infos(encoder: Encoder, names: list[str]) -> bytes:
    return array([_info_entry(encoder, name) for name in names])


_info_cache: dict[tuple[int, str], bytes] = {}


def _info_entry(encoder: Encoder, name: str) -> bytes:
    """One command's COMMAND INFO entry (Redis 7's ten fields), or null."""
    key = (encoder.version, name)
    entry = _info_cache.get(key)
    if entry is None:
        command = ALL_COMMANDS.get(name)
        if command is None:
            return encoder.null
        entry = _info_cache[key] = _describe(encoder, command)
    return entry


def _describe(encoder: Encoder, command: Command) -> bytes:
    first, last, step = command.keys
    key_specs = [] if not first else [_key_spec(encoder, first, last)]
    return array([
        bulk(command.name.encode()),
        integer(command.arity),
        encoder.set([simple(flag) for flag in command.flags]),
        integer(first),
        integer(last),
        integer(step),
        encoder.set([simple("@" + category) for category in command.acl]),
        encoder.set([]),  # tips
        array(key_specs),
        array([_describe(encoder, sub) for sub in command.subcommands.values()]),
    ])


def _key_spec(encoder: Encoder, first: int, last: int) -> bytes:
    """A read-only key spec: keys from argument ``first`` to ``last``."""
    m = encoder.map
    lastkey = last - first if last >= 0 else last
    return m([
        (bulk(b"flags"), encoder.set([simple("RO"), simple("access")])),
        (bulk(b"begin_search"), m([
            (bulk(b"type"), bulk(b"index")),
            (bulk(b"spec"), m([(bulk(b"index"), integer(first))])),
        ])),
        (bulk(b"find_keys"), m([
            (bulk(b"type"), bulk(b"range")),
            (bulk(b"spec"), m([
                (bulk(b"lastkey"), integer(lastkey)),
                (bulk(b"keystep"), integer(1)),
                (bulk(b"limit"), integer(0)),
            ])),
        ])),
    ])


# -- INFO --------------------------------------------------------------------------------

#: section names in the order INFO prints them when redisp answers alone
INFO_SECTIONS = ("server", "clients", "memory", "stats", "keyspace", "proxy")
_ALL_SECTIONS = frozenset((b"all", b"default", b"everything"))


def _info(session: Session, argv: list[bytes]) -> Reply:
    """The backing's own INFO (its version, memory, keyspace: what clients
    and tools read), with redisp's ``# Proxy`` section after it.

    Without forwarding, or when the backing cannot answer, redisp's own
    figures in the same format.  Always a bulk string, in RESP3 too (Redis
    sends a verbatim string there; redis-cli asserts on anything but a bulk
    string).
    """
    asked = [arg.lower() for arg in argv[1:]]
    with_proxy = not asked or any(a in _ALL_SECTIONS or a == b"proxy" for a in asked)
    for_backing = [a for a in argv[1:] if a.lower() != b"proxy"]
    forwarder = session.forwarder
    if forwarder is None or (asked and not for_backing):
        return bulk(_own_info(session, asked).encode()), OTHER
    answer: Deferred = Deferred()

    def got(frame: Any) -> None:
        text = _bulk_text(frame)
        if text is None:  # down, timed out, or an error reply: our own figures
            text = _own_info(session, asked)
        elif with_proxy:
            text = text + "\r\n" + render_info(session, {"proxy"})
        answer.callback((bulk(text.encode()), OTHER))

    forwarder.pool.call(session.lane, encode_command([b"INFO", *for_backing]), got)
    return answer


def _bulk_text(frame: Any) -> str | None:
    """The text of a bulk string reply frame, or None for anything else (an
    error reply, a null, a BackingError)."""
    value = decode(frame) if frame.__class__ is bytes else None
    return value.decode("utf-8", "replace") if value.__class__ is bytes else None


def _own_info(session: Session, asked: list[bytes]) -> str:
    wanted = {a.decode("latin-1") for a in asked}
    if not wanted or wanted & {"all", "default", "everything"}:
        wanted = set(INFO_SECTIONS)
    return render_info(session, wanted)


def render_info(session: Session, sections: set[str]) -> str:
    """The INFO text: ``# Section`` then ``field:value`` lines, sections
    separated by a blank line, every line ending in CRLF, as Redis writes it."""
    metrics, config, clock = session.metrics, session.config, session.clock
    uptime = max(0, int(clock.seconds() - metrics.started))
    requests = sum(metrics.requests.values())
    fields: dict[str, list[tuple[str, object]]] = {
        "server": [
            ("redis_version", REDIS_VERSION),
            ("redis_mode", "standalone"),
            ("os", f"{os.uname().sysname} {os.uname().release} {os.uname().machine}"),
            ("arch_bits", 64 if sys.maxsize > 2**32 else 32),
            ("process_id", os.getpid()),
            ("tcp_port", 0),
            ("uptime_in_seconds", uptime),
            ("uptime_in_days", uptime // 86400),
        ],
        "clients": [
            ("connected_clients", metrics.connected_clients),
            ("maxclients", config.max_clients),
            ("blocked_clients", 0),
        ],
        "memory": [
            ("used_memory", _resident_bytes()),
        ],
        "stats": [
            ("total_connections_received", metrics.connections_received),
            ("total_commands_processed", requests),
            ("keyspace_hits", metrics.cache_hits),
            ("keyspace_misses", metrics.cache_misses),
            ("evicted_keys", metrics.cache_evictions),
            ("expired_keys", metrics.cache_expirations),
        ],
        "keyspace": [],  # redisp alone cannot say what the backing holds
        "proxy": [
            ("redisp_version", redisp.__version__),
            ("uptime_in_seconds", uptime),
            ("connected_clients", metrics.connected_clients),
            ("pinned_clients", metrics.pinned_clients),
            ("cache_size", metrics.cache_size()),
            ("cache_hits", metrics.cache_hits),
            ("cache_misses", metrics.cache_misses),
            ("cache_evictions", metrics.cache_evictions),
            ("cache_expirations", metrics.cache_expirations),
            ("cache_invalidations", metrics.cache_invalidations),
            ("write_invalidations", metrics.write_invalidations),
            ("write_flushes", metrics.write_flushes),
            ("forwarded_commands", sum(metrics.forwarded.values())),
            ("backing_redis", config.redis.redacted()),
            ("backing_status", "up" if metrics.backing_up() else "down"),
            *_topology(metrics, config),
            ("ttl", f"{config.ttl:g}"),
            ("capacity", config.capacity),
            ("concurrency", config.concurrency),
            ("forward", config.forward),
            ("invalidation", config.invalidation),
            ("invalidation_state", metrics.invalidation_state()),
            ("invalidation_messages", metrics.invalidation_messages),
            ("invalidation_flushes", metrics.invalidation_flushes),
            ("auth_failures", metrics.auth_failures),
        ],
    }
    blocks = []
    for name in INFO_SECTIONS:
        if name in sections:
            lines = [f"# {name.capitalize()}"]
            lines += [f"{key}:{value}" for key, value in fields[name]]
            blocks.append("".join(line + "\r\n" for line in lines))
    return "\r\n".join(blocks)


def _topology(metrics: Metrics, config: Config) -> list[tuple[str, object]]:
    """The ``topology`` field, and the fields of whoever follows a topology
    other than one server (cluster_map.ClusterTopology.describe)."""
    if metrics.topology_info is None:
        return [("topology", f"single {config.redis.host}:{config.redis.port}")]
    return metrics.topology_info()


def _resident_bytes() -> int:
    """This process's resident memory, what Redis's used_memory stands for here."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# -- the table ---------------------------------------------------------------------------

_CLIENT_HELP = [
    "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "GETNAME",
    "    Return the name of the current connection.",
    "ID",
    "    Return the ID of the current connection.",
    "SETINFO <option> <value>",
    "    Set client meta attr. Options are:",
    "    * LIB-NAME: the client lib name.",
    "    * LIB-VER: the client lib version.",
    "SETNAME <name>",
    "    Assign the name <name> to the current connection.",
    "HELP",
    "    Print this help.",
]

_COMMAND_HELP = [
    "COMMAND <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "(no subcommand)",
    "    Return details about all commands of this proxy.",
    "COUNT",
    "    Return the total number of commands of this proxy.",
    "DOCS [<command-name> ...]",
    "    Return documentary information (none: this proxy has no docs).",
    "INFO [<command-name> ...]",
    "    Return details about multiple commands.",
    "HELP",
    "    Print this help.",
]

_CONNECTION = ("fast", "connection")

CLIENT_SUBCOMMANDS: dict[bytes, Command] = {
    b"setname": Command("client|setname", 3, _client_setname,
                        ("noscript", "loading", "stale"), ("slow", "connection")),
    b"getname": Command("client|getname", 2, _client_getname,
                        ("noscript", "loading", "stale"), ("slow", "connection")),
    b"id": Command("client|id", 2, _client_id,
                   ("noscript", "loading", "stale"), ("slow", "connection")),
    b"setinfo": Command("client|setinfo", 4, _client_setinfo,
                        ("noscript", "loading", "stale"), ("slow", "connection")),
    b"list": Command("client|list", -2, client_list,
                     ("admin", "noscript", "loading", "stale"), ("slow", "connection")),
    b"info": Command("client|info", 2, client_info,
                     ("noscript", "loading", "stale"), ("slow", "connection")),
    b"kill": Command("client|kill", -3, client_kill,
                     ("admin", "noscript", "loading", "stale"), ("slow", "connection")),
    b"help": Command("client|help", 2, _help(_CLIENT_HELP),
                     ("loading", "stale"), ("slow", "connection")),
}

COMMAND_SUBCOMMANDS: dict[bytes, Command] = {
    b"count": Command("command|count", 2, _command_count,
                      ("loading", "stale"), ("slow", "connection")),
    b"docs": Command("command|docs", -2, _command_docs,
                     ("loading", "stale"), ("slow", "connection")),
    b"info": Command("command|info", -2, _command_info,
                     ("loading", "stale"), ("slow", "connection")),
    b"help": Command("command|help", 2, _help(_COMMAND_HELP),
                     ("loading", "stale"), ("slow", "connection")),
}

#: every command by name, in COMMAND's order
TABLE: dict[str, Command] = {
    command.name: command
    for command in [
        Command("get", 2, _get, ("readonly", "fast"), ("read", "string", "fast"), (1, 1, 1),
                route="cached"),
        Command("mget", -2, _mget, ("readonly", "fast"), ("read", "string", "fast"), (1, -1, 1),
                route="cached"),
        Command("ping", -1, _ping, ("fast",), _CONNECTION, route="session"),
        Command("echo", 2, _echo, ("loading", "stale", "fast"), _CONNECTION, route="session"),
        Command("quit", -1, _quit,
                ("noscript", "loading", "stale", "fast", "no_auth", "allow_busy"), _CONNECTION),
        Command("reset", 1, _reset,
                ("noscript", "loading", "stale", "fast", "no_auth", "allow_busy"), _CONNECTION),
        Command("hello", -1, _hello,
                ("noscript", "loading", "stale", "fast", "no_auth", "allow_busy"), _CONNECTION),
        Command("auth", -2, _auth,
                ("noscript", "loading", "stale", "fast", "no_auth", "allow_busy"), _CONNECTION),
        Command("select", 2, _select, ("loading", "stale", "fast"), _CONNECTION,
                route="session"),
        Command("client", -2, _client, (), ("slow",), subcommands=CLIENT_SUBCOMMANDS),
        Command("command", -1, _command, ("loading", "stale"), ("slow", "connection"),
                subcommands=COMMAND_SUBCOMMANDS, route="forwarded"),
        Command("info", -1, _info, ("loading", "stale"), ("slow", "dangerous")),
    ]
}

#: commands and subcommands by full name, for COMMAND INFO client|setname
ALL_COMMANDS: dict[str, Command] = {
    **TABLE,
    **{sub.name: sub for command in TABLE.values() for sub in command.subcommands.values()},
}

#: lookup keys for execute(): lower case, upper case (what clients send) and
#: anything else lowered
COMMANDS: dict[bytes, Command] = {}
for _name, _command_entry in TABLE.items():
    COMMANDS[_name.encode()] = _command_entry
    COMMANDS[_name.upper().encode()] = _command_entry
del _name, _command_entry

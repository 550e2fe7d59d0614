"""The commands redisp answers itself: one table of name -> arity and handler.

Every command a Redis client needs to connect and read is here, answered the
way Redis 7 answers it, down to the error wording (src/server.c
``commandCheckExistence``/``commandCheckArity``, src/networking.c for HELLO
and CLIENT), because client libraries and tools match on that text.  CLIENT
SETINFO (Redis 7.2) is accepted too, because redis-py sends it on every
connection.  GET and MGET are here as ``cached`` commands: answered from the
reader while the session is plain, forwarded otherwise (commands/dispatch.py).
"""

from __future__ import annotations

from twisted.python.failure import Failure

from redisp.commands.auth import (
    DEFAULT_USER,
    HELLO_NOAUTH,
    NO_PASSWORD_CONFIGURED,
    WRONGPASS,
)
from redisp.commands.client_list import client_info, client_kill, client_list
from redisp.commands.info import info_command
from redisp.commands.replies import LARGE, Chunked, bulk_reply, values_array
from redisp.commands.session import (
    ABSENT,
    BAD_REQUEST,
    HIT,
    MISS,
    OTHER,
    REDIS_VERSION,
    Command,
    Handler,
    Reply,
    Session,
    backing_failed,
    c_string,
    unknown_subcommand,
    wrong_arity,
)
from redisp.protocol.codec import (
    EMPTY_ARRAY,
    OK,
    PONG,
    RESP2,
    Encoder,
    array,
    bulk,
    encoder_for,
    error,
    integer,
    parse_integer,
    simple,
)


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
        return backing_failed(result)  # type: ignore[arg-type]
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
    return result.addCallbacks(_got_many, backing_failed, callbackArgs=(encoder,))


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
    answers, and the pin is let go (routing/forwarding.py)."""
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
            return error(b"ERR Syntax error in HELLO option '" + c_string(argv[j]) + b"'"), \
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
    if session.forwarder is not None and argv[1].lower() not in OWN_CLIENT_SUBCOMMANDS:
        return session.forwarder.forward(session, argv)
    return _subcommand(session, argv, "CLIENT", CLIENT_SUBCOMMANDS)


def harmless_client(argv: list[bytes]) -> bool:
    """A CLIENT subcommand redisp answers that a ``read`` user may run: not
    LIST or KILL (``admin``, as in Redis's ACL categories)."""
    sub = CLIENT_SUBCOMMANDS.get(argv[1].lower()) if argv[1].lower() in \
        OWN_CLIENT_SUBCOMMANDS else None
    return sub is not None and "admin" not in sub.flags


OWN_CLIENT_SUBCOMMANDS = frozenset((b"setname", b"getname", b"id", b"setinfo",
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
        return error(b"ERR Unrecognized option '" + c_string(attribute) + b"'"), BAD_REQUEST
    if not _valid_attribute(value):
        return error(
            b"ERR " + c_string(attribute)
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
        Command("info", -1, info_command, ("loading", "stale"), ("slow", "dangerous")),
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

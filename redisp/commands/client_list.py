"""CLIENT LIST, CLIENT INFO and CLIENT KILL about the clients of redisp.

A client of redisp sees redisp's own numbering (``CLIENT ID``, ``HELLO``'s
``id``), so the commands that name clients must speak of redisp's clients
too: forwarded to the backing they would describe redisp's own backing
connections, and ``CLIENT KILL ID <my id>`` could kill one of them (the
tracking connection, flushing the cache).  The lines follow Redis 7's
format (src/networking.c ``catClientInfoString``); fields redisp has no
equivalent for (query buffer sizes, fd) read 0 or -1, as Redis writes them
for a client without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from redisp.protocol.codec import OK, bulk, error, integer, parse_integer

Reply = tuple[bytes, str]


class ClientRegistry:
    """The RESP door's connected clients by id: one per door, never global."""

    def __init__(self) -> None:
        self._sessions: dict[int, Any] = {}

    def add(self, session: Any) -> None:
        self._sessions[session.id] = session

    def remove(self, session: Any) -> None:
        self._sessions.pop(session.id, None)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)


def client_list(session: Any, argv: list[bytes]) -> Reply:
    """``CLIENT LIST [TYPE normal|pubsub|…] [ID id …]``."""
    sessions: Iterable[Any] = session.clients
    args = [a.lower() for a in argv[2:]]
    if len(args) >= 2 and args[0] == b"type":
        kind = args[1]
        if kind not in (b"normal", b"pubsub", b"master", b"replica", b"slave"):
            return error(b"ERR Unknown client type '" + argv[3] + b"'"), "bad_request"
        sessions = [s for s in sessions if _kind(s) == kind]
    elif len(args) >= 2 and args[0] == b"id":
        ids = set()
        for raw in argv[3:]:
            value = parse_integer(raw)
            if value is None or value <= 0:
                return error("ERR Invalid client ID"), "bad_request"
            ids.add(value)
        sessions = [s for s in sessions if s.id in ids]
    elif args:
        return error("ERR syntax error"), "bad_request"
    now = session.clock.seconds()
    return bulk("".join(describe(s, now) + "\n" for s in sessions).encode()), "other"


def client_info(session: Any, argv: list[bytes]) -> Reply:
    return bulk((describe(session, session.clock.seconds()) + "\n").encode()), "other"


def client_kill(session: Any, argv: list[bytes]) -> Reply:
    """``CLIENT KILL addr`` (old form: +OK or an error) or ``CLIENT KILL
    <filter> <value> …`` (new form: how many were killed)."""
    if len(argv) == 3:
        address = argv[2].decode("latin-1")
        found = [s for s in session.clients if _address(s, "peer") == address]
        if not found:
            return error("ERR No such client"), "bad_request"
        for s in found:
            _kill(s, session)
        return OK, "other"
    if len(argv) % 2:
        return error("ERR syntax error"), "bad_request"
    tests: list[Callable[[Any], bool]] = []
    skip_me = True
    for i in range(2, len(argv), 2):
        option, value = argv[i].lower(), argv[i + 1]
        text = value.decode("latin-1")
        if option == b"id":
            wanted = parse_integer(value)
            if wanted is None or wanted <= 0:
                return error("ERR client-id should be greater than 0"), "bad_request"
            tests.append(lambda s, w=wanted: s.id == w)
        elif option == b"addr":
            tests.append(lambda s, t=text: _address(s, "peer") == t)
        elif option == b"laddr":
            tests.append(lambda s, t=text: _address(s, "host") == t)
        elif option == b"type":
            kind = value.lower()
            if kind not in (b"normal", b"pubsub", b"master", b"replica", b"slave"):
                return error(b"ERR Unknown client type '" + value + b"'"), "bad_request"
            tests.append(lambda s, k=kind: _kind(s) == k)
        elif option == b"user":
            tests.append(lambda s, t=text: _user(s) == t)
        elif option == b"skipme":
            if value.lower() not in (b"yes", b"no"):
                return error("ERR syntax error"), "bad_request"
            skip_me = value.lower() == b"yes"
        elif option == b"maxage":
            age = parse_integer(value)
            if age is None:
                return error("ERR syntax error"), "bad_request"
            now = session.clock.seconds()
            tests.append(lambda s, a=age, n=now: n - s.created >= a)
        else:
            return error("ERR syntax error"), "bad_request"
    killed = 0
    for s in session.clients:
        if (skip_me and s is session) or not all(test(s) for test in tests):
            continue
        _kill(s, session)
        killed += 1
    return integer(killed), "other"


def describe(s: Any, now: float) -> str:
    """One client as CLIENT LIST shows it (Redis 7.0's fields, in its order)."""
    pin = s.pin
    db = s.config.redis.db
    sub = ssub = 0
    multi = -1
    flags = "N"
    if pin is not None:
        connection = pin.connection
        db = pin.db
        sub, ssub = connection.channels, connection.shard_channels
        if connection.subscribed:
            flags = "P"
        if pin.multi:
            flags, multi = "x", 0
    name = (s.name or b"").decode("latin-1")
    return (
        f"id={s.id} addr={_address(s, 'peer')} laddr={_address(s, 'host')} fd=-1 "
        f"name={name} age={int(now - s.created)} idle=0 flags={flags} db={db} "
        f"sub={sub} psub=0 ssub={ssub} multi={multi} qbuf=0 qbuf-free=0 argv-mem=0 "
        f"multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={_command(s)} "
        f"user={_user(s)} redir=-1 resp={s.encoder.version} "
        f"lib-name={(s.lib_name or b'').decode('latin-1')} "
        f"lib-ver={(s.lib_ver or b'').decode('latin-1')}"
    )


def _command(s: Any) -> str:
    """The name CLIENT LIST gives the last request: ``get``, ``client|list``
    (a subcommand's full name, from the backing's own table)."""
    argv = s.last
    table = getattr(s.forwarder, "table", None)
    info = table.lookup(argv) if table is not None else None
    name = info.name if info is not None else argv[0].lower()
    return name.decode("latin-1")


def _kind(s: Any) -> bytes:
    pin = s.pin
    return b"pubsub" if pin is not None and pin.connection.subscribed else b"normal"


def _user(s: Any) -> str:
    user = getattr(s, "user", None)
    return getattr(user, "name", None) or "default"


def _address(s: Any, which: str) -> str:
    address = s.addresses[0 if which == "peer" else 1]
    host = getattr(address, "host", None)
    if host is None:  # a unix socket
        return f"{getattr(address, 'name', '') or ''}:0"
    return f"{host}:{address.port}"


def _kill(s: Any, by: Any) -> None:
    """Gone at once, as Redis frees a killed client: not in a later list."""
    s.clients.remove(s)
    s.kill(s is by)

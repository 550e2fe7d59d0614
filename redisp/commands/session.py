"""What every command handler sees: the connection's ``Session``, the
``Command`` entry, the ``Reply`` it returns, and the errors worded as Redis
words them.

A handler takes the connection's ``Session`` and the request's arguments and
returns a ``Reply``: ``(encoded reply, outcome)`` when it can answer at once,
or a Deferred firing with that pair (a forwarded command: a ``Pending``,
routing/forwarding.py).  The outcome is the metrics label (``Metrics.OUTCOMES``).
Handlers encode with the encoder the connection had when the request
arrived, so a ``HELLO 3`` pipelined behind a slow GET does not change how
that GET is answered.

Version: HELLO and INFO report ``redis_version`` 7.0.0, the Redis release
whose client-facing behaviour this door follows (RESP3, HELLO, COMMAND DOCS),
not the version of the backing Redis.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from redisp.backing.connection import BackingError, BackingReplyError
from redisp.commands.auth import (
    EVERYONE,
)
from redisp.commands.client_list import ClientRegistry
from redisp.commands.replies import Chunked
from redisp.config import Config
from redisp.core.gate import Owner
from redisp.metrics import Metrics
from redisp.protocol.codec import (
    RESP2,
    Encoder,
    error,
)
from redisp.routing.forwarding import Pending

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
#: or for a forwarded command a ``Pending`` of that (routing/forwarding.py);
#: GET and MGET answer a large reply as a ``Chunked`` (commands/replies.py)
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
        #: forwarding (routing/forwarding.py): None under ``forward: none``
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
        #: who the client is (commands/auth.py): None until it has authenticated
        self.user: Any = EVERYONE
        #: True while a command may be refused (not authenticated, or a
        #: ``read`` user): the one flag the request path reads
        self.restricted = False
        self.auth: Any = None  # the proxy's Authenticator; None: no authentication
        # for CLIENT LIST / INFO / KILL (commands/client_list.py), set by the door
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
        args += b"'" + c_string(arg)[:128 - len(args)] + b"' "
    name = c_string(argv[0])[:128]
    return b"ERR unknown command '" + name + b"', with args beginning with: " + args


def unknown_subcommand(container: str, argv: list[bytes]) -> bytes:
    """``ERR unknown subcommand 'x'. Try CLIENT HELP.``"""
    sub = c_string(argv[1])[:128]
    return b"ERR unknown subcommand '" + sub + b"'. Try " + container.encode() + b" HELP."


def wrong_arity(name: str) -> str:
    """Redis names the command in lower case, subcommands as ``client|setname``."""
    return f"ERR wrong number of arguments for '{name}' command"


def c_string(arg: bytes) -> bytes:
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


def backing_failed(failure: Failure) -> tuple[bytes, str]:
    """Errback of reads: BackingErrors become replies, anything else goes on
    (the server answers it with ``-ERR internal error`` and logs it)."""
    failure.trap(BackingError)
    return backing_error_reply(failure.value), BACKING_ERROR


"""Who may talk to the proxy (SPEC §8): passwords, users, protected mode.

The rules are Redis's, so that every client library configured for a
password-protected Redis works unchanged:

* ``password`` is the password of the user ``default`` (Redis's
  ``requirepass``); ``users`` adds named users, each with ``commands: all``
  or ``read``.  With either set, a connection starts unauthenticated and
  must send ``AUTH [user] password`` or ``HELLO 3 AUTH user password``.
* With neither set, every connection is the ``default`` user with every
  right, as on a Redis without ``requirepass``; and unless
  ``protected_mode`` is off, only clients on the loopback address are let
  in (Redis's protected mode).

Passwords are kept as SHA-256 digests and compared with
``hmac.compare_digest`` on digests, as Redis compares hashes in constant
time (src/acl.c ``ACLCheckUserCredentials``): how long a check takes says
nothing about the password tried, not even its length.  A user name that
does not exist is checked against a dummy digest, so it costs the same.

The connection's state lives on its ``Session`` (commands/session.py): ``user`` is
None until it has authenticated, and ``restricted`` is True while anything
may be refused to it (not authenticated, or a ``read`` user).  The request
path reads that one flag; everything else here runs at AUTH, at connect and
for refusals only.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import UNIXAddress

from redisp.config import Config
from redisp.metrics import Metrics
from redisp.protocol.codec import error

DEFAULT_USER = b"default"

#: Redis's limits on a multibulk request before AUTH (src/networking.c,
#: ``processMultibulkBuffer``, since CVE-2021-32675): more arguments is
#: ``unauthenticated multibulk length``, a longer one ``unauthenticated bulk
#: length``, and the connection is closed (doors/resp.py applies them)
UNAUTHENTICATED_ARGS = 10
UNAUTHENTICATED_BULK = 16384

# Redis 7.0's replies, byte for byte (src/server.c, src/acl.c, src/networking.c)
NOAUTH = error("NOAUTH Authentication required.")
WRONGPASS = error("WRONGPASS invalid username-password pair or user is disabled.")
NO_PASSWORD_CONFIGURED = error(
    "ERR AUTH <password> called without any password configured for the default user. "
    "Are you sure your configuration is correct?")
HELLO_NOAUTH = error(
    "NOAUTH HELLO must be called with the client already authenticated, otherwise the "
    "HELLO AUTH <user> <pass> option can be used to authenticate the client and select "
    "the RESP protocol version at the same time")
#: what a client not on the loopback address reads before the connection is
#: closed, in protected mode (src/networking.c ``clientAcceptHandler``, 7.0,
#: its typo included)
DENIED = (
    b"-DENIED Redis is running in protected mode because protected mode is enabled and "
    b"no password is set for the default user. In this mode connections are only accepted "
    b"from the loopback interface. If you want to connect from external computers to Redis "
    b"you may adopt one of the following solutions: 1) Just disable protected mode sending "
    b"the command 'CONFIG SET protected-mode no' from the loopback interface by connecting "
    b"to Redis from the same host the server is running, however MAKE SURE Redis is not "
    b"publicly accessible from internet if you do so. Use CONFIG REWRITE to make this "
    b"change permanent. 2) Alternatively you can just disable the protected mode by editing "
    b"the Redis configuration file, and setting the protected mode option to 'no', and then "
    b"restarting the server. 3) If you started the server manually just for testing, "
    b"restart it with the '--protected-mode no' option. 4) Setup a an authentication "
    b"password for the default user. NOTE: You only need to do one of the above things in "
    b"order for the server to start accepting connections from the outside.\r\n"
)

#: addresses Redis treats as local (``connIsLocal``: exactly these two
#: strings; 127.0.0.2 is remote), plus IPv4 loopback as an IPv6 socket
#: reports it
LOOPBACK = frozenset(("127.0.0.1", "::1", "::ffff:127.0.0.1"))


def no_permission(name: bytes) -> bytes:
    """Redis 7.0's ACL refusal; ``name`` as Redis names it (``client|kill``)."""
    return error(b"NOPERM this user has no permissions to run the '" + name + b"' command")


@dataclass(frozen=True)
class User:
    """Who a connection is, once authenticated."""

    name: bytes
    #: ``commands: read``: only what the backing flags readonly
    read_only: bool = False


#: the user of every connection when no password and no users are set
EVERYONE = User(DEFAULT_USER)


def _digest(password: bytes) -> bytes:
    return hashlib.sha256(password).digest()


#: what a name without a user is checked against, so it costs what a wrong
#: password costs
_NOBODY = _digest(b"\0no such user\0")


class Authenticator:
    """The users of one proxy and the checks made against them."""

    def __init__(
        self,
        passwords: dict[bytes, tuple[bytes, User]],
        protected_mode: bool,
        metrics: Metrics,
    ) -> None:
        #: name -> (digest of the password, user)
        self._users = passwords
        self._metrics = metrics
        #: clients must authenticate
        self.required = bool(passwords)
        #: refuse clients not on the loopback address
        self.protected = protected_mode and not self.required
        #: the ``default`` user's entry, when it has a password (``password``)
        self._default = passwords.get(DEFAULT_USER)

    @classmethod
    def from_config(cls, config: Config, metrics: Metrics) -> Authenticator:
        passwords: dict[bytes, tuple[bytes, User]] = {}
        if config.password is not None:
            passwords[DEFAULT_USER] = (_digest(config.password.encode()), User(DEFAULT_USER))
        for user in config.users:
            name = user.name.encode()
            passwords[name] = (_digest(user.password.encode()),
                               User(name, read_only=user.commands == "read"))
        return cls(passwords, config.protected_mode, metrics)

    def describe(self) -> str:
        """For the start-up line; never a password."""
        if self.required:
            how = ["password"] if self._default is not None else []
            users = sorted(name for name in self._users if name != DEFAULT_USER)
            if users:
                how.append("users " + b", ".join(users).decode("utf-8", "replace"))
            return f"clients must authenticate ({'; '.join(how)})"
        if self.protected:
            return "no authentication, protected mode (loopback clients only)"
        return "no authentication, protected mode off"

    # -- RESP -------------------------------------------------------------------

    def admit(self, session: Any) -> None:
        """The state of a new connection, and of one after RESET (whose door
        is told, ``session.unauthenticated``: Redis's limits before AUTH hold
        again)."""
        if self.required:
            session.user = None
            session.restricted = True
            session.unauthenticated()
        else:
            session.user = EVERYONE
            session.restricted = False

    def login(self, session: Any, name: bytes, password: bytes) -> bool:
        """AUTH name password: on success the connection becomes that user;
        on failure it stays whoever it was, and the failure is counted."""
        user = self.check(name, password)
        if user is None:
            return False
        session.user = user
        session.restricted = user.read_only
        return True

    def check(self, name: bytes, password: bytes, count: bool = True) -> User | None:
        """The user if ``password`` is ``name``'s, else None (counted as a
        failure unless ``count`` is False)."""
        if not self.required:
            # Redis's default user without a password takes any password
            if name == DEFAULT_USER:
                return EVERYONE
            user = None
        else:
            entry = self._users.get(name)
            expected = entry[0] if entry is not None else _NOBODY
            ok = hmac.compare_digest(_digest(password), expected)
            user = entry[1] if ok and entry is not None else None
        if user is None and count:
            self._metrics.auth_failures += 1
        return user

    # -- both doors -------------------------------------------------------------

    def refuses(self, peer: Any) -> bool:
        """Protected mode: True for a client that is not local."""
        if not self.protected or isinstance(peer, UNIXAddress):
            return False
        return getattr(peer, "host", None) not in LOOPBACK

    # -- HTTP -------------------------------------------------------------------

    def http_allows(self, authorization: bytes | None, count: bool = True) -> bool:
        """An ``Authorization`` header value: ``Bearer <password>`` (the
        ``default`` user's) or ``Basic`` credentials of any user.  A header
        that does not carry valid credentials is a failure, counted unless
        ``count`` is False; no header at all is not (the client has not
        tried yet)."""
        if not self.required:
            return True
        if authorization is None:
            return False
        credentials = http_credentials(authorization)
        if credentials is None:
            if count:
                self._metrics.auth_failures += 1
            return False
        return self.check(*credentials, count=count) is not None


def http_credentials(authorization: bytes) -> tuple[bytes, bytes] | None:
    """(user, password) from an ``Authorization`` value, or None when it
    carries none that redisp takes."""
    scheme, _, credentials = authorization.strip().partition(b" ")
    scheme = scheme.lower()
    credentials = credentials.strip()
    if scheme == b"bearer":
        return DEFAULT_USER, credentials
    if scheme != b"basic":
        return None
    try:
        decoded = binascii.a2b_base64(credentials, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    name, colon, password = decoded.partition(b":")
    return (name, password) if colon else None

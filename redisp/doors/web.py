"""The HTTP door's application half (SPEC §2, §8): ``/get``, ``/healthz`` and
``/metrics``, what each request means and the reply it gets.

Split from the protocol (doors/http.py, issue 12) so that what a reply
says (status, validators, Cache-Control, credentials, which outcome is
counted) is read in one place, apart from how bytes arrive and leave; this
module builds on that one and never the other way round.  A hit is answered
synchronously: ``CachedReader.get`` hands back a tuple, and no Deferred is
made.  The plain-GET fast path's answer, ``FrontDoor.answer_plain``, sits
beside ``/get``'s general one and shares its ``key_from_query``,
``validators`` and ``compose``, so the two send the same bytes.

The key is read from the raw query string, not from ``request.args``:
twisted's parser also splits on ``;`` (so ``key=a;b`` would lose ``;b``),
and WHATWG form decoding, which browsers and ``urllib.parse.urlencode`` use,
does not.  Like both of those, ``+`` decodes to a space; a key holding a
literal ``+`` is sent as ``%2B``.  ``%XX`` decodes to any byte, ``%00`` and
``%FF`` included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server

# names, not http.X: twisted.web.http is a deprecation proxy whose every
# attribute lookup runs Python code, once per request on the hot path
from twisted.web.http import (
    BAD_GATEWAY,
    BAD_REQUEST,
    GATEWAY_TIMEOUT,
    INTERNAL_SERVER_ERROR,
    NOT_ALLOWED,
    NOT_FOUND,
    NOT_MODIFIED,
    OK,
    SERVICE_UNAVAILABLE,
    UNAUTHORIZED,
)
from twisted.web.resource import Resource
from xxhash import xxh3_128_hexdigest

from redisp.backing.connection import (
    Backing,
    BackingError,
    BackingInternalError,
    BackingTimeout,
    BackingUnavailable,
)
from redisp.clients import ClientSlots
from redisp.commands.auth import Authenticator
from redisp.config import Config
from redisp.core.cache import Cache
from redisp.core.reader import CachedReader, Lookup
from redisp.doors.http import TEXT, RedispSite, Request, compose
from redisp.metrics import Metrics

log = Logger()

OCTETS = b"application/octet-stream"
ALLOWED = b"GET, HEAD"
_READS = (b"GET", b"HEAD")
_OK_1_1 = b"HTTP/1.1 200 OK"
_NOT_MODIFIED_1_1 = b"HTTP/1.1 304 Not Modified"
#: the 401's challenge (SPEC §2)
CHALLENGE = b'WWW-Authenticate: Bearer realm="redisp"'


# bytes.__contains__ with a bytes operand first tries it as an integer and
# formats the TypeError it then discards (CPython 3.11); an int operand is a
# memchr.  The hot path asks ``ord(c) in text`` (bench/NOTES-perf.md, "w-http").
_AMPERSAND, _PLUS, _PERCENT = ord("&"), ord("+"), ord("%")


class BadKey(ValueError):
    """The query string names no usable key; ``str()`` is the one-line reason."""


def key_from_query(uri: bytes) -> bytes:
    """The bytes of the single ``key`` parameter in ``uri``'s query string.

    Raises BadKey when ``key`` is missing, empty or given twice; other
    parameters are ignored.  The common case, a query that is exactly
    ``key=...``, takes no loop.
    """
    query = uri.partition(b"?")[2]
    if query.startswith(b"key=") and _AMPERSAND not in query:
        raw = query[4:]
    else:
        found: bytes | None = None
        for field in query.split(b"&"):
            name, _, value = field.partition(b"=")
            if name != b"key" and _form_decode(name) != b"key":
                continue
            if found is not None:
                raise BadKey("key given more than once")
            found = value
        if found is None:
            raise BadKey("missing key parameter: use /get?key=...")
        raw = found
    key = _form_decode(raw) if _PLUS in raw or _PERCENT in raw else raw
    if not key:
        raise BadKey("empty key")
    return key


def _form_decode(text: bytes) -> bytes:
    """application/x-www-form-urlencoded decoding to bytes: '+' is a space, %XX any byte."""
    if _PLUS in text:
        text = text.replace(b"+", b" ")
    return unquote_to_bytes(text) if _PERCENT in text else text


def respond(
    request: server.Request,
    code: int,
    body: bytes,
    content_type: bytes | None = TEXT,
    x_cache: bytes | None = None,
    extra: list[bytes] | None = None,
) -> None:
    """Send a whole response with an exact Content-Length, then finish.

    ``extra``: more header lines (``Name: value``, or several joined by
    CRLF), after those twisted.web has set.  ``content_type`` None: a 304,
    which has neither content headers nor a body.  For HEAD the body is left
    out and Content-Length stays that of the GET answer.  redisp's own
    requests send it in one piece (``http_channel.Request.send``); any other
    IRequest (FrontDoor under a stock Site) the generic way.
    """
    if request.__class__ is Request:
        request.send(code, body, content_type, x_cache, extra)
        return
    request.setResponseCode(code)
    headers = request.responseHeaders
    for block in extra or ():
        for line in block.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            headers.addRawHeader(name, value)
    if content_type is not None:
        headers.setRawHeaders(b"Content-Type", [content_type])
        headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
    if x_cache is not None:
        headers.setRawHeaders(b"X-Cache", [x_cache])
    if content_type is not None:
        request.write(body)
    request.finish()


# -- HTTP caching (SPEC §2): what a cache or CDN in front of redisp may keep --------

#: for responses that must not be kept downstream: values redisp did not
#: cache, absent keys (a 404 may otherwise be cached heuristically), errors
NO_STORE = b"Cache-Control: no-store"


def etag(value: bytes) -> bytes:
    """The ETag of ``value``: a strong validator, the 128-bit XXH3 hash of
    its bytes in 32 hex digits, quoted (fast enough to hash every value
    served, large ones included: see bench/NOTES-perf.md, "Issue 10").
    The hex digest comes from xxhash itself, not from formatting the hash as
    an integer, which costs more than hashing a small value."""
    return b'"' + xxh3_128_hexdigest(value).encode() + b'"'


_CACHED = b"ETag: %s\r\nCache-Control: max-age=%d\r\nAge: %d"
_NOT_CACHED = b"ETag: %s\r\n" + NO_STORE


def validators(tag: bytes, lifetime: tuple[float, float] | None) -> bytes:
    """ETag, Cache-Control and Age of a 200 (or 304) for a value whose
    ``etag`` is ``tag``, as one block of header lines (one formatting, for
    the hit path's sake).

    ``lifetime``: (seconds since the entry was stored, seconds it has left),
    from ``Cache.lifetime``; None when the value is not in the cache
    (``capacity: 0``, over ``max_item_bytes``, tracking down, or dropped by
    an invalidation while it was fetched): then ``no-store``, so nothing
    downstream keeps what redisp itself would not.  Both are whole seconds,
    rounded down: a downstream cache never keeps a value longer than redisp.
    """
    if lifetime is None:
        return _NOT_CACHED % tag
    return _CACHED % (tag, lifetime[1], lifetime[0])


#: the plain-GET path's 200, whole, with a value's place (Date, ETag,
#: [max-age and Age,] Content-Length, body): what ``compose`` makes of
#: ``validators`` and the value (tests/test_web.py proves it, byte for byte),
#: in one formatting instead of a list, a loop and a join
_HIT_CACHED = (
    _OK_1_1 + b"\r\nDate: %s\r\n" + _CACHED
    + b"\r\nContent-Type: " + OCTETS + b"\r\nContent-Length: %d\r\nX-Cache: HIT\r\n\r\n%s")
_HIT_NOT_CACHED = (
    _OK_1_1 + b"\r\nDate: %s\r\n" + _NOT_CACHED
    + b"\r\nContent-Type: " + OCTETS + b"\r\nContent-Length: %d\r\nX-Cache: HIT\r\n\r\n%s")


def _never_cached(key: bytes) -> None:
    return None


def none_match(header: bytes, tag: bytes) -> bool:
    """True when an ``If-None-Match`` value matches ``tag``: ``*``, or any
    listed tag, weak (``W/``) or not (RFC 9110 13.1.2: weak comparison)."""
    for candidate in header.split(b","):
        candidate = candidate.strip()
        if candidate == b"*" or candidate.removeprefix(b"W/") == tag:
            return True
    return False


def _line(text: str, fallback: str) -> bytes:
    """One line of text for a response body: error texts come from outside."""
    text = " ".join(text.split()) or fallback
    return text.encode("utf-8", "replace") + b"\n"


class _Pending:
    """A request waiting on a Deferred, forgotten if its client goes away.

    Writing to (or finishing) a request whose connection was lost raises;
    ``request`` turns None as soon as twisted.web reports the loss, and the
    answer, when it comes, is dropped.  The work itself is not cancelled: a
    fetch is shared with other waiters and its result still fills the cache.
    """

    __slots__ = ("request",)

    def __init__(self, request: server.Request) -> None:
        self.request: server.Request | None = request
        request.notifyFinish().addErrback(self._gone)

    def _gone(self, reason: Failure) -> None:
        self.request = None


class FrontDoor(Resource):
    """The root, and only, resource: dispatches on the raw request path.

    ``isLeaf`` stops traversal if a stock ``server.Request`` ever renders it;
    redisp's own request class calls ``route`` directly.
    """

    isLeaf = True

    def __init__(
        self,
        reader: CachedReader,
        backing: Backing,
        metrics: Metrics,
        auth: Authenticator | None = None,
        cache: Cache | None = None,
    ) -> None:
        super().__init__()
        self._reader = reader
        self._backing = backing
        self._metrics = metrics
        #: who may ask (SPEC §8); by default anyone, from anywhere
        self.auth = auth or Authenticator.from_config(Config(protected_mode=False), metrics)
        #: (age, seconds left) of a cached key, for ``validators``; without a
        #: cache, every value is sent ``no-store``
        self._lifetime: Callable[[bytes], tuple[float, float] | None] = (
            cache.lifetime if cache is not None else _never_cached)
        self._routes: dict[bytes, Callable[[server.Request], None]] = {
            b"/get": self._get,
            b"/healthz": self._healthz,
            b"/metrics": self._metrics_page,
        }

    def count(self, outcome: str) -> None:
        """Count one HTTP request's outcome (for requests refused before routing)."""
        self._metrics.request("http", outcome)

    def render(self, request: server.Request) -> Any:
        """IResource entry point; overridden whole, so no method ever gets a 501."""
        self.route(request)
        return server.NOT_DONE_YET

    def route(self, request: server.Request) -> None:
        """Answer ``request``; anything unexpected becomes a logged 500, never a crash.

        With a password or users, every path but ``/healthz`` needs
        credentials (SPEC §8), whatever the path or method: a 401 says
        nothing about what exists.
        """
        handler = self._routes.get(request.path)
        try:
            if (
                self.auth.required
                and request.path != b"/healthz"
                and not self.auth.http_allows(request.getHeader(b"authorization"))
            ):
                self._metrics.request("http", "bad_request")
                respond(request, UNAUTHORIZED, b"authentication required\n", extra=[CHALLENGE])
            elif handler is None:
                respond(request, NOT_FOUND, b"not found\n")
            else:
                handler(request)
        except Exception:
            self._internal_error(Failure(), request)

    # /get

    def _get(self, request: server.Request) -> None:
        if request.method not in _READS:
            self._metrics.request("http", "bad_request")
            self._not_allowed(request)
            return
        try:
            key = key_from_query(request.uri)
        except BadKey as e:
            self._metrics.request("http", "bad_request")
            respond(request, BAD_REQUEST, str(e).encode() + b"\n")
            return
        try:
            lookup = self._reader.get(key)
        except Exception:
            self._metrics.request("http", "other")
            raise
        if isinstance(lookup, Deferred):
            pending = _Pending(request)
            lookup.addCallbacks(self._got, self._get_failed, (pending, key), None, (pending,))
            lookup.addErrback(self._late_error, pending)
        else:
            self._answer(lookup, request, key)

    def answer_plain(
        self,
        target: bytes,
        date: bytes,
        authorization: bytes | None = None,
        if_none_match: bytes | None = None,
        verified: bool = False,
    ) -> bytes | None:
        """The whole response to a plain GET of ``target`` if it is a cache
        hit answered at once (idle gate) with valid credentials (when any
        are needed), else None and nothing counted: the request then goes
        through twisted.web as usual (see http_channel._Channel), which answers and
        counts a 401.  ``verified``: ``authorization`` is the value this
        connection was last let in with (``http_channel._Channel``), checked already.  The
        same ``validators`` as ``_answer``, and ``compose``'s bytes (a 200
        from its template, ``_HIT_CACHED``): the two paths send the same
        bytes."""
        auth = self.auth
        if auth.required and not verified and not auth.http_allows(authorization, count=False):
            return None
        try:
            key = key_from_query(target)
        except BadKey:
            return None
        lookup = self._reader.read(key)
        if lookup is None:
            return None
        value = lookup[0]
        tag = etag(value)
        lifetime = self._lifetime(key)
        if if_none_match is not None and none_match(if_none_match, tag):
            response = compose(_NOT_MODIFIED_1_1, [b"Date: " + date, validators(tag, lifetime)],
                               None, b"", b"HIT", False)
        elif lifetime is None:
            response = _HIT_NOT_CACHED % (date, tag, len(value), value)
        else:
            response = _HIT_CACHED % (date, tag, lifetime[1], lifetime[0], len(value), value)
        self._metrics.request("http", "hit")
        return response

    def _answer(self, lookup: Lookup, request: server.Request | None, key: bytes) -> None:
        """Count the outcome, and send it unless the client has gone."""
        value, hit = lookup
        if value is None:
            self._metrics.request("http", "absent")
            if request is not None:
                respond(request, NOT_FOUND, b"not found\n", extra=[NO_STORE])
            return
        self._metrics.request("http", "hit" if hit else "miss")
        if request is None:
            return
        x_cache = b"HIT" if hit else b"MISS"
        tag = etag(value)
        headers = [validators(tag, self._lifetime(key))]
        if_none_match = request.requestHeaders.getRawHeaders(b"if-none-match")
        if if_none_match and none_match(b",".join(if_none_match), tag):
            respond(request, NOT_MODIFIED, b"", None, x_cache, headers)
        else:
            respond(request, OK, value, OCTETS, x_cache, headers)

    def _got(self, lookup: Lookup, pending: _Pending, key: bytes) -> None:
        self._answer(lookup, pending.request, key)

    def _get_failed(self, failure: Failure, pending: _Pending) -> None:
        error = failure.value
        if not isinstance(error, BackingError):
            self._metrics.request("http", "other")
            self._internal_error(failure, pending.request)
            return
        self._metrics.request("http", "backing_error")
        if pending.request is None:
            return
        if isinstance(error, BackingTimeout):
            code, fallback = GATEWAY_TIMEOUT, "backing redis timed out"
        elif isinstance(error, BackingUnavailable):
            code, fallback = SERVICE_UNAVAILABLE, "backing redis unavailable"
        elif isinstance(error, BackingInternalError):  # ours, logged where it happened
            code, fallback = INTERNAL_SERVER_ERROR, "internal error"
        else:  # BackingReplyError, or any other error Redis reported
            code, fallback = BAD_GATEWAY, "backing redis error"
        respond(pending.request, code, _line(str(error), fallback))

    def _late_error(self, failure: Failure, pending: _Pending) -> None:
        """A bug in answering a finished lookup: log it, answer 500 if still possible."""
        self._internal_error(failure, pending.request)

    # /healthz and /metrics

    def _healthz(self, request: server.Request) -> None:
        if request.method not in _READS:
            self._not_allowed(request)
            return
        pending = _Pending(request)
        d = maybeDeferred(self._backing.ping)
        d.addCallbacks(self._healthy, self._unhealthy, (pending,), None, (pending,))
        d.addErrback(self._late_error, pending)

    def _healthy(self, _: object, pending: _Pending) -> None:
        if pending.request is not None:
            state = self._metrics.invalidation_state()
            if state == "off":
                body = b"ok\n"
            elif state == "active":
                body = b"ok\ninvalidation: tracking active\n"
            else:  # correct answers still, straight from Redis: healthy, but say so
                body = b"ok\ninvalidation: tracking down, caching off until it is back\n"
            respond(pending.request, OK, body, extra=[NO_STORE])

    def _unhealthy(self, failure: Failure, pending: _Pending) -> None:
        if not failure.check(BackingError):
            log.failure("health check failed unexpectedly", failure)
        if pending.request is not None:
            reason = failure.getErrorMessage()
            respond(pending.request, SERVICE_UNAVAILABLE, _line(reason, "unhealthy"),
                    extra=[NO_STORE])

    def _metrics_page(self, request: server.Request) -> None:
        if request.method not in _READS:
            self._not_allowed(request)
            return
        respond(request, OK, self._metrics.exposition(), CONTENT_TYPE_LATEST.encode(),
                extra=[NO_STORE])

    # shared answers

    def _not_allowed(self, request: server.Request) -> None:
        request.responseHeaders.setRawHeaders(b"Allow", [ALLOWED])
        respond(request, NOT_ALLOWED, b"method not allowed: use GET or HEAD\n")

    def _internal_error(self, failure: Failure, request: server.Request | None) -> None:
        uri = request.uri if request is not None else b"(client gone)"
        log.failure("unexpected error answering {uri!r}", failure, uri=uri)
        if request is None or request.finished or getattr(request, "channel", None) is None:
            return
        if request.startedWriting:
            # headers are out: the only honest signal left is a cut connection
            request.channel.loseConnection()
            return
        request.responseHeaders.removeHeader(b"X-Cache")
        respond(request, INTERNAL_SERVER_ERROR, b"internal error\n")


def build_site(
    reader: CachedReader,
    backing: Backing,
    metrics: Metrics,
    slots: ClientSlots,
    config: Config,
    reactor: IReactorTime | None = None,
    auth: Authenticator | None = None,
    cache: Cache | None = None,
) -> RedispSite:
    """The HTTP front door of one proxy, ready to be listened on.

    ``backing`` needs only ``ping()``.  ``reactor`` drives idle timeouts and
    the Date header; when None, twisted.web falls back to the global reactor
    (this module never imports it).  ``auth``: by default, from ``config``.
    ``cache``: what the entries' ages are read from (without it every value
    is sent ``no-store``).
    """
    if auth is None:
        auth = Authenticator.from_config(config, metrics)
    return RedispSite(
        FrontDoor(reader, backing, metrics, auth, cache), slots, access_log=config.access_log,
        reactor=reactor,
        request_timeout=config.request_timeout, client_timeout=config.client_timeout,
        max_client_buffer=config.max_client_buffer,
    )


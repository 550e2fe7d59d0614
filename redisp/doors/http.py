"""The HTTP door's protocol half (SPEC §2, §9): bytes in, requests out,
responses back on the wire, and every limit on the way.

Split from doors/web.py (issue 12) along the line between what HTTP carries and
what a request means: this module knows connections, heads, timeouts,
client slots, backpressure and the wire format of a response, and nothing
of keys, the cache or credentials; doors/web.py knows those and nothing of
sockets.  It reaches the application only through ``Application`` (the
site's resource), so it imports nothing above the sending layer and doors/web.py
may build on it without a cycle.  The fast path's two halves stay each with
its general path: recognising a plain GET (``plain_get``) lives here beside
twisted.web's parser it stands in for; answering one (``answer_plain``)
lives in doors/web.py beside ``/get``, and both end in the one ``compose``.

Everything here is built for the hot path, a cache hit, to cost as little
Python as twisted.web allows.  What we cut from a stock ``Site`` and why:

* **No resource traversal.**  Three fixed paths need no tree: the request's
  raw ``path`` picks a handler from a dict.  ``Request.process`` normally
  splits and unquotes the path into ``postpath``, copies ``prepath``, walks
  ``getChildWithDefault`` and checks for an encoder; all of it is skipped.
* **No ``Server`` header, and ``Date`` formatted once a second** instead of
  on every request (it is a gmtime and a string format each time).
* **No access log** unless ``config.access_log``: the combined-log line is
  formatted and written for every request, a measurable cost.  Its
  once-a-second timestamp timer is not started either.
* **A plain ``HTTPChannel``** instead of the HTTP/2-switching proxy wrapper:
  HTTP/2 is negotiated only by TLS ALPN with the ``h2`` package, which redisp
  does not ship, and the wrapper adds an indirection on every packet.
* **No request bodies**: no endpoint reads one, so bodies are dropped as
  they arrive instead of being buffered in memory or spooled to a temporary
  file, and twisted.web never parses a POSTed form into ``args`` (every
  POST gets a 405 anyway).
* **No sessions or cookies**: nothing here calls ``getSession``.
* **Responses in one piece**: status line, headers and body composed by
  ``compose`` and written at once (``Request.send``, protocol/sending.py).
* **Plain GETs that hit skip the Request**: ``_Channel.dataReceived`` answers
  a whole ``GET /get?key=`` request with harmless headers, on an idle
  connection, from the cache, with the same ``compose``; anything else goes
  through twisted.web (see bench/NOTES-perf.md, "Miss path and HTTP door").
"""

from __future__ import annotations

import re
from math import inf
from typing import Protocol as Interface

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http import Request as HTTPRequest
from zope.interface import implementer

from redisp.clients import ClientSlots
from redisp.protocol.sending import buffered, can_send_now, send_now

log = Logger()


class Gatekeeper(Interface):
    """What the protocol asks of ``auth`` (``Authenticator``): whether a
    client's address is refused before it is served (protected mode)."""

    def refuses(self, addr: IAddress) -> bool: ...


class Application(Interface):
    """What the protocol needs of the site's resource (web.FrontDoor): the
    general path's entry, the fast path's, a counter for requests refused
    before they are routed, and the gatekeeper for new connections."""

    auth: Gatekeeper

    def route(self, request: server.Request) -> None: ...

    def answer_plain(
        self, target: bytes, date: bytes, authorization: bytes | None,
        if_none_match: bytes | None, verified: bool,
    ) -> bytes | None: ...

    def count(self, outcome: str) -> None: ...


#: the Content-Type of every text answer, the door's own and the application's
TEXT = b"text/plain; charset=utf-8"


def _closing_response(status: bytes, body: bytes) -> bytes:
    """A whole text/plain response after which the connection is closed."""
    return b"".join([
        b"HTTP/1.1 %s\r\n" % status,
        b"Content-Type: %s\r\n" % TEXT,
        b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n",
        b"\r\n",
        body,
    ])


#: what a client past ``max_clients`` reads before the connection closes
REFUSAL_BODY = b"max number of clients reached\n"
REFUSAL = _closing_response(b"503 Service Unavailable", REFUSAL_BODY)
#: what a client not on the loopback address gets in protected mode (SPEC §8)
FORBIDDEN = _closing_response(
    b"403 Forbidden",
    b"redisp is running in protected mode: no password and no users are set, so only "
    b"clients on the loopback address are served; set a password (REDISP_PASSWORD) or "
    b"protected_mode: no\n")
#: what a request line over ``HTTPChannel.MAX_LENGTH`` gets (SPEC §2)
URI_TOO_LONG = _closing_response(b"414 URI Too Long", b"request line too long\n")
#: what headers over ``maxHeaders`` or ``totalHeadersSize`` get
HEADERS_TOO_LARGE = _closing_response(
    b"431 Request Header Fields Too Large", b"request headers too large\n")
#: what the transport buffers before it asks its producer to pause
BUFFER_SIZE = FileDescriptor.bufferSize
#: seconds between two log lines about clients past ``max_client_buffer``
BUFFER_LOG_INTERVAL = 60.0


def compose(
    status: bytes,
    headers: list[bytes],
    content_type: bytes | None,
    body: bytes,
    x_cache: bytes | None,
    head: bool,
) -> bytes:
    """A whole HTTP/1.x response: ``status`` line, ``headers`` (``Name: value``
    each), then Content-Type, Content-Length, X-Cache and the body (left out
    for HEAD; ``content_type`` None, a 304: no content headers, no body).
    One function for both ways a response is sent, so they cannot differ by
    a byte."""
    parts = [status, b"\r\n"]
    for header in headers:
        parts += (header, b"\r\n")
    if content_type is not None:
        parts += (b"Content-Type: ", content_type, b"\r\nContent-Length: %d\r\n" % len(body))
    if x_cache is not None:
        parts += (b"X-Cache: ", x_cache, b"\r\n")
    parts.append(b"\r\n")
    if not head and content_type is not None:
        parts.append(body)
    return b"".join(parts)


#: headers that change nothing about a GET's answer (lower case); anything
#: else (a body, Expect, Connection: close, Upgrade ...) goes to twisted.web,
#: but for the two a plain GET may carry, Authorization and If-None-Match
_PLAIN_HEADERS = frozenset(
    [b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language"]
)
#: one header line of those, or ``Connection: keep-alive``: a line
#: ``plain_get``'s loop would pass over (names are ASCII-case-insensitive,
#: and the only blanks a value may hold are spaces and tabs)
_HARMLESS_LINE = (
    rb"(?:(?i:" + b"|".join(sorted(_PLAIN_HEADERS, reverse=True)) + rb"):[\t\x20-\x7e]*"
    rb"|(?i:connection):[\t ]*(?i:keep-alive)[\t ]*)\r\n"
)
#: one whole ``GET /get?... HTTP/1.1`` request, headers and all, nothing after
#: it: printable ASCII only, token header names, no folded lines.  Group 2:
#: the leading harmless lines (possessive: taken once, never given back, so
#: a head that fails costs one pass); group 3: the lines from the first other
#: one on, which ``plain_get`` reads one by one.  Most clients send only
#: harmless headers, and their requests take no Python loop at all.
_PLAIN_GET = re.compile(
    rb"GET (/get\?[\x21-\x7e]*) HTTP/1\.1\r\n"
    rb"((?:" + _HARMLESS_LINE + rb")*+)"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)


#: a plain GET is no longer than this, so it is within every limit on the
#: head that twisted.web checks (line length, headers' total size)
_PLAIN_MAX = min(HTTPChannel.MAX_LENGTH, HTTPChannel.totalHeadersSize)


def plain_get(data: bytes) -> tuple[bytes, bytes | None, bytes | None] | None:
    """``(target, authorization, if_none_match)`` if ``data`` is exactly one
    HTTP/1.1 GET of ``/get`` whose headers change nothing about the answer
    but for those two (each given once at most), and within every limit on
    the head, else None."""
    if len(data) > _PLAIN_MAX:
        return None
    match = _PLAIN_GET.fullmatch(data)
    if match is None:
        return None
    # header lines: all but the request line and the blank one
    if data.count(b"\n") - 2 > HTTPChannel.maxHeaders:
        return None
    rest = match[3]
    if not rest:
        return match[1], None, None
    authorization = if_none_match = None
    for line in rest.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _PLAIN_HEADERS:
            continue
        if name == b"authorization" and authorization is None:
            authorization = value.strip()
        elif name == b"if-none-match" and if_none_match is None:
            if_none_match = value.strip()
        elif name != b"connection" or value.strip().lower() != b"keep-alive":
            return None
    return match[1], authorization, if_none_match


class _DiscardedBody:
    """Where request bodies go: nowhere (see the module docstring).

    twisted.web asks the site for this file (``Site.getContentFile``).  It
    stays empty, so ``requestReceived`` sees a zero-length body and never
    parses it, whatever the headers claim.
    """

    def write(self, data: bytes) -> None:
        pass

    def read(self, size: int = -1) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


class Request(server.Request):
    """A Request that skips traversal and the per-request Server/Date work."""

    # server.Request.write adds a default Content-Type, fake-HEAD and encoder
    # support, none of which is used here: respond() sets every header itself.
    write = HTTPRequest.write

    def send(
        self,
        code: int,
        body: bytes,
        content_type: bytes | None,
        x_cache: bytes | None,
        extra: list[bytes] | None = None,
    ) -> None:
        """The whole response in one ``write``, then finish (see ``web.respond``).

        Status line, headers and body are composed here: ``http.Request.write``
        would set each header through the ``Headers`` object (name encoding
        and sanitising on every call), write headers and body separately, and
        check for chunking, cookies and ETags that never apply here.  The
        values are redisp's own constants, plus what twisted.web has set
        already (Date, Connection, Allow).  All or nothing: a failure while
        composing leaves nothing written, so a 500 can still follow (see
        bench/NOTES-perf.md, "Miss path and HTTP door").  It is sent at
        once when the socket's buffer is empty (protocol/sending.py).
        """
        self.setResponseCode(code)
        status = b"%s %d %s" % (self.clientproto, code, self.code_message)
        headers = [
            name + b": " + value
            for name, values in self.responseHeaders.getAllRawHeaders()
            for value in values
        ]
        if extra:
            headers += extra
        head = self.method == b"HEAD"
        response = compose(status, headers, content_type, body, x_cache, head)
        self.startedWriting = 1  # finish() must not write headers again
        if self.channel is not None:  # None once the connection is lost
            self.sentLength = len(body)
            self.channel.send(response)
        self.finish()

    def process(self) -> None:
        site: RedispSite = self.channel.site
        self.site = site
        self.responseHeaders.setRawHeaders(b"Date", [site.http_date()])
        site.resource.route(self)


@implementer(IHandshakeListener)
class _Channel(HTTPChannel):
    """An HTTP/1.x connection holding one of the shared client slots, with
    SPEC §9's limits: backpressure, ``max_client_buffer``, ``request_timeout``,
    ``client_timeout``, and 414/431 for heads too large.

    Timeouts use one timer per connection, re-armed lazily: it is set for the
    earliest deadline that applies and, when it fires, checks the times the
    connection noted (``_started``: the first byte of the request still being
    received; ``_active``: the last bytes in, or a response out) and either
    closes the connection or sets itself for the next deadline.  Requests
    only note a time; no timer is cancelled or moved per request, unlike
    twisted.web's idle timeout (``timeOut``, off here), which is also
    restarted by every byte, so trickling a request never ends it.
    """

    _slots: ClientSlots | None = None
    _host: IAddress | None = None
    direct = False  # responses may go straight to the socket (protocol/sending.py)
    #: when the request being received began (None: none is), time of the
    #: last activity, the timer, and unsent bytes at its last idle check
    _started: float | None = None
    _active = 0.0
    _timer: IDelayedCall | None = None
    _unsent_seen = 0
    #: max_client_buffer below the transport's own buffer size: check every
    #: response, not only once the transport has asked us to pause
    _eager = False
    _closed = False  # by _close: nothing more is parsed, answered or checked
    #: the Authorization value this connection's last plain GET was let in
    #: with: the same value again needs no second check (an equality with
    #: what this client itself sent, so its timing tells it nothing new)
    _authorized: bytes | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.direct = can_send_now(self.transport)
        # twisted.web asks for the local address on every request, and a TCP
        # transport answers with a getsockname system call each time
        # (strace -c under wrk: one per request); it never changes
        self._host = self.transport.getHost()
        site: RedispSite = self.site
        self._eager = site.max_client_buffer < BUFFER_SIZE
        now = self._active = site.reactor.seconds()
        if ISSLTransport.providedBy(self.transport):
            # the TLS handshake counts as a request: it must end in request_timeout
            self._started = now
        self._arm(now)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is over, in time."""
        if self._started is not None and not self._receiving():
            self._started = None

    def getHost(self) -> IAddress:
        host = self._host
        return host if host is not None else self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        """A plain GET that is a cache hit, arriving on an idle connection, is
        answered here without twisted.web's per-request machinery.

        That machinery (a Request with two Headers objects, line-by-line
        parsing, the query split into ``args``, producer pause and resume) is
        most of the cost of a hit (see bench/NOTES-perf.md, "Miss path and
        HTTP door").  Only a request that ``plain_get``
        accepts in full, on a connection with nothing buffered or in
        progress and not held back by backpressure, while the access log is
        off, and that the cache answers at once, takes this path; anything
        else, and every miss, goes through twisted.web unchanged.  The
        response bytes come from the same ``compose`` as twisted.web's path,
        and the same limits apply: a request that could exceed a size limit
        is not plain, and ``send`` checks ``max_client_buffer``.
        """
        site: RedispSite = self.site
        if (
            not self.requests
            and not self._buffer
            and self.line_mode
            and not self.paused
            and not site.access_log
        ):
            plain = plain_get(data)
            if plain is not None:
                authorization = plain[1]
                try:
                    response = site.resource.answer_plain(
                        plain[0], site.http_date(), authorization, plain[2],
                        authorization is not None and authorization == self._authorized)
                except Exception:
                    # a bug: twisted.web's path answers it again, logs it, sends a 500
                    response = None
                if response is not None:
                    self._authorized = authorization
                    self._active = site.now
                    self.send(response)
                    return
        now = self._active = site.reactor.seconds()
        super().dataReceived(data)
        if self._receiving():
            if self._started is None:
                self._started = now
                self._arm(now)
        else:
            self._started = None
        if self.paused and self._buffer:
            self._check_buffer()

    def _receiving(self) -> bool:
        """True while part of a request has come in and the rest is awaited
        from the client (not while one is being answered, nor while requests
        already read are held back by backpressure)."""
        return not self._handlingRequest and not self.paused and bool(
            self._buffer or self.requests)

    def allContentReceived(self) -> None:
        self._started = None  # the request is in: answering it is redisp's time
        super().allContentReceived()

    def requestDone(self, request: server.Request) -> None:
        # a response out is activity; what was read meanwhile is parsed
        # (dataReceived, through setLineMode) and may start the next request
        self._active = self.site.reactor.seconds()
        super().requestDone(request)

    # limits on the head (SPEC §2): 414 and 431 instead of a silent close

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse_head()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's 400 for every refusal: headers past ``maxHeaders``
        or ``totalHeadersSize`` (counted before it calls this) get a 431."""
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self._refuse_head()
        else:
            super()._respondToBadRequestAndDisconnect()

    def _refuse_head(self) -> None:
        """The request line (414) or the headers (431) are past a limit."""
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            response = URI_TOO_LONG
        else:
            response = HEADERS_TOO_LARGE
        self.site.resource.count("bad_request")
        self.transport.write(response)
        self._close("flush")

    # responses, backpressure and max_client_buffer (SPEC §9)

    def send(self, response: bytes) -> None:
        """A whole response, straight to the socket when it can take it."""
        transport = self.transport
        if self.direct:
            send_now(transport, response)
        else:
            transport.write(response)
        if self._waitingForTransport or self._eager:
            self._check_buffer()

    def _check_buffer(self) -> None:
        """Disconnect the client if its unsent responses and unparsed
        requests together pass ``max_client_buffer``, as Redis does past its
        buffer limits: the buffer would otherwise grow as long as it sends."""
        if self._closed:
            return
        size = (buffered(self.transport) + len(self._buffer)
                + sum(map(len, self._dataBuffer)))
        if size > self.site.max_client_buffer:
            self.site.buffer_limit_passed(self.transport.getPeer(), size)
            self._close("abort")

    def pauseProducing(self) -> None:
        """The transport's buffer is full: stop reading, and stop answering
        requests already read.

        twisted.web stops reading only between requests, so a request that
        fills the buffer while being answered (any hit) left reading on, and
        the requests of a client that never reads were answered into memory
        without end.  ``paused`` also stops the line parser between requests.
        """
        self.paused = True
        super().pauseProducing()
        if self._handlingRequest:
            self._networkProducer.pauseProducing()

    def resumeProducing(self) -> None:
        """The client has read: answer what it sent meanwhile, read again."""
        super().resumeProducing()  # reads again unless a request is being answered
        if self.paused and not self._closed:
            self.paused = False
            if self._buffer and not self._handlingRequest:
                self.dataReceived(b"")

    # timeouts (SPEC §9)

    def _arm(self, now: float) -> None:
        """Set the timer for the earliest deadline that applies, unless it
        is set to fire by then already."""
        site: RedispSite = self.site
        due = None
        if self._started is not None and site.request_timeout:
            due = self._started + site.request_timeout
        if site.client_timeout:
            idle = self._active + site.client_timeout
            due = idle if due is None else min(due, idle)
        if due is None:
            return
        timer = self._timer
        if timer is None:
            self._timer = self.callLater(max(0.0, due - now), self._expire)
        elif timer.getTime() > due:
            timer.reset(max(0.0, due - now))

    def _expire(self) -> None:
        self._timer = None
        site: RedispSite = self.site
        now = site.reactor.seconds()
        if (
            self._started is not None
            and site.request_timeout
            and now >= self._started + site.request_timeout
        ):
            self._close("timeout")
            return
        if site.client_timeout:
            if self._handlingRequest:
                self._active = now  # answering it is not the client being idle
            else:
                unsent = buffered(self.transport)
                if unsent and unsent != self._unsent_seen:
                    self._active = now  # the client is reading what it was sent
                self._unsent_seen = unsent
            if now >= self._active + site.client_timeout:
                self._close("timeout")
                return
        self._arm(now)

    def _close(self, how: str) -> None:
        """Stop parsing and answering, and close: ``flush`` sends what is
        written first (a 414 or 431), ``abort`` drops it (past
        ``max_client_buffer``), ``timeout`` drops it only if the client has
        left some of it unread, so a lingering close cannot hold the slot."""
        self.paused = self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.transport
        if how == "abort" or (how == "timeout" and buffered(transport)):
            transport.abortConnection()
        elif not transport.disconnecting:
            self.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connectionLost(reason)
        finally:
            slots, self._slots = self._slots, None  # released exactly once
            if slots is not None:
                slots.release()


class _Refusal(Protocol):
    """What a connection past ``max_clients`` gets: a 503, then the door shut.

    It answers at once rather than waiting for a request, so a refused client
    holds nothing here.  Like Redis's own refusal, this may race a client that
    is still sending, which can then see a reset instead of the 503.
    """

    def connectionMade(self) -> None:
        self.transport.write(REFUSAL)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass


class _Denied(Protocol):
    """Protected mode's answer to a client not on the loopback address: a
    403 once its request has come in, then the close (Redis's ``-DENIED``,
    in HTTP).  Answering the request, not the connect, lets the client read
    the 403 instead of a reset.  It holds no client slot; one that sends
    nothing is dropped after ``request_timeout`` (10 s when that is 0)."""

    def __init__(self, site: RedispSite) -> None:
        self._site = site
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._site.reactor.callLater(
            self._site.request_timeout or 10.0, self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is None:
            return
        self._timer.cancel()
        self._timer = None
        self._site.resource.count("bad_request")
        self.transport.write(FORBIDDEN)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class RedispSite(server.Site):
    """A Site with slot-capped connections, an optional access log and a cached Date."""

    protocol = _Channel
    requestFactory = Request

    def __init__(
        self,
        resource: Application,
        slots: ClientSlots,
        access_log: bool = False,
        reactor: IReactorTime | None = None,
        request_timeout: float = 0.0,
        client_timeout: float = 0.0,
        max_client_buffer: int = 1 << 30,
    ) -> None:
        # timeout=None: twisted.web's idle timer is replaced by _Channel's
        super().__init__(resource, reactor=reactor, timeout=None)
        self.resource: Application = resource
        self.slots = slots
        self.access_log = access_log
        self.request_timeout = request_timeout
        self.client_timeout = client_timeout
        self.max_client_buffer = max_client_buffer
        self._date_second = -1
        self._date = b""
        #: the time http_date() last read from the clock
        self.now = 0.0
        self._buffer_log_at = -inf
        self._buffer_cut = 0

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        """Admit the connection into a client slot, or refuse it with a 503,
        or (protected mode) a 403."""
        if not self.slots.acquire():
            return _Refusal()
        if self.resource.auth.refuses(addr):
            self.slots.release()
            return _Denied(self)
        try:
            channel = super().buildProtocol(addr)
        except BaseException:
            self.slots.release()
            raise
        channel._slots = self.slots
        return channel

    def getContentFile(self, length: int | None) -> _DiscardedBody:
        """twisted.web's hook for where a request body is stored: nowhere."""
        return _DiscardedBody()

    def http_date(self) -> bytes:
        """The Date header value, formatted again only when the second
        changes; the time read is kept in ``now`` for the caller."""
        now = self.now = self.reactor.seconds()
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            self._date = datetimeToString(second)
        return self._date

    def buffer_limit_passed(self, peer: IAddress, buffered: int) -> None:
        """Log a client cut off for ``max_client_buffer``: one line a minute
        at most, so clients cannot fill the log."""
        self._buffer_cut += 1
        now = self.reactor.seconds()
        if now - self._buffer_log_at < BUFFER_LOG_INTERVAL:
            return
        self._buffer_log_at = now
        log.warn(
            "HTTP client {peer} disconnected: {buffered} bytes buffered past max_client_buffer "
            "({limit}); {count} client(s) so since the last such line",
            peer=str(peer), buffered=buffered, limit=self.max_client_buffer,
            count=self._buffer_cut,
        )
        self._buffer_cut = 0

    def startFactory(self) -> None:
        """Open the access log (and its once-a-second timestamp timer) only if asked for."""
        if self.access_log:
            super().startFactory()

    def log(self, request: server.Request) -> None:
        """Called by twisted.web for every finished request: a no-op unless asked for."""
        if self.access_log:
            super().log(request)

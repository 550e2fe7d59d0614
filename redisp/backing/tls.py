"""TLS on both sides (SPEC §8): ``rediss://`` to the backing, client
certificates on ``ssl:`` listeners.

Built on Twisted's own TLS (pyOpenSSL underneath, the ``tls`` extra of
twisted): ``optionsForClientTLS`` checks the backing's certificate chain and
host name the way a browser does, ``CertificateOptions`` holds everything
else.  Files are read once, at start-up (``ClientTLS``,
``require_client_certificates``), so a missing or broken file stops start-up
with one line naming its key, and never shows up later as a connection error.

Why a handshake-gated endpoint (``TLSClientEndpoint``) rather than
``wrapClientTLS``: with ``wrapClientTLS`` a connection counts as made as
soon as TCP is up, and a certificate that fails to verify then shows up as a
bare "Lost connection" in the middle of AUTH, PING or a forwarded command,
after the connection was already reported up.  Here a connection is made
once the handshake is over, so a TLS failure is a failed attempt to
connect, with its reason, and the code that reports refused connections
(once, as "unavailable", with a backoff) reports it.  Waiting costs no
time: the TLS layer holds a command written earlier until the handshake is
over anyway.

What is never said: key material, or the contents of any file; errors name
the key and the path.
"""

from __future__ import annotations

import re
import socket
import ssl as stdlib_ssl
from dataclasses import replace
from typing import Any

from OpenSSL import SSL
from OpenSSL.crypto import FILETYPE_PEM
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, VerifyError
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from redisp.config import Config, ConfigError, RedisURL, check_tls_keys

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class ConnectFailure(ConnectError):
    """A backing connection that could not be had, for a reason of redisp's
    own (not the socket's); ``str()`` is that one-line reason, as it goes
    into replies and logs."""

    def __init__(self, reason: str) -> None:
        super().__init__(string=reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class TLSFailure(ConnectFailure):
    """A TLS handshake that did not complete."""


def describe(reason: Failure | BaseException, host: str | None = None) -> str | None:
    """One line saying why TLS failed, or None when ``reason`` is not about TLS.

    OpenSSL's own reason strings ("certificate verify failed", "tlsv13 alert
    certificate required", "wrong version number"), without the nested
    tuples pyOpenSSL wraps them in.
    """
    error = reason.value if isinstance(reason, Failure) else reason
    if isinstance(error, TLSFailure):
        return str(error)
    if isinstance(error, SSL.Error):
        entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
        texts = [str(e[-1]) for e in entries if isinstance(e, tuple) and e and e[-1]]
        return "TLS handshake failed: " + ("; ".join(dict.fromkeys(texts)) or "unknown error")
    if isinstance(error, VerificationError):
        name = f" {host!r}" if host else ""
        return f"TLS handshake failed: certificate verify failed (not valid for host{name})"
    return None


# -- files ------------------------------------------------------------------------------------

def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None


def read_certificates(path: str, key: str) -> list[Certificate]:
    """Every certificate in a PEM file (a CA bundle may hold several)."""
    blocks = _PEM_CERTIFICATE.findall(_read(path, key))
    if not blocks:
        raise ConfigError(f"{key}: {path} holds no PEM certificate")
    try:
        return [Certificate.loadPEM(block) for block in blocks]
    except Exception:  # pyOpenSSL's error names no file: ours does
        raise ConfigError(f"{key}: {path} holds a certificate that cannot be read") from None


def read_key_pair(cert_path: str, key_path: str, cert_key: str, key_key: str
                  ) -> dict[str, Any]:
    """A certificate and its private key, checked to belong together, as
    ``CertificateOptions`` arguments (``cryptography`` objects: pyOpenSSL's
    own are deprecated there)."""
    key = _read(key_path, key_key)
    if b"ENCRYPTED" in key:
        # OpenSSL would ask for the passphrase on the terminal, or fail obscurely
        raise ConfigError(f"{key_key}: {key_path} is encrypted; give redisp an unencrypted "
                          "key file readable only by its user")
    certificate = read_certificates(cert_path, cert_key)[0]
    try:
        key_pair = KeyPair.load(key, FILETYPE_PEM)
    except Exception:  # never echo what was in the file
        raise ConfigError(f"{key_key}: {key_path} holds no private key that can be read") \
            from None
    try:
        pair = PrivateCertificate.fromCertificateAndKeyPair(certificate, key_pair)
    except VerifyError:
        raise ConfigError(f"{key_key}: {key_path} is not the key of the certificate in "
                          f"{cert_path}") from None
    return {"certificate": pair.original.to_cryptography(),
            "privateKey": pair.privateKey.original.to_cryptography_key()}


# -- the backing side -------------------------------------------------------------------------

class ClientTLS:
    """redisp's side of TLS to a ``rediss://`` backing: the trusted CAs and
    the client certificate, read once; a connection creator per host name
    (the name is what the certificate must match)."""

    def __init__(self, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, verify: bool = True) -> None:
        if (cert is None) != (key is None):
            raise ConfigError("redis_tls_cert and redis_tls_key go together")
        self.ca = ca
        self.verify = verify
        self._ca_certificates = read_certificates(ca, "redis_tls_ca") if ca else None
        self._client = read_key_pair(cert, key, "redis_tls_cert", "redis_tls_key") \
            if cert and key else {}
        self._cert_path, self._key_path = cert, key
        self._creators: dict[str, Any] = {}

    def creator(self, host: str) -> Any:
        """The IOpenSSLClientConnectionCreator for connections to ``host``."""
        creator = self._creators.get(host)
        if creator is None:
            if self.verify:
                trust = trustRootFromCertificates(self._ca_certificates) \
                    if self._ca_certificates else platformTrust()
                creator = optionsForClientTLS(host, trust,
                                              extraCertificateOptions=self._client)
            else:  # neither the chain nor the host name: redis_tls_verify false
                creator = CertificateOptions(verify=False, **self._client)
            self._creators[host] = creator
        return creator

    def stdlib_context(self) -> stdlib_ssl.SSLContext:
        """The same settings for Python's ``ssl`` module, for the blocking
        probes made before the reactor runs (``tracking_support_problem``)."""
        context = stdlib_ssl.create_default_context(cafile=self.ca)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = stdlib_ssl.CERT_NONE
        if self._cert_path and self._key_path:
            context.load_cert_chain(self._cert_path, self._key_path)
        return context


def backing_url(config: Config) -> RedisURL:
    """``config.redis`` with its TLS files read and attached (``tls_client``),
    so every connection made from it speaks TLS as configured; unchanged for
    ``redis://``.  Raises ConfigError naming the key."""
    check_tls_keys(config)
    if not config.redis.tls:
        return config.redis
    client = ClientTLS(config.redis_tls_ca, config.redis_tls_cert, config.redis_tls_key,
                       config.redis_tls_verify)
    return replace(config.redis, tls_client=client)


def blocking_connection(url: RedisURL, timeout: float) -> socket.socket:
    """A blocking connection to ``url``, through TLS for ``rediss://``: the
    start-up checks, made before the reactor runs."""
    sock = socket.create_connection((url.host, url.port), timeout=timeout)
    if not url.tls:
        return sock
    client = url.tls_client if url.tls_client is not None else ClientTLS()
    try:
        return client.stdlib_context().wrap_socket(sock, server_hostname=url.host)
    except BaseException:
        sock.close()
        raise


def client_endpoint(reactor: Any, url: RedisURL, timeout: float) -> IStreamClientEndpoint:
    """The endpoint every backing connection to ``url`` is made through:
    TCP, and TLS for ``rediss://`` (``url.tls_client``, or the system's CAs
    when none was attached)."""
    from twisted.internet.endpoints import HostnameEndpoint

    endpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if not url.tls:
        return endpoint
    client = url.tls_client if url.tls_client is not None else ClientTLS()
    return TLSClientEndpoint(reactor, endpoint, client.creator(url.host), timeout, url.host)


def tcp_transport(transport: Any) -> Any:
    """The TCP transport under a TLS one (where socket options go), or ``transport``."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        return transport.transport
    return transport


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """TCP through ``endpoint``, then a TLS handshake; ``connect`` fires once
    the handshake is over (see the module docstring), or fails with a
    ``TLSFailure`` saying why.  The handshake has ``timeout`` seconds."""

    def __init__(self, reactor: Any, endpoint: IStreamClientEndpoint, creator: Any,
                 timeout: float, host: str) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self._creator = creator
        self._timeout = timeout
        self._host = host

    def connect(self, factory: Any) -> Deferred:
        attempt = _Handshake(factory, self._reactor, self._timeout, self._host)
        tls_factory = TLSMemoryBIOFactory(self._creator, True, OneProtocol(attempt),
                                          clock=self._reactor)
        attempt.tcp = self._endpoint.connect(tls_factory)
        attempt.tcp.addErrback(attempt.tcp_failed)
        return attempt.done


class OneProtocol(Factory):
    """Hands an endpoint one protocol made beforehand (the TLS layer its
    handshake watcher, a relay or probe connection its protocol):
    ``connectProtocol``'s factory without its "Starting factory" log line,
    which a pinned connection per client would log twice each."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """Stands in for the application's protocol until the handshake is over,
    then hands the TLS connection to it (``wrappedProtocol`` is the TLS
    layer's public attribute): the application sees a TLS connection that
    is up, and its ``connectionMade`` writes go out encrypted at once."""

    tcp: Deferred | None = None

    def __init__(self, factory: Any, reactor: Any, timeout: float, host: str) -> None:
        self._factory = factory
        self._reactor = reactor
        self._timeout = timeout
        self._host = host
        self._timer: Any = None
        self._why: str | None = None
        self.done: Deferred = Deferred(self._cancel)

    def connectionMade(self) -> None:  # TCP is up; the handshake starts
        self._timer = self._reactor.callLater(self._timeout, self._too_slow)

    def handshakeCompleted(self) -> None:
        self._stop_timer()
        tls = self.transport
        if self.done.called or tls.disconnecting:
            return  # refused on our side (host name): connectionLost says why
        protocol = self._factory.buildProtocol(tls.getPeer())
        if protocol is None:
            self._why = "refused by redisp's own factory"
            tls.abortConnection()
            return
        tls.wrappedProtocol = protocol
        protocol.makeConnection(tls)
        self.done.callback(protocol)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if not self.done.called:
            why = self._why or describe(reason, self._host) or \
                f"TLS handshake failed: {reason.getErrorMessage() or 'connection closed'}"
            self.done.errback(TLSFailure(why))

    def tcp_failed(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)

    def _too_slow(self) -> None:
        self._timer = None
        self._why = f"TLS handshake did not complete within {self._timeout:g}s"
        self.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self._why = "cancelled"
            self.transport.abortConnection()
        elif self.tcp is not None:
            self.tcp.cancel()


# -- the listener side ------------------------------------------------------------------------

def require_client_certificates(endpoint: Any, ca_path: str) -> None:
    """Make an ``ssl:`` listener accept only clients whose certificate the CA
    in ``ca_path`` signed (mutual TLS, ``tls_client_ca``).

    Twisted's ``ssl:`` endpoint string has no option for it, so this sets
    the documented attributes of the ``CertificateOptions`` that
    ``serverFromString`` built from the string (``verify``,
    ``requireCertificate``, ``trustRoot``): Twisted then builds the context
    itself, before the first connection, with everything else the string
    said (certificate, key, chain, DH parameters, method).  Reaching that
    object is the one private attribute read here; a Twisted without it
    stops start-up with a clear line, and tests cover it.
    """
    options = getattr(endpoint, "_sslContextFactory", None)
    if not isinstance(options, CertificateOptions):
        raise ConfigError("tls_client_ca: this Twisted's ssl: endpoint cannot be given a "
                          "client CA")
    options.trustRoot = trustRootFromCertificates(read_certificates(ca_path, "tls_client_ca"))
    options.verify = True
    options.requireCertificate = True

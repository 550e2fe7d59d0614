"""Throwaway TLS material and a redis-server speaking TLS, for the TLS tests.

Every key and certificate is made when the tests run, in a temporary
directory, with the ``cryptography`` package: none is ever committed.  EC
keys (P-256): quick to make, and every client here speaks them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import RedisServer, free_port, read_until, redis_server_binary


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class _Issuer:
    """A CA that signs certificates."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(common_name)
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, common_name: str, names: list[str], client: bool
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey,
               password: bytes | None = None) -> str:
    encryption = serialization.BestAvailableEncryption(password) if password else \
        serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8, encryption))
    os.chmod(path, 0o600)
    return str(path)


@dataclass(frozen=True)
class TLSFiles:
    """Paths of PEM files: one CA with a server and a client certificate,
    a server certificate for another host name, and a second CA (with a
    client certificate of its own) that nobody trusts."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    wrong_host_cert: str
    wrong_host_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str
    encrypted_key: str


def make_tls_files(directory: Path) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = _Issuer("redisp test CA"), _Issuer("redisp other CA")
    server, server_key = ca.issue("localhost", ["localhost", "127.0.0.1"], client=False)
    client, client_key = ca.issue("redisp-client", [], client=True)
    wrong, wrong_key = ca.issue("elsewhere.test", ["elsewhere.test"], client=False)
    stranger, stranger_key = other.issue("stranger", [], client=True)
    d = directory
    return TLSFiles(
        ca=_write_cert(d / "ca.pem", ca.cert),
        server_cert=_write_cert(d / "server.pem", server),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.pem", client),
        client_key=_write_key(d / "client.key", client_key),
        wrong_host_cert=_write_cert(d / "elsewhere.pem", wrong),
        wrong_host_key=_write_key(d / "elsewhere.key", wrong_key),
        other_ca=_write_cert(d / "other-ca.pem", other.cert),
        other_client_cert=_write_cert(d / "stranger.pem", stranger),
        other_client_key=_write_key(d / "stranger.key", stranger_key),
        encrypted_key=_write_key(d / "encrypted.key", client_key, password=b"secret"),
    )


class TLSRedisServer(RedisServer):
    """A redis-server that speaks only TLS, on ``tls_port``, with the
    certificate ``cert``/``key``; clients certificates checked against
    ``files.ca`` when ``auth_clients`` says (``optional``, ``yes`` or ``no``)."""

    def __init__(self, files: TLSFiles, auth_clients: str = "optional",
                 cert: str | None = None, key: str | None = None) -> None:
        super().__init__(free_port())
        self.files = files
        self.tls_port = self.port  # the only port it listens on
        self.tls_args = (
            "--port", "0", "--tls-port", str(self.tls_port),
            "--tls-cert-file", cert or files.server_cert,
            "--tls-key-file", key or files.server_key,
            "--tls-ca-cert-file", files.ca,
            "--tls-auth-clients", auth_clients,
        )

    def start(self) -> TLSRedisServer:
        """Start it; skips the test when this redis-server was built without
        TLS (Debian's has it: scripts/test installs that one)."""
        import pytest

        self.proc = subprocess.Popen(
            [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--logfile", "", "--loglevel", "notice", *self.tls_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            read_until(self.proc, b"Ready to accept connections")
        except RuntimeError as e:
            self.stop()
            text = str(e).lower()
            if "tls" in text and ("not supported" in text or "not built" in text
                                  or "failed to configure tls" in text):
                pytest.skip(f"this redis-server cannot serve TLS: {e}")
            raise
        return self

    def client(self, **kw):
        import redis

        f = self.files
        return redis.Redis(host="127.0.0.1", port=self.tls_port, protocol=2, ssl=True,
                           ssl_ca_certs=f.ca, ssl_certfile=f.client_cert,
                           ssl_keyfile=f.client_key, **kw)

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0"

"""backing/tls.py on its own: reading the files (one clear line naming the key, never
their contents), describing TLS failures in one line, and the endpoint whose
connection is made once the handshake is."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from redisp.backing.tls import (
    ClientTLS,
    TLSClientEndpoint,
    TLSFailure,
    backing_url,
    describe,
    read_certificates,
    tcp_transport,
)
from redisp.config import Config, ConfigError, parse_redis_url
from tests.support import free_port
from tests.tls_support import make_tls_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls-unit"))


# -- one line for every TLS failure --------------------------------------------------------


def test_openssl_errors_become_their_reason_strings():
    error = SSL.Error([("SSL routines", "", "certificate verify failed")])
    assert describe(Failure(error)) == "TLS handshake failed: certificate verify failed"
    repeated = SSL.Error([("SSL routines", "", "a"), ("SSL routines", "", "a"), ("x", "", "b")])
    assert describe(repeated) == "TLS handshake failed: a; b"


def test_a_host_name_mismatch_names_the_host():
    from service_identity import VerificationError

    assert describe(Failure(VerificationError(errors=[])), "db.internal") == (
        "TLS handshake failed: certificate verify failed (not valid for host 'db.internal')")


def test_other_failures_are_not_about_tls():
    assert describe(Failure(ConnectionRefusedError())) is None
    assert describe(Failure(ValueError("x"))) is None


def test_a_tls_failure_reads_as_its_reason():
    failure = Failure(TLSFailure("TLS handshake failed: wrong version number"))
    assert failure.getErrorMessage() == "TLS handshake failed: wrong version number"


# -- reading the files ---------------------------------------------------------------------


def test_a_ca_bundle_may_hold_several_certificates(files, tmp_path):
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(open(files.ca, "rb").read() + b"\n" + open(files.other_ca, "rb").read())
    assert len(read_certificates(str(bundle), "redis_tls_ca")) == 2


def test_an_unreadable_ca_file_is_named_with_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"redis_tls_ca: cannot read .*missing.pem"):
        ClientTLS(ca=str(tmp_path / "missing.pem"))


def test_a_file_without_certificates_is_refused_without_echoing_it(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("SECRET-LOOKING TEXT\n")
    with pytest.raises(ConfigError) as e:
        ClientTLS(ca=str(junk))
    assert "holds no PEM certificate" in str(e.value) and "SECRET" not in str(e.value)


def test_a_broken_key_is_named_never_shown(files, tmp_path):
    key = tmp_path / "broken.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nSECRETSECRET\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as e:
        ClientTLS(files.ca, files.client_cert, str(key))
    assert "redis_tls_key" in str(e.value) and "SECRET" not in str(e.value)


def test_an_encrypted_key_is_refused_rather_than_prompted_for(files):
    with pytest.raises(ConfigError, match="redis_tls_key: .* is encrypted"):
        ClientTLS(files.ca, files.client_cert, files.encrypted_key)


def test_a_key_that_is_not_the_certificates_is_refused(files):
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        ClientTLS(files.ca, files.client_cert, files.server_key)


def test_the_backing_url_carries_its_tls_files(files):
    plain = Config()
    assert backing_url(plain) is plain.redis
    config = Config(redis=parse_redis_url("rediss://db.internal:6390/0"), redis_tls_ca=files.ca,
                    redis_tls_cert=files.client_cert, redis_tls_key=files.client_key)
    url = backing_url(config)
    assert url.tls and isinstance(url.tls_client, ClientTLS)
    assert url == config.redis, "what is attached is not part of the URL's identity"
    assert files.client_key not in repr(url)
    creator = url.tls_client.creator("db.internal")
    assert url.tls_client.creator("db.internal") is creator, "built once per host name"


# -- the endpoint: connected once the handshake is -----------------------------------------


class _Pending:
    """A TCP endpoint whose connection attempt never completes, until cancelled."""

    def __init__(self) -> None:
        self.attempts: list[Deferred] = []

    def connect(self, factory):
        d = Deferred()
        self.attempts.append(d)
        return d


def test_cancelling_before_tcp_is_up_cancels_the_tcp_attempt(files):
    tcp = _Pending()
    creator = ClientTLS(files.ca).creator("localhost")
    endpoint = TLSClientEndpoint(Clock(), tcp, creator, 2.0, "localhost")
    d = endpoint.connect(Factory.forProtocol(Protocol))
    outcome: list = []
    d.addErrback(outcome.append)
    d.cancel()
    assert outcome and outcome[0].check(CancelledError)
    assert tcp.attempts[0].called


def test_a_tcp_failure_passes_through_unchanged(files):
    class Refusing:
        def connect(self, factory):
            from twisted.internet.defer import fail
            return fail(ConnectionRefusedError("Connection refused"))

    creator = ClientTLS(files.ca).creator("localhost")
    d = TLSClientEndpoint(Clock(), Refusing(), creator, 2.0, "localhost").connect(
        Factory.forProtocol(Protocol))
    outcome: list = []
    d.addErrback(outcome.append)
    assert outcome[0].check(ConnectionRefusedError)


def test_tcp_transport_of_a_plain_transport_is_itself():
    marker = object()
    assert tcp_transport(marker) is marker


def test_scripts_run_never_starts_a_plain_redis_for_a_rediss_backing(monkeypatch, tmp_path):
    """scripts/run starts a local redis-server where none answers: of no use
    behind rediss://, so the probe says there is one."""
    from redisp.probe import main

    monkeypatch.chdir(tmp_path)
    port = str(free_port())
    assert main(["--ping", "--redis", f"redis://127.0.0.1:{port}/0"]) == 1
    assert main(["--ping", "--redis", f"rediss://127.0.0.1:{port}/0"]) == 0

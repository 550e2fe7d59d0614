"""Authentication and permissions (SPEC §8, commands/auth.py) at the command layer:
AUTH, HELLO AUTH, NOAUTH and NOPERM in Redis's order, on a Session with no
transport.  The byte-for-byte comparison with a real redis-server is in
tests/test_auth_redis.py; the RESP door's fast paths in tests/test_auth_resp.py.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred

from redisp.commands.auth import (
    DENIED,
    HELLO_NOAUTH,
    NO_PASSWORD_CONFIGURED,
    NOAUTH,
    WRONGPASS,
    Authenticator,
)
from redisp.commands.dispatch import execute
from redisp.commands.session import Session
from redisp.config import Config, ConfigError, Secret, UserConfig, load_config
from redisp.metrics import Metrics
from redisp.protocol.frames import decode
from redisp.routing.command_table import CommandTable
from tests.raw_redis import COMMAND_REPLY_FILE
from tests.test_commands import FakeReader

PASSWORD = Secret("s3cret pass")
USERS = (UserConfig("reader", Secret("rpw"), "read"), UserConfig("writer", Secret("wpw"), "all"))
TABLE = CommandTable.from_command_reply(decode(COMMAND_REPLY_FILE.read_bytes()))


class FakeForwarder:
    """The backing's command table; records what would be forwarded."""

    def __init__(self, table: CommandTable | None = TABLE) -> None:
        self.table = table
        self.forwarded: list[list[bytes]] = []
        self.waiting: list = []

    def forward(self, session, argv):
        self.forwarded.append(argv)
        return b"+FORWARDED\r\n", "forwarded"

    def release(self, session):
        pass

    def _with_table(self, then):
        self.waiting.append(then)


def make(password=PASSWORD, users=USERS, forwarder: FakeForwarder | None = None,
         **settings) -> Session:
    clock = task.Clock()
    metrics = Metrics(started=0)
    config = Config(password=password, users=users, **settings)
    session = Session(1, FakeReader({b"k": b"v"}), metrics, config, clock)
    session.auth = Authenticator.from_config(config, metrics)
    session.auth.admit(session)
    session.forwarder = forwarder
    return session


def reply(session: Session, *argv: bytes) -> bytes:
    result = execute(session, list(argv))
    assert isinstance(result, tuple), result
    return result[0]


@pytest.fixture
def session() -> Session:
    return make(forwarder=FakeForwarder())


def noperm(name: bytes) -> bytes:
    return b"-NOPERM this user has no permissions to run the '" + name + b"' command\r\n"


# -- before AUTH: NOAUTH, after Redis's own errors ----------------------------------


@pytest.mark.parametrize("argv", [
    [b"GET", b"k"], [b"MGET", b"k"], [b"PING"], [b"ECHO", b"x"], [b"INFO"], [b"SELECT", b"1"],
    [b"CLIENT", b"SETNAME", b"n"], [b"CLIENT", b"KILL", b"ID", b"1"], [b"COMMAND"],
    [b"SET", b"k", b"v"], [b"SUBSCRIBE", b"c"], [b"MULTI"], [b"get", b"k"],
])
def test_every_command_but_four_needs_authentication(session, argv):
    assert reply(session, *argv) == NOAUTH
    assert session.forwarder.forwarded == []


def test_noauth_comes_after_redis_unknown_command_and_arity_errors(session):
    assert reply(session, b"FOO", b"x") == (
        b"-ERR unknown command 'FOO', with args beginning with: 'x' \r\n")
    assert reply(session, b"GET") == b"-ERR wrong number of arguments for 'get' command\r\n"
    assert reply(session, b"SET", b"k") == b"-ERR wrong number of arguments for 'set' command\r\n"
    assert reply(session, b"CLIENT", b"FOO") == (
        b"-ERR unknown subcommand 'FOO'. Try CLIENT HELP.\r\n")
    assert reply(session, b"CONFIG") == b"-ERR wrong number of arguments for 'config' command\r\n"


def test_redisp_own_client_subcommands_are_judged_by_redisp_table(session):
    """CLIENT SETINFO is Redis 7.2's: a 7.0 backing does not know it, redisp does."""
    assert reply(session, b"CLIENT", b"SETINFO", b"lib-name", b"x") == NOAUTH
    assert reply(session, b"CLIENT", b"SETNAME") == (
        b"-ERR wrong number of arguments for 'client|setname' command\r\n")
    reply(session, b"AUTH", b"reader", b"rpw")
    assert reply(session, b"CLIENT", b"SETINFO", b"lib-name", b"x") == b"+OK\r\n"
    alone = make(forwarder=None)
    assert reply(alone, b"CLIENT", b"FOO") == b"-ERR unknown subcommand 'FOO'. Try CLIENT HELP.\r\n"
    assert reply(alone, b"CLIENT", b"HELP") == NOAUTH
    reply(alone, b"AUTH", b"reader", b"rpw")
    assert reply(alone, b"CLIENT", b"HELP").startswith(b"*")


def test_without_the_backing_table_redisp_own_errors_come_first():
    session = make(forwarder=FakeForwarder(table=None))
    assert reply(session, b"GET") == b"-ERR wrong number of arguments for 'get' command\r\n"
    assert reply(session, b"FOO") == NOAUTH  # only the backing could say it is unknown
    alone = make(forwarder=None)
    assert reply(alone, b"FOO") == b"-ERR unknown command 'FOO', with args beginning with: \r\n"


def test_exec_is_refused_as_redis_refuses_it(session):
    assert reply(session, b"EXEC") == (
        b"-EXECABORT Transaction discarded because of: NOAUTH Authentication required.\r\n")
    assert reply(session, b"EXEC", b"x") == (b"-EXECABORT Transaction discarded because of: "
                                            b"wrong number of arguments for 'exec' command\r\n")


def test_quit_and_reset_need_no_authentication(session):
    assert reply(session, b"RESET") == b"+RESET\r\n"
    assert reply(session, b"QUIT") == b"+OK\r\n"
    assert session.closing


# -- AUTH ------------------------------------------------------------------------


def test_auth_with_the_password_is_the_default_user(session):
    assert reply(session, b"AUTH", b"wrong") == WRONGPASS
    assert reply(session, b"GET", b"k") == NOAUTH
    assert reply(session, b"AUTH", PASSWORD.encode()) == b"+OK\r\n"
    assert reply(session, b"GET", b"k") == b"$1\r\nv\r\n"
    assert reply(session, b"SET", b"k", b"v") == b"+FORWARDED\r\n"
    assert not session.restricted


def test_auth_default_password_and_named_users(session):
    assert reply(session, b"AUTH", b"default", PASSWORD.encode()) == b"+OK\r\n"
    assert reply(session, b"AUTH", b"writer", b"wpw") == b"+OK\r\n"
    assert session.user.name == b"writer"
    assert reply(session, b"AUTH", b"writer", b"rpw") == WRONGPASS
    assert reply(session, b"AUTH", b"nobody", b"wpw") == WRONGPASS


def test_a_failed_auth_keeps_the_user_the_connection_had(session):
    reply(session, b"AUTH", b"writer", b"wpw")
    assert reply(session, b"AUTH", b"writer", b"bad") == WRONGPASS
    assert session.user.name == b"writer"
    assert reply(session, b"GET", b"k") == b"$1\r\nv\r\n"


def test_auth_syntax_and_arity(session):
    assert reply(session, b"AUTH") == b"-ERR wrong number of arguments for 'auth' command\r\n"
    assert reply(session, b"AUTH", b"a", b"b", b"c") == b"-ERR syntax error\r\n"


def test_failures_are_counted_in_metrics_and_info(session):
    reply(session, b"AUTH", b"bad")
    reply(session, b"AUTH", b"nobody", b"x")
    reply(session, b"HELLO", b"3", b"AUTH", b"default", b"bad")
    reply(session, b"AUTH", PASSWORD.encode())
    assert session.metrics.auth_failures == 3
    assert b"redisp_auth_failures_total 3.0" in session.metrics.exposition()
    info = reply(session, b"INFO", b"proxy")
    assert b"\r\nauth_failures:3\r\n" in info


def test_users_without_a_password_leave_default_without_one():
    session = make(password=None, forwarder=FakeForwarder())
    assert reply(session, b"GET", b"k") == NOAUTH
    assert reply(session, b"AUTH", b"anything") == WRONGPASS
    assert reply(session, b"AUTH", b"default", b"") == WRONGPASS
    assert reply(session, b"AUTH", b"writer", b"wpw") == b"+OK\r\n"


def test_reset_forgets_the_authentication(session):
    reply(session, b"AUTH", PASSWORD.encode())
    assert reply(session, b"RESET") == b"+RESET\r\n"
    assert reply(session, b"GET", b"k") == NOAUTH


# -- no password, no users: as a Redis without requirepass -------------------------------


def test_without_passwords_auth_answers_as_redis_without_requirepass():
    session = make(password=None, users=(), forwarder=FakeForwarder())
    assert reply(session, b"GET", b"k") == b"$1\r\nv\r\n"
    assert reply(session, b"AUTH", b"x") == NO_PASSWORD_CONFIGURED
    assert NO_PASSWORD_CONFIGURED == (
        b"-ERR AUTH <password> called without any password configured for the default "
        b"user. Are you sure your configuration is correct?\r\n")
    assert reply(session, b"AUTH", b"default", b"x") == b"+OK\r\n"
    assert reply(session, b"AUTH", b"someone", b"x") == WRONGPASS
    assert not session.restricted


# -- HELLO ------------------------------------------------------------------------


def test_hello_needs_authentication_unless_it_brings_it(session):
    assert reply(session, b"HELLO", b"3") == HELLO_NOAUTH
    assert session.encoder.version == 2
    assert reply(session, b"HELLO", b"3", b"AUTH", b"default", b"bad") == WRONGPASS
    assert session.encoder.version == 2 and session.user is None
    answer = reply(session, b"HELLO", b"3", b"AUTH", b"writer", b"wpw")
    assert answer.startswith(b"%7\r\n") and session.encoder.version == 3
    assert session.user.name == b"writer"
    assert reply(session, b"HELLO") .startswith(b"%7\r\n")


def test_hello_options_take_effect_in_order_as_in_redis_7_0(session):
    """A SETNAME before a failing AUTH has happened already; an AUTH before
    a bad option has too (Redis 7.0's helloCommand)."""
    assert reply(session, b"HELLO", b"3", b"SETNAME", b"n", b"AUTH", b"writer", b"bad") == (
        WRONGPASS)
    assert session.name == b"n"
    assert reply(session, b"HELLO", b"3", b"AUTH", b"writer", b"wpw", b"BAD") == (
        b"-ERR Syntax error in HELLO option 'BAD'\r\n")
    assert session.user.name == b"writer" and session.encoder.version == 2


def test_hello_auth_default_without_passwords_is_accepted_as_by_redis():
    session = make(password=None, users=())
    assert reply(session, b"HELLO", b"3", b"AUTH", b"default", b"any").startswith(b"%7")
    assert reply(session, b"HELLO", b"3", b"AUTH", b"other", b"any") == WRONGPASS


# -- commands: read ------------------------------------------------------------------


@pytest.fixture
def reader_session() -> Session:
    session = make(forwarder=FakeForwarder())
    assert reply(session, b"AUTH", b"reader", b"rpw") == b"+OK\r\n"
    assert session.restricted
    return session


@pytest.mark.parametrize("argv", [
    [b"GET", b"k"], [b"MGET", b"k"], [b"PING"], [b"ECHO", b"x"], [b"CLIENT", b"GETNAME"],
    [b"CLIENT", b"ID"], [b"HELLO"], [b"COMMAND", b"COUNT"], [b"QUIT"],
])
def test_a_read_user_runs_what_redisp_answers(reader_session, argv):
    assert not reply(reader_session, *argv).startswith(b"-")


@pytest.mark.parametrize("argv", [
    [b"STRLEN", b"k"], [b"OBJECT", b"ENCODING", b"k"], [b"XREAD", b"STREAMS", b"s", b"0"],
    [b"EVAL_RO", b"return 1", b"0"], [b"SCAN", b"0"],
])
def test_a_read_user_may_forward_what_the_backing_flags_readonly(reader_session, argv):
    assert reply(reader_session, *argv) == b"+FORWARDED\r\n"


@pytest.mark.parametrize("argv, name", [
    ([b"SET", b"k", b"v"], b"set"), ([b"DEL", b"k"], b"del"), ([b"MULTI"], b"multi"),
    ([b"CLIENT", b"KILL", b"ID", b"9"], b"client|kill"), ([b"CONFIG", b"GET", b"x"], b"config|get"),
    ([b"EVAL", b"return 1", b"0"], b"eval"), ([b"FLUSHALL"], b"flushall"),
    ([b"SUBSCRIBE", b"c"], b"subscribe"), ([b"set", b"k", b"v"], b"set"),
])
def test_a_read_user_gets_noperm_for_anything_else(reader_session, argv, name):
    assert reply(reader_session, *argv) == noperm(name)
    assert reader_session.forwarder.forwarded == []


def test_a_read_user_gets_redis_errors_before_noperm(reader_session):
    assert reply(reader_session, b"SET", b"k") == (
        b"-ERR wrong number of arguments for 'set' command\r\n")
    assert reply(reader_session, b"EXEC") == (b"-EXECABORT Transaction discarded because of: "
                                             b"NOPERM this user has no permissions to run "
                                             b"the 'exec' command\r\n")


def test_a_read_user_waits_for_the_backing_table_to_be_judged():
    forwarder = FakeForwarder(table=None)
    session = make(forwarder=forwarder)
    reply(session, b"AUTH", b"reader", b"rpw")
    d = execute(session, [b"SET", b"k", b"v"])
    assert isinstance(d, Deferred) and len(forwarder.waiting) == 1
    forwarder.table = TABLE
    forwarder.waiting.pop()(TABLE)
    assert d.result == (noperm(b"set"), "bad_request")


def test_a_read_user_is_answered_the_backing_error_when_the_table_cannot_be_read():
    from redisp.backing.connection import BackingUnavailable

    forwarder = FakeForwarder(table=None)
    session = make(forwarder=forwarder)
    reply(session, b"AUTH", b"reader", b"rpw")
    d = execute(session, [b"STRLEN", b"k"])
    forwarder.waiting.pop()(BackingUnavailable("backing redis unavailable (refused)"))
    assert d.result == (b"-ERR backing redis unavailable (refused)\r\n", "backing_error")


def test_a_full_user_after_a_read_user_is_unrestricted(reader_session):
    reply(reader_session, b"AUTH", b"writer", b"wpw")
    assert reply(reader_session, b"SET", b"k", b"v") == b"+FORWARDED\r\n"


# -- the Authenticator -------------------------------------------------------------


def test_passwords_are_kept_and_compared_as_digests(monkeypatch):
    """Constant time: compare_digest on SHA-256 digests, for a wrong name too."""
    auth = Authenticator.from_config(Config(password=PASSWORD, users=USERS), Metrics(0))
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert auth.check(b"writer", b"wpw").name == b"writer"
    assert auth.check(b"nobody", b"wpw") is None
    assert auth.check(b"writer", b"w") is None
    assert len(compared) == 3
    assert all(len(a) == len(b) == 32 for a, b in compared)
    assert compared[0][0] == hashlib.sha256(b"wpw").digest()
    assert b"wpw" not in repr(vars(auth)).encode()


@pytest.mark.parametrize("peer, refused", [
    (IPv4Address("TCP", "127.0.0.1", 1), False),
    (IPv4Address("TCP", "127.0.0.2", 1), True),
    (IPv4Address("TCP", "10.1.2.3", 1), True),
    (IPv6Address("TCP", "::1", 1), False),
    (IPv6Address("TCP", "::ffff:127.0.0.1", 1), False),
    (IPv6Address("TCP", "fe80::1", 1), True),
    (UNIXAddress(b"/tmp/s"), False),
])
def test_protected_mode_lets_in_loopback_and_unix_clients_only(peer, refused):
    auth = Authenticator.from_config(Config(), Metrics(0))
    assert auth.protected
    assert auth.refuses(peer) is refused


@pytest.mark.parametrize("config", [
    Config(protected_mode=False), Config(password=PASSWORD), Config(users=USERS),
])
def test_protected_mode_is_off_when_turned_off_or_a_password_is_set(config):
    auth = Authenticator.from_config(config, Metrics(0))
    assert not auth.refuses(IPv4Address("TCP", "10.1.2.3", 1))


def test_the_denied_reply_is_redis_7_0s():
    assert DENIED.startswith(b"-DENIED Redis is running in protected mode because protected "
                             b"mode is enabled and no password is set for the default user.")
    assert DENIED.endswith(b"accepting connections from the outside.\r\n")
    assert DENIED.count(b"\r\n") == 1


@pytest.mark.parametrize("header, ok", [
    (b"Bearer s3cret pass", True),
    (b"bearer   s3cret pass ", True),
    (b"Bearer wrong", False),
    (b"Basic " + __import__("base64").b64encode(b"writer:wpw"), True),
    (b"Basic " + __import__("base64").b64encode(b"reader:rpw"), True),
    (b"Basic " + __import__("base64").b64encode(b"default:s3cret pass"), True),
    (b"Basic " + __import__("base64").b64encode(b"writer:rpw"), False),
    (b"Basic " + __import__("base64").b64encode(b"writer"), False),
    (b"Basic !!!notbase64", False),
    (b"Digest x", False),
    (None, False),
])
def test_http_credentials(header, ok):
    metrics = Metrics(0)
    auth = Authenticator.from_config(Config(password=PASSWORD, users=USERS), metrics)
    assert auth.http_allows(header) is ok
    assert metrics.auth_failures == (0 if ok or header is None else 1)


def test_http_needs_nothing_without_passwords():
    assert Authenticator.from_config(Config(), Metrics(0)).http_allows(None)


def test_describe_never_names_a_password():
    auth = Authenticator.from_config(Config(password=PASSWORD, users=USERS), Metrics(0))
    text = auth.describe()
    assert text == "clients must authenticate (password; users reader, writer)"
    assert Authenticator.from_config(Config(), Metrics(0)).describe() == (
        "no authentication, protected mode (loopback clients only)")


# -- configuration -----------------------------------------------------------------


def test_password_users_and_protected_mode_from_every_source(tmp_path):
    (tmp_path / "conf.yaml").write_text(
        "users:\n  alice: {password: 'a pw', commands: read}\n  bob: {password: b}\n"
        "protected_mode: no\n")
    config = load_config({"password": "cli"}, {"REDISP_PROTECTED_MODE": "yes"}, None,
                         cwd=str(tmp_path))
    assert config.password == "cli"
    assert config.users == (UserConfig("alice", "a pw", "read"), UserConfig("bob", "b", "all"))
    assert config.protected_mode is True
    assert load_config({}, {"REDISP_PASSWORD": "env"}, None, cwd=str(tmp_path)).password == "env"


def test_an_empty_password_is_none_as_redis_requirepass(tmp_path):
    assert load_config({}, {"REDISP_PASSWORD": ""}, None, cwd=str(tmp_path)).password is None
    (tmp_path / "conf.yaml").write_text("password: ''\n")
    assert load_config({}, {}, None, cwd=str(tmp_path)).password is None


def test_users_come_from_conf_yaml_only(tmp_path):
    config = load_config({}, {"REDISP_USERS": "alice"}, None, cwd=str(tmp_path))
    assert config.users == ()


@pytest.mark.parametrize("yaml_text, words", [
    ("password: 1234\n", "password: must be a string"),
    ("users: {alice: {password: ''}}\n", "user 'alice': password must be a non-empty"),
    ("users: {alice: {password: 1234}}\n", "user 'alice': password must be a non-empty"),
    ("users: [alice]\n", "users: must be a mapping"),
    ("users: {alice: pw}\n", "user 'alice' must be a mapping"),
    ("users: {alice: {commands: read}}\n", "user 'alice' has no password"),
    ("users: {alice: {password: x, commands: write}}\n", "commands must be 'all' or 'read'"),
    ("users: {alice: {password: x, cmds: read}}\n", "unknown key 'cmds'"),
    ("users: {'a b': {password: x}}\n", "user name 'a b'"),
    ("users: {'a:b': {password: x}}\n", "user name 'a:b'"),
    ("protected_mode: maybe\n", "protected_mode: must be true or false"),
    ("password: x\nusers: {default: {password: y}}\n", "'default' is the user"),
])
def test_bad_security_settings_name_the_key_and_never_the_password(tmp_path, yaml_text, words):
    (tmp_path / "conf.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config({}, {}, None, cwd=str(tmp_path))
    assert words in str(e.value)
    assert "1234" not in str(e.value)


def test_secrets_stay_out_of_reprs():
    from redisp.config import parse_redis_url

    config = replace(Config(password=Secret("topsecret"), users=(
        UserConfig("u", Secret("alsosecret")),)), redis=parse_redis_url("redis://:urlpw@h:1/0"))
    text = repr(config)
    for secret in ("topsecret", "alsosecret", "urlpw"):
        assert secret not in text
    assert Secret("x") == "x" and f"{Secret('x')}" == "x"


# -- passwords on the command line (SPEC §1) -----------------------------------------


def test_passwords_on_the_command_line_are_found_where_typed():
    from redisp.tap import Options, command_line_secrets

    options = Options()
    options.parseOptions(["--password", "p w", "--redis", "redis://u:b%40pw@h:1/0"])
    assert command_line_secrets(options) == {"--password": "p w", "--redis": "b%40pw"}
    options = Options()
    options.parseOptions(["--redis", "redis://h:1/0"])
    assert command_line_secrets(options) == {}
    options = Options()
    options.parseOptions(["--redis", "redis+sentinel://h/s", "--sentinel-password", "sp"])
    assert command_line_secrets(options) == {"--sentinel-password": "sp"}


def test_the_process_title_hides_them(monkeypatch):
    import sys

    from redisp.tap import hide_from_process_title

    titles: list[str] = []
    fake = type(sys)("setproctitle")
    fake.setproctitle = titles.append
    monkeypatch.setitem(sys.modules, "setproctitle", fake)
    argv = ["twistd", "redisp", "--password=s3", "--redis", "redis://:b%40pw@h/0"]
    assert hide_from_process_title(["s3", "b%40pw"], argv) == (
        "twistd redisp --password=*** --redis redis://:***@h/0")
    assert titles == ["twistd redisp --password=*** --redis redis://:***@h/0"]
    monkeypatch.setitem(sys.modules, "setproctitle", None)  # not installed
    assert hide_from_process_title(["s3"], argv) is None


# -- the container (SPEC §8: the image chooses explicitly) -------------------------------


def test_the_image_and_compose_choose_protected_mode_or_a_password_explicitly():
    """Clients reach a container through its network, never its loopback: the
    image turns protected mode off in so many words, and compose passes a
    password through (empty: none) and publishes on 127.0.0.1 only."""
    from pathlib import Path

    import yaml

    root = Path(__file__).parent.parent
    dockerfile = (root / "Dockerfile").read_text()
    assert "REDISP_PROTECTED_MODE=no" in dockerfile
    service = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["redisp"]
    assert service["environment"]["REDISP_PASSWORD"] == "${REDISP_PASSWORD:-}"
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    config = load_config({}, {"REDISP_PASSWORD": "", "REDISP_PROTECTED_MODE": "no"}, None,
                         cwd="/nonexistent")
    auth = Authenticator.from_config(config, Metrics(0))
    assert not auth.required and not auth.refuses(IPv4Address("TCP", "172.17.0.1", 1))

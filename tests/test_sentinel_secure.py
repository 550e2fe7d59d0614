"""The Sentinels' own password and TLS (SPEC §8 and §10): ``sentinel_password``
/ ``sentinel_user`` for Sentinels with ``requirepass``, and
``rediss+sentinel://`` for TLS to the Sentinels and the master alike.  Each
test starts its own small deployment (one data node, one Sentinel) on free
loopback ports; waits are for events or polls with a deadline."""

from __future__ import annotations

from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet import defer

from redisp.backing.sentinel import blocking_master
from redisp.backing.tls import backing_url
from redisp.config import Config, ConfigError, Secret, load_config, parse_redis_url
from redisp.core.tracking import tracking_support_problem
from tests.resp_client import connect
from tests.sentinel_support import PASSWORD, SERVICE, Node, Sentinel
from tests.support import proxy_config, until
from tests.test_sentinel import log_lines  # noqa: F401 (a fixture)
from tests.tls_support import TLSRedisServer, make_tls_files

inline = pytest_twisted.inlineCallbacks

SENTINEL_PW = "only-for-the-sentinels"


@pytest.fixture
def guarded(tmp_path):
    """A data node and a Sentinel with a password of its own."""
    node = Node().start()
    sentinel = Sentinel(str(tmp_path), node.port, quorum=1,
                        extra=f"requirepass {SENTINEL_PW}\n").start()
    yield node, sentinel
    sentinel.stop()
    node.stop()


def _url(sentinel: Sentinel, scheme: str = "redis+sentinel") -> str:
    return f"{scheme}://:{PASSWORD}@127.0.0.1:{sentinel.port}/{SERVICE}"


@defer.inlineCallbacks
def _set_then_get(p, node_client):
    client = yield connect(p.resp_port)
    assert (yield client.call(b"SET", b"k", b"through redisp")) == b"+OK\r\n"
    assert node_client.get(b"k") == b"through redisp"
    assert (yield client.call(b"GET", b"k")) == b"$14\r\nthrough redisp\r\n"
    yield client.close()


@inline
def test_sentinels_with_a_password_are_asked_with_sentinel_password(guarded, start_proxy,
                                                                    log_lines):  # noqa: F811
    node, sentinel = guarded
    p = start_proxy(_url(sentinel), sentinel_password=Secret(SENTINEL_PW))
    yield until(lambda: p.proxy.backing.up)
    yield _set_then_get(p, node.client())
    client = yield connect(p.resp_port)
    text = yield client.call(b"INFO")
    yield client.close()
    assert SENTINEL_PW.encode() not in text and PASSWORD.encode() not in text
    assert not [line for line in log_lines if SENTINEL_PW in line or PASSWORD in line]


@inline
def test_without_the_sentinels_password_redisp_says_why_it_has_no_master(
        guarded, start_proxy, log_lines):  # noqa: F811
    node, sentinel = guarded
    for password in (None, Secret("wrong")):
        p = start_proxy(_url(sentinel), sentinel_password=password)
        client = yield connect(p.resp_port)
        reply = yield client.call(b"GET", b"k")
        yield client.close()
        assert reply.startswith(b"-ERR backing redis unavailable (no master ")
        expected = b"NOAUTH" if password is None else b"WRONGPASS"
        assert expected in reply, reply
        assert b"wrong" not in reply
    assert not [line for line in log_lines if "wrong" in line.split("WRONGPASS")[0]]


@inline
def test_a_sentinel_user_is_authenticated_as_that_user(guarded, start_proxy):
    node, sentinel = guarded
    admin = sentinel.client(password=SENTINEL_PW)
    admin.execute_command("ACL", "SETUSER", "watcher", "on", ">watcher-pw", "+@all")
    p = start_proxy(_url(sentinel), sentinel_user="watcher",
                       sentinel_password=Secret("watcher-pw"))
    yield until(lambda: p.proxy.backing.up)
    yield _set_then_get(p, node.client())


@pytest.fixture
def tls_deployment(tmp_path):
    """A TLS-only data node (password set) and a TLS-only Sentinel with a
    password, speaking TLS to the node."""
    files = make_tls_files(tmp_path / "tls")
    node = TLSRedisServer(files)
    node.tls_args += ("--requirepass", PASSWORD)
    node.start()
    sentinel = Sentinel(str(tmp_path), node.tls_port, quorum=1, tls_files=files,
                        extra=f"requirepass {SENTINEL_PW}\n").start()
    yield files, node, sentinel
    sentinel.stop()
    node.stop()


@inline
def test_rediss_sentinel_speaks_tls_to_the_sentinels_and_the_master(tls_deployment,
                                                                   start_proxy):
    files, node, sentinel = tls_deployment
    p = start_proxy(_url(sentinel, "rediss+sentinel"), sentinel_password=Secret(SENTINEL_PW),
                       redis_tls_ca=files.ca, redis_tls_cert=files.client_cert,
                       redis_tls_key=files.client_key)
    yield until(lambda: p.proxy.backing.up)
    yield _set_then_get(p, node.client(password=PASSWORD))
    assert p.proxy.config.redis.redacted().startswith("rediss+sentinel://:***@")


@inline
def test_plain_redis_sentinel_to_a_tls_sentinel_fails_clearly(tls_deployment, start_proxy):
    files, node, sentinel = tls_deployment
    p = start_proxy(_url(sentinel), sentinel_password=Secret(SENTINEL_PW))
    client = yield connect(p.resp_port)
    reply = yield client.call(b"GET", b"k")
    yield client.close()
    assert reply.startswith(b"-ERR backing redis unavailable (no master "), reply


# -- configuration -----------------------------------------------------------------------


def test_the_sentinel_keys_are_attached_to_the_url_and_kept_out_of_reprs():
    config = load_config({}, {"REDISP_REDIS": "redis+sentinel://:m@h:26379/svc",
                              "REDISP_SENTINEL_USER": "watcher",
                              "REDISP_SENTINEL_PASSWORD": "s"})
    assert (config.redis.sentinel_username, config.redis.sentinel_password) == ("watcher", "s")
    sentinel = config.redis.sentinel_at("h", 26380)
    assert sentinel.auth_command() == (b"AUTH", b"watcher", b"s")
    assert (sentinel.db, sentinel.kind, sentinel.port) == (0, "server", 26380)
    master = config.redis.at("m", 6379)
    assert master.auth_command() == (b"AUTH", b"m") and master.sentinel_password is None
    assert "'s'" not in repr(config) and "s'" not in repr(config.redis)
    assert load_config({}, {"REDISP_REDIS": "rediss+sentinel://h/svc"}).redis.tls


@pytest.mark.parametrize("env, message", [
    ({"REDISP_SENTINEL_PASSWORD": "s"}, "sentinel_password is set but the backing URL is not "
                                        "redis+sentinel://"),
    ({"REDISP_REDIS": "redis+sentinel://h/svc", "REDISP_SENTINEL_USER": "u"},
     "sentinel_user is set but sentinel_password is not"),
    ({"REDISP_REDIS": "redis+sentinel://h/svc", "REDISP_SENTINEL_USER": "a b",
      "REDISP_SENTINEL_PASSWORD": "s"}, "REDISP_SENTINEL_USER: must be a user name"),
])
def test_bad_sentinel_keys_get_one_line_naming_them(env, message):
    with pytest.raises(ConfigError) as e:
        load_config({}, env)
    assert str(e.value).startswith(message) and "'s'" not in str(e.value)


def test_an_empty_sentinel_password_is_none_as_for_password():
    config = load_config({}, {"REDISP_REDIS": "redis+sentinel://h/svc",
                              "REDISP_SENTINEL_PASSWORD": ""})
    assert config.redis.sentinel_password is None
    assert config.redis.sentinel_at("h", 1).auth_command() is None


def _config_url(url: str, **keys):
    return proxy_config(url, **keys).redis


def test_the_start_up_check_asks_the_sentinels_with_their_password(guarded):
    node, sentinel = guarded
    url = _config_url(_url(sentinel), sentinel_password=Secret(SENTINEL_PW))
    assert blocking_master(url, 2.0) == ("127.0.0.1", node.port)
    assert blocking_master(_config_url(_url(sentinel)), 2.0) is None  # NOAUTH
    assert tracking_support_problem(url, 2.0) is None


def test_the_start_up_check_speaks_tls_to_a_tls_sentinel(tls_deployment):
    files, node, sentinel = tls_deployment
    config = proxy_config(
        _url(sentinel, "rediss+sentinel"), sentinel_password=Secret(SENTINEL_PW),
        redis_tls_ca=files.ca, redis_tls_cert=files.client_cert, redis_tls_key=files.client_key)
    url = backing_url(config)  # the TLS files read, as build_proxy reads them
    assert blocking_master(url, 2.0) == ("127.0.0.1", node.tls_port)
    assert tracking_support_problem(url, 2.0) is None


def test_a_config_built_directly_carries_the_sentinel_keys_on_its_url_through_replace():
    url = parse_redis_url("redis+sentinel://:m@h:26379/svc")
    config = Config(redis=url, sentinel_password=Secret("s"))
    assert config.redis.sentinel_password == "s"
    moved = replace(config, redis=replace(url, host="h2"))  # a URL without them
    assert moved.redis.host == "h2" and moved.redis.sentinel_password == "s"
    with pytest.raises(ConfigError, match="sentinel_password is set but the backing URL"):
        Config(redis=parse_redis_url("redis://h/0"), sentinel_password=Secret("s"))

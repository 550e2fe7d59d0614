"""load_config: precedence, types, ranges, and one clear line for every mistake."""

import pytest

from redisp.config import Config, ConfigError, RedisURL, load_config, parse_redis_url


def load(cli=None, env=None, yaml_text=None, tmp_path=None, **kw):
    path = None
    if yaml_text is not None:
        path = tmp_path / "conf.yaml"
        path.write_text(yaml_text)
        path = str(path)
    return load_config(cli or {}, env or {}, path, cwd=str(tmp_path or "/nonexistent"), **kw)


def test_defaults_match_the_spec(tmp_path):
    c = load(tmp_path=tmp_path)
    assert c == Config()
    assert (c.http, c.resp) == ("tcp:9997:interface=127.0.0.1", "tcp:6380:interface=127.0.0.1")
    assert c.redis == RedisURL("127.0.0.1", 6379, 0)
    assert (c.redis_timeout, c.ttl, c.capacity, c.concurrency, c.max_clients) == (
        2.0, 60.0, 10000, 1, 10000)
    assert c.invalidation == "off"
    assert (c.max_item_bytes, c.client_timeout, c.request_timeout) == (1048576, 0.0, 10.0)
    assert (c.max_bulk_bytes, c.max_args, c.max_inline_bytes, c.max_client_buffer) == (
        536870912, 1048576, 65536, 1073741824)


def test_command_line_beats_environment_beats_file(tmp_path):
    yaml_text = "ttl: 5\ncapacity: 7\nconcurrency: 3\n"
    c = load({"ttl": "1"}, {"REDISP_TTL": "2", "REDISP_CAPACITY": "8"}, yaml_text, tmp_path)
    assert (c.ttl, c.capacity, c.concurrency) == (1.0, 8, 3)


def test_conf_yaml_in_the_working_directory_is_read_by_default(tmp_path):
    (tmp_path / "conf.yaml").write_text("capacity: 12\n")
    assert load_config({}, {}, None, cwd=str(tmp_path)).capacity == 12


def test_redisp_config_names_the_file(tmp_path):
    (tmp_path / "other.yaml").write_text("capacity: 13\n")
    env = {"REDISP_CONFIG": str(tmp_path / "other.yaml")}
    assert load_config({}, env, None, cwd=str(tmp_path)).capacity == 13


def test_the_shipped_conf_yaml_holds_the_defaults():
    import pathlib

    shipped = pathlib.Path(__file__).parent.parent / "conf.yaml"
    assert load_config({}, {}, str(shipped)) == Config()


def test_none_disables_a_listener(tmp_path):
    c = load({"http": "none"}, {"REDISP_RESP": "None"}, tmp_path=tmp_path)
    assert c.http is None and c.resp is None


@pytest.mark.parametrize("yaml_text, words", [
    ("capacty: 5\n", ["unknown key", "capacty"]),
    ("capacity: -1\n", ["capacity", ">= 0"]),
    ("capacity: 1.5\n", ["capacity", "integer"]),
    ("capacity: true\n", ["capacity", "integer"]),
    ("capacity: lots\n", ["capacity", "integer"]),
    ("ttl: 0\n", ["ttl", "> 0"]),
    ("ttl: .nan\n", ["ttl", "finite"]),
    ("concurrency: 0\n", ["concurrency", ">= 1"]),
    ("max_clients: 0\n", ["max_clients", ">= 1"]),
    ("redis_timeout: -2\n", ["redis_timeout", "> 0"]),
    ("invalidation: sometimes\n", ["invalidation", "'off' or 'tracking'"]),
    ("redis: http://x\n", ["redis", "redis://"]),
    ("redis: 'redis://h/abc'\n", ["redis", "database"]),
    ("redis: 5\n", ["redis", "URL"]),
    ("http: ''\n", ["http", "endpoint"]),
    ("access_log: maybe\n", ["access_log", "true or false"]),
    ("- a\n- b\n", ["mapping"]),
    ("ttl: [1\n", ["not valid YAML", "line"]),
])
def test_bad_file_values_name_the_key(tmp_path, yaml_text, words):
    with pytest.raises(ConfigError) as e:
        load(yaml_text=yaml_text, tmp_path=tmp_path)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_values_name_their_source(tmp_path):
    with pytest.raises(ConfigError, match="^--capacity: "):
        load({"capacity": "x"}, tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="^REDISP_TTL: "):
        load(env={"REDISP_TTL": "-1"}, tmp_path=tmp_path)


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config({}, {}, str(tmp_path / "missing.yaml"))


def test_empty_file_means_defaults(tmp_path):
    assert load(yaml_text="", tmp_path=tmp_path) == Config()


def test_redis_url_parts():
    assert parse_redis_url("redis://:s%40cret@example:6390/3") == RedisURL(
        "example", 6390, 3, None, "s@cret")
    assert parse_redis_url("redis://user:pw@h") == RedisURL("h", 6379, 0, "user", "pw")
    url = parse_redis_url("redis://:secret@h:1/2")
    assert "secret" not in url.redacted() and url.redacted() == "redis://:***@h:1/2"


def test_rediss_url_means_tls_and_says_so_when_logged():
    url = parse_redis_url("rediss://:pw@h:6390/2")
    assert (url.host, url.port, url.db, url.password, url.tls) == ("h", 6390, 2, "pw", True)
    assert url.redacted() == "rediss://:***@h:6390/2"
    assert parse_redis_url("redis://h").tls is False


def test_tls_keys_from_every_source(tmp_path):
    c = load({"redis": "rediss://h:1/0", "redis_tls_ca": "/ca.pem"},
             {"REDISP_REDIS_TLS_VERIFY": "false"},
             "redis_tls_cert: /c.pem\nredis_tls_key: /k.pem\ntls_client_ca: /client-ca.pem\n",
             tmp_path)
    assert (c.redis_tls_ca, c.redis_tls_cert, c.redis_tls_key) == ("/ca.pem", "/c.pem", "/k.pem")
    assert (c.redis_tls_verify, c.tls_client_ca) == (False, "/client-ca.pem")
    d = load()
    assert (d.redis_tls_ca, d.redis_tls_verify, d.tls_client_ca) == (None, True, None)


@pytest.mark.parametrize("cli, key", [
    ({"redis_tls_ca": "/ca.pem"}, "redis_tls_ca"),
    ({"redis_tls_cert": "/c.pem", "redis_tls_key": "/k.pem"}, "redis_tls_cert"),
    ({"redis_tls_verify": "no"}, "redis_tls_verify"),
])
def test_backing_tls_keys_without_rediss_stop_start_up(cli, key):
    """No silent plain-text connection where the operator asked for TLS settings."""
    with pytest.raises(ConfigError, match=f"{key} is set but the backing URL is redis://"):
        load(cli)


def test_client_certificate_needs_its_key():
    with pytest.raises(ConfigError, match="redis_tls_cert is set but redis_tls_key is not"):
        load({"redis": "rediss://h", "redis_tls_cert": "/c.pem"})
    with pytest.raises(ConfigError, match="redis_tls_key is set but redis_tls_cert is not"):
        load({"redis": "rediss://h", "redis_tls_key": "/k.pem"})


def test_tls_file_keys_refuse_non_strings(tmp_path):
    with pytest.raises(ConfigError, match="tls_client_ca: must be a file name"):
        load(yaml_text="tls_client_ca: [a]\n", tmp_path=tmp_path)


def test_booleans_from_strings(tmp_path):
    assert load({"access_log": "yes"}, tmp_path=tmp_path).access_log is True
    assert load(env={"REDISP_ACCESS_LOG": "false"}, tmp_path=tmp_path).access_log is False


def test_sentinel_and_cluster_urls() -> None:
    url = parse_redis_url("redis+sentinel://:pw@a:26379,b:26380/mymaster/2")
    assert (url.kind, url.seeds, url.service, url.db) == (
        "sentinel", (("a", 26379), ("b", 26380)), "mymaster", 2)
    assert url.redacted() == "redis+sentinel://:***@a:26379,b:26380/mymaster/2"
    node = url.at("10.0.0.5", 6380)
    assert (node.kind, node.host, node.port, node.db, node.password) == (
        "server", "10.0.0.5", 6380, 2, "pw")
    cluster = parse_redis_url("redis+cluster://u:p@h1:7000,h2")
    assert (cluster.kind, cluster.seeds, cluster.username) == (
        "cluster", (("h1", 7000), ("h2", 6379)), "u")
    assert "p@" not in cluster.redacted()


@pytest.mark.parametrize("text, words", [
    ("redis+sentinel://a:1", "service name"),
    ("redis+cluster://a/1", "database 0"),
    ("redis://a,b", "one server"),
    ("redis+x://a", "must look like"),
    ("redis://a:1/2/3", "unexpected path"),
    ("redis+cluster://a:bad", "bad host:port"),
])
def test_bad_deployment_urls(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_redis_url(text)

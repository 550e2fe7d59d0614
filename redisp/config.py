"""Configuration: one frozen Config, built by one pure function.

``load_config`` applies the precedence of SPEC §1 (command line > environment
> conf.yaml > defaults) and refuses anything it does not understand with a
``ConfigError`` that names the key or file, so start-up can stop with one
clear line instead of a traceback or a silently ignored typo.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml


class ConfigError(Exception):
    """A configuration value or file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class RedisURL:
    """Where the backing Redis is, parsed once so nobody re-parses a URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr or traceback
    #: ``rediss://``: every connection to this Redis speaks TLS (backing/tls.py)
    tls: bool = False
    #: ``server`` (redis://, rediss://), ``sentinel`` (redis+sentinel://:
    #: ``host``/``port`` are the first Sentinel, the master is asked of them)
    #: or ``cluster`` (redis+cluster://: ``host``/``port`` are the first seed)
    kind: str = "server"
    #: every host:port of the URL, in order (Sentinels, or cluster seeds;
    #: for a server, just its own)
    seeds: tuple[tuple[str, int], ...] = ()
    #: the Sentinel service (master) name of redis+sentinel://
    service: str | None = None
    #: what redisp authenticates to the Sentinels themselves with (the
    #: ``sentinel_user`` / ``sentinel_password`` keys; the URL's credentials
    #: are the master's): attached by ``Config``
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    #: the files of the ``redis_tls_*`` keys, read once (``redisp.backing.tls.ClientTLS``),
    #: attached by ``build_proxy`` so that every connection made from this
    #: URL, or from a copy of it for another host, gets them; None: the
    #: system's CAs, verified
    tls_client: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.seeds:
            object.__setattr__(self, "seeds", ((self.host, self.port),))

    def auth_command(self) -> tuple[bytes, ...] | None:
        """The AUTH command every connection to this Redis starts with, if any."""
        if self.password is None:
            return None
        user = (self.username.encode(),) if self.username else ()
        return (b"AUTH", *user, self.password.encode())

    def redacted(self) -> str:
        """The URL as it may be logged: never with the password."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:***@"
        if self.kind == "server":
            scheme = "rediss" if self.tls else "redis"
            return f"{scheme}://{auth}{self.host}:{self.port}/{self.db}"
        hosts = ",".join(f"{host}:{port}" for host, port in self.seeds)
        scheme = ("rediss+" if self.tls else "redis+") + self.kind
        if self.kind == "cluster":
            return f"{scheme}://{auth}{hosts}"
        return f"{scheme}://{auth}{hosts}/{self.service}/{self.db}"

    def at(self, host: str, port: int) -> RedisURL:
        """This URL for one node (a master found by Sentinel, a cluster node):
        the same credentials, database and TLS files, another address."""
        return replace(self, kind="server", host=host, port=port, seeds=((host, port),),
                       service=None, sentinel_username=None, sentinel_password=None)

    def sentinel_at(self, host: str, port: int) -> RedisURL:
        """A connection to one Sentinel of this URL: the Sentinels' own
        credentials (none unless ``sentinel_password`` is set), TLS as for
        the master (``rediss+sentinel://``), no database."""
        return replace(self.at(host, port), db=0, username=self.sentinel_username,
                       password=self.sentinel_password)


#: the URL schemes of SPEC §10, and the kind of deployment each names
SCHEMES = {"redis": "server", "rediss": "server", "redis+sentinel": "sentinel",
           "rediss+sentinel": "sentinel", "redis+cluster": "cluster", "rediss+cluster": "cluster"}

URL_SHAPES = ("must look like redis://[[user]:password@]host:port/db (rediss:// for TLS), "
              "redis+sentinel://[[user]:password@]host:port[,host:port…]/service_name[/db] "
              "(rediss+sentinel:// for TLS) "
              "or redis+cluster://[[user]:password@]host:port[,host:port…] "
              "(rediss+cluster:// for TLS)")


def parse_redis_url(text: str) -> RedisURL:
    """Parse a backing URL of SPEC §10: one server, Sentinels, or cluster seeds."""
    scheme, sep, rest = text.partition("://")
    kind = SCHEMES.get(scheme.lower())
    if not sep or kind is None:
        raise ConfigError(URL_SHAPES)
    credentials, at, where = rest.rpartition("@")
    hosts, _, path = where.partition("/")
    if kind == "server" and "," in hosts:
        raise ConfigError("a redis:// URL names one server; use redis+sentinel:// or "
                          "redis+cluster:// for several hosts")
    default_port = 26379 if kind == "sentinel" else 6379  # Sentinel's own port
    seeds = tuple(_host_port(part, default_port) for part in hosts.split(","))
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) if user else None
        password = unquote(secret) if colon else None
    parts = [p for p in path.split("/") if p]
    service = None
    if kind == "sentinel":
        if not parts:
            raise ConfigError("redis+sentinel:// needs the service name: "
                              "redis+sentinel://host:port/service_name[/db]")
        service = unquote(parts.pop(0))
    elif kind == "cluster" and parts and parts != ["0"]:
        raise ConfigError("a Redis Cluster has database 0 only")
    if len(parts) > 1:
        raise ConfigError(f"unexpected path {path!r}: " + URL_SHAPES)
    db = parts[0] if parts else "0"
    if not db.isdigit():
        raise ConfigError(f"database must be a number, got {db!r}")
    host, port = seeds[0]
    return RedisURL(host=host, port=port, db=int(db), username=username, password=password,
                    tls=scheme.lower().startswith("rediss"), kind=kind, seeds=seeds,
                    service=service)


def _host_port(text: str, default_port: int = 6379) -> tuple[str, int]:
    """``host[:port]`` (``[v6]:port`` too), ``default_port`` unless given."""
    try:
        parts = urlsplit(f"redis://{text}")
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"bad host:port {text!r} ({e})") from None
    if not parts.hostname or parts.path or parts.query or parts.fragment:
        raise ConfigError(f"bad host:port {text!r}: " + URL_SHAPES)
    return parts.hostname, port if port is not None else default_port


class Secret(str):
    """A password: its own value wherever it is used, ``'***'`` wherever it
    is shown (a Config's repr, an assertion message, a traceback's locals)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


@dataclass(frozen=True)
class UserConfig:
    """One entry of ``users`` (SPEC §8)."""

    name: str
    password: Secret = field(repr=False)
    #: ``all``, or ``read``: only the commands the backing flags readonly
    commands: str = "all"


#: commands never forwarded unless deny_commands says otherwise (SPEC §1)
DEFAULT_DENY = ("SHUTDOWN", "DEBUG", "FAILOVER", "REPLICAOF", "SLAVEOF", "SYNC", "PSYNC")


@dataclass(frozen=True)
class Config:
    """Every setting of one proxy. Frozen: it is read everywhere, changed nowhere."""

    http: str | None = "tcp:9997:interface=127.0.0.1"
    resp: str | None = "tcp:6380:interface=127.0.0.1"
    redis: RedisURL = RedisURL()
    redis_timeout: float = 2.0
    ttl: float = 60.0
    capacity: int = 10000
    concurrency: int = 1
    max_item_bytes: int = 1024 * 1024
    max_clients: int = 10000
    invalidation: str = "off"
    client_timeout: float = 0.0
    request_timeout: float = 10.0
    max_bulk_bytes: int = 512 * 1024 * 1024
    max_args: int = 1024 * 1024
    max_inline_bytes: int = 64 * 1024
    max_client_buffer: int = 1024 * 1024 * 1024
    forward: str = "all"
    deny_commands: tuple[str, ...] = DEFAULT_DENY
    access_log: bool = False
    password: Secret | None = field(default=None, repr=False)
    users: tuple[UserConfig, ...] = ()
    protected_mode: bool = True
    # TLS (SPEC §8): files are read, and checked, when the proxy is built (backing/tls.py)
    redis_tls_ca: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    redis_tls_verify: bool = True
    tls_client_ca: str | None = None
    # the Sentinels' own credentials (redis+sentinel://; the URL's are the master's)
    sentinel_user: str | None = None
    sentinel_password: Secret | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """The ``sentinel_*`` keys go on the backing URL, which every
        connection is made from (and stay there through ``replace``); they
        mean nothing without Sentinels."""
        given = [key for key in ("sentinel_user", "sentinel_password")
                 if getattr(self, key) is not None]
        if not given:
            return
        if self.redis.kind != "sentinel":
            raise ConfigError(f"{given[0]} is set but the backing URL is not redis+sentinel://")
        if self.sentinel_password is None:
            raise ConfigError("sentinel_user is set but sentinel_password is not")
        object.__setattr__(self, "redis", replace(
            self.redis, sentinel_username=self.sentinel_user,
            sentinel_password=self.sentinel_password))


def _endpoint(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("must be a Twisted endpoint string such as tcp:6380, or none")
    return None if value.strip().lower() == "none" else value.strip()


def _number(kind: type, minimum: float, strict: bool) -> Callable[[Any], Any]:
    """A parser for an int or float bounded below (strictly when ``strict``)."""
    word = "an integer" if kind is int else "a number"
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"

    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ConfigError(f"must be {word} {bound}, got {value!r}")
        if isinstance(value, str):
            try:
                value = kind(value.strip())
            except ValueError:
                raise ConfigError(f"must be {word} {bound}, got {value!r}") from None
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise ConfigError(f"must be {word} {bound}, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"must be a finite number {bound}, got {value!r}")
        if value < minimum or (strict and value == minimum):
            raise ConfigError(f"must be {word} {bound}, got {value!r}")
        return value

    return parse


def _redis_url(value: Any) -> RedisURL:
    if not isinstance(value, str):
        raise ConfigError(f"must be a redis:// URL string, got {value!r}")
    return parse_redis_url(value.strip())


def _invalidation(value: Any) -> str:
    if value not in ("off", "tracking"):
        raise ConfigError(f"must be 'off' or 'tracking', got {value!r}")
    return value


def _forward(value: Any) -> str:
    if value not in ("all", "read", "none"):
        raise ConfigError(f"must be 'all', 'read' or 'none', got {value!r}")
    return value


def _command_list(value: Any) -> tuple[str, ...]:
    """A comma-separated string (command line, environment) or a YAML list."""
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    elif value is None:
        items = []
    else:
        raise ConfigError(f"must be a list of command names, got {value!r}")
    names = tuple(item.upper() for item in items if item)
    for name in names:
        if not name.replace("-", "").replace("_", "").replace("|", "").isalnum():
            raise ConfigError(f"not a command name: {name!r}")
    return names


def _path(value: Any) -> str | None:
    """A file name; empty means not set (an environment variable set to "")."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"must be a file name, got {value!r}")
    return value.strip() or None


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"must be true or false, got {value!r}")


def _password(value: Any) -> Secret | None:
    """A password, or None for none: empty means none, as Redis's
    ``requirepass ""`` (so ``REDISP_PASSWORD=`` can stand for "unset" where
    a variable cannot be left out, as in docker-compose.yml).  Errors never
    echo the value: they are logged and shown."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError("must be a string (quote it in YAML: a number or yes/no would be "
                          "read as something else)")
    return Secret(value)


#: what a user name may not hold: AUTH splits on blanks, HTTP Basic on ':'
_BAD_NAME_CHARS = frozenset(" :\t\r\n\0")


def _is_user_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and _BAD_NAME_CHARS.isdisjoint(name) \
        and name.isprintable()


def _user_name(value: Any) -> str | None:
    """A user name to AUTH as (``sentinel_user``), or None."""
    if value is None or value == "":
        return None
    if not _is_user_name(value):
        raise ConfigError("must be a user name without blanks, ':' or control characters")
    return value


def _users(value: Any) -> tuple[UserConfig, ...]:
    """``{name: {password: PW, commands: all|read}}``, from conf.yaml only."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConfigError("must be a mapping of user name to {password: ..., commands: "
                          "all|read}, in conf.yaml")
    users = []
    for name, spec in value.items():
        if not _is_user_name(name):
            raise ConfigError(f"user name {name!r} must be a non-empty string without blanks, "
                              "':' or control characters")
        if not isinstance(spec, dict):
            raise ConfigError(f"user {name!r} must be a mapping with password and commands")
        unknown = set(spec) - {"password", "commands"}
        if unknown:
            raise ConfigError(f"user {name!r}: unknown key {sorted(map(str, unknown))[0]!r}")
        if "password" not in spec:
            raise ConfigError(f"user {name!r} has no password")
        password = spec["password"]
        if not isinstance(password, str) or not password:
            raise ConfigError(f"user {name!r}: password must be a non-empty string (quote it "
                              "in YAML)")
        commands = spec.get("commands", "all")
        if commands not in ("all", "read"):
            raise ConfigError(f"user {name!r}: commands must be 'all' or 'read', "
                              f"got {commands!r}")
        users.append(UserConfig(name, Secret(password), commands))
    return tuple(users)


#: key -> parser; the keys are exactly the conf.yaml keys and Config fields.
PARSERS: dict[str, Callable[[Any], Any]] = {
    "http": _endpoint,
    "resp": _endpoint,
    "redis": _redis_url,
    "redis_timeout": _number(float, 0, strict=True),
    "ttl": _number(float, 0, strict=True),
    "capacity": _number(int, 0, strict=False),
    "max_item_bytes": _number(int, 0, strict=False),
    "concurrency": _number(int, 1, strict=False),
    "max_clients": _number(int, 1, strict=False),
    "invalidation": _invalidation,
    "client_timeout": _number(float, 0, strict=False),
    "request_timeout": _number(float, 0, strict=False),
    "max_bulk_bytes": _number(int, 1, strict=False),
    "max_args": _number(int, 1, strict=False),
    "max_inline_bytes": _number(int, 1, strict=False),
    "max_client_buffer": _number(int, 1, strict=False),
    "forward": _forward,
    "deny_commands": _command_list,
    "access_log": _boolean,
    "password": _password,
    "users": _users,
    "protected_mode": _boolean,
    "redis_tls_ca": _path,
    "redis_tls_cert": _path,
    "redis_tls_key": _path,
    "redis_tls_verify": _boolean,
    "tls_client_ca": _path,
    "sentinel_user": _user_name,
    "sentinel_password": _password,
}
assert set(PARSERS) == {f.name for f in fields(Config)}

#: keys set in conf.yaml only: no command-line option, no environment variable
FILE_ONLY = frozenset({"users"})

ENV_PREFIX = "REDISP_"
DEFAULT_CONFIG_PATH = "conf.yaml"


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def read_yaml(path: str) -> dict[str, Any]:
    """Read a conf.yaml into a dict, or raise ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    config_path: str | None = None,
    cwd: str = ".",
) -> Config:
    """Build the Config from every source, highest precedence first.

    ``cli`` maps keys to values given on the command line (None = not given);
    ``config_path`` is ``--config``; without it ``REDISP_CONFIG`` is used, and
    without that ``./conf.yaml`` when it exists.
    """
    path = config_path or environ.get(env_name("config"))
    if path is None:
        default = os.path.join(cwd, DEFAULT_CONFIG_PATH)
        path = default if os.path.exists(default) else None
    from_file = read_yaml(path) if path is not None else {}
    for key in from_file:
        if key not in PARSERS:
            raise ConfigError(f"{path}: unknown key {key!r}")

    values: dict[str, Any] = {}
    for key, parse in PARSERS.items():
        if cli.get(key) is not None:
            source, raw = f"--{key.replace('_', '-')}", cli[key]
        elif env_name(key) in environ and key not in FILE_ONLY:
            source, raw = env_name(key), environ[env_name(key)]
        elif key in from_file:
            source, raw = f"{path}: {key}", from_file[key]
        else:
            continue
        try:
            values[key] = parse(raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if values.get("password") is not None and any(
            user.name == "default" for user in values.get("users", ())):
        raise ConfigError("users: 'default' is the user whose password is `password`: "
                          "set one or the other")
    config = Config(**values)
    check_tls_keys(config)
    return config


def check_tls_keys(config: Config) -> None:
    """The ``redis_tls_*`` keys only mean something with a ``rediss://``
    backing, and a client certificate needs its key: anything else is a
    mistake that would otherwise pass silently (no TLS where the operator
    thinks there is)."""
    keys = ("redis_tls_ca", "redis_tls_cert", "redis_tls_key")
    if not config.redis.tls:
        given = [key for key in keys if getattr(config, key) is not None]
        if given or not config.redis_tls_verify:
            name = given[0] if given else "redis_tls_verify"
            raise ConfigError(f"{name} is set but the backing URL is redis://, not rediss://")
    if (config.redis_tls_cert is None) != (config.redis_tls_key is None):
        given, missing = ("redis_tls_cert", "redis_tls_key") \
            if config.redis_tls_key is None else ("redis_tls_key", "redis_tls_cert")
        raise ConfigError(f"{given} is set but {missing} is not: a client certificate "
                          "needs both")

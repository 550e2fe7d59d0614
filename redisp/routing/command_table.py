"""The backing's own command table, from its ``COMMAND`` reply.

redisp keeps no list of Redis commands (SPEC §7): which arguments are keys,
which keys a command may modify, which commands block, subscribe, or only
read, all come from what the backing Redis says about itself, read on every
(re)connect.  A module's commands and those of a newer Redis work unchanged.

Key positions follow Redis's own ``getKeysUsingKeySpecs`` (src/db.c) on the
key specifications of Redis 7 (docs: reference/key-specs.md):

* ``begin_search`` *index* (a fixed position) or *keyword* (the argument
  after a keyword, searched forwards or, for a negative ``startfrom``,
  backwards), then ``find_keys`` *range* (``lastkey``, ``keystep``,
  ``limit``) or *keynum* (a count argument, then the keys);
* specs flagged ``not_key`` (SPUBLISH's shard channel) are not keys;
* a spec Redis itself cannot resolve -- an *unknown* begin_search or
  find_keys (SORT's BY/GET/STORE), an *incomplete* spec (MIGRATE's KEYS),
  a count that is not a number -- makes ``keys()`` return None: the caller
  then asks the backing (``COMMAND GETKEYSANDFLAGS``, see ``getkeys_request``
  and ``keys_from_getkeys``), which runs the command's own key finder.

One deliberate difference: a *keynum* of 0 gives no keys from that spec,
where Redis calls the spec invalid.  ``EVAL script 0`` then has no keys
(Redis's GETKEYS answers "Invalid arguments specified for command"), which
is what the script-flush rule below needs.

A Redis 6 reply has no key specs: the legacy first/last/step range is used,
and a ``movablekeys`` command gets None.

Which keys a command may modify (``write_keys``): those of specs flagged
RW, OW, RM, insert, update or delete (SPEC §7) -- so PFCOUNT, a read-only
command whose spec is RW because it rewrites the HyperLogLog's cached
cardinality, drops its keys.  A command flagged ``write`` whose specs say
nothing of writing (legacy tables, modules without key-spec flags) is taken
to modify every key it names.

What changes keys a command does not name (``invalidation``): derived from
flags and ACL categories, with no command names:

* a ``write`` command that names no keys and is not ``@scripting``:
  FLUSHDB, FLUSHALL, SWAPDB (FUNCTION LOAD/DELETE/FLUSH/RESTORE are
  ``@scripting``: they change functions, not keys);
* a script or function call that is not ``readonly`` (EVAL, EVALSHA, FCALL:
  ``@scripting`` with key specs) when it declares no keys.  A script that
  declares keys is trusted to touch only those, as Redis requires of
  scripts (and Redis Cluster enforces); one that writes undeclared keys is
  seen through ``tracking`` or TTL only.

Two small hand rules remain, because Redis 7.0 does not flag them:

* WAIT and WAITAOF block the connection but carry no ``blocking`` flag
  (``BLOCKS_UNFLAGGED``);
* admin commands that replace the whole dataset (REPLICAOF, DEBUG RELOAD,
  a FAILOVER) are not recognised as flushing; deny them or rely on
  ``tracking``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redisp.protocol.codec import parse_integer
from redisp.protocol.frames import ErrorReply

__all__ = [
    "CommandTable", "CommandInfo", "KeySpec", "FLUSH", "WRITE_FLAGS", "BLOCKS_UNFLAGGED",
    "getkeys_request", "keys_from_getkeys",
]

#: key-spec flags that mean the command may change the key (SPEC §7)
WRITE_FLAGS = frozenset((b"RW", b"OW", b"RM", b"insert", b"update", b"delete"))

#: commands that block their connection without Redis flagging them ``blocking``
BLOCKS_UNFLAGGED = frozenset((b"wait", b"waitaof"))


class _Flush:
    """The whole keyspace: what ``invalidation()`` returns for FLUSHDB & co."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FLUSH"


FLUSH = _Flush()

# spec kinds, compiled once
_INDEX, _KEYWORD = 1, 2
_RANGE, _KEYNUM = 1, 2


@dataclass(frozen=True)
class KeySpec:
    """One key specification, compiled to what ``keys()`` needs.

    ``begin`` is _INDEX (``index`` = position) or _KEYWORD (``keyword``,
    ``startfrom``); ``find`` is _RANGE (``lastkey``, ``keystep``, ``limit``)
    or _KEYNUM (``keynumidx``, ``firstkey``, ``keystep``); either is None
    when Redis says *unknown*.
    """

    flags: frozenset[bytes]
    begin: int | None
    index: int = 0
    keyword: bytes = b""
    startfrom: int = 0
    find: int | None = None
    lastkey: int = 0
    keystep: int = 1
    limit: int = 0
    keynumidx: int = 0
    firstkey: int = 0
    #: the command may modify these keys (derived once: read per forwarded write)
    writes: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "writes", not self.flags.isdisjoint(WRITE_FLAGS))

    def positions(self, argv: Sequence[bytes]) -> list[int] | None:
        """The argv indexes this spec names; None when it cannot tell."""
        argc = len(argv)
        if self.begin == _INDEX:
            first = self.index
        elif self.begin == _KEYWORD:
            first = _find_keyword(argv, self.keyword, self.startfrom)
            if first is None:
                return []  # no keyword, no keys from this spec
        else:
            return None
        if self.find == _RANGE:
            step = self.keystep
            if self.lastkey >= 0:
                last = first + self.lastkey
            elif not self.limit:
                last = argc + self.lastkey
            else:
                last = first + ((argc - first) // self.limit + self.lastkey)
        elif self.find == _KEYNUM:
            step = self.keystep
            if first + self.keynumidx >= argc:
                return None
            count = parse_integer(argv[first + self.keynumidx])
            if count is None or count < 0:
                return None
            if count == 0:
                return []  # where Redis says "invalid": see the module docstring
            first += self.firstkey
            last = first + count - 1
        else:
            return None
        if last >= argc or last < first or first >= argc:
            return None
        if b"incomplete" in self.flags:
            return None  # keys found, but not all of them: Redis asks the command
        return list(range(first, last + 1, step))


def _find_keyword(argv: Sequence[bytes], keyword: bytes, startfrom: int) -> int | None:
    """The position after ``keyword`` (any case), searched as Redis does."""
    argc = len(argv)
    if startfrom > 0:
        indexes: Iterable[int] = range(startfrom, argc - 1)
    else:
        indexes = range(argc + startfrom, 1, -1)
    for i in indexes:
        if i >= argc or i < 1:
            break
        if argv[i].lower() == keyword:
            return i + 1
    return None


@dataclass
class CommandInfo:
    """What the backing says about one command (or subcommand, ``client|kill``)."""

    name: bytes
    arity: int
    flags: frozenset[bytes]
    categories: frozenset[bytes] = frozenset()  # without the '@'
    first: int = 0
    last: int = 0
    step: int = 0
    specs: tuple[KeySpec, ...] = ()
    subcommands: dict[bytes, CommandInfo] = field(default_factory=dict)  # by b"kill"

    # derived once from the above, for the per-request checks
    readonly: bool = field(init=False)
    write: bool = field(init=False)
    pubsub: bool = field(init=False)
    blocking: bool = field(init=False)
    admin: bool = field(init=False)
    movablekeys: bool = field(init=False)
    #: a script or function call that may write (EVAL, EVALSHA, FCALL)
    script: bool = field(init=False)
    #: changes keys without naming any (FLUSHDB, FLUSHALL, SWAPDB)
    keyspace_wide: bool = field(init=False)
    #: the argv index of the one key of a one-key command (GET, SET, INCR …),
    #: else 0: its route needs no spec walk (routing/cluster.py)
    single_key: int = field(init=False)

    def __post_init__(self) -> None:
        flags = self.flags
        self.readonly = b"readonly" in flags
        self.write = b"write" in flags
        self.pubsub = b"pubsub" in flags
        self.movablekeys = b"movablekeys" in flags
        self.blocking = b"blocking" in flags or self.name in BLOCKS_UNFLAGGED
        self.admin = b"admin" in flags
        self._keyed = tuple(s for s in self.specs if b"not_key" not in s.flags)
        self._spec_writes = any(s.writes for s in self._keyed)
        only = self.specs[0] if len(self.specs) == 1 else None
        self.single_key = (only.index if only is not None and only.begin == _INDEX
                           and only.find == _RANGE and only.lastkey == 0
                           and b"not_key" not in only.flags
                           and b"incomplete" not in only.flags else 0)
        self.script = (b"scripting" in self.categories and not self.readonly
                       and bool(self._keyed))
        self.keyspace_wide = (self.write and not self._keyed and (self.specs or self.first <= 0)
                              and not self.movablekeys and b"scripting" not in self.categories)

    def arity_ok(self, argv: Sequence[bytes]) -> bool:
        """Redis's arity check: exactly ``arity`` arguments, or at least ``-arity``."""
        arity = self.arity
        return len(argv) == arity if arity >= 0 else len(argv) >= -arity

    def keys(self, argv: Sequence[bytes]) -> list[int] | None:
        """The argv indexes that are keys; None when only the backing can tell
        (ask it with ``getkeys_request``)."""
        if self._keyed:
            keys: list[int] = []
            for spec in self._keyed:
                found = spec.positions(argv)
                if found is None:
                    return None
                keys += found
            return keys
        if self.specs:
            return []  # only ``not_key`` specs: SPUBLISH's shard channel
        if self.movablekeys:
            return None
        return self._legacy_keys(argv)

    def route_keys(self, argv: Sequence[bytes]) -> list[int] | None:
        """``keys`` and the shard channels of ``not_key`` specs (SPUBLISH,
        SSUBSCRIBE): what Redis Cluster routes a command by
        (routing/cluster.py)."""
        if len(self._keyed) == len(self.specs):
            return self.keys(argv)
        positions: list[int] = []
        for spec in self.specs:
            found = spec.positions(argv)
            if found is None:
                return None
            positions += found
        return positions

    def write_keys(self, argv: Sequence[bytes]) -> list[int] | None:
        """The argv indexes of keys this command may modify; None when only
        the backing can tell."""
        if self._keyed:
            if not self._spec_writes:
                return self.keys(argv) if self.write else []
            keys: list[int] = []
            for spec in self._keyed:
                found = spec.positions(argv)
                if found is None:
                    return None
                if spec.writes:
                    keys += found
            return keys
        if self.specs:
            return []
        if not self.write and (self.readonly or not self.first):
            return []
        return self.keys(argv)

    def invalidation(self, argv: Sequence[bytes]) -> list[int] | _Flush | None:
        """What a run of ``argv`` may change in the cached keyspace: the argv
        indexes of keys it may modify ([] for none), ``FLUSH`` for anything,
        or None when only the backing can tell (``getkeys_request``, then
        ``keys_from_getkeys``)."""
        if self.keyspace_wide:
            return FLUSH
        keys = self.write_keys(argv)
        if self.script and keys is not None and not keys:
            return FLUSH
        return keys

    def _legacy_keys(self, argv: Sequence[bytes]) -> list[int]:
        first, last, step = self.first, self.last, self.step
        if first <= 0 or step <= 0:
            return []
        argc = len(argv)
        if last < 0:
            last = argc + last
        if last >= argc:
            return []  # too few arguments: Redis answers an arity error
        return list(range(first, last + 1, step))


class CommandTable:
    """Every command the backing knows, by lowercase name."""

    def __init__(self, commands: Mapping[bytes, CommandInfo]) -> None:
        self.commands = dict(commands)

    @classmethod
    def from_command_reply(cls, reply: Any) -> CommandTable:
        """From the decoded ``COMMAND`` reply (frames.decode), RESP2 or RESP3,
        of Redis 5, 6 or 7.  Raises ValueError on a reply it cannot read."""
        if not isinstance(reply, list):
            raise ValueError(f"COMMAND reply is not an array: {reply!r:.80}")
        commands = {}
        for entry in reply:
            if entry is None:
                continue  # Redis answers nil for a name it does not know (COMMAND INFO)
            info = _command(entry)
            commands[info.name] = info
        return cls(commands)

    def lookup(self, argv: Sequence[bytes]) -> CommandInfo | None:
        """The command ``argv`` runs: a subcommand's own entry for container
        commands (``CLIENT KILL`` -> ``client|kill``), the container's for an
        unknown subcommand (Redis then answers the error), None if unknown."""
        if not argv:
            return None
        info = self.commands.get(argv[0].lower())
        if info is not None and info.subcommands and len(argv) > 1:
            return info.subcommands.get(argv[1].lower(), info)
        return info

    def __len__(self) -> int:
        return len(self.commands)

    def __contains__(self, name: bytes) -> bool:
        return name.lower() in self.commands


def getkeys_request(argv: Sequence[bytes]) -> list[bytes]:
    """The command that asks the backing for ``argv``'s keys and their flags
    (Redis 7; a Redis 6 backing answers an error: use ``COMMAND GETKEYS``)."""
    return [b"COMMAND", b"GETKEYSANDFLAGS", *argv]


def keys_from_getkeys(info: CommandInfo, reply: Any) -> list[bytes] | _Flush:
    """The key names a run may modify, from the decoded reply to
    ``COMMAND GETKEYSANDFLAGS`` (pairs of key and flags) or ``COMMAND
    GETKEYS`` (keys only: all taken as modified unless the command is
    read-only).  An error reply means Redis will refuse the command itself:
    nothing to drop.  A script that names no keys: ``FLUSH``."""
    if isinstance(reply, ErrorReply) or not isinstance(reply, list):
        return []
    keys: list[bytes] = []
    for item in reply:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], list):
            key, flags = item
            written = not WRITE_FLAGS.isdisjoint(flags) or (not flags and not info.readonly)
        else:
            key, written = item, not info.readonly
        if written:
            keys.append(key)
    if not keys and info.script and not reply:
        return FLUSH
    return keys


# -- reading one entry of the COMMAND reply ----------------------------------------


def _as_map(value: Any) -> dict:
    """A RESP3 map (dict) or its RESP2 form (a flat list of pairs), as a dict."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and len(value) % 2 == 0:
        return dict(zip(value[::2], value[1::2]))
    raise ValueError(f"expected a map, got {value!r:.80}")


def _command(entry: Any) -> CommandInfo:
    if not isinstance(entry, list) or len(entry) < 6:
        raise ValueError(f"not a COMMAND entry: {entry!r:.80}")
    name, arity, flags, first, last, step = entry[:6]
    categories = entry[6] if len(entry) > 6 else []
    specs = entry[8] if len(entry) > 8 else []
    subcommands = entry[9] if len(entry) > 9 else []
    if not isinstance(name, bytes) or not isinstance(arity, int):
        raise ValueError(f"not a COMMAND entry: {entry!r:.80}")
    info = CommandInfo(
        name=name.lower(),
        arity=arity,
        flags=frozenset(flags or ()),
        categories=frozenset(c.lstrip(b"@") for c in categories or ()),
        first=first, last=last, step=step,
        specs=tuple(_key_spec(s) for s in specs or ()),
    )
    for sub in subcommands or ():
        child = _command(sub)
        info.subcommands[child.name.rpartition(b"|")[2]] = child
    return info


def _key_spec(raw: Any) -> KeySpec:
    spec = _as_map(raw)
    flags = frozenset(spec.get(b"flags") or ())
    begin = _as_map(spec.get(b"begin_search") or {})
    find = _as_map(spec.get(b"find_keys") or {})
    begin_args = _as_map(begin.get(b"spec") or {})
    find_args = _as_map(find.get(b"spec") or {})
    fields: dict[str, Any] = {"flags": flags, "begin": None, "find": None}
    if begin.get(b"type") == b"index":
        fields.update(begin=_INDEX, index=int(begin_args[b"index"]))
    elif begin.get(b"type") == b"keyword":
        fields.update(begin=_KEYWORD, keyword=bytes(begin_args[b"keyword"]).lower(),
                      startfrom=int(begin_args[b"startfrom"]))
    if find.get(b"type") == b"range":
        fields.update(find=_RANGE, lastkey=int(find_args[b"lastkey"]),
                      keystep=int(find_args[b"keystep"]), limit=int(find_args[b"limit"]))
    elif find.get(b"type") == b"keynum":
        fields.update(find=_KEYNUM, keynumidx=int(find_args[b"keynumidx"]),
                      firstkey=int(find_args[b"firstkey"]), keystep=int(find_args[b"keystep"]))
    if fields.get("keystep", 1) <= 0:
        fields["find"] = None  # a step that never advances: let Redis find the keys
    return KeySpec(**fields)

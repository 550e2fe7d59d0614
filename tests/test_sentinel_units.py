"""backing/sentinel.py one layer at a time: the resolver and the connect loop with a
fake ``ask``/``connect_to``, the ROLE check on a StringTransport with a
task.Clock, and the relay pool's drop_all (tests/test_sentinel.py runs the
real thing)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from redisp.backing.connection import BackingUnavailable
from redisp.backing.relay import RelayPool, RelayProtocol
from redisp.backing.sentinel import (
    LEFT_GRACE,
    NotMaster,
    SentinelMaster,
    SentinelUnavailable,
    _Confirm,
    _Moved,
)
from redisp.config import parse_redis_url
from redisp.protocol.codec import encode_command

URL = parse_redis_url("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/svc/2")
S1, S2, S3 = URL.seeds
M1, M2 = ("10.0.1.1", 6379), ("10.0.1.2", 6379)


def address_reply(address):
    return [address[0].encode(), str(address[1]).encode()]


class FakeDeployment:
    """What each Sentinel names and what each node says to ROLE; a value
    that is an exception fails the call."""

    def __init__(self, names: dict, roles: dict) -> None:
        self.names = names
        self.roles = roles
        self.asked: list[tuple] = []
        self.discoveries: list = []  # the Sentinels asked SENTINEL SENTINELS

    def ask(self, address, argv, url):
        if argv[:2] == [b"SENTINEL", b"SENTINELS"]:  # discovery: none other known
            self.discoveries.append(address)
            return succeed([])
        self.asked.append((address, argv[0]))
        if argv[0] == b"ROLE":
            assert url.password == "pw" and url.host == address[0]
            value = self.roles[address]
            value = [value, 0, []] if isinstance(value, bytes) else value
        else:
            assert argv == [b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", b"svc"]
            assert url.password is None  # Sentinels are asked without AUTH
            value = self.names[address]
        return fail(value) if isinstance(value, Exception) else succeed(value)


def master_with(fake: FakeDeployment, **kw) -> SentinelMaster:
    return SentinelMaster(URL, 1.0, reactor=None, clock=Clock(), ask=fake.ask, **kw)


def result(d: Deferred):
    got: list = []
    d.addBoth(got.append)
    assert got, "the Deferred has not fired"
    return got[0]


def test_the_sentinels_are_asked_in_turn_and_the_master_confirmed_with_role():
    down = BackingUnavailable("backing redis unavailable (connection refused)")
    fake = FakeDeployment({S1: down, S2: address_reply(M1)}, {M1: b"master"})
    master = master_with(fake)
    assert result(master.resolve()) == M1
    assert master.address == M1 and master.failovers == 0
    assert fake.asked == [(S1, b"SENTINEL"), (S2, b"SENTINEL"), (M1, b"ROLE")]
    assert fake.discoveries == [S2], "the Sentinel that answered names the others"
    fake.asked.clear()
    master.resolve()
    assert fake.asked[0] == (S2, b"SENTINEL"), "the Sentinel that answered goes first"


def test_a_master_that_says_replica_is_refused_and_the_next_sentinel_asked():
    fake = FakeDeployment({S1: address_reply(M1), S2: address_reply(M2)},
                          {M1: b"slave", M2: b"master"})
    assert result(master_with(fake).resolve()) == M2


def test_no_master_fails_saying_what_each_sentinel_answered():
    refused = BackingUnavailable("backing redis unavailable (connection refused)")
    fake = FakeDeployment({S1: refused, S2: None, S3: address_reply(M1)}, {M1: b"slave"})
    failure = result(master_with(fake).resolve())
    assert failure.check(SentinelUnavailable)
    text = str(failure.value)
    assert "Sentinel 10.0.0.1:26379: connection refused" in text
    assert "Sentinel 10.0.0.2:26379 knows no master 'svc'" in text
    assert "10.0.1.1:6379 is not the master (ROLE: slave)" in text
    assert "pw" not in text


def test_resolves_made_meanwhile_share_one_round():
    pending: list[Deferred] = []

    def ask(address, argv, url):
        pending.append(Deferred())
        return pending[-1]

    master = SentinelMaster(URL, 1.0, None, clock=Clock(), ask=ask)
    a, b = master.resolve(), master.resolve()
    assert len(pending) == 1
    pending[0].callback(address_reply(M1))
    pending[1].callback([b"master", 0, []])
    assert result(a) == result(b) == M1
    assert len(pending) == 3, "one round (SENTINEL, ROLE), then the others asked for"


def test_switch_master_for_our_service_switches_once():
    fake = FakeDeployment({S1: address_reply(M1)}, {M1: b"master"})
    master = master_with(fake)
    heard: list = []
    master.on_switch(lambda old, new: heard.append((old, new)))
    master.switch_message(b"svc 10.0.1.1 6379 10.0.1.2 6379", S1)
    assert master.address == M2 and heard == [], "the first master known is no switch"
    master.switch_message(b"other 10.0.1.2 6379 10.0.1.1 6379", S1)
    master.switch_message(b"svc garbage", S1)
    master.switch_message(b"svc 10.0.1.2 6379 10.0.1.1 notaport", S1)
    assert master.address == M2 and heard == []
    master.switch_message(b"svc 10.0.1.2 6379 10.0.1.1 6379", S1)
    master.switch_message(b"svc 10.0.1.2 6379 10.0.1.1 6379", S2)  # every Sentinel says it
    assert heard == [(M2, M1)] and master.failovers == 1
    assert master.describe() == "sentinel svc master 10.0.1.1:6379"


def test_a_master_switched_away_from_is_not_taken_back_from_a_lagging_sentinel():
    """S1 has not heard of the switch and names the old master, which still
    answers as one: the next Sentinel's answer is taken instead; once the
    grace is over (Sentinels agree by then), S1 is believed again."""
    fake = FakeDeployment({S1: address_reply(M1), S2: address_reply(M2)},
                          {M1: b"master", M2: b"master"})
    master = master_with(fake)
    assert result(master.resolve()) == M1
    master.switch_message(b"svc 10.0.1.1 6379 10.0.1.2 6379", S2)
    assert master.address == M2
    master._first = 0
    assert result(master.resolve()) == M2 and master.failovers == 1
    master._clock.advance(LEFT_GRACE)
    master._first = 0
    assert result(master.resolve()) == M1 and master.failovers == 2


class FakeConnections:
    def __init__(self, outcomes: dict) -> None:
        self.outcomes = outcomes  # address -> list of results (exception: fails)
        self.tried: list = []

    def connect_to(self, address, factory, generation):
        self.tried.append(address)
        value = self.outcomes[address].pop(0)
        return fail(value) if isinstance(value, Exception) else succeed(value)


def test_a_connection_that_fails_asks_the_sentinels_again_and_follows_their_master():
    fake = FakeDeployment({S1: address_reply(M2)}, {M2: b"master"})
    connections = FakeConnections({M1: [NotMaster("10.0.1.1:6379 is not the master")],
                                   M2: ["protocol"]})
    master = master_with(fake, connect_to=connections.connect_to)
    master.address = M1
    heard: list = []
    master.on_switch(lambda old, new: heard.append((old, new)))
    assert result(master.connect(Factory())) == "protocol"
    assert connections.tried == [M1, M2]
    assert heard == [(M1, M2)] and master.failovers == 1


def test_a_failed_master_the_sentinels_still_name_fails_the_connection():
    fake = FakeDeployment({S1: address_reply(M1)}, {M1: b"master"})
    refused = NotMaster("10.0.1.1:6379: connection refused")
    connections = FakeConnections({M1: [refused]})
    master = master_with(fake, connect_to=connections.connect_to)
    master.address = M1
    failure = result(master.connect(Factory()))
    assert failure.value is refused
    assert connections.tried == [M1]


def test_no_sentinel_answering_fails_the_connection_as_unavailable():
    down = BackingUnavailable("backing redis unavailable (connection refused)")
    fake = FakeDeployment({S1: down, S2: down, S3: down}, {})
    failure = result(master_with(fake, connect_to=FakeConnections({}).connect_to)
                     .connect(Factory()))
    assert failure.check(SentinelUnavailable)
    assert str(failure.value).startswith("no master 'svc' from the Sentinels: ")


def test_a_connection_to_the_old_master_made_during_a_switch_is_made_again():
    fake = FakeDeployment({}, {})
    connections = FakeConnections({M1: [_Moved("moved")], M2: ["protocol"]})
    master = master_with(fake, connect_to=connections.connect_to)
    master.address = M1
    original = connections.connect_to

    def switching(address, factory, generation):
        if address == M1:
            master.switch_message(b"svc 10.0.1.1 6379 10.0.1.2 6379", S1)
        return original(address, factory, generation)

    master._open = switching
    assert result(master.connect(Factory())) == "protocol"
    assert connections.tried == [M1, M2]


# -- the ROLE check on the connection itself ----------------------------------------------

class Recorder(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


def confirming(current=lambda: True):
    clock = Clock()
    recorder = Recorder()
    confirm = _Confirm(Factory.forProtocol(lambda: recorder), URL, M1, 1.0, clock, current)
    transport = StringTransport()
    confirm.makeConnection(transport)
    return confirm, transport, recorder, clock


def outcome(confirm: _Confirm):
    return result(confirm.done)


def test_a_master_is_handed_over_after_auth_and_role():
    confirm, transport, recorder, _ = confirming()
    assert transport.value() == encode_command([b"AUTH", b"pw"]) + encode_command([b"ROLE"])
    confirm.dataReceived(b"+OK\r\n*3\r\n$6\r\nmas")
    assert not confirm.done.called
    confirm.dataReceived(b"ter\r\n:0\r\n*0\r\n")
    assert outcome(confirm) is recorder and recorder.made
    confirm.dataReceived(b"+PONG\r\n")  # reads now go straight to the caller's protocol
    assert recorder.data == [b"+PONG\r\n"]
    assert confirm.dataReceived == recorder.dataReceived


def test_a_replica_is_refused():
    confirm, transport, recorder, _ = confirming()
    confirm.dataReceived(b"+OK\r\n*5\r\n$5\r\nslave\r\n$8\r\n10.0.1.2\r\n:6379\r\n"
                         b"$9\r\nconnected\r\n:10\r\n")
    assert transport.disconnecting or transport.disconnected
    confirm.connectionLost(None)
    failure = outcome(confirm)
    assert failure.check(NotMaster) and "ROLE: slave" in str(failure.value)
    assert not recorder.made


def test_a_refused_password_is_said():
    confirm, _, _, _ = confirming()
    confirm.dataReceived(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
                         b"-NOAUTH Authentication required.\r\n")
    confirm.connectionLost(None)
    failure = outcome(confirm)
    assert "refused us: WRONGPASS" in str(failure.value)


def test_a_connection_made_before_the_master_moved_is_refused():
    confirm, _, recorder, _ = confirming(current=lambda: False)
    confirm.dataReceived(b"+OK\r\n*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
    confirm.connectionLost(None)
    assert outcome(confirm).check(_Moved) and not recorder.made


def test_no_answer_to_role_within_the_timeout_fails():
    confirm, transport, _, clock = confirming()
    clock.advance(1.0)
    confirm.connectionLost(None)
    failure = outcome(confirm)
    assert "no answer to ROLE within 1s" in str(failure.value)


# -- dropping every relay connection -------------------------------------------------------

def test_drop_all_fails_calls_in_flight_closes_pinned_and_reconnects_at_once():
    clock = Clock()
    made: list[RelayProtocol] = []

    def connect(protocol: RelayProtocol) -> Deferred:
        protocol.makeConnection(StringTransport())
        made.append(protocol)
        return succeed(protocol)

    pool = RelayPool(parse_redis_url("redis://127.0.0.1:6379/0"), 1.0, None, size=1,
                     connect=connect, clock=clock)
    replies: list = []
    pool.call(0, encode_command([b"GET", b"k"]), replies.append)
    lost: list = []
    pinned = pool.pinned(on_lost=lost.append)
    pool._failed("an earlier failure")  # a backoff in force
    pool.drop_all("the master moved to 10.0.1.2:6379")
    assert isinstance(replies[0], BackingUnavailable)
    assert "the master moved to 10.0.1.2:6379" in str(replies[0])
    assert lost == [pinned] and pool.pinned_count == 0
    pool.call(0, encode_command([b"GET", b"k"]), replies.append)
    assert len(made) == 3 and not made[-1].lost, "reconnected without waiting out the backoff"


def test_scripts_run_never_starts_a_plain_redis_for_a_sentinel_url(monkeypatch, tmp_path):
    """scripts/run starts a local redis-server where none answers: at a
    Sentinel's address it would be of no use, so the probe says there is one."""
    from redisp.probe import main
    from tests.support import free_port

    monkeypatch.chdir(tmp_path)
    port = free_port()
    assert main(["--ping", "--redis", f"redis+sentinel://127.0.0.1:{port}/svc"]) == 0


def test_a_sentinel_without_a_port_is_on_sentinels_port():
    url = parse_redis_url("redis+sentinel://a,b:5000/svc")
    assert url.seeds == (("a", 26379), ("b", 5000))
    assert parse_redis_url("redis://a/0").port == 6379

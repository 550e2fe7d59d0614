"""Malformed RESP requests are logged at most once a second (issue 8, item 17):
100 000 fuzzed inputs once wrote 5.6 MB of log."""

from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from redisp.protocol.codec import LogLimiter
from tests.test_resp_server import Door


@pytest.fixture
def protocol_error_lines():
    """The log events about RESP protocol errors while the test runs."""
    lines: list[dict] = []

    def observe(event: dict) -> None:
        if "RESP protocol error" in (event.get("log_format") or ""):
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_limiter_admits_one_event_a_period_and_counts_the_rest():
    limiter = LogLimiter(period=1.0)
    assert limiter.admit(100.0) == 0
    assert [limiter.admit(100.0 + i / 10) for i in range(1, 10)] == [None] * 9
    assert limiter.admit(101.0) == 9
    assert limiter.admit(101.5) is None
    assert limiter.admit(500.0) == 1


def test_a_burst_of_malformed_requests_logs_one_line_a_second(protocol_error_lines):
    door = Door(max_clients=2000)
    for _ in range(1000):
        proto, transport = door.connect()
        proto.dataReceived(b"*x\r\n")
        # every client still gets its error and is hung up on
        assert transport.value() == b"-ERR Protocol error: invalid multibulk length\r\n"
        assert transport.disconnecting
    assert len(protocol_error_lines) == 1
    assert protocol_error_lines[0]["unlogged"] == 0
    assert door.outcomes()["protocol_error"] == 1000

    door.clock.advance(0.999)
    door.connect()[0].dataReceived(b"*x\r\n")
    assert len(protocol_error_lines) == 1

    door.clock.advance(0.001)
    door.connect()[0].dataReceived(b"*1\r\nx\r\n")
    assert len(protocol_error_lines) == 2
    assert protocol_error_lines[1]["unlogged"] == 1000
    assert protocol_error_lines[1]["problem"] == "Protocol error: expected '$', got 'x'"


def test_each_factory_has_its_own_limit(protocol_error_lines):
    for door in (Door(), Door()):
        door.connect()[0].dataReceived(b"*x\r\n")
    assert len(protocol_error_lines) == 2

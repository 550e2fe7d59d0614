"""The request gate: FIFO, N at once, release on the next turn, drain."""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from redisp.core.gate import Gate, Owner


def test_single_gate_runs_one_at_a_time_in_arrival_order():
    clock = Clock()
    gate = Gate(1, clock)
    order, blockers = [], [Deferred() for _ in range(3)]

    def work(i):
        order.append(("start", i))
        return blockers[i].addCallback(lambda _: order.append(("end", i)))

    for i in range(3):
        gate.run(work, i)
    assert order == [("start", 0)]
    assert not gate.idle() and gate.waiting == 2
    blockers[0].callback(None)
    assert order[-1] == ("end", 0)
    clock.advance(0)
    assert order[-1] == ("start", 1)
    blockers[2].callback(None)  # finishing out of turn changes nothing
    assert ("start", 2) not in order
    blockers[1].callback(None)
    clock.advance(0)
    clock.advance(0)
    assert order == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert gate.idle()


def test_concurrent_gate_admits_n_at_once():
    clock = Clock()
    gate = Gate(3, clock)
    started = []
    blockers = [Deferred() for _ in range(5)]
    for i in range(5):
        gate.run(lambda i=i: started.append(i) or blockers[i])
    assert started == [0, 1, 2]
    assert not gate.idle()
    blockers[1].callback(None)
    clock.advance(0)
    assert started == [0, 1, 2, 3]


def test_results_and_failures_pass_through():
    clock = Clock()
    gate = Gate(1, clock)
    results = []
    gate.run(lambda: 42).addCallback(results.append)
    clock.advance(0)
    gate.run(lambda: 1 / 0).addErrback(lambda f: results.append(f.type))
    clock.advance(0)
    assert results == [42, ZeroDivisionError]
    assert gate.idle()


def test_twenty_thousand_queued_behind_one_slow_request_all_finish():
    """Twisted #9304: synchronous release recursed once per waiter and overflowed."""
    clock = Clock()
    gate = Gate(1, clock)
    slow = Deferred()
    gate.run(lambda: slow)
    done = []
    for i in range(20000):
        gate.run(lambda i=i: i).addCallback(done.append)
    slow.callback(None)
    for _ in range(20001):
        clock.advance(0)
    assert done == list(range(20000))
    assert gate.idle() and gate.waiting == 0


def test_drained_fires_when_the_last_request_finishes():
    clock = Clock()
    gate = Gate(1, clock)
    blocker = Deferred()
    gate.run(lambda: blocker)
    drained = []
    gate.drained(timeout=5).addCallback(drained.append)
    assert drained == []
    blocker.callback(None)
    clock.advance(0)
    assert drained == [None]


def test_drained_gives_up_after_its_timeout():
    clock = Clock()
    gate = Gate(1, clock)
    gate.run(lambda: Deferred())
    drained = []
    gate.drained(timeout=5).addCallback(drained.append)
    clock.advance(5)
    assert drained == [None]


def test_releases_due_in_one_turn_share_one_timer():
    clock = Clock()
    gate = Gate(3, clock)
    blockers = [Deferred() for _ in range(3)]
    for i in range(3):
        gate.run(lambda i=i: blockers[i])
    for blocker in blockers:
        blocker.callback(None)
    assert len(clock.getDelayedCalls()) == 1 and not gate.idle()
    clock.advance(0)
    assert gate.idle() and not clock.getDelayedCalls()


def test_enter_runs_at_once_or_in_turn_and_leave_frees_on_the_next_turn():
    clock = Clock()
    gate = Gate(2, clock)
    started = []
    for i in range(4):
        gate.enter(started.append, i)
    assert started == [0, 1] and gate.waiting == 2
    gate.leave()
    assert started == [0, 1], "a token comes back on the next reactor turn"
    clock.advance(0)
    assert started == [0, 1, 2]
    gate.leave()
    gate.leave()
    clock.advance(0)
    assert started == [0, 1, 2, 3] and gate.idle() and gate.waiting == 0
    gate.leave()
    clock.advance(0)
    assert gate._free == 2


def test_enter_and_run_share_one_queue_in_arrival_order():
    clock = Clock()
    gate = Gate(1, clock)
    order = []
    gate.enter(order.append, "entered")
    gate.run(lambda: order.append("run"))
    gate.enter(order.append, "entered again")
    gate.leave()
    clock.advance(0)  # Clock runs the release "run" schedules in the same advance
    assert order == ["entered", "run", "entered again"]
    gate.leave()
    clock.advance(0)
    assert gate.idle()


def test_a_group_waits_for_all_its_tokens_and_holds_back_later_arrivals():
    clock = Clock()
    gate = Gate(4, clock)
    started = []
    gate.enter(started.append, "one")
    gate.enter(started.append, "two")
    gate.enter_many(3, started.append, "group of three")
    gate.enter(started.append, "late single")
    assert started == ["one", "two"], "the group needs 3 tokens, 2 are free"
    assert gate.waiting == 4 and not gate.idle(), "a free token is not for the late single"
    gate.leave()
    clock.advance(0)
    assert started == ["one", "two", "group of three"]
    gate.leave(4)
    clock.advance(0)
    assert started[-1] == "late single"
    gate.leave()
    clock.advance(0)
    assert gate.idle() and gate.waiting == 0 and gate._free == 4


def test_run_does_not_overtake_a_queued_group():
    clock = Clock()
    gate = Gate(2, clock)
    order = []
    gate.enter(order.append, "running")
    gate.enter_many(2, order.append, "group")
    gate.run(lambda: order.append("run"))
    assert order == ["running"]
    gate.leave()
    clock.advance(0)
    assert order == ["running", "group"]
    gate.leave(2)
    clock.advance(0)
    assert order == ["running", "group", "run"]


# -- requests of a client that has gone ------------------------------------------------


def test_a_gone_owners_waiting_requests_are_dropped_unrun_and_take_no_token():
    """SPEC §4: work of a client that disconnected is dropped at the gate,
    whichever way it entered; requests of others behind it go on in order."""
    clock = Clock()
    gate = Gate(1, clock)
    gone, other = Owner(), Owner()
    started = []
    gate.enter(started.append, "running", owner=gone)
    gate.enter(started.append, "entered", owner=gone)
    gate.enter_many(1, started.append, "group", owner=gone)
    ran = gate.run(lambda: started.append("run"), owner=gone)
    gate.enter(started.append, "other", owner=other)
    gate.enter(started.append, "anonymous")
    assert gate.waiting == 5
    gone.gone = True
    gate.leave()  # the running one, admitted before its client left, finishes
    clock.advance(0)
    assert started == ["running", "other"]
    assert gate.waiting == 1 and gate._free == 0
    assert not ran.called, "a dropped run() never fires"
    gate.leave()
    clock.advance(0)
    assert started == ["running", "other", "anonymous"]
    gate.leave()
    clock.advance(0)
    assert gate.idle() and gate.waiting == 0 and gate._free == 1


def test_a_dropped_group_frees_the_way_for_smaller_requests_behind_it():
    clock = Clock()
    gate = Gate(3, clock)
    gone = Owner()
    started = []
    gate.enter(started.append, "running")
    gate.enter_many(3, started.append, "group", owner=gone)
    gate.enter(started.append, "single")
    gone.gone = True
    gate.leave()
    clock.advance(0)
    assert started == ["running", "single"]


def test_drained_does_not_wait_for_dropped_requests():
    clock = Clock()
    gate = Gate(1, clock)
    gone = Owner()
    gate.enter(lambda: None)
    for _ in range(3):
        gate.enter(lambda: None, owner=gone)
    drained = []
    gate.drained(timeout=5).addCallback(drained.append)
    gone.gone = True
    gate.leave()
    clock.advance(0)
    assert drained == [None] and gate.idle()


# -- leave_now: tokens freed by a backing reply admit the waiters in the same call


def test_leave_now_admits_the_waiters_before_it_returns_in_order():
    clock = Clock()
    gate = Gate(2, clock)
    order = []
    gate.enter_many(2, order.append, "running")
    for i in range(3):
        gate.enter(order.append, i)
    gate.leave_now()
    assert order == ["running", 0]  # admitted inside the call, not on the next turn
    assert gate.waiting == 2 and not clock.getDelayedCalls()
    gate.leave_now(2)
    assert order == ["running", 0, 1, 2]


def test_leave_now_leaves_a_packet_waiting_until_it_has_all_its_tokens():
    clock = Clock()
    gate = Gate(4, clock)
    order = []
    gate.enter_many(4, order.append, "running")
    gate.enter_many(3, order.append, "packet")
    gate.enter(order.append, "behind")
    gate.leave_now()
    gate.leave_now()
    assert order == ["running"] and gate.waiting == 4
    gate.leave_now()
    assert order == ["running", "packet"]  # and "behind" waits its turn: one token is free
    gate.leave_now()
    assert order == ["running", "packet", "behind"]


def test_leave_now_from_admitted_requests_does_not_recurse():
    # each admitted request finishes at once through leave_now: the one loop
    # on the stack takes their tokens back, in order, however long the queue
    clock = Clock()
    gate = Gate(1, clock)
    order = []

    def work(i):
        order.append(i)
        gate.leave_now()

    gate.enter(order.append, "first")
    for i in range(5000):
        gate.enter(work, i)
    gate.leave_now()
    assert order == ["first"] + list(range(5000))
    assert gate.idle() and gate.waiting == 0


def test_leave_inside_leave_now_still_waits_for_the_next_turn():
    clock = Clock()
    gate = Gate(1, clock)
    order = []

    def hit(i):
        order.append(i)
        gate.leave()

    gate.enter(order.append, "first")
    gate.enter(hit, 0)
    gate.enter(hit, 1)
    gate.leave_now()
    assert order == ["first", 0]
    clock.advance(0)
    assert order == ["first", 0, 1]


def test_leave_now_drops_the_waiters_of_a_gone_client_and_admits_the_next():
    clock = Clock()
    gate = Gate(1, clock)
    order = []
    gone = Owner()
    gate.enter(order.append, "first")
    gate.enter(order.append, "of the gone client", owner=gone)
    gate.enter(order.append, "next")
    gone.gone = True
    gate.leave_now()
    assert order == ["first", "next"] and gate.waiting == 0


def test_leave_now_enter_inside_an_admission_keeps_arrival_order():
    clock = Clock()
    gate = Gate(1, clock)
    order = []

    def admitted(i):
        order.append(i)
        gate.enter(order.append, f"after {i}")  # queued behind those already waiting
        gate.leave_now()

    gate.enter(order.append, "first")
    gate.enter(admitted, 0)
    gate.enter(admitted, 1)
    gate.leave_now()
    assert order == ["first", 0, 1, "after 0"]
    gate.leave_now()
    assert order == ["first", 0, 1, "after 0", "after 1"]


def test_drained_after_leave_now_fires_on_the_next_turn():
    clock = Clock()
    gate = Gate(2, clock)
    gate.enter(lambda: None)
    fired = []
    gate.drained(5.0).addCallback(fired.append)
    gate.leave_now()
    assert fired == []  # the finished request still answers its client first
    clock.advance(0)
    assert fired == [None]

"""
Tests for dispatch modes, terminal states, poison messages and cancellation
in :class:`taskmesh.master.MasterService`, on a fake clock and broker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from taskmesh._messages import (
    AcceptedMessage,
    Announcement,
    CancelMessage,
    Destinations,
    DispatchMode,
    ErrorMessage,
    Message,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
    new_request_id,
)
from taskmesh.master import (
    MasterService,
    RequestAlreadyEnded,
    RequestNotFound,
    StoreError,
    TaskOutcome,
    TaskState,
)
from taskmesh.master._states import (
    TRANSITIONS,
    InvalidTransition,
    TaskEvent,
    find_transition,
)
from taskmesh.stomp import NotConnected, StompMessage
from taskmesh.testing import FakeBroker, FakeConnection

NAMESPACE = "testns"
DESTINATIONS = Destinations(NAMESPACE)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    broker = FakeBroker()
    yield broker
    assert broker.handler_failures == []


@pytest.fixture
def connection(broker: FakeBroker) -> FakeConnection:
    """
    The master's connection.
    """
    return broker.connect()


@pytest.fixture
def slaves(broker: FakeBroker) -> FakeConnection:
    """
    A connection on which the tests send what slaves would send.
    """
    return broker.connect()


@pytest.fixture
def database(tmp_path: Path) -> str:
    return str(tmp_path / "master.sqlite3")


@pytest.fixture
def master(clock: Clock, connection: FakeConnection, database: str) -> Iterator[MasterService]:
    service = MasterService(
        connection, NAMESPACE, clock=clock, default_timeout=30.0, database=database
    )
    service.startService()
    yield service
    if service.running:
        stopped = service.stopService()
        assert stopped.called
    assert clock.getDelayedCalls() == []


def send(connection: FakeConnection, destination: str, message: Message) -> None:
    headers, body = encode(message)
    connection.send(destination, body, headers)


def announce(slaves: FakeConnection, slave_id: str, **tags: str) -> None:
    announcement = Announcement(slave_id, SlaveState.UP, tasks=("sleep",), interval=1000, tags=tags)
    send(slaves, DESTINATIONS.presence, announcement)


def reply(slaves: FakeConnection, message: Message) -> None:
    send(slaves, DESTINATIONS.reply, message)


def sent_messages(broker: FakeBroker, destination: str) -> list[Message]:
    return [decode(headers, body) for headers, body in broker.sent_to(destination)]


def last_task(broker: FakeBroker, destination: str) -> TaskMessage:
    tasks = sent_messages(broker, destination)
    assert tasks, f"no task was sent to {destination}"
    message = tasks[-1]
    assert isinstance(message, TaskMessage)
    return message


def cancels(broker: FakeBroker) -> list[Message]:
    return sent_messages(broker, DESTINATIONS.control)


def only_housekeeping_left(clock: Clock) -> bool:
    """
    Whether every delayed call left is a housekeeping tick, not a request timer.
    """
    return all(call.getTime() - clock.seconds() <= 1.0 for call in clock.getDelayedCalls())


def outcome_of(deferred: Deferred[TaskOutcome]) -> TaskOutcome:
    results: list[TaskOutcome] = []
    failures: list[Any] = []
    deferred.addCallbacks(results.append, failures.append)
    assert failures == []
    assert len(results) == 1, "the request has not finished"
    return results[0]


# -- Transition table ------------------------------------------------------------


def test_every_event_leaves_pending_for_terminal_state() -> None:
    for event in TaskEvent:
        transition = find_transition(TaskState.PENDING, event)
        assert transition.target.is_terminal


def test_terminal_states_have_no_transitions() -> None:
    sources = {transition.source for transition in TRANSITIONS}
    assert sources == {TaskState.PENDING}
    with pytest.raises(InvalidTransition, match="succeeded cannot take the event cancel_requested"):
        find_transition(TaskState.SUCCEEDED, TaskEvent.CANCEL_REQUESTED)


# -- Queue mode ------------------------------------------------------------------


def test_queue_task_goes_to_work_queue(
    master: MasterService, broker: FakeBroker, clock: Clock
) -> None:
    master.dispatch("sleep", {"seconds": 1}, mode="queue", timeout=20, max_attempts=2)

    message = last_task(broker, DESTINATIONS.work())
    assert message.mode is DispatchMode.QUEUE
    assert message.max_attempts == 2
    assert message.deadline == clock.seconds() + 20
    assert message.start_by == clock.seconds() + 20
    assert broker.sent_to(DESTINATIONS.tasks) == []
    [(headers, _)] = broker.sent_to(DESTINATIONS.work())
    assert headers["persistent"] == "true"
    assert "expires" in headers


def test_queue_selector_picks_tag_queue(master: MasterService, broker: FakeBroker) -> None:
    master.dispatch("sleep", {}, mode=DispatchMode.QUEUE, selector={"role": "db"})

    message = last_task(broker, "/queue/testns.work.role.db")
    assert message.selector == {"role": "db"}


def test_queue_selector_two_tags_rejected(master: MasterService, broker: FakeBroker) -> None:
    with pytest.raises(ValueError, match="at most one tag"):
        master.dispatch("sleep", {}, mode="queue", selector={"role": "db", "zone": "a"})

    assert broker.sent_to(DESTINATIONS.work()) == []
    assert broker.sent_to("/queue/testns.work.role.db") == []
    assert master.recent_requests() == []


def test_queue_first_result_succeeds(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection, clock: Clock
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    reply(slaves, AcceptedMessage(request_id, "b1"))
    assert not deferred.called
    reply(slaves, ResultMessage(request_id, "b1", {"slept": 1}))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.mode is DispatchMode.QUEUE
    assert outcome.results == {"b1": {"slept": 1}}
    assert outcome.reason == "slave b1 returned a result"
    assert outcome.missing == ()
    assert [(a.slave_id, a.attempt) for a in outcome.attempts] == [("b1", 1)]
    assert cancels(broker) == []
    assert only_housekeeping_left(clock)


def test_queue_later_result_is_duplicate(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, ResultMessage(request_id, "b1", 1))

    reply(slaves, ResultMessage(request_id, "b2", 2))
    reply(slaves, ErrorMessage(request_id, "b3", "ValueError", "late"))

    assert master.stats["duplicate_replies"] == 2
    assert master.stats["late_replies"] == 0
    record = master.get_request(request_id)
    assert record is not None
    assert record.results == {"b1": 1}


def test_queue_first_error_fails(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    reply(slaves, ErrorMessage(request_id, "b2", "ValueError", "seconds must be positive"))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.FAILED
    assert outcome.errors == {"b2": ("ValueError", "seconds must be positive")}
    assert "b2 (ValueError)" in outcome.reason


def test_queue_expired_error_is_expired(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue", ttl=5)
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    reply(slaves, ErrorMessage(request_id, "b1", "Expired", "start_by passed"))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.EXPIRED
    assert outcome.reason == "1 slave skipped the task because its time-to-live of 5 s had ended: b1"


def test_queue_not_started_expires_at_start_by(
    master: MasterService, broker: FakeBroker, clock: Clock
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue", timeout=30, ttl=5)
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    clock.advance(4.9)
    assert not deferred.called
    clock.advance(0.1)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.EXPIRED
    assert outcome.reason == "no slave started the task within its time-to-live of 5 s"
    assert cancels(broker) == [
        CancelMessage(request_id, f"request ended as expired: {outcome.reason}")
    ]


def test_queue_with_tag_not_started_names_tag(
    master: MasterService, clock: Clock
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue", selector={"role": "db"}, timeout=10)

    clock.advance(10)

    assert outcome_of(deferred).reason == (
        "no slave with the tag role=db started the task within its time-to-live of 10 s"
    )


def test_queue_started_waits_past_start_by(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection, clock: Clock
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue", timeout=30, ttl=5)
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, AcceptedMessage(request_id, "b1"))

    clock.advance(5)
    assert not deferred.called
    reply(slaves, ResultMessage(request_id, "b1", "done"))

    assert outcome_of(deferred).state is TaskState.SUCCEEDED


def test_queue_started_times_out_naming_slave(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection, clock: Clock
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue", timeout=30)
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, AcceptedMessage(request_id, "b1"))
    reply(slaves, AcceptedMessage(request_id, "b2", attempt=2, redelivered=True))

    clock.advance(30)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.TIMED_OUT
    assert outcome.reason == "started by b1 (attempt 1), b2 (attempt 2) but no result within 30 s"
    assert outcome.missing == ("b1", "b2")
    [cancel] = cancels(broker)
    assert isinstance(cancel, CancelMessage)
    assert cancel.request_id == request_id


# -- Direct mode -----------------------------------------------------------------


def test_direct_task_goes_to_slave_queue(master: MasterService, broker: FakeBroker) -> None:
    master.dispatch("sleep", {}, mode="direct", target="b7")

    message = last_task(broker, DESTINATIONS.direct("b7"))
    assert message.mode is DispatchMode.DIRECT
    assert message.target == "b7"
    record = master.get_request(message.request_id)
    assert record is not None
    assert record.expected == ("b7",)
    assert record.missing == ("b7",)


def test_direct_not_started_names_slave(master: MasterService, clock: Clock) -> None:
    deferred = master.dispatch("sleep", {}, mode="direct", target="b7", timeout=8)

    clock.advance(8)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.EXPIRED
    assert outcome.reason == "slave b7 did not start the task within its time-to-live of 8 s"
    assert outcome.missing == ("b7",)


def test_direct_result_succeeds(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    deferred = master.dispatch("sleep", {}, mode="direct", target="b7")
    request_id = last_task(broker, DESTINATIONS.direct("b7")).request_id

    reply(slaves, AcceptedMessage(request_id, "b7"))
    reply(slaves, ResultMessage(request_id, "b7", [1]))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.missing == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "fanout"}, "invalid mode 'fanout': expected one of broadcast, queue, direct"),
        ({"mode": "direct"}, "a direct task needs a target slave id"),
        ({"mode": "direct", "target": "no spaces"}, "invalid slave id 'no spaces'"),
        ({"mode": "direct", "target": "b1", "selector": {"a": "b"}}, "takes no selector tags"),
        ({"mode": "queue", "target": "b1"}, "only for direct tasks, not queue tasks"),
        ({"target": "b1"}, "only for direct tasks, not broadcast tasks"),
        ({"selector": {"role": "d b"}}, "invalid tag 'role'='d b'"),
        ({"selector": ["role"]}, "selector must be a mapping"),
        ({"timeout": 10, "ttl": 11}, "ttl 11 s is longer than the timeout 10 s"),
        ({"ttl": 0}, "ttl must be a positive number of seconds"),
        ({"max_attempts": 0}, "max_attempts must be a positive integer, not 0"),
        ({"max_attempts": True}, "max_attempts must be a positive integer, not True"),
    ],
)
def test_dispatch_rejects_invalid_options(
    master: MasterService, broker: FakeBroker, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        master.dispatch("sleep", {}, **options)

    assert master.recent_requests() == []


# -- Broadcast selector and time-to-live -------------------------------------------


def test_broadcast_selector_filters_expected(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    announce(slaves, "b1", zone="a", role="db")
    announce(slaves, "b2", zone="b", role="db")
    announce(slaves, "b3", zone="a")

    master.dispatch("sleep", {}, selector={"zone": "a", "role": "db"})

    message = last_task(broker, DESTINATIONS.tasks)
    assert message.selector == {"zone": "a", "role": "db"}
    record = master.get_request(message.request_id)
    assert record is not None
    assert record.expected == ("b1",)


def test_unmatched_selector_expires_at_deadline(
    master: MasterService, slaves: FakeConnection, clock: Clock
) -> None:
    announce(slaves, "b1", zone="a")
    deferred = master.dispatch("sleep", {}, selector={"zone": "b"}, timeout=20, ttl=5)

    clock.advance(19)
    assert not deferred.called
    clock.advance(1)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.EXPIRED
    assert outcome.reason == (
        "no live slave matched the tags zone=b at dispatch and none replied within 20 s"
    )


def test_broadcast_timed_out_marks_started_slaves(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection, clock: Clock
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    deferred = master.dispatch("sleep", {}, timeout=10)
    request_id = last_task(broker, DESTINATIONS.tasks).request_id
    reply(slaves, AcceptedMessage(request_id, "b1"))

    clock.advance(10)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.TIMED_OUT
    assert outcome.reason == "2 of 2 slaves did not reply within 10 s: b1 (started), b2"


def test_broadcast_all_expired_errors_expire(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    deferred = master.dispatch("sleep", {}, ttl=3)
    request_id = last_task(broker, DESTINATIONS.tasks).request_id

    reply(slaves, ErrorMessage(request_id, "b1", "Expired", "too late"))
    reply(slaves, ErrorMessage(request_id, "b2", "Expired", "too late"))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.EXPIRED
    assert "2 slaves skipped the task" in outcome.reason


def test_broadcast_mixed_expired_error_fails(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    deferred = master.dispatch("sleep", {})
    request_id = last_task(broker, DESTINATIONS.tasks).request_id

    reply(slaves, ErrorMessage(request_id, "b1", "Expired", "too late"))
    reply(slaves, ResultMessage(request_id, "b2", 1))

    assert outcome_of(deferred).state is TaskState.FAILED


def test_ttl_passed_to_broker_and_body(
    master: MasterService, connection: FakeConnection, broker: FakeBroker, clock: Clock
) -> None:
    ttls: list[float | None] = []
    send_without_spy = connection.send

    def send_with_spy(
        destination: str,
        body: bytes,
        headers: Any = None,
        *,
        receipt: bool = False,
        persistent: bool = False,
        ttl: float | None = None,
    ) -> Deferred[None]:
        ttls.append(ttl)
        return send_without_spy(
            destination, body, headers, receipt=receipt, persistent=persistent, ttl=ttl
        )

    connection.send = send_with_spy  # type: ignore[method-assign]

    master.dispatch("sleep", {}, mode="queue", timeout=30, ttl=7.5)

    assert ttls == [7.5]
    message = last_task(broker, DESTINATIONS.work())
    assert message.start_by == clock.seconds() + 7.5
    assert message.deadline == clock.seconds() + 30


def test_default_ttl_capped_at_timeout(
    clock: Clock, connection: FakeConnection, broker: FakeBroker
) -> None:
    service = MasterService(
        connection, NAMESPACE, clock=clock, default_timeout=30.0, default_ttl=10.0
    )
    service.startService()

    service.dispatch("sleep", {}, mode="queue")
    service.dispatch("sleep", {}, mode="queue", timeout=4)

    first, second = sent_messages(broker, DESTINATIONS.work())
    assert isinstance(first, TaskMessage) and isinstance(second, TaskMessage)
    assert first.start_by == clock.seconds() + 10
    assert second.start_by == clock.seconds() + 4
    service.stopService()


# -- Exactly one outcome -----------------------------------------------------------


def test_deferred_fires_exactly_once(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection, clock: Clock
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue", timeout=5)
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    outcomes: list[TaskOutcome] = []
    deferred.addCallback(outcomes.append)

    reply(slaves, ResultMessage(request_id, "b1", 1))
    reply(slaves, ErrorMessage(request_id, "b1", "ValueError", "again"))
    clock.advance(5)
    deferred.cancel()
    with pytest.raises(RequestAlreadyEnded):
        master.cancel(request_id)

    assert [outcome.state for outcome in outcomes] == [TaskState.SUCCEEDED]
    ended = sum(master.stats[state.value] for state in TaskState if state.is_terminal)
    assert ended == 1


def test_every_terminal_state_reached_once(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection, clock: Clock
) -> None:
    succeeded = master.dispatch("sleep", {}, mode="queue", timeout=10)
    succeeded_id = last_task(broker, DESTINATIONS.work()).request_id
    failed = master.dispatch("sleep", {}, mode="queue", timeout=10)
    failed_id = last_task(broker, DESTINATIONS.work()).request_id
    timed_out = master.dispatch("sleep", {}, mode="queue", timeout=10)
    timed_out_id = last_task(broker, DESTINATIONS.work()).request_id
    expired = master.dispatch("sleep", {}, mode="queue", timeout=10)
    cancelled = master.dispatch("sleep", {}, mode="queue", timeout=10)

    reply(slaves, ResultMessage(succeeded_id, "b1", 1))
    reply(slaves, ErrorMessage(failed_id, "b1", "KeyError", "x"))
    reply(slaves, AcceptedMessage(timed_out_id, "b2"))
    cancelled.cancel()
    clock.advance(10)

    assert outcome_of(succeeded).state is TaskState.SUCCEEDED
    assert outcome_of(failed).state is TaskState.FAILED
    assert outcome_of(timed_out).state is TaskState.TIMED_OUT
    assert outcome_of(expired).state is TaskState.EXPIRED
    assert outcome_of(cancelled).state is TaskState.CANCELLED
    for state in TaskState:
        if state.is_terminal:
            assert master.stats[state.value] == 1, state


# -- Accepted messages and poison messages -------------------------------------------


def test_poison_after_max_attempts(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue", max_attempts=2)
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    reply(slaves, AcceptedMessage(request_id, "b1", attempt=1))
    reply(slaves, AcceptedMessage(request_id, "b2", attempt=1, redelivered=True))
    assert not deferred.called
    reply(slaves, AcceptedMessage(request_id, "b1", attempt=2, redelivered=True))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.FAILED
    assert outcome.reason == "poison message: started 3 times without a result (slaves b1, b2, b1)"
    assert cancels(broker) == [
        CancelMessage(request_id, f"request ended as failed: {outcome.reason}")
    ]
    assert master.stats["poison_messages"] == 1
    assert master.stats["accepted"] == 3


def test_broadcast_never_poison(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    announce(slaves, "b1")
    deferred = master.dispatch("sleep", {}, max_attempts=1)
    request_id = last_task(broker, DESTINATIONS.tasks).request_id

    reply(slaves, AcceptedMessage(request_id, "b1", attempt=1))
    reply(slaves, AcceptedMessage(request_id, "b1", attempt=2))

    assert not deferred.called


def test_duplicate_accepted_counted(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    master.dispatch("sleep", {}, mode="queue", max_attempts=1)
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    reply(slaves, AcceptedMessage(request_id, "b1", attempt=1))
    reply(slaves, AcceptedMessage(request_id, "b1", attempt=1))

    record = master.get_request(request_id)
    assert record is not None
    assert record.state is TaskState.PENDING
    assert len(record.attempts) == 1
    assert master.stats["duplicate_accepted"] == 1


def test_accepted_after_end_gets_cancel(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, ResultMessage(request_id, "b1", 1))

    reply(slaves, AcceptedMessage(request_id, "b2", attempt=1, redelivered=True))

    [cancel] = cancels(broker)
    assert isinstance(cancel, CancelMessage)
    assert cancel.request_id == request_id
    assert cancel.reason.startswith(f"request {request_id} already ended as succeeded")
    assert master.stats["accepted_after_end"] == 1


def test_accepted_after_cancel_gets_cancel(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    master.cancel(request_id, "wrong input")

    reply(slaves, AcceptedMessage(request_id, "b1"))

    assert [c.request_id for c in cancels(broker) if isinstance(c, CancelMessage)] == [
        request_id,
        request_id,
    ]
    assert master.stats["accepted_after_end"] == 1


def test_accepted_for_unknown_request_counted(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    reply(slaves, AcceptedMessage(new_request_id(), "b1"))

    assert master.stats["unknown_replies"] == 1
    assert cancels(broker) == []


# -- Cancellation ----------------------------------------------------------------------


def test_cancel_method_ends_request(
    master: MasterService, broker: FakeBroker, clock: Clock
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    record = master.cancel(request_id, "wrong input")

    assert record.state is TaskState.CANCELLED
    assert record.reason == "wrong input"
    assert outcome_of(deferred).state is TaskState.CANCELLED
    assert cancels(broker) == [
        CancelMessage(request_id, "request ended as cancelled: wrong input")
    ]
    assert only_housekeeping_left(clock)


def test_cancel_deferred_sends_cancel(master: MasterService, broker: FakeBroker) -> None:
    deferred = master.dispatch("sleep", {}, mode="direct", target="b1")
    request_id = last_task(broker, DESTINATIONS.direct("b1")).request_id

    deferred.cancel()

    assert outcome_of(deferred).reason == "cancelled by the caller"
    assert cancels(broker) == [
        CancelMessage(request_id, "request ended as cancelled: cancelled by the caller")
    ]


def test_cancel_unknown_request(master: MasterService) -> None:
    with pytest.raises(RequestNotFound, match="not found"):
        master.cancel(new_request_id())


def test_cancel_finished_request(
    master: MasterService, broker: FakeBroker, slaves: FakeConnection
) -> None:
    master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, ResultMessage(request_id, "b1", 1))

    with pytest.raises(RequestAlreadyEnded) as raised:
        master.cancel(request_id)

    assert raised.value.record.state is TaskState.SUCCEEDED
    assert cancels(broker) == []


def test_send_failure_sends_no_cancel(
    master: MasterService, broker: FakeBroker
) -> None:
    broker.reject_destination(DESTINATIONS.work(), "not authorized")

    outcome = outcome_of(master.dispatch("sleep", {}, mode="queue"))

    assert outcome.state is TaskState.FAILED
    assert f"could not send the task to {DESTINATIONS.work()}" in outcome.reason
    assert cancels(broker) == []


# -- Reply queue acknowledgements ----------------------------------------------------


def reply_subscription(connection: FakeConnection) -> Any:
    [subscription] = [s for s in connection.subscriptions if s.destination == DESTINATIONS.reply]
    return subscription


def test_replies_acknowledged_after_storing(
    master: MasterService, connection: FakeConnection, broker: FakeBroker, slaves: FakeConnection
) -> None:
    master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    reply(slaves, AcceptedMessage(request_id, "b1"))
    reply(slaves, ProgressMessage(request_id, "b1", 50.0))
    reply(slaves, ResultMessage(request_id, "b1", 1))
    slaves.send(DESTINATIONS.reply, b"not json", {"taskmesh-type": "result"})

    subscription = reply_subscription(connection)
    assert subscription.ack == "client-individual"
    assert subscription.unacked == {}


def test_reply_not_acknowledged_when_store_fails(
    master: MasterService, connection: FakeConnection, broker: FakeBroker, slaves: FakeConnection
) -> None:
    deferred = master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    def fail_to_store(request_id: str, slave_id: str, result: Any, received_at: float) -> None:
        raise StoreError("cannot write to the master database: disk I/O error")

    master._store.add_result = fail_to_store  # type: ignore[method-assign]

    with capturedLogs() as events:
        reply(slaves, ResultMessage(request_id, "b1", 1))

    assert not deferred.called
    assert len(reply_subscription(connection).unacked) == 1
    assert master.stats["store_failures"] == 1
    [event] = [e for e in events if "database failure" in e["log_format"]]
    assert event["request_id"] == request_id


# -- Discover after each session ----------------------------------------------------------


def test_discover_after_quick_reconnect(
    master: MasterService, connection: FakeConnection, broker: FakeBroker
) -> None:
    connection.disconnect()
    connection.reconnect()
    connection.disconnect()
    connection.reconnect()

    assert len(broker.sent_to(DESTINATIONS.presence)) == 3
    assert master.stats["discovers_sent"] == 3


def test_acknowledgement_retried_after_session(
    master: MasterService, connection: FakeConnection, broker: FakeBroker, slaves: FakeConnection
) -> None:
    # RabbitMQ delivers queued replies while subscriptions are restored, before
    # the client reports the session, and the client rejects that ACK.
    acknowledged: list[str] = []

    def ack_before_session(message: StompMessage) -> Deferred[None]:
        acknowledged.append(message.message_id)
        if len(acknowledged) == 1:
            connection.disconnect("session not established yet")
            return fail(NotConnected("not connected to the broker yet"))
        return succeed(None)

    connection.ack = ack_before_session  # type: ignore[method-assign]
    master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, AcceptedMessage(request_id, "b1"))
    assert len(acknowledged) == 1

    connection.reconnect()

    # The retry comes first. The fake broker then also delivers the message
    # again, because the disconnect took it back, and the copy is a duplicate.
    assert len(acknowledged) == 3
    assert len(set(acknowledged)) == 1
    assert master.stats["ack_failures"] == 0
    assert master.stats["duplicate_accepted"] == 1


def test_stale_acknowledgement_counted(
    master: MasterService, connection: FakeConnection, broker: FakeBroker, slaves: FakeConnection
) -> None:
    def ack_on_old_connection(message: StompMessage) -> Deferred[None]:
        return fail(NotConnected("it arrived on an earlier connection"))

    connection.ack = ack_on_old_connection  # type: ignore[method-assign]

    with capturedLogs() as events:
        reply(slaves, AcceptedMessage(new_request_id(), "b1"))

    assert master.stats["ack_failures"] == 1
    assert any("could not acknowledge" in e["log_format"] for e in events)

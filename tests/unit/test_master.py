"""
Tests for :class:`taskmesh.master.MasterService` on a fake clock and broker.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from taskmesh._messages import (
    Announcement,
    Destinations,
    DiscoverMessage,
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
from taskmesh.master import MasterService, TaskOutcome, TaskState
from taskmesh.slave import HandlerRegistry, SlaveService, register_builtin_handlers
from taskmesh.testing import (
    FakeBroker,
    FakeConnection,
    SynchronousReactorThreads,
    SynchronousThreadPool,
)

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
def master(clock: Clock, connection: FakeConnection) -> Iterator[MasterService]:
    service = MasterService(connection, NAMESPACE, clock=clock, default_timeout=30.0)
    service.startService()
    yield service
    if service.running:
        stopped = service.stopService()
        assert stopped.called
    assert clock.getDelayedCalls() == []


def send(connection: FakeConnection, destination: str, message: Message) -> None:
    headers, body = encode(message)
    connection.send(destination, body, headers)


def announce(
    slaves: FakeConnection,
    slave_id: str,
    state: SlaveState = SlaveState.UP,
    *,
    interval: float = 10.0,
    tasks: tuple[str, ...] = ("sleep",),
) -> None:
    announcement = Announcement(
        slave_id,
        state,
        tasks=tasks,
        interval=interval,
        hostname=f"{slave_id}.example",
        pid=100,
        tags={"zone": "a"},
    )
    send(slaves, DESTINATIONS.presence, announcement)


def reply(slaves: FakeConnection, message: Message) -> None:
    send(slaves, DESTINATIONS.reply, message)


def sent_messages(broker: FakeBroker, destination: str) -> list[Message]:
    return [decode(headers, body) for headers, body in broker.sent_to(destination)]


def outcome_of(deferred: Deferred[TaskOutcome]) -> TaskOutcome:
    results: list[TaskOutcome] = []
    failures: list[Any] = []
    deferred.addCallbacks(results.append, failures.append)
    assert failures == []
    assert len(results) == 1, "the request has not finished"
    return results[0]


def last_task(broker: FakeBroker) -> TaskMessage:
    tasks = sent_messages(broker, DESTINATIONS.tasks)
    assert tasks, "no task was sent"
    message = tasks[-1]
    assert isinstance(message, TaskMessage)
    return message


def only_housekeeping_left(clock: Clock) -> bool:
    """
    Whether every delayed call left is a housekeeping tick, not a deadline.
    """
    return all(call.getTime() - clock.seconds() <= 1.0 for call in clock.getDelayedCalls())


# -- Start, presence and discovery ---------------------------------------------


def test_start_subscribes_reply_and_presence(
    master: MasterService, connection: FakeConnection
) -> None:
    destinations = sorted(s.destination for s in connection.subscriptions)

    assert destinations == sorted([DESTINATIONS.reply, DESTINATIONS.presence])


def test_discover_sent_on_connect(master: MasterService, broker: FakeBroker) -> None:
    discovers = sent_messages(broker, DESTINATIONS.presence)

    assert discovers == [DiscoverMessage()]
    assert master.stats["discovers_sent"] == 1


def test_discover_sent_again_after_reconnect(
    master: MasterService, connection: FakeConnection, broker: FakeBroker, clock: Clock
) -> None:
    connection.disconnect()
    clock.advance(1.0)
    assert len(sent_messages(broker, DESTINATIONS.presence)) == 1

    connection.reconnect()

    assert sent_messages(broker, DESTINATIONS.presence) == [DiscoverMessage(), DiscoverMessage()]


def test_discover_waits_for_first_connect(clock: Clock, broker: FakeBroker) -> None:
    connection = broker.connect(connected=False)
    service = MasterService(connection, NAMESPACE, clock=clock)
    service.startService()
    assert broker.sent == []

    connection.reconnect()

    assert sent_messages(broker, DESTINATIONS.presence) == [DiscoverMessage()]
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_announcement_makes_slave_live(
    master: MasterService, clock: Clock, slaves: FakeConnection
) -> None:
    announce(slaves, "b1", tasks=("sleep", "echo"))

    [slave] = master.live_slaves()
    assert slave.slave_id == "b1"
    assert slave.hostname == "b1.example"
    assert slave.pid == 100
    assert slave.tasks == ("sleep", "echo")
    assert slave.tags == {"zone": "a"}
    assert slave.last_seen == clock.seconds()


def test_alive_updates_last_seen(
    master: MasterService, clock: Clock, slaves: FakeConnection
) -> None:
    announce(slaves, "b1")
    first_seen = clock.seconds()
    clock.advance(5)

    announce(slaves, "b1", SlaveState.ALIVE)

    [slave] = master.live_slaves()
    assert slave.first_seen == first_seen
    assert slave.last_seen == first_seen + 5


def test_down_removes_slave(master: MasterService, slaves: FakeConnection) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")

    announce(slaves, "b1", SlaveState.DOWN)

    assert [s.slave_id for s in master.live_slaves()] == ["b2"]


def test_silent_slave_expires(master: MasterService, clock: Clock, slaves: FakeConnection) -> None:
    announce(slaves, "b1", interval=10.0)
    announce(slaves, "b2", interval=100.0)

    clock.advance(30)
    assert [s.slave_id for s in master.live_slaves()] == ["b1", "b2"]

    clock.advance(1)
    assert [s.slave_id for s in master.live_slaves()] == ["b2"]
    assert master.stats["slaves_expired"] == 1


def test_alive_keeps_slave_from_expiring(
    master: MasterService, clock: Clock, slaves: FakeConnection
) -> None:
    announce(slaves, "b1", interval=10.0)
    for _ in range(5):
        clock.advance(10)
        announce(slaves, "b1", SlaveState.ALIVE)

    clock.advance(25)

    assert [s.slave_id for s in master.live_slaves()] == ["b1"]


def test_stop_while_disconnected_leaves_no_waiter(clock: Clock, broker: FakeBroker) -> None:
    connection = broker.connect(connected=False)
    service = MasterService(connection, NAMESPACE, clock=clock)
    service.startService()

    stopped = service.stopService()
    connection.reconnect()

    assert stopped.called
    assert broker.sent == []
    assert clock.getDelayedCalls() == []


def test_discover_from_other_master_ignored(master: MasterService, slaves: FakeConnection) -> None:
    send(slaves, DESTINATIONS.presence, DiscoverMessage())

    assert master.stats["invalid_messages"] == 0
    assert master.live_slaves() == []


# -- Dispatch ------------------------------------------------------------------


def test_dispatch_sends_task_with_receipt(
    master: MasterService, connection: FakeConnection, broker: FakeBroker, clock: Clock
) -> None:
    options: list[tuple[bool, bool, float | None]] = []
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
        options.append((receipt, persistent, ttl))
        return send_without_spy(
            destination, body, headers, receipt=receipt, persistent=persistent, ttl=ttl
        )

    connection.send = send_with_spy  # type: ignore[method-assign]

    master.dispatch("sleep", {"seconds": 5}, timeout=10)

    assert options == [(True, True, 10.0)]
    message = last_task(broker)
    assert isinstance(message, TaskMessage)
    assert message.task == "sleep"
    assert message.args == {"seconds": 5}
    assert message.reply_to == DESTINATIONS.reply
    assert message.deadline == clock.seconds() + 10
    assert message.start_by == clock.seconds() + 10


def test_dispatch_records_expected_slaves(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b2")
    announce(slaves, "b1")

    master.dispatch("sleep", {})

    record = master.get_request(last_task(broker).request_id)
    assert record is not None
    assert record.state is TaskState.PENDING
    assert record.expected == ("b1", "b2")
    assert record.missing == ("b1", "b2")


def test_both_results_complete_request(
    master: MasterService, clock: Clock, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    deferred = master.dispatch("sleep", {"seconds": 1})
    request_id = last_task(broker).request_id

    reply(slaves, ResultMessage(request_id, "b1", {"slept": 1}))
    assert not deferred.called
    reply(slaves, ResultMessage(request_id, "b2", [1, 2]))

    outcome = outcome_of(deferred)
    assert outcome.request_id == request_id
    assert outcome.task == "sleep"
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.results == {"b1": {"slept": 1}, "b2": [1, 2]}
    assert outcome.errors == {}
    assert outcome.missing == ()
    assert master.stats["succeeded"] == 1
    assert only_housekeeping_left(clock)


def test_progress_routed_to_callback_and_record(
    master: MasterService, clock: Clock, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    reports: list[ProgressMessage] = []
    master.dispatch("sleep", {}, on_progress=reports.append)
    request_id = last_task(broker).request_id
    clock.advance(0.5)

    reply(slaves, ProgressMessage(request_id, "b1", 40.0, "slept 2 of 5 s"))

    assert reports == [ProgressMessage(request_id, "b1", 40.0, "slept 2 of 5 s")]
    record = master.get_request(request_id)
    assert record is not None
    assert record.progress["b1"].percent == 40.0
    assert record.progress["b1"].message == "slept 2 of 5 s"
    assert record.progress["b1"].updated_at == clock.seconds()


def test_progress_for_other_request_not_routed(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    first: list[ProgressMessage] = []
    second: list[ProgressMessage] = []
    master.dispatch("sleep", {}, on_progress=first.append)
    first_id = last_task(broker).request_id
    master.dispatch("sleep", {}, on_progress=second.append)

    reply(slaves, ProgressMessage(first_id, "b1", 10.0))

    assert len(first) == 1
    assert second == []


def test_failing_progress_callback_is_logged(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")

    def broken(progress: ProgressMessage) -> None:
        raise RuntimeError("broken callback")

    deferred = master.dispatch("sleep", {}, on_progress=broken)
    request_id = last_task(broker).request_id

    with capturedLogs() as events:
        reply(slaves, ProgressMessage(request_id, "b1", 10.0))
    reply(slaves, ResultMessage(request_id, "b1", None))

    assert any("log_failure" in event for event in events)
    assert outcome_of(deferred).state is TaskState.SUCCEEDED


def test_deadline_names_missing_slave(
    master: MasterService, clock: Clock, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1", interval=100)
    announce(slaves, "b2", interval=100)
    deferred = master.dispatch("sleep", {}, timeout=20)
    request_id = last_task(broker).request_id
    reply(slaves, ResultMessage(request_id, "b1", "done"))

    clock.advance(19.5)
    assert not deferred.called
    clock.advance(0.5)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.TIMED_OUT
    assert outcome.missing == ("b2",)
    assert outcome.results == {"b1": "done"}
    assert "b2" in outcome.reason
    assert "20 s" in outcome.reason


def test_error_reply_fails_request(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    deferred = master.dispatch("sleep", {})
    request_id = last_task(broker).request_id

    reply(slaves, ResultMessage(request_id, "b1", 1))
    reply(slaves, ErrorMessage(request_id, "b2", "ValueError", "seconds must be positive"))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.FAILED
    assert outcome.results == {"b1": 1}
    assert outcome.errors == {"b2": ("ValueError", "seconds must be positive")}
    assert outcome.missing == ()
    assert "b2 (ValueError)" in outcome.reason


def test_error_and_missing_slave_is_failed(
    master: MasterService, clock: Clock, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1", interval=100)
    announce(slaves, "b2", interval=100)
    deferred = master.dispatch("sleep", {}, timeout=5)
    request_id = last_task(broker).request_id
    reply(slaves, ErrorMessage(request_id, "b1", "UnknownTask", "no handler for 'sleep'"))

    clock.advance(5)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.FAILED
    assert outcome.missing == ("b2",)
    assert "did not reply" in outcome.reason


def test_unknown_request_id_counted(master: MasterService, slaves: FakeConnection) -> None:
    reply(slaves, ResultMessage(new_request_id(), "b1", 1))
    reply(slaves, ProgressMessage(new_request_id(), "b1", 1.0))

    assert master.stats["unknown_replies"] == 2
    assert master.live_slaves() == []


def test_late_reply_counted(
    master: MasterService, clock: Clock, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1", interval=100)
    announce(slaves, "b2", interval=100)
    deferred = master.dispatch("sleep", {}, timeout=5)
    request_id = last_task(broker).request_id
    clock.advance(5)
    assert outcome_of(deferred).state is TaskState.TIMED_OUT

    reply(slaves, ResultMessage(request_id, "b2", 1))

    assert master.stats["late_replies"] == 1
    assert master.stats["unknown_replies"] == 0
    record = master.get_request(request_id)
    assert record is not None
    assert record.results == {}


def test_unknown_replies_log_rate_limited(
    master: MasterService, clock: Clock, slaves: FakeConnection
) -> None:
    with capturedLogs() as events:
        for _ in range(20):
            reply(slaves, ResultMessage(new_request_id(), "b1", 1))
        clock.advance(60)

    unknown = [e for e in events if "unknown request" in e["log_format"]]
    summaries = [e for e in events if "were counted but not logged" in e["log_format"]]
    assert len(unknown) == 5
    assert len(summaries) == 1
    assert summaries[0]["count"] == 15
    assert master.stats["unknown_replies"] == 20


def test_invalid_message_counted(master: MasterService, slaves: FakeConnection) -> None:
    slaves.send(DESTINATIONS.reply, b"not json", {"taskmesh-type": "result"})
    slaves.send(DESTINATIONS.reply, b"{}", {})
    slaves.send(DESTINATIONS.presence, b"[]", {"taskmesh-type": "announce", "slave_id": "b1"})

    assert master.stats["invalid_messages"] == 3
    assert master.live_slaves() == []


def test_invalid_reply_does_not_disturb_request(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    deferred = master.dispatch("sleep", {})
    request_id = last_task(broker).request_id
    headers = {"taskmesh-type": "result", "request_id": request_id, "slave_id": "b1"}

    slaves.send(DESTINATIONS.reply, b'{"no result": 1}', headers)
    assert not deferred.called
    reply(slaves, ResultMessage(request_id, "b1", 2))

    assert outcome_of(deferred).results == {"b1": 2}
    assert master.stats["invalid_messages"] == 1


def test_task_message_on_reply_queue_counted(master: MasterService, slaves: FakeConnection) -> None:
    reply(slaves, TaskMessage(new_request_id(), "sleep", {}, DESTINATIONS.reply))

    assert master.stats["invalid_messages"] == 1


def test_duplicate_result_dropped(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    deferred = master.dispatch("sleep", {})
    request_id = last_task(broker).request_id

    reply(slaves, ResultMessage(request_id, "b1", "first"))
    reply(slaves, ResultMessage(request_id, "b1", "second"))
    reply(slaves, ErrorMessage(request_id, "b1", "Oops", "third"))
    assert not deferred.called
    reply(slaves, ResultMessage(request_id, "b2", "other"))

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.results == {"b1": "first", "b2": "other"}
    assert master.stats["duplicate_replies"] == 2


def test_reply_from_late_slave_recorded(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    deferred = master.dispatch("sleep", {})
    request_id = last_task(broker).request_id
    announce(slaves, "b3")

    reply(slaves, ResultMessage(request_id, "b3", "late joiner"))
    assert not deferred.called
    reply(slaves, ResultMessage(request_id, "b1", "expected"))

    outcome = outcome_of(deferred)
    assert outcome.results == {"b1": "expected", "b3": "late joiner"}
    assert master.stats["unexpected_replies"] == 1


def test_send_failure_not_connected(
    master: MasterService, connection: FakeConnection, clock: Clock, slaves: FakeConnection
) -> None:
    announce(slaves, "b1")
    connection.disconnect("connection refused")

    deferred = master.dispatch("sleep", {})

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.FAILED
    assert "could not send the task" in outcome.reason
    assert "disconnected" in outcome.reason
    assert outcome.missing == ("b1",)
    assert master.stats["send_failures"] == 1
    assert only_housekeeping_left(clock)


def test_send_failure_broker_error(master: MasterService, broker: FakeBroker) -> None:
    broker.reject_destination(
        DESTINATIONS.tasks, "User foo is not authorized to write to: topic://testns.tasks"
    )

    outcome = outcome_of(master.dispatch("sleep", {}))

    assert outcome.state is TaskState.FAILED
    assert "not authorized" in outcome.reason


def test_no_live_slaves_expires(master: MasterService, clock: Clock, broker: FakeBroker) -> None:
    deferred = master.dispatch("sleep", {}, timeout=10)
    record = master.get_request(last_task(broker).request_id)
    assert record is not None
    assert record.expected == ()

    clock.advance(10)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.EXPIRED
    assert outcome.missing == ()
    assert "no slave was live" in outcome.reason


def test_no_live_slaves_collects_until_deadline(
    master: MasterService, clock: Clock, slaves: FakeConnection, broker: FakeBroker
) -> None:
    deferred = master.dispatch("sleep", {}, timeout=10)
    request_id = last_task(broker).request_id

    reply(slaves, ResultMessage(request_id, "b9", "ok"))
    assert not deferred.called
    clock.advance(10)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.results == {"b9": "ok"}


def test_cancel_ends_request_cancelled(
    master: MasterService, clock: Clock, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    deferred = master.dispatch("sleep", {}, timeout=10)
    request_id = last_task(broker).request_id

    deferred.cancel()

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.CANCELLED
    assert outcome.missing == ("b1",)
    record = master.get_request(request_id)
    assert record is not None
    assert record.state is TaskState.CANCELLED
    assert only_housekeeping_left(clock)


def test_stop_cancels_pending(
    master: MasterService, connection: FakeConnection, clock: Clock, slaves: FakeConnection
) -> None:
    announce(slaves, "b1")
    deferred = master.dispatch("sleep", {}, timeout=10)

    stopped = master.stopService()

    assert stopped.called
    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.CANCELLED
    assert "stopping" in outcome.reason
    assert connection.subscriptions == []
    assert clock.getDelayedCalls() == []


def test_dispatch_rejects_invalid_input(master: MasterService) -> None:
    with pytest.raises(ValueError, match="invalid task name"):
        master.dispatch("no spaces", {})
    with pytest.raises(ValueError, match=r"args\['when'\] is a set"):
        master.dispatch("sleep", {"when": {1, 2}})
    with pytest.raises(ValueError, match="keys must be strings"):
        master.dispatch("sleep", {"nested": {1: "x"}})
    with pytest.raises(ValueError, match="JSON cannot represent"):
        master.dispatch("sleep", {"x": float("nan")})
    with pytest.raises(ValueError, match="positive number"):
        master.dispatch("sleep", {}, timeout=0)
    with pytest.raises(ValueError, match="expected a UUID"):
        master.dispatch("sleep", {}, request_id="42")


def test_dispatch_rejects_reused_request_id(master: MasterService) -> None:
    request_id = new_request_id()
    master.dispatch("sleep", {}, request_id=request_id)

    with pytest.raises(ValueError, match="already in use"):
        master.dispatch("sleep", {}, request_id=request_id)


def test_dispatch_requires_running_service(clock: Clock, connection: FakeConnection) -> None:
    service = MasterService(connection, NAMESPACE, clock=clock)

    with pytest.raises(RuntimeError, match="not running"):
        service.dispatch("sleep", {})


def test_args_are_copied(master: MasterService, broker: FakeBroker) -> None:
    args: dict[str, Any] = {"items": (1, 2)}
    master.dispatch("sleep", args)
    args["items"] = "changed"

    record = master.get_request(last_task(broker).request_id)
    assert record is not None
    assert record.args == {"items": [1, 2]}


def test_finished_requests_bounded(
    clock: Clock, connection: FakeConnection, broker: FakeBroker
) -> None:
    service = MasterService(connection, NAMESPACE, clock=clock, max_finished=3)
    service.startService()
    request_ids = []
    for _ in range(5):
        deferred = service.dispatch("sleep", {}, timeout=1)
        request_ids.append(last_task(broker).request_id)
        deferred.cancel()

    assert [r.request_id for r in service.recent_requests()] == [
        request_ids[4],
        request_ids[3],
        request_ids[2],
    ]
    assert service.get_request(request_ids[0]) is None
    assert service.get_request(request_ids[4]) is not None
    service.stopService()


def test_recent_requests_newest_first(
    master: MasterService, clock: Clock, broker: FakeBroker
) -> None:
    master.dispatch("sleep", {}, timeout=100).cancel()
    first = last_task(broker).request_id
    clock.advance(0.5)
    master.dispatch("echo", {}, timeout=100)
    second = last_task(broker).request_id

    records = master.recent_requests()

    assert [r.request_id for r in records] == [second, first]
    assert [r.state for r in records] == [TaskState.PENDING, TaskState.CANCELLED]


def test_dispatch_logs_request_and_expected(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")

    with capturedLogs() as events:
        master.dispatch("sleep", {})

    [event] = [e for e in events if e.get("task") == "sleep"]
    assert event["request_id"] == last_task(broker).request_id
    assert event["expected"] == "b1"


def test_replies_logged_with_ids(
    master: MasterService, slaves: FakeConnection, broker: FakeBroker
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    master.dispatch("sleep", {})
    request_id = last_task(broker).request_id

    with capturedLogs() as events:
        reply(slaves, ResultMessage(request_id, "b1", 1))
        reply(slaves, ErrorMessage(request_id, "b2", "ValueError", "bad"))

    [result_event] = [e for e in events if "returned a result" in e["log_format"]]
    [error_event] = [e for e in events if "returned an error" in e["log_format"]]
    [end_event] = [e for e in events if "ended as" in e["log_format"]]
    assert (result_event["request_id"], result_event["slave_id"]) == (request_id, "b1")
    assert (error_event["request_id"], error_event["slave_id"]) == (request_id, "b2")
    assert end_event["state"] == "failed"


def test_task_body_is_json(master: MasterService, broker: FakeBroker) -> None:
    master.dispatch("sleep", {"seconds": 2})

    [(headers, body)] = broker.sent_to(DESTINATIONS.tasks)
    assert headers["content-type"] == "application/json;charset=utf-8"
    assert json.loads(body)["args"] == {"seconds": 2}


# -- With real slaves ----------------------------------------------------------------


def start_slave(broker: FakeBroker, clock: Clock, slave_id: str) -> SlaveService:
    registry = HandlerRegistry()
    register_builtin_handlers(registry, clock)
    slave = SlaveService(
        broker.connect(),
        NAMESPACE,
        slave_id,
        registry,
        clock=clock,
        reactor=SynchronousReactorThreads(),
        thread_pool=SynchronousThreadPool(),
    )
    slave.startService()
    return slave


def test_real_slaves_run_task(master: MasterService, broker: FakeBroker, clock: Clock) -> None:
    slaves = [start_slave(broker, clock, "b1"), start_slave(broker, clock, "b2")]
    assert [s.slave_id for s in master.live_slaves()] == ["b1", "b2"]
    reports: list[ProgressMessage] = []

    deferred = master.dispatch("sleep", {"seconds": 2}, timeout=10, on_progress=reports.append)
    clock.advance(1)
    assert not deferred.called
    clock.advance(1)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.results == {"b1": {"slept": 2}, "b2": {"slept": 2}}
    assert {(r.slave_id, r.percent) for r in reports} >= {("b1", 50.0), ("b2", 100.0)}
    for slave in slaves:
        assert slave.stopService().called


def test_real_slave_unknown_task_fails(
    master: MasterService, broker: FakeBroker, clock: Clock
) -> None:
    slave = start_slave(broker, clock, "b1")

    outcome = outcome_of(master.dispatch("no-such-task", {}, timeout=10))

    assert outcome.state is TaskState.FAILED
    assert outcome.errors["b1"][0] == "UnknownTask"
    assert slave.stopService().called


def test_real_slave_down_on_stop(master: MasterService, broker: FakeBroker, clock: Clock) -> None:
    slave = start_slave(broker, clock, "b1")

    slave.stopService()

    assert master.live_slaves() == []

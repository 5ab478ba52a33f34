"""
Tests for the master's SQLite database: requests survive a restart of
:class:`taskmesh.master.MasterService`, and the store keeps, prunes and locks
its data.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

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
)
from taskmesh.master import MasterService, StoreError, TaskOutcome, TaskState
from taskmesh.master._records import AcceptedAttempt, PendingRequest, SlaveProgress
from taskmesh.master._store import RequestStore
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
def slaves(broker: FakeBroker) -> FakeConnection:
    return broker.connect()


@pytest.fixture
def database(tmp_path: Path) -> str:
    return str(tmp_path / "master.sqlite3")


def start_master(broker: FakeBroker, clock: Clock, database: str, **options: Any) -> MasterService:
    service = MasterService(
        broker.connect(), NAMESPACE, clock=clock, default_timeout=30.0, database=database, **options
    )
    service.startService()
    return service


def stop_master(service: MasterService) -> None:
    stopped = service.stopService()
    assert stopped.called


def send(connection: FakeConnection, destination: str, message: Message) -> None:
    headers, body = encode(message)
    connection.send(destination, body, headers)


def reply(slaves: FakeConnection, message: Message) -> None:
    send(slaves, DESTINATIONS.reply, message)


def announce(slaves: FakeConnection, slave_id: str) -> None:
    send(slaves, DESTINATIONS.presence, Announcement(slave_id, SlaveState.UP, interval=1000))


def last_task(broker: FakeBroker, destination: str) -> TaskMessage:
    headers, body = broker.sent_to(destination)[-1]
    message = decode(headers, body)
    assert isinstance(message, TaskMessage)
    return message


def outcome_of(deferred: Deferred[TaskOutcome]) -> TaskOutcome:
    results: list[TaskOutcome] = []
    deferred.addCallback(results.append)
    assert len(results) == 1, "the Deferred has not fired"
    return results[0]


# -- Restart ---------------------------------------------------------------------------


def test_stop_leaves_request_pending(
    broker: FakeBroker, clock: Clock, database: str, slaves: FakeConnection
) -> None:
    master = start_master(broker, clock, database)
    announce(slaves, "b1")
    deferred = master.dispatch("sleep", {}, timeout=20)

    stop_master(master)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.PENDING
    assert "the next start of the master resumes it" in outcome.reason
    assert broker.sent_to(DESTINATIONS.control) == []
    assert clock.getDelayedCalls() == []


def test_restart_matches_queued_result(
    broker: FakeBroker, clock: Clock, database: str, slaves: FakeConnection
) -> None:
    first = start_master(broker, clock, database)
    announce(slaves, "b1")
    first.dispatch("sleep", {"seconds": 1}, timeout=20, on_progress=lambda progress: None)
    request_id = last_task(broker, DESTINATIONS.tasks).request_id
    reply(slaves, ProgressMessage(request_id, "b1", 10.0, "started"))
    stop_master(first)

    clock.advance(5)
    reply(slaves, ResultMessage(request_id, "b1", {"slept": 1}))
    assert len(broker.queued(DESTINATIONS.reply)) == 1
    second = start_master(broker, clock, database)

    record = second.get_request(request_id)
    assert record is not None
    assert record.state is TaskState.SUCCEEDED
    assert record.results == {"b1": {"slept": 1}}
    assert record.progress["b1"].message == "started"
    assert record.expected == ("b1",)
    assert record.finished_at == clock.seconds()
    assert broker.queued(DESTINATIONS.reply) == []
    assert second.stats["reloaded"] == 1
    stop_master(second)
    assert clock.getDelayedCalls() == []


def test_restart_rearms_deadline(
    broker: FakeBroker, clock: Clock, database: str, slaves: FakeConnection
) -> None:
    first = start_master(broker, clock, database)
    first.dispatch("sleep", {}, mode="queue", timeout=20)
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, AcceptedMessage(request_id, "b1"))
    stop_master(first)

    clock.advance(5)
    second = start_master(broker, clock, database)
    clock.advance(14.9)
    record = second.get_request(request_id)
    assert record is not None
    assert record.state is TaskState.PENDING
    clock.advance(0.1)

    record = second.get_request(request_id)
    assert record is not None
    assert record.state is TaskState.TIMED_OUT
    assert record.reason == "started by b1 (attempt 1) but no result within 20 s"
    stop_master(second)


def test_restart_past_deadline_ends_at_once(
    broker: FakeBroker, clock: Clock, database: str, slaves: FakeConnection
) -> None:
    first = start_master(broker, clock, database)
    first.dispatch("sleep", {}, mode="queue", timeout=20)
    started_id = last_task(broker, DESTINATIONS.work()).request_id
    first.dispatch("sleep", {}, mode="queue", timeout=20)
    not_started_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, AcceptedMessage(started_id, "b1"))
    stop_master(first)

    clock.advance(60)
    second = start_master(broker, clock, database)

    started = second.get_request(started_id)
    not_started = second.get_request(not_started_id)
    assert started is not None and not_started is not None
    assert started.state is TaskState.TIMED_OUT
    assert not_started.state is TaskState.EXPIRED
    cancelled = {
        message.request_id
        for message in (decode(h, b) for h, b in broker.sent_to(DESTINATIONS.control))
        if isinstance(message, CancelMessage)
    }
    assert cancelled == {started_id, not_started_id}
    stop_master(second)


def test_restart_past_start_by_expires(
    broker: FakeBroker, clock: Clock, database: str
) -> None:
    first = start_master(broker, clock, database)
    first.dispatch("sleep", {}, mode="queue", timeout=30, ttl=5)
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    stop_master(first)

    clock.advance(10)
    second = start_master(broker, clock, database)

    record = second.get_request(request_id)
    assert record is not None
    assert record.state is TaskState.EXPIRED
    stop_master(second)


def test_restart_keeps_finished_requests(
    broker: FakeBroker, clock: Clock, database: str, slaves: FakeConnection
) -> None:
    first = start_master(broker, clock, database)
    first.dispatch("sleep", {"n": 1}, mode="queue", max_attempts=4)
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, AcceptedMessage(request_id, "b1", attempt=1))
    reply(slaves, AcceptedMessage(request_id, "b2", attempt=2, redelivered=True))
    reply(slaves, ErrorMessage(request_id, "b2", "KeyError", "'n'"))
    before = first.get_request(request_id)
    stop_master(first)

    second = start_master(broker, clock, database)

    after = second.get_request(request_id)
    assert after == before
    assert after is not None
    assert after.state is TaskState.FAILED
    assert after.mode is DispatchMode.QUEUE
    assert after.max_attempts == 4
    assert after.attempts == (
        AcceptedAttempt("b1", 1, False, clock.seconds()),
        AcceptedAttempt("b2", 2, True, clock.seconds()),
    )
    assert [r.request_id for r in second.recent_requests()] == [request_id]
    assert second.stats["reloaded"] == 0
    stop_master(second)


def test_restart_late_replies_still_classified(
    broker: FakeBroker, clock: Clock, database: str, slaves: FakeConnection
) -> None:
    first = start_master(broker, clock, database)
    first.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id
    reply(slaves, ResultMessage(request_id, "b1", 1))
    stop_master(first)
    second = start_master(broker, clock, database)

    reply(slaves, ResultMessage(request_id, "b2", 2))
    reply(slaves, AcceptedMessage(request_id, "b3"))

    assert second.stats["duplicate_replies"] == 1
    assert second.stats["accepted_after_end"] == 1
    assert second.stats["unknown_replies"] == 0
    stop_master(second)


def test_request_id_unique_across_restart(
    broker: FakeBroker, clock: Clock, database: str
) -> None:
    first = start_master(broker, clock, database)
    first.dispatch("sleep", {}).cancel()
    request_id = last_task(broker, DESTINATIONS.tasks).request_id
    stop_master(first)
    second = start_master(broker, clock, database)

    with pytest.raises(ValueError, match="already in use"):
        second.dispatch("sleep", {}, request_id=request_id)
    stop_master(second)


def test_memory_database_stop_cancels(
    broker: FakeBroker, clock: Clock
) -> None:
    master = start_master(broker, clock, ":memory:")
    deferred = master.dispatch("sleep", {}, mode="queue")
    request_id = last_task(broker, DESTINATIONS.work()).request_id

    stop_master(master)

    outcome = outcome_of(deferred)
    assert outcome.state is TaskState.CANCELLED
    assert outcome.reason == "the master is stopping"
    [(headers, body)] = broker.sent_to(DESTINATIONS.control)
    assert decode(headers, body) == CancelMessage(
        request_id, "request ended as cancelled: the master is stopping"
    )


def test_second_master_cannot_open_database(
    broker: FakeBroker, clock: Clock, database: str
) -> None:
    first = start_master(broker, clock, database)
    second = MasterService(broker.connect(), NAMESPACE, clock=clock, database=database)

    with pytest.raises(StoreError, match="is locked: another taskmesh master uses it"):
        second.startService()

    assert not second.running
    stop_master(first)
    second.startService()
    assert second.running
    stop_master(second)


def test_unwritable_database_fails_start(
    broker: FakeBroker, clock: Clock, tmp_path: Path
) -> None:
    master = MasterService(
        broker.connect(), NAMESPACE, clock=clock, database=str(tmp_path / "missing" / "m.db")
    )

    with pytest.raises(StoreError, match="cannot open the master database"):
        master.startService()

    assert not master.running
    assert clock.getDelayedCalls() == []


# -- The store itself ----------------------------------------------------------------------


def pending_request(request_id: str, created_at: float = 100.0) -> PendingRequest:
    return PendingRequest(
        request_id=request_id,
        task="sleep",
        args={"seconds": 1, "nested": [1, "x", None]},
        mode=DispatchMode.BROADCAST,
        selector={"zone": "a"},
        target=None,
        expected=frozenset({"b1", "b2"}),
        max_attempts=3,
        timeout=30.0,
        ttl=10.0,
        created_at=created_at,
        start_by=created_at + 10,
        deadline=created_at + 30,
    )


def test_store_round_trip(database: str) -> None:
    store = RequestStore(database, max_finished=10)
    store.open()
    store.add_request(pending_request("r1"))
    store.set_progress("r1", "b1", SlaveProgress(10.0, "first", 101.0))
    store.set_progress("r1", "b1", SlaveProgress(20.0, "second", 102.0))
    store.add_result("r1", "b1", {"slept": [1, 2]}, 103.0)
    store.add_error("r1", "b2", "ValueError", "bad", 104.0)
    store.add_attempt("r1", AcceptedAttempt("b1", 1, False, 100.5))
    store.close()

    store.open()
    [loaded] = store.load_pending()
    store.close()

    assert loaded.args == {"seconds": 1, "nested": [1, "x", None]}
    assert loaded.selector == {"zone": "a"}
    assert loaded.expected == frozenset({"b1", "b2"})
    assert loaded.progress == {"b1": SlaveProgress(20.0, "second", 102.0)}
    assert loaded.results == {"b1": {"slept": [1, 2]}}
    assert loaded.errors == {"b2": ("ValueError", "bad")}
    assert loaded.attempts == [AcceptedAttempt("b1", 1, False, 100.5)]
    assert (loaded.ttl, loaded.start_by, loaded.deadline) == (10.0, 110.0, 130.0)


def test_store_keeps_json_text(database: str) -> None:
    store = RequestStore(database, max_finished=10)
    store.open()
    store.add_request(pending_request("r1"))
    store.add_result("r1", "b1", {"a": 1}, 1.0)
    store.close()

    with sqlite3.connect(database) as raw:
        [(args, selector, expected)] = raw.execute(
            "SELECT args, selector, expected FROM requests"
        ).fetchall()
        [(result,)] = raw.execute("SELECT result FROM results").fetchall()
    raw.close()
    assert json.loads(args) == {"seconds": 1, "nested": [1, "x", None]}
    assert json.loads(selector) == {"zone": "a"}
    assert json.loads(expected) == ["b1", "b2"]
    assert json.loads(result) == {"a": 1}


def test_store_prunes_oldest_finished(database: str) -> None:
    store = RequestStore(database, max_finished=2)
    store.open()
    for index in range(4):
        store.add_request(pending_request(f"r{index}", created_at=float(index)))
        store.add_attempt(f"r{index}", AcceptedAttempt("b1", 1, False, float(index)))
    store.add_request(pending_request("pending"))
    for index in range(4):
        store.finish(f"r{index}", TaskState.SUCCEEDED, "done", 200.0 + index)

    assert store.get("r0") is None
    assert store.get("r1") is None
    assert store.get("r2") is not None
    assert store.get("r3") is not None
    assert store.get("pending") is not None
    assert [r.request_id for r in store.recent_finished(10)] == ["r3", "r2"]
    store.close()
    with sqlite3.connect(database) as raw:
        [(attempts,)] = raw.execute("SELECT count(*) FROM attempts").fetchall()
    raw.close()
    assert attempts == 2


def test_store_finish_only_once(database: str) -> None:
    store = RequestStore(database, max_finished=10)
    store.open()
    store.add_request(pending_request("r1"))

    store.finish("r1", TaskState.SUCCEEDED, "first", 1.0)
    store.finish("r1", TaskState.FAILED, "second", 2.0)

    record = store.get("r1")
    assert record is not None
    assert (record.state, record.reason, record.finished_at) == (TaskState.SUCCEEDED, "first", 1.0)
    store.close()


def test_store_rejects_newer_schema(database: str) -> None:
    with sqlite3.connect(database) as raw:
        raw.execute("PRAGMA user_version = 99")
    raw.close()
    store = RequestStore(database, max_finished=10)

    with pytest.raises(StoreError, match="schema version 99"):
        store.open()
    assert not store.is_open


def test_store_closed_raises(database: str) -> None:
    store = RequestStore(database, max_finished=10)

    with pytest.raises(StoreError, match="is not open"):
        store.add_request(pending_request("r1"))


def test_reload_finishes_request_complete_in_store(
    broker: FakeBroker, clock: Clock, database: str
) -> None:
    # A master that stopped between storing the last result and storing the
    # end leaves a complete request pending, and the next start ends it.
    store = RequestStore(database, max_finished=10)
    store.open()
    request = pending_request("3f2a7c1e-8d4b-4f6a-9c2e-1b5d7e9f0a42", created_at=clock.seconds())
    store.add_request(request)
    store.add_result(request.request_id, "b1", 1, clock.seconds())
    store.add_result(request.request_id, "b2", 2, clock.seconds())
    store.close()

    master = start_master(broker, clock, database)

    record = master.get_request(request.request_id)
    assert record is not None
    assert record.state is TaskState.SUCCEEDED
    assert record.reason == "2 slaves returned a result"
    stop_master(master)

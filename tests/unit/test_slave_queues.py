"""
Tests for work-queue, direct and cancelled tasks in :class:`taskmesh.slave.SlaveService`,
on a fake clock and a fake broker that enforces prefetch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
from twisted.logger import capturedLogs

from taskmesh._messages import (
    AcceptedMessage,
    DispatchMode,
    ErrorMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    encode,
    new_request_id,
)
from taskmesh.slave import ProgressReporter, SlaveService
from taskmesh.testing import (
    FakeConnection,
    FakeSubscription,
    SynchronousReactorThreads,
    SynchronousThreadPool,
)

from .test_slave import DESTINATIONS, NAMESPACE, SLAVE_ID, Controlled, Harness, fired

WORK = DESTINATIONS.work()
DIRECT = DESTINATIONS.direct(SLAVE_ID)


class ManualThreadPool(SynchronousThreadPool):
    """
    A thread pool that runs each blocking call only when the test calls :meth:`run_next`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Any, Callable[..., Any], tuple[Any, ...]]] = []

    def callInThreadWithCallback(  # noqa: N802 (name fixed by ThreadPool)
        self, onResult: Any, func: Callable[..., Any], *args: Any, **kw: Any  # noqa: N803
    ) -> None:
        self.pending.append((onResult, func, args))

    def run_next(self) -> None:
        on_result, func, args = self.pending.pop(0)
        super().callInThreadWithCallback(on_result, func, *args)


class QueueHarness(Harness):
    """
    The slave harness plus more slaves on their own connections.
    """

    def __init__(self) -> None:
        super().__init__()
        self.others: list[SlaveService] = []

    def add_slave(self, slave_id: str, **kwargs: Any) -> tuple[SlaveService, FakeConnection]:
        connection = self.broker.connect()
        options: dict[str, Any] = {
            "clock": self.clock,
            "reactor": SynchronousReactorThreads(),
            "thread_pool": SynchronousThreadPool(),
        }
        options.update(kwargs)
        service = SlaveService(connection, NAMESPACE, slave_id, self.registry, **options)
        service.startService()
        self.others.append(service)
        return service, connection


@pytest.fixture
def harness() -> Iterator[QueueHarness]:
    harness = QueueHarness()
    yield harness
    for service in [harness.service, *harness.others]:
        if service is not None and service.running:
            stopping = service.stopService()
            harness.clock.advance(60)
            assert fired(stopping)
    assert harness.clock.getDelayedCalls() == []
    assert harness.broker.handler_failures == []


def subscription_to(connection: FakeConnection, destination: str) -> FakeSubscription | None:
    found = [s for s in connection.subscriptions if s.destination == destination]
    return found[0] if found else None


def unacked(connection: FakeConnection, destination: str) -> int:
    subscription = subscription_to(connection, destination)
    return 0 if subscription is None else len(subscription.unacked)


def queued_ids(harness: Harness, destination: str) -> list[str]:
    return [headers["request_id"] for headers, _ in harness.broker.queued(destination)]


def error_type(harness: Harness, request_id: str) -> str:
    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage), reply
    return reply.error_type


# Subscriptions and prefetch


def test_subscribes_to_work_queues(harness: QueueHarness) -> None:
    harness.start(concurrency=3, tags={"role": "db", "zone": "eu.west"})

    queues = {
        s.destination: (s.ack, s.prefetch)
        for s in harness.connection.subscriptions
        if s.destination.startswith("/queue/")
    }
    assert queues == {
        WORK: ("client-individual", 3),
        DESTINATIONS.work({"role": "db"}): ("client-individual", 3),
        DIRECT: ("client-individual", 3),
    }
    topics = {s.destination for s in harness.connection.subscriptions} - set(queues)
    assert topics == {DESTINATIONS.tasks, DESTINATIONS.control, DESTINATIONS.presence}


def test_invalid_tag_gets_no_queue(harness: QueueHarness) -> None:
    with capturedLogs() as events:
        harness.start(tags={"zone": "eu.west"})

    [warning] = [e for e in events if e.get("tag") == "zone=eu.west"]
    assert "invalid tag" in warning["error"]


def test_competing_slaves_respect_prefetch(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(concurrency=2)
    other, other_connection = harness.add_slave("s2", concurrency=1)

    ids = [harness.master.send_queued("wait", {"n": n}) for n in range(5)]

    assert len(controlled.calls) == 3
    assert unacked(harness.connection, WORK) == 2
    assert unacked(other_connection, WORK) == 1
    assert queued_ids(harness, WORK) == ids[3:]

    controlled.calls[0][2].callback("first")

    assert harness.master.final_reply(ids[0]) == ResultMessage(ids[0], SLAVE_ID, "first")
    assert len(controlled.calls) == 4
    assert unacked(harness.connection, WORK) == 2
    assert queued_ids(harness, WORK) == ids[4:]
    for _, _, pending in controlled.calls[1:]:
        pending.callback(None)
    controlled.calls[4][2].callback(None)
    assert queued_ids(harness, WORK) == []
    assert unacked(harness.connection, WORK) == 0
    assert unacked(other_connection, WORK) == 0
    assert {harness.master.final_reply(i).request_id for i in ids} == set(ids)


def test_tag_queue_delivers_to_tagged_slave(harness: QueueHarness) -> None:
    harness.start(tags={"role": "db"})

    request_id = harness.master.send_queued("echo", {"x": 1}, selector={"role": "db"})

    assert harness.master.final_reply(request_id) == ResultMessage(request_id, SLAVE_ID, {"x": 1})
    assert unacked(harness.connection, DESTINATIONS.work({"role": "db"})) == 0


# Acknowledgement after the reply


def test_ack_waits_for_reply_receipt(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start()
    harness.connection.hold_receipts()

    request_id = harness.master.send_queued("wait")

    # The task starts only once the broker confirms the accepted message.
    assert harness.master.accepted_for(request_id) == [AcceptedMessage(request_id, SLAVE_ID, 1)]
    assert controlled.calls == []
    harness.connection.release_receipts()
    assert len(controlled.calls) == 1

    harness.connection.hold_receipts()
    controlled.calls[0][2].callback("done")
    assert harness.master.final_reply(request_id) == ResultMessage(request_id, SLAVE_ID, "done")
    assert unacked(harness.connection, WORK) == 1

    harness.connection.release_receipts()
    assert unacked(harness.connection, WORK) == 0
    assert harness.broker.queued(WORK) == []


def test_replies_are_persistent(harness: QueueHarness) -> None:
    def report(args: dict[str, Any], progress: ProgressReporter) -> str:
        progress.report(50)
        return "done"

    harness.registry.register("report", report)
    harness.start()

    harness.master.send_queued("report")

    sent = harness.broker.sent_to(DESTINATIONS.reply)
    assert [headers["taskmesh-type"] for headers, _ in sent] == ["accepted", "progress", "result"]
    assert all(headers["persistent"] == "true" for headers, _ in sent)


def test_no_ack_when_reply_rejected(harness: QueueHarness) -> None:
    service = harness.start()
    harness.broker.reject_destination(DESTINATIONS.reply, "not authorized to write")

    harness.master.send_queued("echo")

    assert service.stats["accepted_failed"] == 1
    assert service.stats["replies_sent"] == 0
    # The message stays unacknowledged and goes back to the queue on stop.
    assert unacked(harness.connection, WORK) == 1
    stopping = harness.stop()
    assert fired(stopping)
    assert len(harness.broker.queued(WORK)) == 1


def test_reply_failure_leaves_message_unacked(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    request_id = harness.master.send_queued("wait")
    harness.broker.reject_destination(DESTINATIONS.reply, "not authorized to write")

    controlled.calls[0][2].callback("lost")

    assert harness.master.replies_for(request_id) == []
    assert service.stats["replies_failed"] == 1
    assert service.stats["acks_sent"] == 0
    assert unacked(harness.connection, WORK) == 1


def test_lost_receipt_leads_to_redelivery(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    request_id = harness.master.send_queued("wait")
    harness.connection.hold_receipts()

    controlled.calls[0][2].callback("done once")
    harness.connection.disconnect()
    assert unacked(harness.connection, WORK) == 0
    assert queued_ids(harness, WORK) == [request_id]
    harness.connection.release_receipts()
    harness.connection.reconnect()

    # The reply is sent again after the reconnect. The redelivered task does
    # not run again: its reply is sent once more and the message acknowledged.
    assert len(controlled.calls) == 1
    assert service.stats["replies_resent"] == 1
    assert service.stats["tasks_redelivered"] == 1
    results = [r for r in harness.master.replies_for(request_id) if isinstance(r, ResultMessage)]
    assert results and all(r.result == "done once" for r in results)
    assert unacked(harness.connection, WORK) == 0
    assert harness.broker.queued(WORK) == []
    assert len(harness.master.accepted_for(request_id)) == 1


# Finished cache


def test_finished_task_not_run_again(harness: QueueHarness) -> None:
    calls: list[dict[str, Any]] = []

    def count(args: dict[str, Any], progress: ProgressReporter) -> int:
        calls.append(args)
        return len(calls)

    harness.registry.register("count", count)
    service = harness.start()
    request_id = harness.master.send_queued("count")

    harness.master.send_queued("count", request_id=request_id)

    assert len(calls) == 1
    assert harness.master.replies_for(request_id) == [
        ResultMessage(request_id, SLAVE_ID, 1),
        ResultMessage(request_id, SLAVE_ID, 1),
    ]
    assert service.stats["replies_resent"] == 1
    assert unacked(harness.connection, WORK) == 0
    assert harness.broker.queued(WORK) == []


def test_finished_cache_is_bounded(harness: QueueHarness) -> None:
    calls: list[dict[str, Any]] = []

    def count(args: dict[str, Any], progress: ProgressReporter) -> int:
        calls.append(args)
        return len(calls)

    harness.registry.register("count", count)
    harness.start(finished_cache_size=1)
    first = harness.master.send_queued("count")
    harness.master.send_queued("count")

    harness.master.send_queued("count", request_id=first)

    assert len(calls) == 3
    # The slave still counts its starts of the request.
    assert [a.attempt for a in harness.master.accepted_for(first)] == [1, 2]


def test_redelivery_while_running_shares_reply(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    request_id = harness.master.send_queued("wait")

    harness.connection.disconnect()
    harness.connection.reconnect()
    assert unacked(harness.connection, WORK) == 1
    assert service.stats["tasks_duplicate"] == 1

    controlled.calls[0][2].callback("once")

    assert len(controlled.calls) == 1
    assert harness.master.final_reply(request_id) == ResultMessage(request_id, SLAVE_ID, "once")
    assert unacked(harness.connection, WORK) == 0
    assert harness.broker.queued(WORK) == []
    assert service.stats["deliveries_released"] == 1
    assert service.stats["acks_sent"] == 1


# accepted


def test_accepted_before_handler(harness: QueueHarness) -> None:
    order: list[str] = []

    def record(args: dict[str, Any], progress: ProgressReporter) -> None:
        sent = harness.broker.sent_to(DESTINATIONS.reply)
        accepted = [h for h, _ in sent if h["taskmesh-type"] == "accepted"]
        order.append(f"handler after {len(accepted)} accepted")

    harness.registry.register("record", record)
    harness.start()

    broadcast = harness.master.send_task("record")
    queued = harness.master.send_queued("record")

    assert order == ["handler after 1 accepted", "handler after 2 accepted"]
    assert harness.master.accepted_for(broadcast) == [AcceptedMessage(broadcast, SLAVE_ID, 1)]
    assert harness.master.accepted_for(queued) == [AcceptedMessage(queued, SLAVE_ID, 1)]


def test_accepted_carries_redelivered_flag(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    harness.connection.hold_receipts()
    request_id = harness.master.send_queued("wait")

    # The accepted message's receipt is lost, so the task does not start
    # here, and the broker delivers it again after the reconnect.
    harness.connection.disconnect()
    harness.connection.reconnect()
    harness.connection.release_receipts()

    assert service.stats["accepted_failed"] == 1
    assert harness.master.accepted_for(request_id) == [
        AcceptedMessage(request_id, SLAVE_ID, 1, False),
        AcceptedMessage(request_id, SLAVE_ID, 1, True),
    ]
    assert len(controlled.calls) == 1
    controlled.calls[0][2].callback(None)
    assert harness.master.final_reply(request_id) == ResultMessage(request_id, SLAVE_ID, None)
    assert harness.broker.queued(WORK) == []


# Cancelling


def test_cancel_before_arrival(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    request_id = new_request_id()

    harness.master.cancel(request_id, "operator request")
    harness.master.send_queued("wait", request_id=request_id)

    reply = harness.master.final_reply(request_id)
    assert reply == ErrorMessage(
        request_id,
        SLAVE_ID,
        "Cancelled",
        "the master cancelled the request before slave s1 started it: operator request",
    )
    assert controlled.calls == []
    assert harness.master.accepted_for(request_id) == []
    assert unacked(harness.connection, WORK) == 0
    assert service.stats["tasks_cancelled"] == 1


def test_cancel_broadcast_before_arrival(harness: QueueHarness) -> None:
    harness.start()
    request_id = new_request_id()

    harness.master.cancel(request_id)
    harness.master.send_task("echo", request_id=request_id)

    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "Cancelled"
    assert reply.message.endswith("no reason given")


def test_cancel_waiting_task(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(concurrency=1, tags={"role": "db"})
    running = harness.master.send_queued("wait")
    waiting = harness.master.send_queued("wait", selector={"role": "db"})
    assert len(controlled.calls) == 1

    harness.master.cancel(waiting, "not needed")

    assert error_type(harness, waiting) == "Cancelled"
    assert unacked(harness.connection, DESTINATIONS.work({"role": "db"})) == 0
    controlled.calls[0][2].callback(None)
    assert len(controlled.calls) == 1
    assert harness.master.final_reply(running) == ResultMessage(running, SLAVE_ID, None)


def test_cancel_running_non_blocking(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    request_id = harness.master.send_queued("wait")
    pending = controlled.calls[0][2]

    harness.master.cancel(request_id, "too slow")

    assert pending.called
    assert harness.master.final_reply(request_id) == ErrorMessage(
        request_id,
        SLAVE_ID,
        "Cancelled",
        "the master cancelled the request while it ran on slave s1: too slow",
    )
    assert unacked(harness.connection, WORK) == 0
    assert service.stats["tasks_cancelled"] == 1


def test_cancel_running_blocking(harness: QueueHarness) -> None:
    finished: list[str] = []

    def slow(args: dict[str, Any], progress: ProgressReporter) -> str:
        finished.append("ran to the end")
        return "discarded"

    harness.registry.register("slow", slow)
    pool = ManualThreadPool()
    harness.start(thread_pool=pool)
    request_id = harness.master.send_queued("slow")

    harness.master.cancel(request_id, "too slow")

    # The thread cannot be interrupted, so nothing is sent until it ends.
    assert harness.master.replies_for(request_id) == []
    assert unacked(harness.connection, WORK) == 1
    pool.run_next()
    assert finished == ["ran to the end"]
    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "Cancelled"
    assert "blocking handler" in reply.message
    assert "discarded" in reply.message
    assert unacked(harness.connection, WORK) == 0


def test_cancel_after_finish_keeps_result(harness: QueueHarness) -> None:
    harness.start()
    request_id = harness.master.send_queued("echo", {"a": 1})

    harness.master.cancel(request_id, "late")
    harness.master.send_queued("echo", {"a": 1}, request_id=request_id)

    assert harness.master.replies_for(request_id) == [
        ResultMessage(request_id, SLAVE_ID, {"a": 1}),
        ResultMessage(request_id, SLAVE_ID, {"a": 1}),
    ]


def test_cancel_while_waiting_for_accepted_receipt(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start()
    harness.connection.hold_receipts()
    request_id = harness.master.send_queued("wait")

    harness.master.cancel(request_id, "changed plans")
    harness.connection.release_receipts()

    assert controlled.calls == []
    assert error_type(harness, request_id) == "Cancelled"
    assert unacked(harness.connection, WORK) == 0


# Time-to-live


def test_start_by_passed_on_arrival(harness: QueueHarness) -> None:
    harness.clock.advance(1000)
    service = harness.start()

    request_id = harness.master.send_queued("echo", start_by=999.0, deadline=2000.0)

    assert harness.master.final_reply(request_id) == ErrorMessage(
        request_id,
        SLAVE_ID,
        "Expired",
        "the task's start_by time passed 1.000 s before slave s1 could start it",
    )
    assert harness.master.accepted_for(request_id) == []
    assert unacked(harness.connection, WORK) == 0
    assert service.stats["tasks_expired"] == 1


def test_start_by_passed_while_waiting(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(concurrency=1)
    first = harness.master.send_queued("wait")
    late = harness.master.send_queued("echo", target=SLAVE_ID, start_by=harness.clock.seconds() + 5)

    harness.clock.advance(10)
    controlled.calls[0][2].callback(None)

    assert harness.master.final_reply(first) == ResultMessage(first, SLAVE_ID, None)
    assert error_type(harness, late) == "Expired"
    assert unacked(harness.connection, DIRECT) == 0


# Selectors and direct tasks


def test_broadcast_selector_mismatch_ignored(harness: QueueHarness) -> None:
    service = harness.start(tags={"role": "web", "zone": "a"})

    ignored = harness.master.send_task("echo", selector={"role": "db"})
    partly = harness.master.send_task("echo", selector={"role": "web", "zone": "b"})
    selected = harness.master.send_task("echo", {"x": 1}, selector={"role": "web", "zone": "a"})

    assert harness.master.replies_for(ignored) == []
    assert harness.master.replies_for(partly) == []
    assert harness.master.accepted_for(ignored) == []
    assert service.stats["tasks_not_selected"] == 2
    assert service.stats["tasks_received"] == 1
    assert harness.master.final_reply(selected) == ResultMessage(selected, SLAVE_ID, {"x": 1})


def test_direct_task_runs(harness: QueueHarness) -> None:
    harness.start()

    request_id = harness.master.send_queued("echo", {"to": "me"}, target=SLAVE_ID)

    reply = harness.master.final_reply(request_id)
    assert reply == ResultMessage(request_id, SLAVE_ID, {"to": "me"})
    assert unacked(harness.connection, DIRECT) == 0


def test_direct_task_for_other_slave(harness: QueueHarness) -> None:
    service = harness.start()
    request_id = new_request_id()
    headers, body = encode(
        TaskMessage(
            request_id, "echo", {}, DESTINATIONS.reply, mode=DispatchMode.DIRECT, target="s2"
        )
    )

    harness.master.connection.send(DIRECT, body, headers)

    reply = harness.master.final_reply(request_id)
    assert reply == ErrorMessage(
        request_id, SLAVE_ID, "WrongSlave", "the task targets slave s2, but slave s1 received it"
    )
    assert unacked(harness.connection, DIRECT) == 0
    assert service.stats["tasks_wrong_slave"] == 1


def test_invalid_queue_message_dead_lettered(harness: QueueHarness) -> None:
    service = harness.start()

    harness.master.connection.send(WORK, b"{}", {"taskmesh-type": "task"})

    assert service.stats["invalid_messages"] == 1
    assert [destination for destination, _, _ in harness.broker.dead_letters] == [WORK]
    assert unacked(harness.connection, WORK) == 0


def test_invalid_queue_task_answered(harness: QueueHarness) -> None:
    harness.start()
    request_id = new_request_id()

    harness.master.connection.send(
        WORK,
        b"[]",
        {"taskmesh-type": "task", "request_id": request_id, "reply-to": DESTINATIONS.reply},
    )

    assert error_type(harness, request_id) == "InvalidTask"
    assert unacked(harness.connection, WORK) == 0


# Reconnects


def test_stale_waiting_task_not_started(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start(concurrency=1)
    running = harness.master.send_queued("wait")
    waiting = harness.master.send_queued("wait", target=SLAVE_ID)
    assert len(controlled.calls) == 1

    harness.connection.disconnect()
    harness.connection.reconnect()

    # The direct task came back over the new connection as a new delivery,
    # which replaced the one from the old connection.
    assert service.stats["deliveries_released"] == 1
    controlled.calls[0][2].callback("first")
    assert len(controlled.calls) == 2
    controlled.calls[1][2].callback("second")
    assert harness.master.final_reply(running) == ResultMessage(running, SLAVE_ID, "first")
    assert harness.master.final_reply(waiting) == ResultMessage(waiting, SLAVE_ID, "second")
    assert harness.broker.queued(WORK) == []
    assert harness.broker.queued(DIRECT) == []
    assert unacked(harness.connection, WORK) == 0
    assert unacked(harness.connection, DIRECT) == 0


def test_stale_waiting_task_taken_by_other_slave(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(concurrency=1, tags={"role": "db"})
    first = harness.master.send_queued("wait")
    second = harness.master.send_queued("wait", selector={"role": "db"})
    assert len(controlled.calls) == 1

    harness.connection.disconnect()
    other, _ = harness.add_slave("s2", concurrency=2, tags={"role": "db"})
    harness.connection.reconnect()
    controlled.calls[0][2].callback("stale run")

    # s2 runs both tasks from the queues; s1 does not start its stale copy.
    assert [args for args, _, _ in controlled.calls[1:]] == [{}, {}]
    for _, _, pending in controlled.calls[1:]:
        pending.callback("s2 run")
    assert len(controlled.calls) == 3
    assert harness.master.final_reply(second).slave_id == "s2"
    # Running the first task twice is the at-least-once limit of a lost connection.
    assert {a.slave_id for a in harness.master.accepted_for(first)} == {SLAVE_ID, "s2"}
    assert other.stats["tasks_succeeded"] == 2


# Stopping


def test_stop_finishes_running_queue_task(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start(concurrency=1, tags={"role": "db"})
    running = harness.master.send_queued("wait")
    waiting = harness.master.send_queued("wait", selector={"role": "db"})

    stopping = harness.stop()

    # The waiting task gets no reply and goes back to its queue at once.
    assert harness.master.replies_for(waiting) == []
    assert queued_ids(harness, DESTINATIONS.work({"role": "db"})) == [waiting]
    assert subscription_to(harness.connection, DESTINATIONS.work({"role": "db"})) is None
    # The work queue stays subscribed until its running task is acknowledged.
    assert unacked(harness.connection, WORK) == 1
    other, _ = harness.add_slave("s2", tags={"role": "db"})
    assert harness.master.accepted_for(waiting) == [AcceptedMessage(waiting, "s2", 1, True)]

    controlled.calls[0][2].callback("done in time")

    assert fired(stopping)
    assert harness.master.final_reply(running) == ResultMessage(running, SLAVE_ID, "done in time")
    assert subscription_to(harness.connection, WORK) is None
    assert harness.master.announcements()[-1] is SlaveState.DOWN
    assert service.stats["deliveries_released"] == 1
    assert service.stats["acks_sent"] == 1
    controlled.calls[1][2].callback("second slave")
    assert harness.master.final_reply(waiting) == ResultMessage(waiting, "s2", "second slave")
    assert other.stats["acks_sent"] == 1


def test_stop_holds_new_queue_messages(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start(concurrency=1)
    running = harness.master.send_queued("wait")
    later = harness.master.send_queued("wait")
    stopping = harness.stop()

    controlled.calls[0][2].callback(None)

    # Acknowledging the running task made room for the next message, which the
    # stopping slave neither runs nor acknowledges, then gives back.
    assert fired(stopping)
    assert service.stats["tasks_held_stopping"] == 1
    assert len(controlled.calls) == 1
    assert harness.master.final_reply(running) == ResultMessage(running, SLAVE_ID, None)
    assert queued_ids(harness, WORK) == [later]


def test_stop_leaves_unfinished_queue_task(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start(grace_period=5.0)
    request_id = harness.master.send_queued("wait")

    stopping = harness.stop()
    harness.clock.advance(5)

    assert fired(stopping)
    assert harness.master.replies_for(request_id) == []
    assert queued_ids(harness, WORK) == [request_id]
    assert service.stats["acks_sent"] == 0
    assert service.stats["tasks_cancelled"] == 0
    assert service.stats["deliveries_released"] == 1
    assert harness.master.announcements()[-1] is SlaveState.DOWN

    other, _ = harness.add_slave("s2")
    assert harness.master.accepted_for(request_id)[-1] == AcceptedMessage(
        request_id, "s2", 1, True
    )
    controlled.calls[1][2].callback("second slave")
    assert harness.master.final_reply(request_id) == ResultMessage(request_id, "s2", "second slave")
    assert other.stats["acks_sent"] == 1


def test_stop_cancels_running_broadcast_task(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(grace_period=1.0)
    broadcast = harness.master.send_task("wait")
    queued = harness.master.send_queued("wait")

    stopping = harness.stop()
    harness.clock.advance(1)

    assert fired(stopping)
    assert error_type(harness, broadcast) == "Cancelled"
    assert harness.master.replies_for(queued) == []
    assert queued_ids(harness, WORK) == [queued]


def test_stop_during_accepted_wait_leaves_task(harness: QueueHarness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(grace_period=1.0)
    harness.connection.hold_receipts()
    request_id = harness.master.send_queued("wait")

    stopping = harness.stop()
    harness.clock.advance(1)
    harness.connection.release_receipts()

    assert fired(stopping)
    assert controlled.calls == []
    assert harness.master.replies_for(request_id) == []
    assert queued_ids(harness, WORK) == [request_id]

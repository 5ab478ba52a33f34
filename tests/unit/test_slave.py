"""
Tests for :class:`taskmesh.slave.SlaveService` on a fake clock and broker.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from taskmesh._messages import (
    AcceptedMessage,
    Announcement,
    CancelMessage,
    Destinations,
    DiscoverMessage,
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
from taskmesh.slave import (
    HandlerLoadError,
    HandlerRegistry,
    InvalidArguments,
    ProgressReporter,
    SlaveService,
    load_operator_handlers,
    non_blocking,
    register_builtin_handlers,
)
from taskmesh.stomp import StompMessage
from taskmesh.testing import (
    FakeBroker,
    FakeConnection,
    SynchronousReactorThreads,
    SynchronousThreadPool,
)

NAMESPACE = "testns"
DESTINATIONS = Destinations(NAMESPACE)
SLAVE_ID = "s1"


class Master:
    """
    The master's side of the fake broker: sends tasks, records replies and
    presence messages.
    """

    def __init__(self, broker: FakeBroker) -> None:
        self.connection = broker.connect()
        self.replies: list[Message] = []
        self.accepted: list[AcceptedMessage] = []
        self.presence: list[Message] = []
        self.reply_waiters: list[tuple[Callable[[Message], bool], Deferred[Message]]] = []
        self.connection.subscribe(DESTINATIONS.reply, self._on_reply)
        self.connection.subscribe(DESTINATIONS.presence, self._on_presence)

    def _on_reply(self, message: StompMessage) -> None:
        decoded = decode(message.headers, message.body)
        if isinstance(decoded, AcceptedMessage):
            self.accepted.append(decoded)
            return
        self.replies.append(decoded)
        for condition, waiter in list(self.reply_waiters):
            if condition(decoded):
                self.reply_waiters.remove((condition, waiter))
                waiter.callback(decoded)

    def _on_presence(self, message: StompMessage) -> None:
        self.presence.append(decode(message.headers, message.body))

    def send_task(
        self,
        task: str,
        args: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        deadline: float | None = None,
        reply_to: str = DESTINATIONS.reply,
        selector: dict[str, str] | None = None,
    ) -> str:
        request_id = request_id or new_request_id()
        message = TaskMessage(
            request_id, task, args or {}, reply_to, deadline, selector=selector or {}
        )
        headers, body = encode(message)
        self.connection.send(DESTINATIONS.tasks, body, headers)
        return request_id

    def send_raw(self, headers: dict[str, str], body: bytes) -> None:
        self.connection.send(DESTINATIONS.tasks, body, headers)

    def send_queued(
        self,
        task: str,
        args: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        selector: dict[str, str] | None = None,
        target: str | None = None,
        start_by: float | None = None,
        deadline: float | None = None,
        ttl: float | None = None,
    ) -> str:
        """
        Send a persistent task to the work queue of ``selector``, or to the
        direct queue of ``target`` when it is given.
        """
        request_id = request_id or new_request_id()
        message = TaskMessage(
            request_id,
            task,
            args or {},
            DESTINATIONS.reply,
            deadline,
            mode=DispatchMode.QUEUE if target is None else DispatchMode.DIRECT,
            selector=selector or {},
            target=target,
            start_by=start_by,
        )
        headers, body = encode(message)
        destination = DESTINATIONS.work(selector) if target is None else DESTINATIONS.direct(target)
        self.connection.send(destination, body, headers, persistent=True, ttl=ttl)
        return request_id

    def cancel(self, request_id: str, reason: str = "") -> None:
        headers, body = encode(CancelMessage(request_id, reason))
        self.connection.send(DESTINATIONS.control, body, headers)

    def accepted_for(self, request_id: str) -> list[AcceptedMessage]:
        return [m for m in self.accepted if m.request_id == request_id]

    def replies_for(self, request_id: str) -> list[Message]:
        return [r for r in self.replies if getattr(r, "request_id", None) == request_id]

    def final_reply(self, request_id: str) -> ResultMessage | ErrorMessage:
        finals = [
            r for r in self.replies_for(request_id) if isinstance(r, (ResultMessage, ErrorMessage))
        ]
        assert len(finals) == 1, f"expected one result or error, got {finals!r}"
        return finals[0]

    def announcements(self) -> list[SlaveState]:
        return [m.state for m in self.presence if isinstance(m, Announcement)]

    def wait_for_final_reply(self, request_id: str) -> Deferred[Message]:
        waiter: Deferred[Message] = Deferred()
        self.reply_waiters.append(
            (
                lambda m: getattr(m, "request_id", None) == request_id
                and isinstance(m, (ResultMessage, ErrorMessage)),
                waiter,
            )
        )
        return waiter


class Controlled:
    """
    Non-blocking handler whose calls return Deferreds that the test fires.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], ProgressReporter, Deferred[Any]]] = []

    def __call__(self, args: dict[str, Any], progress: ProgressReporter) -> Deferred[Any]:
        pending: Deferred[Any] = Deferred()
        self.calls.append((args, progress, pending))
        return pending


class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.broker = FakeBroker()
        self.master = Master(self.broker)
        self.connection: FakeConnection = self.broker.connect()
        self.registry = HandlerRegistry()
        register_builtin_handlers(self.registry, self.clock)
        self.thread_pool = SynchronousThreadPool()
        self.service: SlaveService | None = None

    def make(self, **kwargs: Any) -> SlaveService:
        options: dict[str, Any] = {
            "clock": self.clock,
            "reactor": SynchronousReactorThreads(),
            "thread_pool": self.thread_pool,
        }
        options.update(kwargs)
        self.service = SlaveService(self.connection, NAMESPACE, SLAVE_ID, self.registry, **options)
        return self.service

    def start(self, **kwargs: Any) -> SlaveService:
        service = self.make(**kwargs)
        service.startService()
        return service

    def stop(self) -> Deferred[None]:
        assert self.service is not None
        return self.service.stopService()


def fired(deferred: Deferred[Any]) -> bool:
    outcome: list[Any] = []
    deferred.addBoth(lambda result: outcome.append(result) or result)
    return bool(outcome)


@pytest.fixture
def harness() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    if harness.service is not None and harness.service.running:
        stopping = harness.stop()
        harness.clock.advance(60)
        assert fired(stopping)
    assert harness.clock.getDelayedCalls() == []
    assert harness.broker.handler_failures == []


# Announcements


def test_announces_up_on_start(harness: Harness) -> None:
    harness.start(tags={"role": "db"}, announce_interval=5.0)

    [up] = harness.master.presence
    assert isinstance(up, Announcement)
    assert up.state is SlaveState.UP
    assert up.slave_id == SLAVE_ID
    assert up.tasks == ("echo", "sleep")
    assert up.interval == 5.0
    assert up.hostname == socket.gethostname()
    assert up.pid == os.getpid()
    assert up.tags == {"role": "db"}


def test_announces_alive_every_interval(harness: Harness) -> None:
    harness.start(announce_interval=10.0)

    harness.clock.advance(9.9)
    assert harness.master.announcements() == [SlaveState.UP]
    harness.clock.advance(0.1)
    assert harness.master.announcements() == [SlaveState.UP, SlaveState.ALIVE]
    harness.clock.advance(10)
    assert harness.master.announcements() == [SlaveState.UP, SlaveState.ALIVE, SlaveState.ALIVE]


def test_up_waits_for_connection(harness: Harness) -> None:
    harness.connection = harness.broker.connect(connected=False)
    harness.start()
    assert harness.master.presence == []

    harness.connection.reconnect()

    assert harness.master.announcements() == [SlaveState.UP]


def test_alive_skipped_while_disconnected(harness: Harness) -> None:
    service = harness.start(announce_interval=10.0)
    harness.connection.disconnect()

    harness.clock.advance(10)
    assert harness.master.announcements() == [SlaveState.UP]
    assert service.stats["announcements_failed"] == 1

    harness.connection.reconnect()
    # The slave announces alive at once after a reconnect, then every interval.
    assert harness.master.announcements() == [SlaveState.UP, SlaveState.ALIVE]
    harness.clock.advance(10)
    assert harness.master.announcements() == [SlaveState.UP, SlaveState.ALIVE, SlaveState.ALIVE]


def test_discover_gets_alive(harness: Harness) -> None:
    harness.start()
    headers, body = encode(DiscoverMessage())

    harness.master.connection.send(DESTINATIONS.presence, body, headers)

    assert harness.master.announcements() == [SlaveState.UP, SlaveState.ALIVE]
    assert isinstance(harness.master.presence[-1], Announcement)
    assert harness.master.presence[-1].tasks == ("echo", "sleep")


def test_announces_down_on_stop(harness: Harness) -> None:
    harness.start()

    stopping = harness.stop()

    assert fired(stopping)
    assert harness.master.announcements() == [SlaveState.UP, SlaveState.DOWN]
    assert [s.destination for s in harness.connection.subscriptions] == []


# Tasks


def test_echo_returns_args(harness: Harness) -> None:
    harness.start()
    args = {"text": "héllo wörld ☃", "n": [1, 2.5, None, True]}

    request_id = harness.master.send_task("echo", args)

    reply = harness.master.final_reply(request_id)
    assert reply == ResultMessage(request_id, SLAVE_ID, args)


def test_sleep_progress_on_clock(harness: Harness) -> None:
    harness.start()
    request_id = harness.master.send_task("sleep", {"seconds": 2.5})
    assert harness.master.replies_for(request_id) == []

    harness.clock.advance(1)
    harness.clock.advance(1)
    assert harness.master.replies_for(request_id) == [
        ProgressMessage(request_id, SLAVE_ID, 40.0, "slept 1 of 2.5 s"),
        ProgressMessage(request_id, SLAVE_ID, 80.0, "slept 2 of 2.5 s"),
    ]
    harness.clock.advance(0.5)

    replies = harness.master.replies_for(request_id)
    assert replies[2:] == [
        ProgressMessage(request_id, SLAVE_ID, 100.0, "slept 2.5 of 2.5 s"),
        ResultMessage(request_id, SLAVE_ID, {"slept": 2.5}),
    ]


def test_sleep_zero(harness: Harness) -> None:
    harness.start()
    request_id = harness.master.send_task("sleep", {"seconds": 0})
    harness.clock.advance(0)

    assert harness.master.final_reply(request_id) == ResultMessage(
        request_id, SLAVE_ID, {"slept": 0}
    )


@pytest.mark.parametrize(
    "args, message",
    [
        ({"seconds": "x"}, "seconds must be a number between 0 and 3600, got 'x'"),
        ({"seconds": -1}, "seconds must be a number between 0 and 3600, got -1"),
        ({"seconds": 3601}, "seconds must be a number between 0 and 3600, got 3601"),
        ({"seconds": True}, "seconds must be a number between 0 and 3600, got True"),
        ({}, "missing argument 'seconds': expected a number between 0 and 3600"),
        ({"seconds": 1, "extra": 2}, "unknown argument(s) 'extra': sleep takes only 'seconds'"),
    ],
)
def test_sleep_invalid_arguments(harness: Harness, args: dict[str, Any], message: str) -> None:
    service = harness.start()

    request_id = harness.master.send_task("sleep", args)

    assert harness.master.final_reply(request_id) == ErrorMessage(
        request_id, SLAVE_ID, "InvalidArguments", message
    )
    assert service.stats["tasks_failed"] == 1


def test_unknown_task(harness: Harness) -> None:
    service = harness.start()

    request_id = harness.master.send_task("backup.db")

    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "UnknownTask"
    assert reply.message == "unknown task 'backup.db': slave s1 has handlers for 'echo', 'sleep'"
    assert service.stats["tasks_unknown"] == 1


def test_handler_exception_reported(harness: Harness) -> None:
    def broken(args: dict[str, Any], progress: ProgressReporter) -> None:
        raise KeyError("missing config")

    harness.registry.register("broken", broken)
    service = harness.start()

    with capturedLogs() as events:
        request_id = harness.master.send_task("broken")

    assert harness.master.final_reply(request_id) == ErrorMessage(
        request_id, SLAVE_ID, "KeyError", "'missing config'"
    )
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["request_id"] == request_id
    assert failures[0]["slave_id"] == SLAVE_ID
    assert failures[0]["task"] == "broken"
    assert failures[0]["log_failure"].check(KeyError)
    assert service.stats["tasks_failed"] == 1


def test_handler_invalid_arguments(harness: Harness) -> None:
    def strict(args: dict[str, Any], progress: ProgressReporter) -> None:
        raise InvalidArguments("path must be absolute, got 'tmp'")

    harness.registry.register("strict", strict)
    harness.start()

    with capturedLogs() as events:
        request_id = harness.master.send_task("strict", {"path": "tmp"})

    assert harness.master.final_reply(request_id) == ErrorMessage(
        request_id, SLAVE_ID, "InvalidArguments", "path must be absolute, got 'tmp'"
    )
    assert not [e for e in events if "log_failure" in e]


def test_result_not_json(harness: Harness) -> None:
    harness.registry.register("odd", lambda args, progress: {"when": object()})
    service = harness.start()

    request_id = harness.master.send_task("odd")

    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "InvalidResult"
    assert "cannot be sent as JSON" in reply.message
    assert service.stats["tasks_failed"] == 1
    assert service.stats["tasks_succeeded"] == 0


def test_coroutine_and_deferred_handlers(harness: Harness) -> None:
    async def coroutine_handler(args: dict[str, Any], progress: ProgressReporter) -> str:
        return "from a coroutine"

    harness.registry.register("coroutine", coroutine_handler, blocking=False)
    harness.registry.register("deferred", lambda a, p: succeed("from a Deferred"), blocking=False)
    harness.start()

    first = harness.master.send_task("coroutine")
    second = harness.master.send_task("deferred")

    assert harness.master.final_reply(first) == ResultMessage(first, SLAVE_ID, "from a coroutine")
    assert harness.master.final_reply(second) == ResultMessage(second, SLAVE_ID, "from a Deferred")


def test_blocking_handler_uses_thread_pool(harness: Harness) -> None:
    def add(args: dict[str, Any], progress: ProgressReporter) -> int:
        progress.report(50, "adding")
        return int(args["a"]) + int(args["b"])

    harness.registry.register("add", add)
    harness.start()

    request_id = harness.master.send_task("add", {"a": 2, "b": 3})

    assert harness.thread_pool.calls == 1
    assert harness.master.replies_for(request_id) == [
        ProgressMessage(request_id, SLAVE_ID, 50.0, "adding"),
        ResultMessage(request_id, SLAVE_ID, 5),
    ]


def test_malformed_task_gets_invalid_task(harness: Harness) -> None:
    service = harness.start()
    request_id = new_request_id()

    harness.master.send_raw(
        {
            "taskmesh-type": "task",
            "request_id": request_id,
            "reply-to": DESTINATIONS.reply,
        },
        b"{not json",
    )
    next_id = harness.master.send_task("echo", {"still": "running"})

    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "InvalidTask"
    assert reply.message.startswith("body is not valid JSON")
    assert harness.master.final_reply(next_id) == ResultMessage(
        next_id, SLAVE_ID, {"still": "running"}
    )
    assert service.stats["invalid_messages"] == 1


def test_malformed_task_without_reply_to(harness: Harness) -> None:
    harness.start()
    request_id = new_request_id()

    harness.master.send_raw(
        {"taskmesh-type": "task", "request_id": request_id},
        b'{"task": "echo"}',
    )

    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "InvalidTask"
    assert reply.message == "missing 'reply-to' header"


def test_malformed_without_request_id_logged(harness: Harness) -> None:
    service = harness.start()

    with capturedLogs() as events:
        harness.master.send_raw({"taskmesh-type": "task", "request_id": "nope"}, b"{}")
        harness.master.send_raw({}, b"{}")

    assert harness.master.replies == []
    assert service.stats["invalid_messages"] == 2
    warnings = [e for e in events if e.get("reason") is not None]
    # The second warning comes within the rate limit, so only one is logged.
    assert len(warnings) == 1
    assert warnings[0]["reason"] == "invalid request_id 'nope': expected a UUID"
    assert warnings[0]["slave_id"] == SLAVE_ID


def test_other_message_on_tasks_topic_ignored(harness: Harness) -> None:
    service = harness.start()
    headers, body = encode(DiscoverMessage())

    harness.master.connection.send(DESTINATIONS.tasks, body, headers)

    assert harness.master.replies == []
    assert service.stats["ignored_messages"] == 1


def test_concurrency_limit(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start(concurrency=2)

    ids = [harness.master.send_task("wait", {"n": n}) for n in range(3)]

    assert [args["n"] for args, _, _ in controlled.calls] == [0, 1]
    assert service.stats["tasks_queued"] == 1

    controlled.calls[1][2].callback("second done")

    assert [args["n"] for args, _, _ in controlled.calls] == [0, 1, 2]
    assert harness.master.final_reply(ids[1]) == ResultMessage(ids[1], SLAVE_ID, "second done")
    controlled.calls[0][2].callback("first done")
    controlled.calls[2][2].callback("third done")
    assert harness.master.final_reply(ids[2]) == ResultMessage(ids[2], SLAVE_ID, "third done")


def test_deadline_expired_on_arrival(harness: Harness) -> None:
    harness.clock.advance(1000)
    service = harness.start()

    request_id = harness.master.send_task("echo", deadline=999.5)

    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "Expired"
    assert reply.message == "the task deadline passed 0.500 s before slave s1 could start it"
    assert service.stats["tasks_expired"] == 1


def test_deadline_in_future_runs(harness: Harness) -> None:
    harness.start()
    request_id = harness.master.send_task("echo", {"a": 1}, deadline=harness.clock.seconds() + 5)
    assert harness.master.final_reply(request_id) == ResultMessage(request_id, SLAVE_ID, {"a": 1})


def test_deadline_expired_while_queued(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(concurrency=1)
    first = harness.master.send_task("wait")
    late = harness.master.send_task("echo", deadline=harness.clock.seconds() + 5)

    harness.clock.advance(10)
    controlled.calls[0][2].callback(None)

    assert harness.master.final_reply(first) == ResultMessage(first, SLAVE_ID, None)
    reply = harness.master.final_reply(late)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "Expired"


def test_duplicate_request_id_ignored(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    request_id = harness.master.send_task("wait")

    harness.master.send_task("wait", request_id=request_id)

    assert len(controlled.calls) == 1
    assert service.stats["tasks_duplicate"] == 1
    controlled.calls[0][2].callback(None)


def test_reply_to_header_used(harness: Harness) -> None:
    harness.start()
    private = harness.broker.connect()
    received: list[StompMessage] = []
    private.subscribe("/queue/testns.reply.private", received.append)

    harness.master.send_task("echo", {"x": 1}, reply_to="/queue/testns.reply.private")

    accepted, result = (decode(m.headers, m.body) for m in received)
    assert isinstance(accepted, AcceptedMessage)
    decoded = result
    assert isinstance(decoded, ResultMessage)
    assert decoded.result == {"x": 1}


def test_progress_rate_limited(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("chatty", controlled, blocking=False)
    harness.start()
    request_id = harness.master.send_task("chatty")
    progress = controlled.calls[0][1]

    for percent in range(1, 11):
        progress.report(percent)

    assert harness.master.replies_for(request_id) == [ProgressMessage(request_id, SLAVE_ID, 1.0)]
    harness.clock.advance(0.5)
    assert harness.master.replies_for(request_id)[1:] == [ProgressMessage(request_id, SLAVE_ID, 10.0)]

    progress.report(50)
    controlled.calls[0][2].callback("done")
    harness.clock.advance(1)
    # The report made just before the result is dropped, and so are later ones.
    progress.report(60)
    assert [type(r) for r in harness.master.replies_for(request_id)] == [
        ProgressMessage,
        ProgressMessage,
        ResultMessage,
    ]


def test_progress_rejects_bad_percent(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start()
    harness.master.send_task("wait")
    progress = controlled.calls[0][1]

    with pytest.raises(ValueError, match="between 0 and 100, got 150"):
        progress.report(150)
    with pytest.raises(TypeError, match="message must be a str"):
        progress.report(10, None)  # type: ignore[arg-type]
    controlled.calls[0][2].callback(None)


def test_reply_waits_for_reconnect(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start()
    request_id = harness.master.send_task("wait")

    harness.connection.disconnect()
    controlled.calls[0][2].callback("finished offline")
    assert harness.master.replies_for(request_id) == []

    harness.connection.reconnect()

    assert harness.master.final_reply(request_id) == ResultMessage(
        request_id, SLAVE_ID, "finished offline"
    )
    assert service.stats["replies_sent"] == 1


def test_rejected_reply_destination_logged(harness: Harness) -> None:
    service = harness.start()
    harness.broker.reject_destination("/queue/forbidden", "not authorized to write")

    with capturedLogs() as events:
        request_id = harness.master.send_task("echo", reply_to="/queue/forbidden")

    assert service.stats["replies_failed"] == 1
    errors = [e for e in events if e.get("destination") == "/queue/forbidden"]
    assert errors[0]["request_id"] == request_id
    assert errors[0]["error"] == "broker error: not authorized to write"


def test_task_logs_have_ids(harness: Harness) -> None:
    harness.start()

    with capturedLogs() as events:
        request_id = harness.master.send_task("echo")

    task_events = [e for e in events if e.get("request_id") == request_id]
    assert any("received" in e["log_format"] for e in task_events)
    assert any(e.get("outcome") == "succeeded" for e in task_events)
    assert all(
        e["slave_id"] == SLAVE_ID and e["task"] == "echo"
        for e in events
        if e.get("request_id") == request_id
    )


def test_start_logs_version(harness: Harness) -> None:
    with capturedLogs() as events:
        harness.start()

    [start] = [e for e in events if "starting" in e["log_format"]]
    assert start["version"]
    assert start["slave_id"] == SLAVE_ID


# Stopping


def test_stop_waits_for_running_task(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start()
    request_id = harness.master.send_task("wait")

    stopping = harness.stop()
    harness.clock.advance(29)
    assert not fired(stopping)
    assert harness.master.announcements() == [SlaveState.UP]
    # The tasks topic is unsubscribed, so new tasks do not arrive.
    later = harness.master.send_task("echo")
    assert harness.master.replies_for(later) == []

    controlled.calls[0][2].callback("done in time")

    assert fired(stopping)
    assert harness.master.final_reply(request_id) == ResultMessage(
        request_id, SLAVE_ID, "done in time"
    )
    assert harness.master.announcements() == [SlaveState.UP, SlaveState.DOWN]


def test_stop_cancels_after_grace_period(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start(grace_period=5.0)
    request_id = harness.master.send_task("wait")

    stopping = harness.stop()
    harness.clock.advance(5)

    assert fired(stopping)
    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "Cancelled"
    assert "grace period of 5.0 s" in reply.message
    assert harness.master.announcements() == [SlaveState.UP, SlaveState.DOWN]
    assert service.stats["tasks_cancelled"] == 1


def test_stop_rejects_waiting_tasks(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    harness.start(concurrency=1)
    running = harness.master.send_task("wait")
    waiting = harness.master.send_task("wait")

    stopping = harness.stop()

    reply = harness.master.final_reply(waiting)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "SlaveStopping"
    controlled.calls[0][2].callback(None)
    assert fired(stopping)
    assert len(controlled.calls) == 1
    assert harness.master.final_reply(running) == ResultMessage(running, SLAVE_ID, None)


def test_stop_before_connection(harness: Harness) -> None:
    harness.connection = harness.broker.connect(connected=False)
    service = harness.start()

    stopping = harness.stop()

    assert fired(stopping)
    assert harness.master.presence == []
    assert service.stats["announcements_failed"] == 1


def test_stop_without_start(harness: Harness) -> None:
    service = harness.make()
    assert fired(service.stopService())


def test_invalid_constructor_arguments(harness: Harness) -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        harness.make(concurrency=0)
    with pytest.raises(ValueError, match="announce_interval must be a positive number"):
        harness.make(announce_interval=0)
    with pytest.raises(ValueError, match="invalid slave id"):
        SlaveService(
            harness.connection,
            NAMESPACE,
            "bad id",
            harness.registry,
            clock=harness.clock,
            reactor=SynchronousReactorThreads(),
        )


# A real thread pool on the real reactor


@pytest_twisted.ensureDeferred
async def test_blocking_handler_off_reactor_thread() -> None:
    from twisted.internet import reactor

    reactor_thread = threading.current_thread()
    handler_threads: list[threading.Thread] = []

    def blocking(args: dict[str, Any], progress: ProgressReporter) -> str:
        handler_threads.append(threading.current_thread())
        progress.report(50, "from a worker thread")
        return "done"

    broker = FakeBroker()
    master = Master(broker)
    registry = HandlerRegistry()
    registry.register("blocking", blocking)
    service = SlaveService(
        broker.connect(), NAMESPACE, SLAVE_ID, registry, clock=reactor, reactor=reactor
    )
    service.startService()
    try:
        request_id = new_request_id()
        done = master.wait_for_final_reply(request_id)
        master.send_task("blocking", request_id=request_id)
        reply = await done.addTimeout(10, reactor)
    finally:
        await service.stopService()

    assert reply == ResultMessage(request_id, SLAVE_ID, "done")
    assert handler_threads and handler_threads[0] is not reactor_thread
    assert master.replies_for(request_id)[0] == ProgressMessage(
        request_id, SLAVE_ID, 50.0, "from a worker thread"
    )


def test_stop_gives_up_while_disconnected(harness: Harness) -> None:
    controlled = Controlled()
    harness.registry.register("wait", controlled, blocking=False)
    service = harness.start(grace_period=5.0)
    request_id = harness.master.send_task("wait")
    harness.connection.disconnect()

    with capturedLogs() as events:
        stopping = harness.stop()
        harness.clock.advance(5)
        assert not fired(stopping)
        harness.clock.advance(5)

    assert fired(stopping)
    assert harness.master.replies_for(request_id) == []
    assert service.stats["announcements_failed"] == 1
    gave_up = [e for e in events if "gave up sending replies" in e["log_format"]]
    assert gave_up[0]["request_ids"] == request_id


def test_handler_cancelled_error_is_failure(harness: Harness) -> None:
    def cancels(args: dict[str, Any], progress: ProgressReporter) -> Deferred[None]:
        pending: Deferred[None] = Deferred()
        pending.cancel()
        return pending

    harness.registry.register("cancels", cancels, blocking=False)
    service = harness.start()

    request_id = harness.master.send_task("cancels")

    reply = harness.master.final_reply(request_id)
    assert isinstance(reply, ErrorMessage)
    assert reply.error_type == "CancelledError"
    assert service.stats["tasks_cancelled"] == 0
    assert service.stats["tasks_failed"] == 1


# Handler registry and loading


def test_registry_rejects_bad_registrations() -> None:
    registry = HandlerRegistry()
    registry.register("task.one", lambda args, progress: None)

    async def coroutine_handler(args: dict[str, Any], progress: ProgressReporter) -> None:
        return None

    with pytest.raises(ValueError, match="task 'task.one' already has a handler"):
        registry.register("task.one", lambda args, progress: None)
    with pytest.raises(ValueError, match="invalid task name 'bad name'"):
        registry.register("bad name", lambda args, progress: None)
    with pytest.raises(ValueError, match="register it with blocking=False"):
        registry.register("coroutine", coroutine_handler)
    with pytest.raises(TypeError, match="is not callable"):
        registry.register("number", 42)  # type: ignore[arg-type]
    assert registry.names() == ("task.one",)
    assert "task.one" in registry
    assert len(registry) == 1


def test_loaded_handlers_blocking_flag() -> None:
    import importlib.metadata

    entry_points = [
        importlib.metadata.EntryPoint(name, f"tests.unit.test_slave:{target}", "taskmesh.handlers")
        for name, target in (
            ("plain", "plain_handler"),
            ("marked", "marked_handler"),
            ("coroutine", "coroutine_handler"),
        )
    ]

    specs = load_operator_handlers({}, entry_points)

    assert {s.name: s.blocking for s in specs} == {
        "plain": True,
        "marked": False,
        "coroutine": False,
    }


def test_load_entry_point_failure() -> None:
    import importlib.metadata

    broken = importlib.metadata.EntryPoint("broken", "tests.unit.test_slave:no_such", "g")

    with pytest.raises(HandlerLoadError) as raised:
        load_operator_handlers({}, [broken])

    assert str(raised.value).startswith(
        "cannot load handler from entry point 'broken' (tests.unit.test_slave:no_such):"
        " AttributeError"
    )


def test_slave_package_exports() -> None:
    import taskmesh.slave

    for name in taskmesh.slave.__all__:
        assert hasattr(taskmesh.slave, name), name


def plain_handler(args: dict[str, Any], progress: ProgressReporter) -> None:
    return None


@non_blocking
def marked_handler(args: dict[str, Any], progress: ProgressReporter) -> Deferred[None]:
    return succeed(None)


async def coroutine_handler(args: dict[str, Any], progress: ProgressReporter) -> None:
    return None

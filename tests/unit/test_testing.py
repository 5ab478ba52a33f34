"""
Tests for the in-memory fake broker in :mod:`taskmesh.testing`.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from taskmesh.stomp import (
    ACK_CLIENT,
    ACK_CLIENT_INDIVIDUAL,
    BrokerError,
    ConnectionClosed,
    NotConnected,
    StompConnection,
    StompMessage,
)
from taskmesh.testing import (
    FakeBroker,
    FakeConnection,
    RecordingProgressReporter,
    SynchronousReactorThreads,
    SynchronousThreadPool,
)


class Inbox:
    """
    A message handler that stores what it receives.
    """

    def __init__(self) -> None:
        self.messages: list[StompMessage] = []

    def __call__(self, message: StompMessage) -> None:
        self.messages.append(message)

    @property
    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]


def result_of(deferred: Deferred[Any]) -> Any:
    """
    Return the result of a Deferred that has already fired, raising its failure.
    """
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(deferred: Deferred[Any]) -> Failure:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), f"the Deferred succeeded with {results[0]!r}"
    return results[0]


def test_connection_implements_protocol() -> None:
    connection: StompConnection = FakeBroker().connect()
    assert connection.is_connected
    assert connection.last_error is None


def test_topic_reaches_every_subscriber() -> None:
    broker = FakeBroker()
    first, second, sender = broker.connect(), broker.connect(), broker.connect()
    inbox_1, inbox_2 = Inbox(), Inbox()
    first.subscribe("/topic/t", inbox_1)
    second.subscribe("/topic/t", inbox_2)

    result_of(sender.send("/topic/t", b"hello", {"x": "1"}))

    assert inbox_1.bodies == [b"hello"]
    assert inbox_2.bodies == [b"hello"]
    assert broker.sent == [("/topic/t", {"x": "1"}, b"hello")]


def test_topic_without_subscriber_drops_message() -> None:
    broker = FakeBroker()
    sender = broker.connect()
    sender.send("/topic/t", b"lost")
    inbox = Inbox()
    broker.connect().subscribe("/topic/t", inbox)

    assert inbox.messages == []
    assert broker.sent_to("/topic/t") == [({}, b"lost")]


def test_queue_round_robin() -> None:
    broker = FakeBroker()
    inbox_1, inbox_2 = Inbox(), Inbox()
    broker.connect().subscribe("/queue/q", inbox_1)
    broker.connect().subscribe("/queue/q", inbox_2)
    sender = broker.connect()

    for n in range(4):
        sender.send("/queue/q", b"%d" % n)

    assert inbox_1.bodies == [b"0", b"2"]
    assert inbox_2.bodies == [b"1", b"3"]


def test_queue_keeps_messages_until_subscribe() -> None:
    broker = FakeBroker()
    sender = broker.connect()
    sender.send("/queue/q", b"a")
    sender.send("/queue/q", b"b")
    assert broker.queued("/queue/q") == [({}, b"a"), ({}, b"b")]

    inbox = Inbox()
    broker.connect().subscribe("/queue/q", inbox)

    assert inbox.bodies == [b"a", b"b"]
    assert broker.queued("/queue/q") == []


def test_message_headers() -> None:
    broker = FakeBroker()
    inbox = Inbox()
    subscription = broker.connect().subscribe("/queue/q", inbox)
    broker.connect().send("/queue/q", b"{}", {"request_id": "r1", "message-id": "spoofed"})

    [message] = inbox.messages
    assert message.headers == {
        "request_id": "r1",
        "destination": "/queue/q",
        "message-id": message.message_id,
        "subscription": subscription.subscription_id,
    }
    assert message.message_id != "spoofed"
    assert message.destination == "/queue/q"
    assert message.subscription == subscription.subscription_id


def test_non_ascii_body_and_headers() -> None:
    broker = FakeBroker()
    inbox = Inbox()
    broker.connect().subscribe("/topic/t", inbox)
    body = "café ☕".encode("utf-8")
    broker.connect().send("/topic/t", body, {"note": "grüße"})

    [message] = inbox.messages
    assert message.body == body
    assert message.headers["note"] == "grüße"


def test_send_rejects_non_bytes_body() -> None:
    connection = FakeBroker().connect()
    with pytest.raises(TypeError, match="must be bytes"):
        connection.send("/queue/q", "text")  # type: ignore[arg-type]


def test_nested_send_keeps_order() -> None:
    broker = FakeBroker()
    sender = broker.connect()
    order: list[bytes] = []

    def echo_once(message: StompMessage) -> None:
        order.append(message.body)
        if message.body == b"first":
            sender.send("/topic/t", b"second")

    broker.connect().subscribe("/topic/t", echo_once)
    broker.connect().subscribe("/topic/t", lambda m: order.append(b"late:" + m.body))

    sender.send("/topic/t", b"first")

    # Every subscriber receives "first" before "second".
    assert order == [b"first", b"late:first", b"second", b"late:second"]


def test_send_while_disconnected_fails() -> None:
    connection = FakeBroker().connect()
    connection.disconnect("broker went away")

    failure = failure_of(connection.send("/queue/q", b"x"))

    assert failure.check(NotConnected)
    assert connection.last_error == "broker went away"
    assert not connection.is_connected


def test_rejected_destination_fails_send() -> None:
    broker = FakeBroker()
    broker.reject_destination("/topic/secret", "User foo is not authorized to write")
    connection = broker.connect()

    failure = failure_of(connection.send("/topic/secret.tasks", b"x", receipt=True))

    assert failure.check(BrokerError)
    assert failure.value.message == "User foo is not authorized to write"
    assert broker.sent == []
    assert connection.is_connected


def test_rejected_destination_fails_subscribe() -> None:
    broker = FakeBroker()
    broker.reject_destination("/queue/private", "User foo is not authorized to read")
    connection = broker.connect()
    inbox = Inbox()

    subscription = connection.subscribe("/queue/private.q", inbox)

    assert not subscription.active
    assert isinstance(subscription.error, BrokerError)
    assert subscription.error.message == "User foo is not authorized to read"
    assert connection.last_error == "broker error: User foo is not authorized to read"

    broker.allow_destination("/queue/private")
    connection.disconnect()
    connection.reconnect()
    broker.connect().send("/queue/private.q", b"now allowed")
    assert subscription.active
    assert inbox.bodies == [b"now allowed"]


def test_receipt_fires() -> None:
    connection = FakeBroker().connect()
    assert result_of(connection.send("/queue/q", b"x", receipt=True)) is None


def test_when_connected_fresh_deferreds() -> None:
    broker = FakeBroker()
    connection = broker.connect(connected=False)
    first = connection.when_connected()
    second = connection.when_connected()
    cancelled = connection.when_connected()
    cancelled.cancel()

    assert first is not second
    assert not first.called
    connection.reconnect()

    assert result_of(first) is None
    assert result_of(second) is None
    assert failure_of(cancelled).check(Exception)
    assert result_of(connection.when_connected()) is None


def test_subscriptions_restored_on_reconnect() -> None:
    broker = FakeBroker()
    connection = broker.connect()
    sender = broker.connect()
    inbox = Inbox()
    connection.subscribe("/topic/t", inbox)

    connection.disconnect()
    sender.send("/topic/t", b"missed")
    connection.reconnect()
    sender.send("/topic/t", b"received")

    assert inbox.bodies == [b"received"]
    assert inbox.messages[0].generation == 2


def test_subscribe_while_disconnected() -> None:
    broker = FakeBroker()
    connection = broker.connect(connected=False)
    inbox = Inbox()
    connection.subscribe("/queue/q", inbox)
    broker.connect().send("/queue/q", b"waiting")
    assert inbox.messages == []

    connection.reconnect()

    assert inbox.bodies == [b"waiting"]


def test_unacked_redelivered_after_disconnect() -> None:
    broker = FakeBroker()
    worker = broker.connect()
    inbox = Inbox()
    worker.subscribe("/queue/q", inbox, ack=ACK_CLIENT_INDIVIDUAL)
    broker.connect().send("/queue/q", b"job")
    [first] = inbox.messages
    assert first.headers["ack"] == first.ack_id

    worker.disconnect()
    worker.reconnect()

    assert inbox.bodies == [b"job", b"job"]
    redelivered = inbox.messages[1]
    assert redelivered.headers["redelivered"] == "true"
    assert redelivered.message_id == first.message_id
    assert failure_of(worker.ack(first)).check(NotConnected)
    assert result_of(worker.ack(redelivered)) is None

    worker.disconnect()
    worker.reconnect()
    assert len(inbox.messages) == 2


def test_unacked_goes_to_other_subscriber() -> None:
    broker = FakeBroker()
    failing, healthy = broker.connect(), broker.connect()
    failing_inbox, healthy_inbox = Inbox(), Inbox()
    failing.subscribe("/queue/q", failing_inbox, ack=ACK_CLIENT_INDIVIDUAL)
    broker.connect().send("/queue/q", b"job")
    healthy.subscribe("/queue/q", healthy_inbox, ack=ACK_CLIENT_INDIVIDUAL)

    failing.disconnect()

    assert healthy_inbox.bodies == [b"job"]


def test_nack_redelivers() -> None:
    broker = FakeBroker()
    connection = broker.connect()
    inbox = Inbox()
    connection.subscribe("/queue/q", inbox, ack=ACK_CLIENT_INDIVIDUAL)
    broker.connect().send("/queue/q", b"job")

    result_of(connection.nack(inbox.messages[0]))

    assert inbox.bodies == [b"job", b"job"]
    assert result_of(connection.ack(inbox.messages[1])) is None
    assert failure_of(connection.ack(inbox.messages[1])).check(BrokerError)


def test_nack_limit_dead_letters() -> None:
    broker = FakeBroker(max_redeliveries=2)
    connection = broker.connect()

    def reject(message: StompMessage) -> None:
        connection.nack(message)

    connection.subscribe("/queue/q", reject, ack=ACK_CLIENT_INDIVIDUAL)
    broker.connect().send("/queue/q", b"poison", {"k": "v"})

    assert broker.dead_letters == [("/queue/q", {"k": "v"}, b"poison")]
    assert broker.queued("/queue/q") == []


def test_client_ack_is_cumulative() -> None:
    broker = FakeBroker()
    connection = broker.connect()
    inbox = Inbox()
    connection.subscribe("/queue/q", inbox, ack=ACK_CLIENT)
    sender = broker.connect()
    for body in (b"1", b"2", b"3"):
        sender.send("/queue/q", body)

    result_of(connection.ack(inbox.messages[1]))
    connection.disconnect()
    connection.reconnect()

    # Only the message after the acknowledged one comes back.
    assert inbox.bodies == [b"1", b"2", b"3", b"3"]


def test_topic_unacked_dropped_on_disconnect() -> None:
    broker = FakeBroker()
    connection = broker.connect()
    inbox = Inbox()
    connection.subscribe("/topic/t", inbox, ack=ACK_CLIENT_INDIVIDUAL)
    broker.connect().send("/topic/t", b"event")

    connection.disconnect()
    connection.reconnect()

    assert inbox.bodies == [b"event"]


def test_unsubscribe_stops_delivery() -> None:
    broker = FakeBroker()
    connection = broker.connect()
    inbox = Inbox()
    subscription = connection.subscribe("/queue/q", inbox, ack=ACK_CLIENT_INDIVIDUAL)
    sender = broker.connect()
    sender.send("/queue/q", b"1")

    assert result_of(subscription.unsubscribe()) is None
    sender.send("/queue/q", b"2")

    assert inbox.bodies == [b"1"]
    # The unacknowledged message went back to the queue.
    assert broker.queued("/queue/q") == [({}, b"1"), ({}, b"2")]


def test_invalid_ack_mode() -> None:
    connection = FakeBroker().connect()
    with pytest.raises(ValueError, match="invalid ack mode 'sometimes'"):
        connection.subscribe("/queue/q", Inbox(), ack="sometimes")


def test_clock_delays_delivery() -> None:
    clock = Clock()
    broker = FakeBroker(clock)
    inbox = Inbox()
    broker.connect().subscribe("/topic/t", inbox)

    broker.connect().send("/topic/t", b"later")
    assert inbox.messages == []

    clock.advance(0)
    assert inbox.bodies == [b"later"]
    assert clock.getDelayedCalls() == []


def test_flush_delivers_now() -> None:
    clock = Clock()
    broker = FakeBroker(clock)
    inbox = Inbox()
    broker.connect().subscribe("/topic/t", inbox)
    broker.connect().send("/topic/t", b"now")

    broker.flush()

    assert inbox.bodies == [b"now"]
    assert clock.getDelayedCalls() == []


def test_handler_failure_recorded() -> None:
    broker = FakeBroker()

    def broken(message: StompMessage) -> None:
        raise RuntimeError("handler bug")

    async def broken_async(message: StompMessage) -> None:
        raise KeyError("async handler bug")

    broker.connect().subscribe("/topic/t", broken)
    broker.connect().subscribe("/topic/t", broken_async)
    sender = broker.connect()

    result_of(sender.send("/topic/t", b"x"))

    assert [f.type for f in broker.handler_failures] == [RuntimeError, KeyError]


def test_disconnect_twice_raises() -> None:
    connection = FakeBroker().connect()
    connection.disconnect()
    with pytest.raises(RuntimeError, match="already disconnected"):
        connection.disconnect()
    connection.reconnect()
    with pytest.raises(RuntimeError, match="already connected"):
        connection.reconnect()


def test_fake_connection_repr() -> None:
    connection = FakeBroker().connect()
    assert isinstance(connection, FakeConnection)
    assert "connected generation=1" in repr(connection)


def test_synchronous_thread_pool() -> None:
    pool = SynchronousThreadPool()
    pool.start()

    done = deferToThreadPool(SynchronousReactorThreads(), pool, lambda x: x * 2, 21)
    failed = deferToThreadPool(SynchronousReactorThreads(), pool, lambda: 1 / 0)

    assert result_of(done) == 42
    assert failure_of(failed).check(ZeroDivisionError)
    assert pool.calls == 2
    pool.stop()


def test_recording_progress_reporter() -> None:
    progress = RecordingProgressReporter()
    progress.report(50, "half")
    progress.report(100.0)

    assert progress.reports == [(50.0, "half"), (100.0, "")]
    with pytest.raises(ValueError, match="between 0 and 100"):
        progress.report(101)


# Prefetch


def test_prefetch_limits_unacked_queue_messages() -> None:
    broker = FakeBroker()
    worker = broker.connect()
    inbox = Inbox()
    worker.subscribe("/queue/q", inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=2)
    producer = broker.connect()

    for n in range(4):
        producer.send("/queue/q", f"job {n}".encode())

    assert inbox.bodies == [b"job 0", b"job 1"]
    assert [body for _, body in broker.queued("/queue/q")] == [b"job 2", b"job 3"]
    result_of(worker.ack(inbox.messages[0]))
    assert inbox.bodies == [b"job 0", b"job 1", b"job 2"]


def test_prefetch_shares_queue_between_consumers() -> None:
    broker = FakeBroker()
    first, second = broker.connect(), broker.connect()
    first_inbox, second_inbox = Inbox(), Inbox()
    first.subscribe("/queue/q", first_inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=1)
    second.subscribe("/queue/q", second_inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=2)
    producer = broker.connect()

    for n in range(5):
        producer.send("/queue/q", f"job {n}".encode())

    assert len(first_inbox.messages) == 1
    assert len(second_inbox.messages) == 2
    assert len(broker.queued("/queue/q")) == 2


def test_prefetch_ignored_for_auto_ack() -> None:
    broker = FakeBroker()
    inbox = Inbox()
    broker.connect().subscribe("/queue/q", inbox, prefetch=1)
    producer = broker.connect()

    for n in range(3):
        producer.send("/queue/q", f"job {n}".encode())

    assert len(inbox.messages) == 3


def test_prefetch_on_topic_holds_messages() -> None:
    broker = FakeBroker()
    listener = broker.connect()
    inbox = Inbox()
    listener.subscribe("/topic/t", inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=1)
    producer = broker.connect()

    producer.send("/topic/t", b"one")
    producer.send("/topic/t", b"two")
    assert inbox.bodies == [b"one"]

    result_of(listener.ack(inbox.messages[0]))
    assert inbox.bodies == [b"one", b"two"]


def test_nack_frees_prefetch_slot() -> None:
    broker = FakeBroker(max_redeliveries=1)
    worker = broker.connect()
    inbox = Inbox()
    worker.subscribe("/queue/q", inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=1)
    producer = broker.connect()
    producer.send("/queue/q", b"poison")
    producer.send("/queue/q", b"next")

    result_of(worker.nack(inbox.messages[0]))
    result_of(worker.nack(inbox.messages[1]))

    assert inbox.bodies == [b"poison", b"poison", b"next"]
    assert inbox.messages[1].headers["redelivered"] == "true"
    assert [body for _, _, body in broker.dead_letters] == [b"poison"]


def test_invalid_prefetch() -> None:
    with pytest.raises(ValueError, match="invalid prefetch 0"):
        FakeBroker().connect().subscribe("/queue/q", Inbox(), prefetch=0)


def test_unsubscribe_returns_unacked_to_queue() -> None:
    broker = FakeBroker()
    leaving, staying = broker.connect(), broker.connect()
    leaving_inbox, staying_inbox = Inbox(), Inbox()
    subscription = leaving.subscribe(
        "/queue/q", leaving_inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=1
    )
    broker.connect().send("/queue/q", b"job")
    staying.subscribe("/queue/q", staying_inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=1)
    assert staying_inbox.messages == []

    result_of(subscription.unsubscribe())

    assert staying_inbox.bodies == [b"job"]
    assert staying_inbox.messages[0].headers["redelivered"] == "true"
    assert failure_of(leaving.ack(leaving_inbox.messages[0])).check(BrokerError)


# Time-to-live


def test_expired_message_not_delivered() -> None:
    clock = Clock()
    clock.advance(1000)
    broker = FakeBroker(clock)
    producer = broker.connect()
    producer.send("/queue/q", b"short", ttl=5)
    producer.send("/queue/q", b"long", ttl=60)
    producer.send("/queue/q", b"forever")
    clock.advance(10)

    inbox = Inbox()
    broker.connect().subscribe("/queue/q", inbox)
    clock.advance(0)

    assert inbox.bodies == [b"long", b"forever"]
    [(destination, headers, body)] = broker.expired
    assert destination == "/queue/q"
    assert body == b"short"
    assert headers["expires"] == "1005000"


def test_expired_topic_message_waiting_for_prefetch() -> None:
    clock = Clock()
    broker = FakeBroker(clock)
    listener = broker.connect()
    inbox = Inbox()
    listener.subscribe("/topic/t", inbox, ack=ACK_CLIENT_INDIVIDUAL, prefetch=1)
    producer = broker.connect()
    producer.send("/topic/t", b"first")
    producer.send("/topic/t", b"brief", ttl=1)
    clock.advance(0)

    clock.advance(2)
    result_of(listener.ack(inbox.messages[0]))
    clock.advance(0)

    assert inbox.bodies == [b"first"]
    assert [body for _, _, body in broker.expired] == [b"brief"]


def test_persistent_and_ttl_headers() -> None:
    clock = Clock()
    clock.advance(50)
    broker = FakeBroker(clock)

    broker.connect().send("/queue/q", b"job", persistent=True, ttl=2.5)

    [(headers, _)] = broker.sent_to("/queue/q")
    assert headers == {"persistent": "true", "expires": "52500"}


# Receipts


def test_held_receipts_fire_on_release() -> None:
    broker = FakeBroker()
    sender = broker.connect()
    inbox = Inbox()
    broker.connect().subscribe("/queue/q", inbox)
    sender.hold_receipts()

    with_receipt = sender.send("/queue/q", b"one", receipt=True)
    without_receipt = sender.send("/queue/q", b"two")

    assert inbox.bodies == [b"one", b"two"]
    assert result_of(without_receipt) is None
    assert not fired(with_receipt)
    sender.release_receipts()
    assert result_of(with_receipt) is None
    assert result_of(sender.send("/queue/q", b"three", receipt=True)) is None


def test_held_receipts_fail_on_disconnect() -> None:
    broker = FakeBroker()
    sender = broker.connect()
    sender.hold_receipts()
    sending = sender.send("/queue/q", b"one", receipt=True)

    sender.disconnect()

    assert failure_of(sending).check(ConnectionClosed)
    assert broker.queued("/queue/q") == [({}, b"one")]


def fired(deferred: Deferred[Any]) -> bool:
    return deferred.called

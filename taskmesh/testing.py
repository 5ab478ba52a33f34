"""
In-memory fakes for testing code that talks to a STOMP broker through taskmesh.

:class:`FakeBroker` routes messages between :class:`FakeConnection` objects
like a STOMP broker does, and each connection implements
:class:`taskmesh.stomp.StompConnection`, so a handler, a slave or a master can
be tested without sockets or sleeps::

    broker = FakeBroker()
    slave_connection = broker.connect()
    master_connection = broker.connect()

Delivery is synchronous by default: a message is delivered to every
subscriber before the outermost :meth:`FakeConnection.send` returns. A message
sent from inside a message handler is queued and delivered after the message
being handled, so every subscriber receives messages in the order they were sent.
With ``FakeBroker(clock=clock)`` deliveries wait until the clock is advanced
(``clock.advance(0)``) or :meth:`FakeBroker.flush` is called.

Like ActiveMQ and RabbitMQ, the fake limits a ``client`` or
``client-individual`` subscription to ``prefetch`` unacknowledged messages,
discards a message whose ``expires`` time has passed instead of delivering it,
and marks a redelivered message with ``redelivered: true``.

:class:`SynchronousThreadPool` and :class:`SynchronousReactorThreads` let code
that calls ``deferToThreadPool`` run its function at once in the calling
thread.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from taskmesh.slave._handlers import ProgressReporter
from taskmesh.stomp._errors import BrokerError, ConnectionClosed, NotConnected
from taskmesh.stomp._interfaces import (
    ACK_AUTO,
    ACK_CLIENT,
    ACK_MODES,
    MessageHandler,
    StompMessage,
)

__all__ = [
    "FakeBroker",
    "FakeConnection",
    "FakeSubscription",
    "RecordingProgressReporter",
    "SynchronousReactorThreads",
    "SynchronousThreadPool",
]

TOPIC_PREFIX = "/topic/"


@dataclass
class _Envelope:
    """
    A message accepted by the broker, with its delivery count.
    """

    destination: str
    headers: dict[str, str]
    body: bytes
    message_id: str
    redeliveries: int = 0

    def expired(self, now: float) -> bool:
        """
        Return whether the message's ``expires`` time (Unix milliseconds) has passed.
        """
        expires = self.headers.get("expires", "0")
        try:
            expires_at = int(expires)
        except ValueError:
            return False
        # ActiveMQ treats expires:0 as "never expires".
        return 0 < expires_at <= now * 1000


@dataclass
class _Delivery:
    """
    A message assigned to a subscription and not yet passed to its handler.
    """

    subscription: FakeSubscription
    envelope: _Envelope
    ack_id: str
    generation: int


class FakeSubscription:
    """
    A subscription of a :class:`FakeConnection`, restored after reconnects.
    """

    def __init__(
        self,
        connection: FakeConnection,
        subscription_id: str,
        destination: str,
        handler: MessageHandler,
        ack: str,
        headers: Mapping[str, str],
    ) -> None:
        self.destination = destination
        self.subscription_id = subscription_id
        self.handler = handler
        self.ack = ack
        self.headers = dict(headers)
        self.connection = connection
        # False while the connection is down, after unsubscribe(), and while
        # the broker rejects the destination.
        self.active = False
        self.error: BrokerError | None = None
        # Messages delivered in a client ack mode and not yet acknowledged,
        # by ack id, in delivery order.
        self.unacked: dict[str, _Envelope] = {}
        # The most unacknowledged messages in a client ack mode, or None for
        # no limit. Auto-acknowledged subscriptions have no limit, as on ActiveMQ.
        self.prefetch: int | None = None
        # Topic messages that arrived while ``prefetch`` messages were
        # unacknowledged, delivered as acknowledgements make room.
        self.pending: deque[_Envelope] = deque()

    def has_room(self) -> bool:
        """
        Return whether the broker may deliver one more message to this subscription now.
        """
        if self.ack == ACK_AUTO or self.prefetch is None:
            return True
        return len(self.unacked) < self.prefetch

    def unsubscribe(self) -> Deferred[None]:
        """
        Stop the subscription and return its unacknowledged queue messages to
        their queues.
        """
        self.connection._remove_subscription(self)
        return succeed(None)

    def __repr__(self) -> str:
        return (
            f"<FakeSubscription {self.subscription_id} {self.destination}"
            f" ack={self.ack} active={self.active}>"
        )


class FakeConnection:
    """
    An in-memory connection to a :class:`FakeBroker`.

    It implements :class:`taskmesh.stomp.StompConnection`. Tests simulate
    outages with :meth:`disconnect` and :meth:`reconnect`. Subscriptions are
    restored on reconnect, like the real client restores them.
    """

    def __init__(self, broker: FakeBroker, name: str, connected: bool) -> None:
        self._broker = broker
        self.name = name
        self._connected = False
        self._last_error: str | None = None
        # Incremented on every reconnect. An ACK for a message delivered
        # before the last reconnect fails because the broker has already
        # taken the message back.
        self.generation = 0
        self.subscriptions: list[FakeSubscription] = []
        self._subscription_ids = itertools.count(1)
        self._connected_waiters: list[Deferred[None]] = []
        self._session_listeners: list[Callable[[], object]] = []
        self._holding_receipts = False
        self._held_receipts: list[Deferred[None]] = []
        if connected:
            self.reconnect()

    @property
    def is_connected(self) -> bool:
        """
        Whether the simulated STOMP session is established now.
        """
        return self._connected

    @property
    def last_error(self) -> str | None:
        """
        The reason given to the last :meth:`disconnect`, or ``None``.

        Like a real connection's last failure, it stays set after a reconnect.
        """
        return self._last_error

    def when_connected(self) -> Deferred[None]:
        """
        Return a fresh Deferred that fires once the connection is up.

        Cancelling the Deferred only stops this caller's wait.
        """
        if self._connected:
            return succeed(None)

        def cancel(waiter: Deferred[None]) -> None:
            if waiter in self._connected_waiters:
                self._connected_waiters.remove(waiter)

        waiter: Deferred[None] = Deferred(cancel)
        self._connected_waiters.append(waiter)
        return waiter

    def send(
        self,
        destination: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        receipt: bool = False,
        persistent: bool = False,
        ttl: float | None = None,
    ) -> Deferred[None]:
        """
        Send a message through the broker.

        ``persistent`` and ``ttl`` become the headers that the ActiveMQ
        profile sends: ``persistent:true`` and ``expires`` (Unix time in
        milliseconds, from the broker's clock).

        The Deferred fires once the broker has accepted the message, with or
        without ``receipt``. After :meth:`hold_receipts`, a send with
        ``receipt=True`` fires only on :meth:`release_receipts`. It fails
        with :class:`NotConnected` while the connection is down and with
        :class:`BrokerError` when the destination was rejected with
        :meth:`FakeBroker.reject_destination`.

        NOTE: after rejecting a SEND, a real broker also closes the
        connection, and the real client reports the rejection only for
        ``receipt=True``. The fake fails the Deferred in both cases and stays
        connected, so a test simulates the outage with :meth:`disconnect`.

        Raises:
            TypeError: ``body`` is not bytes or a header is not a string.
        """
        if not isinstance(body, bytes):
            raise TypeError(f"message body must be bytes, not {type(body).__name__}")
        sent_headers = dict(headers or {})
        for name, value in sent_headers.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"STOMP header {name!r} must map a str to a str, got {value!r}")

        if not self._connected:
            return fail(NotConnected(f"cannot send to {destination}: {self.name} is disconnected"))
        rejection = self._broker._rejection_for(destination)
        if rejection is not None:
            return fail(rejection)

        if persistent:
            sent_headers.setdefault("persistent", "true")
        if ttl is not None:
            now = self._broker.clock.seconds() if self._broker.clock is not None else time.time()
            sent_headers.setdefault("expires", str(int((now + ttl) * 1000)))
        self._broker._accept(destination, sent_headers, body)
        if receipt and self._holding_receipts:
            held: Deferred[None] = Deferred()
            self._held_receipts.append(held)
            return held
        return succeed(None)

    def hold_receipts(self) -> None:
        """
        Hold the RECEIPT of every later send with ``receipt=True``.

        The broker still accepts and delivers each message at once. The
        sender's Deferred fires on :meth:`release_receipts`, or fails with
        :class:`ConnectionClosed` on :meth:`disconnect`, as a real receipt
        lost with its connection does.
        """
        self._holding_receipts = True

    def release_receipts(self) -> None:
        """
        Deliver the held receipts in the order of their sends, and stop holding new ones.
        """
        self._holding_receipts = False
        held, self._held_receipts = self._held_receipts, []
        for receipt in held:
            receipt.callback(None)

    def subscribe(
        self,
        destination: str,
        handler: MessageHandler,
        *,
        ack: str = ACK_AUTO,
        headers: Mapping[str, str] | None = None,
        prefetch: int | None = None,
    ) -> FakeSubscription:
        """
        Subscribe ``handler`` to ``destination`` now and after each reconnect.

        A subscription made while the connection is down starts receiving
        messages on the next :meth:`reconnect`. When the broker rejects the
        destination (see :meth:`FakeBroker.reject_destination`), the
        subscription stays inactive, its ``error`` is the
        :class:`BrokerError`, and :attr:`last_error` describes it. The real
        client also reports the rejection only through its log and
        ``last_error``.

        ``prefetch`` limits the unacknowledged messages of a ``client`` or
        ``client-individual`` subscription. A queue message waits in its queue
        while every subscriber is at its limit. A topic message waits for
        that subscription alone.

        Raises:
            ValueError: ``ack`` is not a STOMP ack mode, or ``prefetch`` is
                less than 1.
        """
        if ack not in ACK_MODES:
            raise ValueError(f"invalid ack mode {ack!r}: expected one of {', '.join(ACK_MODES)}")
        if prefetch is not None and prefetch < 1:
            raise ValueError(f"invalid prefetch {prefetch!r}: must be at least 1")
        subscription = FakeSubscription(
            self, f"{next(self._subscription_ids)}", destination, handler, ack, headers or {}
        )
        subscription.prefetch = prefetch
        self.subscriptions.append(subscription)
        if self._connected:
            self._activate(subscription)
            self._broker._dispatch_queue(destination)
            self._broker._schedule_flush()
        return subscription

    def ack(self, message: StompMessage) -> Deferred[None]:
        """
        Acknowledge a message received in a ``client`` or
        ``client-individual`` subscription.

        In ``client`` mode the ACK also covers every earlier unacknowledged
        message of the subscription, as STOMP specifies. Like the real client,
        it fails with :class:`NotConnected` for a message delivered before the
        last reconnect, and with :class:`BrokerError` for a message that is
        not waiting for an acknowledgement.
        """
        return self._settle(message, requeue=False)

    def add_session_listener(self, listener: Callable[[], object]) -> None:
        """
        Call ``listener`` after each :meth:`reconnect`, once subscriptions are restored.
        """
        self._session_listeners.append(listener)

    def nack(self, message: StompMessage, *, requeue: bool = True) -> Deferred[None]:
        """
        Reject a message received in a ``client`` or ``client-individual``
        subscription so that the broker redelivers it, or with ``requeue``
        false, moves it to :attr:`FakeBroker.dead_letters`.

        A queue message goes back to its queue and may reach another
        subscriber. A topic message is redelivered to the same subscription.
        After ``max_redeliveries`` redeliveries the message goes to
        :attr:`FakeBroker.dead_letters` instead.
        """
        return self._settle(message, requeue=requeue, dead_letter=not requeue)

    def disconnect(self, reason: str = "connection lost (simulated)") -> None:
        """
        Simulate an outage: the connection goes down and ``reason`` becomes
        :attr:`last_error`.

        Unacknowledged queue messages return to their queues, so other
        subscribers get them at once. Unacknowledged topic messages are
        dropped, as a broker drops them when a non-durable subscriber leaves.
        Held receipts fail with :class:`ConnectionClosed`.

        Raises:
            RuntimeError: the connection is already down.
        """
        if not self._connected:
            raise RuntimeError(f"{self.name} is already disconnected")
        self._connected = False
        self._last_error = reason
        for subscription in self.subscriptions:
            subscription.active = False
            self._broker._take_back(subscription)
        held, self._held_receipts = self._held_receipts, []
        for receipt in held:
            receipt.errback(ConnectionClosed(f"{self.name} lost the connection before the RECEIPT"))
        self._broker._schedule_flush()

    def reconnect(self) -> None:
        """
        Simulate a successful (re)connection.

        Subscriptions are restored in the order they were made. A
        subscription whose destination the broker now rejects stays inactive,
        as :meth:`subscribe` describes. Pending
        :meth:`when_connected` Deferreds fire after the subscriptions are
        restored.

        Raises:
            RuntimeError: the connection is already up.
        """
        if self._connected:
            raise RuntimeError(f"{self.name} is already connected")
        self._connected = True
        self.generation += 1
        for subscription in self.subscriptions:
            self._activate(subscription)
        for subscription in self.subscriptions:
            if subscription.active:
                self._broker._dispatch_queue(subscription.destination)

        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        for listener in list(self._session_listeners):
            listener()
        self._broker._schedule_flush()

    def _activate(self, subscription: FakeSubscription) -> None:
        subscription.error = self._broker._rejection_for(subscription.destination)
        if subscription.error is None:
            subscription.active = True
            return
        self._last_error = str(subscription.error)
        self._broker.log.error(
            "{connection}: subscribing to {destination} failed: {error}",
            connection=self.name,
            destination=subscription.destination,
            error=subscription.error.message,
        )

    def _remove_subscription(self, subscription: FakeSubscription) -> None:
        if subscription in self.subscriptions:
            self.subscriptions.remove(subscription)
        subscription.active = False
        self._broker._take_back(subscription)
        self._broker._schedule_flush()

    def _settle(
        self, message: StompMessage, requeue: bool, dead_letter: bool = False
    ) -> Deferred[None]:
        frame = "NACK" if requeue or dead_letter else "ACK"
        if not self._connected:
            return fail(
                NotConnected(f"cannot {frame} {message.message_id}: {self.name} is disconnected")
            )
        if message.generation != self.generation:
            return fail(
                NotConnected(
                    f"cannot {frame} message {message.message_id!r}: it arrived on an earlier"
                    " connection, so the broker redelivers it"
                )
            )

        subscription = next(
            (s for s in self.subscriptions if s.subscription_id == message.subscription), None
        )
        if subscription is None or message.ack_id not in subscription.unacked:
            return fail(
                BrokerError(
                    f"unexpected {frame} for message {message.message_id!r}:"
                    " it is not waiting for an acknowledgement on this connection"
                )
            )

        if subscription.ack == ACK_CLIENT:
            ack_ids = list(subscription.unacked)
            settled = ack_ids[: ack_ids.index(message.ack_id) + 1]
        else:
            settled = [message.ack_id]
        envelopes = [subscription.unacked.pop(ack_id) for ack_id in settled]
        if requeue:
            for envelope in reversed(envelopes):
                self._broker._redeliver(subscription, envelope)
        elif dead_letter:
            self._broker.dead_letters.extend(
                (envelope.destination, dict(envelope.headers), envelope.body) for envelope in envelopes
            )
        self._broker._fill(subscription)
        self._broker._schedule_flush()
        return succeed(None)

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<FakeConnection {self.name} {state} generation={self.generation}>"


class FakeBroker:
    """
    An in-memory STOMP broker for unit tests.

    A destination that starts with ``/topic/`` delivers each message to every
    current subscriber and drops it when there is none. Every other
    destination is a queue: each message goes to one subscriber, chosen
    round robin among those below their ``prefetch`` limit, and waits in the
    queue while there is none. A message whose ``expires`` header (Unix time
    in milliseconds, as ActiveMQ uses) has passed when it would be delivered
    goes to :attr:`expired` instead.

    A MESSAGE passed to a handler has the headers that the sender set plus
    ``destination``, ``message-id`` and ``subscription``. It also has ``ack``
    in a client ack mode and ``redelivered: true`` on a redelivery, as STOMP
    1.2 brokers send. ``content-length`` is not added.

    Args:
        clock: when given, deliveries wait for ``clock.advance(0)`` or
            :meth:`flush`. Without it, deliveries happen before
            :meth:`FakeConnection.send` returns.
        max_redeliveries: redeliveries after NACKs before a message goes to
            :attr:`dead_letters`. The limit stops a handler that always
            NACKs from looping forever.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime | None = None, *, max_redeliveries: int = 6) -> None:
        self.clock = clock
        self.max_redeliveries = max_redeliveries
        self.sent: list[tuple[str, dict[str, str], bytes]] = []
        """Every message that the broker accepted: destination, headers the
        sender set, and body."""
        self.dead_letters: list[tuple[str, dict[str, str], bytes]] = []
        """Messages dropped after ``max_redeliveries`` redeliveries."""
        self.expired: list[tuple[str, dict[str, str], bytes]] = []
        """Messages discarded because their ``expires`` time passed before delivery."""
        self.handler_failures: list[Failure] = []
        """Exceptions raised by message handlers, which are also logged."""
        self.connections: list[FakeConnection] = []
        self._queues: dict[str, deque[_Envelope]] = {}
        self._round_robin: dict[str, int] = {}
        self._rejections: list[tuple[str, str]] = []
        self._deliveries: deque[_Delivery] = deque()
        self._delivering = False
        self._flush_call: IDelayedCall | None = None
        self._message_ids = itertools.count(1)
        self._ack_ids = itertools.count(1)
        self._connection_names = itertools.count(1)

    def connect(self, *, connected: bool = True) -> FakeConnection:
        """
        Create a connection, established at once unless ``connected`` is false.

        A connection created with ``connected=False`` comes up on
        :meth:`FakeConnection.reconnect`.
        """
        connection = FakeConnection(self, f"connection-{next(self._connection_names)}", connected)
        self.connections.append(connection)
        return connection

    def reject_destination(self, prefix: str, message: str) -> None:
        """
        Make sends and subscriptions to destinations starting with ``prefix``
        fail with ``BrokerError(message)``, as an authorization failure does.

        The rule applies to new sends and subscriptions and to subscriptions
        restored by a reconnect. Active subscriptions keep receiving.
        """
        self._rejections.append((prefix, message))

    def allow_destination(self, prefix: str) -> None:
        """
        Undo :meth:`reject_destination` for exactly ``prefix``.
        """
        self._rejections = [(p, m) for p, m in self._rejections if p != prefix]

    def sent_to(self, destination: str) -> list[tuple[dict[str, str], bytes]]:
        """
        Return the headers and body of every accepted message sent to ``destination``.
        """
        return [(headers, body) for sent_to, headers, body in self.sent if sent_to == destination]

    def queued(self, destination: str) -> list[tuple[dict[str, str], bytes]]:
        """
        Return the messages waiting in a queue for a subscriber.
        """
        return [(dict(e.headers), e.body) for e in self._queues.get(destination, ())]

    def flush(self) -> None:
        """
        Deliver every pending message now, including messages that handlers
        send meanwhile.
        """
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._deliveries:
                self._deliver(self._deliveries.popleft())
        finally:
            self._delivering = False

    def _rejection_for(self, destination: str) -> BrokerError | None:
        for prefix, message in self._rejections:
            if destination.startswith(prefix):
                return BrokerError(message)
        return None

    def _accept(self, destination: str, headers: dict[str, str], body: bytes) -> None:
        self.sent.append((destination, dict(headers), body))
        envelope = _Envelope(destination, headers, body, f"fake-message-{next(self._message_ids)}")
        if destination.startswith(TOPIC_PREFIX):
            for subscription in self._active_subscriptions(destination):
                subscription.pending.append(envelope)
                self._fill(subscription)
        else:
            self._queues.setdefault(destination, deque()).append(envelope)
            self._dispatch_queue(destination)
        self._schedule_flush()

    def _active_subscriptions(self, destination: str) -> list[FakeSubscription]:
        return [
            subscription
            for connection in self.connections
            if connection.is_connected
            for subscription in connection.subscriptions
            if subscription.active and subscription.destination == destination
        ]

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def _discard_if_expired(self, envelope: _Envelope) -> bool:
        if not envelope.expired(self._now()):
            return False
        self.expired.append((envelope.destination, dict(envelope.headers), envelope.body))
        return True

    def _dispatch_queue(self, destination: str) -> None:
        queue = self._queues.get(destination)
        if not queue:
            return
        subscribers = self._active_subscriptions(destination)
        while queue:
            if self._discard_if_expired(queue[0]):
                queue.popleft()
                continue
            with_room = [subscription for subscription in subscribers if subscription.has_room()]
            if not with_room:
                return
            turn = self._round_robin.get(destination, 0)
            self._round_robin[destination] = turn + 1
            self._assign(with_room[turn % len(with_room)], queue.popleft())

    def _fill(self, subscription: FakeSubscription) -> None:
        """
        Deliver what waits for a subscription that has room again: its
        pending topic messages, or the messages of its queue.
        """
        if not subscription.destination.startswith(TOPIC_PREFIX):
            self._dispatch_queue(subscription.destination)
            return
        while subscription.pending and subscription.has_room():
            envelope = subscription.pending.popleft()
            if not self._discard_if_expired(envelope):
                self._assign(subscription, envelope)

    def _assign(self, subscription: FakeSubscription, envelope: _Envelope) -> None:
        ack_id = f"fake-ack-{next(self._ack_ids)}"
        if subscription.ack != ACK_AUTO:
            subscription.unacked[ack_id] = envelope
        generation = subscription.connection.generation
        self._deliveries.append(_Delivery(subscription, envelope, ack_id, generation))

    def _take_back(self, subscription: FakeSubscription) -> None:
        """
        Return a stopped subscription's unacknowledged queue messages to the
        front of their queue, oldest first, and drop its topic messages.
        """
        envelopes = list(subscription.unacked.values())
        subscription.unacked.clear()
        if subscription.destination.startswith(TOPIC_PREFIX):
            subscription.pending.clear()
            return
        queue = self._queues.setdefault(subscription.destination, deque())
        for envelope in reversed(envelopes):
            envelope.redeliveries += 1
            queue.appendleft(envelope)
        self._dispatch_queue(subscription.destination)

    def _redeliver(self, subscription: FakeSubscription, envelope: _Envelope) -> None:
        envelope.redeliveries += 1
        if envelope.redeliveries > self.max_redeliveries:
            self.dead_letters.append((envelope.destination, dict(envelope.headers), envelope.body))
            return
        if envelope.destination.startswith(TOPIC_PREFIX):
            subscription.pending.appendleft(envelope)
            self._fill(subscription)
            return
        self._queues.setdefault(envelope.destination, deque()).appendleft(envelope)
        self._dispatch_queue(envelope.destination)

    def _schedule_flush(self) -> None:
        if self.clock is None:
            self.flush()
        elif self._deliveries and (self._flush_call is None or not self._flush_call.active()):
            self._flush_call = self.clock.callLater(0, self.flush)

    def _deliver(self, delivery: _Delivery) -> None:
        subscription = delivery.subscription
        envelope = delivery.envelope
        connection = subscription.connection
        # The subscription may have stopped, or its connection dropped, after
        # the message was assigned to it; the message went back to its queue.
        if not subscription.active or delivery.generation != connection.generation:
            return
        if subscription.ack != ACK_AUTO and delivery.ack_id not in subscription.unacked:
            return

        headers = dict(envelope.headers)
        headers["destination"] = envelope.destination
        headers["message-id"] = envelope.message_id
        headers["subscription"] = subscription.subscription_id
        if subscription.ack != ACK_AUTO:
            headers["ack"] = delivery.ack_id
        if envelope.redeliveries:
            headers["redelivered"] = "true"
        message = StompMessage(
            destination=envelope.destination,
            headers=headers,
            body=envelope.body,
            subscription=subscription.subscription_id,
            ack_id=delivery.ack_id,
            message_id=envelope.message_id,
            generation=delivery.generation,
        )

        try:
            outcome = subscription.handler(message)
        except Exception:
            self._record_handler_failure(
                Failure(),  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
                envelope.destination,
            )
            return
        if isinstance(outcome, Deferred):
            outcome.addErrback(self._record_handler_failure, envelope.destination)
        elif inspect.isawaitable(outcome):
            awaited = Deferred.fromCoroutine(_await(outcome))
            awaited.addErrback(self._record_handler_failure, envelope.destination)

    def _record_handler_failure(self, failure: Failure, destination: str) -> None:
        self.handler_failures.append(failure)
        self.log.failure(
            "message handler for {destination} failed", failure=failure, destination=destination
        )


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@implementer(IReactorFromThreads)
class SynchronousReactorThreads:
    """
    An ``IReactorFromThreads`` that calls each function at once in the calling thread.
    """

    def callFromThread(  # noqa: N802 (name fixed by IReactorFromThreads)
        self, callable: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        callable(*args, **kwargs)


class SynchronousThreadPool(ThreadPool):
    """
    A thread pool that runs each function at once in the calling thread.

    Pass it with :class:`SynchronousReactorThreads` to code that uses
    ``deferToThreadPool``, so a "blocking" function finishes before the call
    returns. :attr:`calls` counts the functions run.
    """

    def __init__(self) -> None:
        super().__init__(minthreads=0, maxthreads=1, name="synchronous")
        self.calls = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False
        self.joined = True

    def callInThreadWithCallback(  # noqa: N802 (name fixed by ThreadPool)
        self,
        onResult: Callable[[bool, Any], object] | None,  # noqa: N803
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        self.calls += 1
        try:
            result = func(*args, **kw)
        except BaseException:
            if onResult is not None:
                onResult(False, Failure())  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
            return
        if onResult is not None:
            onResult(True, result)


class RecordingProgressReporter(ProgressReporter):
    """
    A :class:`taskmesh.slave.ProgressReporter` that stores every report in
    :attr:`reports`, for calling a handler function directly in a test.

    It checks each report like the real one does.
    """

    def __init__(self) -> None:
        self.reports: list[tuple[float, str]] = []
        super().__init__(self._store, SynchronousReactorThreads())

    def _store(self, percent: float, message: str) -> None:
        self.reports.append((percent, message))

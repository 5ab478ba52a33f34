"""
Work and direct queue deliveries: subscriptions, acknowledgements and draining.

A queue message stays unacknowledged until the slave has sent its reply with
a receipt. A message that the slave gives back (it stops, or the connection
that delivered it is gone) is left unacknowledged, so the broker delivers it
again when the subscription or the connection closes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from taskmesh._messages import HEADER_REQUEST_ID
from taskmesh.stomp._interfaces import (
    ACK_CLIENT_INDIVIDUAL,
    StompConnection,
    StompMessage,
    Subscription,
)


@dataclass(eq=False)
class WorkQueue:
    """
    One work or direct queue that the slave consumes, with the number of
    its deliveries that are not settled yet.
    """

    destination: str
    subscription: Subscription | None = None
    unsettled: int = 0
    unsubscribing: Deferred[None] | None = None


@dataclass(eq=False)
class Delivery:
    """
    A queue message that the slave has taken on: it settles it exactly once,
    by acknowledging, dropping or releasing it.
    """

    message: StompMessage
    queue: WorkQueue
    settled: bool = field(default=False)

    @property
    def redelivered(self) -> bool:
        """
        The broker's ``redelivered`` flag. RabbitMQ sends ``false`` on a first
        delivery, and ActiveMQ sends the header only on a redelivery.
        """
        return self.message.headers.get("redelivered") == "true"

    @property
    def request_id(self) -> str | None:
        """
        The ``request_id`` header as received, for logs.
        """
        return self.message.headers.get(HEADER_REQUEST_ID)


WorkHandler = Callable[[WorkQueue, StompMessage], None]


class DeliveryTracker:
    """
    The slave's queue subscriptions and the settling of their deliveries.

    It also tracks which connection generation is current, because an ACK
    for a message from an earlier connection is impossible: the broker took
    the message back when that connection closed. The STOMP client reports no
    generation of its own, but every message received after a session starts
    belongs to that session. So after :meth:`new_session`, the generation of
    the next received message on any subscription is the current one.

    Args:
        unsubscribe: stops a subscription, logging a failure instead of raising.
        stats: the slave's counters, updated in place.
    """

    log = Logger()

    def __init__(
        self,
        connection: StompConnection,
        slave_id: str,
        unsubscribe: Callable[[Subscription], Awaitable[None]],
        stats: dict[str, int],
    ) -> None:
        self._connection = connection
        self._slave_id = slave_id
        self._unsubscribe = unsubscribe
        self._stats = stats
        self.queues: list[WorkQueue] = []
        self._generation: int | None = None
        self._draining = False

    # Subscriptions

    def subscribe(self, destinations: Iterable[str], handler: WorkHandler, prefetch: int) -> None:
        """
        Subscribe to each queue in ``client-individual`` mode, with at most
        ``prefetch`` unacknowledged messages per subscription.
        """
        self._draining = False
        self.queues = [WorkQueue(destination) for destination in destinations]
        for queue in self.queues:
            queue.subscription = self._connection.subscribe(
                queue.destination,
                functools.partial(handler, queue),
                ack=ACK_CLIENT_INDIVIDUAL,
                prefetch=prefetch,
            )

    def drain(self) -> None:
        """
        Stop taking queue messages: unsubscribe now from each queue without
        unsettled deliveries, and from the others once their last delivery settles.

        Unsubscribing earlier would be wrong on both supported brokers.
        ActiveMQ 5.17 hands a subscription's unacknowledged messages to other
        consumers at once on UNSUBSCRIBE, even while this slave still runs
        them. RabbitMQ 3.10 sends the ERROR "Subscription not found" for a later
        ACK of them.
        """
        self._draining = True
        for queue in self.queues:
            self._unsubscribe_if_drained(queue)

    async def unsubscribe_all(self) -> None:
        """
        Unsubscribe from every queue, whatever is unsettled, and wait until done.
        """
        for queue in self.queues:
            self._start_unsubscribing(queue)
        for queue in self.queues:
            if queue.unsubscribing is not None:
                await queue.unsubscribing

    def _unsubscribe_if_drained(self, queue: WorkQueue) -> None:
        if self._draining and queue.unsettled == 0:
            self._start_unsubscribing(queue)

    def _start_unsubscribing(self, queue: WorkQueue) -> None:
        subscription, queue.subscription = queue.subscription, None
        if subscription is not None:
            queue.unsubscribing = Deferred.fromCoroutine(_await(self._unsubscribe(subscription)))

    # Connection generations

    def observe(self, message: StompMessage) -> bool:
        """
        Note the connection generation of a received message, from any
        subscription, and return whether the current generation changed.
        """
        if self._generation is not None and message.generation <= self._generation:
            return False
        self._generation = message.generation
        return True

    def new_session(self) -> None:
        """
        Forget the current generation, because a new session has started.
        """
        self._generation = None

    @property
    def generation_known(self) -> bool:
        """
        Whether a message has arrived since the last session started.
        """
        return self._generation is not None

    def is_stale(self, delivery: Delivery) -> bool:
        """
        Return whether a delivery came over an earlier connection, so that it
        can no longer be acknowledged.
        """
        return self._generation is not None and delivery.message.generation < self._generation

    # Settling deliveries

    def take(self, queue: WorkQueue, message: StompMessage) -> Delivery:
        """
        Take on a message that the slave will settle.
        """
        queue.unsettled += 1
        return Delivery(message, queue)

    async def acknowledge(self, delivery: Delivery) -> None:
        """
        Acknowledge a delivery whose reply the broker has accepted.

        A failed ACK is logged and counted, and the broker delivers the
        message again.
        """
        if delivery.settled:
            return
        if self.is_stale(delivery):
            self.release(delivery, "it arrived over an earlier connection")
            return
        try:
            await self._connection.ack(delivery.message)
        except Exception as e:
            self._stats["acks_failed"] += 1
            self.log.warn(
                "slave {slave_id} could not acknowledge task {request_id} from {destination},"
                " so the broker delivers it again: {error}",
                slave_id=self._slave_id,
                request_id=delivery.request_id,
                destination=delivery.queue.destination,
                error=str(e) or type(e).__name__,
            )
        else:
            self._stats["acks_sent"] += 1
        self._settle(delivery)

    def release(self, delivery: Delivery, reason: str) -> None:
        """
        Leave a delivery unacknowledged, so the broker delivers it again once
        this subscription or connection closes.
        """
        if delivery.settled:
            return
        self._stats["deliveries_released"] += 1
        self.log.info(
            "slave {slave_id} left task {request_id} from {destination} unacknowledged"
            " because {reason}; the broker delivers it again",
            slave_id=self._slave_id,
            request_id=delivery.request_id,
            destination=delivery.queue.destination,
            reason=reason,
        )
        self._settle(delivery)

    async def drop(self, delivery: Delivery, reason: str) -> None:
        """
        Reject a message that can never be run, without requeueing it: the
        broker moves it to its dead-letter queue or discards it.
        """
        if delivery.settled:
            return
        self.log.warn(
            "slave {slave_id} dropped a message from {destination}: {reason}",
            slave_id=self._slave_id,
            destination=delivery.queue.destination,
            reason=reason,
            message_id=delivery.message.message_id,
        )
        try:
            await self._connection.nack(delivery.message, requeue=False)
        except Exception as e:
            self._stats["acks_failed"] += 1
            self.log.warn(
                "slave {slave_id} could not reject message {message_id} from {destination}:"
                " {error}",
                slave_id=self._slave_id,
                message_id=delivery.message.message_id,
                destination=delivery.queue.destination,
                error=str(e) or type(e).__name__,
            )
        self._settle(delivery)

    def _settle(self, delivery: Delivery) -> None:
        if delivery.settled:
            return
        delivery.settled = True
        delivery.queue.unsettled -= 1
        self._unsubscribe_if_drained(delivery.queue)


async def _await(awaitable: Awaitable[None]) -> None:
    await awaitable

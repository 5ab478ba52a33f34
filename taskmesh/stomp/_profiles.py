"""
Broker profiles: how each broker spells what STOMP itself leaves open.

STOMP defines no header for prefetch, message time-to-live or persistence, and
brokers differ in what NACK does. A profile maps taskmesh's needs onto one
broker's headers.
"""

from __future__ import annotations

from dataclasses import dataclass

BROKER_TYPES = ("activemq", "rabbitmq", "generic")


@dataclass(frozen=True)
class BrokerProfile:
    """
    Header conventions of one broker type.

    Attributes:
        name: ``activemq``, ``rabbitmq`` or ``generic``.
        prefetch_header: SUBSCRIBE header that limits unacknowledged messages
            per subscription, or ``None`` when the broker has none.
        ttl_header: SEND header for the message's time-to-live, or ``None``.
        ttl_absolute: whether ``ttl_header`` takes an absolute Unix time in
            milliseconds (ActiveMQ's ``expires``) instead of a duration in
            milliseconds (RabbitMQ's ``expiration``).
        nack_requeue_header: NACK header that chooses between requeueing and
            dropping, or ``None`` when NACK cannot drop a message.
        nack_requeues: whether a NACK without extra headers puts the message
            back on its queue for another delivery. ActiveMQ 5.17 instead moves
            it to the dead-letter queue ``ActiveMQ.DLQ``.
    """

    name: str
    prefetch_header: str | None
    ttl_header: str | None
    ttl_absolute: bool
    nack_requeue_header: str | None
    nack_requeues: bool

    def subscribe_headers(self, prefetch: int | None) -> dict[str, str]:
        """
        Return the SUBSCRIBE headers for at most ``prefetch`` unacknowledged messages.
        """
        if prefetch is None or self.prefetch_header is None:
            return {}
        if prefetch < 1:
            raise ValueError(f"invalid prefetch {prefetch!r}: must be at least 1")
        return {self.prefetch_header: str(prefetch)}

    def send_headers(self, *, persistent: bool, ttl: float | None, now: float) -> dict[str, str]:
        """
        Return the SEND headers for persistence and a time-to-live in seconds.

        ``now`` is the current Unix time, used for absolute expiry times.
        """
        headers: dict[str, str] = {}
        if persistent:
            headers["persistent"] = "true"
        if ttl is not None and self.ttl_header is not None:
            if ttl <= 0:
                raise ValueError(f"invalid time-to-live {ttl!r}: must be positive")
            if self.ttl_absolute:
                headers[self.ttl_header] = str(int((now + ttl) * 1000))
            else:
                headers[self.ttl_header] = str(max(int(ttl * 1000), 1))
        return headers

    def nack_headers(self, requeue: bool) -> dict[str, str]:
        """
        Return the NACK headers that requeue the message or drop it.
        """
        if self.nack_requeue_header is None:
            return {}
        return {self.nack_requeue_header: "true" if requeue else "false"}


ACTIVEMQ = BrokerProfile(
    name="activemq",
    prefetch_header="activemq.prefetchSize",
    ttl_header="expires",
    ttl_absolute=True,
    nack_requeue_header=None,
    nack_requeues=False,
)

RABBITMQ = BrokerProfile(
    name="rabbitmq",
    prefetch_header="prefetch-count",
    ttl_header="expiration",
    ttl_absolute=False,
    nack_requeue_header="requeue",
    nack_requeues=True,
)

GENERIC = BrokerProfile(
    name="generic",
    prefetch_header=None,
    ttl_header=None,
    ttl_absolute=False,
    nack_requeue_header=None,
    nack_requeues=True,
)

_PROFILES = {profile.name: profile for profile in (ACTIVEMQ, RABBITMQ, GENERIC)}


def profile_for(broker_type: str) -> BrokerProfile:
    """
    Return the profile of a broker type.

    Raises:
        ValueError: the broker type is not one of :data:`BROKER_TYPES`.
    """
    try:
        return _PROFILES[broker_type]
    except KeyError:
        raise ValueError(
            f"invalid broker type {broker_type!r}: expected one of {', '.join(BROKER_TYPES)}"
        ) from None

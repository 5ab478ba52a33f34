"""
The interface that taskmesh's daemons use to talk to a STOMP broker.

:class:`taskmesh.stomp.StompClientService` implements it over the network and
:class:`taskmesh.testing.FakeBroker` implements it in memory for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol, Union

from twisted.internet.defer import Deferred

ACK_AUTO = "auto"
ACK_CLIENT = "client"
ACK_CLIENT_INDIVIDUAL = "client-individual"
ACK_MODES = (ACK_AUTO, ACK_CLIENT, ACK_CLIENT_INDIVIDUAL)


@dataclass(frozen=True)
class StompMessage:
    """
    A MESSAGE frame received on a subscription.

    ``headers`` contains every header of the frame, unescaped; for a repeated
    header the first value wins, as STOMP 1.2 requires.
    """

    destination: str
    headers: Mapping[str, str]
    body: bytes
    subscription: str = ""
    ack_id: str = ""
    message_id: str = ""
    # The connection generation that delivered the message; an ACK for an
    # older generation is meaningless because the broker redelivers it.
    generation: int = 0
    raw: Any = field(default=None, compare=False, repr=False)


MessageHandler = Callable[[StompMessage], Union[None, Deferred[Any], Awaitable[Any]]]


class Subscription(Protocol):
    """
    A subscription that lasts across reconnects until it is cancelled.
    """

    destination: str

    def unsubscribe(self) -> Deferred[None]:
        """
        Stop receiving messages for this subscription.
        """


class StompConnection(Protocol):
    """
    A broker connection as seen by the taskmesh daemons.

    Subscriptions made here are restored after every reconnect.
    """

    @property
    def is_connected(self) -> bool:
        """
        Whether a STOMP session with the broker is established now.
        """

    @property
    def last_error(self) -> str | None:
        """
        A description of the last connection failure, or ``None``.
        """

    def when_connected(self) -> Deferred[None]:
        """
        Return a fresh Deferred that fires once a STOMP session is established.
        """

    def add_session_listener(self, listener: Callable[[], object]) -> None:
        """
        Call ``listener`` each time a session is established, after every
        subscription has been restored.
        """

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
        Send a message with a ``content-length`` header.

        ``persistent`` requests that the broker store the message on disk; ``ttl``
        is a time-to-live in seconds after which the broker may discard the
        message, on brokers whose profile supports it.

        The Deferred fires when the broker's RECEIPT arrives if ``receipt`` is
        true, or once the frame is written otherwise. It fails with
        :class:`taskmesh.stomp.NotConnected` when there is no session and with
        :class:`taskmesh.stomp.BrokerError` when the broker rejects the frame.
        """

    def subscribe(
        self,
        destination: str,
        handler: MessageHandler,
        *,
        ack: str = ACK_AUTO,
        headers: Mapping[str, str] | None = None,
        prefetch: int | None = None,
    ) -> Subscription:
        """
        Subscribe ``handler`` to ``destination`` now and after each reconnect.

        The handler is called with each :class:`StompMessage`. With ``ack``
        other than ``auto`` the caller acknowledges with :meth:`ack`.
        ``prefetch`` limits the unacknowledged messages that the broker
        delivers to this subscription at once, on brokers that support it.
        """

    def ack(self, message: StompMessage) -> Deferred[None]:
        """
        Acknowledge a message received with ``client`` or ``client-individual``.
        """

    def nack(self, message: StompMessage, *, requeue: bool = True) -> Deferred[None]:
        """
        Reject a message received with ``client`` or ``client-individual``.

        With ``requeue`` false the broker drops the message (or moves it to
        its dead-letter queue) instead of delivering it again.
        """

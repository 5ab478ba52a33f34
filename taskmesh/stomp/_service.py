"""
A long-lived broker connection: reconnects, restores subscriptions, and
offers the :class:`StompConnection` interface to the daemons.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._errors import NotConnected
from ._interfaces import ACK_AUTO, MessageHandler, StompMessage
from ._profiles import profile_for
from ._protocol import StompClientProtocol, StompSettings
from ._tls import ClientTLS
from ._uri import BrokerAddress, parse_broker_uri


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """
    An endpoint that connects to the next broker of a list on each attempt.

    ``ssl://`` brokers are reached over TLS as ``tls`` configures it, by
    default verified against the system's trusted CAs. ``current`` is the
    broker of the latest attempt.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        brokers: tuple[BrokerAddress, ...],
        timeout: float = 10.0,
        *,
        tls: ClientTLS | None = None,
    ) -> None:
        self._reactor = reactor
        self._brokers = brokers
        self._attempts = itertools.count()
        self._timeout = timeout
        self._tls = tls or ClientTLS()
        # One connection creator per ssl:// broker, built once, because each
        # creator contains an OpenSSL context with the trusted CAs and client key.
        self._connection_creators = {
            broker: self._tls.connection_creator(broker.host)
            for broker in brokers
            if broker.scheme == "ssl"
        }
        self.current = brokers[0]

    def connect(self, factory: Any) -> Deferred[IProtocol]:
        self.current = self._brokers[next(self._attempts) % len(self._brokers)]
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, self.current.host, self.current.port, timeout=self._timeout
        )
        creator = self.connection_creator(self.current)
        if creator is not None:
            if self._tls.insecure:
                self.log.warn(
                    "the TLS certificate of {broker} is NOT verified because tls_insecure"
                    " is set: anyone on the network path can read and change every message,"
                    " including the passcode",
                    broker=str(self.current),
                )
            endpoint = wrapClientTLS(creator, endpoint)
        result: Deferred[IProtocol] = endpoint.connect(factory)
        return result

    def connection_creator(self, broker: BrokerAddress) -> IOpenSSLClientConnectionCreator | None:
        """
        Return the TLS connection creator for ``broker``, or ``None`` for ``tcp://``.
        """
        return self._connection_creators.get(broker)

    def __repr__(self) -> str:
        return f"<FailoverEndpoint {', '.join(str(b) for b in self._brokers)}>"


class _ProtocolFactory(Factory):
    def __init__(self, service: StompClientService) -> None:
        self._service = service

    def buildProtocol(self, addr: Any) -> StompClientProtocol:
        return self._service._build_protocol()


@dataclass
class _Subscription:
    service: StompClientService
    subscription_id: str
    destination: str
    handler: MessageHandler
    ack: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def unsubscribe(self) -> Deferred[None]:
        return self.service._unsubscribe(self)


class StompClientService(Service):
    """
    A STOMP connection that reconnects with backoff and restores subscriptions.

    Each new transport is prepared by completing the STOMP handshake and
    subscribing again before the session counts as established. An ERROR
    from the broker during that preparation (a wrong passcode, a destination
    the user may not read) is logged with the broker's message, and the
    connection is retried with the same exponential backoff as a refused one.

    NOTE: Twisted's ``ClientService`` is not used because it raises
    ``NoTransition`` when a connection closes while ``prepareConnection`` is
    running, which is exactly what a broker does after an ERROR.
    """

    log = Logger()

    # Seconds a session must last before the reconnect backoff starts again
    # from its first delay.
    stable_after = 10.0

    def __init__(
        self,
        settings: StompSettings,
        reactor: IReactorTime,
        *,
        endpoint: IStreamClientEndpoint | None = None,
        retry_policy: Callable[[int], float] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = reactor
        uri = parse_broker_uri(settings.uri)
        brokers = uri.brokers
        if uri.randomize and len(brokers) > 1:
            brokers = tuple(random.sample(brokers, len(brokers)))
        self._endpoint = endpoint or FailoverEndpoint(reactor, brokers, tls=settings.client_tls)
        self._retry_policy = retry_policy or uri.retry_policy()
        self._factory = _ProtocolFactory(self)
        self._generations = itertools.count(1)
        self._subscription_ids = (f"taskmesh-{n}" for n in itertools.count(1))
        self._subscriptions: dict[str, _Subscription] = {}
        # The protocol of the established session, and the one being prepared.
        self._protocol: StompClientProtocol | None = None
        self._preparing: StompClientProtocol | None = None
        self._connecting: Deferred[IProtocol] | None = None
        self._retry_call: IDelayedCall | None = None
        self._stable_call: IDelayedCall | None = None
        self._failures = 0
        self._waiters: list[Deferred[None]] = []
        self._session_listeners: list[Callable[[], object]] = []
        self._last_error: str | None = None
        self.profile = profile_for(settings.broker_type)
        self.sessions = 0

    # Service

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        self.log.info("connecting to {broker}", broker=self._describe_brokers())
        self._attempt()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        self._cancel_stable_call()
        if self._connecting is not None:
            self._connecting.cancel()
        protocol = self._protocol or self._preparing
        self._protocol = self._preparing = None
        for waiter in self._drain_waiters():
            waiter.errback(NotConnected("the STOMP client is stopping"))
        if protocol is None:
            return succeed(None)
        return protocol.disconnect()

    # StompConnection

    @property
    def is_connected(self) -> bool:
        return self._protocol is not None and self._protocol.is_connected

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def protocol(self) -> StompClientProtocol | None:
        """
        The protocol of the current session, or ``None`` between sessions.
        """
        return self._protocol

    def when_connected(self) -> Deferred[None]:
        if self.is_connected:
            return succeed(None)
        waiter: Deferred[None] = Deferred(lambda d: self._forget_waiter(d))
        self._waiters.append(waiter)
        return waiter

    def add_session_listener(self, listener: Callable[[], object]) -> None:
        self._session_listeners.append(listener)

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
        # A handler may reply to a message that arrived while the new
        # connection's subscriptions were being restored, so that connection
        # may send before the session counts as established.
        protocol = self._protocol or self._preparing
        if protocol is None or not protocol.is_connected:
            return fail(NotConnected(self._not_connected_reason()))
        try:
            all_headers = self.profile.send_headers(
                persistent=persistent, ttl=ttl, now=self._clock.seconds()
            )
            all_headers.update(headers or {})
            return protocol.send(destination, body, all_headers, receipt=receipt)
        except Exception as e:
            return fail(e)

    def subscribe(
        self,
        destination: str,
        handler: MessageHandler,
        *,
        ack: str = ACK_AUTO,
        headers: Mapping[str, str] | None = None,
        prefetch: int | None = None,
    ) -> _Subscription:
        all_headers = self.profile.subscribe_headers(prefetch)
        all_headers.update(headers or {})
        subscription = _Subscription(
            self, next(self._subscription_ids), destination, handler, ack, all_headers
        )
        self._subscriptions[subscription.subscription_id] = subscription
        protocol = self._protocol
        if protocol is not None and protocol.is_connected:
            confirmed = self._subscribe_on(protocol, subscription)
            confirmed.addErrback(
                lambda failure: self.log.error(
                    "subscribing to {destination} failed: {error}",
                    destination=destination,
                    error=failure.getErrorMessage(),
                )
            )
        return subscription

    def ack(self, message: StompMessage) -> Deferred[None]:
        return self._acknowledge(message, "ack")

    def nack(self, message: StompMessage, *, requeue: bool = True) -> Deferred[None]:
        return self._acknowledge(message, "nack", self.profile.nack_headers(requeue))

    # Connection lifecycle

    def _build_protocol(self) -> StompClientProtocol:
        current = getattr(self._endpoint, "current", None)
        return StompClientProtocol(
            self.settings,
            self._clock,
            host=current.host if isinstance(current, BrokerAddress) else "",
            generation=next(self._generations),
        )

    def _attempt(self) -> None:
        self._retry_call = None
        connecting = self._endpoint.connect(self._factory)
        self._connecting = connecting
        connecting.addCallbacks(self._transport_connected, self._connect_failed)

    def _transport_connected(self, protocol: IProtocol) -> None:
        self._connecting = None
        # _ProtocolFactory builds only StompClientProtocol instances.
        stomp = cast(StompClientProtocol, protocol)
        stomp.on_lost = self._lost
        self._preparing = stomp
        Deferred.fromCoroutine(self._prepare(stomp))

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        error = failure.getErrorMessage()
        if isinstance(failure.value, ConnectionRefusedError):
            error += (
                "; check that the broker runs and has a STOMP listener on this port"
                " (RabbitMQ needs the rabbitmq_stomp plugin, ActiveMQ a stomp://"
                " transport connector)"
            )
        self._last_error = f"{self._current_broker()}: {error}"
        self.log.error(
            "could not connect to {broker}: {error}",
            broker=self._current_broker(),
            error=error,
        )
        self._schedule_retry()

    async def _prepare(self, protocol: StompClientProtocol) -> None:
        broker = self._current_broker()
        try:
            await protocol.when_connected()
            for subscription in list(self._subscriptions.values()):
                await self._subscribe_on(protocol, subscription)
        except Exception as e:
            self._last_error = f"{broker}: {e}"
            self.log.error(
                "could not establish a STOMP session with {broker}: {error}",
                broker=broker,
                error=str(e),
            )
            # Closing the transport leads to _lost, which schedules the retry.
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            return
        if protocol is not self._preparing:
            return
        self._preparing = None
        self._protocol = protocol
        self._last_error = None
        # The backoff starts again only once the session proved stable: a
        # broker that confirms a SUBSCRIBE and then rejects it with ERROR
        # (RabbitMQ 3.10 does) must not cause a reconnect loop at full speed.
        self._stable_call = self._clock.callLater(self.stable_after, self._session_stable)
        self.sessions += 1
        self.log.info(
            "connected to {broker} with STOMP {version}, {count} subscriptions active",
            broker=broker,
            version=protocol.version,
            count=len(self._subscriptions),
        )
        for waiter in self._drain_waiters():
            waiter.callback(None)
        for listener in list(self._session_listeners):
            try:
                listener()
            except Exception:
                self.log.failure("session listener {listener!r} failed", listener=listener)

    def _session_stable(self) -> None:
        self._stable_call = None
        self._failures = 0

    def _lost(self, protocol: StompClientProtocol, reason: Failure) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._cancel_stable_call()
            cause = str(protocol.error) if protocol.error else reason.getErrorMessage()
            self._last_error = f"connection lost: {cause}"
            if self.running:
                self.log.warn("lost the broker connection: {error}", error=cause)
        elif protocol is self._preparing:
            self._preparing = None
        else:
            return
        if self.running:
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        self._failures += 1
        delay = self._retry_policy(self._failures)
        self.log.info(
            "reconnecting in {delay:.1f} s (attempt {attempt})",
            delay=delay,
            attempt=self._failures,
        )
        self._retry_call = self._clock.callLater(delay, self._attempt)

    # Helpers

    def _subscribe_on(self, protocol: StompClientProtocol, subscription: _Subscription) -> Deferred[None]:
        return protocol.subscribe(
            subscription.destination,
            subscription.subscription_id,
            subscription.handler,
            ack=subscription.ack,
            headers=subscription.headers,
        )

    def _unsubscribe(self, subscription: _Subscription) -> Deferred[None]:
        if self._subscriptions.pop(subscription.subscription_id, None) is None:
            return succeed(None)
        protocol = self._protocol
        if protocol is None or not protocol.is_connected:
            return succeed(None)
        return protocol.unsubscribe(subscription.subscription_id)

    def _acknowledge(
        self, message: StompMessage, verb: str, headers: Mapping[str, str] | None = None
    ) -> Deferred[None]:
        # Messages can arrive while the subscriptions of a new connection are
        # being restored (RabbitMQ 3.10 delivers a queue's backlog at once),
        # so that connection may acknowledge before the session counts as
        # established.
        protocol = self._protocol or self._preparing
        if protocol is None or not protocol.is_connected:
            return fail(NotConnected(self._not_connected_reason()))
        if message.generation != protocol.generation:
            return fail(
                NotConnected(
                    f"cannot {verb} message {message.message_id!r}: it arrived on an earlier"
                    " connection, so the broker redelivers it"
                )
            )
        try:
            if verb == "ack":
                return protocol.ack(message)
            return protocol.nack(message, headers=headers)
        except Exception as e:
            return fail(e)

    def _cancel_stable_call(self) -> None:
        if self._stable_call is not None and self._stable_call.active():
            self._stable_call.cancel()
        self._stable_call = None

    def _not_connected_reason(self) -> str:
        if self._last_error:
            return f"not connected to the broker ({self._last_error})"
        return "not connected to the broker yet"

    def _describe_brokers(self) -> str:
        return repr(self._endpoint)

    def _current_broker(self) -> str:
        return str(getattr(self._endpoint, "current", "the broker"))

    def _drain_waiters(self) -> list[Deferred[None]]:
        waiters = list(self._waiters)
        self._waiters.clear()
        return waiters

    def _forget_waiter(self, waiter: Deferred[None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

"""
A Twisted protocol for one STOMP connection, built on stompest's protocol core.

stompest's ``StompParser`` turns bytes into frames, ``StompSession`` and
``commands`` build frames and track the session state; this module adds the
transport: writing frames, heart-beats on an injected clock, receipts as
Deferreds, ERROR handling and a bound on frame size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from OpenSSL import SSL
from stompest.error import StompError as StompestError
from stompest.protocol import StompFrame, StompParser, StompSession, StompSpec
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISystemHandle
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._errors import (
    BrokerError,
    ConnectionClosed,
    FrameTooLarge,
    HeartBeatTimeout,
    NotConnected,
    ProtocolViolation,
    StompError,
    TLSError,
)
from ._interfaces import ACK_AUTO, ACK_MODES, MessageHandler, StompMessage
from ._profiles import profile_for
from ._tls import ClientTLS, describe_tls_failure, load_client_tls
from ._uri import parse_broker_uri

VERSIONS = ("1.0", "1.1", "1.2")


@dataclass(frozen=True)
class StompSettings:
    """
    Settings of a STOMP client.

    Attributes:
        uri: ``tcp://host:port``, ``ssl://host:port`` or an ActiveMQ-style
            failover URI such as
            ``failover:(tcp://a:61613,tcp://b:61613)?initialReconnectDelay=100``.
        login: The ``login`` header of CONNECT, or ``None`` to send none.
        passcode: The ``passcode`` header of CONNECT. It never appears in a
            repr or a log.
        vhost: The ``host`` header of CONNECT (RabbitMQ's virtual host); by
            default the broker's host name.
        versions: STOMP versions offered to the broker; it picks the highest
            one that it supports.
        heart_beat: Milliseconds between heart-beats that the client offers to
            send and wants to receive; ``0`` disables that direction.
        heart_beat_grace: The connection is dropped when nothing arrived for
            the negotiated receive period times ``1 + heart_beat_grace``.
            ActiveMQ 5.17 lets up to two periods pass between its heart-beats,
            so the default allows two and a half.
        max_frame_size: Largest frame accepted from the broker, in bytes.
        connect_timeout: Seconds to wait for CONNECTED after the TCP
            connection is made.
        disconnect_timeout: Seconds to wait for the RECEIPT of DISCONNECT.
        broker_type: ``activemq``, ``rabbitmq`` or ``generic``: selects the
            :class:`BrokerProfile` for prefetch, time-to-live and NACK headers.
        tls_ca_file: PEM file of the CA certificates that ``ssl://`` brokers
            must chain to, in place of the system's trust store.
        tls_cert_file: PEM file of the client certificate, optionally
            followed by intermediate CA certificates, for brokers that ask
            for one. Requires ``tls_key_file``.
        tls_key_file: PEM file of the unencrypted private key of
            ``tls_cert_file``.
        tls_insecure: Accept any certificate from ``ssl://`` brokers, for any
            host name. Every connection attempt then logs a warning. The URI
            must name an ``ssl://`` broker, and ``tls_ca_file`` must be unset.

    The TLS files are read once, when the settings are created, and a
    missing, unreadable or invalid file raises :class:`TLSFileError`.
    Host names are always verified unless ``tls_insecure`` is set.
    """

    uri: str = "tcp://127.0.0.1:61613"
    login: str | None = None
    passcode: str | None = field(default=None, repr=False)
    vhost: str | None = None
    versions: tuple[str, ...] = VERSIONS
    heart_beat: tuple[int, int] = (10000, 10000)
    heart_beat_grace: float = 1.5
    broker_type: str = "activemq"
    max_frame_size: int = 10 * 1024 * 1024
    connect_timeout: float = 30.0
    disconnect_timeout: float = 5.0
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure: bool = False
    _client_tls: ClientTLS = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.versions or any(v not in VERSIONS for v in self.versions):
            raise ValueError(
                f"invalid STOMP versions {self.versions!r}: choose from {', '.join(VERSIONS)}"
            )
        if len(self.heart_beat) != 2 or any(
            not isinstance(t, int) or t < 0 for t in self.heart_beat
        ):
            raise ValueError(
                f"invalid heart-beat {self.heart_beat!r}: expected two non-negative"
                " integers in milliseconds (send, receive)"
            )
        profile_for(self.broker_type)
        if self.max_frame_size <= 0:
            raise ValueError(f"invalid max_frame_size {self.max_frame_size!r}: must be positive")
        if self.tls_insecure:
            self._check_insecure()
        client_tls = load_client_tls(
            self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.tls_insecure
        )
        # Plain assignment raises FrozenInstanceError.
        object.__setattr__(self, "_client_tls", client_tls)

    @property
    def client_tls(self) -> ClientTLS:
        """
        The TLS configuration for ``ssl://`` brokers, read from the files.
        """
        return self._client_tls

    def _check_insecure(self) -> None:
        if self.tls_ca_file is not None:
            raise ValueError(
                "tls_insecure turns off certificate verification, so tls_ca_file"
                f" {self.tls_ca_file!r} would be ignored: set only one of them"
            )
        # An unused tls_insecure is an error so that it cannot take effect
        # unnoticed when the URI changes to ssl:// later.
        if all(broker.scheme != "ssl" for broker in parse_broker_uri(self.uri).brokers):
            raise ValueError(
                f"tls_insecure is set, but the broker URI {self.uri!r} names no ssl://"
                " broker: remove tls_insecure"
            )


@dataclass
class _Subscribed:
    destination: str
    handler: MessageHandler
    ack: str


class StompClientProtocol(Protocol):
    """
    One STOMP session over one transport.

    The protocol sends CONNECT as soon as the transport is connected;
    :meth:`when_connected` fires once CONNECTED arrives. An ERROR frame from
    the broker ends the session: its ``message`` header is logged, every
    pending Deferred fails with :class:`BrokerError`, and the transport is
    closed.
    """

    log = Logger()

    def __init__(
        self,
        settings: StompSettings,
        clock: IReactorTime,
        host: str = "",
        generation: int = 0,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.broker_host = host
        self.host = settings.vhost if settings.vhost is not None else host
        self.generation = generation
        self.session = StompSession(max(settings.versions), check=True)
        self.parser = StompParser(max(settings.versions))
        self.error: Exception | None = None
        self.on_lost: Callable[[StompClientProtocol, Failure], None] | None = None
        self._receipt_ids = (f"taskmesh-{n}" for n in itertools.count(1))
        self._receipts: dict[str, Deferred[None]] = {}
        self._subscriptions: dict[str, _Subscribed] = {}
        self._connected_waiters: list[Deferred[None]] = []
        self._lost_waiters: list[Deferred[None]] = []
        self._connected = False
        self._lost = False
        self._connect_timer: IDelayedCall | None = None
        self._send_beat: LoopingCall | None = None
        self._check_beat: LoopingCall | None = None
        self._last_sent = 0.0
        self._last_received = 0.0
        self._server_period = 0.0
        # The OpenSSL connection of an ssl:// broker, kept to read the
        # broker's certificates after a failed handshake.
        self._tls_connection: SSL.Connection | None = None

    # Twisted protocol callbacks

    def connectionMade(self) -> None:
        self._last_received = self._last_sent = self.clock.seconds()
        if ISystemHandle.providedBy(self.transport):
            handle = self.transport.getHandle()
            if isinstance(handle, SSL.Connection):
                self._tls_connection = handle
        frame = self.session.connect(
            login=self.settings.login,
            passcode=self.settings.passcode,
            versions=list(self.settings.versions),
            host=self.host,
            heartBeats=self.settings.heart_beat if self._offers_heart_beats() else None,
        )
        self._write(frame)
        self._connect_timer = self.clock.callLater(
            self.settings.connect_timeout, self._connect_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        if self._lost or self.error is not None:
            # The connection is closing after a failure; ignore the rest.
            return
        self._last_received = self.clock.seconds()
        try:
            self.parser.add(data)
        except (StompestError, ValueError) as e:
            # stompest 2.3.0 raises ValueError (UnicodeDecodeError included)
            # for a header that is not UTF-8 and for a content-length that is
            # not a number.
            self._fail(ProtocolViolation(f"invalid frame from the broker: {e}"))
            return
        while self.parser.canRead():
            frame = self.parser.get()
            try:
                self._frame_received(frame)
            except StompestError as e:
                self._fail(ProtocolViolation(f"invalid {frame.command} frame from the broker: {e}"))
                return
            # After a failure the connection is closing, so the frames that
            # arrived behind it (for example behind an ERROR) are dropped.
            if self._lost or self.error is not None:
                return
        self._check_buffered_size()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._connected = False
        self._stop_timers()
        if self.error is None:
            self.error = self._describe_tls_failure(reason)
        error = self.error or ConnectionClosed(
            f"connection to the broker closed: {reason.getErrorMessage()}"
        )
        for waiter in self._drain(self._connected_waiters):
            waiter.errback(error)
        receipts = list(self._receipts.values())
        self._receipts.clear()
        for deferred in receipts:
            deferred.errback(error)
        for waiter in self._drain(self._lost_waiters):
            waiter.callback(None)
        if self.on_lost is not None:
            self.on_lost(self, reason)

    # Public API

    @property
    def is_connected(self) -> bool:
        """
        Whether CONNECTED arrived and the connection is still open.
        """
        return self._connected and not self._lost

    @property
    def version(self) -> str:
        """
        The negotiated STOMP version, or the highest offered before CONNECTED.
        """
        return str(self.session.version)

    def when_connected(self) -> Deferred[None]:
        """
        Return a fresh Deferred that fires when CONNECTED arrives.

        It fails with :class:`BrokerError` if the broker responds to CONNECT with
        ERROR and with :class:`ConnectionClosed` if the connection ends first.
        """
        if self.is_connected:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._lost:
            waiter.errback(self.error or ConnectionClosed("connection already closed"))
        else:
            self._connected_waiters.append(waiter)
        return waiter

    def send(
        self,
        destination: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        receipt: bool = False,
    ) -> Deferred[None]:
        """
        Send a SEND frame with a ``content-length`` header.

        A body may contain any bytes, NUL included, because brokers read
        exactly ``content-length`` bytes. See
        :meth:`taskmesh.stomp.StompConnection.send` for the Deferred.
        """
        self._require_connected()
        all_headers = self._checked_headers(headers)
        receipt_id = next(self._receipt_ids) if receipt else None
        frame = self.session.send(destination, bytes(body), all_headers, receipt=receipt_id)
        frame.setContentLength()
        return self._write_expecting(frame, receipt_id)

    def subscribe(
        self,
        destination: str,
        subscription_id: str,
        handler: MessageHandler,
        *,
        ack: str = ACK_AUTO,
        headers: Mapping[str, str] | None = None,
        receipt: bool = True,
    ) -> Deferred[None]:
        """
        Subscribe ``handler`` to ``destination`` under ``subscription_id``.

        The Deferred fires when the broker confirms the subscription with a
        RECEIPT, or fails if it answers with ERROR (for example when the user
        may not read the destination).
        """
        self._require_connected()
        if ack not in ACK_MODES:
            raise ValueError(f"invalid ack mode {ack!r}: expected one of {', '.join(ACK_MODES)}")
        all_headers = self._checked_headers(headers)
        all_headers[StompSpec.ACK_HEADER] = ack
        all_headers[StompSpec.ID_HEADER] = subscription_id
        receipt_id = next(self._receipt_ids) if receipt else None
        frame, _ = self.session.subscribe(destination, all_headers, receipt=receipt_id)
        self._subscriptions[subscription_id] = _Subscribed(destination, handler, ack)
        return self._write_expecting(frame, receipt_id)

    def unsubscribe(self, subscription_id: str) -> Deferred[None]:
        """
        Cancel a subscription made with :meth:`subscribe`.
        """
        self._require_connected()
        subscribed = self._subscriptions.pop(subscription_id)
        token = (StompSpec.ID_HEADER, subscription_id)
        if self.version == StompSpec.VERSION_1_0:
            token = (StompSpec.DESTINATION_HEADER, subscribed.destination)
        receipt_id = next(self._receipt_ids)
        frame = self.session.unsubscribe(token, receipt=receipt_id)
        return self._write_expecting(frame, receipt_id)

    def ack(self, message: StompMessage, *, receipt: bool = False) -> Deferred[None]:
        """
        Acknowledge a message from a ``client`` or ``client-individual`` subscription.
        """
        self._require_connected()
        receipt_id = next(self._receipt_ids) if receipt else None
        frame = self.session.ack(message.raw, receipt=receipt_id)
        return self._write_expecting(frame, receipt_id)

    def nack(
        self,
        message: StompMessage,
        *,
        receipt: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Deferred[None]:
        """
        Reject a message; STOMP 1.0 has no NACK, so this raises there.
        """
        self._require_connected()
        if self.version == StompSpec.VERSION_1_0:
            raise NotConnected("NACK needs STOMP 1.1 or later; this session uses 1.0")
        receipt_id = next(self._receipt_ids) if receipt else None
        frame = self.session.nack(message.raw, receipt=receipt_id)
        frame.headers.update(self._checked_headers(headers))
        return self._write_expecting(frame, receipt_id)

    def disconnect(self) -> Deferred[None]:
        """
        End the session politely and close the transport.

        Sends DISCONNECT with a receipt, waits for it up to
        ``settings.disconnect_timeout`` seconds, then closes the connection.
        The Deferred fires once the connection is closed.
        """
        lost: Deferred[None] = Deferred()
        if self._lost:
            lost.callback(None)
            return lost
        self._lost_waiters.append(lost)
        if not self.is_connected:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return lost
        receipt_id = next(self._receipt_ids)
        frame = self.session.disconnect(receipt=receipt_id)
        receipt = self._write_expecting(frame, receipt_id)
        timer = self.clock.callLater(self.settings.disconnect_timeout, receipt.cancel)

        def close(result: object) -> None:
            if timer.active():
                timer.cancel()
            if not self._lost:
                self.transport.loseConnection()  # type: ignore[union-attr]

        receipt.addBoth(close)
        return lost

    # Frame handling

    def _frame_received(self, frame: Any) -> None:
        command = getattr(frame, "command", None)
        if command is None:
            # A heart-beat: dataReceived already noted the time.
            return
        if command == StompSpec.CONNECTED:
            self._on_connected(frame)
        elif command == StompSpec.MESSAGE:
            self._on_message(frame)
        elif command == StompSpec.RECEIPT:
            self._on_receipt(frame)
        elif command == StompSpec.ERROR:
            self._on_error(frame)
        else:
            raise ProtocolViolation(f"unexpected {command} frame from the broker")

    def _on_connected(self, frame: StompFrame) -> None:
        self.session.connected(frame)
        self.parser.version = self.session.version
        self._connected = True
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        self._start_heart_beats()
        self.log.info(
            "STOMP {version} session {session} established with {server}",
            version=self.session.version,
            session=self.session.id,
            server=self.session.server or "the broker",
        )
        for waiter in self._drain(self._connected_waiters):
            waiter.callback(None)

    def _on_message(self, frame: StompFrame) -> None:
        headers = frame.headers
        subscription_id = headers.get(StompSpec.SUBSCRIPTION_HEADER, "")
        subscribed = self._subscriptions.get(subscription_id)
        if subscribed is None and self.version == StompSpec.VERSION_1_0:
            destination = headers.get(StompSpec.DESTINATION_HEADER)
            subscription_id, subscribed = next(
                ((k, s) for k, s in self._subscriptions.items() if s.destination == destination),
                ("", None),
            )
        if subscribed is None:
            self.log.warn(
                "dropped a MESSAGE for unknown subscription {subscription!r}",
                subscription=subscription_id,
            )
            return
        message = StompMessage(
            destination=headers.get(StompSpec.DESTINATION_HEADER, subscribed.destination),
            headers=headers,
            body=frame.body,
            subscription=subscription_id,
            ack_id=headers.get(StompSpec.ACK_HEADER, ""),
            message_id=headers.get(StompSpec.MESSAGE_ID_HEADER, ""),
            generation=self.generation,
            raw=frame,
        )
        result = maybeDeferred(subscribed.handler, message)
        result.addErrback(
            lambda failure: self.log.failure(
                "message handler for {destination} failed",
                failure,
                destination=message.destination,
            )
        )

    def _on_receipt(self, frame: StompFrame) -> None:
        receipt_id = frame.headers.get(StompSpec.RECEIPT_ID_HEADER)
        deferred = self._receipts.pop(receipt_id, None) if receipt_id is not None else None
        if deferred is None:
            self.log.warn("ignored an unexpected RECEIPT {receipt_id!r}", receipt_id=receipt_id)
            return
        deferred.callback(None)

    def _on_error(self, frame: StompFrame) -> None:
        headers = frame.headers
        message = headers.get("message") or "no message header"
        details = frame.body.decode("utf-8", errors="replace")
        error = BrokerError(message, details, headers)
        self.log.error(
            "broker sent ERROR: {error}",
            error=str(error),
            message=message,
            receipt_id=headers.get(StompSpec.RECEIPT_ID_HEADER),
        )
        receipt_id = headers.get(StompSpec.RECEIPT_ID_HEADER)
        if receipt_id is not None and receipt_id in self._receipts:
            self._receipts.pop(receipt_id).errback(error)
        self._fail(error)

    # Heart-beats

    def _offers_heart_beats(self) -> bool:
        return max(self.settings.versions) != StompSpec.VERSION_1_0 and any(
            self.settings.heart_beat
        )

    def _start_heart_beats(self) -> None:
        client_period = self.session.clientHeartBeat / 1000.0
        self._server_period = self.session.serverHeartBeat / 1000.0
        if client_period > 0:
            self._send_beat = LoopingCall(self._beat)
            self._send_beat.clock = self.clock
            self._send_beat.start(client_period / 2, now=False)
        if self._server_period > 0:
            self._check_beat = LoopingCall(self._check_received)
            self._check_beat.clock = self.clock
            self._check_beat.start(self._server_period / 2, now=False)

    def _beat(self) -> None:
        client_period = self.session.clientHeartBeat / 1000.0
        if self.clock.seconds() - self._last_sent >= client_period / 2:
            self._write(self.session.beat())

    def _check_received(self) -> None:
        silence = self.clock.seconds() - self._last_received
        limit = self._server_period * (1 + self.settings.heart_beat_grace)
        if silence > limit:
            self._fail(
                HeartBeatTimeout(
                    f"no data from the broker for {silence:.1f} s; the negotiated"
                    f" heart-beat period is {self._server_period:.1f} s"
                ),
                abort=True,
            )

    # Helpers

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        message = f"no CONNECTED frame from the broker within {self.settings.connect_timeout:g} s"
        # Without a certificate from the peer, the TLS handshake never got
        # past the client's first message, as with a plain STOMP port.
        if self._tls_connection is not None and not self._tls_connection.get_peer_cert_chain():
            message += (
                ", and the TLS handshake did not complete:"
                " check that the port accepts STOMP over TLS"
            )
        self._fail(ConnectionClosed(message), abort=True)

    def _check_buffered_size(self) -> None:
        # NOTE: stompest 2.3.0's parser keeps the unparsed bytes in ``_data``
        # and the frame whose head it has parsed in ``_frame``; setup.cfg pins
        # that version, so reading them here is safe. A frame that declares a
        # content-length over the limit is rejected as soon as its head is
        # parsed, before its body is buffered. Without a content-length, at
        # most one read (64 KiB in Twisted) beyond the limit is buffered.
        limit = self.settings.max_frame_size
        partial = getattr(self.parser, "_frame", None)
        declared = getattr(partial, "headers", {}).get(StompSpec.CONTENT_LENGTH_HEADER)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self._fail(
                FrameTooLarge(
                    f"a {getattr(partial, 'command', '')} frame from the broker declares content-length"
                    f" {declared}, over max_frame_size {limit}"
                ),
                abort=True,
            )
            return
        buffered = len(getattr(self.parser, "_data", b""))
        if buffered > limit:
            self._fail(
                FrameTooLarge(
                    f"a frame from the broker exceeds max_frame_size"
                    f" ({buffered} bytes buffered, limit {self.settings.max_frame_size})"
                ),
                abort=True,
            )

    def _require_connected(self) -> None:
        if not self.is_connected:
            raise NotConnected(str(self.error) if self.error else "not connected to the broker")

    def _checked_headers(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        checked: dict[str, str] = {}
        version = self.version
        for name, value in (headers or {}).items():
            for text in (name, value):
                if not isinstance(text, str):
                    raise TypeError(f"STOMP header names and values must be str, not {text!r}")
                if version == StompSpec.VERSION_1_0 and ("\n" in text or "\r" in text):
                    raise ValueError(
                        f"header {name!r} contains a line break, which STOMP 1.0 cannot carry"
                    )
                if version == StompSpec.VERSION_1_1 and "\r" in text:
                    raise ValueError(
                        f"header {name!r} contains a carriage return, which STOMP 1.1 cannot carry"
                    )
            if version == StompSpec.VERSION_1_0 and ":" in name:
                raise ValueError(f"header name {name!r} contains ':', which STOMP 1.0 cannot carry")
            checked[name] = value
        return checked

    def _write_expecting(self, frame: StompFrame, receipt_id: str | None) -> Deferred[None]:
        if receipt_id is None:
            self._write(frame)
            return succeed(None)

        def forget(deferred: Deferred[None]) -> None:
            self._receipts.pop(receipt_id, None)

        deferred: Deferred[None] = Deferred(forget)
        self._receipts[receipt_id] = deferred
        self._write(frame)
        return deferred

    def _write(self, frame: Any) -> None:
        self._last_sent = self.clock.seconds()
        self.transport.write(bytes(frame))  # type: ignore[union-attr]

    def _fail(self, error: StompError, abort: bool = False) -> None:
        if self._lost:
            return
        if self.error is None:
            self.error = error
        if not isinstance(error, BrokerError):
            self.log.error("closing the broker connection: {error}", error=str(error))
        self._stop_timers()
        if abort:
            self.transport.abortConnection()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _describe_tls_failure(self, reason: Failure) -> TLSError | None:
        if self._tls_connection is None:
            return None
        chain = self._tls_connection.get_peer_cert_chain(as_cryptography=True) or []
        return describe_tls_failure(reason, self.broker_host, chain, self.settings.client_tls)

    def _stop_timers(self) -> None:
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        for loop in (self._send_beat, self._check_beat):
            if loop is not None and loop.running:
                loop.stop()
        self._send_beat = self._check_beat = None

    @staticmethod
    def _drain(waiters: list[Deferred[None]]) -> list[Deferred[None]]:
        drained = list(waiters)
        waiters.clear()
        return drained

"""
A broker connection that signs what it sends and checks what it receives.

:class:`SecureConnection` wraps any :class:`taskmesh.stomp.StompConnection`,
so the master and slave services sign, verify, encrypt and decrypt without
knowing it: every SEND is sealed with :func:`taskmesh.security.seal_message`
and every MESSAGE passes :func:`taskmesh.security.open_message` before the
service's handler sees it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import replace
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskmesh._config import SecuritySettings
from taskmesh._messages import HEADER_REQUEST_ID, HEADER_SLAVE_ID, HEADER_TYPE
from taskmesh._log_limiter import LogRateLimiter
from taskmesh.security import (
    DEFAULT_LIFETIME,
    HEADER_NONCE,
    REJECTED_REPLAY,
    MessageRejected,
    PayloadCipher,
    Signer,
    Verifier,
    load_keyring,
    load_signing_key,
    load_symmetric_key,
    open_message,
    seal_message,
)
from taskmesh.stomp import ACK_AUTO, MessageHandler, StompConnection, StompMessage, Subscription


class SecureConnection:
    """
    Sign and optionally encrypt every message sent, and verify every one received.

    A received message that fails verification or decryption is counted in
    :attr:`stats` under its rejection reason, logged (at most a few times a
    minute per reason), acknowledged when its subscription uses client
    acknowledgement so that the broker does not deliver it again, and never
    passed on. No reply is sent, because its sender is not known.

    Args:
        inner: The connection to the broker.
        signer: Signs outgoing messages with this daemon's key.
        verifier: Accepts messages signed by the keys of the keyring.
        clock: Source of the current time.
        cipher: Encrypts outgoing bodies and decrypts incoming ones.
        require_encryption: Reject received messages whose body is in clear.
        accept_types: ``taskmesh-type`` values that this daemon handles;
            messages of other types (a slave receives the other slaves'
            announcements) are dropped before verification and counted as
            ``ignored_types``. ``None`` accepts every type.
    """

    log = Logger()

    def __init__(
        self,
        inner: StompConnection,
        signer: Signer,
        verifier: Verifier,
        *,
        clock: IReactorTime,
        cipher: PayloadCipher | None = None,
        require_encryption: bool = False,
        accept_types: frozenset[str] | None = None,
    ) -> None:
        self.inner = inner
        self.signer = signer
        self.verifier = verifier
        self.clock = clock
        self.cipher = cipher
        self.require_encryption = require_encryption
        self.accept_types = accept_types
        self.stats: Counter[str] = Counter()
        self._limiter = LogRateLimiter(self.log, clock)
        # Nonce -> connection generation of each accepted message from a
        # client-acknowledged subscription, to tell a broker's redelivery
        # after a reconnect from a replay.
        self._accepted_on: OrderedDict[str, int] = OrderedDict()

    # Delegated parts of StompConnection

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    @property
    def last_error(self) -> str | None:
        return self.inner.last_error

    def when_connected(self) -> Deferred[None]:
        return self.inner.when_connected()

    def add_session_listener(self, listener: Callable[[], object]) -> None:
        self.inner.add_session_listener(listener)

    def ack(self, message: StompMessage) -> Deferred[None]:
        return self.inner.ack(message)

    def nack(self, message: StompMessage, *, requeue: bool = True) -> Deferred[None]:
        if requeue:
            # The broker delivers the same signed message again, which is
            # not a replay.
            self.verifier.forget(message.headers)
        return self.inner.nack(message, requeue=requeue)

    # Sealing and opening

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
        # A message must stay valid for as long as the broker may keep it.
        expires = self.clock.seconds() + max(ttl or 0.0, DEFAULT_LIFETIME)
        sealed_headers, sealed_body = seal_message(
            headers or {}, body, destination, self.signer, self.cipher, expires=expires
        )
        self.stats["signed"] += 1
        return self.inner.send(
            destination,
            sealed_body,
            sealed_headers,
            receipt=receipt,
            persistent=persistent,
            ttl=ttl,
        )

    def subscribe(
        self,
        destination: str,
        handler: MessageHandler,
        *,
        ack: str = ACK_AUTO,
        headers: Mapping[str, str] | None = None,
        prefetch: int | None = None,
    ) -> Subscription:
        def on_message(message: StompMessage) -> Any:
            opened = self._open(message, client_ack=ack != ACK_AUTO)
            if opened is None:
                return None
            return handler(opened)

        return self.inner.subscribe(
            destination, on_message, ack=ack, headers=headers, prefetch=prefetch
        )

    def _open(self, message: StompMessage, *, client_ack: bool) -> StompMessage | None:
        kind = message.headers.get(HEADER_TYPE)
        if self.accept_types is not None and kind not in self.accept_types:
            self.stats["ignored_types"] += 1
            self._settle(message, client_ack)
            return None
        try:
            opened = open_message(
                message.headers,
                message.body,
                message.destination,
                self.verifier,
                self.cipher,
                require_encryption=self.require_encryption,
            )
        except MessageRejected as e:
            if self._is_redelivery(message, e, client_ack):
                # The broker delivers again what it sent on an earlier
                # connection whose acknowledgement was lost with it.
                self.verifier.forget(message.headers)
                self.stats["redeliveries_accepted"] += 1
                return self._open(message, client_ack=client_ack)
            self.stats[e.counter_key] += 1
            if self._limiter.should_log(e.counter_key):
                self.log.warn(
                    "rejected a message on {destination}: {reason}",
                    destination=message.destination,
                    reason=e.reason,
                    counter=e.counter_key,
                    request_id=message.headers.get(HEADER_REQUEST_ID),
                    slave_id=message.headers.get(HEADER_SLAVE_ID),
                )
            self._settle(message, client_ack)
            return None
        self.stats["verified"] += 1
        nonce = message.headers.get(HEADER_NONCE)
        if client_ack and nonce is not None:
            self._accepted_on[nonce] = message.generation
            self._accepted_on.move_to_end(nonce)
            while len(self._accepted_on) > MAX_REMEMBERED_DELIVERIES:
                self._accepted_on.popitem(last=False)
        return replace(message, headers=opened.headers, body=opened.body)

    def _is_redelivery(
        self, message: StompMessage, rejection: MessageRejected, client_ack: bool
    ) -> bool:
        """
        Return whether a replay rejection is the broker redelivering a message.

        Brokers redeliver only unacknowledged messages of client-acknowledged
        subscriptions, and only on a later connection. A copy that an
        attacker publishes again arrives as a new message on the same
        connection and stays rejected.
        """
        if not client_ack or rejection.counter_key != REJECTED_REPLAY:
            return False
        nonce = message.headers.get(HEADER_NONCE)
        accepted_on = self._accepted_on.get(nonce) if nonce is not None else None
        return accepted_on is not None and message.generation > accepted_on

    def _settle(self, message: StompMessage, client_ack: bool) -> None:
        if not client_ack:
            return
        settled = self.inner.ack(message)
        settled.addErrback(
            lambda failure: self.log.warn(
                "could not acknowledge a rejected message on {destination}: {error}",
                destination=message.destination,
                error=failure.getErrorMessage(),
            )
        )


# Deliveries remembered to recognise a broker's redelivery; beyond this the
# oldest are forgotten and a very late redelivery is rejected as a replay.
MAX_REMEMBERED_DELIVERIES = 100_000

# Message types that each daemon handles.
MASTER_TYPES = frozenset({"progress", "result", "error", "accepted", "announce"})
SLAVE_TYPES = frozenset({"task", "cancel", "discover"})


def secure_connection(
    inner: StompConnection,
    security: SecuritySettings,
    *,
    clock: IReactorTime,
    accept_types: frozenset[str],
) -> StompConnection:
    """
    Wrap ``inner`` in a :class:`SecureConnection` built from the ``[security]``
    settings, or return it unchanged when signing is off.

    Raises:
        taskmesh.security.KeyFileError: a key file is missing or unsafe.
    """
    if security.signing_key is None or security.keyring is None:
        SecureConnection.log.warn(
            "message signing is off ([security] allow_unsigned = true): anyone who can"
            " publish to the broker can run tasks or forge results"
        )
        return inner
    signing_key = load_signing_key(security.signing_key)
    signer = Signer(signing_key, signing_key.key_id, clock)
    verifier = Verifier(load_keyring(security.keyring), clock, max_skew=security.max_skew)
    cipher = None
    if security.payload_key is not None:
        cipher = PayloadCipher(load_symmetric_key(security.payload_key))
    SecureConnection.log.info(
        "signing messages with key {key_id}; accepting {count} keys from {keyring}",
        key_id=signing_key.key_id,
        count=len(verifier.trusted_key_ids),
        keyring=security.keyring,
    )
    return SecureConnection(
        inner,
        signer,
        verifier,
        clock=clock,
        cipher=cipher,
        require_encryption=security.require_encryption,
        accept_types=accept_types,
    )


__all__ = ["MASTER_TYPES", "SLAVE_TYPES", "SecureConnection", "secure_connection"]

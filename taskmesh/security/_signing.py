"""
Ed25519 signatures on taskmesh messages, with expiry and replay detection.

A :class:`Signer` adds five headers to a message: the key id, the issue time,
the expiry, a random nonce and the signature over the canonical bytes of
:func:`taskmesh.security._canonical.signed_bytes`. A :class:`Verifier` checks
them on the raw STOMP headers and body, before the message is decoded.
"""

from __future__ import annotations

import heapq
import math
import os
from typing import AbstractSet, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.internet.interfaces import IReactorTime

from .._messages import HEADER_SLAVE_ID, HEADER_TASK, HEADER_TYPE, MessageType
from ._canonical import (
    HEADER_EXPIRES,
    HEADER_ISSUED,
    HEADER_KEY_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    NONCE_SIZE,
    SIGNATURE_HEADERS,
    SIGNATURE_SIZE,
    decode_base64url,
    encode_base64url,
    parse_time,
    signed_bytes,
)
from ._keys import KEY_ID_PATTERN, SigningKey, TrustedKey, key_id_of, normalize_trusted

# Seconds that a signature stays valid when the caller gives no expiry.
DEFAULT_LIFETIME = 300.0
# Seconds that the verifier's clock and a signer's clock may differ.
DEFAULT_MAX_SKEW = 60.0
# The maximum validity (expiry minus issue time) that a verifier accepts, in
# seconds. A nonce is remembered until its message expires, so this bounds how
# long each nonce is kept.
DEFAULT_REPLAY_WINDOW = 86400.0

# Counter keys of rejected messages, one per reason.
REJECTED_UNSIGNED = "rejected_unsigned"
REJECTED_MALFORMED = "rejected_malformed_signature"
REJECTED_UNKNOWN_KEY = "rejected_unknown_key"
REJECTED_BAD_SIGNATURE = "rejected_bad_signature"
REJECTED_EXPIRED = "rejected_expired"
REJECTED_NOT_YET_VALID = "rejected_not_yet_valid"
REJECTED_TOO_LONG = "rejected_validity_too_long"
REJECTED_REPLAY = "rejected_replay"
REJECTED_TYPE_NOT_ALLOWED = "rejected_type_not_allowed"
REJECTED_TASK_NOT_ALLOWED = "rejected_task_not_allowed"
REJECTED_SLAVE_NOT_ALLOWED = "rejected_slave_not_allowed"


class MessageRejected(Exception):
    """
    A received message that failed a security check and must be dropped.

    ``reason`` describes what failed, for a log line. ``counter_key`` names
    the failed check, for counters such as the daemons' ``stats``.
    """

    def __init__(self, reason: str, counter_key: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.counter_key = counter_key


class SignatureRejected(MessageRejected):
    """
    A message whose signature headers are missing, invalid, expired,
    replayed, or not allowed for the signing key.
    """


class Signer:
    """
    Sign outgoing messages with one Ed25519 private key.

    Args:
        private_key: The Ed25519 private key, or the :class:`SigningKey`
            that :func:`~taskmesh.security.load_signing_key` returns.
        key_id: The key id that verifiers know the public key by; it must
            match the key.
        clock: The source of the issue time.
        lifetime: Seconds that a signature stays valid when :meth:`sign` gets
            no ``expires``.

    Raises:
        ValueError: ``key_id`` does not match the key, or ``lifetime`` is not
            positive.
    """

    def __init__(
        self,
        private_key: Ed25519PrivateKey | SigningKey,
        key_id: str,
        clock: IReactorTime,
        *,
        lifetime: float = DEFAULT_LIFETIME,
    ) -> None:
        if isinstance(private_key, SigningKey):
            private_key = private_key.private_key
        actual_id = key_id_of(private_key.public_key())
        if key_id != actual_id:
            raise ValueError(f"key id {key_id!r} does not match the private key ({actual_id})")
        if not math.isfinite(lifetime) or lifetime <= 0:
            raise ValueError(f"invalid signature lifetime {lifetime!r}: must be positive seconds")
        self._private_key = private_key
        self.key_id = key_id
        self._clock = clock
        self._lifetime = lifetime

    def sign(
        self,
        message_headers: Mapping[str, str],
        body: bytes,
        destination: str,
        *,
        expires: float | None = None,
    ) -> dict[str, str]:
        """
        Return a copy of ``message_headers`` with the signature headers added.

        Sign after encoding (and after encrypting, when the body is
        encrypted), with the exact destination of the SEND frame.

        Args:
            message_headers: The headers from :func:`taskmesh._messages.encode`,
                or from :meth:`PayloadCipher.encrypt`.
            body: The body exactly as it will be sent.
            destination: The destination of the SEND frame.
            expires: Unix time in seconds after which the message is invalid;
                by default the issue time plus ``lifetime``. A task's
                ``start_by`` is a good expiry, because no slave may start the
                task later.

        Raises:
            ValueError: a ``task`` message has no ``task`` header, or
                ``expires`` is not later than now.
        """
        if message_headers.get(HEADER_TYPE) == MessageType.TASK.value and not message_headers.get(
            HEADER_TASK
        ):
            raise ValueError(
                "a task message needs the 'task' header, which verifiers check against"
                " the tasks that a key may send"
            )
        now = self._clock.seconds()
        issued = math.floor(now)
        if expires is None:
            expires = now + self._lifetime
        if not math.isfinite(expires) or expires <= now:
            raise ValueError(f"invalid expiry {expires!r}: must be a Unix time after now ({now})")
        expiry = math.ceil(expires)
        nonce = os.urandom(NONCE_SIZE)
        signed = signed_bytes(
            key_id=self.key_id,
            issued=issued,
            expires=expiry,
            nonce=nonce,
            destination=destination,
            headers=message_headers,
            body=body,
        )
        headers = dict(message_headers)
        headers[HEADER_KEY_ID] = self.key_id
        headers[HEADER_ISSUED] = str(issued)
        headers[HEADER_EXPIRES] = str(expiry)
        headers[HEADER_NONCE] = encode_base64url(nonce)
        headers[HEADER_SIGNATURE] = encode_base64url(self._private_key.sign(signed))
        return headers


class _ReplayCache:
    """
    Nonces of accepted messages, each kept until its message expires.
    """

    # NOTE: the cache lives in memory only, so a restarted daemon accepts one
    # more copy of each message that has not expired yet.

    def __init__(self) -> None:
        self._expiry: dict[bytes, float] = {}
        # A heap of (time after which the nonce can be forgotten, nonce).
        # Entries of nonces that were discarded early stay until that time.
        self._queue: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, nonce: bytes) -> bool:
        return nonce in self._expiry

    def add(self, nonce: bytes, forget_after: float) -> None:
        self._expiry[nonce] = forget_after
        heapq.heappush(self._queue, (forget_after, nonce))

    def discard(self, nonce: bytes) -> None:
        self._expiry.pop(nonce, None)

    def evict(self, now: float) -> None:
        while self._queue and self._queue[0][0] < now:
            forget_after, nonce = heapq.heappop(self._queue)
            if self._expiry.get(nonce) == forget_after:
                del self._expiry[nonce]


class Verifier:
    """
    Check the signature headers of received messages.

    Several keys may be trusted at once, so keys can be rotated without
    downtime. Each accepted nonce is remembered until its message expires
    (plus ``max_skew``), so a replayed copy is rejected; after that the copy
    is rejected as expired.

    Args:
        trusted: Key id to :class:`TrustedKey`, or to ``(public key, allowed
            tasks)`` where ``None`` allows every task. A keyring from
            :func:`~taskmesh.security.load_keyring` fits.
        clock: The source of the current time.
        max_skew: Seconds that a signer's clock may be ahead or behind.
        replay_window: The maximum validity (expiry minus issue time) that is
            accepted, in seconds. It bounds how long a nonce is remembered.

    Raises:
        ValueError: no key is trusted, a key id does not match its key, or a
            time is negative.
    """

    def __init__(
        self,
        trusted: Mapping[str, TrustedKey | tuple[Ed25519PublicKey, AbstractSet[str] | None]],
        clock: IReactorTime,
        *,
        max_skew: float = DEFAULT_MAX_SKEW,
        replay_window: float = DEFAULT_REPLAY_WINDOW,
    ) -> None:
        self._trusted = normalize_trusted(trusted)
        if not self._trusted:
            raise ValueError("a verifier needs at least one trusted key")
        if not math.isfinite(max_skew) or max_skew < 0:
            raise ValueError(f"invalid max_skew {max_skew!r}: must be zero or more seconds")
        if not math.isfinite(replay_window) or replay_window <= 0:
            raise ValueError(f"invalid replay_window {replay_window!r}: must be positive seconds")
        self._clock = clock
        self._max_skew = max_skew
        self._replay_window = replay_window
        self._seen = _ReplayCache()

    @property
    def trusted_key_ids(self) -> frozenset[str]:
        """
        Key ids of the trusted keys.
        """
        return frozenset(self._trusted)

    @property
    def remembered_nonces(self) -> int:
        """
        Number of nonces kept for replay detection.
        """
        return len(self._seen)

    def verify(self, headers: Mapping[str, str], body: bytes, destination: str) -> str:
        """
        Check a received message and return the key id that signed it.

        Call it on the raw headers and body of the MESSAGE frame, with the
        frame's ``destination``, before decoding or decrypting. An accepted
        message's nonce is remembered, so the same message is rejected the
        next time; see :meth:`forget`.

        Raises:
            SignatureRejected: the message must be dropped. ``reason`` and
                ``counter_key`` describe why.
        """
        missing = [name for name in SIGNATURE_HEADERS if not headers.get(name)]
        if missing:
            raise SignatureRejected(
                f"unsigned message: missing {', '.join(missing)}", REJECTED_UNSIGNED
            )

        key_id = headers[HEADER_KEY_ID]
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise _malformed(HEADER_KEY_ID, key_id, "16 lowercase hex digits")
        nonce = decode_base64url(headers[HEADER_NONCE], NONCE_SIZE)
        if nonce is None:
            raise _malformed(
                HEADER_NONCE, headers[HEADER_NONCE], f"base64url of {NONCE_SIZE} bytes"
            )
        signature = decode_base64url(headers[HEADER_SIGNATURE], SIGNATURE_SIZE)
        if signature is None:
            raise _malformed(
                HEADER_SIGNATURE, headers[HEADER_SIGNATURE], f"base64url of {SIGNATURE_SIZE} bytes"
            )
        issued = parse_time(headers[HEADER_ISSUED])
        if issued is None:
            raise _malformed(HEADER_ISSUED, headers[HEADER_ISSUED], "decimal Unix seconds")
        expires = parse_time(headers[HEADER_EXPIRES])
        if expires is None:
            raise _malformed(HEADER_EXPIRES, headers[HEADER_EXPIRES], "decimal Unix seconds")

        trusted = self._trusted.get(key_id)
        if trusted is None:
            raise SignatureRejected(f"message signed by unknown key {key_id}", REJECTED_UNKNOWN_KEY)
        signed = signed_bytes(
            key_id=key_id,
            issued=issued,
            expires=expires,
            nonce=nonce,
            destination=destination,
            headers=headers,
            body=body,
        )
        try:
            trusted.public_key.verify(signature, signed)
        except InvalidSignature:
            raise SignatureRejected(
                f"invalid signature from key {key_id} on a message to {destination}:"
                " the message was changed or the signature forged",
                REJECTED_BAD_SIGNATURE,
            ) from None

        self._check_times(key_id, issued, expires)
        self._check_allowed(key_id, trusted, headers)
        if nonce in self._seen:
            raise SignatureRejected(
                f"replayed message: nonce {headers[HEADER_NONCE]} from key {key_id} was"
                " already accepted",
                REJECTED_REPLAY,
            )
        self._seen.add(nonce, expires + self._max_skew)
        return key_id

    def forget(self, headers: Mapping[str, str]) -> None:
        """
        Forget the nonce of an accepted message, so that it is accepted
        again.

        Call it when a message that :meth:`verify` accepted is left
        unacknowledged or is NACKed, so that the broker's redelivery of it is
        not rejected as a replay.
        """
        nonce = decode_base64url(headers.get(HEADER_NONCE, ""), NONCE_SIZE)
        if nonce is not None:
            self._seen.discard(nonce)

    def _check_times(self, key_id: str, issued: int, expires: int) -> None:
        now = self._clock.seconds()
        self._seen.evict(now)
        if expires < issued:
            raise SignatureRejected(
                f"message from key {key_id} expires at {expires}, before its issue time {issued}",
                REJECTED_MALFORMED,
            )
        if expires - issued > self._replay_window:
            raise SignatureRejected(
                f"message from key {key_id} is valid for {expires - issued} s, longer than the"
                f" replay window of {self._replay_window:g} s",
                REJECTED_TOO_LONG,
            )
        if now > expires + self._max_skew:
            raise SignatureRejected(
                f"expired message from key {key_id}: it expired at {expires}, now is"
                f" {now:.0f} (max skew {self._max_skew:g} s)",
                REJECTED_EXPIRED,
            )
        if issued > now + self._max_skew:
            raise SignatureRejected(
                f"message from key {key_id} is not valid yet: issued at {issued}, now is"
                f" {now:.0f} (max skew {self._max_skew:g} s); check the clocks",
                REJECTED_NOT_YET_VALID,
            )

    @staticmethod
    def _check_allowed(key_id: str, trusted: TrustedKey, headers: Mapping[str, str]) -> None:
        kind = headers.get(HEADER_TYPE, "")
        if trusted.types is not None and kind not in trusted.types:
            raise SignatureRejected(
                f"key {key_id} may not sign {kind!r} messages; it may sign"
                f" {', '.join(sorted(trusted.types)) or 'none'}",
                REJECTED_TYPE_NOT_ALLOWED,
            )
        slave_id = headers.get(HEADER_SLAVE_ID)
        allowed_slaves = trusted.slave_ids
        if allowed_slaves is not None and slave_id is not None and slave_id not in allowed_slaves:
            raise SignatureRejected(
                f"key {key_id} may not sign messages of slave {slave_id!r}; it may sign"
                f" for {', '.join(sorted(allowed_slaves)) or 'no slave'}",
                REJECTED_SLAVE_NOT_ALLOWED,
            )
        if kind != MessageType.TASK.value:
            return
        # The decoder checks that this header equals the body's task name, so
        # checking the header here covers the task that would run.
        task = headers.get(HEADER_TASK)
        if not task:
            raise SignatureRejected(
                f"task message from key {key_id} has no 'task' header, so its task cannot"
                " be checked",
                REJECTED_TASK_NOT_ALLOWED,
            )
        if trusted.tasks is not None and task not in trusted.tasks:
            raise SignatureRejected(
                f"key {key_id} may not send task {task!r}", REJECTED_TASK_NOT_ALLOWED
            )


def _malformed(header: str, value: str, expected: str) -> SignatureRejected:
    excerpt = value if len(value) <= 100 else value[:100] + "..."
    return SignatureRejected(
        f"malformed {header} header {excerpt!r}: expected {expected}", REJECTED_MALFORMED
    )

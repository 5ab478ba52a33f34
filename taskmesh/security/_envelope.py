"""
Sealing and opening whole messages: encrypt-then-sign on the way out,
verify-then-decrypt on the way in.

The order matters. The signature covers the ciphertext's digest, so a
receiver checks who sent a message, whether it expired and whether it is a
replay before it spends any work on decryption, and a forged or replayed
ciphertext never reaches AES-GCM. Signing the plaintext instead would leave
the ciphertext and its encryption headers unauthenticated by the sender's
key, and would make every receiver decrypt unverified input first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ._encryption import REJECTED_UNDECRYPTABLE, DecryptionFailed, PayloadCipher, is_encrypted
from ._signing import Signer, Verifier


@dataclass(frozen=True)
class OpenedMessage:
    """
    A received message that passed :func:`open_message`.

    ``headers`` and ``body`` are ready for :func:`taskmesh._messages.decode`.
    ``key_id`` names the key that signed the message, and ``encrypted`` is
    true when its body arrived encrypted.
    """

    key_id: str
    headers: dict[str, str]
    body: bytes
    encrypted: bool


def seal_message(
    headers: Mapping[str, str],
    body: bytes,
    destination: str,
    signer: Signer,
    cipher: PayloadCipher | None = None,
    *,
    expires: float | None = None,
) -> tuple[dict[str, str], bytes]:
    """
    Encrypt (when ``cipher`` is given) and then sign an encoded message.

    Args:
        headers: The headers from :func:`taskmesh._messages.encode`.
        body: The body from :func:`taskmesh._messages.encode`.
        destination: The destination of the SEND frame.
        signer: The sender's signer.
        cipher: The payload cipher, or ``None`` to send the body in clear.
        expires: Passed to :meth:`Signer.sign`.

    Returns:
        The headers and the body to send.
    """
    if cipher is not None:
        headers, body = cipher.encrypt(headers, body, destination)
    return signer.sign(headers, body, destination, expires=expires), body


def open_message(
    headers: Mapping[str, str],
    body: bytes,
    destination: str,
    verifier: Verifier,
    cipher: PayloadCipher | None = None,
    *,
    require_encryption: bool = False,
) -> OpenedMessage:
    """
    Verify and then decrypt (when the body is encrypted) a received message.

    Args:
        headers: The headers of the MESSAGE frame.
        body: The body of the MESSAGE frame.
        destination: The ``destination`` of the MESSAGE frame.
        verifier: The receiver's verifier.
        cipher: The payload cipher, or ``None`` when no payload key is set.
        require_encryption: Reject messages whose body is not encrypted.

    Raises:
        SignatureRejected: the signature check failed.
        DecryptionFailed: the body is encrypted but cannot be decrypted, or
            it is in clear although ``require_encryption`` is set.
    """
    key_id = verifier.verify(headers, body, destination)
    encrypted = is_encrypted(headers)
    if encrypted or require_encryption:
        if cipher is None:
            raise DecryptionFailed(
                f"message to {destination} from key {key_id} is encrypted, but no payload key"
                " is configured",
                REJECTED_UNDECRYPTABLE,
            )
        opened_headers, body = cipher.decrypt(headers, body, destination)
    else:
        opened_headers = dict(headers)
    return OpenedMessage(key_id, opened_headers, body, encrypted)

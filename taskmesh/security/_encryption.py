"""
AES-256-GCM encryption of message bodies, for deployments where not every
broker connection uses TLS.

Only the body is encrypted. Headers, including the message type, the
``request_id``, the task name and the ``slave_id``, stay readable, because
the broker and the verifier need them.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._messages import CONTENT_TYPE, HEADER_CONTENT_TYPE
from ._canonical import (
    ENCRYPTED_CONTENT_TYPE,
    HEADER_ENCRYPTION_KEY_ID,
    HEADER_ENCRYPTION_NONCE,
    associated_data,
    decode_base64url,
    encode_base64url,
)
from ._keys import KEY_ID_PATTERN, SymmetricKey
from ._signing import MessageRejected

# AES-GCM nonces are 96 bits. For up to 2**32 messages under one key, the
# chance that two random nonces repeat, which breaks GCM, stays below 2**-32.
# Rotate the key long before that many messages.
GCM_NONCE_SIZE = 12

REJECTED_UNENCRYPTED = "rejected_unencrypted"
REJECTED_MALFORMED_ENCRYPTION = "rejected_malformed_encryption"
REJECTED_UNKNOWN_ENCRYPTION_KEY = "rejected_unknown_encryption_key"
REJECTED_UNDECRYPTABLE = "rejected_undecryptable"


class DecryptionFailed(MessageRejected):
    """
    An encrypted message that cannot be decrypted, or a plaintext message
    where encryption is required.
    """


def is_encrypted(headers: Mapping[str, str]) -> bool:
    """
    Return whether a message's body is encrypted, by its ``content-type``.
    """
    return headers.get(HEADER_CONTENT_TYPE) == ENCRYPTED_CONTENT_TYPE


class PayloadCipher:
    """
    Encrypt bodies with one payload key and decrypt them with any of several.

    Args:
        key: The key that :meth:`encrypt` uses, which :meth:`decrypt` also accepts.
        decryption_keys: Further keys that :meth:`decrypt` accepts, for
            example the previous key while all daemons move to a new one.
    """

    def __init__(self, key: SymmetricKey, *, decryption_keys: Iterable[SymmetricKey] = ()) -> None:
        self.key_id = key.key_id
        self._encryptor = AESGCM(key.key)
        self._decryptors = {key.key_id: self._encryptor}
        for extra in decryption_keys:
            self._decryptors.setdefault(extra.key_id, AESGCM(extra.key))

    @property
    def decryption_key_ids(self) -> frozenset[str]:
        """
        Key ids of the keys that :meth:`decrypt` accepts.
        """
        return frozenset(self._decryptors)

    def encrypt(
        self, headers: Mapping[str, str], body: bytes, destination: str
    ) -> tuple[dict[str, str], bytes]:
        """
        Encrypt a body and return the new headers and the ciphertext.

        The headers get ``content-type: application/vnd.taskmesh.encrypted``,
        the key id and the random nonce. The destination and the message's
        identifying headers are bound to the ciphertext as associated data, so
        a ciphertext moved to another message does not decrypt. Sign the
        result afterwards.

        Raises:
            ValueError: the body is already encrypted.
        """
        if is_encrypted(headers):
            raise ValueError("the body is already encrypted")
        encrypted_headers = dict(headers)
        encrypted_headers[HEADER_CONTENT_TYPE] = ENCRYPTED_CONTENT_TYPE
        encrypted_headers[HEADER_ENCRYPTION_KEY_ID] = self.key_id
        nonce = os.urandom(GCM_NONCE_SIZE)
        encrypted_headers[HEADER_ENCRYPTION_NONCE] = encode_base64url(nonce)
        ciphertext = self._encryptor.encrypt(
            nonce, body, associated_data(destination, encrypted_headers)
        )
        return encrypted_headers, ciphertext

    def decrypt(
        self, headers: Mapping[str, str], body: bytes, destination: str
    ) -> tuple[dict[str, str], bytes]:
        """
        Decrypt a body from :meth:`encrypt` and return the headers and body
        as they were before encryption.

        Raises:
            DecryptionFailed: the body is not encrypted, the key is unknown,
                or the ciphertext, its nonce or its associated data were
                changed.
        """
        if not is_encrypted(headers):
            raise DecryptionFailed(
                f"message to {destination} is not encrypted (content-type"
                f" {headers.get(HEADER_CONTENT_TYPE)!r}), but encryption is required",
                REJECTED_UNENCRYPTED,
            )
        key_id = headers.get(HEADER_ENCRYPTION_KEY_ID, "")
        if not KEY_ID_PATTERN.fullmatch(key_id):
            raise DecryptionFailed(
                f"encrypted message has a missing or malformed {HEADER_ENCRYPTION_KEY_ID}"
                f" header {key_id[:100]!r}",
                REJECTED_MALFORMED_ENCRYPTION,
            )
        nonce_text = headers.get(HEADER_ENCRYPTION_NONCE, "")
        nonce = decode_base64url(nonce_text, GCM_NONCE_SIZE)
        if nonce is None:
            raise DecryptionFailed(
                f"encrypted message has a missing or malformed {HEADER_ENCRYPTION_NONCE}"
                f" header {nonce_text[:100]!r}",
                REJECTED_MALFORMED_ENCRYPTION,
            )
        decryptor = self._decryptors.get(key_id)
        if decryptor is None:
            raise DecryptionFailed(
                f"message encrypted with unknown payload key {key_id}",
                REJECTED_UNKNOWN_ENCRYPTION_KEY,
            )
        try:
            plaintext = decryptor.decrypt(nonce, body, associated_data(destination, headers))
        except InvalidTag:
            raise DecryptionFailed(
                f"cannot decrypt a message to {destination} with payload key {key_id}: the"
                " ciphertext or its headers were changed",
                REJECTED_UNDECRYPTABLE,
            ) from None
        plain_headers = dict(headers)
        plain_headers[HEADER_CONTENT_TYPE] = CONTENT_TYPE
        del plain_headers[HEADER_ENCRYPTION_KEY_ID]
        del plain_headers[HEADER_ENCRYPTION_NONCE]
        return plain_headers, plaintext

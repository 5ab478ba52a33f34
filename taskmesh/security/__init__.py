"""
Signed and optionally encrypted taskmesh messages, and their key files.

A sender encodes a message with :func:`taskmesh._messages.encode`, then
passes the headers and body through :func:`seal_message` (or
:meth:`PayloadCipher.encrypt` and :meth:`Signer.sign`) with the destination
of the SEND frame. A receiver passes the raw headers, body and destination of
the MESSAGE frame through :func:`open_message` (or :meth:`Verifier.verify`
and :meth:`PayloadCipher.decrypt`) and decodes only what comes out. A
:class:`MessageRejected` from there means: count ``counter_key``, log
``reason``, acknowledge the message and send no reply, because the sender is
not known. ``docs/security.md`` describes the headers, the signed bytes and
the threat model.

NOTE: the master and slave daemons do not call this package yet.
"""

from ._canonical import (
    ENCRYPTED_CONTENT_TYPE,
    HEADER_ENCRYPTION_KEY_ID,
    HEADER_ENCRYPTION_NONCE,
    HEADER_EXPIRES,
    HEADER_ISSUED,
    HEADER_KEY_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    signed_bytes,
)
from ._encryption import (
    REJECTED_MALFORMED_ENCRYPTION,
    REJECTED_UNDECRYPTABLE,
    REJECTED_UNENCRYPTED,
    REJECTED_UNKNOWN_ENCRYPTION_KEY,
    DecryptionFailed,
    PayloadCipher,
    is_encrypted,
)
from ._envelope import OpenedMessage, open_message, seal_message
from ._keys import (
    KeyFileError,
    SigningKey,
    SymmetricKey,
    TrustedKey,
    key_id_of,
    load_keyring,
    load_public_key,
    load_signing_key,
    load_symmetric_key,
)
from ._signing import (
    DEFAULT_LIFETIME,
    DEFAULT_MAX_SKEW,
    DEFAULT_REPLAY_WINDOW,
    REJECTED_BAD_SIGNATURE,
    REJECTED_EXPIRED,
    REJECTED_MALFORMED,
    REJECTED_NOT_YET_VALID,
    REJECTED_REPLAY,
    REJECTED_SLAVE_NOT_ALLOWED,
    REJECTED_TASK_NOT_ALLOWED,
    REJECTED_TOO_LONG,
    REJECTED_TYPE_NOT_ALLOWED,
    REJECTED_UNKNOWN_KEY,
    REJECTED_UNSIGNED,
    MessageRejected,
    SignatureRejected,
    Signer,
    Verifier,
)

# Every counter key that MessageRejected.counter_key can take, so a daemon
# can start its counters at zero.
REJECTION_COUNTERS = (
    REJECTED_UNSIGNED,
    REJECTED_MALFORMED,
    REJECTED_UNKNOWN_KEY,
    REJECTED_BAD_SIGNATURE,
    REJECTED_EXPIRED,
    REJECTED_NOT_YET_VALID,
    REJECTED_TOO_LONG,
    REJECTED_REPLAY,
    REJECTED_TYPE_NOT_ALLOWED,
    REJECTED_TASK_NOT_ALLOWED,
    REJECTED_SLAVE_NOT_ALLOWED,
    REJECTED_UNENCRYPTED,
    REJECTED_MALFORMED_ENCRYPTION,
    REJECTED_UNKNOWN_ENCRYPTION_KEY,
    REJECTED_UNDECRYPTABLE,
)

__all__ = [
    "DEFAULT_LIFETIME",
    "DEFAULT_MAX_SKEW",
    "DEFAULT_REPLAY_WINDOW",
    "ENCRYPTED_CONTENT_TYPE",
    "HEADER_ENCRYPTION_KEY_ID",
    "HEADER_ENCRYPTION_NONCE",
    "HEADER_EXPIRES",
    "HEADER_ISSUED",
    "HEADER_KEY_ID",
    "HEADER_NONCE",
    "HEADER_SIGNATURE",
    "REJECTED_BAD_SIGNATURE",
    "REJECTED_EXPIRED",
    "REJECTED_MALFORMED",
    "REJECTED_MALFORMED_ENCRYPTION",
    "REJECTED_NOT_YET_VALID",
    "REJECTED_REPLAY",
    "REJECTED_SLAVE_NOT_ALLOWED",
    "REJECTED_TASK_NOT_ALLOWED",
    "REJECTED_TOO_LONG",
    "REJECTED_TYPE_NOT_ALLOWED",
    "REJECTED_UNDECRYPTABLE",
    "REJECTED_UNENCRYPTED",
    "REJECTED_UNKNOWN_ENCRYPTION_KEY",
    "REJECTED_UNKNOWN_KEY",
    "REJECTED_UNSIGNED",
    "REJECTION_COUNTERS",
    "DecryptionFailed",
    "KeyFileError",
    "MessageRejected",
    "OpenedMessage",
    "PayloadCipher",
    "SignatureRejected",
    "Signer",
    "SigningKey",
    "SymmetricKey",
    "TrustedKey",
    "Verifier",
    "is_encrypted",
    "key_id_of",
    "load_keyring",
    "load_public_key",
    "load_signing_key",
    "load_symmetric_key",
    "open_message",
    "seal_message",
    "signed_bytes",
]

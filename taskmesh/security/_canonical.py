"""
Header names and the canonical byte strings that are signed and used as
associated data.

Every field of a canonical byte string is encoded the same way, so no two
different messages produce the same bytes:

- an absent field is the single byte ``0x00``;
- a present field is the byte ``0x01``, its length in bytes as a 4-byte
  unsigned big-endian integer, then its bytes (text in UTF-8).

The fields follow each other in a fixed order, with no separators. The first
field is a context label that differs between signatures and associated
data, so bytes made for one purpose never verify for the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from typing import Mapping, Sequence

from .._messages import (
    HEADER_CONTENT_TYPE,
    HEADER_REPLY_TO,
    HEADER_REQUEST_ID,
    HEADER_SLAVE_ID,
    HEADER_TASK,
    HEADER_TYPE,
)

HEADER_SIGNATURE = "taskmesh-signature"
HEADER_KEY_ID = "taskmesh-key-id"
HEADER_NONCE = "taskmesh-nonce"
HEADER_ISSUED = "taskmesh-issued"
HEADER_EXPIRES = "taskmesh-expires"
HEADER_ENCRYPTION_KEY_ID = "taskmesh-encryption-key-id"
HEADER_ENCRYPTION_NONCE = "taskmesh-encryption-nonce"

SIGNATURE_HEADERS = (
    HEADER_SIGNATURE,
    HEADER_KEY_ID,
    HEADER_NONCE,
    HEADER_ISSUED,
    HEADER_EXPIRES,
)

ENCRYPTED_CONTENT_TYPE = "application/vnd.taskmesh.encrypted"

SIGNATURE_CONTEXT = b"taskmesh signed message v1"
ASSOCIATED_DATA_CONTEXT = b"taskmesh encrypted payload v1"

# Message headers covered by the signature, in this order, after the
# signature's own fields and the destination.
SIGNED_HEADERS = (
    HEADER_TYPE,
    HEADER_REQUEST_ID,
    HEADER_TASK,
    HEADER_SLAVE_ID,
    HEADER_REPLY_TO,
    HEADER_CONTENT_TYPE,
    HEADER_ENCRYPTION_KEY_ID,
    HEADER_ENCRYPTION_NONCE,
)

# Message headers bound to an encrypted body as associated data, in this
# order, after the destination.
ASSOCIATED_HEADERS = (
    HEADER_TYPE,
    HEADER_REQUEST_ID,
    HEADER_TASK,
    HEADER_SLAVE_ID,
    HEADER_REPLY_TO,
    HEADER_ENCRYPTION_KEY_ID,
)

NONCE_SIZE = 16
SIGNATURE_SIZE = 64

# Unix times up to 12 decimal digits (the year 33658), without a sign or
# leading zeros, so each time has exactly one text form.
_TIME_PATTERN = re.compile(r"0|[1-9][0-9]{0,11}")
_BASE64URL_PATTERN = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _field(value: bytes | None) -> bytes:
    if value is None:
        return b"\x00"
    return b"\x01" + struct.pack(">I", len(value)) + value


def _header_fields(headers: Mapping[str, str], names: Sequence[str]) -> list[bytes | None]:
    fields: list[bytes | None] = []
    for name in names:
        value = headers.get(name)
        fields.append(None if value is None else value.encode("utf-8", "surrogatepass"))
    return fields


def signed_bytes(
    *,
    key_id: str,
    issued: int,
    expires: int,
    nonce: bytes,
    destination: str,
    headers: Mapping[str, str],
    body: bytes,
) -> bytes:
    """
    Build the byte string that a signature covers.

    The fields, in order, are the context ``taskmesh signed message v1``, the
    key id, the issue time and the expiry (decimal Unix seconds), and the 16
    raw nonce bytes. Then follow the destination, the headers of
    :data:`SIGNED_HEADERS` (each absent or present), and the 32-byte SHA-256
    digest of the body.
    """
    fields: list[bytes | None] = [
        SIGNATURE_CONTEXT,
        key_id.encode("ascii"),
        str(issued).encode("ascii"),
        str(expires).encode("ascii"),
        nonce,
        destination.encode("utf-8", "surrogatepass"),
        *_header_fields(headers, SIGNED_HEADERS),
        hashlib.sha256(body).digest(),
    ]
    return b"".join(_field(value) for value in fields)


def associated_data(destination: str, headers: Mapping[str, str]) -> bytes:
    """
    Build the associated data of an encrypted body.

    The fields, in order: the context ``taskmesh encrypted payload v1``, the
    destination and the headers of :data:`ASSOCIATED_HEADERS`.
    """
    fields: list[bytes | None] = [
        ASSOCIATED_DATA_CONTEXT,
        destination.encode("utf-8", "surrogatepass"),
        *_header_fields(headers, ASSOCIATED_HEADERS),
    ]
    return b"".join(_field(value) for value in fields)


def encode_base64url(data: bytes) -> str:
    """
    Encode bytes as padded base64url, which needs no STOMP escaping.
    """
    return base64.urlsafe_b64encode(data).decode("ascii")


def decode_base64url(text: str, size: int) -> bytes | None:
    """
    Decode padded base64url text of exactly ``size`` bytes.

    Return ``None`` unless ``text`` is the one canonical encoding of
    ``size`` bytes, so no two header values decode to the same bytes.
    """
    if not _BASE64URL_PATTERN.fullmatch(text):
        return None
    try:
        data = base64.urlsafe_b64decode(text)
    except (binascii.Error, ValueError):
        return None
    if len(data) != size or encode_base64url(data) != text:
        return None
    return data


def parse_time(text: str) -> int | None:
    """
    Parse a decimal Unix time in seconds, or return ``None`` if it is not one.
    """
    if not _TIME_PATTERN.fullmatch(text):
        return None
    return int(text)

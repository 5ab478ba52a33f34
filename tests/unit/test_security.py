"""
Tests for signed and encrypted messages, key files and ``taskmesh-keygen``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock

from taskmesh import _keygen
from taskmesh._messages import (
    AcceptedMessage,
    Announcement,
    CancelMessage,
    DiscoverMessage,
    ErrorMessage,
    Message,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
)
from taskmesh.security import (
    ENCRYPTED_CONTENT_TYPE,
    HEADER_ENCRYPTION_KEY_ID,
    HEADER_ENCRYPTION_NONCE,
    HEADER_EXPIRES,
    HEADER_ISSUED,
    HEADER_KEY_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    REJECTED_BAD_SIGNATURE,
    REJECTED_EXPIRED,
    REJECTED_MALFORMED,
    REJECTED_MALFORMED_ENCRYPTION,
    REJECTED_NOT_YET_VALID,
    REJECTED_REPLAY,
    REJECTED_SLAVE_NOT_ALLOWED,
    REJECTED_TASK_NOT_ALLOWED,
    REJECTED_TOO_LONG,
    REJECTED_TYPE_NOT_ALLOWED,
    REJECTED_UNDECRYPTABLE,
    REJECTED_UNENCRYPTED,
    REJECTED_UNKNOWN_ENCRYPTION_KEY,
    REJECTED_UNKNOWN_KEY,
    REJECTED_UNSIGNED,
    REJECTION_COUNTERS,
    DecryptionFailed,
    KeyFileError,
    MessageRejected,
    PayloadCipher,
    SignatureRejected,
    Signer,
    SigningKey,
    SymmetricKey,
    TrustedKey,
    Verifier,
    key_id_of,
    load_keyring,
    load_public_key,
    load_signing_key,
    load_symmetric_key,
    open_message,
    seal_message,
    signed_bytes,
)
from taskmesh.security._canonical import SIGNATURE_HEADERS, encode_base64url
from taskmesh.security._keys import (
    generate_signing_key,
    generate_symmetric_key,
    private_key_pem,
    public_key_base64,
    public_key_pem,
)

REQUEST_ID = "0b6f4f1e-8a51-4c55-9a3c-5d1f6a2b9e10"
OTHER_REQUEST_ID = "6a1c4d70-3e7b-4f6e-b1f4-0c2d9e8a7b55"
TASKS = "/topic/myapp.tasks"
REPLY = "/queue/myapp.reply"
NOW = 1_750_000_000.0

# Header values must survive STOMP 1.0 to 1.2 unescaped: no backslash, colon,
# carriage return or line feed, and only printable ASCII.
STOMP_SAFE = re.compile(r"[A-Za-z0-9_=-]+")


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


@pytest.fixture
def master_key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture
def signer(master_key: SigningKey, clock: Clock) -> Signer:
    return Signer(master_key.private_key, master_key.key_id, clock)


@pytest.fixture
def verifier(master_key: SigningKey, clock: Clock) -> Verifier:
    return Verifier({master_key.key_id: (master_key.private_key.public_key(), None)}, clock)


def task_message(task: str = "sleep", request_id: str = REQUEST_ID) -> Message:
    return TaskMessage(request_id, task, {"seconds": 3}, REPLY)


def signed_task(
    signer: Signer, task: str = "sleep", destination: str = TASKS
) -> tuple[dict[str, str], bytes]:
    headers, body = encode(task_message(task))
    return signer.sign(headers, body, destination), body


def rejection(
    verifier: Verifier, headers: dict[str, str], body: bytes, destination: str = TASKS
) -> SignatureRejected:
    with pytest.raises(SignatureRejected) as caught:
        verifier.verify(headers, body, destination)
    return caught.value


def without_signature(headers: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name not in SIGNATURE_HEADERS}


def write_file(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


# Signing and verifying


ALL_MESSAGES: list[Message] = [
    task_message(),
    TaskMessage(REQUEST_ID, "echo", {}, REPLY, 1_750_000_100.5),
    ProgressMessage(REQUEST_ID, "b1", 40.0, "halfway"),
    ResultMessage(REQUEST_ID, "b1", {"slept": 3}),
    ErrorMessage(REQUEST_ID, "b1", "UnknownTask", "no such task"),
    Announcement("b1", SlaveState.ALIVE, ("sleep",), 10.0, "b.example", 42, {"role": "db"}),
    DiscoverMessage(),
    AcceptedMessage(REQUEST_ID, "b1", 2, True),
    CancelMessage(REQUEST_ID, "stopped by the operator"),
]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(
    message: Message, signer: Signer, verifier: Verifier, master_key: SigningKey
) -> None:
    headers, body = encode(message)
    signed = signer.sign(headers, body, TASKS)

    assert verifier.verify(signed, body, TASKS) == master_key.key_id
    assert decode(signed, body) == message


def test_sign_adds_stomp_safe_headers(signer: Signer, master_key: SigningKey) -> None:
    headers, body = encode(task_message())
    signed = signer.sign(headers, body, TASKS)

    for name in SIGNATURE_HEADERS:
        assert STOMP_SAFE.fullmatch(signed[name]), (name, signed[name])
    assert signed[HEADER_KEY_ID] == master_key.key_id
    assert signed[HEADER_ISSUED] == str(int(NOW))
    assert signed[HEADER_EXPIRES] == str(int(NOW) + 300)
    assert len(base64.urlsafe_b64decode(signed[HEADER_NONCE])) == 16
    assert without_signature(signed) == headers


def test_sign_leaves_input_headers_alone(signer: Signer) -> None:
    headers, body = encode(task_message())
    original = dict(headers)
    signer.sign(headers, body, TASKS)
    assert headers == original


def test_sign_uses_fresh_nonce_each_time(signer: Signer) -> None:
    first, _ = signed_task(signer)
    second, _ = signed_task(signer)
    assert first[HEADER_NONCE] != second[HEADER_NONCE]


def test_sign_with_explicit_expiry(signer: Signer, verifier: Verifier, clock: Clock) -> None:
    headers, body = encode(task_message())
    signed = signer.sign(headers, body, TASKS, expires=NOW + 3600.5)

    assert signed[HEADER_EXPIRES] == str(int(NOW) + 3601)
    clock.advance(3000)
    verifier.verify(signed, body, TASKS)


@pytest.mark.parametrize("expires", [NOW, NOW - 1, float("nan"), float("inf")])
def test_sign_rejects_expiry_not_after_now(signer: Signer, expires: float) -> None:
    headers, body = encode(task_message())
    with pytest.raises(ValueError, match="invalid expiry"):
        signer.sign(headers, body, TASKS, expires=expires)


def test_sign_requires_task_header_on_task(signer: Signer) -> None:
    headers, body = encode(task_message())
    del headers["task"]
    with pytest.raises(ValueError, match="'task' header"):
        signer.sign(headers, body, TASKS)


def test_signer_rejects_wrong_key_id(master_key: SigningKey, clock: Clock) -> None:
    with pytest.raises(ValueError, match="does not match the private key"):
        Signer(master_key.private_key, "0" * 16, clock)


def test_signer_accepts_signing_key(
    master_key: SigningKey, clock: Clock, verifier: Verifier
) -> None:
    signer = Signer(master_key, master_key.key_id, clock)
    headers, body = signed_task(signer)
    assert verifier.verify(headers, body, TASKS) == master_key.key_id


def test_signed_bytes_layout() -> None:
    headers = {"taskmesh-type": "task", "request_id": REQUEST_ID, "task": "sleep"}
    signed = signed_bytes(
        key_id="0123456789abcdef",
        issued=10,
        expires=20,
        nonce=b"n" * 16,
        destination=TASKS,
        headers=headers,
        body=b"{}",
    )

    def present(value: bytes) -> bytes:
        return b"\x01" + len(value).to_bytes(4, "big") + value

    expected = b"".join(
        [
            present(b"taskmesh signed message v1"),
            present(b"0123456789abcdef"),
            present(b"10"),
            present(b"20"),
            present(b"n" * 16),
            present(TASKS.encode()),
            present(b"task"),
            present(REQUEST_ID.encode()),
            present(b"sleep"),
            b"\x00",  # slave_id
            b"\x00",  # reply-to
            b"\x00",  # content-type
            b"\x00",  # taskmesh-encryption-key-id
            b"\x00",  # taskmesh-encryption-nonce
            present(hashlib.sha256(b"{}").digest()),
        ]
    )
    assert signed == expected


def test_signed_bytes_absent_differs_from_empty() -> None:
    def sign_headers(headers: dict[str, str]) -> bytes:
        return signed_bytes(
            key_id="0123456789abcdef",
            issued=1,
            expires=2,
            nonce=b"n" * 16,
            destination=TASKS,
            headers=headers,
            body=b"",
        )

    assert sign_headers({}) != sign_headers({"task": ""})


# Rejections


@pytest.mark.parametrize("name", SIGNATURE_HEADERS)
def test_verify_rejects_missing_header(signer: Signer, verifier: Verifier, name: str) -> None:
    headers, body = signed_task(signer)
    del headers[name]

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_UNSIGNED
    assert name in error.reason


def test_verify_rejects_unsigned_message(verifier: Verifier) -> None:
    headers, body = encode(task_message())
    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_UNSIGNED
    assert error.reason.startswith("unsigned message: missing taskmesh-signature")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (HEADER_KEY_ID, "0123456789ABCDEF"),
        (HEADER_KEY_ID, "0123"),
        (HEADER_NONCE, "not base64!"),
        (HEADER_NONCE, encode_base64url(b"x" * 15)),
        (HEADER_NONCE, encode_base64url(b"x" * 16).rstrip("=")),
        (HEADER_SIGNATURE, encode_base64url(b"x" * 63)),
        (HEADER_SIGNATURE, "a" * 88),
        (HEADER_ISSUED, "-1"),
        (HEADER_ISSUED, "1e9"),
        (HEADER_ISSUED, "01750000000"),
        (HEADER_EXPIRES, "1750000300.0"),
        (HEADER_EXPIRES, "1750000300\n"),
        (HEADER_EXPIRES, "9" * 13),
    ],
)
def test_verify_rejects_malformed_header(
    signer: Signer, verifier: Verifier, name: str, value: str
) -> None:
    headers, body = signed_task(signer)
    headers[name] = value

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_MALFORMED
    assert name in error.reason


def test_verify_rejects_unknown_key(verifier: Verifier, clock: Clock) -> None:
    stranger = generate_signing_key()
    headers, body = signed_task(Signer(stranger.private_key, stranger.key_id, clock))

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_UNKNOWN_KEY
    assert stranger.key_id in error.reason


def test_verify_rejects_forged_signature(signer: Signer, verifier: Verifier) -> None:
    headers, body = signed_task(signer)
    headers[HEADER_SIGNATURE] = encode_base64url(os.urandom(64))

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_BAD_SIGNATURE


def test_verify_rejects_other_key_under_trusted_id(
    verifier: Verifier, master_key: SigningKey, clock: Clock
) -> None:
    # An attacker signs with their own key but names the master's key id.
    attacker = Ed25519PrivateKey.generate()
    headers, body = encode(task_message())
    signed = signer_with_fake_id(attacker, master_key.key_id, clock).sign(headers, body, TASKS)

    error = rejection(verifier, signed, body)
    assert error.counter_key == REJECTED_BAD_SIGNATURE


def signer_with_fake_id(private_key: Ed25519PrivateKey, key_id: str, clock: Clock) -> Signer:
    signer = Signer(private_key, key_id_of(private_key.public_key()), clock)
    signer.key_id = key_id
    return signer


def test_verify_rejects_tampered_body(signer: Signer, verifier: Verifier) -> None:
    headers, body = signed_task(signer)
    tampered = body.replace(b'"seconds":3', b'"seconds":9')
    assert tampered != body

    error = rejection(verifier, headers, tampered)
    assert error.counter_key == REJECTED_BAD_SIGNATURE


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("request_id", OTHER_REQUEST_ID),
        ("task", "reboot"),
        ("taskmesh-type", "cancel"),
        ("reply-to", "/queue/attacker.reply"),
        ("slave_id", "b2"),
        ("content-type", "text/plain"),
        (HEADER_ISSUED, str(int(NOW) - 1)),
        (HEADER_EXPIRES, str(int(NOW) + 301)),
        (HEADER_NONCE, encode_base64url(b"z" * 16)),
    ],
)
def test_verify_rejects_tampered_header(
    signer: Signer, verifier: Verifier, name: str, value: str
) -> None:
    headers, body = signed_task(signer)
    assert headers.get(name) != value
    headers[name] = value

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_BAD_SIGNATURE


@pytest.mark.parametrize(
    "name", ["request_id", "task", "taskmesh-type", "reply-to", "content-type"]
)
def test_verify_rejects_removed_header(signer: Signer, verifier: Verifier, name: str) -> None:
    headers, body = signed_task(signer)
    del headers[name]

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_BAD_SIGNATURE


def test_verify_rejects_other_destination(signer: Signer, verifier: Verifier) -> None:
    headers, body = signed_task(signer, destination=TASKS)

    error = rejection(verifier, headers, body, destination="/queue/myapp.slave.b1")
    assert error.counter_key == REJECTED_BAD_SIGNATURE
    assert "/queue/myapp.slave.b1" in error.reason


def test_verify_ignores_broker_headers(
    signer: Signer, verifier: Verifier, master_key: SigningKey
) -> None:
    headers, body = signed_task(signer)
    headers.update(
        {
            "message-id": "ID:broker-1",
            "subscription": "tasks",
            "expires": "0",
            "timestamp": "1750000000000",
            "priority": "4",
            "redelivered": "false",
            "content-length": str(len(body)),
        }
    )
    assert verifier.verify(headers, body, TASKS) == master_key.key_id


def test_verify_rejects_replay(signer: Signer, verifier: Verifier) -> None:
    headers, body = signed_task(signer)
    verifier.verify(headers, body, TASKS)

    error = rejection(verifier, dict(headers), body)
    assert error.counter_key == REJECTED_REPLAY
    assert headers[HEADER_NONCE] in error.reason


def test_verify_rejects_replay_with_other_broker_headers(
    signer: Signer, verifier: Verifier
) -> None:
    headers, body = signed_task(signer)
    verifier.verify(headers, body, TASKS)

    copy = dict(headers, **{"message-id": "ID:other", "redelivered": "true"})
    assert rejection(verifier, copy, body).counter_key == REJECTED_REPLAY


def test_forget_allows_redelivery(signer: Signer, verifier: Verifier) -> None:
    headers, body = signed_task(signer)
    verifier.verify(headers, body, TASKS)
    verifier.forget(headers)

    verifier.verify(headers, body, TASKS)
    assert rejection(verifier, headers, body).counter_key == REJECTED_REPLAY


def test_forget_ignores_malformed_nonce(verifier: Verifier) -> None:
    verifier.forget({HEADER_NONCE: "junk"})
    verifier.forget({})


def test_rejected_message_leaves_nonce_unused(signer: Signer, verifier: Verifier) -> None:
    headers, body = signed_task(signer)
    rejection(verifier, headers, body + b" ")

    verifier.verify(headers, body, TASKS)


def test_verify_rejects_expired(signer: Signer, verifier: Verifier, clock: Clock) -> None:
    headers, body = signed_task(signer)
    clock.advance(300 + 60 + 1)

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_EXPIRED
    assert headers[HEADER_EXPIRES] in error.reason


def test_verify_accepts_expired_within_skew(
    signer: Signer, verifier: Verifier, clock: Clock
) -> None:
    headers, body = signed_task(signer)
    clock.advance(300 + 60)

    verifier.verify(headers, body, TASKS)


def test_verify_rejects_not_yet_valid(master_key: SigningKey, verifier: Verifier) -> None:
    ahead = Clock()
    ahead.advance(NOW + 61)
    headers, body = signed_task(Signer(master_key.private_key, master_key.key_id, ahead))

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_NOT_YET_VALID
    assert "check the clocks" in error.reason


def test_verify_accepts_future_within_skew(master_key: SigningKey, verifier: Verifier) -> None:
    ahead = Clock()
    ahead.advance(NOW + 60)
    headers, body = signed_task(Signer(master_key.private_key, master_key.key_id, ahead))

    verifier.verify(headers, body, TASKS)


def test_verify_honours_custom_skew(master_key: SigningKey, signer: Signer, clock: Clock) -> None:
    strict = Verifier(
        {master_key.key_id: (master_key.private_key.public_key(), None)}, clock, max_skew=0
    )
    headers, body = signed_task(signer)
    clock.advance(301)

    assert rejection(strict, headers, body).counter_key == REJECTED_EXPIRED


def test_verify_rejects_validity_longer_than_window(
    master_key: SigningKey, signer: Signer, clock: Clock
) -> None:
    short = Verifier(
        {master_key.key_id: (master_key.private_key.public_key(), None)}, clock, replay_window=600
    )
    headers, body = encode(task_message())
    signed = signer.sign(headers, body, TASKS, expires=NOW + 601)

    error = rejection(short, signed, body)
    assert error.counter_key == REJECTED_TOO_LONG
    assert "replay window of 600 s" in error.reason


def test_verify_rejects_expiry_before_issue(master_key: SigningKey, verifier: Verifier) -> None:
    headers, body = encode(task_message())
    nonce = os.urandom(16)
    issued, expires = int(NOW), int(NOW) - 10
    signature = master_key.private_key.sign(
        signed_bytes(
            key_id=master_key.key_id,
            issued=issued,
            expires=expires,
            nonce=nonce,
            destination=TASKS,
            headers=headers,
            body=body,
        )
    )
    headers.update(
        {
            HEADER_KEY_ID: master_key.key_id,
            HEADER_ISSUED: str(issued),
            HEADER_EXPIRES: str(expires),
            HEADER_NONCE: encode_base64url(nonce),
            HEADER_SIGNATURE: encode_base64url(signature),
        }
    )

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_MALFORMED
    assert "before its issue time" in error.reason


def test_replay_cache_forgets_expired_nonces(
    signer: Signer, verifier: Verifier, clock: Clock
) -> None:
    for _ in range(5):
        headers, body = signed_task(signer)
        verifier.verify(headers, body, TASKS)
    assert verifier.remembered_nonces == 5

    clock.advance(300 + 60 + 1)
    headers, body = signed_task(signer)
    verifier.verify(headers, body, TASKS)
    assert verifier.remembered_nonces == 1


def test_replay_after_eviction_is_expired(signer: Signer, verifier: Verifier, clock: Clock) -> None:
    old_headers, old_body = signed_task(signer)
    verifier.verify(old_headers, old_body, TASKS)
    clock.advance(300 + 60 + 1)
    new_headers, new_body = signed_task(signer)
    verifier.verify(new_headers, new_body, TASKS)

    assert rejection(verifier, old_headers, old_body).counter_key == REJECTED_EXPIRED


# Allowed tasks and types


def restricted_verifier(
    key: SigningKey, clock: Clock, tasks: frozenset[str] | None, types: frozenset[str] | None = None
) -> Verifier:
    return Verifier({key.key_id: TrustedKey(key.private_key.public_key(), tasks, types)}, clock)


def test_verify_accepts_allowed_task(master_key: SigningKey, signer: Signer, clock: Clock) -> None:
    verifier = restricted_verifier(master_key, clock, frozenset({"sleep", "backup.db"}))
    headers, body = signed_task(signer, "backup.db")
    assert verifier.verify(headers, body, TASKS) == master_key.key_id


def test_verify_rejects_task_not_allowed(
    master_key: SigningKey, signer: Signer, clock: Clock
) -> None:
    verifier = restricted_verifier(master_key, clock, frozenset({"sleep"}))
    headers, body = signed_task(signer, "reboot")

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_TASK_NOT_ALLOWED
    assert "'reboot'" in error.reason


def test_verify_tuple_form_restricts_tasks(
    master_key: SigningKey, signer: Signer, clock: Clock
) -> None:
    verifier = Verifier(
        {master_key.key_id: (master_key.private_key.public_key(), {"sleep"})}, clock
    )
    headers, body = signed_task(signer, "reboot")
    assert rejection(verifier, headers, body).counter_key == REJECTED_TASK_NOT_ALLOWED


def test_verify_empty_task_set_allows_replies(
    master_key: SigningKey, signer: Signer, clock: Clock
) -> None:
    verifier = restricted_verifier(master_key, clock, frozenset())
    headers, body = encode(ResultMessage(REQUEST_ID, "b1", 1))
    signed = signer.sign(headers, body, REPLY)
    verifier.verify(signed, body, REPLY)

    task_headers, task_body = signed_task(signer)
    assert rejection(verifier, task_headers, task_body).counter_key == REJECTED_TASK_NOT_ALLOWED


def test_verify_rejects_type_not_allowed(
    master_key: SigningKey, signer: Signer, clock: Clock
) -> None:
    replies_only = frozenset({"progress", "result", "error", "accepted", "announce"})
    verifier = restricted_verifier(master_key, clock, None, replies_only)
    headers, body = signed_task(signer)

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_TYPE_NOT_ALLOWED
    assert "'task'" in error.reason


def test_verify_rejects_task_without_task_header(
    master_key: SigningKey, verifier: Verifier
) -> None:
    headers, body = encode(task_message())
    del headers["task"]
    nonce = os.urandom(16)
    issued, expires = int(NOW), int(NOW) + 300
    signature = master_key.private_key.sign(
        signed_bytes(
            key_id=master_key.key_id,
            issued=issued,
            expires=expires,
            nonce=nonce,
            destination=TASKS,
            headers=headers,
            body=body,
        )
    )
    headers.update(
        {
            HEADER_KEY_ID: master_key.key_id,
            HEADER_ISSUED: str(issued),
            HEADER_EXPIRES: str(expires),
            HEADER_NONCE: encode_base64url(nonce),
            HEADER_SIGNATURE: encode_base64url(signature),
        }
    )

    error = rejection(verifier, headers, body)
    assert error.counter_key == REJECTED_TASK_NOT_ALLOWED
    assert "no 'task' header" in error.reason


def test_verify_rejects_other_slave_id(
    master_key: SigningKey, signer: Signer, clock: Clock
) -> None:
    verifier = Verifier(
        {
            master_key.key_id: TrustedKey(
                master_key.private_key.public_key(), slave_ids=frozenset({"b1"})
            )
        },
        clock,
    )
    own_headers, own_body = encode(ResultMessage(REQUEST_ID, "b1", 1))
    verifier.verify(signer.sign(own_headers, own_body, REPLY), own_body, REPLY)

    other_headers, other_body = encode(ResultMessage(REQUEST_ID, "b2", 1))
    error = rejection(verifier, signer.sign(other_headers, other_body, REPLY), other_body, REPLY)
    assert error.counter_key == REJECTED_SLAVE_NOT_ALLOWED
    assert "'b2'" in error.reason


def test_verify_slave_ids_ignore_messages_without_slave(
    master_key: SigningKey, signer: Signer, clock: Clock
) -> None:
    verifier = Verifier(
        {master_key.key_id: TrustedKey(master_key.private_key.public_key(), slave_ids=frozenset())},
        clock,
    )
    headers, body = signed_task(signer)
    assert verifier.verify(headers, body, TASKS) == master_key.key_id


# Rotation


def test_rotation_accepts_both_keys(master_key: SigningKey, clock: Clock) -> None:
    new_key = generate_signing_key()
    verifier = Verifier(
        {
            master_key.key_id: (master_key.private_key.public_key(), None),
            new_key.key_id: (new_key.private_key.public_key(), None),
        },
        clock,
    )
    old_headers, old_body = signed_task(Signer(master_key, master_key.key_id, clock))
    new_headers, new_body = signed_task(Signer(new_key, new_key.key_id, clock))

    assert verifier.verify(old_headers, old_body, TASKS) == master_key.key_id
    assert verifier.verify(new_headers, new_body, TASKS) == new_key.key_id
    assert verifier.trusted_key_ids == {master_key.key_id, new_key.key_id}


def test_rotation_drops_retired_key(master_key: SigningKey, clock: Clock) -> None:
    new_key = generate_signing_key()
    verifier = Verifier({new_key.key_id: (new_key.private_key.public_key(), None)}, clock)
    headers, body = signed_task(Signer(master_key, master_key.key_id, clock))

    assert rejection(verifier, headers, body).counter_key == REJECTED_UNKNOWN_KEY


def test_verifier_rejects_mismatched_key_id(master_key: SigningKey, clock: Clock) -> None:
    with pytest.raises(ValueError, match="does not match its public key"):
        Verifier({"0" * 16: (master_key.private_key.public_key(), None)}, clock)


def test_verifier_needs_a_key(clock: Clock) -> None:
    with pytest.raises(ValueError, match="at least one trusted key"):
        Verifier({}, clock)


@pytest.mark.parametrize(("option", "value"), [("max_skew", -1.0), ("replay_window", 0.0)])
def test_verifier_rejects_invalid_times(
    master_key: SigningKey, clock: Clock, option: str, value: float
) -> None:
    trusted = {master_key.key_id: (master_key.private_key.public_key(), None)}
    with pytest.raises(ValueError, match=option):
        Verifier(trusted, clock, **{option: value})


def test_rejection_counters_are_distinct() -> None:
    assert len(set(REJECTION_COUNTERS)) == len(REJECTION_COUNTERS)


# Key files


def test_key_id_is_sha256_prefix(master_key: SigningKey) -> None:
    raw = master_key.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert master_key.key_id == hashlib.sha256(raw).hexdigest()[:16]


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_signing_key(tmp_path: Path, master_key: SigningKey, mode: int) -> None:
    path = write_file(tmp_path / "master.key", private_key_pem(master_key), mode)

    loaded = load_signing_key(path)
    assert loaded.key_id == master_key.key_id
    assert "private_key" not in repr(loaded)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620])
def test_load_signing_key_rejects_open_mode(
    tmp_path: Path, master_key: SigningKey, mode: int
) -> None:
    path = write_file(tmp_path / "master.key", private_key_pem(master_key), mode)

    with pytest.raises(KeyFileError) as caught:
        load_signing_key(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_load_signing_key_rejects_other_owner(tmp_path: Path, master_key: SigningKey) -> None:
    path = write_file(tmp_path / "master.key", private_key_pem(master_key), 0o600)
    os.chown(path, 65534, 65534)

    with pytest.raises(KeyFileError, match="owned by uid 65534") as caught:
        load_signing_key(path)
    assert str(path) in str(caught.value)


def test_load_signing_key_follows_symlink(tmp_path: Path, master_key: SigningKey) -> None:
    target = write_file(tmp_path / "real.key", private_key_pem(master_key), 0o600)
    link = tmp_path / "master.key"
    link.symlink_to(target)

    assert load_signing_key(link).key_id == master_key.key_id
    os.chmod(target, 0o644)
    with pytest.raises(KeyFileError, match="mode 0644"):
        load_signing_key(link)


def test_load_signing_key_missing(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read private key file .*No such file"):
        load_signing_key(tmp_path / "missing.key")


def test_load_signing_key_rejects_directory(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_signing_key(directory)


def test_load_signing_key_rejects_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "master.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_signing_key(fifo)


def test_load_signing_key_rejects_huge_file(tmp_path: Path) -> None:
    path = write_file(tmp_path / "master.key", b"x" * 70000, 0o600)
    with pytest.raises(KeyFileError, match="larger than 65536 bytes"):
        load_signing_key(path)


def test_load_signing_key_rejects_encrypted(tmp_path: Path, master_key: SigningKey) -> None:
    pem = master_key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    path = write_file(tmp_path / "master.key", pem, 0o600)
    with pytest.raises(KeyFileError, match="encrypted with a passphrase"):
        load_signing_key(path)


def test_load_signing_key_rejects_other_algorithm(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = write_file(tmp_path / "master.key", pem, 0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_signing_key(path)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    ],
)
def test_load_signing_key_rejects_garbage(tmp_path: Path, data: bytes) -> None:
    path = write_file(tmp_path / "master.key", data, 0o600)
    with pytest.raises(KeyFileError, match=str(path)):
        load_signing_key(path)


def test_load_public_key_pem_and_base64(tmp_path: Path, master_key: SigningKey) -> None:
    public_key = master_key.private_key.public_key()
    pem = write_file(tmp_path / "master.pub", public_key_pem(public_key), 0o644)
    raw = write_file(tmp_path / "master.b64", public_key_base64(public_key).encode() + b"\n", 0o644)

    assert key_id_of(load_public_key(pem)) == master_key.key_id
    assert key_id_of(load_public_key(raw)) == master_key.key_id


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_load_public_key_rejects_writable_by_others(
    tmp_path: Path, master_key: SigningKey, mode: int
) -> None:
    path = write_file(
        tmp_path / "master.pub", public_key_pem(master_key.private_key.public_key()), mode
    )
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod go-w {path}"):
        load_public_key(path)


@pytest.mark.parametrize(
    "text", ["", "AAAA", "not base64 at all", base64.b64encode(b"x" * 31).decode()]
)
def test_load_public_key_rejects_garbage(tmp_path: Path, text: str) -> None:
    path = write_file(tmp_path / "master.pub", text.encode(), 0o644)
    with pytest.raises(KeyFileError, match="expected a PEM public key or the base64"):
        load_public_key(path)


def test_load_keyring_json(tmp_path: Path, master_key: SigningKey) -> None:
    old_key = generate_signing_key()
    write_file(tmp_path / "old.pub", public_key_pem(old_key.private_key.public_key()), 0o644)
    keyring = {
        "keys": [
            {
                "name": "master-2025",
                "key_id": master_key.key_id,
                "public_key": public_key_base64(master_key.private_key.public_key()),
                "tasks": ["sleep", "backup.db"],
                "types": ["task", "cancel", "discover"],
            },
            {"name": "master-2024", "public_key_file": "old.pub"},
        ]
    }
    path = write_file(tmp_path / "keyring.json", json.dumps(keyring).encode(), 0o644)

    loaded = load_keyring(path)
    assert set(loaded) == {master_key.key_id, old_key.key_id}
    assert loaded[master_key.key_id].tasks == frozenset({"sleep", "backup.db"})
    assert loaded[master_key.key_id].types == frozenset({"task", "cancel", "discover"})
    assert loaded[master_key.key_id].name == "master-2025"
    assert loaded[old_key.key_id].tasks is None
    assert loaded[old_key.key_id].types is None


def test_load_keyring_ini(tmp_path: Path, master_key: SigningKey, clock: Clock) -> None:
    pem = public_key_pem(master_key.private_key.public_key())
    write_file(tmp_path / "master.pub", pem, 0o644)
    slave_key = generate_signing_key()
    text = (
        "[master-2025]\n"
        "public_key_file = master.pub\n"
        "tasks = sleep, backup.db\n"
        "\n"
        "[slave-b1]\n"
        f"public_key = {public_key_base64(slave_key.private_key.public_key())}\n"
        "types = progress result error accepted announce\n"
        "slave_ids = b1, b1-spare\n"
        "tasks =\n"
    )
    path = write_file(tmp_path / "keyring.ini", text.encode(), 0o644)

    loaded = load_keyring(path)
    assert loaded[master_key.key_id].tasks == frozenset({"sleep", "backup.db"})
    assert loaded[master_key.key_id].types is None
    assert loaded[slave_key.key_id].tasks == frozenset()
    assert loaded[slave_key.key_id].slave_ids == frozenset({"b1", "b1-spare"})
    assert loaded[master_key.key_id].slave_ids is None
    assert loaded[slave_key.key_id].types == frozenset(
        {"progress", "result", "error", "accepted", "announce"}
    )

    verifier = Verifier(loaded, clock)
    headers, body = signed_task(Signer(master_key, master_key.key_id, clock), "backup.db")
    assert verifier.verify(headers, body, TASKS) == master_key.key_id


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({}, "exactly one of public_key and public_key_file"),
        ({"public_key": "AAAA", "public_key_file": "x.pub"}, "exactly one of"),
        ({"public_key": 5}, "public_key must be a string"),
        ({"public_key": "AAAA"}, "expected a PEM public key or the base64"),
        ({"public_key_file": "missing.pub"}, "cannot read public key file"),
        ({"PUBLIC": "x"}, "unknown entries PUBLIC"),
        ({"tasks": "sleep"}, "tasks must be a list"),
        ({"tasks": ["bad name!"]}, "invalid task name"),
        ({"types": ["task", "delete"]}, "unknown message types delete"),
        ({"slave_ids": "b1"}, "slave_ids must be a list"),
        ({"slave_ids": ["b 1"]}, "invalid slave id"),
        ({"key_id": "0123456789abcdef"}, "does not match the key"),
    ],
)
def test_load_keyring_rejects_bad_entry(
    tmp_path: Path, master_key: SigningKey, entry: dict[str, object], message: str
) -> None:
    base: dict[str, object] = {"public_key": public_key_base64(master_key.private_key.public_key())}
    if "public_key" in entry or "public_key_file" in entry or entry == {}:
        base = {}
    keyring = {"keys": [{"name": "broken", **base, **entry}]}
    path = write_file(tmp_path / "keyring.json", json.dumps(keyring).encode(), 0o644)

    with pytest.raises(KeyFileError, match=message) as caught:
        load_keyring(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "expected an object with a 'keys' list"),
        ('{"keys": [5]}', "entry 0 of 'keys' is not an object"),
        ('{"keys": []}', "lists no keys"),
    ],
)
def test_load_keyring_rejects_bad_json(tmp_path: Path, text: str, message: str) -> None:
    path = write_file(tmp_path / "keyring.json", text.encode(), 0o644)
    with pytest.raises(KeyFileError, match=message):
        load_keyring(path)


def test_load_keyring_rejects_bad_ini(tmp_path: Path) -> None:
    path = write_file(tmp_path / "keyring.ini", b"public_key = x\n", 0o644)
    with pytest.raises(KeyFileError, match="not a valid INI file"):
        load_keyring(path)


def test_load_keyring_rejects_duplicate_key(tmp_path: Path, master_key: SigningKey) -> None:
    encoded = public_key_base64(master_key.private_key.public_key())
    keyring = {"keys": [{"name": "a", "public_key": encoded}, {"name": "b", "public_key": encoded}]}
    path = write_file(tmp_path / "keyring.json", json.dumps(keyring).encode(), 0o644)
    with pytest.raises(KeyFileError, match="already listed as 'a'"):
        load_keyring(path)


def test_load_keyring_rejects_writable_by_others(tmp_path: Path, master_key: SigningKey) -> None:
    keyring = {"keys": [{"public_key": public_key_base64(master_key.private_key.public_key())}]}
    path = write_file(tmp_path / "keyring.json", json.dumps(keyring).encode(), 0o666)
    with pytest.raises(KeyFileError, match="so other users may change which keys are trusted"):
        load_keyring(path)


def test_load_symmetric_key(tmp_path: Path) -> None:
    key = generate_symmetric_key()
    path = write_file(tmp_path / "payload.key", base64.b64encode(key.key) + b"\n", 0o600)

    loaded = load_symmetric_key(path)
    assert loaded == key
    assert "key=" not in repr(loaded)


def test_load_symmetric_key_rejects_open_mode(tmp_path: Path) -> None:
    path = write_file(tmp_path / "payload.key", base64.b64encode(os.urandom(32)), 0o644)
    with pytest.raises(KeyFileError, match=f"mode 0644.*chmod 600 {path}"):
        load_symmetric_key(path)


@pytest.mark.parametrize("data", [b"", base64.b64encode(os.urandom(16)), b"not base64!"])
def test_load_symmetric_key_rejects_wrong_size(tmp_path: Path, data: bytes) -> None:
    path = write_file(tmp_path / "payload.key", data, 0o600)
    with pytest.raises(KeyFileError, match="base64 of 32 bytes"):
        load_symmetric_key(path)


def test_symmetric_key_needs_32_bytes() -> None:
    with pytest.raises(ValueError, match="expected 32 bytes, got 16"):
        SymmetricKey.from_bytes(b"k" * 16)


# Encryption


@pytest.fixture
def payload_key() -> SymmetricKey:
    return generate_symmetric_key()


@pytest.fixture
def cipher(payload_key: SymmetricKey) -> PayloadCipher:
    return PayloadCipher(payload_key)


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_encrypted_round_trip(
    message: Message,
    signer: Signer,
    verifier: Verifier,
    cipher: PayloadCipher,
    master_key: SigningKey,
) -> None:
    headers, body = encode(message)
    sealed_headers, sealed_body = seal_message(headers, body, TASKS, signer, cipher)

    assert sealed_headers["content-type"] == ENCRYPTED_CONTENT_TYPE
    assert sealed_body != body
    assert body not in sealed_body
    for name in (HEADER_ENCRYPTION_KEY_ID, HEADER_ENCRYPTION_NONCE):
        assert STOMP_SAFE.fullmatch(sealed_headers[name])

    opened = open_message(
        sealed_headers, sealed_body, TASKS, verifier, cipher, require_encryption=True
    )
    assert opened.key_id == master_key.key_id
    assert opened.encrypted
    assert without_signature(opened.headers) == headers
    assert opened.body == body
    assert decode(opened.headers, opened.body) == message


def test_plain_round_trip_through_envelope(signer: Signer, verifier: Verifier) -> None:
    headers, body = encode(task_message())
    sealed_headers, sealed_body = seal_message(headers, body, TASKS, signer)

    assert sealed_body == body
    opened = open_message(sealed_headers, sealed_body, TASKS, verifier)
    assert not opened.encrypted
    assert decode(opened.headers, opened.body) == task_message()


def test_encryption_uses_fresh_nonce(cipher: PayloadCipher) -> None:
    headers, body = encode(task_message())
    first_headers, first = cipher.encrypt(headers, body, TASKS)
    second_headers, second = cipher.encrypt(headers, body, TASKS)
    assert first_headers[HEADER_ENCRYPTION_NONCE] != second_headers[HEADER_ENCRYPTION_NONCE]
    assert first != second


def test_encrypt_rejects_encrypted_body(cipher: PayloadCipher) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    with pytest.raises(ValueError, match="already encrypted"):
        cipher.encrypt(headers, body, TASKS)


def test_decrypt_rejects_wrong_key(cipher: PayloadCipher) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    other = PayloadCipher(generate_symmetric_key())

    with pytest.raises(DecryptionFailed) as caught:
        other.decrypt(headers, body, TASKS)
    assert caught.value.counter_key == REJECTED_UNKNOWN_ENCRYPTION_KEY
    assert headers[HEADER_ENCRYPTION_KEY_ID] in caught.value.reason


def test_decrypt_rejects_wrong_key_with_same_id(cipher: PayloadCipher) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    other = PayloadCipher(generate_symmetric_key())
    headers[HEADER_ENCRYPTION_KEY_ID] = other.key_id

    with pytest.raises(DecryptionFailed) as caught:
        other.decrypt(headers, body, TASKS)
    assert caught.value.counter_key == REJECTED_UNDECRYPTABLE


def test_decrypt_rejects_tampered_ciphertext(cipher: PayloadCipher) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    tampered = bytes([body[0] ^ 1]) + body[1:]

    with pytest.raises(DecryptionFailed) as caught:
        cipher.decrypt(headers, tampered, TASKS)
    assert caught.value.counter_key == REJECTED_UNDECRYPTABLE


def test_decrypt_rejects_truncated_ciphertext(cipher: PayloadCipher) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    for cut in (0, 1, 15, len(body) - 1):
        with pytest.raises(DecryptionFailed):
            cipher.decrypt(headers, body[:cut], TASKS)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("request_id", OTHER_REQUEST_ID),
        ("task", "reboot"),
        ("reply-to", "/queue/x"),
        ("taskmesh-type", "cancel"),
    ],
)
def test_decrypt_rejects_moved_ciphertext(cipher: PayloadCipher, name: str, value: str) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    headers[name] = value

    with pytest.raises(DecryptionFailed) as caught:
        cipher.decrypt(headers, body, TASKS)
    assert caught.value.counter_key == REJECTED_UNDECRYPTABLE


def test_decrypt_rejects_other_destination(cipher: PayloadCipher) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    with pytest.raises(DecryptionFailed):
        cipher.decrypt(headers, body, "/queue/myapp.slave.b1")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (HEADER_ENCRYPTION_KEY_ID, None),
        (HEADER_ENCRYPTION_KEY_ID, "xyz"),
        (HEADER_ENCRYPTION_NONCE, None),
        (HEADER_ENCRYPTION_NONCE, encode_base64url(b"n" * 16)),
    ],
)
def test_decrypt_rejects_malformed_headers(
    cipher: PayloadCipher, name: str, value: str | None
) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)
    if value is None:
        del headers[name]
    else:
        headers[name] = value

    with pytest.raises(DecryptionFailed) as caught:
        cipher.decrypt(headers, body, TASKS)
    assert caught.value.counter_key == REJECTED_MALFORMED_ENCRYPTION


def test_decrypt_rejects_plaintext(cipher: PayloadCipher) -> None:
    headers, body = encode(task_message())
    with pytest.raises(DecryptionFailed) as caught:
        cipher.decrypt(headers, body, TASKS)
    assert caught.value.counter_key == REJECTED_UNENCRYPTED


def test_decrypt_accepts_previous_key(payload_key: SymmetricKey) -> None:
    old = PayloadCipher(payload_key)
    new = PayloadCipher(generate_symmetric_key(), decryption_keys=[payload_key])
    headers, body = encode(task_message())

    old_headers, old_body = old.encrypt(headers, body, TASKS)
    assert new.decrypt(old_headers, old_body, TASKS) == (headers, body)
    new_headers, _ = new.encrypt(headers, body, TASKS)
    assert new_headers[HEADER_ENCRYPTION_KEY_ID] == new.key_id
    assert new.decryption_key_ids == {new.key_id, old.key_id}


def test_open_rejects_tampered_ciphertext_by_signature(
    signer: Signer, verifier: Verifier, cipher: PayloadCipher
) -> None:
    headers, body = seal_message(*encode(task_message()), TASKS, signer, cipher)
    tampered = body[:-1] + bytes([body[-1] ^ 1])

    with pytest.raises(SignatureRejected) as caught:
        open_message(headers, tampered, TASKS, verifier, cipher)
    assert caught.value.counter_key == REJECTED_BAD_SIGNATURE


def test_open_rejects_wrong_key(signer: Signer, verifier: Verifier, cipher: PayloadCipher) -> None:
    headers, body = seal_message(*encode(task_message()), TASKS, signer, cipher)
    other = PayloadCipher(generate_symmetric_key())

    with pytest.raises(DecryptionFailed) as caught:
        open_message(headers, body, TASKS, verifier, other)
    assert caught.value.counter_key == REJECTED_UNKNOWN_ENCRYPTION_KEY


def test_open_rejects_plaintext_when_required(
    signer: Signer, verifier: Verifier, cipher: PayloadCipher
) -> None:
    headers, body = seal_message(*encode(task_message()), TASKS, signer)

    with pytest.raises(DecryptionFailed) as caught:
        open_message(headers, body, TASKS, verifier, cipher, require_encryption=True)
    assert caught.value.counter_key == REJECTED_UNENCRYPTED


def test_open_rejects_encrypted_without_key(
    signer: Signer, verifier: Verifier, cipher: PayloadCipher
) -> None:
    headers, body = seal_message(*encode(task_message()), TASKS, signer, cipher)

    with pytest.raises(DecryptionFailed) as caught:
        open_message(headers, body, TASKS, verifier)
    assert caught.value.counter_key == REJECTED_UNDECRYPTABLE
    assert "no payload key" in caught.value.reason


def test_open_checks_signature_before_decrypting(verifier: Verifier, cipher: PayloadCipher) -> None:
    headers, body = cipher.encrypt(*encode(task_message()), TASKS)

    with pytest.raises(SignatureRejected) as caught:
        open_message(headers, body, TASKS, verifier, cipher)
    assert caught.value.counter_key == REJECTED_UNSIGNED


def test_rejections_share_base_class() -> None:
    assert issubclass(SignatureRejected, MessageRejected)
    assert issubclass(DecryptionFailed, MessageRejected)


# taskmesh-keygen


def run_keygen(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = _keygen.main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


def test_keygen_writes_key_pair(tmp_path: Path) -> None:
    private, public = tmp_path / "master.key", tmp_path / "master.pub"

    status, out, err = run_keygen("--private", str(private), "--public", str(public))

    assert status == 0, err
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    loaded = load_signing_key(private)
    assert key_id_of(load_public_key(public)) == loaded.key_id
    assert f"key id: {loaded.key_id}" in out
    assert public_key_base64(loaded.private_key.public_key()) in out
    assert "PRIVATE KEY" not in out


def test_keygen_mode_ignores_umask(tmp_path: Path) -> None:
    private, public = tmp_path / "master.key", tmp_path / "master.pub"
    old_umask = os.umask(0)
    try:
        status, _, err = run_keygen("--private", str(private), "--public", str(public))
    finally:
        os.umask(old_umask)
    assert status == 0, err
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public = tmp_path / "master.key", tmp_path / "master.pub"
    public.write_text("keep me")

    status, out, err = run_keygen("--private", str(private), "--public", str(public))

    assert status == 1
    assert f"{public} already exists" in err
    assert out == ""
    assert public.read_text() == "keep me"
    assert not private.exists()


def test_keygen_refuses_to_overwrite_private(tmp_path: Path) -> None:
    private, public = tmp_path / "master.key", tmp_path / "master.pub"
    private.write_text("keep me")

    status, _, err = run_keygen("--private", str(private), "--public", str(public))

    assert status == 1
    assert f"{private} already exists" in err
    assert private.read_text() == "keep me"
    assert not public.exists()


def test_keygen_refuses_dangling_symlink(tmp_path: Path) -> None:
    private, public = tmp_path / "master.key", tmp_path / "master.pub"
    private.symlink_to(tmp_path / "elsewhere.key")

    status, _, err = run_keygen("--private", str(private), "--public", str(public))

    assert status == 1
    assert "already exists" in err
    assert not (tmp_path / "elsewhere.key").exists()


def test_keygen_reports_unwritable_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-directory"
    status, _, err = run_keygen(
        "--private", str(missing / "master.key"), "--public", str(tmp_path / "master.pub")
    )
    assert status == 1
    assert "cannot write" in err
    assert "No such file or directory" in err
    assert not (tmp_path / "master.pub").exists()


def test_keygen_writes_symmetric_key(tmp_path: Path) -> None:
    path = tmp_path / "payload.key"

    status, out, err = run_keygen("--symmetric", str(path))

    assert status == 0, err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_symmetric_key(path)
    assert f"payload key id: {key.key_id}" in out
    assert base64.b64encode(key.key).decode() not in out


def test_keygen_symmetric_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "payload.key"
    path.write_text("keep me")

    status, _, err = run_keygen("--symmetric", str(path))

    assert status == 1
    assert "already exists" in err
    assert path.read_text() == "keep me"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--private", "a.key"],
        ["--public", "a.pub"],
        ["--private", "a.key", "--public", "a.pub", "--symmetric", "b.key"],
        ["--bogus"],
    ],
)
def test_keygen_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    status, _, _ = run_keygen(*argv)
    assert status == 2
    assert list(tmp_path.iterdir()) == []

"""
Signed and encrypted messages through the private ActiveMQ and RabbitMQ that
the test command starts: the headers and bodies that the verifier checks must
arrive unchanged with every STOMP version.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from taskmesh._messages import ProgressMessage, TaskMessage, decode, encode
from taskmesh.security import (
    REJECTED_REPLAY,
    PayloadCipher,
    SignatureRejected,
    Signer,
    Verifier,
    open_message,
    seal_message,
)
from taskmesh.security._keys import generate_signing_key, generate_symmetric_key

from .test_stomp_broker import round_trip, settings_for, started

pytestmark = pytest.mark.broker

REQUEST_ID = "0b6f4f1e-8a51-4c55-9a3c-5d1f6a2b9e10"


def unique_destination(broker: Any, kind: str) -> str:
    return f"/{kind}/{broker.namespace}.signed.{uuid.uuid4().hex}"


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["signed", "encrypted"])
@pytest.mark.parametrize("kind", ["queue", "topic"])
@pytest_twisted.ensureDeferred
async def test_sealed_message_survives_broker(
    broker: Any, version: str, encrypted: bool, kind: str
) -> None:
    key = generate_signing_key()
    signer = Signer(key, key.key_id, reactor)  # type: ignore[arg-type]
    verifier = Verifier({key.key_id: (key.private_key.public_key(), None)}, reactor)  # type: ignore[arg-type]
    cipher = PayloadCipher(generate_symmetric_key()) if encrypted else None
    versions = tuple(v for v in ("1.0", "1.1", "1.2") if v <= version)
    client = await started(settings_for(broker, versions=versions, heart_beat=(0, 0)))
    try:
        destination = unique_destination(broker, kind)
        task = TaskMessage(
            REQUEST_ID,
            "backup.db",
            {"path": "/var/lib/db", "bytes": "\x00\xff"},
            "/queue/myapp.reply",
        )
        headers, body = seal_message(*encode(task), destination, signer, cipher)

        message = await round_trip(client, destination, body, headers)

        opened = open_message(
            message.headers,
            message.body,
            message.destination,
            verifier,
            cipher,
            require_encryption=encrypted,
        )
        assert opened.key_id == key.key_id
        assert opened.encrypted == encrypted
        assert decode(opened.headers, opened.body) == task

        with pytest.raises(SignatureRejected) as caught:
            verifier.verify(message.headers, message.body, message.destination)
        assert caught.value.counter_key == REJECTED_REPLAY
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_signed_reply_survives_broker(broker: Any) -> None:
    key = generate_signing_key()
    signer = Signer(key, key.key_id, reactor)  # type: ignore[arg-type]
    verifier = Verifier({key.key_id: (key.private_key.public_key(), None)}, reactor)  # type: ignore[arg-type]
    client = await started(settings_for(broker))
    try:
        destination = unique_destination(broker, "queue")
        progress = ProgressMessage(REQUEST_ID, "web-3@host", 12.5, "copying: 1/8")
        headers, body = seal_message(*encode(progress), destination, signer)

        message = await round_trip(client, destination, body, headers)

        opened = open_message(message.headers, message.body, message.destination, verifier)
        assert decode(opened.headers, opened.body) == progress
    finally:
        await client.stopService()

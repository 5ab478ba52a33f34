"""
The STOMP client against the private ActiveMQ that the test command starts.
"""

from __future__ import annotations

import uuid
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import deferLater

from taskmesh.stomp import BrokerError, StompClientService, StompMessage, StompSettings

pytestmark = pytest.mark.broker

TIMEOUT = 20.0


def settings_for(broker: Any, **overrides: Any) -> StompSettings:
    values: dict[str, Any] = {
        "uri": broker.uri,
        "login": broker.login,
        "passcode": broker.passcode,
        "heart_beat": (2000, 2000),
    }
    values.update(overrides)
    return StompSettings(**values)


async def with_timeout(deferred: Deferred[Any], seconds: float = TIMEOUT) -> Any:
    deferred.addTimeout(seconds, reactor)
    return await deferred


async def started(settings: StompSettings) -> StompClientService:
    client = StompClientService(settings, reactor)
    client.startService()
    await with_timeout(client.when_connected())
    return client


def unique_queue(broker: Any) -> str:
    return f"/queue/{broker.namespace}.it.{uuid.uuid4().hex}"


async def round_trip(
    client: StompClientService, destination: str, body: bytes, headers: dict[str, str] | None = None
) -> StompMessage:
    received: DeferredQueue[StompMessage] = DeferredQueue()
    client.subscribe(destination, received.put)
    # Wait for the subscription's receipt by sending a receipted frame after it.
    await with_timeout(client.send(destination, body, headers, receipt=True))
    message: StompMessage = await with_timeout(received.get())
    return message


@pytest_twisted.ensureDeferred
async def test_binary_body_arrives_byte_identical(activemq: Any) -> None:
    client = await started(settings_for(activemq))
    try:
        body = b"hello\x00world\x00\xff\xfe"
        message = await round_trip(client, unique_queue(activemq), body)
        assert message.body == body
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_utf8_body_and_headers_arrive_intact(activemq: Any) -> None:
    client = await started(settings_for(activemq))
    try:
        body = '{"greeting": "grüße, 世界 ✓"}'.encode()
        message = await round_trip(client, unique_queue(activemq), body, {"x-note": "naïve ✓"})
        assert message.body == body
        assert message.headers["x-note"] == "naïve ✓"
    finally:
        await client.stopService()


@pytest.mark.parametrize(
    ("version", "value"),
    [
        ("1.2", "a:b\\c\nd"),
        ("1.1", "a:b\\c\nd"),
        # ActiveMQ 5.17 unescapes "\\c" even in STOMP 1.0, so a backslash
        # does not survive there; a colon does.
        ("1.0", "a:b c"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_header_escaping_round_trip(activemq: Any, version: str, value: str) -> None:
    versions = tuple(v for v in ("1.0", "1.1", "1.2") if v <= version)
    client = await started(settings_for(activemq, versions=versions, heart_beat=(0, 0)))
    try:
        assert client.protocol is not None
        assert client.protocol.version == version
        message = await round_trip(client, unique_queue(activemq), b"{}", {"x-value": value})
        assert message.headers["x-value"] == value
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_wrong_passcode_reports_broker_message(activemq: Any) -> None:
    client = StompClientService(
        settings_for(activemq, passcode="wrong"), reactor, retry_policy=lambda n: 60.0
    )
    client.startService()
    try:
        for _ in range(100):
            if client.last_error:
                break
            await deferLater(reactor, 0.1)
        assert client.last_error is not None
        assert "password is invalid" in client.last_error
        assert not client.is_connected
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_unauthorized_send_fails_with_broker_message(activemq: Any) -> None:
    client = await started(settings_for(activemq))
    try:
        with pytest.raises(BrokerError) as raised:
            await with_timeout(client.send("/queue/elsewhere.tasks", b"{}", receipt=True))
        assert "not authorized" in raised.value.message
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_heart_beats_keep_idle_session(activemq: Any) -> None:
    client = await started(settings_for(activemq, heart_beat=(500, 500)))
    try:
        protocol = client.protocol
        await deferLater(reactor, 3.0)
        assert client.is_connected
        assert client.protocol is protocol, client.last_error
    finally:
        await client.stopService()

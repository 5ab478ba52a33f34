"""
The STOMP client against the private ActiveMQ and RabbitMQ that the test
command starts; each test runs once per broker.
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
        "broker_type": broker.kind,
        "vhost": getattr(broker, "vhost", None),
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
async def test_binary_body_arrives_byte_identical(broker: Any) -> None:
    client = await started(settings_for(broker))
    try:
        body = b"hello\x00world\x00\xff\xfe"
        message = await round_trip(client, unique_queue(broker), body)
        assert message.body == body
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_utf8_body_and_headers_arrive_intact(broker: Any) -> None:
    client = await started(settings_for(broker))
    try:
        body = '{"greeting": "grüße, 世界 ✓"}'.encode()
        message = await round_trip(client, unique_queue(broker), body, {"x-note": "naïve ✓"})
        assert message.body == body
        assert message.headers["x-note"] == "naïve ✓"
    finally:
        await client.stopService()


@pytest.mark.parametrize(
    ("version", "value"),
    [
        ("1.2", "a:b\\c\nd"),
        ("1.1", "a:b\\c\nd"),
        # STOMP 1.0 defines no escaping, and brokers disagree: ActiveMQ 5.17
        # unescapes "\\c" in SEND headers, RabbitMQ 3.10 escapes ":" as "\\c"
        # in MESSAGE headers. Only values without ":" and "\\" survive both.
        ("1.0", "a b=c"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_header_escaping_round_trip(broker: Any, version: str, value: str) -> None:
    versions = tuple(v for v in ("1.0", "1.1", "1.2") if v <= version)
    client = await started(settings_for(broker, versions=versions, heart_beat=(0, 0)))
    try:
        assert client.protocol is not None
        assert client.protocol.version == version
        message = await round_trip(client, unique_queue(broker), b"{}", {"x-value": value})
        assert message.headers["x-value"] == value
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_stomp_1_0_colon_depends_on_broker(broker: Any) -> None:
    client = await started(settings_for(broker, versions=("1.0",), heart_beat=(0, 0)))
    try:
        message = await round_trip(client, unique_queue(broker), b"{}", {"x-value": "a:b"})
        expected = {"activemq": "a:b", "rabbitmq": "a\\cb"}[broker.kind]
        assert message.headers["x-value"] == expected
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_wrong_passcode_reports_broker_message(broker: Any) -> None:
    client = StompClientService(
        settings_for(broker, passcode="wrong"), reactor, retry_policy=lambda n: 60.0
    )
    client.startService()
    try:
        for _ in range(100):
            if client.last_error:
                break
            await deferLater(reactor, 0.1)
        assert client.last_error is not None
        # ActiveMQ: "User name [foo] or password is invalid."; RabbitMQ:
        # "Bad CONNECT" with "Access refused for user 'foo'" in the body.
        assert any(
            text in client.last_error for text in ("password is invalid", "Access refused")
        ), client.last_error
        assert not client.is_connected
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_unauthorized_send_fails_with_broker_message(broker: Any) -> None:
    client = await started(settings_for(broker))
    try:
        with pytest.raises(BrokerError) as raised:
            await with_timeout(client.send("/queue/elsewhere.tasks", b"{}", receipt=True))
        # ActiveMQ: "User foo is not authorized to write to: queue://...";
        # RabbitMQ: "access_refused" with "ACCESS_REFUSED - access to queue
        # 'elsewhere.tasks' ... refused for user 'foo'" in the body.
        assert any(text in str(raised.value) for text in ("not authorized", "refused")), str(
            raised.value
        )
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_heart_beats_keep_idle_session(broker: Any) -> None:
    client = await started(settings_for(broker, heart_beat=(500, 500)))
    try:
        protocol = client.protocol
        await deferLater(reactor, 3.0)
        assert client.is_connected
        assert client.protocol is protocol, client.last_error
    finally:
        await client.stopService()

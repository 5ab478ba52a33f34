"""
The STOMP client over ``ssl://`` against private ActiveMQ brokers with TLS:
one whose certificate comes from the test CA and names localhost and
127.0.0.1, and one whose certificate names only wrong.example.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from taskmesh.stomp import StompClientService, StompMessage, StompSettings

pytestmark = pytest.mark.broker

TIMEOUT = 20.0


def tls_settings(broker: Any, uri: str | None = None, **overrides: Any) -> StompSettings:
    values: dict[str, Any] = {
        "uri": uri or broker.ssl_uri,
        "login": broker.login,
        "passcode": broker.passcode,
        "heart_beat": (2000, 2000),
        "broker_type": broker.kind,
    }
    values.update(overrides)
    return StompSettings(**values)


async def with_timeout(deferred: Deferred[Any], seconds: float = TIMEOUT) -> Any:
    deferred.addTimeout(seconds, reactor)
    return await deferred


async def round_trip(client: StompClientService, namespace: str) -> StompMessage:
    destination = f"/queue/{namespace}.tls.{uuid.uuid4().hex}"
    received: DeferredQueue[StompMessage] = DeferredQueue()
    client.subscribe(destination, received.put)
    await with_timeout(client.send(destination, b'{"over": "tls"}', receipt=True))
    message: StompMessage = await with_timeout(received.get())
    return message


async def first_error(client: StompClientService) -> str:
    """
    Wait until the client reports a connection error, and return it.
    """
    for _ in range(int(TIMEOUT * 10)):
        if client.last_error:
            return client.last_error
        await deferLater(reactor, 0.1)
    raise AssertionError(f"no connection error within {TIMEOUT} s")


@pytest_twisted.ensureDeferred
async def test_tls_round_trip_with_private_ca(activemq_tls: Any, tls_files: Any) -> None:
    settings = tls_settings(activemq_tls, tls_ca_file=str(tls_files.ca_file))
    client = StompClientService(settings, reactor)
    client.startService()
    try:
        await with_timeout(client.when_connected())
        message = await round_trip(client, activemq_tls.namespace)
        assert message.body == b'{"over": "tls"}'
        assert client.protocol is not None
        assert client.protocol.transport is not None
        peer = client.protocol.transport.getPeerCertificate()  # type: ignore[attr-defined]
        assert peer.to_cryptography().subject.rfc4514_string() == "CN=localhost,O=taskmesh tests"
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_tls_host_name_localhost(activemq_tls: Any, tls_files: Any) -> None:
    uri = f"ssl://localhost:{activemq_tls.ssl_port}"
    client = StompClientService(
        tls_settings(activemq_tls, uri, tls_ca_file=str(tls_files.ca_file)), reactor
    )
    client.startService()
    try:
        await with_timeout(client.when_connected())
        message = await round_trip(client, activemq_tls.namespace)
        assert message.body == b'{"over": "tls"}'
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_tls_client_certificate_accepted(activemq_tls: Any, tls_files: Any) -> None:
    # The broker does not ask for a client certificate, so this checks only
    # that configuring one does not break the handshake.
    settings = tls_settings(
        activemq_tls,
        tls_ca_file=str(tls_files.ca_file),
        tls_cert_file=str(tls_files.client_cert_file),
        tls_key_file=str(tls_files.client_key_file),
    )
    client = StompClientService(settings, reactor)
    client.startService()
    try:
        await with_timeout(client.when_connected())
    finally:
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_tls_unrelated_ca_rejected(activemq_tls: Any, tls_files: Any) -> None:
    settings = tls_settings(activemq_tls, tls_ca_file=str(tls_files.other_ca_file))
    client = StompClientService(settings, reactor, retry_policy=lambda failures: 60.0)
    with capturedLogs() as events:
        client.startService()
        try:
            error = await first_error(client)
        finally:
            await client.stopService()

    assert error == (
        f"{activemq_tls.ssl_uri}: TLS handshake failed: certificate verify failed: the"
        " broker's certificate CN=localhost,O=taskmesh tests is issued by CN=taskmesh test"
        " CA,O=taskmesh tests, and no CA of this chain is among the CAs in"
        f" {tls_files.other_ca_file}"
    )
    assert not client.is_connected
    logged = [e for e in events if e.get("error") and "certificate verify failed" in e["error"]]
    assert logged, [e.get("log_format") for e in events]
    assert logged[0]["log_level"].name == "error"
    assert logged[0]["broker"] == activemq_tls.ssl_uri


@pytest_twisted.ensureDeferred
async def test_tls_system_trust_rejects_private_ca(activemq_tls: Any) -> None:
    client = StompClientService(
        tls_settings(activemq_tls), reactor, retry_policy=lambda failures: 60.0
    )
    client.startService()
    try:
        error = await first_error(client)
    finally:
        await client.stopService()

    assert "certificate verify failed" in error
    assert "the system's trusted CAs" in error


@pytest_twisted.ensureDeferred
async def test_tls_wrong_host_name_rejected(activemq_wrong_host: Any, tls_files: Any) -> None:
    settings = tls_settings(activemq_wrong_host, tls_ca_file=str(tls_files.ca_file))
    client = StompClientService(settings, reactor, retry_policy=lambda failures: 60.0)
    with capturedLogs() as events:
        client.startService()
        try:
            error = await first_error(client)
        finally:
            await client.stopService()

    assert error == (
        f"{activemq_wrong_host.ssl_uri}: TLS handshake failed: hostname mismatch: the"
        " broker's certificate is for DNS:wrong.example, not for '127.0.0.1'"
    )
    assert not client.is_connected
    assert [e for e in events if e.get("error") and "hostname mismatch" in e["error"]]


@pytest_twisted.ensureDeferred
async def test_tls_insecure_connects_and_warns(activemq_wrong_host: Any) -> None:
    client = StompClientService(tls_settings(activemq_wrong_host, tls_insecure=True), reactor)
    with capturedLogs() as events:
        client.startService()
        try:
            await with_timeout(client.when_connected())
            message = await round_trip(client, activemq_wrong_host.namespace)
        finally:
            await client.stopService()

    assert message.body == b'{"over": "tls"}'
    warnings = [e for e in events if "NOT verified" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["log_level"].name == "warn"
    assert warnings[0]["broker"] == activemq_wrong_host.ssl_uri


@pytest_twisted.ensureDeferred
async def test_tls_failover_from_plain_to_ssl(activemq_tls: Any, tls_files: Any) -> None:
    # The first member is the broker's plain STOMP port. ActiveMQ either
    # waits for the end of a frame that never comes, so the client gives up
    # after connect_timeout, or it replies with a plain ERROR frame when the
    # random bytes of the ClientHello contain a line break. Either way the
    # client moves on to the TLS port.
    plain_port_over_tls = f"ssl://127.0.0.1:{activemq_tls.port}"
    uri = (
        f"failover:({plain_port_over_tls},{activemq_tls.ssl_uri})"
        "?initialReconnectDelay=100&randomize=false"
    )
    settings = tls_settings(
        activemq_tls, uri, tls_ca_file=str(tls_files.ca_file), connect_timeout=1.0
    )
    client = StompClientService(settings, reactor)
    with capturedLogs() as events:
        client.startService()
        try:
            await with_timeout(client.when_connected())
            message = await round_trip(client, activemq_tls.namespace)
        finally:
            await client.stopService()

    assert message.body == b'{"over": "tls"}'
    errors = [e.get("error", "") for e in events if e.get("broker") == plain_port_over_tls]
    assert any("check that the port accepts STOMP over TLS" in error for error in errors), errors

"""
Unit tests for broker URIs and the reconnecting StompClientService.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from zope.interface import implementer
from twisted.internet.interfaces import IStreamClientEndpoint

from taskmesh.stomp import (
    BrokerAddress,
    NotConnected,
    StompClientService,
    StompSettings,
    parse_broker_uri,
)

from .stomp_helpers import connected_frame, sent_frames


# Broker URIs


def test_plain_uri() -> None:
    uri = parse_broker_uri("tcp://mq.example:61613")
    assert uri.brokers == (BrokerAddress("tcp", "mq.example", 61613),)
    assert uri.initial_delay == 1.0


def test_failover_uri_with_options() -> None:
    uri = parse_broker_uri(
        "failover:(tcp://a:61613,ssl://b:61614)?initialReconnectDelay=100"
        "&maxReconnectDelay=5000&randomize=false&reconnectDelayJitter=50"
    )
    assert uri.brokers == (BrokerAddress("tcp", "a", 61613), BrokerAddress("ssl", "b", 61614))
    assert uri.initial_delay == 0.1
    assert uri.max_delay == 5.0
    assert uri.jitter == 0.05
    assert uri.randomize is False


def test_failover_uri_with_stompest_separator() -> None:
    uri = parse_broker_uri("failover:tcp://a:1,tcp://b:2?initialReconnectDelay=7,randomize=false")
    assert [b.port for b in uri.brokers] == [1, 2]
    assert uri.initial_delay == 0.007


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty broker URI"),
        ("http://a:80", "is not tcp://HOST:PORT"),
        ("tcp://a", "is not tcp://HOST:PORT"),
        ("tcp://a:70000", "not between 1 and 65535"),
        ("failover:()", "names no broker"),
        ("failover:(tcp://a:1)?initialDelay=5", "unknown failover option 'initialDelay'"),
        ("failover:(tcp://a:1)?initialReconnectDelay=soon", "invalid broker URI"),
    ],
)
def test_invalid_uri_messages(uri: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_broker_uri(uri)


def test_retry_policy_grows_to_maximum() -> None:
    uri = parse_broker_uri("failover:(tcp://a:1)?initialReconnectDelay=100&maxReconnectDelay=1000")
    delay = uri.retry_policy(uniform=lambda: 0.0)
    assert [delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_retry_policy_adds_jitter() -> None:
    uri = parse_broker_uri("tcp://a:1")
    delay = uri.retry_policy(uniform=lambda: 0.5)
    assert delay(1) == 1.5


# StompClientService with a fake endpoint


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    Connect each attempt to a new StringTransport, or fail while ``refuse`` is set.
    """

    def __init__(self) -> None:
        self.protocols: list = []
        self.transports: list[StringTransport] = []
        self.refuse = False
        self.current = BrokerAddress("tcp", "broker.example", 61613)

    def connect(self, factory) -> Deferred:
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.protocols.append(protocol)
        self.transports.append(transport)
        return succeed(protocol)


def make_service(**settings: object) -> tuple[StompClientService, FakeEndpoint, Clock]:
    clock = Clock()
    endpoint = FakeEndpoint()
    service = StompClientService(
        StompSettings(login="foo", passcode="bar", **settings),  # type: ignore[arg-type]
        clock,
        endpoint=endpoint,
        retry_policy=lambda failures: 2.0,
    )
    return service, endpoint, clock


def answer_receipts(protocol, transport: StringTransport) -> list:
    frames = sent_frames(transport)
    for frame in frames:
        if "receipt" in frame.headers:
            protocol.dataReceived(
                f"RECEIPT\nreceipt-id:{frame.headers['receipt']}\n\n".encode() + b"\x00"
            )
    return frames


def test_service_connects_and_restores_subscriptions() -> None:
    service, endpoint, clock = make_service()
    received = []
    service.subscribe("/topic/myapp.tasks", received.append)
    connected = service.when_connected()
    service.startService()
    protocol, transport = endpoint.protocols[0], endpoint.transports[0]
    protocol.dataReceived(connected_frame())
    assert not connected.called, "subscriptions are restored before the session counts"
    frames = answer_receipts(protocol, transport)
    assert [f.command for f in frames] == ["CONNECT", "SUBSCRIBE"]
    assert connected.called
    assert service.is_connected

    transport.loseConnection()
    protocol.connectionLost(connectionDone)
    assert not service.is_connected
    assert "connection lost" in service.last_error
    clock.advance(2.0)
    protocol2, transport2 = endpoint.protocols[1], endpoint.transports[1]
    protocol2.dataReceived(connected_frame())
    frames = answer_receipts(protocol2, transport2)
    subscribe = [f for f in frames if f.command == "SUBSCRIBE"]
    assert [f.headers["destination"] for f in subscribe] == ["/topic/myapp.tasks"]
    assert service.is_connected
    assert service.sessions == 2


def test_service_send_when_disconnected_fails() -> None:
    service, endpoint, clock = make_service()
    endpoint.refuse = True
    service.startService()
    failure = []
    service.send("/queue/q", b"x").addErrback(failure.append)
    assert failure[0].check(NotConnected)


def test_service_retries_broker_error_with_message() -> None:
    service, endpoint, clock = make_service()
    service.startService()
    with capturedLogs() as events:
        endpoint.protocols[0].dataReceived(b"ERROR\nmessage:User name [foo] or password is invalid.\n\n\x00")
        endpoint.protocols[0].connectionLost(connectionDone)
    assert "password is invalid" in service.last_error
    assert any("password is invalid" in str(e.get("error", "")) for e in events)
    clock.advance(2.0)
    assert len(endpoint.protocols) == 2, "retried after the backoff delay"


def test_service_ack_from_older_session_fails() -> None:
    service, endpoint, clock = make_service()
    received = []
    service.subscribe("/queue/q", received.append, ack="client-individual")
    service.startService()
    endpoint.protocols[0].dataReceived(connected_frame())
    answer_receipts(endpoint.protocols[0], endpoint.transports[0])
    endpoint.protocols[0].dataReceived(
        b"MESSAGE\ndestination:/queue/q\nmessage-id:m1\nsubscription:taskmesh-1\nack:a1\n\nx\x00"
    )
    endpoint.protocols[0].connectionLost(connectionDone)
    clock.advance(2.0)
    endpoint.protocols[1].dataReceived(connected_frame())
    answer_receipts(endpoint.protocols[1], endpoint.transports[1])
    failures = []
    service.ack(received[0]).addErrback(failures.append)
    assert failures[0].check(NotConnected)
    assert "earlier connection" in failures[0].getErrorMessage()


def test_service_stop_disconnects_politely() -> None:
    service, endpoint, clock = make_service()
    service.startService()
    protocol, transport = endpoint.protocols[0], endpoint.transports[0]
    protocol.dataReceived(connected_frame())
    transport.clear()
    stopped = service.stopService()
    [frame] = sent_frames(transport)
    assert frame.command == "DISCONNECT"
    protocol.dataReceived(f"RECEIPT\nreceipt-id:{frame.headers['receipt']}\n\n".encode() + b"\x00")
    protocol.connectionLost(connectionDone)
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_service_unsubscribe_stops_restoring() -> None:
    service, endpoint, clock = make_service()
    subscription = service.subscribe("/topic/t", lambda m: None)
    subscription.unsubscribe()
    service.startService()
    endpoint.protocols[0].dataReceived(connected_frame())
    frames = answer_receipts(endpoint.protocols[0], endpoint.transports[0])
    assert [f.command for f in frames] == ["CONNECT"]


def test_service_backoff_grows_until_session_established() -> None:
    clock = Clock()
    endpoint = FakeEndpoint()
    delays = []

    def policy(failures: int) -> float:
        delays.append(failures)
        return float(failures)

    service = StompClientService(StompSettings(), clock, endpoint=endpoint, retry_policy=policy)
    endpoint.refuse = True
    service.startService()
    clock.advance(1.0)
    clock.advance(2.0)
    assert delays == [1, 2, 3]
    endpoint.refuse = False
    clock.advance(3.0)
    endpoint.protocols[0].dataReceived(connected_frame())
    assert service.is_connected
    endpoint.protocols[0].connectionLost(connectionDone)
    assert delays == [1, 2, 3, 4], "a session that ended at once keeps the backoff growing"
    clock.advance(4.0)
    endpoint.protocols[1].dataReceived(connected_frame())
    clock.advance(service.stable_after)
    endpoint.protocols[1].connectionLost(connectionDone)
    assert delays == [1, 2, 3, 4, 1], "a stable session starts again at the first delay"
    stopped = service.stopService()
    assert stopped.called
    assert clock.getDelayedCalls() == []


# Broker profiles


def test_activemq_profile_headers() -> None:
    from taskmesh.stomp import ACTIVEMQ

    assert ACTIVEMQ.subscribe_headers(1) == {"activemq.prefetchSize": "1"}
    assert ACTIVEMQ.send_headers(persistent=True, ttl=2.5, now=1000.0) == {
        "persistent": "true",
        "expires": "1002500",
    }
    assert ACTIVEMQ.nack_headers(requeue=False) == {}


def test_rabbitmq_profile_headers() -> None:
    from taskmesh.stomp import RABBITMQ

    assert RABBITMQ.subscribe_headers(4) == {"prefetch-count": "4"}
    assert RABBITMQ.send_headers(persistent=False, ttl=2.5, now=1000.0) == {"expiration": "2500"}
    assert RABBITMQ.nack_headers(requeue=False) == {"requeue": "false"}


def test_generic_profile_sends_no_extensions() -> None:
    from taskmesh.stomp import GENERIC

    assert GENERIC.subscribe_headers(4) == {}
    assert GENERIC.send_headers(persistent=True, ttl=3, now=0) == {"persistent": "true"}


def test_unknown_broker_type_rejected() -> None:
    with pytest.raises(ValueError, match="invalid broker type 'kafka'"):
        StompSettings(broker_type="kafka")


def test_invalid_prefetch_rejected() -> None:
    from taskmesh.stomp import RABBITMQ

    with pytest.raises(ValueError, match="invalid prefetch 0"):
        RABBITMQ.subscribe_headers(0)


def test_service_applies_profile_headers() -> None:
    service, endpoint, clock = make_service(broker_type="rabbitmq")
    clock.advance(100)
    service.subscribe("/queue/q", lambda m: None, ack="client-individual", prefetch=2)
    listened = []
    service.add_session_listener(lambda: listened.append(service.sessions))
    service.startService()
    protocol, transport = endpoint.protocols[0], endpoint.transports[0]
    protocol.dataReceived(connected_frame())
    [_, subscribe] = answer_receipts(protocol, transport)
    assert subscribe.headers["prefetch-count"] == "2"
    assert listened == [1]
    service.send("/queue/q", b"x", persistent=True, ttl=5)
    [send] = sent_frames(transport)
    assert send.headers["persistent"] == "true"
    assert send.headers["expiration"] == "5000"


def test_service_acks_message_during_subscription_restore() -> None:
    service, endpoint, clock = make_service()
    received = []
    service.subscribe("/queue/q", received.append, ack="client-individual")
    service.startService()
    protocol, transport = endpoint.protocols[0], endpoint.transports[0]
    protocol.dataReceived(connected_frame())
    # The backlog arrives before the SUBSCRIBE receipt.
    protocol.dataReceived(
        b"MESSAGE\ndestination:/queue/q\nmessage-id:m1\nsubscription:taskmesh-1\nack:a1\n\nx\x00"
    )
    assert not service.is_connected
    transport.clear()
    acked = []
    service.ack(received[0]).addBoth(acked.append)
    assert acked == [None]
    [frame] = sent_frames(transport)
    assert (frame.command, frame.headers["id"]) == ("ACK", "a1")


def test_service_sends_during_subscription_restore() -> None:
    service, endpoint, clock = make_service()
    service.subscribe("/queue/q", lambda message: None, ack="client-individual")
    service.startService()
    protocol, transport = endpoint.protocols[0], endpoint.transports[0]
    protocol.dataReceived(connected_frame())
    transport.clear()
    sent = []
    service.send("/queue/reply", b"{}").addBoth(sent.append)
    assert sent == [None]
    [frame] = sent_frames(transport)
    assert frame.command == "SEND"


def test_refused_connection_names_listener() -> None:
    service, endpoint, clock = make_service()
    endpoint.refuse = True
    service.startService()
    assert service.last_error is not None
    assert "rabbitmq_stomp plugin" in service.last_error

"""
Unit tests for the STOMP protocol on a StringTransport and a Clock.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs

from taskmesh.stomp import (
    BrokerError,
    ConnectionClosed,
    FrameTooLarge,
    HeartBeatTimeout,
    NotConnected,
    ProtocolViolation,
    StompSettings,
)

from .stomp_helpers import connect, connected_frame, make_protocol, sent_frames


def result_of(deferred: Deferred) -> object:
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def message_frame(body: bytes, headers: str = "", subscription: str = "s1") -> bytes:
    head = (
        f"MESSAGE\ndestination:/topic/t\nmessage-id:m-1\nsubscription:{subscription}\n"
        f"ack:a-1\ncontent-length:{len(body)}\n{headers}\n"
    )
    return head.encode() + body + b"\x00"


# CONNECT and CONNECTED


def test_connect_frame_offers_versions_and_credentials() -> None:
    protocol, transport, _ = make_protocol(
        StompSettings(login="foo", passcode="bar", heart_beat=(4000, 6000))
    )
    [frame] = sent_frames(transport)
    assert frame.command == "CONNECT"
    assert frame.headers["accept-version"] == "1.0,1.1,1.2"
    assert frame.headers["host"] == "broker.example"
    assert frame.headers["login"] == "foo"
    assert frame.headers["passcode"] == "bar"
    assert frame.headers["heart-beat"] == "4000,6000"
    assert not protocol.is_connected


def test_connect_uses_vhost_for_host_header() -> None:
    _, transport, _ = make_protocol(StompSettings(vhost="/"))
    [frame] = sent_frames(transport)
    assert frame.headers["host"] == "/"


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_connected_negotiates_version(version: str) -> None:
    protocol, transport, _ = make_protocol()
    waiting = protocol.when_connected()
    protocol.dataReceived(connected_frame(version))
    assert result_of(waiting) is None
    assert protocol.is_connected
    assert protocol.version == version


def test_connect_only_1_0_sends_no_accept_version() -> None:
    _, transport, _ = make_protocol(StompSettings(versions=("1.0",)))
    [frame] = sent_frames(transport, "1.0")
    assert "accept-version" not in frame.headers
    assert "heart-beat" not in frame.headers


def test_connected_times_out() -> None:
    protocol, transport, clock = make_protocol(StompSettings(connect_timeout=5))
    waiting = protocol.when_connected()
    clock.advance(5.1)
    assert transport.disconnecting
    protocol.connectionLost()
    failure = result_of(waiting)
    assert failure.check(ConnectionClosed)
    assert "within 5 s" in failure.getErrorMessage()


def test_error_before_connected_fails_with_broker_message() -> None:
    protocol, transport, _ = make_protocol()
    waiting = protocol.when_connected()
    with capturedLogs() as events:
        protocol.dataReceived(
            b"ERROR\nmessage:User name [foo] or password is invalid.\ncontent-length:9\n\n"
            b"Auth fail\x00"
        )
    assert transport.disconnecting
    protocol.connectionLost()
    failure = result_of(waiting)
    assert failure.check(BrokerError)
    assert failure.value.message == "User name [foo] or password is invalid."
    assert "password is invalid" in str(failure.value)
    errors = [e for e in events if e["log_level"] is LogLevel.error]
    assert errors[0]["message"] == "User name [foo] or password is invalid."


def test_passcode_not_in_settings_repr() -> None:
    assert "bar" not in repr(StompSettings(login="foo", passcode="bar"))


# SEND and bodies


def test_send_sets_content_length_for_binary_body() -> None:
    protocol, transport, _ = connect()
    protocol.send("/queue/q", b"hello\x00world")
    raw = transport.value()
    assert b"content-length:11\n" in raw
    [frame] = sent_frames(transport)
    assert frame.command == "SEND"
    assert frame.body == b"hello\x00world"


def test_send_utf8_body_byte_identical() -> None:
    protocol, transport, _ = connect()
    body = "grüße, 世界 ✓".encode()
    protocol.send("/queue/q", body, {"x-note": "naïve"})
    [frame] = sent_frames(transport)
    assert frame.body == body
    assert frame.headers["content-length"] == str(len(body))
    assert frame.headers["x-note"] == "naïve"


def test_send_before_connected_raises() -> None:
    protocol, _, _ = make_protocol()
    with pytest.raises(NotConnected):
        protocol.send("/queue/q", b"x")


def test_message_body_with_nul_delivered_whole() -> None:
    protocol, _, _ = connect()
    received = []
    protocol.subscribe("/topic/t", "s1", received.append, receipt=False)
    protocol.dataReceived(message_frame(b"hello\x00world"))
    assert [m.body for m in received] == [b"hello\x00world"]
    assert received[0].destination == "/topic/t"
    assert received[0].ack_id == "a-1"


# Header escaping


@pytest.mark.parametrize(
    ("version", "wire"),
    [
        ("1.2", b"x-value:a\\cb\\\\c\\nd\\re\n"),
        ("1.1", None),
    ],
)
def test_header_escaping_on_send(version: str, wire: bytes | None) -> None:
    protocol, transport, _ = connect(version=version)
    value = "a:b\\c\nd\re" if version == "1.2" else "a:b\\c\nd"
    protocol.send("/queue/q", b"", {"x-value": value})
    raw = transport.value()
    if wire is not None:
        assert wire in raw
    else:
        assert b"x-value:a\\cb\\\\c\\nd\n" in raw
    [frame] = sent_frames(transport, version)
    assert frame.headers["x-value"] == value


def test_header_not_escaped_in_1_0() -> None:
    protocol, transport, _ = connect(version="1.0")
    protocol.send("/queue/q", b"", {"x-value": "a:b\\c"})
    assert b"x-value:a:b\\c\n" in transport.value()


def test_header_newline_rejected_in_1_0() -> None:
    protocol, _, _ = connect(version="1.0")
    with pytest.raises(ValueError, match="line break"):
        protocol.send("/queue/q", b"", {"x-value": "a\nb"})


def test_header_carriage_return_rejected_in_1_1() -> None:
    protocol, _, _ = connect(version="1.1")
    with pytest.raises(ValueError, match="carriage return"):
        protocol.send("/queue/q", b"", {"x-value": "a\rb"})


def test_incoming_headers_unescaped() -> None:
    protocol, _, _ = connect()
    received = []
    protocol.subscribe("/topic/t", "s1", received.append, receipt=False)
    protocol.dataReceived(message_frame(b"{}", "request_id:a\\cb\\nc\\\\d\n"))
    assert received[0].headers["request_id"] == "a:b\nc\\d"


def test_repeated_header_first_value_wins() -> None:
    protocol, _, _ = connect()
    received = []
    protocol.subscribe("/topic/t", "s1", received.append, receipt=False)
    protocol.dataReceived(message_frame(b"", "x-a:first\nx-a:second\n"))
    assert received[0].headers["x-a"] == "first"


# Split and joined reads


def test_frame_split_at_every_offset() -> None:
    data = message_frame("bødy\x00with nul".encode(), "x-h:v\\c1\n")
    for offset in range(1, len(data)):
        protocol, _, _ = connect()
        received = []
        protocol.subscribe("/topic/t", "s1", received.append, receipt=False)
        protocol.dataReceived(data[:offset])
        assert received == [], offset
        protocol.dataReceived(data[offset:])
        assert [m.body for m in received] == ["bødy\x00with nul".encode()], offset
        assert received[0].headers["x-h"] == "v:1"


def test_frame_fed_byte_by_byte() -> None:
    protocol, _, _ = connect()
    received = []
    protocol.subscribe("/topic/t", "s1", received.append, receipt=False)
    for byte in message_frame(b"abc") + message_frame(b"def"):
        protocol.dataReceived(bytes([byte]))
    assert [m.body for m in received] == [b"abc", b"def"]


def test_several_frames_in_one_read() -> None:
    protocol, transport, _ = make_protocol()
    received = []
    data = connected_frame() + b"\n" + message_frame(b"one") + b"\n\n" + message_frame(b"two")
    waiting = protocol.when_connected()
    # The subscription is registered as soon as CONNECTED is handled.
    waiting.addCallback(lambda _: protocol.subscribe("/topic/t", "s1", received.append, receipt=False))
    protocol.dataReceived(data)
    assert [m.body for m in received] == [b"one", b"two"]


def test_connected_and_message_split_across_reads() -> None:
    protocol, _, _ = make_protocol()
    received = []
    waiting = protocol.when_connected()
    waiting.addCallback(lambda _: protocol.subscribe("/topic/t", "s1", received.append, receipt=False))
    data = connected_frame() + message_frame(b"payload")
    middle = len(connected_frame()) - 3
    protocol.dataReceived(data[:middle])
    protocol.dataReceived(data[middle:])
    assert [m.body for m in received] == [b"payload"]


# Heart-beats


def test_heart_beats_sent_when_idle() -> None:
    protocol, transport, clock = connect(
        StompSettings(heart_beat=(1000, 0)), heart_beat="0,1000"
    )
    clock.advance(0.4)
    assert transport.value() == b""
    clock.advance(0.2)
    assert transport.value() == b"\n"


def test_heart_beats_skipped_while_sending() -> None:
    protocol, transport, clock = connect(
        StompSettings(heart_beat=(1000, 0)), heart_beat="0,1000"
    )
    for _ in range(10):
        clock.advance(0.25)
        protocol.send("/queue/q", b"x")
    assert b"\n\n\x00" not in transport.value().replace(b"\n\nx\x00", b"")
    assert not transport.value().startswith(b"\n")


def test_heart_beat_period_uses_larger_of_both_sides() -> None:
    protocol, transport, clock = connect(
        StompSettings(heart_beat=(1000, 0)), heart_beat="0,3000"
    )
    clock.advance(1.4)
    assert transport.value() == b""
    clock.advance(1.6)
    assert b"\n" in transport.value()


def test_missing_server_heart_beats_close_connection() -> None:
    protocol, transport, clock = connect(
        StompSettings(heart_beat=(0, 2000), heart_beat_grace=0.5), heart_beat="2000,0"
    )
    clock.advance(2.0)
    assert not transport.disconnecting
    clock.advance(1.0)
    assert not transport.disconnecting
    with capturedLogs() as events:
        clock.advance(1.0)
    assert transport.disconnected  # abortConnection on a StringTransport
    assert isinstance(protocol.error, HeartBeatTimeout)
    assert any("heart-beat" in e.get("error", "") for e in events)


def test_server_heart_beats_keep_connection() -> None:
    protocol, transport, clock = connect(
        StompSettings(heart_beat=(0, 2000), heart_beat_grace=0.5), heart_beat="2000,0"
    )
    for _ in range(20):
        clock.advance(1.9)
        protocol.dataReceived(b"\n")
    assert not transport.disconnecting
    assert protocol.error is None


def test_heart_beats_stop_when_connection_lost() -> None:
    protocol, _, clock = connect(StompSettings(heart_beat=(1000, 1000)), heart_beat="1000,1000")
    protocol.connectionLost()
    assert clock.getDelayedCalls() == []


def test_no_heart_beats_when_broker_declines() -> None:
    _, _, clock = connect(StompSettings(heart_beat=(1000, 1000)), heart_beat="0,0")
    assert clock.getDelayedCalls() == []


# Receipts


def test_receipt_fires_deferred() -> None:
    protocol, transport, _ = connect()
    sending = protocol.send("/queue/q", b"x", receipt=True)
    [frame] = sent_frames(transport)
    receipt_id = frame.headers["receipt"]
    assert not sending.called
    protocol.dataReceived(f"RECEIPT\nreceipt-id:{receipt_id}\n\n".encode() + b"\x00")
    assert result_of(sending) is None


def test_receipts_matched_by_id() -> None:
    protocol, transport, _ = connect()
    first = protocol.send("/queue/q", b"1", receipt=True)
    second = protocol.send("/queue/q", b"2", receipt=True)
    frames = sent_frames(transport)
    second_id = frames[1].headers["receipt"]
    protocol.dataReceived(f"RECEIPT\nreceipt-id:{second_id}\n\n".encode() + b"\x00")
    assert second.called
    assert not first.called


def test_unexpected_receipt_logged() -> None:
    protocol, _, _ = connect()
    with capturedLogs() as events:
        protocol.dataReceived(b"RECEIPT\nreceipt-id:nobody\n\n\x00")
    assert any(e.get("receipt_id") == "nobody" for e in events)
    assert protocol.is_connected


def test_error_with_receipt_id_fails_that_send() -> None:
    protocol, transport, _ = connect()
    sending = protocol.send("/topic/other.tasks", b"x", receipt=True)
    other = protocol.send("/queue/q", b"y", receipt=True)
    receipt_id = sent_frames(transport)[0].headers["receipt"]
    protocol.dataReceived(
        f"ERROR\nreceipt-id:{receipt_id}\nmessage:User foo is not authorized to write to\\c"
        " topic\\c//other.tasks\n\n".encode()
        + b"\x00"
    )
    failure = result_of(sending)
    assert failure.check(BrokerError)
    assert "not authorized" in failure.value.message
    assert transport.disconnecting
    protocol.connectionLost()
    assert result_of(other).check(BrokerError)


def test_connection_lost_fails_pending_receipts() -> None:
    protocol, _, _ = connect()
    sending = protocol.send("/queue/q", b"x", receipt=True)
    protocol.connectionLost()
    assert result_of(sending).check(ConnectionClosed)


def test_subscribe_waits_for_receipt() -> None:
    protocol, transport, _ = connect()
    subscribed = protocol.subscribe("/queue/q", "s1", lambda m: None, ack="client-individual")
    [frame] = sent_frames(transport)
    assert frame.command == "SUBSCRIBE"
    assert frame.headers["id"] == "s1"
    assert frame.headers["ack"] == "client-individual"
    protocol.dataReceived(f"RECEIPT\nreceipt-id:{frame.headers['receipt']}\n\n".encode() + b"\x00")
    assert result_of(subscribed) is None


def test_subscribe_rejects_unknown_ack_mode() -> None:
    protocol, _, _ = connect()
    with pytest.raises(ValueError, match="invalid ack mode"):
        protocol.subscribe("/queue/q", "s1", lambda m: None, ack="sometimes")


def test_ack_and_nack_use_ack_header_in_1_2() -> None:
    protocol, transport, _ = connect()
    received = []
    protocol.subscribe("/queue/q", "s1", received.append, ack="client-individual", receipt=False)
    transport.clear()
    protocol.dataReceived(message_frame(b"x"))
    protocol.ack(received[0])
    protocol.nack(received[0])
    ack, nack = sent_frames(transport)
    assert (ack.command, ack.headers["id"]) == ("ACK", "a-1")
    assert (nack.command, nack.headers["id"]) == ("NACK", "a-1")


def test_ack_uses_message_id_in_1_1() -> None:
    protocol, transport, _ = connect(version="1.1")
    received = []
    protocol.subscribe("/queue/q", "s1", received.append, ack="client", receipt=False)
    transport.clear()
    protocol.dataReceived(message_frame(b"x"))
    protocol.ack(received[0])
    [ack] = sent_frames(transport, "1.1")
    assert ack.headers["message-id"] == "m-1"
    assert ack.headers["subscription"] == "s1"


# Errors, bad input and disconnect


def test_error_after_connected_closes_session() -> None:
    protocol, transport, _ = connect()
    with capturedLogs() as events:
        protocol.dataReceived(b"ERROR\nmessage:Broker shutting down\n\n\x00")
    assert transport.disconnecting
    assert isinstance(protocol.error, BrokerError)
    assert any(e.get("message") == "Broker shutting down" for e in events)


def test_handler_failure_logged_not_raised() -> None:
    protocol, _, _ = connect()

    def broken(message: object) -> None:
        raise RuntimeError("handler bug")

    protocol.subscribe("/topic/t", "s1", broken, receipt=False)
    with capturedLogs() as events:
        protocol.dataReceived(message_frame(b"x") + message_frame(b"y"))
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 2
    assert protocol.is_connected


def test_message_for_unknown_subscription_dropped() -> None:
    protocol, _, _ = connect()
    with capturedLogs() as events:
        protocol.dataReceived(message_frame(b"x", subscription="nobody"))
    assert any(e.get("subscription") == "nobody" for e in events)
    assert protocol.is_connected


def test_invalid_command_closes_connection() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(b"HELLO\n\n\x00")
    assert transport.disconnecting
    assert isinstance(protocol.error, ProtocolViolation)
    assert "HELLO" in str(protocol.error)


def test_header_without_separator_closes_connection() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(b"MESSAGE\nno separator here\n\n\x00")
    assert transport.disconnecting
    assert isinstance(protocol.error, ProtocolViolation)


def test_oversized_frame_closes_connection() -> None:
    protocol, transport, _ = connect(StompSettings(max_frame_size=1000))
    protocol.dataReceived(b"MESSAGE\ndestination:/topic/t\n\n" + b"x" * 2000)
    assert transport.disconnected
    assert isinstance(protocol.error, FrameTooLarge)


def test_frame_below_limit_accepted() -> None:
    protocol, _, _ = connect(StompSettings(max_frame_size=1000))
    received = []
    protocol.subscribe("/topic/t", "s1", received.append, receipt=False)
    protocol.dataReceived(message_frame(b"x" * 800))
    assert len(received[0].body) == 800


def test_disconnect_waits_for_receipt() -> None:
    protocol, transport, _ = connect()
    closed = protocol.disconnect()
    [frame] = sent_frames(transport)
    assert frame.command == "DISCONNECT"
    assert not transport.disconnecting
    protocol.dataReceived(f"RECEIPT\nreceipt-id:{frame.headers['receipt']}\n\n".encode() + b"\x00")
    assert transport.disconnecting
    assert not closed.called
    protocol.connectionLost()
    assert result_of(closed) is None


def test_disconnect_closes_without_receipt_after_timeout() -> None:
    protocol, transport, clock = connect(StompSettings(disconnect_timeout=2))
    closed = protocol.disconnect()
    clock.advance(2)
    assert transport.disconnecting
    protocol.connectionLost()
    assert closed.called
    assert clock.getDelayedCalls() == []


def test_declared_oversized_frame_rejected_before_body() -> None:
    protocol, transport, _ = connect(StompSettings(max_frame_size=1000))
    protocol.dataReceived(b"MESSAGE\ndestination:/topic/t\ncontent-length:5000\n\nxx")
    assert transport.disconnected
    assert isinstance(protocol.error, FrameTooLarge)
    assert "declares content-length 5000" in str(protocol.error)

"""Check the private node of the "rabbitmq" fixture with raw STOMP frames.

These tests also record how RabbitMQ 3.10's STOMP plugin behaves where
brokers differ: ERROR messages, bodies with NUL bytes, NACK, prefetch and
permissions.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest

pytestmark = pytest.mark.broker

FRAME_TIMEOUT = 10.0  # seconds to wait for a frame that must arrive
QUIET_PERIOD = 1.0  # seconds without a frame that count as "nothing arrives"

Frame = tuple[str, dict[str, str], bytes]


class StompConnection:
    """A STOMP 1.2 connection that sends raw bytes and parses whole frames."""

    def __init__(self, broker) -> None:
        self.socket = socket.create_connection((broker.host, broker.port), timeout=FRAME_TIMEOUT)
        self.buffer = b""
        # Frames that arrived while wait_for_receipt looked for a RECEIPT.
        self.pending: list[Frame] = []

    def close(self) -> None:
        self.socket.close()

    def send(self, raw: bytes) -> None:
        self.socket.sendall(raw)

    def connect(self, login: str | None, passcode: str | None, vhost: str | None) -> Frame:
        """Send CONNECT, leaving out the headers that are None, and return the reply."""
        lines = ["CONNECT", "accept-version:1.2"]
        if vhost is not None:
            lines.append(f"host:{vhost}")
        if login is not None:
            lines.append(f"login:{login}")
        if passcode is not None:
            lines.append(f"passcode:{passcode}")
        self.send(("\n".join(lines) + "\n\n\0").encode())
        return self.read_frame()

    def read_frame(self, timeout: float = FRAME_TIMEOUT) -> Frame:
        """Return the next frame. Raises TimeoutError when none arrives in time.

        A content-length header sets the body length. Without it the body
        ends at the first NUL byte.
        """
        if self.pending:
            return self.pending.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse_buffered_frame()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete frame within {timeout:g} s, buffered {self.buffer!r}")
            self.socket.settimeout(remaining)
            try:
                chunk = self.socket.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise ConnectionError(f"broker closed the connection, buffered {self.buffer!r}")
            self.buffer += chunk

    def wait_for_receipt(self, receipt_id: str) -> None:
        """Read frames until the RECEIPT for receipt_id, keeping the others for read_frame.

        Raises AssertionError when an ERROR arrives first.
        """
        stashed = []
        while True:
            frame = self.read_frame()
            if frame[0] == "RECEIPT" and frame[1].get("receipt-id") == receipt_id:
                break
            assert frame[0] != "ERROR", describe(frame)
            stashed.append(frame)
        self.pending.extend(stashed)

    def expect_no_frame(self, period: float = QUIET_PERIOD) -> Frame | None:
        """Return the frame that arrives within period seconds, or None."""
        try:
            return self.read_frame(period)
        except TimeoutError:
            return None

    def is_closed_by_broker(self, timeout: float = FRAME_TIMEOUT) -> bool:
        """Return whether the broker closes the connection within timeout seconds."""
        try:
            self.read_frame(timeout)
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return False

    def _parse_buffered_frame(self) -> Frame | None:
        # End-of-line characters between frames are heart-beats.
        self.buffer = self.buffer.lstrip(b"\r\n")
        head, separator, rest = self.buffer.partition(b"\n\n")
        if not separator:
            return None
        lines = head.decode("utf-8", "replace").split("\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            # STOMP 1.2: when a header repeats, the first value counts.
            headers.setdefault(name, value)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length + 1:
                return None
            body, self.buffer = rest[:length], rest[length + 1 :]
        else:
            body, terminator, remainder = rest.partition(b"\0")
            if not terminator:
                return None
            self.buffer = remainder
        return lines[0], headers, body


def describe(frame: Frame) -> str:
    command, headers, body = frame
    return f"{command} message={headers.get('message')!r} headers={headers} body={body!r}"


def open_session(broker) -> StompConnection:
    """Return a connection that has logged in as broker.login."""
    connection = StompConnection(broker)
    reply = connection.connect(broker.login, broker.passcode, broker.vhost)
    assert reply[0] == "CONNECTED", describe(reply)
    return connection


def subscribe(connection: StompConnection, destination: str, subscription_id: str, **headers: str) -> None:
    """Subscribe and wait for the receipt, so that later messages reach the subscription."""
    extra = "".join(f"{name.replace('_', '-')}:{value}\n" for name, value in headers.items())
    receipt = f"subscribe-{subscription_id}"
    connection.send(
        f"SUBSCRIBE\nid:{subscription_id}\ndestination:{destination}\n{extra}"
        f"receipt:{receipt}\n\n\0".encode()
    )
    connection.wait_for_receipt(receipt)


def send(connection: StompConnection, destination: str, body: bytes, *header_lines: str) -> None:
    """Send body with a content-length header and wait for the receipt."""
    receipt = uuid.uuid4().hex
    head = "".join(line + "\n" for line in header_lines)
    connection.send(
        f"SEND\ndestination:{destination}\n{head}content-length:{len(body)}\n"
        f"receipt:{receipt}\n\n".encode()
        + body
        + b"\0"
    )
    # On a connection that also subscribes, the MESSAGE may come first.
    connection.wait_for_receipt(receipt)


def unique_queue(broker, label: str) -> str:
    return f"/queue/{broker.namespace}.{label}.{uuid.uuid4().hex}"


def queue_message_count(broker, destination: str) -> int:
    """Return the ready plus unacknowledged messages of a /queue/ destination."""
    queue_name = destination.removeprefix("/queue/")
    output = broker.rabbitmqctl("list_queues", "name", "messages", "--silent")
    for line in output.splitlines():
        name, _, count = line.partition("\t")
        if name == queue_name:
            return int(count)
    raise AssertionError(f"queue {queue_name} not found in rabbitmqctl list_queues:\n{output}")


# --- Fixture and CONNECT -------------------------------------------------------


def test_fixture_attributes(rabbitmq):
    assert rabbitmq.kind == "rabbitmq"
    assert rabbitmq.host == "127.0.0.1"
    assert rabbitmq.uri == f"tcp://{rabbitmq.host}:{rabbitmq.port}"
    assert rabbitmq.vhost == "/"
    assert rabbitmq.namespace == "myapp"
    assert rabbitmq.log_path.is_file()
    assert rabbitmq.is_ready()


def test_broker_fixture_runs_each_kind(broker, request):
    # The parametrized "broker" fixture yields the ActiveMQ and the RabbitMQ
    # fixture in turn.
    assert broker.kind == request.node.callspec.params["broker"]
    assert broker.uri == f"tcp://{broker.host}:{broker.port}"
    assert broker.is_ready()


def test_connect_with_valid_passcode(rabbitmq):
    connection = StompConnection(rabbitmq)
    reply = connection.connect(rabbitmq.login, rabbitmq.passcode, rabbitmq.vhost)
    connection.close()

    command, headers, _body = reply
    assert command == "CONNECTED", describe(reply)
    assert headers.get("version") == "1.2"
    assert headers.get("server", "").startswith("RabbitMQ/3.10."), describe(reply)


def test_connect_with_wrong_passcode(rabbitmq):
    connection = StompConnection(rabbitmq)
    reply = connection.connect(rabbitmq.login, "wrong-" + rabbitmq.passcode, rabbitmq.vhost)

    command, headers, body = reply
    assert command == "ERROR", f"broker accepted a wrong passcode: {describe(reply)}"
    assert headers.get("message") == "Bad CONNECT", describe(reply)
    assert body == f"Access refused for user '{rabbitmq.login}'\n".encode(), describe(reply)
    # RabbitMQ 3.10.8 does not close the connection with the ERROR. It
    # closed it about 10 s later in every run seen.
    assert connection.is_closed_by_broker(timeout=20.0)
    connection.close()


def test_connect_without_login_is_rejected(rabbitmq):
    # Without a login header the STOMP plugin logs in as its default user
    # "guest", which the fixture deletes, as etc/rabbitmq/rabbitmq.conf
    # advises operators to do.
    connection = StompConnection(rabbitmq)
    reply = connection.connect(None, None, rabbitmq.vhost)
    connection.close()

    command, headers, body = reply
    assert command == "ERROR", f"broker accepted a CONNECT without login: {describe(reply)}"
    assert headers.get("message") == "Bad CONNECT", describe(reply)
    assert body == b"Access refused for user 'guest'\n", describe(reply)


def test_connect_with_host_name_as_vhost(rabbitmq):
    # STOMP 1.2 suggests the server's host name for the host header, but
    # RabbitMQ treats it as a virtual host name.
    connection = StompConnection(rabbitmq)
    reply = connection.connect(rabbitmq.login, rabbitmq.passcode, rabbitmq.host)
    connection.close()

    command, headers, body = reply
    assert command == "ERROR", describe(reply)
    assert headers.get("message") == "Bad CONNECT", describe(reply)
    assert body == f"Virtual host '{rabbitmq.host}' access denied".encode(), describe(reply)


def test_connect_without_host_header_uses_default_vhost(rabbitmq):
    connection = StompConnection(rabbitmq)
    reply = connection.connect(rabbitmq.login, rabbitmq.passcode, None)
    connection.close()

    assert reply[0] == "CONNECTED", describe(reply)


# --- Bodies with NUL bytes -----------------------------------------------------


def test_body_with_nul_and_content_length_arrives_whole(rabbitmq):
    destination = unique_queue(rabbitmq, "nul")
    consumer = open_session(rabbitmq)
    producer = open_session(rabbitmq)
    subscribe(consumer, destination, "1")

    send(producer, destination, b"hello\x00world")
    message = consumer.read_frame()
    producer.close()
    consumer.close()

    assert message[0] == "MESSAGE", describe(message)
    assert message[2] == b"hello\x00world", describe(message)
    assert message[1].get("content-length") == "11", describe(message)


def test_body_with_nul_without_content_length_is_cut(rabbitmq):
    destination = unique_queue(rabbitmq, "nul")
    consumer = open_session(rabbitmq)
    producer = open_session(rabbitmq)
    subscribe(consumer, destination, "1")

    producer.send(f"SEND\ndestination:{destination}\n\nhello\x00world\x00".encode())
    message = consumer.read_frame()

    assert message[0] == "MESSAGE", describe(message)
    assert message[2] == b"hello", describe(message)
    # The broker adds content-length to the MESSAGE frame.
    assert message[1].get("content-length") == "5", describe(message)
    assert consumer.expect_no_frame() is None

    # The broker parses "world\0" as the start of the next frame, so the
    # next frame from the producer is rejected.
    producer.send(b"DISCONNECT\nreceipt:bye\n\n\0")
    reply = producer.read_frame()
    producer.close()
    consumer.close()

    assert reply[0] == "ERROR", describe(reply)
    assert reply[1].get("message") == "Bad command", describe(reply)
    assert reply[2].startswith(b"Could not interpret command ["), describe(reply)


# --- Topics and headers --------------------------------------------------------


def test_topic_message_reaches_both_subscribers(rabbitmq):
    destination = f"/topic/{rabbitmq.namespace}.tasks.{uuid.uuid4().hex}"
    first = open_session(rabbitmq)
    second = open_session(rabbitmq)
    producer = open_session(rabbitmq)
    subscribe(first, destination, "first")
    subscribe(second, destination, "second")

    send(producer, destination, b'{"task": "sleep"}', "content-type:application/json")
    messages = [first.read_frame(), second.read_frame()]
    for connection in (first, second, producer):
        connection.close()

    for message, subscription in zip(messages, ("first", "second")):
        assert message[0] == "MESSAGE", describe(message)
        assert message[1].get("subscription") == subscription, describe(message)
        assert message[1].get("destination") == destination, describe(message)
        assert message[2] == b'{"task": "sleep"}', describe(message)


def test_send_headers_pass_through(rabbitmq):
    destination = unique_queue(rabbitmq, "headers")
    consumer = open_session(rabbitmq)
    producer = open_session(rabbitmq)
    subscribe(consumer, destination, "1")

    send(producer, destination, b"{}", "request_id:r-42", "content-type:application/json")
    message = consumer.read_frame()
    producer.close()
    consumer.close()

    headers = message[1]
    assert headers.get("request_id") == "r-42", describe(message)
    assert headers.get("content-type") == "application/json", describe(message)
    assert headers.get("redelivered") == "false", describe(message)
    # RabbitMQ 3.10 copies the SEND frame's receipt header onto the MESSAGE.
    assert "receipt" in headers, describe(message)


# --- Acknowledgements and prefetch ---------------------------------------------


def test_nack_requeues_at_once_as_redelivered(rabbitmq):
    destination = unique_queue(rabbitmq, "nack")
    connection = open_session(rabbitmq)
    subscribe(connection, destination, "1", ack="client-individual")
    send(connection, destination, b"one")
    first = connection.read_frame()
    assert first[0] == "MESSAGE", describe(first)
    assert first[1].get("redelivered") == "false", describe(first)
    assert first[1].get("ack"), f"MESSAGE without ack header: {describe(first)}"

    nacked_at = time.monotonic()
    connection.send(f"NACK\nid:{first[1]['ack']}\n\n\0".encode())
    second = connection.read_frame()
    delay = time.monotonic() - nacked_at
    connection.send(f"ACK\nid:{second[1].get('ack')}\n\n\0".encode())
    connection.close()

    assert second[0] == "MESSAGE", describe(second)
    assert second[2] == b"one", describe(second)
    assert second[1].get("redelivered") == "true", describe(second)
    assert second[1].get("ack") != first[1]["ack"], describe(second)
    assert delay < 2.0, f"NACKed message came back after {delay:.2f} s"


def test_nack_requeue_false_drops_message(rabbitmq):
    destination = unique_queue(rabbitmq, "drop")
    connection = open_session(rabbitmq)
    subscribe(connection, destination, "1", ack="client-individual")
    send(connection, destination, b"one")
    message = connection.read_frame()
    assert message[0] == "MESSAGE", describe(message)

    connection.send(f"NACK\nid:{message[1]['ack']}\nrequeue:false\nreceipt:nack\n\n\0".encode())
    connection.wait_for_receipt("nack")
    redelivery = connection.expect_no_frame()
    connection.close()

    assert redelivery is None, f"NACK with requeue:false redelivered: {describe(redelivery)}"
    # No dead-letter exchange is configured, so the message is gone.
    assert queue_message_count(rabbitmq, destination) == 0


def test_unacked_message_returns_after_disconnect(rabbitmq):
    destination = unique_queue(rabbitmq, "unacked")
    first = open_session(rabbitmq)
    subscribe(first, destination, "1", ack="client-individual")
    send(first, destination, b"one")
    assert first.read_frame()[0] == "MESSAGE"
    first.close()

    second = open_session(rabbitmq)
    subscribe(second, destination, "1", ack="client-individual")
    message = second.read_frame()
    second.close()

    assert message[2] == b"one", describe(message)
    assert message[1].get("redelivered") == "true", describe(message)


def test_prefetch_count_limits_unacked_messages(rabbitmq):
    destination = unique_queue(rabbitmq, "prefetch")
    producer = open_session(rabbitmq)
    for number in range(3):
        send(producer, destination, str(number).encode())
    producer.close()

    consumer = open_session(rabbitmq)
    subscribe(consumer, destination, "1", ack="client-individual", prefetch_count="1")
    first = consumer.read_frame()
    held_back = consumer.expect_no_frame()
    consumer.send(f"ACK\nid:{first[1]['ack']}\n\n\0".encode())
    second = consumer.read_frame()
    consumer.close()

    assert first[2] == b"0", describe(first)
    assert held_back is None, f"second message arrived before the ACK: {describe(held_back)}"
    assert second[2] == b"1", describe(second)


def test_expiration_header_drops_expired_message(rabbitmq):
    # RabbitMQ's STOMP "expiration" header is a time-to-live in milliseconds.
    destination = unique_queue(rabbitmq, "expiration")
    producer = open_session(rabbitmq)
    send(producer, destination, b"expires", "expiration:200")
    send(producer, destination, b"stays")
    producer.close()
    time.sleep(0.5)

    consumer = open_session(rabbitmq)
    subscribe(consumer, destination, "1")
    message = consumer.read_frame()
    leftover = consumer.expect_no_frame()
    consumer.close()

    assert message[2] == b"stays", describe(message)
    assert leftover is None, f"unexpected second message: {describe(leftover)}"


# --- Permissions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "destination", "expected_body"),
    [
        (
            "SEND",
            "/queue/other.x",
            "ACCESS_REFUSED - access to queue 'other.x' in vhost '/' refused for user 'foo'",
        ),
        (
            "SUBSCRIBE",
            "/queue/other.x",
            "ACCESS_REFUSED - access to queue 'other.x' in vhost '/' refused for user 'foo'",
        ),
        (
            "SEND",
            "/topic/other.x",
            "ACCESS_REFUSED - access to topic 'other.x' in exchange 'amq.topic' in vhost '/' "
            "refused for user 'foo'",
        ),
        (
            # RabbitMQ 3.10 leaves out the "ACCESS_REFUSED - " prefix here.
            "SUBSCRIBE",
            "/topic/other.x",
            "access to topic 'other.x' in exchange 'amq.topic' in vhost '/' refused for user 'foo'",
        ),
    ],
)
def test_destination_outside_namespace_is_refused(rabbitmq, frame, destination, expected_body):
    connection = open_session(rabbitmq)
    if frame == "SEND":
        connection.send(f"SEND\ndestination:{destination}\ncontent-length:2\n\nhi\0".encode())
    else:
        connection.send(f"SUBSCRIBE\nid:1\ndestination:{destination}\n\n\0".encode())
    reply = connection.read_frame()

    command, headers, body = reply
    assert command == "ERROR", f"{frame} to {destination} was accepted: {describe(reply)}"
    assert headers.get("message") == "access_refused", describe(reply)
    assert body == expected_body.encode(), describe(reply)
    # After a refused SUBSCRIBE, RabbitMQ 3.10 still sends any RECEIPT, then
    # closes the connection like after a refused SEND.
    assert connection.is_closed_by_broker()
    connection.close()


@pytest.mark.parametrize("kind", ["queue", "topic"])
def test_destination_inside_namespace_is_allowed(rabbitmq, kind):
    destination = f"/{kind}/{rabbitmq.namespace}.allowed.{uuid.uuid4().hex}"
    connection = open_session(rabbitmq)
    subscribe(connection, destination, "1")
    send(connection, destination, b"hi")
    message = connection.read_frame()
    connection.close()

    assert message[0] == "MESSAGE", describe(message)
    assert message[2] == b"hi", describe(message)


# --- Restart -------------------------------------------------------------------


def test_kill_keeps_account_and_persistent_messages(rabbitmq):
    destination = unique_queue(rabbitmq, "crash")
    producer = open_session(rabbitmq)
    send(producer, destination, b"persistent", "persistent:true")
    send(producer, destination, b"transient")
    producer.close()
    port = rabbitmq.port

    rabbitmq.kill()
    assert rabbitmq.pid() is None
    rabbitmq.start()

    assert rabbitmq.port == port
    consumer = open_session(rabbitmq)
    subscribe(consumer, destination, "1")
    message = consumer.read_frame()
    leftover = consumer.expect_no_frame()
    consumer.close()

    assert message[2] == b"persistent", describe(message)
    assert message[1].get("persistent") == "true", describe(message)
    assert leftover is None, f"a transient message survived SIGKILL: {describe(leftover)}"

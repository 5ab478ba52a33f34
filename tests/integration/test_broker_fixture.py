"""Check the private broker of the "activemq" fixture with raw STOMP frames."""

import socket
import uuid

import pytest

pytestmark = pytest.mark.broker

FRAME_TIMEOUT = 10.0  # seconds to wait for the broker's reply


def read_frame(connection: socket.socket) -> tuple[str, dict[str, str]]:
    """Read one STOMP frame and return its command and raw headers."""
    received = b""
    while b"\0" not in received:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError(f"broker closed the connection after sending {received!r}")
        received += chunk
    frame = received.split(b"\0", 1)[0].decode("utf-8", "replace").lstrip("\r\n")
    lines = frame.split("\n\n", 1)[0].split("\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name, value)
    return lines[0], headers


def open_session(broker, passcode: str) -> tuple[socket.socket, str, dict[str, str]]:
    """Connect to broker, send CONNECT as broker.login and read the reply."""
    connection = socket.create_connection((broker.host, broker.port), timeout=FRAME_TIMEOUT)
    connection.sendall(
        f"CONNECT\naccept-version:1.2\nhost:localhost\n"
        f"login:{broker.login}\npasscode:{passcode}\n\n\0".encode()
    )
    command, headers = read_frame(connection)
    return connection, command, headers


def test_fixture_uri_matches_address(activemq):
    assert activemq.uri == f"tcp://{activemq.host}:{activemq.port}"
    assert activemq.host == "127.0.0.1"


def test_connect_with_valid_passcode(activemq):
    connection, command, headers = open_session(activemq, activemq.passcode)
    connection.close()

    assert command == "CONNECTED", f"broker replied {command}: {headers.get('message')}"
    assert headers.get("version") == "1.2"


def test_connect_with_wrong_passcode(activemq):
    connection, command, headers = open_session(activemq, "wrong-" + activemq.passcode)
    connection.close()

    assert command == "ERROR", f"broker accepted a wrong passcode: {command} {headers}"
    assert headers.get("message"), f"ERROR frame without message header: {headers}"


@pytest.mark.parametrize(
    ("destination_prefix", "expected_reply"),
    [
        ("/queue/{namespace}.", "RECEIPT"),
        ("/topic/{namespace}.", "RECEIPT"),
        ("/queue/outside-{namespace}.", "ERROR"),
    ],
)
def test_send_allowed_only_in_namespace(activemq, destination_prefix, expected_reply):
    # A unique name, so no other test ever receives this message.
    destination = destination_prefix.format(namespace=activemq.namespace) + uuid.uuid4().hex
    connection, command, headers = open_session(activemq, activemq.passcode)
    assert command == "CONNECTED", f"broker replied {command}: {headers.get('message')}"

    connection.sendall(
        f"SEND\ndestination:{destination}\nreceipt:send-1\n"
        f"content-type:text/plain\ncontent-length:2\n\nhi\0".encode()
    )
    reply, reply_headers = read_frame(connection)
    connection.close()

    assert reply == expected_reply, (
        f"SEND to {destination} got {reply}: {reply_headers.get('message')}"
    )

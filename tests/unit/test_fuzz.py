"""
Property-based fuzz tests for everything that parses input from the broker:
the STOMP client protocol, the message decoder and the signature verifier.

Every test has a fixed example budget and a fixed seed (``derandomize``), so
each run tries the same inputs and takes about the same time. Together they
take about 10 s on one core; ``FUZZ_SETTINGS`` sets the budget.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from taskmesh._messages import (
    AcceptedMessage,
    Announcement,
    CancelMessage,
    DiscoverMessage,
    DispatchMode,
    ErrorMessage,
    InvalidMessage,
    Message,
    MessageType,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
)
from taskmesh.security import (
    MessageRejected,
    PayloadCipher,
    SignatureRejected,
    Signer,
    Verifier,
    open_message,
    seal_message,
)
from taskmesh.security._canonical import SIGNATURE_HEADERS, SIGNED_HEADERS
from taskmesh.security._keys import SigningKey, generate_signing_key, generate_symmetric_key
from taskmesh.stomp import StompClientProtocol, StompMessage, StompSettings

from .stomp_helpers import connected_frame, make_protocol


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


REQUEST_ID = "0b6f4f1e-8a51-4c55-9a3c-5d1f6a2b9e10"
TASKS = "/topic/myapp.tasks"
REPLY = "/queue/myapp.reply"
NOW = 1_750_000_000.0

# A small limit, so that fuzzed content-length headers and long inputs reach it.
MAX_FRAME_SIZE = 2048


# -- Frames -----------------------------------------------------------------


def frame(command: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = "".join(f"{name}:{value}\n" for name, value in headers)
    return f"{command}\n{head}\n".encode() + body + b"\x00"


def message_frame(body: bytes = b'{"result": 1}', subscription: str = "s1") -> bytes:
    return frame(
        "MESSAGE",
        [
            ("destination", REPLY),
            ("message-id", "ID\\cm-1"),
            ("subscription", subscription),
            ("ack", "a-1"),
            ("content-type", "application/json;charset=utf-8"),
            ("content-length", str(len(body))),
            ("taskmesh-type", "result"),
            ("request_id", REQUEST_ID),
            ("slave_id", "b1"),
        ],
        body,
    )


CONNECTED_FRAMES = [
    connected_frame("1.2", "0,0"),
    connected_frame("1.1", "1000,1000"),
    connected_frame("1.0"),
]

SEED_FRAMES = [
    message_frame(),
    message_frame(b"\x00binary\x00body\x00"),
    message_frame(b"", subscription="unknown"),
    frame(
        "MESSAGE",
        [("destination", REPLY), ("subscription", "s1"), ("message-id", "m-2")],
        b"no length",
    ),
    frame("MESSAGE", [("subscription", "s1"), ("escaped", "a\\cb\\nc\\\\d")], b"{}"),
    frame("RECEIPT", [("receipt-id", "taskmesh-1")]),
    frame("RECEIPT", [("receipt-id", "unexpected")]),
    frame(
        "ERROR",
        [("message", "denied"), ("receipt-id", "taskmesh-1"), ("content-length", "4")],
        b"oops",
    ),
    frame("ERROR", [("message", "bad")], b"details"),
    b"\n",
    b"\r\n",
]

# Replacements for the bytes of a content-length value.
CONTENT_LENGTHS = [
    b"0",
    b"-1",
    b"abc",
    b"",
    b" 5",
    b"99999999999999999999",
    b"1e3",
    b"\xff",
    b"4096",
]


@st.composite
def mutated_stream(draw: st.DrawFn, connected: bool) -> bytes:
    """
    Draw a sequence of valid frames, then damage it in a few ways.

    For a protocol that waits for CONNECTED, nine in ten sequences start with
    a CONNECTED frame. For a connected protocol, one in ten does.
    """
    frames = draw(st.lists(st.sampled_from(SEED_FRAMES), min_size=1, max_size=6))
    starts_with_connected = draw(st.integers(min_value=0, max_value=9)) == 0
    if starts_with_connected == connected:
        frames.insert(0, draw(st.sampled_from(CONNECTED_FRAMES)))
    data = bytearray(b"".join(frames))
    mutations = draw(st.integers(min_value=0, max_value=4))
    for _ in range(mutations):
        kind = draw(
            st.sampled_from(["flip", "insert", "delete", "truncate", "length", "duplicate"])
        )
        if not data:
            break
        position = draw(st.integers(min_value=0, max_value=len(data) - 1))
        if kind == "flip":
            data[position] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "insert":
            data[position:position] = draw(
                st.binary(max_size=8)
                | st.sampled_from([b"\x00", b"\n", b":", b"\\", b"\r\n", b"\xc3"])
            )
        elif kind == "delete":
            end = draw(st.integers(min_value=position, max_value=min(len(data), position + 16)))
            del data[position:end]
        elif kind == "truncate":
            del data[position:]
        elif kind == "length":
            start = data.find(b"content-length:")
            if start >= 0:
                value_start = start + len(b"content-length:")
                value_end = data.find(b"\n", value_start)
                if value_end < 0:
                    value_end = len(data)
                data[value_start:value_end] = draw(st.sampled_from(CONTENT_LENGTHS))
        elif kind == "duplicate":
            end = draw(st.integers(min_value=position, max_value=len(data)))
            data[end:end] = data[position:end]
    return bytes(data)


def split(data: bytes, points: list[int]) -> list[bytes]:
    """
    Cut ``data`` into chunks at ``points`` (any values; they are clamped).
    """
    cuts = sorted({min(max(point, 0), len(data)) for point in points} | {0, len(data)})
    return [data[start:end] for start, end in zip(cuts, cuts[1:])] or [b""]


class Recorder:
    """
    A message handler that records what it gets and when.
    """

    def __init__(self, protocol: StompClientProtocol) -> None:
        self.protocol = protocol
        self.messages: list[StompMessage] = []
        self.after_error: list[StompMessage] = []

    def __call__(self, message: StompMessage) -> None:
        if self.protocol.error is not None:
            self.after_error.append(message)
        self.messages.append(message)


def protocol_under_test(
    connected: bool, version: str = "1.2"
) -> tuple[StompClientProtocol, StringTransport, Clock, Recorder]:
    """
    Build a protocol that waits for CONNECTED, or one that is connected with
    ``version``, a subscription ``s1`` and a pending receipt ``taskmesh-1``.
    """
    stomp_settings = StompSettings(login="foo", passcode="bar", max_frame_size=MAX_FRAME_SIZE)
    protocol, transport, clock = make_protocol(stomp_settings)
    recorder = Recorder(protocol)
    if connected:
        protocol.dataReceived(connected_frame(version, "0,0"))
        assert protocol.version == version
        subscribed = protocol.subscribe("/queue/myapp.reply", "s1", recorder, receipt=True)
        # A fuzzed ERROR frame may fail the subscription; that is expected here.
        subscribed.addErrback(lambda failure: None)
        transport.clear()
    return protocol, transport, clock, recorder


def check_consistent(
    protocol: StompClientProtocol, transport: StringTransport, clock: Clock, recorder: Recorder
) -> None:
    """
    Check that the protocol is either usable or closing with an error.
    """
    closing = bool(transport.disconnecting)
    # Shown by "pytest --hypothesis-show-statistics", to check what the inputs reach.
    if closing:
        event("closing")
    elif protocol.is_connected:
        event("connected")
    else:
        event("waiting for CONNECTED")
    event(f"messages delivered: {min(len(recorder.messages), 2)}")
    if closing:
        assert protocol.error is not None, "the transport is closing, but protocol.error is unset"
        assert clock.getDelayedCalls() == [], "timers are still running after the failure"
    else:
        assert (
            protocol.error is None
        ), f"protocol.error is set but the transport stays open: {protocol.error}"
    assert recorder.after_error == [], "a message was delivered after the protocol failed"
    if protocol.is_connected and not closing:
        protocol.send(TASKS, b"{}", {"taskmesh-type": "discover"})


@fuzz_settings(max_examples=800)
@given(
    stream=st.booleans().flatmap(
        lambda connected: st.tuples(st.just(connected), mutated_stream(connected))
    ),
    version=st.sampled_from(["1.0", "1.1", "1.2"]),
    points=st.lists(st.integers(min_value=0, max_value=600), max_size=6),
)
def test_protocol_survives_mutated_frames(
    stream: tuple[bool, bytes], version: str, points: list[int]
) -> None:
    connected, data = stream
    protocol, transport, clock, recorder = protocol_under_test(connected, version)

    for chunk in split(data, points):
        protocol.dataReceived(chunk)
    check_consistent(protocol, transport, clock, recorder)

    # Timers (connect timeout, heart-beats) must not raise either.
    clock.advance(100)
    check_consistent(protocol, transport, clock, recorder)


@fuzz_settings(max_examples=500)
@given(
    connected=st.booleans(),
    version=st.sampled_from(["1.0", "1.1", "1.2"]),
    chunks=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
)
def test_protocol_survives_random_bytes(connected: bool, version: str, chunks: list[bytes]) -> None:
    protocol, transport, clock, recorder = protocol_under_test(connected, version)

    for chunk in chunks:
        protocol.dataReceived(chunk)
    check_consistent(protocol, transport, clock, recorder)


@fuzz_settings(max_examples=100)
@given(
    declared=st.integers(min_value=MAX_FRAME_SIZE + 1, max_value=10**12),
    sent=st.integers(min_value=0, max_value=3 * MAX_FRAME_SIZE),
    points=st.lists(st.integers(min_value=0, max_value=3 * MAX_FRAME_SIZE), max_size=4),
)
def test_protocol_bounds_oversized_content_length(
    declared: int, sent: int, points: list[int]
) -> None:
    protocol, transport, clock, recorder = protocol_under_test(connected=True)
    head = f"MESSAGE\nsubscription:s1\ndestination:{REPLY}\ncontent-length:{declared}\n\n".encode()

    for chunk in split(head + b"x" * sent, points):
        protocol.dataReceived(chunk)

    check_consistent(protocol, transport, clock, recorder)
    assert recorder.messages == []
    if len(head) + sent > MAX_FRAME_SIZE:
        assert transport.disconnecting


def test_protocol_stops_after_error_frame() -> None:
    protocol, transport, clock, recorder = protocol_under_test(connected=True)

    protocol.dataReceived(frame("ERROR", [("message", "denied")]) + message_frame())

    assert transport.disconnecting
    assert protocol.error is not None
    assert recorder.messages == []


def test_protocol_rejects_non_utf8_header() -> None:
    protocol, transport, clock, recorder = protocol_under_test(connected=True)

    protocol.dataReceived(b"MESSAGE\nsubscription:s1\nname:\xff\n\n\x00")

    assert transport.disconnecting
    assert "invalid frame" in str(protocol.error)


def test_protocol_rejects_non_numeric_content_length() -> None:
    protocol, transport, clock, recorder = protocol_under_test(connected=True)

    protocol.dataReceived(b"MESSAGE\nsubscription:s1\ncontent-length:abc\n\nxx\x00")

    assert transport.disconnecting
    assert "invalid frame" in str(protocol.error)


# -- Message decoding -------------------------------------------------------

VALID_MESSAGES: list[Message] = [
    TaskMessage(REQUEST_ID, "sleep", {"seconds": 3}, REPLY, 1_750_000_100.0),
    TaskMessage(
        REQUEST_ID,
        "backup.db",
        {},
        REPLY,
        mode=DispatchMode.DIRECT,
        target="b1",
        start_by=1_750_000_050.0,
        max_attempts=2,
    ),
    TaskMessage(
        REQUEST_ID, "echo", {"a": [1]}, REPLY, mode=DispatchMode.QUEUE, selector={"role": "db"}
    ),
    ProgressMessage(REQUEST_ID, "b1", 40.0, "halfway"),
    ResultMessage(REQUEST_ID, "b1", {"slept": 3}),
    ErrorMessage(REQUEST_ID, "b1", "UnknownTask", "no such task"),
    Announcement("b1", SlaveState.ALIVE, ("sleep",), 10.0, "b.example", 42, {"role": "db"}),
    DiscoverMessage(),
    AcceptedMessage(REQUEST_ID, "b1", 2, True),
    CancelMessage(REQUEST_ID, "stopped"),
]

HEADER_NAMES = ["taskmesh-type", "request_id", "slave_id", "task", "reply-to", "content-type"]

header_values = st.one_of(
    st.sampled_from([t.value for t in MessageType]),
    st.sampled_from([REQUEST_ID, str(uuid.UUID(int=0)), "b1", "sleep", REPLY, ""]),
    st.text(max_size=40),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**400), 2**64, 0, 1, 100, 101, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
BODY_FIELDS = [
    "task", "args", "deadline", "start_by", "mode", "selector", "target", "max_attempts",
    "percent", "message", "result", "error_type", "state", "tasks", "interval", "hostname",
    "pid", "tags", "attempt", "redelivered", "reason",
]  # fmt: skip
NUMBER_FIELDS = ["deadline", "start_by", "percent", "interval", "pid", "attempt", "max_attempts"]
extreme_numbers = st.sampled_from(
    [10**400, -(10**400), 2**63, -(2**63), 1.7976931348623157e308, -1.7976931348623157e308,
     5e-324, -0.0, 0, True, "1", None]
)  # fmt: skip
json_bodies = st.dictionaries(
    st.sampled_from(BODY_FIELDS) | st.text(max_size=8), json_values, max_size=8
)


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def fuzzed_message(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    """
    Draw a valid encoded message with some headers and body fields changed,
    or a body that is not JSON at all.
    """
    headers, body = encode(draw(st.sampled_from(VALID_MESSAGES)))
    headers = dict(headers)
    changed = draw(st.dictionaries(st.sampled_from(HEADER_NAMES), header_values, max_size=3))
    headers.update(changed)
    for name in draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=2)):
        headers.pop(name, None)

    kind = draw(st.sampled_from(["fields", "numbers", "object", "bytes", "nested", "same"]))
    if kind == "fields":
        loaded = json.loads(body)
        loaded.update(draw(json_bodies))
        body = dump(loaded)
    elif kind == "numbers":
        loaded = json.loads(body)
        for name in NUMBER_FIELDS:
            if draw(st.booleans()):
                loaded[name] = draw(extreme_numbers)
        body = dump(loaded)
    elif kind == "object":
        body = dump(draw(json_values))
    elif kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif kind == "nested":
        depth = draw(st.integers(min_value=1, max_value=5_000))
        body = b'{"result": ' + b"[" * depth + b"]" * depth + b"}"
    return headers, body


def decode_or_invalid(headers: dict[str, str], body: bytes) -> Message | None:
    try:
        return decode(headers, body)
    except InvalidMessage:
        return None


@fuzz_settings(max_examples=700)
@given(fuzzed_message())
def test_decode_raises_only_invalid_message(message: tuple[dict[str, str], bytes]) -> None:
    headers, body = message
    decode_or_invalid(headers, body)


@fuzz_settings(max_examples=300)
@given(
    headers=st.dictionaries(
        st.sampled_from(HEADER_NAMES) | st.text(max_size=10), header_values, max_size=6
    ),
    body=st.binary(max_size=300),
)
def test_decode_random_input_raises_only_invalid_message(
    headers: dict[str, str], body: bytes
) -> None:
    decode_or_invalid(headers, body)


# -- Verification -----------------------------------------------------------

SIGNING_KEY = generate_signing_key()
STRANGER_KEY = generate_signing_key()
PAYLOAD_KEY = generate_symmetric_key()


def make_clock() -> Clock:
    clock = Clock()
    clock.advance(NOW)
    return clock


def make_verifier(clock: Clock) -> Verifier:
    return Verifier({SIGNING_KEY.key_id: (SIGNING_KEY.private_key.public_key(), None)}, clock)


@st.composite
def signed_message(
    draw: st.DrawFn, keys: list[SigningKey] = [SIGNING_KEY]
) -> tuple[dict[str, str], bytes]:
    clock = make_clock()
    key = draw(st.sampled_from(keys))
    headers, body = encode(draw(st.sampled_from(VALID_MESSAGES)))
    return Signer(key, key.key_id, clock).sign(headers, body, TASKS), body


def assert_rejected(headers: dict[str, str], body: bytes, destination: str = TASKS) -> None:
    try:
        make_verifier(make_clock()).verify(headers, body, destination)
    except SignatureRejected:
        return
    raise AssertionError("the changed message was accepted")


@fuzz_settings(max_examples=500)
@given(
    message=signed_message([SIGNING_KEY, STRANGER_KEY]),
    changed=st.dictionaries(
        st.sampled_from([*SIGNATURE_HEADERS, *HEADER_NAMES]) | st.text(max_size=10),
        header_values | st.text(alphabet="0123456789abcdefABCDEF-_=", max_size=90),
        max_size=4,
    ),
    removed=st.lists(st.sampled_from([*SIGNATURE_HEADERS, *HEADER_NAMES]), max_size=2),
    body=st.none() | st.binary(max_size=100),
    skew=st.sampled_from([0.0, 30.0, -30.0, 400.0, -400.0, 10.0**9]),
)
def test_verify_raises_only_signature_rejected(
    message: tuple[dict[str, str], bytes],
    changed: dict[str, str],
    removed: list[str],
    body: bytes | None,
    skew: float,
) -> None:
    headers, original_body = message
    headers = dict(headers)
    headers.update(changed)
    for name in removed:
        headers.pop(name, None)
    clock = make_clock()
    clock.advance(skew)

    try:
        make_verifier(clock).verify(headers, original_body if body is None else body, TASKS)
    except SignatureRejected:
        pass


@fuzz_settings(max_examples=400)
@given(
    message=signed_message(),
    header=st.sampled_from(SIGNED_HEADERS + SIGNATURE_HEADERS),
    value=st.none() | header_values | st.text(alphabet="0123456789abcdef-_=", max_size=90),
)
def test_verify_rejects_any_signed_header_change(
    message: tuple[dict[str, str], bytes], header: str, value: str | None
) -> None:
    headers, body = message
    assume(headers.get(header) != value)
    make_verifier(make_clock()).verify(headers, body, TASKS)
    if value is None:
        del headers[header]
    else:
        headers[header] = value

    assert_rejected(headers, body)


@fuzz_settings(max_examples=300)
@given(
    message=signed_message(),
    position=st.integers(min_value=0),
    replacement=st.binary(min_size=0, max_size=3),
    destination=st.sampled_from([TASKS, REPLY, TASKS + " ", "/topic/myapp.tasks2"]),
)
def test_verify_rejects_any_body_or_destination_change(
    message: tuple[dict[str, str], bytes], position: int, replacement: bytes, destination: str
) -> None:
    headers, body = message
    position %= len(body) + 1
    changed = body[:position] + replacement + body[position + 1 :]
    assume(changed != body or destination != TASKS)
    make_verifier(make_clock()).verify(headers, body, TASKS)

    assert_rejected(headers, changed, destination)


@fuzz_settings(max_examples=200)
@given(
    message=st.sampled_from(VALID_MESSAGES),
    changed=st.dictionaries(st.sampled_from(SIGNED_HEADERS), header_values, max_size=2),
    position=st.integers(min_value=0),
    flip=st.integers(min_value=0, max_value=255),
    encrypted=st.booleans(),
)
def test_open_raises_only_message_rejected(
    message: Message, changed: dict[str, str], position: int, flip: int, encrypted: bool
) -> None:
    clock = make_clock()
    cipher = PayloadCipher(PAYLOAD_KEY)
    headers, body = encode(message)
    signer = Signer(SIGNING_KEY, SIGNING_KEY.key_id, clock)
    headers, body = seal_message(headers, body, TASKS, signer, cipher if encrypted else None)
    headers.update(changed)
    if body:
        position %= len(body)
        body = body[:position] + bytes([body[position] ^ flip]) + body[position + 1 :]

    try:
        opened = open_message(
            headers, body, TASKS, make_verifier(clock), cipher, require_encryption=encrypted
        )
    except MessageRejected:
        return
    # Only an unchanged message may pass, and it must then decode.
    assert opened.body == encode(message)[1]
    decode(opened.headers, opened.body)

"""
Tests for the wire schema in :mod:`taskmesh._messages`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from taskmesh._messages import (
    CONTENT_TYPE,
    AcceptedMessage,
    CancelMessage,
    DispatchMode,
    Announcement,
    Destinations,
    DiscoverMessage,
    ErrorMessage,
    InvalidMessage,
    Message,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
    new_request_id,
    validate_namespace,
    validate_slave_id,
    validate_task_name,
)

REQUEST_ID = "0b6f4f1e-8a51-4c55-9a3c-5d1f6a2b9e10"

ROUND_TRIPS: list[Message] = [
    TaskMessage(REQUEST_ID, "sleep", {"seconds": 3}, "/queue/myapp.reply"),
    TaskMessage(REQUEST_ID, "echo", {"nested": {"a": [1, 2.5, None, True]}}, "/queue/r", 1700000000.5),
    TaskMessage(REQUEST_ID, "echo", {}, "/queue/r", 0),
    ProgressMessage(REQUEST_ID, "s1", 42.5, "copying"),
    ProgressMessage(REQUEST_ID, "s1", 0.0),
    ProgressMessage(REQUEST_ID, "s1", 100.0, ""),
    ResultMessage(REQUEST_ID, "s1", {"slept": 3}),
    ResultMessage(REQUEST_ID, "s1", None),
    ResultMessage(REQUEST_ID, "s1", [1, "two", 3.0, False]),
    ResultMessage(REQUEST_ID, "s1", "plain string"),
    ErrorMessage(REQUEST_ID, "s1", "InvalidArguments", "seconds must be a number"),
    Announcement("s1", SlaveState.UP, ("echo", "sleep"), 10.0, "host.example", 1234, {"role": "db"}),
    Announcement("s1", SlaveState.ALIVE),
    Announcement("web-3@host", SlaveState.DOWN, (), 2.5, "", 0, {}),
    DiscoverMessage(),
]


@pytest.mark.parametrize("message", ROUND_TRIPS, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    headers, body = encode(message)

    assert headers["content-type"] == CONTENT_TYPE
    assert isinstance(body, bytes)
    assert decode(headers, body) == message


def test_task_headers() -> None:
    headers, body = encode(TaskMessage(REQUEST_ID, "sleep", {"seconds": 1}, "/queue/r", 5.0))

    assert headers == {
        "content-type": CONTENT_TYPE,
        "taskmesh-type": "task",
        "request_id": REQUEST_ID,
        "task": "sleep",
        "reply-to": "/queue/r",
    }
    assert json.loads(body) == {"task": "sleep", "args": {"seconds": 1}, "deadline": 5.0}


def test_reply_headers_carry_ids() -> None:
    for message in (
        ProgressMessage(REQUEST_ID, "s1", 1.0),
        ResultMessage(REQUEST_ID, "s1", 1),
        ErrorMessage(REQUEST_ID, "s1", "E", "m"),
    ):
        headers, _ = encode(message)
        assert headers["request_id"] == REQUEST_ID
        assert headers["slave_id"] == "s1"


def test_non_ascii_utf8() -> None:
    message = ResultMessage(REQUEST_ID, "s1", {"grüße": "日本語 ☃", "emoji": "🚀"})

    headers, body = encode(message)

    assert "日本語 ☃".encode("utf-8") in body
    assert "🚀".encode("utf-8") in body
    assert decode(headers, body) == message


def test_escaped_unicode_decodes() -> None:
    headers, _ = encode(ResultMessage(REQUEST_ID, "s1", None))
    assert decode(headers, b'{"result": "caf\\u00e9"}') == ResultMessage(REQUEST_ID, "s1", "café")


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), object(), {1, 2}, "\ud800"],
    ids=["nan", "inf", "object", "set", "lone-surrogate"],
)
def test_encode_rejects_non_json(value: Any) -> None:
    with pytest.raises(ValueError, match="cannot encode ResultMessage as JSON"):
        encode(ResultMessage(REQUEST_ID, "s1", value))


def test_encode_rejects_deep_nesting() -> None:
    nested: Any = []
    for _ in range(100000):
        nested = [nested]
    with pytest.raises(ValueError, match="nested too deeply"):
        encode(ResultMessage(REQUEST_ID, "s1", nested))


def test_encode_rejects_non_message() -> None:
    with pytest.raises(TypeError, match="not a taskmesh message"):
        encode("hello")  # type: ignore[arg-type]


# Rejections by decode, each with its reason and request_id.

TASK_HEADERS = {"taskmesh-type": "task", "request_id": REQUEST_ID, "reply-to": "/queue/r"}
REPLY_HEADERS = {"request_id": REQUEST_ID, "slave_id": "s1"}


def reply_headers(kind: str, **changes: str) -> dict[str, str]:
    headers = {"taskmesh-type": kind, **REPLY_HEADERS, **changes}
    return {k: v for k, v in headers.items() if v != "<drop>"}


REJECTIONS: list[tuple[str, dict[str, str], bytes, str, str | None]] = [
    (
        "missing type",
        {},
        b"{}",
        "unknown or missing 'taskmesh-type' header: None; expected one of task, progress,"
        " result, error, announce, discover, accepted, cancel",
        None,
    ),
    (
        "unknown type",
        {"taskmesh-type": "bogus"},
        b"{}",
        "unknown or missing 'taskmesh-type' header: 'bogus'; expected one of task, progress,"
        " result, error, announce, discover, accepted, cancel",
        None,
    ),
    ("missing request_id", {"taskmesh-type": "task"}, b"{}", "missing 'request_id' header", None),
    (
        "invalid request_id",
        {"taskmesh-type": "result", "request_id": "42", "slave_id": "s1"},
        b"{}",
        "invalid request_id '42': expected a UUID",
        None,
    ),
    (
        "missing reply-to",
        {"taskmesh-type": "task", "request_id": REQUEST_ID},
        b'{"task": "echo"}',
        "missing 'reply-to' header",
        REQUEST_ID,
    ),
    (
        "not utf-8",
        TASK_HEADERS,
        b'{"task": "\xff"}',
        "body is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 10:"
        " invalid start byte",
        REQUEST_ID,
    ),
    (
        "not json",
        TASK_HEADERS,
        b"{task",
        "body is not valid JSON: Expecting property name enclosed in double quotes:"
        " line 1 column 2 (char 1)",
        REQUEST_ID,
    ),
    (
        "nan constant",
        TASK_HEADERS,
        b'{"task": "echo", "args": {"x": NaN}}',
        "body is not valid JSON: NaN is not allowed in JSON bodies",
        REQUEST_ID,
    ),
    (
        "deep nesting",
        TASK_HEADERS,
        b"[" * 100000,
        "body is not valid JSON: it is nested too deeply",
        REQUEST_ID,
    ),
    ("not an object", TASK_HEADERS, b"[1]", "body must be a JSON object, not list", REQUEST_ID),
    ("missing task", TASK_HEADERS, b"{}", "missing body field 'task'", REQUEST_ID),
    ("task not str", TASK_HEADERS, b'{"task": 7}', "body field 'task' must be str, not int", REQUEST_ID),
    (
        "task header mismatch",
        {**TASK_HEADERS, "task": "sleep"},
        b'{"task": "echo"}',
        "task header 'sleep' does not match body field 'task' 'echo'",
        REQUEST_ID,
    ),
    (
        "args not object",
        TASK_HEADERS,
        b'{"task": "echo", "args": [1]}',
        "body field 'args' must be a JSON object, not list",
        REQUEST_ID,
    ),
    (
        "deadline string",
        TASK_HEADERS,
        b'{"task": "echo", "deadline": "soon"}',
        "body field 'deadline' must be a Unix time in seconds",
        REQUEST_ID,
    ),
    (
        "deadline bool",
        TASK_HEADERS,
        b'{"task": "echo", "deadline": true}',
        "body field 'deadline' must be a Unix time in seconds",
        REQUEST_ID,
    ),
    (
        "missing slave_id",
        reply_headers("progress", slave_id="<drop>"),
        b'{"percent": 1}',
        "missing 'slave_id' header",
        REQUEST_ID,
    ),
    (
        "invalid slave_id",
        reply_headers("progress", slave_id="a b"),
        b'{"percent": 1}',
        "invalid slave id 'a b': use 1 to 128 letters, digits, '_', '.', '@' or '-'",
        REQUEST_ID,
    ),
    ("missing percent", reply_headers("progress"), b"{}", "missing body field 'percent'", REQUEST_ID),
    (
        "percent bool",
        reply_headers("progress"),
        b'{"percent": true}',
        "body field 'percent' must be int or float, not bool",
        REQUEST_ID,
    ),
    (
        "percent too high",
        reply_headers("progress"),
        b'{"percent": 101}',
        "progress percent 101 is not between 0 and 100",
        REQUEST_ID,
    ),
    (
        "percent infinite",
        reply_headers("progress"),
        b'{"percent": 1e400}',
        "progress percent inf is not between 0 and 100",
        REQUEST_ID,
    ),
    (
        "progress message not str",
        reply_headers("progress"),
        b'{"percent": 5, "message": 5}',
        "body field 'message' must be str",
        REQUEST_ID,
    ),
    ("missing result", reply_headers("result"), b"{}", "missing body field 'result'", REQUEST_ID),
    (
        "missing error_type",
        reply_headers("error"),
        b'{"message": "m"}',
        "missing body field 'error_type'",
        REQUEST_ID,
    ),
    (
        "error_type not str",
        reply_headers("error"),
        b'{"error_type": 1, "message": "m"}',
        "body field 'error_type' must be str, not int",
        REQUEST_ID,
    ),
    (
        "missing error message",
        reply_headers("error"),
        b'{"error_type": "E"}',
        "missing body field 'message'",
        REQUEST_ID,
    ),
    (
        "announce without slave_id",
        {"taskmesh-type": "announce"},
        b'{"state": "up"}',
        "missing 'slave_id' header",
        None,
    ),
    (
        "announce missing state",
        {"taskmesh-type": "announce", "slave_id": "s1"},
        b"{}",
        "missing body field 'state'",
        None,
    ),
    (
        "announce unknown state",
        {"taskmesh-type": "announce", "slave_id": "s1"},
        b'{"state": "sleeping"}',
        "unknown slave state 'sleeping'",
        None,
    ),
    (
        "announce tasks not strings",
        {"taskmesh-type": "announce", "slave_id": "s1"},
        b'{"state": "up", "tasks": [1]}',
        "body field 'tasks' must be a list of strings",
        None,
    ),
    (
        "announce interval zero",
        {"taskmesh-type": "announce", "slave_id": "s1"},
        b'{"state": "up", "interval": 0}',
        "body field 'interval' must be a positive number, not 0",
        None,
    ),
    (
        "announce interval infinite",
        {"taskmesh-type": "announce", "slave_id": "s1"},
        b'{"state": "up", "interval": 1e400}',
        "body field 'interval' must be a positive number, not inf",
        None,
    ),
    (
        "announce interval bool",
        {"taskmesh-type": "announce", "slave_id": "s1"},
        b'{"state": "up", "interval": true}',
        "body field 'interval' must be a positive number, not True",
        None,
    ),
    (
        "announce tags not strings",
        {"taskmesh-type": "announce", "slave_id": "s1"},
        b'{"state": "up", "tags": {"a": 1}}',
        "body field 'tags' must be an object of strings",
        None,
    ),
]


@pytest.mark.parametrize(
    "headers, body, reason, request_id",
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
def test_decode_rejects(
    headers: dict[str, str], body: bytes, reason: str, request_id: str | None
) -> None:
    with pytest.raises(InvalidMessage) as raised:
        decode(headers, body)

    assert raised.value.reason == reason
    assert str(raised.value) == reason
    assert raised.value.request_id == request_id


def test_announcement_lenient_fields() -> None:
    headers = {"taskmesh-type": "announce", "slave_id": "s1"}
    decoded = decode(headers, b'{"state": "alive", "hostname": 5, "pid": true}')
    assert decoded == Announcement("s1", SlaveState.ALIVE, hostname="", pid=0)


def test_discover_ignores_body() -> None:
    assert decode({"taskmesh-type": "discover"}, b"not even json") == DiscoverMessage()


def test_destinations() -> None:
    destinations = Destinations("ops.batch")
    assert destinations.tasks == "/topic/ops.batch.tasks"
    assert destinations.reply == "/queue/ops.batch.reply"
    assert destinations.presence == "/topic/ops.batch.presence"
    with pytest.raises(ValueError, match="invalid namespace"):
        Destinations("ops..batch")


@pytest.mark.parametrize("namespace", ["myapp", "ops.batch", "a-b_c.d1"])
def test_valid_namespaces(namespace: str) -> None:
    assert validate_namespace(namespace) == namespace


@pytest.mark.parametrize("namespace", ["", ".a", "a.", "a b", "a/b", "a>", "a*", "é"])
def test_invalid_namespaces(namespace: str) -> None:
    with pytest.raises(ValueError, match="invalid namespace"):
        validate_namespace(namespace)


def test_slave_id_and_task_name_validation() -> None:
    assert validate_slave_id("web-3@host.example") == "web-3@host.example"
    assert validate_task_name("backup.db") == "backup.db"
    for bad in ("", "a b", "x" * 129, "ü"):
        with pytest.raises(ValueError, match="invalid slave id"):
            validate_slave_id(bad)
        with pytest.raises(ValueError, match="invalid task name"):
            validate_task_name(bad)


def test_new_request_id_is_uuid() -> None:
    request_id = new_request_id()
    assert str(uuid.UUID(request_id)) == request_id
    assert new_request_id() != request_id


# Dispatch modes, accepted and cancel messages


def test_queue_task_round_trip() -> None:
    task = TaskMessage(
        REQUEST_ID,
        "sleep",
        {"seconds": 1},
        "/queue/myapp.reply",
        deadline=100.0,
        mode=DispatchMode.QUEUE,
        selector={"role": "db"},
        start_by=50.0,
        max_attempts=2,
    )
    headers, body = encode(task)
    assert decode(headers, body) == task


def test_direct_task_needs_target() -> None:
    headers, _ = encode(TaskMessage(REQUEST_ID, "echo", {}, "/queue/myapp.reply"))
    body = json.dumps({"task": "echo", "mode": "direct"}).encode()
    with pytest.raises(InvalidMessage, match="needs the body field 'target'"):
        decode(headers, body)


def test_accepted_and_cancel_round_trip() -> None:
    for message in (
        AcceptedMessage(REQUEST_ID, "b1", attempt=2, redelivered=True),
        CancelMessage(REQUEST_ID, "poison message"),
    ):
        headers, body = encode(message)
        assert decode(headers, body) == message


def test_work_destinations() -> None:
    destinations = Destinations("myapp")
    assert destinations.work() == "/queue/myapp.work"
    assert destinations.work({"role": "db"}) == "/queue/myapp.work.role.db"
    assert destinations.direct("b1") == "/queue/myapp.slave.b1"
    assert destinations.control == "/topic/myapp.control"
    with pytest.raises(ValueError, match="at most one tag"):
        destinations.work({"role": "db", "zone": "a"})
    with pytest.raises(ValueError, match="invalid tag"):
        destinations.work({"role": "d b"})


@pytest.mark.parametrize(
    "validate",
    [validate_namespace, validate_slave_id, validate_task_name],
)
def test_trailing_newline_rejected(validate: Any) -> None:
    with pytest.raises(ValueError):
        validate("name\n")

"""
The taskmesh wire protocol: destinations, headers and JSON bodies.

Both daemons import this module and nothing else to agree on what goes over the
broker; ``docs/protocol.md`` describes the same rules for other programs.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Union

CONTENT_TYPE = "application/json;charset=utf-8"

HEADER_TYPE = "taskmesh-type"
HEADER_REQUEST_ID = "request_id"
HEADER_SLAVE_ID = "slave_id"
HEADER_TASK = "task"
HEADER_REPLY_TO = "reply-to"
HEADER_CONTENT_TYPE = "content-type"

NAMESPACE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
SLAVE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class MessageType(str, Enum):
    """
    Value of the ``taskmesh-type`` header.
    """

    TASK = "task"
    PROGRESS = "progress"
    RESULT = "result"
    ERROR = "error"
    ANNOUNCE = "announce"
    DISCOVER = "discover"


class SlaveState(str, Enum):
    """
    Lifecycle state that a slave announces on the presence topic.
    """

    UP = "up"
    ALIVE = "alive"
    DOWN = "down"


class InvalidMessage(ValueError):
    """
    A message that does not follow the taskmesh wire protocol.

    ``request_id`` is set when the message carried a well-formed one, so the
    receiver can still send an error reply for it.
    """

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


def validate_namespace(namespace: str) -> str:
    """
    Check a destination namespace such as ``myapp`` or ``ops.batch``.

    Raises:
        ValueError: the namespace is empty or contains characters that brokers
            treat specially in destination names.
    """
    if not NAMESPACE_PATTERN.match(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use letters, digits, '_' and '-',"
            " in parts separated by single dots (for example 'myapp')"
        )
    return namespace


def validate_slave_id(slave_id: str) -> str:
    """
    Check a slave id such as ``b1`` or ``web-3@host``.

    Raises:
        ValueError: the id is empty, too long or has unsupported characters.
    """
    if not SLAVE_ID_PATTERN.match(slave_id):
        raise ValueError(
            f"invalid slave id {slave_id!r}: use 1 to 128 letters, digits,"
            " '_', '.', '@' or '-'"
        )
    return slave_id


def validate_task_name(name: str) -> str:
    """
    Check a task name such as ``sleep`` or ``backup.db``.

    Raises:
        ValueError: the name is empty, too long or has unsupported characters.
    """
    if not TASK_NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid task name {name!r}: use 1 to 128 letters, digits,"
            " '_', '.' or '-'"
        )
    return name


@dataclass(frozen=True)
class Destinations:
    """
    STOMP destinations derived from a namespace.

    With the namespace ``myapp`` every destination matches the ActiveMQ
    authorization entries ``topic="myapp.>"`` and ``queue="myapp.>"``.
    """

    namespace: str

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    @property
    def tasks(self) -> str:
        """
        Topic on which the master broadcasts tasks to every slave.
        """
        return f"/topic/{self.namespace}.tasks"

    @property
    def reply(self) -> str:
        """
        Queue on which slaves send progress, results and errors.
        """
        return f"/queue/{self.namespace}.reply"

    @property
    def presence(self) -> str:
        """
        Topic for slave announcements and the master's discovery requests.
        """
        return f"/topic/{self.namespace}.presence"


@dataclass(frozen=True)
class TaskMessage:
    """
    A task that the master sends to slaves.

    ``deadline`` is a Unix time in seconds after which the master no longer
    waits for replies; slaves use it to skip tasks that arrive too late.
    """

    request_id: str
    task: str
    args: Mapping[str, Any]
    reply_to: str
    deadline: float | None = None


@dataclass(frozen=True)
class ProgressMessage:
    """
    A progress report from a slave: ``percent`` is between 0 and 100.
    """

    request_id: str
    slave_id: str
    percent: float
    message: str = ""


@dataclass(frozen=True)
class ResultMessage:
    """
    The successful result of a task on one slave: any JSON value.
    """

    request_id: str
    slave_id: str
    result: Any


@dataclass(frozen=True)
class ErrorMessage:
    """
    The failure of a task on one slave.

    ``error_type`` is a short machine-readable name such as ``UnknownTask``,
    ``InvalidArguments``, ``InvalidTask`` or the name of the exception that the
    handler raised.
    """

    request_id: str
    slave_id: str
    error_type: str
    message: str


@dataclass(frozen=True)
class Announcement:
    """
    A slave's presence announcement.

    ``interval`` is the number of seconds until the next ``alive``
    announcement; the master forgets a slave after three missed intervals.
    """

    slave_id: str
    state: SlaveState
    tasks: tuple[str, ...] = ()
    interval: float = 10.0
    hostname: str = ""
    pid: int = 0
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DiscoverMessage:
    """
    A master's request that every slave announce itself now.
    """


Message = Union[
    TaskMessage,
    ProgressMessage,
    ResultMessage,
    ErrorMessage,
    Announcement,
    DiscoverMessage,
]


def new_request_id() -> str:
    """
    Generate a random request id (a UUID in its canonical text form).
    """
    return str(uuid.uuid4())


def _dump(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
        "utf-8"
    )


def encode(message: Message) -> tuple[dict[str, str], bytes]:
    """
    Encode a message into STOMP headers and a UTF-8 JSON body.

    The caller adds ``destination``; ``content-length`` is added by the STOMP
    client on every SEND.

    Raises:
        ValueError: a value cannot be represented in JSON (for example a NaN or
            an object that is not a dict, list, str, number, bool or None).
    """
    headers = {HEADER_CONTENT_TYPE: CONTENT_TYPE}
    body: dict[str, Any]
    if isinstance(message, TaskMessage):
        headers[HEADER_TYPE] = MessageType.TASK.value
        headers[HEADER_REQUEST_ID] = message.request_id
        headers[HEADER_TASK] = message.task
        headers[HEADER_REPLY_TO] = message.reply_to
        body = {"task": message.task, "args": dict(message.args)}
        if message.deadline is not None:
            body["deadline"] = message.deadline
    elif isinstance(message, ProgressMessage):
        headers[HEADER_TYPE] = MessageType.PROGRESS.value
        headers[HEADER_REQUEST_ID] = message.request_id
        headers[HEADER_SLAVE_ID] = message.slave_id
        body = {"percent": message.percent, "message": message.message}
    elif isinstance(message, ResultMessage):
        headers[HEADER_TYPE] = MessageType.RESULT.value
        headers[HEADER_REQUEST_ID] = message.request_id
        headers[HEADER_SLAVE_ID] = message.slave_id
        body = {"result": message.result}
    elif isinstance(message, ErrorMessage):
        headers[HEADER_TYPE] = MessageType.ERROR.value
        headers[HEADER_REQUEST_ID] = message.request_id
        headers[HEADER_SLAVE_ID] = message.slave_id
        body = {"error_type": message.error_type, "message": message.message}
    elif isinstance(message, Announcement):
        headers[HEADER_TYPE] = MessageType.ANNOUNCE.value
        headers[HEADER_SLAVE_ID] = message.slave_id
        body = {
            "state": message.state.value,
            "tasks": list(message.tasks),
            "interval": message.interval,
            "hostname": message.hostname,
            "pid": message.pid,
            "tags": dict(message.tags),
        }
    elif isinstance(message, DiscoverMessage):
        headers[HEADER_TYPE] = MessageType.DISCOVER.value
        body = {}
    else:
        raise TypeError(f"not a taskmesh message: {message!r}")
    try:
        return headers, _dump(body)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot encode {type(message).__name__} as JSON: {e}") from e
    except RecursionError:
        raise ValueError(
            f"cannot encode {type(message).__name__} as JSON: the value is nested too deeply"
        ) from None


def _require_header(headers: Mapping[str, str], name: str, request_id: str | None) -> str:
    value = headers.get(name)
    if not value:
        raise InvalidMessage(f"missing {name!r} header", request_id)
    return value


def _load_object(body: bytes, request_id: str | None) -> dict[str, Any]:
    try:
        loaded = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise InvalidMessage(f"body is not valid UTF-8: {e}", request_id) from e
    except ValueError as e:
        raise InvalidMessage(f"body is not valid JSON: {e}", request_id) from e
    except RecursionError:
        raise InvalidMessage("body is not valid JSON: it is nested too deeply", request_id) from None
    if not isinstance(loaded, dict):
        raise InvalidMessage(
            f"body must be a JSON object, not {type(loaded).__name__}", request_id
        )
    return loaded


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON bodies")


def _field(
    body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], request_id: str | None
) -> Any:
    if name not in body:
        raise InvalidMessage(f"missing body field {name!r}", request_id)
    value = body[name]
    # bool is a subclass of int, so reject it explicitly where a number is expected.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise InvalidMessage(
            f"body field {name!r} must be {expected}, not {type(value).__name__}", request_id
        )
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _request_id(headers: Mapping[str, str]) -> str:
    value = _require_header(headers, HEADER_REQUEST_ID, None)
    try:
        uuid.UUID(value)
    except ValueError:
        raise InvalidMessage(f"invalid request_id {value!r}: expected a UUID") from None
    return value


def _slave_id(headers: Mapping[str, str], request_id: str | None) -> str:
    value = _require_header(headers, HEADER_SLAVE_ID, request_id)
    try:
        return validate_slave_id(value)
    except ValueError as e:
        raise InvalidMessage(str(e), request_id) from None


def decode(headers: Mapping[str, str], body: bytes) -> Message:
    """
    Decode a received STOMP message into a taskmesh message.

    Raises:
        InvalidMessage: the message type is missing or unknown, a header is
            missing or malformed, or the body is not the expected JSON object.
            ``request_id`` is set on the exception when the headers carried a
            valid one.
    """
    kind = headers.get(HEADER_TYPE)
    try:
        message_type = MessageType(kind)
    except ValueError:
        raise InvalidMessage(
            f"unknown or missing {HEADER_TYPE!r} header: {kind!r}; expected one of"
            f" {', '.join(t.value for t in MessageType)}"
        ) from None

    if message_type is MessageType.ANNOUNCE:
        return _decode_announcement(headers, body)
    if message_type is MessageType.DISCOVER:
        return DiscoverMessage()

    request_id = _request_id(headers)
    if message_type is MessageType.TASK:
        return _decode_task(headers, body, request_id)

    slave_id = _slave_id(headers, request_id)
    loaded = _load_object(body, request_id)
    if message_type is MessageType.PROGRESS:
        percent = _field(loaded, "percent", (int, float), request_id)
        if not 0 <= percent <= 100 or not math.isfinite(percent):
            raise InvalidMessage(f"progress percent {percent!r} is not between 0 and 100", request_id)
        text = loaded.get("message", "")
        if not isinstance(text, str):
            raise InvalidMessage("body field 'message' must be str", request_id)
        return ProgressMessage(request_id, slave_id, float(percent), text)
    if message_type is MessageType.RESULT:
        if "result" not in loaded:
            raise InvalidMessage("missing body field 'result'", request_id)
        return ResultMessage(request_id, slave_id, loaded["result"])
    error_type = _field(loaded, "error_type", str, request_id)
    text = _field(loaded, "message", str, request_id)
    return ErrorMessage(request_id, slave_id, error_type, text)


def _decode_task(headers: Mapping[str, str], body: bytes, request_id: str) -> TaskMessage:
    reply_to = _require_header(headers, HEADER_REPLY_TO, request_id)
    loaded = _load_object(body, request_id)
    task = _field(loaded, "task", str, request_id)
    header_task = headers.get(HEADER_TASK)
    if header_task is not None and header_task != task:
        raise InvalidMessage(
            f"task header {header_task!r} does not match body field 'task' {task!r}", request_id
        )
    args = loaded.get("args", {})
    if not isinstance(args, dict):
        raise InvalidMessage(
            f"body field 'args' must be a JSON object, not {type(args).__name__}", request_id
        )
    deadline = loaded.get("deadline")
    if deadline is not None and (
        isinstance(deadline, bool) or not isinstance(deadline, (int, float))
    ):
        raise InvalidMessage("body field 'deadline' must be a number of seconds", request_id)
    return TaskMessage(request_id, task, args, reply_to, deadline)


def _decode_announcement(headers: Mapping[str, str], body: bytes) -> Announcement:
    slave_id = _slave_id(headers, None)
    loaded = _load_object(body, None)
    raw_state = _field(loaded, "state", str, None)
    try:
        state = SlaveState(raw_state)
    except ValueError:
        raise InvalidMessage(f"unknown slave state {raw_state!r}") from None
    tasks = loaded.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise InvalidMessage("body field 'tasks' must be a list of strings")
    interval = loaded.get("interval", 10.0)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, (int, float))
        or not math.isfinite(interval)
        or interval <= 0
    ):
        raise InvalidMessage(f"body field 'interval' must be a positive number, not {interval!r}")
    tags = loaded.get("tags", {})
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise InvalidMessage("body field 'tags' must be an object of strings")
    hostname = loaded.get("hostname", "")
    pid = loaded.get("pid", 0)
    return Announcement(
        slave_id,
        state,
        tuple(tasks),
        float(interval),
        hostname if isinstance(hostname, str) else "",
        pid if isinstance(pid, int) and not isinstance(pid, bool) else 0,
        tags,
    )

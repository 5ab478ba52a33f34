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
TAG_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

DEFAULT_MAX_ATTEMPTS = 3


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
    ACCEPTED = "accepted"
    CANCEL = "cancel"


class DispatchMode(str, Enum):
    """
    Delivery mode of a task.

    ``broadcast`` goes to every live slave on the tasks topic, ``queue`` to
    exactly one slave through a shared work queue, and ``direct`` to one named
    slave through its own queue.
    """

    BROADCAST = "broadcast"
    QUEUE = "queue"
    DIRECT = "direct"


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
    if not NAMESPACE_PATTERN.fullmatch(namespace):
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
    if not SLAVE_ID_PATTERN.fullmatch(slave_id):
        raise ValueError(
            f"invalid slave id {slave_id!r}: use 1 to 128 letters, digits,"
            " '_', '.', '@' or '-'"
        )
    return slave_id


def validate_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """
    Check tags such as ``{"role": "db"}``; names and values become parts of
    queue names, so both are limited to letters, digits, '_' and '-'.

    Raises:
        ValueError: a name or value is empty, too long or has other characters.
    """
    checked: dict[str, str] = {}
    for name, value in tags.items():
        for text in (name, value):
            if not isinstance(text, str) or not TAG_PATTERN.fullmatch(text):
                raise ValueError(
                    f"invalid tag {name!r}={value!r}: names and values are 1 to 64 letters,"
                    " digits, '_' or '-'"
                )
        checked[name] = value
    return checked


def matches_selector(tags: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """
    Return whether a slave with ``tags`` is selected: every selector tag must be equal.
    """
    return all(tags.get(name) == value for name, value in selector.items())


def validate_task_name(name: str) -> str:
    """
    Check a task name such as ``sleep`` or ``backup.db``.

    Raises:
        ValueError: the name is empty, too long or has unsupported characters.
    """
    if not TASK_NAME_PATTERN.fullmatch(name):
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

    @property
    def control(self) -> str:
        """
        Topic on which the master cancels requests.
        """
        return f"/topic/{self.namespace}.control"

    def work(self, selector: Mapping[str, str] | None = None) -> str:
        """
        Return the shared work queue, or the one for a single-tag selector.

        Slaves consume ``/queue/NAMESPACE.work`` and, for each of their tags,
        ``/queue/NAMESPACE.work.NAME.VALUE``.

        Raises:
            ValueError: the selector has more than one tag.
        """
        if not selector:
            return f"/queue/{self.namespace}.work"
        if len(selector) > 1:
            raise ValueError(
                f"work-queue tasks select slaves by at most one tag, not {dict(selector)!r}"
            )
        [(name, value)] = validate_tags(selector).items()
        return f"/queue/{self.namespace}.work.{name}.{value}"

    def direct(self, slave_id: str) -> str:
        """
        Return the queue of one slave, for direct tasks.
        """
        return f"/queue/{self.namespace}.slave.{validate_slave_id(slave_id)}"


@dataclass(frozen=True)
class TaskMessage:
    """
    A task that the master sends to slaves.

    ``deadline`` is a Unix time in seconds after which the master no longer
    waits for replies. Slaves use it to skip tasks that arrive too late.
    ``start_by`` (the end of the time-to-live) is the Unix time after which no
    slave may start the task; it defaults to the deadline. ``selector`` tags
    pick the slaves, ``target`` names the slave of a direct task, and
    ``max_attempts`` bounds how often a queue or direct task is started
    before the master gives up on it as a poison message.
    """

    request_id: str
    task: str
    args: Mapping[str, Any]
    reply_to: str
    deadline: float | None = None
    mode: DispatchMode = DispatchMode.BROADCAST
    selector: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    start_by: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


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
    announcement; the master drops a slave after three missed intervals.
    """

    slave_id: str
    state: SlaveState
    tasks: tuple[str, ...] = ()
    interval: float = 10.0
    hostname: str = ""
    pid: int = 0
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AcceptedMessage:
    """
    A slave's notice that it starts running a task.

    ``attempt`` counts the starts of this request known to the slave, 1 on
    the first delivery. ``redelivered`` is the broker's flag for a message
    that was delivered before.
    """

    request_id: str
    slave_id: str
    attempt: int = 1
    redelivered: bool = False


@dataclass(frozen=True)
class CancelMessage:
    """
    A master's order to stop or skip a request, with the reason.
    """

    request_id: str
    reason: str = ""


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
    AcceptedMessage,
    CancelMessage,
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
        if message.mode is not DispatchMode.BROADCAST:
            body["mode"] = message.mode.value
        if message.deadline is not None:
            body["deadline"] = message.deadline
        if message.start_by is not None:
            body["start_by"] = message.start_by
        if message.selector:
            body["selector"] = dict(message.selector)
        if message.target is not None:
            body["target"] = message.target
        if message.mode is not DispatchMode.BROADCAST:
            body["max_attempts"] = message.max_attempts
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
    elif isinstance(message, AcceptedMessage):
        headers[HEADER_TYPE] = MessageType.ACCEPTED.value
        headers[HEADER_REQUEST_ID] = message.request_id
        headers[HEADER_SLAVE_ID] = message.slave_id
        body = {"attempt": message.attempt, "redelivered": message.redelivered}
    elif isinstance(message, CancelMessage):
        headers[HEADER_TYPE] = MessageType.CANCEL.value
        headers[HEADER_REQUEST_ID] = message.request_id
        body = {"reason": message.reason}
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
    if message_type is MessageType.CANCEL:
        loaded = _load_object(body, request_id)
        reason = loaded.get("reason", "")
        if not isinstance(reason, str):
            raise InvalidMessage("body field 'reason' must be str", request_id)
        return CancelMessage(request_id, reason)

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
    if message_type is MessageType.ACCEPTED:
        attempt = loaded.get("attempt", 1)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise InvalidMessage(f"body field 'attempt' must be a positive integer, not {attempt!r}", request_id)
        redelivered = loaded.get("redelivered", False)
        if not isinstance(redelivered, bool):
            raise InvalidMessage("body field 'redelivered' must be true or false", request_id)
        return AcceptedMessage(request_id, slave_id, attempt, redelivered)
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
    deadline = _optional_time(loaded, "deadline", request_id)
    start_by = _optional_time(loaded, "start_by", request_id)
    raw_mode = loaded.get("mode", DispatchMode.BROADCAST.value)
    try:
        mode = DispatchMode(raw_mode)
    except ValueError:
        raise InvalidMessage(
            f"unknown dispatch mode {raw_mode!r}; expected one of"
            f" {', '.join(m.value for m in DispatchMode)}",
            request_id,
        ) from None
    selector = loaded.get("selector", {})
    if not isinstance(selector, dict):
        raise InvalidMessage("body field 'selector' must be an object of strings", request_id)
    try:
        selector = validate_tags(selector)
    except ValueError as e:
        raise InvalidMessage(f"body field 'selector': {e}", request_id) from None
    target = loaded.get("target")
    if target is not None:
        if not isinstance(target, str):
            raise InvalidMessage("body field 'target' must be a slave id", request_id)
        try:
            validate_slave_id(target)
        except ValueError as e:
            raise InvalidMessage(f"body field 'target': {e}", request_id) from None
    if mode is DispatchMode.DIRECT and target is None:
        raise InvalidMessage("a direct task needs the body field 'target'", request_id)
    max_attempts = loaded.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise InvalidMessage(
            f"body field 'max_attempts' must be a positive integer, not {max_attempts!r}",
            request_id,
        )
    return TaskMessage(
        request_id,
        task,
        args,
        reply_to,
        deadline,
        mode=mode,
        selector=selector,
        target=target,
        start_by=start_by,
        max_attempts=max_attempts,
    )


def _is_finite(value: int | float) -> bool:
    # math.isfinite converts an int to float, which raises OverflowError for
    # ints beyond the float range (about 1.8e308); JSON can carry such ints.
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _optional_time(loaded: Mapping[str, Any], name: str, request_id: str) -> float | None:
    value = loaded.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _is_finite(value):
        raise InvalidMessage(f"body field {name!r} must be a Unix time in seconds", request_id)
    return float(value)


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
        or not _is_finite(interval)
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

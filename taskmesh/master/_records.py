"""
The master's data about slaves and requests: immutable snapshots for callers
and the mutable state of a pending request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from taskmesh._messages import DispatchMode, ProgressMessage

from ._states import TaskState


@dataclass(frozen=True)
class SlaveInfo:
    """
    A live slave as last announced. Times are ``clock.seconds()`` values.
    """

    slave_id: str
    hostname: str
    pid: int
    tasks: tuple[str, ...]
    tags: Mapping[str, str]
    interval: float
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class SlaveProgress:
    """
    The latest progress report of one slave for one request.
    """

    percent: float
    message: str
    updated_at: float


@dataclass(frozen=True)
class AcceptedAttempt:
    """
    One start of a request on a slave, from the slave's ``accepted`` message.

    ``attempt`` is the slave's own count of its starts of the request, and
    ``redelivered`` the broker's flag for a message delivered before.
    ``accepted_at`` is the master's ``clock.seconds()`` when the message
    arrived.
    """

    slave_id: str
    attempt: int
    redelivered: bool
    accepted_at: float


@dataclass(frozen=True)
class TaskOutcome:
    """
    The final result of a request, with what every slave returned.

    ``results`` maps slave ids to their JSON results and ``errors`` maps slave
    ids to ``(error_type, message)``. ``missing`` lists the expected slaves
    that sent neither a result nor an error. For a queue task, which expects
    no particular slave, it lists the slaves that started the task without
    replying. ``attempts`` lists every start of the task in arrival order.
    """

    request_id: str
    task: str
    state: TaskState
    results: dict[str, Any]
    errors: dict[str, tuple[str, str]]
    missing: tuple[str, ...]
    reason: str
    mode: DispatchMode = DispatchMode.BROADCAST
    attempts: tuple[AcceptedAttempt, ...] = ()


@dataclass(frozen=True)
class RequestRecord:
    """
    A snapshot of a request, pending or finished.

    ``expected`` contains the slaves that were live at dispatch and matched
    the selector, or the target of a direct task. It is empty for a queue task.
    ``missing`` contains the expected slaves that have sent neither a result
    nor an error yet, or for a queue task, the slaves that started it without
    replying. Times are ``clock.seconds()`` values, which are Unix
    times with the reactor as clock. ``finished_at`` is ``None`` while pending.
    ``start_by`` is the end of the time-to-live: no slave may start the task
    after it.
    """

    request_id: str
    task: str
    args: Mapping[str, Any]
    state: TaskState
    expected: tuple[str, ...]
    progress: Mapping[str, SlaveProgress]
    results: Mapping[str, Any]
    errors: Mapping[str, tuple[str, str]]
    missing: tuple[str, ...]
    reason: str
    timeout: float
    created_at: float
    deadline: float
    finished_at: float | None
    mode: DispatchMode = DispatchMode.BROADCAST
    selector: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    ttl: float = 0.0
    start_by: float = 0.0
    max_attempts: int = 1
    attempts: tuple[AcceptedAttempt, ...] = ()

    def to_outcome(self) -> TaskOutcome:
        """
        Convert this record into the outcome that a caller of ``dispatch`` gets.
        """
        return TaskOutcome(
            request_id=self.request_id,
            task=self.task,
            state=self.state,
            results=dict(self.results),
            errors=dict(self.errors),
            missing=self.missing,
            reason=self.reason,
            mode=self.mode,
            attempts=self.attempts,
        )


@dataclass
class PendingRequest:
    """
    The mutable state of a request while the master works on it.

    Its ``state`` leaves ``PENDING`` once, in ``MasterService._finish``.
    A request reloaded from the database after a restart has no
    ``deferred`` and no ``on_progress`` callback.
    """

    request_id: str
    task: str
    args: Mapping[str, Any]
    mode: DispatchMode
    selector: Mapping[str, str]
    target: str | None
    expected: frozenset[str]
    max_attempts: int
    timeout: float
    ttl: float
    created_at: float
    start_by: float
    deadline: float
    on_progress: Callable[[ProgressMessage], None] | None = None
    deferred: Deferred[TaskOutcome] | None = None
    state: TaskState = TaskState.PENDING
    reason: str = ""
    finished_at: float | None = None
    timer: IDelayedCall | None = None
    progress: dict[str, SlaveProgress] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    attempts: list[AcceptedAttempt] = field(default_factory=list)

    def has_replied(self, slave_id: str) -> bool:
        return slave_id in self.results or slave_id in self.errors

    def has_any_reply(self) -> bool:
        return bool(self.results or self.errors)

    def has_attempt(self, slave_id: str, attempt: int) -> bool:
        return any(a.slave_id == slave_id and a.attempt == attempt for a in self.attempts)

    def started_by(self) -> tuple[str, ...]:
        """
        Return the slaves that sent ``accepted``, each once, in arrival order.
        """
        return tuple(dict.fromkeys(a.slave_id for a in self.attempts))

    def missing(self) -> tuple[str, ...]:
        if self.mode is DispatchMode.QUEUE:
            if self.has_any_reply():
                return ()
            return self.started_by()
        return tuple(sorted(s for s in self.expected if not self.has_replied(s)))

    def snapshot(self) -> RequestRecord:
        return RequestRecord(
            request_id=self.request_id,
            task=self.task,
            args=self.args,
            state=self.state,
            expected=tuple(sorted(self.expected)),
            progress=dict(self.progress),
            results=dict(self.results),
            errors=dict(self.errors),
            missing=self.missing(),
            reason=self.reason,
            timeout=self.timeout,
            created_at=self.created_at,
            deadline=self.deadline,
            finished_at=self.finished_at,
            mode=self.mode,
            selector=dict(self.selector),
            target=self.target,
            ttl=self.ttl,
            start_by=self.start_by,
            max_attempts=self.max_attempts,
            attempts=tuple(self.attempts),
        )


def copy_json_value(value: Any, path: str) -> Any:
    """
    Copy ``value`` as plain JSON types, or raise ValueError naming the ``path``.

    Mappings become dicts and tuples become lists. Non-string keys are
    rejected because ``json.dumps`` would silently turn them into strings.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value!r}, which JSON cannot represent")
        return value
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path} has the key {key!r}: JSON object keys must be strings")
            copied[key] = copy_json_value(item, f"{path}[{key!r}]")
        return copied
    if isinstance(value, (list, tuple)):
        return [copy_json_value(item, f"{path}[{index}]") for index, item in enumerate(value)]
    raise ValueError(
        f"{path} is a {type(value).__name__}; expected a JSON value"
        " (dict with str keys, list, str, int, float, bool or None)"
    )

"""
The master daemon's core: dispatch tasks to slaves and collect their replies.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskmesh import __version__
from taskmesh._messages import (
    HEADER_SLAVE_ID,
    Announcement,
    Destinations,
    DiscoverMessage,
    ErrorMessage,
    InvalidMessage,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
    new_request_id,
    validate_task_name,
)
from taskmesh.stomp import StompConnection, StompError, StompMessage, Subscription

# A slave that sends no announcement for this many of its announced intervals
# is dropped from the live slaves.
MISSED_INTERVALS = 3

DEFAULT_MAX_FINISHED = 1000

# Seconds between checks for expired slaves and for lost broker sessions.
HOUSEKEEPING_INTERVAL = 1.0

# Each kind of unmatched or invalid message is logged individually this many
# times per window of LOG_WINDOW seconds. The rest are counted and summarised
# once per window.
LOGGED_PER_WINDOW = 5
LOG_WINDOW = 60.0


class TaskState(str, Enum):
    """
    State of a request.

    A :class:`TaskOutcome` never has ``PENDING``. When some slaves returned an
    error and others did not reply, the state is ``FAILED``.
    """

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


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
class TaskOutcome:
    """
    The final result of a request, with what every slave returned.

    ``results`` maps slave ids to their JSON results and ``errors`` maps slave
    ids to ``(error_type, message)``. ``missing`` lists the expected slaves
    that sent neither a result nor an error.
    """

    request_id: str
    task: str
    state: TaskState
    results: dict[str, Any]
    errors: dict[str, tuple[str, str]]
    missing: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class RequestRecord:
    """
    A snapshot of a request, pending or finished.

    ``expected`` contains the slaves that were live at dispatch. ``missing``
    contains the expected slaves that have sent neither a result nor an error
    yet. Times are ``clock.seconds()`` values, which are Unix
    times with the reactor as clock. ``finished_at`` is ``None`` while pending.
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
        )


@dataclass
class _Request:
    """
    The mutable state of a pending request.

    Its ``state`` leaves ``PENDING`` once, in :meth:`MasterService._finish`.
    """

    request_id: str
    task: str
    args: Mapping[str, Any]
    expected: frozenset[str]
    timeout: float
    created_at: float
    deadline: float
    on_progress: Callable[[ProgressMessage], None] | None
    deferred: Deferred[TaskOutcome] = field(init=False)
    state: TaskState = TaskState.PENDING
    reason: str = ""
    finished_at: float | None = None
    timer: IDelayedCall | None = None
    progress: dict[str, SlaveProgress] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)

    def has_replied(self, slave_id: str) -> bool:
        return slave_id in self.results or slave_id in self.errors

    def missing(self) -> tuple[str, ...]:
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
        )


class _LogRateLimiter:
    """
    Decide which repeated events get a log line of their own.

    Per kind of event, the first ``limit`` events of each ``window`` seconds
    are logged and the rest counted. :meth:`flush` logs one summary line per
    kind for each window that had suppressed events.
    """

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime,
        limit: int = LOGGED_PER_WINDOW,
        window: float = LOG_WINDOW,
    ) -> None:
        self.log = log
        self._clock = clock
        self._limit = limit
        self._window = window
        # kind -> [window start, events logged, events suppressed]
        self._windows: dict[str, list[float]] = {}

    def should_log(self, kind: str) -> bool:
        now = self._clock.seconds()
        counts = self._windows.get(kind)
        if counts is None or now - counts[0] >= self._window:
            self._summarise(kind)
            counts = self._windows[kind] = [now, 0, 0]
        if counts[1] < self._limit:
            counts[1] += 1
            return True
        counts[2] += 1
        return False

    def flush(self) -> None:
        now = self._clock.seconds()
        for kind, counts in list(self._windows.items()):
            if now - counts[0] >= self._window:
                self._summarise(kind)
                del self._windows[kind]

    def _summarise(self, kind: str) -> None:
        counts = self._windows.get(kind)
        if counts is not None and counts[2]:
            self.log.warn(
                "{count} more {kind} in the last {seconds:.0f} s were counted but not logged",
                count=int(counts[2]),
                kind=kind,
                seconds=self._clock.seconds() - counts[0],
            )


def _copy_json_value(value: Any, path: str) -> Any:
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
            copied[key] = _copy_json_value(item, f"{path}[{key!r}]")
        return copied
    if isinstance(value, (list, tuple)):
        return [_copy_json_value(item, f"{path}[{index}]") for index, item in enumerate(value)]
    raise ValueError(
        f"{path} is a {type(value).__name__}; expected a JSON value"
        " (dict with str keys, list, str, int, float, bool or None)"
    )


def _count_slaves(count: int) -> str:
    return f"{count} slave" if count == 1 else f"{count} slaves"


class MasterService(Service):
    """
    Dispatch tasks to the slaves of a namespace and collect their replies.

    The service subscribes to the namespace's reply queue and presence topic
    while it runs. After each connect it sends a discover request, to which
    slaves reply with an announcement.
    """

    log = Logger()

    def __init__(
        self,
        connection: StompConnection,
        namespace: str,
        *,
        clock: IReactorTime,
        default_timeout: float = 60.0,
        max_finished: int = DEFAULT_MAX_FINISHED,
    ) -> None:
        """
        Args:
            connection: the broker connection; the caller starts and stops it.
            namespace: the destination namespace shared with the slaves.
            clock: the source of time and timers, normally the reactor.
            default_timeout: seconds that ``dispatch`` waits for replies when
                the caller gives no timeout.
            max_finished: how many finished requests to keep for inspection.

        Raises:
            ValueError: the namespace, default timeout or ``max_finished`` is
                invalid.
        """
        self._connection = connection
        self._destinations = Destinations(namespace)
        self._clock = clock
        self._default_timeout = _check_timeout(default_timeout, "default_timeout")
        if max_finished < 1:
            raise ValueError(f"max_finished must be at least 1, not {max_finished}")
        self._max_finished = max_finished

        self._slaves: dict[str, SlaveInfo] = {}
        self._pending: dict[str, _Request] = {}
        self._finished: OrderedDict[str, RequestRecord] = OrderedDict()
        self._stats: dict[str, int] = dict.fromkeys(
            [
                "dispatched",
                *(state.value for state in TaskState if state is not TaskState.PENDING),
                "send_failures",
                "progress",
                "results",
                "errors",
                "unexpected_replies",
                "duplicate_replies",
                "late_replies",
                "unknown_replies",
                "invalid_messages",
                "announcements",
                "slaves_expired",
                "discovers_sent",
                "handler_failures",
            ],
            0,
        )
        self._log_limiter = _LogRateLimiter(self.log, clock)
        self._subscriptions: list[Subscription] = []
        self._housekeeping: LoopingCall | None = None
        self._discover_loop: Deferred[None] | None = None

    @property
    def connection(self) -> StompConnection:
        """
        The broker connection that this master uses.
        """
        return self._connection

    @property
    def clock(self) -> IReactorTime:
        """
        The clock that this master uses for timestamps and timers.
        """
        return self._clock

    @property
    def destinations(self) -> Destinations:
        """
        The STOMP destinations of this master's namespace.
        """
        return self._destinations

    @property
    def default_timeout(self) -> float:
        """
        Seconds that ``dispatch`` waits for replies when no timeout is given.
        """
        return self._default_timeout

    @property
    def stats(self) -> dict[str, int]:
        """
        A copy of the event counters: requests by final state and messages.
        """
        return dict(self._stats)

    # -- Lifecycle -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.log.info(
            "taskmesh master {version} starting in namespace {namespace}",
            version=__version__,
            namespace=self._destinations.namespace,
        )
        self._subscriptions = [
            self._connection.subscribe(self._destinations.reply, self._on_reply_message),
            self._connection.subscribe(self._destinations.presence, self._on_presence_message),
        ]

        self._housekeeping = LoopingCall(self._run_housekeeping)
        self._housekeeping.clock = self._clock
        self._housekeeping.start(HOUSEKEEPING_INTERVAL, now=False).addErrback(
            self._log_housekeeping_failure
        )

        self._discover_loop = Deferred.fromCoroutine(self._discover_after_each_connect())
        self._discover_loop.addErrback(self._log_discover_loop_end)

    def stopService(self) -> Deferred[None]:
        """
        Stop timers, end pending requests as cancelled and unsubscribe.

        The returned Deferred fires once both subscriptions are cancelled. An
        unsubscribe that fails is logged, not raised.
        """
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.log.info("taskmesh master stopping")
        if self._housekeeping is not None and self._housekeeping.running:
            self._housekeeping.stop()
        self._housekeeping = None
        if self._discover_loop is not None:
            self._discover_loop.cancel()
            self._discover_loop = None

        for request in list(self._pending.values()):
            self._finish(request, TaskState.CANCELLED, "the master is stopping")

        subscriptions, self._subscriptions = self._subscriptions, []
        return Deferred.fromCoroutine(self._unsubscribe(subscriptions))

    async def _unsubscribe(self, subscriptions: list[Subscription]) -> None:
        for subscription in subscriptions:
            try:
                await maybeDeferred(subscription.unsubscribe)
            except StompError as e:
                self.log.warn(
                    "could not unsubscribe from {destination}: {error}",
                    destination=subscription.destination,
                    error=e,
                )
        self.log.info("taskmesh master stopped")

    def _log_housekeeping_failure(self, failure: Failure) -> None:
        self.log.failure("slave expiry checks stopped after an unexpected error", failure)

    def _run_housekeeping(self) -> None:
        self._expire_slaves()
        self._log_limiter.flush()

    # -- Presence ------------------------------------------------------------

    async def _discover_after_each_connect(self) -> None:
        """
        Send a discover request whenever a broker session is established.

        NOTE: ``StompConnection`` reports connects but not disconnects, so a
        lost session is noticed by polling ``is_connected`` every
        HOUSEKEEPING_INTERVAL seconds. A reconnect within one poll interval
        sends no discover request, and the slaves' next ``alive``
        announcements repair the list instead.
        """
        while True:
            try:
                await self._connection.when_connected()
            except StompError as e:
                # The connection service fails its waiters when it stops.
                self.log.warn("stopped waiting for a broker session: {error}", error=e)
                await deferLater(self._clock, HOUSEKEEPING_INTERVAL)
                continue
            await self._send_discover()
            while self._connection.is_connected:
                await deferLater(self._clock, HOUSEKEEPING_INTERVAL)

    async def _send_discover(self) -> None:
        headers, body = encode(DiscoverMessage())
        try:
            await self._connection.send(self._destinations.presence, body, headers)
        except StompError as e:
            self.log.warn(
                "could not send a discover request to {destination}: {error}",
                destination=self._destinations.presence,
                error=e,
            )
            return
        self._stats["discovers_sent"] += 1
        self.log.info(
            "sent a discover request to {destination}", destination=self._destinations.presence
        )

    def _log_discover_loop_end(self, failure: Failure) -> None:
        if not isinstance(failure.value, CancelledError):
            self.log.failure(
                "discover requests stopped after an unexpected error; slaves are"
                " still learned from their periodic announcements",
                failure,
            )

    def _on_presence_message(self, message: StompMessage) -> None:
        try:
            decoded = decode(message.headers, message.body)
            if isinstance(decoded, Announcement):
                self._on_announcement(decoded)
            elif not isinstance(decoded, DiscoverMessage):
                # Discover requests come from this or another master; ignore them.
                self._on_invalid_message(
                    message,
                    InvalidMessage(f"unexpected {type(decoded).__name__} on the presence topic"),
                )
        except InvalidMessage as e:
            self._on_invalid_message(message, e)
        except Exception:
            # The broker client must not see handler errors, so log them here.
            self._stats["handler_failures"] += 1
            self.log.failure(
                "unexpected error handling a message from {destination}",
                destination=message.destination,
            )

    def _on_announcement(self, announcement: Announcement) -> None:
        self._stats["announcements"] += 1
        slave_id = announcement.slave_id
        known = self._slaves.get(slave_id)
        if announcement.state is SlaveState.DOWN:
            if self._slaves.pop(slave_id, None) is not None:
                self.log.info("slave {slave_id} went down", slave_id=slave_id)
            return

        now = self._clock.seconds()
        self._slaves[slave_id] = SlaveInfo(
            slave_id=slave_id,
            hostname=announcement.hostname,
            pid=announcement.pid,
            tasks=announcement.tasks,
            tags=dict(announcement.tags),
            interval=announcement.interval,
            first_seen=known.first_seen if known is not None else now,
            last_seen=now,
        )
        if known is None or announcement.state is SlaveState.UP:
            self.log.info(
                "slave {slave_id} is {state} on {hostname} (pid {pid}) with tasks {tasks}",
                slave_id=slave_id,
                state=announcement.state.value,
                hostname=announcement.hostname or "an unknown host",
                pid=announcement.pid,
                tasks=", ".join(announcement.tasks) or "(none)",
            )

    def _expire_slaves(self) -> None:
        now = self._clock.seconds()
        for slave in list(self._slaves.values()):
            silence = now - slave.last_seen
            if silence > MISSED_INTERVALS * slave.interval:
                del self._slaves[slave.slave_id]
                self._stats["slaves_expired"] += 1
                self.log.warn(
                    "dropped slave {slave_id}: no announcement for {seconds:.0f} s,"
                    " {missed} times its interval of {interval} s",
                    slave_id=slave.slave_id,
                    seconds=silence,
                    missed=MISSED_INTERVALS,
                    interval=slave.interval,
                )

    def live_slaves(self) -> list[SlaveInfo]:
        """
        Return the live slaves sorted by slave id.
        """
        return [self._slaves[slave_id] for slave_id in sorted(self._slaves)]

    # -- Dispatch ------------------------------------------------------------

    def dispatch(
        self,
        task: str,
        args: Mapping[str, Any],
        *,
        timeout: float | None = None,
        on_progress: Callable[[ProgressMessage], None] | None = None,
        request_id: str | None = None,
    ) -> Deferred[TaskOutcome]:
        """
        Send a task to every slave and collect the replies.

        The request ends when every slave that was live at dispatch has sent a
        result or an error, or after ``timeout`` seconds. Without live slaves
        it collects replies until the timeout. ``on_progress`` is called with
        each progress message for this request.

        Args:
            task: the task name.
            args: the task's arguments, encodable as a JSON object.
            timeout: seconds to wait for replies; ``default_timeout`` if None.
            on_progress: called with each progress message of this request.
            request_id: a UUID to use instead of a new random one.

        Returns:
            A Deferred that fires with a :class:`TaskOutcome`, also when the
            send fails (``FAILED``) or the Deferred is cancelled (``CANCELLED``).

        Raises:
            ValueError: the task name, args, timeout or request id is invalid.
            RuntimeError: the service is not running.
        """
        if not self.running:
            raise RuntimeError("the master service is not running; start it before dispatching")
        validate_task_name(task)
        timeout = self._default_timeout if timeout is None else _check_timeout(timeout, "timeout")
        if not isinstance(args, Mapping):
            raise ValueError(f"args must be a mapping, not {type(args).__name__}")
        args = _copy_json_value(args, "args")
        request_id = self._check_new_request_id(request_id)

        now = self._clock.seconds()
        message = TaskMessage(
            request_id=request_id,
            task=task,
            args=args,
            reply_to=self._destinations.reply,
            deadline=now + timeout,
        )
        headers, body = encode(message)

        request = _Request(
            request_id=request_id,
            task=task,
            args=message.args,
            expected=frozenset(self._slaves),
            timeout=timeout,
            created_at=now,
            deadline=now + timeout,
            on_progress=on_progress,
        )
        request.deferred = Deferred(
            lambda _: self._finish(request, TaskState.CANCELLED, "cancelled by the caller")
        )
        self._pending[request_id] = request
        request.timer = self._clock.callLater(timeout, self._on_deadline, request)
        self._stats["dispatched"] += 1
        self.log.info(
            "dispatching task {task} as request {request_id} to {count} live slaves: {expected}",
            task=task,
            request_id=request_id,
            count=len(request.expected),
            expected=", ".join(sorted(request.expected)) or "(none)",
        )

        sent = maybeDeferred(
            self._connection.send, self._destinations.tasks, body, headers, receipt=True
        )
        sent.addErrback(self._on_send_failure, request)
        return request.deferred

    def _check_new_request_id(self, request_id: str | None) -> str:
        if request_id is None:
            return new_request_id()
        try:
            uuid.UUID(request_id)
        except (TypeError, ValueError):
            raise ValueError(f"invalid request id {request_id!r}: expected a UUID") from None
        if request_id in self._pending or request_id in self._finished:
            raise ValueError(f"request id {request_id} is already in use")
        return request_id

    def _on_send_failure(self, failure: Failure, request: _Request) -> None:
        self._stats["send_failures"] += 1
        if isinstance(failure.value, StompError):
            self.log.error(
                "could not send request {request_id} to {destination}: {error}",
                request_id=request.request_id,
                destination=self._destinations.tasks,
                error=failure.value,
            )
        else:
            self.log.failure(
                "unexpected error sending request {request_id} to {destination}",
                failure,
                request_id=request.request_id,
                destination=self._destinations.tasks,
            )
        self._finish(
            request,
            TaskState.FAILED,
            f"could not send the task to {self._destinations.tasks}: {failure.value}",
        )

    # -- Replies -------------------------------------------------------------

    def _on_reply_message(self, message: StompMessage) -> None:
        try:
            decoded = decode(message.headers, message.body)
            if isinstance(decoded, ProgressMessage):
                self._on_progress(decoded)
            elif isinstance(decoded, (ResultMessage, ErrorMessage)):
                self._on_final_reply(decoded)
            else:
                self._on_invalid_message(
                    message,
                    InvalidMessage(f"unexpected {type(decoded).__name__} on the reply queue"),
                )
        except InvalidMessage as e:
            self._on_invalid_message(message, e)
        except Exception:
            # The broker client must not see handler errors, so log them here.
            self._stats["handler_failures"] += 1
            self.log.failure(
                "unexpected error handling a message from {destination}",
                destination=message.destination,
            )

    def _on_progress(self, progress: ProgressMessage) -> None:
        request = self._pending.get(progress.request_id)
        if request is None:
            self._on_unmatched_reply(progress)
            return
        if request.has_replied(progress.slave_id):
            # A report that arrives after the slave's own result changes nothing.
            return

        self._stats["progress"] += 1
        request.progress[progress.slave_id] = SlaveProgress(
            progress.percent, progress.message, self._clock.seconds()
        )
        if request.on_progress is not None:
            try:
                request.on_progress(progress)
            except Exception:
                self.log.failure(
                    "progress callback of request {request_id} failed",
                    request_id=request.request_id,
                    slave_id=progress.slave_id,
                )

    def _on_final_reply(self, reply: ResultMessage | ErrorMessage) -> None:
        request = self._pending.get(reply.request_id)
        if request is None:
            self._on_unmatched_reply(reply)
            return
        slave_id = reply.slave_id
        if request.has_replied(slave_id):
            self._stats["duplicate_replies"] += 1
            if self._log_limiter.should_log("duplicate replies"):
                self.log.warn(
                    "dropped a duplicate reply from slave {slave_id} for request {request_id}",
                    slave_id=slave_id,
                    request_id=request.request_id,
                )
            return
        if slave_id not in request.expected:
            self._stats["unexpected_replies"] += 1

        if isinstance(reply, ResultMessage):
            self._stats["results"] += 1
            request.results[slave_id] = reply.result
            self.log.info(
                "slave {slave_id} returned a result for request {request_id}",
                slave_id=slave_id,
                request_id=request.request_id,
            )
        else:
            self._stats["errors"] += 1
            request.errors[slave_id] = (reply.error_type, reply.message)
            self.log.warn(
                "slave {slave_id} returned an error for request {request_id}:"
                " {error_type}: {message}",
                slave_id=slave_id,
                request_id=request.request_id,
                error_type=reply.error_type,
                message=reply.message,
            )

        if request.expected and not request.missing():
            self._finish_replied(request)

    def _on_unmatched_reply(self, reply: ProgressMessage | ResultMessage | ErrorMessage) -> None:
        finished = self._finished.get(reply.request_id)
        if finished is not None:
            self._stats["late_replies"] += 1
            if self._log_limiter.should_log("late replies"):
                self.log.warn(
                    "ignored a late {kind} from slave {slave_id} for request {request_id},"
                    " which already ended as {state}",
                    kind=type(reply).__name__,
                    slave_id=reply.slave_id,
                    request_id=reply.request_id,
                    state=finished.state.value,
                )
            return

        self._stats["unknown_replies"] += 1
        if self._log_limiter.should_log("replies for unknown requests"):
            self.log.warn(
                "ignored a {kind} from slave {slave_id} for unknown request {request_id};"
                " another master may share the namespace, or the request ended"
                " before the last {max_finished} finished requests",
                kind=type(reply).__name__,
                slave_id=reply.slave_id,
                request_id=reply.request_id,
                max_finished=self._max_finished,
            )

    def _on_invalid_message(self, message: StompMessage, error: InvalidMessage) -> None:
        self._stats["invalid_messages"] += 1
        if self._log_limiter.should_log("invalid messages"):
            self.log.warn(
                "ignored an invalid message from {destination}: {error}",
                destination=message.destination,
                error=error.reason,
                request_id=error.request_id,
                slave_id=message.headers.get(HEADER_SLAVE_ID),
            )

    # -- Completion ----------------------------------------------------------

    def _finish_replied(self, request: _Request) -> None:
        replied = len(request.results) + len(request.errors)
        if request.errors:
            self._finish(request, TaskState.FAILED, _describe_errors(request, replied))
        else:
            self._finish(
                request,
                TaskState.SUCCEEDED,
                f"{_count_slaves(len(request.results))} returned a result",
            )

    def _on_deadline(self, request: _Request) -> None:
        request.timer = None
        missing = request.missing()
        replied = len(request.results) + len(request.errors)
        if request.errors:
            reason = _describe_errors(request, replied)
            if missing:
                reason += (
                    f"; {_count_slaves(len(missing))} did not reply within"
                    f" {request.timeout:g} s: {', '.join(missing)}"
                )
            self._finish(request, TaskState.FAILED, reason)
        elif missing:
            self._finish(
                request,
                TaskState.TIMED_OUT,
                f"{len(missing)} of {_count_slaves(len(request.expected))} did not reply"
                f" within {request.timeout:g} s: {', '.join(missing)}",
            )
        elif request.results:
            self._finish(
                request,
                TaskState.SUCCEEDED,
                f"no slave was live at dispatch; {_count_slaves(len(request.results))}"
                f" returned a result within {request.timeout:g} s",
            )
        else:
            self._finish(
                request,
                TaskState.EXPIRED,
                f"no slave was live at dispatch and none replied within {request.timeout:g} s",
            )

    def _finish(self, request: _Request, state: TaskState, reason: str) -> None:
        """
        Move a pending request to ``state`` and fire its Deferred.

        This is the only transition out of ``PENDING``; later calls for the
        same request do nothing.
        """
        if request.state is not TaskState.PENDING:
            return
        request.state = state
        request.reason = reason
        request.finished_at = self._clock.seconds()
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None

        del self._pending[request.request_id]
        record = request.snapshot()
        self._finished[request.request_id] = record
        while len(self._finished) > self._max_finished:
            self._finished.popitem(last=False)
        self._stats[state.value] += 1

        log_method = self.log.info if state is TaskState.SUCCEEDED else self.log.warn
        log_method(
            "request {request_id} for task {task} ended as {state}: {reason}",
            request_id=request.request_id,
            task=request.task,
            state=state.value,
            reason=reason,
            missing=record.missing,
        )
        request.deferred.callback(record.to_outcome())

    # -- Inspection ----------------------------------------------------------

    def get_request(self, request_id: str) -> RequestRecord | None:
        """
        Return a snapshot of a pending or recently finished request, or None.
        """
        pending = self._pending.get(request_id)
        if pending is not None:
            return pending.snapshot()
        return self._finished.get(request_id)

    def recent_requests(self) -> list[RequestRecord]:
        """
        Return the pending and the kept finished requests, newest first.
        """
        records = list(self._finished.values())
        records.extend(request.snapshot() for request in self._pending.values())
        # A stable ascending sort, then reversed, keeps requests dispatched in the
        # same clock tick newest first too.
        records.sort(key=lambda record: record.created_at)
        records.reverse()
        return records


def _check_timeout(timeout: float, name: str) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def _describe_errors(request: _Request, replied: int) -> str:
    details = ", ".join(
        f"{slave_id} ({error_type})" for slave_id, (error_type, _) in sorted(request.errors.items())
    )
    return (
        f"{len(request.errors)} of {_count_slaves(replied)} that replied"
        f" returned an error: {details}"
    )

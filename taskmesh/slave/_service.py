"""
The slave daemon's service: receives tasks, runs their handlers and replies.
"""

from __future__ import annotations

import inspect
import math
import os
import socket
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from taskmesh import __version__
from taskmesh._messages import (
    HEADER_REPLY_TO,
    AcceptedMessage,
    Announcement,
    CancelMessage,
    Destinations,
    DiscoverMessage,
    DispatchMode,
    ErrorMessage,
    InvalidMessage,
    Message,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
    matches_selector,
    validate_slave_id,
    validate_tags,
)
from taskmesh.stomp._errors import StompError
from taskmesh.stomp._interfaces import StompConnection, StompMessage, Subscription

from ._cache import BoundedCache
from ._deliveries import Delivery, DeliveryTracker, WorkQueue
from ._handlers import Handler, HandlerRegistry, InvalidArguments, ProgressReporter

# Error types that the slave itself sends, besides InvalidArguments and the
# class names of exceptions raised by handlers.
ERROR_INVALID_TASK = "InvalidTask"
ERROR_UNKNOWN_TASK = "UnknownTask"
ERROR_EXPIRED = "Expired"
ERROR_INVALID_RESULT = "InvalidResult"
ERROR_SLAVE_STOPPING = "SlaveStopping"
ERROR_CANCELLED = "Cancelled"
ERROR_WRONG_SLAVE = "WrongSlave"

# Progress reports of one task are sent at most this often, in seconds. A
# report that comes sooner replaces the one waiting to be sent.
PROGRESS_MIN_INTERVAL = 0.5

# Seconds to wait for a reply or announcement that is being sent during
# shutdown, after the grace period for running tasks is over.
SHUTDOWN_SEND_TIMEOUT = 5.0

# Attempts to send a result or error when the connection is down: each
# attempt after the first waits for the connection to come back.
REPLY_ATTEMPTS = 3

# A repeated warning (invalid messages, failed announcements) is logged at
# most once per this many seconds, with the number of repeats not logged.
WARNING_INTERVAL = 10.0

# Replies of finished queue and direct requests, kept in memory and sent
# again on a redelivery instead of running the task again: at most this many
# replies and this many bytes of encoded reply bodies.
FINISHED_CACHE_ENTRIES = 1000
FINISHED_CACHE_BYTES = 64 * 1024 * 1024

# Cancelled request ids, and start counts per request, kept in memory.
REQUEST_CACHE_ENTRIES = 10_000

STATS_KEYS = (
    "tasks_received",
    "tasks_queued",
    "tasks_succeeded",
    "tasks_failed",
    "tasks_unknown",
    "tasks_expired",
    "tasks_duplicate",
    "tasks_redelivered",
    "tasks_rejected_stopping",
    "tasks_held_stopping",
    "tasks_cancelled",
    "tasks_not_selected",
    "tasks_wrong_slave",
    "cancels_received",
    "invalid_messages",
    "ignored_messages",
    "accepted_sent",
    "accepted_failed",
    "replies_sent",
    "replies_resent",
    "replies_failed",
    "acks_sent",
    "acks_failed",
    "deliveries_released",
    "progress_sent",
    "progress_dropped",
    "announcements_sent",
    "announcements_failed",
)


@dataclass
class _TaskRun:
    """
    A task accepted by this slave, from queued to replied.

    ``deliveries`` are the queue messages that the reply settles: none for
    a broadcast task, and more than one when the broker delivered the same
    request again while it waited or ran here.
    """

    task: TaskMessage
    handler: Handler
    from_queue: bool = False
    redelivered: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    handler_call: Deferred[Any] | None = None
    cancel_reason: str | None = None
    cancelled_by_shutdown: bool = False
    lifecycle: Deferred[None] | None = None
    finished: bool = False
    last_progress_at: float = -math.inf
    pending_progress: tuple[float, str] | None = None
    progress_call: IDelayedCall | None = None


@dataclass(frozen=True)
class _FinishedReply:
    """
    The final reply of a finished queue or direct request, encoded.
    """

    reply: ResultMessage | ErrorMessage
    headers: dict[str, str]
    body: bytes


class _WarningThrottle:
    """
    Rate limit for one kind of repeated warning, with a count of the repeats
    that were not logged.
    """

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._last_logged = -math.inf
        self.suppressed = 0

    def should_log(self) -> bool:
        now = self._clock.seconds()
        if now - self._last_logged >= self._interval:
            self._last_logged = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class SlaveService(Service):
    """
    Runs the master's tasks and sends their progress and results.

    On start the service subscribes to the tasks, control and presence
    topics, and to its work queues: the shared one, one per tag, and its own
    direct queue. Queue subscriptions acknowledge each message individually
    and take at most ``concurrency`` unacknowledged messages each. Once the
    connection is up, the service announces ``up``, then ``alive`` every
    ``announce_interval`` seconds, after each reconnect, and whenever a
    master sends a discovery request. At most ``concurrency`` tasks run at
    once. Later tasks wait in memory, in arrival order. Blocking handlers run
    in a thread pool of ``concurrency`` threads, which the service starts and
    stops.

    Before running a task the service sends ``accepted``; for a queue task it
    waits for the broker's receipt first. It acknowledges a queue message
    only after the broker has accepted the task's result or error. It
    remembers the replies of recently finished queue requests and sends them
    again, without running the task, when the broker redelivers one. It
    remembers cancelled requests, skips a task whose ``start_by`` time or
    deadline has passed, and ignores a broadcast task whose selector does not
    match its tags.

    ``stopService`` stops taking tasks and waits up to ``grace_period``
    seconds for running ones. A queue task that has not started, or that
    still runs at the end of the grace period, gets no reply and no
    acknowledgement, so the broker delivers it to another slave. A broadcast
    task that has not started gets a ``SlaveStopping`` error, and one still
    running at the end is cancelled with a ``Cancelled`` error. Then the
    service announces ``down``. The returned Deferred fires when all of that
    is done.

    Args:
        connection: the broker connection. Its subscriptions must survive
            reconnects.
        clock: the time source for announcements, deadlines, the grace
            period and progress rate limits.
        reactor: delivers thread pool results and progress reports from
            handler threads to the reactor thread.
        tags: the slave's tags. Tags whose names and values are not valid in
            queue names (see :func:`taskmesh._messages.validate_tags`) are
            announced but get no work queue.
        thread_pool: the pool for blocking handlers. By default the service
            creates one with ``concurrency`` threads.
        finished_cache_size: how many finished queue requests keep their reply.
        request_cache_size: how many cancelled request ids, and how many
            start counts, the service keeps.
    """

    log = Logger()

    def __init__(
        self,
        connection: StompConnection,
        namespace: str,
        slave_id: str,
        registry: HandlerRegistry,
        *,
        clock: IReactorTime,
        reactor: IReactorFromThreads,
        announce_interval: float = 10.0,
        concurrency: int = 4,
        tags: Mapping[str, str] = MappingProxyType({}),
        grace_period: float = 30.0,
        thread_pool: ThreadPool | None = None,
        finished_cache_size: int = FINISHED_CACHE_ENTRIES,
        request_cache_size: int = REQUEST_CACHE_ENTRIES,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        if not announce_interval > 0:
            raise ValueError(
                f"announce_interval must be a positive number of seconds, got {announce_interval!r}"
            )
        if not grace_period >= 0:
            raise ValueError(
                f"grace_period must be a non-negative number of seconds, got {grace_period!r}"
            )
        self.connection = connection
        self.destinations = Destinations(namespace)
        self.slave_id = validate_slave_id(slave_id)
        self.registry = registry
        self.announce_interval = announce_interval
        self.concurrency = concurrency
        self.tags = dict(tags)
        self.grace_period = grace_period
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.stats: dict[str, int] = dict.fromkeys(STATS_KEYS, 0)

        self._clock = clock
        self._reactor = reactor
        if thread_pool is None:
            thread_pool = ThreadPool(
                minthreads=0, maxthreads=concurrency, name=f"taskmesh-slave-{slave_id}"
            )
        self._thread_pool = thread_pool
        self._running: dict[str, _TaskRun] = {}
        self._waiting: deque[_TaskRun] = deque()
        # Replies that belong to no running task (rejections and replies
        # sent again), still being sent or acknowledged.
        self._pending_replies: set[Deferred[None]] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._starting_waiting_tasks = False
        self._accepting = False
        self._task_subscription: Subscription | None = None
        self._control_subscription: Subscription | None = None
        self._presence_subscription: Subscription | None = None
        self._deliveries = DeliveryTracker(connection, self.slave_id, self._unsubscribe, self.stats)
        self._finished_replies: BoundedCache[str, _FinishedReply] = BoundedCache(
            finished_cache_size,
            max_size=FINISHED_CACHE_BYTES,
            size_of=lambda finished: len(finished.body),
        )
        self._cancelled: BoundedCache[str, str] = BoundedCache(request_cache_size)
        self._starts: BoundedCache[str, int] = BoundedCache(request_cache_size)
        self._listening_to_sessions = False
        self._first_session_pending = False
        self._first_connection: Deferred[None] | None = None
        self._announcer: LoopingCall | None = None
        self._invalid_message_warnings = _WarningThrottle(clock, WARNING_INTERVAL)
        self._announcement_warnings = _WarningThrottle(clock, WARNING_INTERVAL)

    # Service

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        self.log.info(
            "taskmesh {version} slave {slave_id} starting in namespace {namespace}"
            " with tasks {tasks}, concurrency {concurrency}",
            version=__version__,
            slave_id=self.slave_id,
            namespace=self.destinations.namespace,
            tasks=", ".join(self.registry.names()),
            concurrency=self.concurrency,
        )
        self._thread_pool.start()
        self._accepting = True

        # When the connection is down now, the first session announces up and
        # needs no alive announcement of its own.
        self._first_session_pending = not self.connection.is_connected
        if not self._listening_to_sessions:
            self._listening_to_sessions = True
            self.connection.add_session_listener(self._on_session)

        self._task_subscription = self.connection.subscribe(
            self.destinations.tasks, self._on_task_message
        )
        self._control_subscription = self.connection.subscribe(
            self.destinations.control, self._on_control_message
        )
        self._presence_subscription = self.connection.subscribe(
            self.destinations.presence, self._on_presence_message
        )
        self._deliveries.subscribe(
            self._work_destinations(), self._on_work_message, prefetch=self.concurrency
        )

        self._first_connection = self.connection.when_connected()
        self._first_connection.addCallbacks(
            self._on_first_connection, self._on_connection_wait_failed
        )

    def stopService(self) -> Deferred[None]:
        was_running = self.running
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        if not was_running:
            return succeed(None)
        return Deferred.fromCoroutine(self._stop())

    def _work_destinations(self) -> list[str]:
        """
        Return the queues that this slave consumes: the shared work queue,
        one work queue per tag, and its direct queue.
        """
        destinations = [self.destinations.work()]
        for name, value in self.tags.items():
            try:
                destinations.append(self.destinations.work(validate_tags({name: value})))
            except ValueError as e:
                self.log.warn(
                    "slave {slave_id} does not consume a work queue for tag {tag}: {error}",
                    slave_id=self.slave_id,
                    tag=f"{name}={value}",
                    error=str(e),
                )
        destinations.append(self.destinations.direct(self.slave_id))
        return destinations

    def _on_session(self) -> None:
        """
        Start over after a reconnect: queue messages from the earlier
        connection went back to the broker, and the current connection's
        generation is unknown until a message arrives. The alive
        announcement comes back over the presence subscription and so sets it.
        """
        if self._first_session_pending:
            self._first_session_pending = False
            return
        self._deliveries.new_session()
        if self._accepting:
            self._announce(SlaveState.ALIVE)

    def _observe(self, message: StompMessage) -> None:
        """
        Note the connection generation of every received message, and let
        go of waiting queue tasks that an earlier connection delivered.
        """
        if self._deliveries.observe(message):
            self._release_stale_waiting()
            self._start_waiting_tasks()

    # Announcements

    def _on_first_connection(self, _: None) -> None:
        self._first_connection = None
        self.log.info(
            "slave {slave_id} connected to the broker, announcing up", slave_id=self.slave_id
        )
        self._announce(SlaveState.UP, receipt=True)
        announcer = LoopingCall(self._announce, SlaveState.ALIVE)
        announcer.clock = self._clock
        # _announce never fails, so the loop runs until stopService stops it.
        announcer.start(self.announce_interval, now=False)
        self._announcer = announcer

    def _on_connection_wait_failed(self, failure: Failure) -> None:
        self._first_connection = None
        if isinstance(failure.value, CancelledError):
            return
        self.log.error(
            "slave {slave_id} gave up waiting for the broker connection: {error}",
            slave_id=self.slave_id,
            error=failure.getErrorMessage(),
        )

    def _announcement(self, state: SlaveState) -> Announcement:
        return Announcement(
            slave_id=self.slave_id,
            state=state,
            tasks=self.registry.names(),
            interval=self.announce_interval,
            hostname=self.hostname,
            pid=self.pid,
            tags=self.tags,
        )

    def _announce(
        self, state: SlaveState, receipt: bool = False, timeout: float | None = None
    ) -> Deferred[None]:
        """
        Send an announcement in the background. The returned Deferred fires
        when it is sent or has failed, and never fails: failures are logged
        and counted.
        """
        return Deferred.fromCoroutine(self._send_announcement(state, receipt, timeout))

    async def _send_announcement(
        self, state: SlaveState, receipt: bool, timeout: float | None
    ) -> None:
        if not self.connection.is_connected:
            self._announcement_failed(state, f"not connected ({self.connection.last_error})")
            return
        try:
            headers, body = encode(self._announcement(state))
            sending = self.connection.send(
                self.destinations.presence, body, headers, receipt=receipt
            )
            if timeout is not None:
                sending.addTimeout(timeout, self._clock)
            await sending
        except TimeoutError:
            self._announcement_failed(state, f"no receipt within {timeout} s")
        except Exception as e:
            self._announcement_failed(state, str(e) or type(e).__name__)
        else:
            self.stats["announcements_sent"] += 1

    def _announcement_failed(self, state: SlaveState, error: str) -> None:
        self.stats["announcements_failed"] += 1
        if self._announcement_warnings.should_log():
            self.log.warn(
                "slave {slave_id} could not announce {state}: {error}"
                " ({suppressed} similar warnings not logged)",
                slave_id=self.slave_id,
                state=state.value,
                error=error,
                suppressed=self._announcement_warnings.take_suppressed(),
            )

    def _on_presence_message(self, message: StompMessage) -> None:
        self._observe(message)
        try:
            decoded = decode(message.headers, message.body)
        except InvalidMessage as e:
            self._invalid_message(message, e.reason)
            return
        if isinstance(decoded, DiscoverMessage) and self._accepting:
            self.log.debug("slave {slave_id} received a discovery request", slave_id=self.slave_id)
            self._announce(SlaveState.ALIVE)

    # Cancelling

    def _on_control_message(self, message: StompMessage) -> None:
        self._observe(message)
        try:
            decoded = decode(message.headers, message.body)
        except InvalidMessage as e:
            self._invalid_message(message, e.reason)
            return
        if not isinstance(decoded, CancelMessage):
            self.stats["ignored_messages"] += 1
            return
        self._cancel(decoded)

    def _cancel(self, cancel: CancelMessage) -> None:
        """
        Remember a cancelled request, and drop it if it waits here or stop it
        if it runs here.
        """
        self.stats["cancels_received"] += 1
        request_id = cancel.request_id
        reason = cancel.reason or "no reason given"
        self._cancelled.put(request_id, reason)

        run = self._running.get(request_id)
        if run is not None and not run.finished:
            self.log.info(
                "task {request_id} ({task}) cancelled while it runs on {slave_id}: {reason}",
                request_id=request_id,
                task=run.task.task,
                slave_id=self.slave_id,
                reason=reason,
            )
            run.cancel_reason = reason
            # A thread cannot be interrupted, so a blocking handler runs to its
            # end and _call_and_reply discards its outcome.
            if run.handler_call is not None and not run.handler.blocking:
                run.handler_call.cancel()
            return

        waiting = next((r for r in self._waiting if r.task.request_id == request_id), None)
        if waiting is not None:
            self._waiting.remove(waiting)
            self.stats["tasks_cancelled"] += 1
            self._reject_task(
                waiting.task,
                ERROR_CANCELLED,
                self._cancelled_before_start(reason),
                waiting.deliveries,
            )
            return
        self.log.debug(
            "slave {slave_id} remembers the cancellation of request {request_id},"
            " which does not run here",
            slave_id=self.slave_id,
            request_id=request_id,
        )

    def _cancelled_before_start(self, reason: str) -> str:
        return f"the master cancelled the request before slave {self.slave_id} started it: {reason}"

    # Receiving tasks

    def _on_task_message(self, message: StompMessage) -> None:
        self._observe(message)
        try:
            decoded = decode(message.headers, message.body)
        except InvalidMessage as e:
            self._invalid_message(message, e.reason)
            if e.request_id is not None:
                reply_to = message.headers.get(HEADER_REPLY_TO) or self.destinations.reply
                self._reject(reply_to, e.request_id, ERROR_INVALID_TASK, e.reason)
            return
        if not isinstance(decoded, TaskMessage):
            self.stats["ignored_messages"] += 1
            self.log.debug(
                "slave {slave_id} ignored a {kind} on the tasks topic",
                slave_id=self.slave_id,
                kind=type(decoded).__name__,
            )
            return
        self._accept_broadcast(decoded)

    def _on_work_message(self, queue: WorkQueue, message: StompMessage) -> None:
        self._observe(message)
        if not self._accepting:
            # Neither run nor acknowledged: the broker takes the message back
            # when the slave unsubscribes or disconnects.
            self.stats["tasks_held_stopping"] += 1
            self.log.info(
                "slave {slave_id} is stopping and leaves task {request_id} from {destination}"
                " unacknowledged",
                slave_id=self.slave_id,
                request_id=message.headers.get("request_id"),
                destination=queue.destination,
            )
            return
        delivery = self._deliveries.take(queue, message)
        try:
            decoded = decode(message.headers, message.body)
        except InvalidMessage as e:
            self._invalid_message(message, e.reason)
            if e.request_id is None:
                Deferred.fromCoroutine(self._deliveries.drop(delivery, e.reason))
                return
            reply_to = message.headers.get(HEADER_REPLY_TO) or self.destinations.reply
            self._reject(reply_to, e.request_id, ERROR_INVALID_TASK, e.reason, [delivery])
            return
        if not isinstance(decoded, TaskMessage):
            self.stats["ignored_messages"] += 1
            reason = f"a {type(decoded).__name__} is not a task"
            Deferred.fromCoroutine(self._deliveries.drop(delivery, reason))
            return
        self._accept_queued(decoded, delivery)

    def _invalid_message(self, message: StompMessage, reason: str) -> None:
        self.stats["invalid_messages"] += 1
        if self._invalid_message_warnings.should_log():
            self.log.warn(
                "slave {slave_id} received an invalid message on {destination}: {reason}"
                " ({suppressed} similar warnings not logged)",
                slave_id=self.slave_id,
                destination=message.destination,
                reason=reason,
                message_id=message.message_id,
                suppressed=self._invalid_message_warnings.take_suppressed(),
            )

    def _log_received(self, task: TaskMessage, redelivered: bool = False) -> None:
        self.stats["tasks_received"] += 1
        if redelivered:
            self.stats["tasks_redelivered"] += 1
        self.log.info(
            "task {request_id} ({task}) received by {slave_id}",
            request_id=task.request_id,
            task=task.task,
            slave_id=self.slave_id,
            mode=task.mode.value,
            redelivered=redelivered,
        )

    def _accept_broadcast(self, task: TaskMessage) -> None:
        if not matches_selector(self.tags, task.selector):
            self.stats["tasks_not_selected"] += 1
            self.log.debug(
                "slave {slave_id} ignored task {request_id}: its selector {selector} does not"
                " match the slave's tags",
                slave_id=self.slave_id,
                request_id=task.request_id,
                selector=dict(task.selector),
            )
            return
        self._log_received(task)
        request_id = task.request_id
        if self._find_run(request_id) is not None:
            self.stats["tasks_duplicate"] += 1
            self.log.warn(
                "task {request_id} ({task}) is already running or queued on {slave_id},"
                " ignored the duplicate",
                request_id=request_id,
                task=task.task,
                slave_id=self.slave_id,
            )
            return
        if not self._accepting:
            self.stats["tasks_rejected_stopping"] += 1
            self._reject_task(task, ERROR_SLAVE_STOPPING, f"slave {self.slave_id} is stopping")
            return
        rejection = self._rejection_for(task)
        if rejection is not None:
            self._reject_task(task, *rejection)
            return
        handler = self.registry.get(task.task)
        if handler is not None:
            self._enqueue(_TaskRun(task, handler))

    def _accept_queued(self, task: TaskMessage, delivery: Delivery) -> None:
        self._log_received(task, delivery.redelivered)
        request_id = task.request_id

        finished = self._finished_replies.get(request_id)
        if finished is not None:
            self.stats["replies_resent"] += 1
            self.log.info(
                "task {request_id} ({task}) already finished on {slave_id}:"
                " sending its reply again instead of running it",
                request_id=request_id,
                task=task.task,
                slave_id=self.slave_id,
            )
            self._answer_in_background(
                task.reply_to, finished.reply, [delivery], (finished.headers, finished.body)
            )
            return

        run = self._find_run(request_id)
        if run is not None and not run.finished:
            self.stats["tasks_duplicate"] += 1
            self.log.info(
                "task {request_id} ({task}) delivered again while it waits or runs on"
                " {slave_id}: its reply will answer both deliveries",
                request_id=request_id,
                task=task.task,
                slave_id=self.slave_id,
            )
            run.deliveries.append(delivery)
            return

        if task.mode is DispatchMode.DIRECT and task.target != self.slave_id:
            self.stats["tasks_wrong_slave"] += 1
            self._reject_task(
                task,
                ERROR_WRONG_SLAVE,
                f"the task targets slave {task.target}, but slave {self.slave_id} received it",
                [delivery],
            )
            return
        if task.mode is not DispatchMode.DIRECT and not matches_selector(self.tags, task.selector):
            self.stats["tasks_wrong_slave"] += 1
            self._reject_task(
                task,
                ERROR_WRONG_SLAVE,
                f"the task selects tags {dict(task.selector)}, but slave {self.slave_id}"
                f" received it from {delivery.queue.destination} with tags {self.tags}",
                [delivery],
            )
            return
        rejection = self._rejection_for(task)
        if rejection is not None:
            self._reject_task(task, *rejection, [delivery])
            return
        handler = self.registry.get(task.task)
        if handler is not None:
            run = _TaskRun(
                task,
                handler,
                from_queue=True,
                redelivered=delivery.redelivered,
                deliveries=[delivery],
            )
            self._enqueue(run)

    def _find_run(self, request_id: str) -> _TaskRun | None:
        run = self._running.get(request_id)
        if run is not None:
            return run
        return next((r for r in self._waiting if r.task.request_id == request_id), None)

    def _rejection_for(self, task: TaskMessage) -> tuple[str, str] | None:
        """
        Return the error type and message for a task that must not run here
        (cancelled, unknown or expired), or ``None``, and count it.
        """
        reason = self._cancelled.get(task.request_id)
        if reason is not None:
            self.stats["tasks_cancelled"] += 1
            return ERROR_CANCELLED, self._cancelled_before_start(reason)
        if task.task not in self.registry:
            self.stats["tasks_unknown"] += 1
            return (
                ERROR_UNKNOWN_TASK,
                f"unknown task {task.task!r}: slave {self.slave_id} has handlers for"
                f" {', '.join(repr(n) for n in self.registry.names()) or 'no tasks'}",
            )
        expiry = self._expiry(task)
        if expiry is not None:
            self.stats["tasks_expired"] += 1
            return ERROR_EXPIRED, expiry
        return None

    def _expiry(self, task: TaskMessage) -> str | None:
        """
        Return why the task may no longer start, or ``None`` while it may.
        """
        now = self._clock.seconds()
        if task.start_by is not None and task.start_by <= now:
            return (
                f"the task's start_by time passed {now - task.start_by:.3f} s before slave"
                f" {self.slave_id} could start it"
            )
        if task.deadline is not None and task.deadline <= now:
            return (
                f"the task deadline passed {now - task.deadline:.3f} s before slave"
                f" {self.slave_id} could start it"
            )
        return None

    def _reject_if_expired(self, run: _TaskRun) -> bool:
        expiry = self._expiry(run.task)
        if expiry is None:
            return False
        self.stats["tasks_expired"] += 1
        self._reject_task(run.task, ERROR_EXPIRED, expiry, run.deliveries)
        return True

    def _reject_task(
        self,
        task: TaskMessage,
        error_type: str,
        message: str,
        deliveries: Iterable[Delivery] = (),
    ) -> None:
        """
        Send an error reply for a task that does not run. For a queue task the
        reply is also kept for redeliveries, and the deliveries are settled
        once it is sent.
        """
        self.log.warn(
            "task {request_id} ({task}) rejected by {slave_id}: {error_type}: {message}",
            request_id=task.request_id,
            task=task.task,
            slave_id=self.slave_id,
            error_type=error_type,
            message=message,
        )
        deliveries = list(deliveries)
        reply = ErrorMessage(task.request_id, self.slave_id, error_type, message)
        encoded = encode(reply)
        if deliveries:
            self._remember_finished(reply, encoded)
        self._answer_in_background(task.reply_to, reply, deliveries, encoded)

    def _reject(
        self,
        reply_to: str,
        request_id: str,
        error_type: str,
        message: str,
        deliveries: Iterable[Delivery] = (),
    ) -> None:
        reply = ErrorMessage(request_id, self.slave_id, error_type, message)
        self._answer_in_background(reply_to, reply, list(deliveries))

    def _answer_in_background(
        self,
        reply_to: str,
        reply: ResultMessage | ErrorMessage,
        deliveries: list[Delivery],
        encoded: tuple[dict[str, str], bytes] | None = None,
    ) -> None:
        """
        Send a reply for no running task and settle its deliveries, tracked until done.
        """
        sending = Deferred.fromCoroutine(self._answer(reply_to, reply, deliveries, encoded))
        self._pending_replies.add(sending)

        def sent(outcome: object) -> None:
            self._pending_replies.discard(sending)
            for delivery in deliveries:
                self._deliveries.release(delivery, "its reply was abandoned")
            if isinstance(outcome, Failure) and not isinstance(outcome.value, CancelledError):
                self.log.failure(
                    "error reply for task {request_id} from {slave_id} failed",
                    failure=outcome,
                    request_id=reply.request_id,
                    slave_id=self.slave_id,
                )
            self._notify_if_idle()

        sending.addBoth(sent)

    def _remember_finished(
        self, reply: ResultMessage | ErrorMessage, encoded: tuple[dict[str, str], bytes]
    ) -> None:
        headers, body = encoded
        self._finished_replies.put(reply.request_id, _FinishedReply(reply, headers, body))

    # Running tasks

    def _enqueue(self, run: _TaskRun) -> None:
        if len(self._running) < self.concurrency:
            self._start(run)
            return
        self.stats["tasks_queued"] += 1
        self._waiting.append(run)
        self.log.info(
            "task {request_id} ({task}) queued on {slave_id}: {running} tasks running,"
            " {waiting} waiting",
            request_id=run.task.request_id,
            task=run.task.task,
            slave_id=self.slave_id,
            running=len(self._running),
            waiting=len(self._waiting),
        )

    def _start(self, run: _TaskRun) -> None:
        self._running[run.task.request_id] = run
        lifecycle = Deferred.fromCoroutine(self._run(run))
        run.lifecycle = lifecycle
        lifecycle.addErrback(self._on_lifecycle_failed, run)
        lifecycle.addBoth(self._finished, run)

    def _on_lifecycle_failed(self, failure: Failure, run: _TaskRun) -> None:
        if isinstance(failure.value, CancelledError):
            # Only a shutdown that gave up on sending the reply cancels here.
            return
        self.log.failure(
            "task {request_id} ({task}) on {slave_id} failed outside its handler",
            failure=failure,
            request_id=run.task.request_id,
            task=run.task.task,
            slave_id=self.slave_id,
        )

    def _finished(self, _: object, run: _TaskRun) -> None:
        run.finished = True
        if run.progress_call is not None and run.progress_call.active():
            run.progress_call.cancel()
        for delivery in run.deliveries:
            self._deliveries.release(delivery, "the slave gave up on its reply")
        self._running.pop(run.task.request_id, None)
        self._start_waiting_tasks()
        self._notify_if_idle()

    def _start_waiting_tasks(self) -> None:
        # A task can finish synchronously inside _start(), which calls this
        # method again; the flag keeps that to one loop instead of recursion.
        if self._starting_waiting_tasks:
            return
        self._starting_waiting_tasks = True
        try:
            while self._accepting and len(self._running) < self.concurrency:
                run = self._take_startable()
                if run is None:
                    break
                if not self._reject_if_expired(run):
                    self._start(run)
        finally:
            self._starting_waiting_tasks = False

    def _take_startable(self) -> _TaskRun | None:
        """
        Remove and return the oldest waiting task that may start now.

        A queue task waits while the current connection generation is
        unknown, because it may have come over the previous connection.
        """
        for run in self._waiting:
            if not run.from_queue or self._deliveries.generation_known:
                self._waiting.remove(run)
                return run
        return None

    def _release_stale_waiting(self) -> None:
        """
        Let go of waiting queue tasks that came over an earlier connection:
        the broker has taken them back and delivers them again.
        """
        for run in list(self._waiting):
            if not run.from_queue:
                continue
            for delivery in run.deliveries:
                if self._deliveries.is_stale(delivery):
                    self._deliveries.release(delivery, "it arrived over an earlier connection")
            if all(delivery.settled for delivery in run.deliveries):
                self._waiting.remove(run)

    async def _run(self, run: _TaskRun) -> None:
        task = run.task
        handler = run.handler
        attempt = (self._starts.get(task.request_id) or 0) + 1
        if run.from_queue:
            # The broker must hold the accepted message before the task starts,
            # so that the master counts this attempt even if the task crashes
            # the slave.
            if not await self._send_accepted(run, attempt, receipt=True):
                self._release_run(run, "its accepted message was not sent")
                return
            if run.cancelled_by_shutdown:
                self._release_run(run, f"slave {self.slave_id} stopped before the task started")
                return
            if run.cancel_reason is not None:
                self.stats["tasks_cancelled"] += 1
                await self._finish_unstarted(run, self._cancelled_before_start(run.cancel_reason))
                return
            if all(self._deliveries.is_stale(delivery) for delivery in run.deliveries):
                self._release_run(run, "it arrived over an earlier connection")
                return
        else:
            Deferred.fromCoroutine(self._send_accepted(run, attempt, receipt=False))
        self._starts.put(task.request_id, attempt)

        self.log.info(
            "task {request_id} ({task}) started on {slave_id}",
            request_id=task.request_id,
            task=task.task,
            slave_id=self.slave_id,
            blocking=handler.blocking,
            attempt=attempt,
        )
        started = self._clock.seconds()
        reply = await self._call_and_reply(run)
        run.finished = True
        if run.from_queue and run.cancelled_by_shutdown and run.cancel_reason is None:
            self._release_run(run, f"slave {self.slave_id} stopped before the task finished")
            return
        reply, encoded = self._encode_reply(reply)

        if isinstance(reply, ResultMessage):
            self.stats["tasks_succeeded"] += 1
            outcome = "succeeded"
        else:
            outcome = f"failed with {reply.error_type}"
        self.log.info(
            "task {request_id} ({task}) {outcome} on {slave_id} after {duration:.3f} s",
            request_id=task.request_id,
            task=task.task,
            slave_id=self.slave_id,
            outcome=outcome,
            duration=self._clock.seconds() - started,
            error_type=getattr(reply, "error_type", None),
        )
        if run.from_queue:
            self._remember_finished(reply, encoded)
        await self._answer(task.reply_to, reply, run.deliveries, encoded)

    async def _send_accepted(self, run: _TaskRun, attempt: int, *, receipt: bool) -> bool:
        """
        Send the task's ``accepted`` message and return whether the broker
        accepted it; with ``receipt`` false, whether it was written.
        Failures are logged and counted.
        """
        accepted = AcceptedMessage(run.task.request_id, self.slave_id, attempt, run.redelivered)
        headers, body = encode(accepted)
        try:
            await self.connection.send(
                run.task.reply_to, body, headers, receipt=receipt, persistent=True
            )
        except Exception as e:
            self.stats["accepted_failed"] += 1
            self.log.warn(
                "accepted message for task {request_id} from {slave_id} not sent: {error}",
                request_id=run.task.request_id,
                slave_id=self.slave_id,
                error=str(e) or type(e).__name__,
            )
            return False
        self.stats["accepted_sent"] += 1
        return True

    def _release_run(self, run: _TaskRun, reason: str) -> None:
        run.finished = True
        for delivery in run.deliveries:
            self._deliveries.release(delivery, reason)

    async def _finish_unstarted(self, run: _TaskRun, message: str) -> None:
        """
        Reply to a queue task that was taken but cancelled before its handler started.
        """
        run.finished = True
        reply = ErrorMessage(run.task.request_id, self.slave_id, ERROR_CANCELLED, message)
        encoded = encode(reply)
        self._remember_finished(reply, encoded)
        await self._answer(run.task.reply_to, reply, run.deliveries, encoded)

    async def _call_and_reply(self, run: _TaskRun) -> ResultMessage | ErrorMessage:
        """
        Run the task's handler and return the reply for its outcome.
        """
        task = run.task
        reporter = ProgressReporter(
            lambda percent, text: self._on_progress(run, percent, text), self._reactor
        )
        try:
            run.handler_call = self._call_handler(run.handler, task.args, reporter)
            result = await run.handler_call
        except Exception as e:
            if run.cancel_reason is not None:
                return self._cancelled_reply(run)
            if run.cancelled_by_shutdown and isinstance(e, CancelledError):
                return self._cancelled_reply(run)
            if isinstance(e, InvalidArguments):
                self.stats["tasks_failed"] += 1
                return ErrorMessage(task.request_id, self.slave_id, "InvalidArguments", str(e))
            # A handler that raises CancelledError by itself has failed.
            return self._handler_failed(task, e)
        if run.cancel_reason is not None:
            return self._cancelled_reply(run)
        return ResultMessage(task.request_id, self.slave_id, result)

    def _cancelled_reply(self, run: _TaskRun) -> ErrorMessage:
        # A queue task stopped by the shutdown is given back, not cancelled,
        # and _run drops this reply.
        if run.cancel_reason is not None or not run.from_queue:
            self.stats["tasks_cancelled"] += 1
        if run.cancel_reason is None:
            message = (
                f"slave {self.slave_id} stopped and cancelled the task after a grace period"
                f" of {self.grace_period} s"
            )
        elif run.handler.blocking:
            message = (
                f"the master cancelled the request while its blocking handler ran on slave"
                f" {self.slave_id}; the handler ran to its end and its outcome was discarded:"
                f" {run.cancel_reason}"
            )
        else:
            message = (
                f"the master cancelled the request while it ran on slave {self.slave_id}:"
                f" {run.cancel_reason}"
            )
        return ErrorMessage(run.task.request_id, self.slave_id, ERROR_CANCELLED, message)

    def _handler_failed(self, task: TaskMessage, error: BaseException) -> ErrorMessage:
        """
        Log the exception being handled and return the error reply naming its class.
        """
        self.stats["tasks_failed"] += 1
        self.log.failure(
            "task {request_id} ({task}) failed on {slave_id}",
            request_id=task.request_id,
            task=task.task,
            slave_id=self.slave_id,
        )
        error_type = type(error).__name__
        return ErrorMessage(task.request_id, self.slave_id, error_type, str(error) or error_type)

    def _encode_reply(
        self, reply: ResultMessage | ErrorMessage
    ) -> tuple[ResultMessage | ErrorMessage, tuple[dict[str, str], bytes]]:
        """
        Encode a reply, replacing a result that is not JSON with an
        ``InvalidResult`` error.
        """
        try:
            return reply, encode(reply)
        except ValueError as e:
            self.stats["tasks_failed"] += 1
            self.log.error(
                "task {request_id} on {slave_id} returned a result that is not JSON: {error}",
                request_id=reply.request_id,
                slave_id=self.slave_id,
                error=str(e),
            )
            error = ErrorMessage(
                reply.request_id,
                self.slave_id,
                ERROR_INVALID_RESULT,
                f"the handler returned a value that cannot be sent as JSON: {e}",
            )
            return error, encode(error)

    def _call_handler(
        self, handler: Handler, args: Mapping[str, Any], progress: ProgressReporter
    ) -> Deferred[Any]:
        if handler.blocking:
            return deferToThreadPool(
                self._reactor, self._thread_pool, handler.function, dict(args), progress
            )
        try:
            outcome = handler.function(dict(args), progress)
        except Exception:
            return fail()
        if isinstance(outcome, Deferred):
            return outcome
        if inspect.isawaitable(outcome):
            return Deferred.fromCoroutine(_await(outcome))
        return succeed(outcome)

    # Progress

    def _on_progress(self, run: _TaskRun, percent: float, text: str) -> None:
        if run.finished:
            return
        run.pending_progress = (percent, text)
        if run.progress_call is not None and run.progress_call.active():
            return
        wait = run.last_progress_at + PROGRESS_MIN_INTERVAL - self._clock.seconds()
        if wait > 0:
            run.progress_call = self._clock.callLater(wait, self._send_progress, run)
        else:
            self._send_progress(run)

    def _send_progress(self, run: _TaskRun) -> None:
        if run.finished or run.pending_progress is None:
            return
        percent, text = run.pending_progress
        run.pending_progress = None
        run.last_progress_at = self._clock.seconds()
        if not self.connection.is_connected:
            self.stats["progress_dropped"] += 1
            return
        message = ProgressMessage(run.task.request_id, self.slave_id, percent, text)
        headers, body = encode(message)
        sending = self.connection.send(run.task.reply_to, body, headers, persistent=True)

        def sent(_: None) -> None:
            self.stats["progress_sent"] += 1

        def failed(failure: Failure) -> None:
            self.stats["progress_dropped"] += 1
            self.log.debug(
                "progress of task {request_id} not sent by {slave_id}: {error}",
                request_id=run.task.request_id,
                slave_id=self.slave_id,
                error=failure.getErrorMessage(),
            )

        sending.addCallbacks(sent, failed)


    # Replies

    async def _answer(
        self,
        reply_to: str,
        reply: ResultMessage | ErrorMessage,
        deliveries: list[Delivery],
        encoded: tuple[dict[str, str], bytes] | None = None,
    ) -> None:
        """
        Send a final reply, then settle the queue deliveries that it replies to:
        acknowledge them once the broker has accepted the reply, or else
        leave them to the broker to deliver again.
        """
        sent = await self._send_reply(reply_to, reply, encoded)
        for delivery in list(deliveries):
            if sent:
                await self._deliveries.acknowledge(delivery)
            else:
                self._deliveries.release(delivery, "its reply was not sent")

    async def _send_reply(
        self,
        destination: str,
        reply: ResultMessage | ErrorMessage,
        encoded: tuple[dict[str, str], bytes] | None = None,
    ) -> bool:
        """
        Send a persistent result or error with a receipt, and return whether
        the broker accepted it. A failure is logged and counted.

        ``encoded`` is the reply's headers and body when the caller has
        already encoded it.

        When the send fails because the connection is down, the reply waits
        for it to come back, up to ``REPLY_ATTEMPTS`` sends in all. A reply
        whose receipt was lost with the connection is sent again, so the
        master may receive it twice. A reply that the broker rejects on a
        live connection is not sent again.
        """
        headers, body = encoded if encoded is not None else encode(reply)
        for attempt in range(1, REPLY_ATTEMPTS + 1):
            try:
                await self.connection.send(
                    destination, body, headers, receipt=True, persistent=True
                )
            except StompError as e:
                if self.connection.is_connected or attempt == REPLY_ATTEMPTS:
                    self._reply_failed(reply, destination, str(e))
                    return False
                self.log.warn(
                    "reply to task {request_id} from {slave_id} not sent ({error}),"
                    " sending again once the broker connection is back",
                    request_id=reply.request_id,
                    slave_id=self.slave_id,
                    error=str(e),
                    attempt=attempt,
                )
                await self.connection.when_connected()
            else:
                self.stats["replies_sent"] += 1
                return True
        return False

    def _reply_failed(self, reply: Message, destination: str, error: str) -> None:
        self.stats["replies_failed"] += 1
        self.log.error(
            "reply to task {request_id} from {slave_id} to {destination} failed: {error}",
            request_id=getattr(reply, "request_id", None),
            slave_id=self.slave_id,
            destination=destination,
            error=error,
        )

    # Stopping

    def _is_idle(self) -> bool:
        return not self._running and not self._waiting and not self._pending_replies

    def _when_idle(self) -> Deferred[None]:
        if self._is_idle():
            return succeed(None)

        def cancel(waiter: Deferred[None]) -> None:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)

        waiter: Deferred[None] = Deferred(cancel)
        self._idle_waiters.append(waiter)
        return waiter

    def _notify_if_idle(self) -> None:
        if not self._is_idle():
            return
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _wait_until_idle(self, timeout: float) -> bool:
        """
        Wait up to ``timeout`` seconds for running tasks and replies, and
        return whether they all finished.
        """
        try:
            await self._when_idle().addTimeout(timeout, self._clock)
        except TimeoutError:
            return False
        return True

    async def _stop(self) -> None:
        self._accepting = False
        self.log.info(
            "slave {slave_id} stopping: waiting up to {grace_period} s for {running} running tasks",
            slave_id=self.slave_id,
            grace_period=self.grace_period,
            running=len(self._running),
        )
        if self._first_connection is not None:
            self._first_connection.cancel()
        if self._announcer is not None and self._announcer.running:
            self._announcer.stop()
        await self._unsubscribe(self._task_subscription)
        self._deliveries.drain()

        while self._waiting:
            run = self._waiting.popleft()
            if run.from_queue:
                self._release_run(run, f"slave {self.slave_id} is stopping and did not start it")
                continue
            self.stats["tasks_rejected_stopping"] += 1
            self._reject_task(
                run.task,
                ERROR_SLAVE_STOPPING,
                f"slave {self.slave_id} is stopping and did not start the task",
            )

        if not await self._wait_until_idle(self.grace_period):
            self.log.warn(
                "slave {slave_id} cancels tasks {request_ids} still running after"
                " the grace period of {grace_period} s",
                slave_id=self.slave_id,
                request_ids=", ".join(self._running),
                grace_period=self.grace_period,
            )
            for run in list(self._running.values()):
                if run.finished:
                    continue
                run.cancelled_by_shutdown = True
                if run.handler_call is not None:
                    run.handler_call.cancel()
            if not await self._wait_until_idle(SHUTDOWN_SEND_TIMEOUT):
                self._abandon_replies()

        await self._deliveries.unsubscribe_all()
        await self._unsubscribe(self._control_subscription)
        await self._unsubscribe(self._presence_subscription)
        await self._send_down()
        # NOTE: ThreadPool.stop() joins the pool's threads, so a blocking
        # handler that ignores its cancellation keeps the reactor waiting here.
        self._thread_pool.stop()
        self.log.info("slave {slave_id} stopped", slave_id=self.slave_id, stats=dict(self.stats))

    def _abandon_replies(self) -> None:
        self.log.error(
            "slave {slave_id} gave up sending replies for tasks {request_ids}",
            slave_id=self.slave_id,
            request_ids=", ".join(self._running),
        )
        for run in list(self._running.values()):
            if run.lifecycle is not None:
                run.lifecycle.cancel()
        for sending in list(self._pending_replies):
            sending.cancel()

    async def _unsubscribe(self, subscription: Subscription | None) -> None:
        if subscription is None:
            return
        try:
            await subscription.unsubscribe().addTimeout(SHUTDOWN_SEND_TIMEOUT, self._clock)
        except Exception as e:
            self.log.warn(
                "slave {slave_id} could not unsubscribe from {destination}: {error}",
                slave_id=self.slave_id,
                destination=subscription.destination,
                error=str(e) or type(e).__name__,
            )

    async def _send_down(self) -> None:
        await self._announce(SlaveState.DOWN, receipt=True, timeout=SHUTDOWN_SEND_TIMEOUT)


async def _await(awaitable: Any) -> Any:
    return await awaitable

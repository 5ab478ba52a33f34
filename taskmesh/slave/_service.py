"""
The slave daemon's service: receives tasks, runs their handlers and replies.
"""

from __future__ import annotations

import inspect
import math
import os
import socket
from collections import deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

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
    validate_slave_id,
)
from taskmesh.stomp._errors import BrokerError, ConnectionClosed, NotConnected
from taskmesh.stomp._interfaces import StompConnection, StompMessage, Subscription

from ._handlers import Handler, HandlerRegistry, InvalidArguments, ProgressReporter

# Error types that the slave itself sends, besides InvalidArguments and the
# class names of exceptions raised by handlers.
ERROR_INVALID_TASK = "InvalidTask"
ERROR_UNKNOWN_TASK = "UnknownTask"
ERROR_EXPIRED = "Expired"
ERROR_INVALID_RESULT = "InvalidResult"
ERROR_SLAVE_STOPPING = "SlaveStopping"
ERROR_CANCELLED = "Cancelled"

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

STATS_KEYS = (
    "tasks_received",
    "tasks_queued",
    "tasks_succeeded",
    "tasks_failed",
    "tasks_unknown",
    "tasks_expired",
    "tasks_duplicate",
    "tasks_rejected_stopping",
    "tasks_cancelled",
    "invalid_messages",
    "ignored_messages",
    "replies_sent",
    "replies_failed",
    "progress_sent",
    "progress_dropped",
    "announcements_sent",
    "announcements_failed",
)


@dataclass
class _TaskRun:
    """
    A task accepted by this slave, from queued to replied.
    """

    task: TaskMessage
    handler: Handler
    handler_call: Deferred[Any] | None = None
    cancelled_by_shutdown: bool = False
    lifecycle: Deferred[None] | None = None
    finished: bool = False
    last_progress_at: float = -math.inf
    pending_progress: tuple[float, str] | None = None
    progress_call: IDelayedCall | None = None


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
    Runs tasks broadcast by the master and sends their progress and results.

    On start the service subscribes to the tasks and presence topics and,
    once the connection is up, announces ``up`` and then ``alive`` every
    ``announce_interval`` seconds and whenever a master sends a discovery
    request. At most ``concurrency`` tasks run at once. Later tasks wait in
    memory, in arrival order. Blocking handlers run in a thread pool of
    ``concurrency`` threads, which the service starts and stops.

    ``stopService`` stops taking tasks, replies ``SlaveStopping`` to waiting
    tasks, and waits up to ``grace_period`` seconds for running ones. Tasks
    still running after that are cancelled, and their error reply has the
    error_type ``Cancelled``. Then the service announces ``down``. The
    returned Deferred fires when all of that is done.

    Args:
        connection: the broker connection. Its subscriptions must survive
            reconnects.
        clock: the time source for announcements, deadlines, the grace
            period and progress rate limits.
        reactor: delivers thread pool results and progress reports from
            handler threads to the reactor thread.
        thread_pool: the pool for blocking handlers. By default the service
            creates one with ``concurrency`` threads.
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
        # Replies that belong to no running task (rejections), still being sent.
        self._pending_replies: set[Deferred[None]] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._starting_waiting_tasks = False
        self._accepting = False
        self._task_subscription: Subscription | None = None
        self._presence_subscription: Subscription | None = None
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
        self._task_subscription = self.connection.subscribe(
            self.destinations.tasks, self._on_task_message
        )
        self._presence_subscription = self.connection.subscribe(
            self.destinations.presence, self._on_presence_message
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
        try:
            decoded = decode(message.headers, message.body)
        except InvalidMessage as e:
            self._invalid_message(message, e.reason)
            return
        if isinstance(decoded, DiscoverMessage) and self._accepting:
            self.log.debug("slave {slave_id} received a discovery request", slave_id=self.slave_id)
            self._announce(SlaveState.ALIVE)

    # Receiving tasks

    def _on_task_message(self, message: StompMessage) -> None:
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
        self._accept_task(decoded)

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

    def _accept_task(self, task: TaskMessage) -> None:
        self.stats["tasks_received"] += 1
        request_id = task.request_id
        self.log.info(
            "task {request_id} ({task}) received by {slave_id}",
            request_id=request_id,
            task=task.task,
            slave_id=self.slave_id,
        )
        waiting_ids = {r.task.request_id for r in self._waiting}
        if request_id in self._running or request_id in waiting_ids:
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
        handler = self.registry.get(task.task)
        if handler is None:
            self.stats["tasks_unknown"] += 1
            self._reject_task(
                task,
                ERROR_UNKNOWN_TASK,
                f"unknown task {task.task!r}: slave {self.slave_id} has handlers for"
                f" {', '.join(repr(n) for n in self.registry.names()) or 'no tasks'}",
            )
            return
        if self._reject_if_expired(task):
            return

        run = _TaskRun(task, handler)
        if len(self._running) >= self.concurrency:
            self.stats["tasks_queued"] += 1
            self._waiting.append(run)
            self.log.info(
                "task {request_id} ({task}) queued on {slave_id}: {running} tasks running,"
                " {waiting} waiting",
                request_id=request_id,
                task=task.task,
                slave_id=self.slave_id,
                running=len(self._running),
                waiting=len(self._waiting),
            )
            return
        self._start(run)

    def _reject_if_expired(self, task: TaskMessage) -> bool:
        now = self._clock.seconds()
        if task.deadline is None or task.deadline > now:
            return False
        self.stats["tasks_expired"] += 1
        self._reject_task(
            task,
            ERROR_EXPIRED,
            f"the task deadline passed {now - task.deadline:.3f} s before slave"
            f" {self.slave_id} could start it",
        )
        return True

    def _reject_task(self, task: TaskMessage, error_type: str, message: str) -> None:
        self.log.warn(
            "task {request_id} ({task}) rejected by {slave_id}: {error_type}: {message}",
            request_id=task.request_id,
            task=task.task,
            slave_id=self.slave_id,
            error_type=error_type,
            message=message,
        )
        self._reject(task.reply_to, task.request_id, error_type, message)

    def _reject(self, reply_to: str, request_id: str, error_type: str, message: str) -> None:
        """
        Send an error reply for a task that does not run, tracked until sent.
        """
        reply = ErrorMessage(request_id, self.slave_id, error_type, message)
        sending = Deferred.fromCoroutine(self._send_reply(reply_to, reply))
        self._pending_replies.add(sending)

        def sent(outcome: object) -> None:
            self._pending_replies.discard(sending)
            if isinstance(outcome, Failure) and not isinstance(outcome.value, CancelledError):
                self.log.failure(
                    "error reply for task {request_id} from {slave_id} failed",
                    failure=outcome,
                    request_id=request_id,
                    slave_id=self.slave_id,
                )
            self._notify_if_idle()

        sending.addBoth(sent)

    # Running tasks

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
            while self._accepting and self._waiting and len(self._running) < self.concurrency:
                run = self._waiting.popleft()
                if not self._reject_if_expired(run.task):
                    self._start(run)
        finally:
            self._starting_waiting_tasks = False

    async def _run(self, run: _TaskRun) -> None:
        task = run.task
        handler = run.handler
        self.log.info(
            "task {request_id} ({task}) started on {slave_id}",
            request_id=task.request_id,
            task=task.task,
            slave_id=self.slave_id,
            blocking=handler.blocking,
        )
        started = self._clock.seconds()
        reply = await self._call_and_reply(run)
        run.finished = True
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
        await self._send_reply(task.reply_to, reply, encoded)

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
        except InvalidArguments as e:
            self.stats["tasks_failed"] += 1
            return ErrorMessage(task.request_id, self.slave_id, "InvalidArguments", str(e))
        except CancelledError as e:
            if not run.cancelled_by_shutdown:
                return self._handler_failed(task, e)
            self.stats["tasks_cancelled"] += 1
            return ErrorMessage(
                task.request_id,
                self.slave_id,
                ERROR_CANCELLED,
                f"slave {self.slave_id} stopped and cancelled the task after a grace period"
                f" of {self.grace_period} s",
            )
        except Exception as e:
            return self._handler_failed(task, e)
        return ResultMessage(task.request_id, self.slave_id, result)

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
        sending = self.connection.send(run.task.reply_to, body, headers)

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

    async def _send_reply(
        self,
        destination: str,
        reply: ResultMessage | ErrorMessage,
        encoded: tuple[dict[str, str], bytes] | None = None,
    ) -> None:
        """
        Send a result or error with a receipt, and log and count a failure.

        ``encoded`` is the reply's headers and body when the caller has
        already encoded it.

        While the connection is down, the reply waits for it to come back, up
        to ``REPLY_ATTEMPTS`` sends in all. A reply whose receipt was lost
        with the connection is sent again, so the master may receive it
        twice.
        """
        headers, body = encode(reply)
        for attempt in range(1, REPLY_ATTEMPTS + 1):
            try:
                await self.connection.send(destination, body, headers, receipt=True)
            except (NotConnected, ConnectionClosed) as e:
                if attempt == REPLY_ATTEMPTS:
                    self._reply_failed(reply, destination, str(e))
                    return
                self.log.warn(
                    "reply to task {request_id} from {slave_id} not sent ({error}),"
                    " sending again once the broker connection is back",
                    request_id=reply.request_id,
                    slave_id=self.slave_id,
                    error=str(e),
                    attempt=attempt,
                )
                await self.connection.when_connected()
            except BrokerError as e:
                self._reply_failed(reply, destination, str(e))
                return
            else:
                self.stats["replies_sent"] += 1
                return

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

        while self._waiting:
            run = self._waiting.popleft()
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
                if run.handler_call is not None:
                    run.cancelled_by_shutdown = True
                    run.handler_call.cancel()
            if not await self._wait_until_idle(SHUTDOWN_SEND_TIMEOUT):
                self._abandon_replies()

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

"""
The master daemon's core: dispatch tasks to slaves and collect their replies.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskmesh import __version__
from taskmesh._messages import (
    DEFAULT_MAX_ATTEMPTS,
    HEADER_SLAVE_ID,
    AcceptedMessage,
    Announcement,
    CancelMessage,
    Destinations,
    DiscoverMessage,
    DispatchMode,
    ErrorMessage,
    InvalidMessage,
    ProgressMessage,
    ResultMessage,
    TaskMessage,
    decode,
    encode,
    new_request_id,
    validate_task_name,
)
from taskmesh.stomp import (
    NotConnected,
    StompConnection,
    StompError,
    StompMessage,
    Subscription,
)
from taskmesh.stomp._interfaces import ACK_CLIENT_INDIVIDUAL

from ._endings import ending_after_reply, ending_at_deadline, ending_at_start_by
from taskmesh._log_limiter import LogRateLimiter
from ._options import DispatchDefaults, check_dispatch_options, check_max_attempts, check_seconds
from ._presence import SlaveRegistry
from ._records import (
    AcceptedAttempt,
    PendingRequest,
    RequestRecord,
    SlaveInfo,
    SlaveProgress,
    TaskOutcome,
    copy_json_value,
)
from ._states import TaskEvent, TaskState, find_transition
from ._store import MEMORY_DATABASE, RequestStore, StoreError

__all__ = [
    "MasterService",
    "RequestAlreadyEnded",
    "RequestNotFound",
    "RequestRecord",
    "SlaveInfo",
    "SlaveProgress",
    "StoreError",
    "TaskOutcome",
    "TaskState",
]

DEFAULT_MAX_FINISHED = 10_000

# The number of requests that recent_requests returns when no limit is given.
DEFAULT_RECENT_LIMIT = 100

# Seconds between checks for expired slaves.
HOUSEKEEPING_INTERVAL = 1.0


class RequestNotFound(LookupError):
    """
    No pending or kept finished request has the given id.
    """


class RequestAlreadyEnded(ValueError):
    """
    The request has already ended, in the state that ``record`` shows.
    """

    def __init__(self, record: RequestRecord) -> None:
        super().__init__(
            f"request {record.request_id} already ended as {record.state.value}: {record.reason}"
        )
        self.record = record


class MasterService(Service):
    """
    Dispatch tasks to the slaves of a namespace and collect their replies.

    The service subscribes to the namespace's reply queue and presence topic
    while it runs. After each connect it sends a discover request, to which
    slaves reply with an announcement. Requests are kept in a SQLite
    database, so a master restarted on the same file resumes the pending
    ones.
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
        database: str = MEMORY_DATABASE,
        default_max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        default_ttl: float | None = None,
    ) -> None:
        """
        Args:
            connection: the broker connection; the caller starts and stops it.
            namespace: the destination namespace shared with the slaves.
            clock: the source of time and timers, normally the reactor.
            default_timeout: seconds that ``dispatch`` waits for replies when
                the caller gives no timeout.
            max_finished: how many finished requests the database keeps.
            database: the SQLite file for requests, or ``:memory:`` for
                requests that end with the process.
            default_max_attempts: starts of a queue or direct task before the
                master fails it as a poison message, when the caller gives no
                ``max_attempts``.
            default_ttl: seconds that a task may wait before a slave starts
                it, when the caller gives no ``ttl``; never longer than the
                request's timeout. ``None`` makes it equal to the timeout.

        Raises:
            ValueError: the namespace, a default or ``max_finished`` is invalid.
        """
        self._connection = connection
        self._destinations = Destinations(namespace)
        self._clock = clock
        self._defaults = DispatchDefaults(
            timeout=check_seconds(default_timeout, "default_timeout"),
            ttl=None if default_ttl is None else check_seconds(default_ttl, "default_ttl"),
            max_attempts=check_max_attempts(default_max_attempts, "default_max_attempts"),
        )
        self._max_finished = max_finished
        self._store = RequestStore(database, max_finished=max_finished)

        self._pending: dict[str, PendingRequest] = {}
        self._stats: dict[str, int] = dict.fromkeys(
            [
                "dispatched",
                *(state.value for state in TaskState if state is not TaskState.PENDING),
                "reloaded",
                "send_failures",
                "progress",
                "results",
                "errors",
                "accepted",
                "duplicate_accepted",
                "accepted_after_end",
                "poison_messages",
                "cancels_sent",
                "cancel_send_failures",
                "unexpected_replies",
                "duplicate_replies",
                "late_replies",
                "unknown_replies",
                "invalid_messages",
                "ack_failures",
                "store_failures",
                "announcements",
                "slaves_expired",
                "discovers_sent",
                "handler_failures",
            ],
            0,
        )
        self._slaves = SlaveRegistry(clock, self._stats)
        self._log_limiter = LogRateLimiter(self.log, clock)
        self._subscriptions: list[Subscription] = []
        self._housekeeping: LoopingCall | None = None
        self._listening_for_sessions = False
        self._cancel_sends: set[Deferred[None]] = set()

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
        return self._defaults.timeout

    @property
    def default_max_attempts(self) -> int:
        """
        Starts of a queue or direct task before it fails as a poison message,
        when ``dispatch`` gets no ``max_attempts``.
        """
        return self._defaults.max_attempts

    @property
    def database(self) -> str:
        """
        The SQLite file that keeps requests, or ``:memory:``.
        """
        return self._store.path

    @property
    def pending_count(self) -> int:
        """
        The number of pending requests.
        """
        return len(self._pending)

    @property
    def stats(self) -> dict[str, int]:
        """
        A copy of the event counters: requests by final state and messages.
        """
        return dict(self._stats)

    # -- Lifecycle -----------------------------------------------------------

    def startService(self) -> None:
        """
        Open the database, reload its pending requests, subscribe, then
        resume the reloaded requests.

        Replies that the broker delivers while the subscriptions are made
        count before the time limits are checked. A reloaded request whose
        deadline passed while the master was stopped ends at once, so a reply
        to it that the broker delivers later is a late reply.

        Raises:
            StoreError: the database cannot be opened; the service stays
                stopped.
        """
        self.log.info(
            "taskmesh master {version} starting in namespace {namespace} with database {database}",
            version=__version__,
            namespace=self._destinations.namespace,
            database=self._store.path,
        )
        try:
            self._store.open()
            reloaded = self._store.load_pending()
        except StoreError as e:
            self._store.close()
            self.log.error("taskmesh master startup failed: {error}", error=e)
            raise
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated

        for request in reloaded:
            self._pending[request.request_id] = request
        self._stats["reloaded"] += len(reloaded)
        if reloaded:
            self.log.info(
                "resuming {count} pending requests from {database}",
                count=len(reloaded),
                database=self._store.path,
            )

        if not self._listening_for_sessions:
            self._connection.add_session_listener(self._on_session_established)
            self._listening_for_sessions = True
        self._subscriptions = [
            self._connection.subscribe(
                self._destinations.reply, self._on_reply_message, ack=ACK_CLIENT_INDIVIDUAL
            ),
            self._connection.subscribe(self._destinations.presence, self._on_presence_message),
        ]

        self._housekeeping = LoopingCall(self._run_housekeeping)
        self._housekeeping.clock = self._clock
        self._housekeeping.start(HOUSEKEEPING_INTERVAL, now=False).addErrback(
            self._log_housekeeping_failure
        )
        if self._connection.is_connected:
            self._on_session_established()

        for request in reloaded:
            self._resume(request)

    def stopService(self) -> Deferred[None]:
        """
        Stop timers, release pending requests, unsubscribe and close the database.

        With a database file, pending requests stay pending in it for the
        next start, and each waiting ``dispatch`` Deferred fires with a
        ``PENDING`` outcome. With ``:memory:`` they end as cancelled, and the
        slaves get a cancel message. The returned Deferred fires once the
        cancel messages are written and both subscriptions are cancelled.
        An unsubscribe that fails is logged, not raised.
        """
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self.log.info("taskmesh master stopping")
        if self._housekeeping is not None and self._housekeeping.running:
            self._housekeeping.stop()
        self._housekeeping = None

        for request in list(self._pending.values()):
            if self._store.is_durable:
                self._release(request)
            else:
                self._finish(request, TaskEvent.MASTER_STOPPED, "the master is stopping")
        self._pending.clear()

        subscriptions, self._subscriptions = self._subscriptions, []
        return Deferred.fromCoroutine(self._stop(subscriptions))

    async def _stop(self, subscriptions: list[Subscription]) -> None:
        for sent in list(self._cancel_sends):
            # Each send has an errback that logs its failure.
            await sent
        for subscription in subscriptions:
            try:
                await maybeDeferred(subscription.unsubscribe)
            except StompError as e:
                self.log.warn(
                    "could not unsubscribe from {destination}: {error}",
                    destination=subscription.destination,
                    error=e,
                )
        self._store.close()
        self.log.info("taskmesh master stopped")

    def _release(self, request: PendingRequest) -> None:
        """
        Leave ``request`` pending in the database and fire its Deferred
        with a ``PENDING`` outcome.
        """
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        if request.deferred is not None:
            reason = (
                "the master stopped before the request ended. It stays pending in"
                f" {self._store.path}, and the next start of the master resumes it"
            )
            outcome = request.snapshot().to_outcome()
            request.deferred.callback(replace(outcome, state=TaskState.PENDING, reason=reason))

    def _log_housekeeping_failure(self, failure: Failure) -> None:
        self.log.failure("slave expiry checks stopped after an unexpected error", failure)

    def _run_housekeeping(self) -> None:
        self._slaves.expire()
        self._log_limiter.flush()

    # -- Presence ------------------------------------------------------------

    def _on_session_established(self) -> None:
        """
        Send a discover request for a new broker session, so that slaves
        that started before it announce themselves at once.
        """
        if not self.running:
            return
        sending = Deferred.fromCoroutine(self._send_discover())
        sending.addErrback(self._log_discover_failure)

    async def _send_discover(self) -> None:
        headers, body = encode(DiscoverMessage())
        try:
            await self._connection.send(self._destinations.presence, body, headers, persistent=True)
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

    def _log_discover_failure(self, failure: Failure) -> None:
        self.log.failure(
            "sending a discover request failed unexpectedly; slaves are still learned"
            " from their periodic announcements",
            failure,
        )

    def _on_presence_message(self, message: StompMessage) -> None:
        try:
            decoded = decode(message.headers, message.body)
            if isinstance(decoded, Announcement):
                self._slaves.on_announcement(decoded)
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

    def live_slaves(self) -> list[SlaveInfo]:
        """
        Return the live slaves sorted by slave id.
        """
        return self._slaves.live()

    # -- Dispatch ------------------------------------------------------------

    def dispatch(
        self,
        task: str,
        args: Mapping[str, Any],
        *,
        mode: DispatchMode | str = DispatchMode.BROADCAST,
        selector: Mapping[str, str] | None = None,
        target: str | None = None,
        timeout: float | None = None,
        ttl: float | None = None,
        max_attempts: int | None = None,
        on_progress: Callable[[ProgressMessage], None] | None = None,
        request_id: str | None = None,
    ) -> Deferred[TaskOutcome]:
        """
        Send a task to slaves and collect the replies.

        ``broadcast`` sends the task to every slave on the tasks topic. The
        request ends when every live slave whose tags match ``selector`` has
        sent a result or an error, or at the deadline. Without such slaves it
        collects replies until the deadline. ``queue`` puts the task on the
        shared work queue, or the queue of a single-tag ``selector``, and
        ``direct`` on the queue of the slave ``target``. Both end at the first
        result or error from any slave.

        Every task is sent persistent, with the time-to-live ``ttl`` as its
        broker expiry and ``start_by`` (now plus ``ttl``) in its body, after
        which no slave may start it.

        Args:
            task: the task name.
            args: the task's arguments, encodable as a JSON object.
            mode: ``broadcast``, ``queue`` or ``direct``.
            selector: tags that a slave must have, as ``{"role": "db"}``;
                at most one for ``queue`` and none for ``direct``.
            target: the slave id of a ``direct`` task; only for ``direct``.
            timeout: seconds to wait for replies; ``default_timeout`` if None.
            ttl: seconds that the task may wait before a slave starts it; the
                master's default time-to-live, capped at ``timeout``, if None.
            max_attempts: starts of a queue or direct task without a reply
                that the master accepts; the next one fails the request as a
                poison message. ``default_max_attempts`` if None.
            on_progress: called with each progress message of this request.
            request_id: a UUID to use instead of a new random one.

        Returns:
            A Deferred that fires once with a :class:`TaskOutcome`, also when
            the send fails (``FAILED``), the Deferred is cancelled
            (``CANCELLED``) or the master stops first (``PENDING`` with a
            database file, ``CANCELLED`` with ``:memory:``).

        Raises:
            ValueError: the task name, args, mode, selector, target, timeout,
                ttl, max_attempts or request id is invalid.
            RuntimeError: the service is not running.
            StoreError: the request cannot be written to the database.
        """
        if not self.running:
            raise RuntimeError("the master service is not running; start it before dispatching")
        validate_task_name(task)
        options = check_dispatch_options(
            self._destinations,
            self._defaults,
            mode=mode,
            selector=selector,
            target=target,
            timeout=timeout,
            ttl=ttl,
            max_attempts=max_attempts,
        )
        if not isinstance(args, Mapping):
            raise ValueError(f"args must be a mapping, not {type(args).__name__}")
        args = copy_json_value(args, "args")
        request_id = self._check_new_request_id(request_id)

        now = self._clock.seconds()
        if options.mode is DispatchMode.BROADCAST:
            expected = self._slaves.matching(options.selector)
        elif options.target is not None:
            expected = frozenset([options.target])
        else:
            expected = frozenset()
        message = TaskMessage(
            request_id=request_id,
            task=task,
            args=args,
            reply_to=self._destinations.reply,
            deadline=now + options.timeout,
            mode=options.mode,
            selector=options.selector,
            target=options.target,
            start_by=now + options.ttl,
            max_attempts=options.max_attempts,
        )
        headers, body = encode(message)

        request = PendingRequest(
            request_id=request_id,
            task=task,
            args=message.args,
            mode=options.mode,
            selector=options.selector,
            target=options.target,
            expected=expected,
            max_attempts=options.max_attempts,
            timeout=options.timeout,
            ttl=options.ttl,
            created_at=now,
            start_by=now + options.ttl,
            deadline=now + options.timeout,
            on_progress=on_progress,
        )
        # The request is stored before the task is sent, so every reply
        # finds it, also after a restart.
        try:
            self._store.add_request(request)
        except StoreError as e:
            self._on_store_failure(e, request_id)
            raise
        deferred: Deferred[TaskOutcome] = Deferred(
            lambda _: self._finish(request, TaskEvent.CANCEL_REQUESTED, "cancelled by the caller")
        )
        request.deferred = deferred
        self._pending[request_id] = request
        self._arm_timer(request)
        self._stats["dispatched"] += 1
        self.log.info(
            "dispatching task {task} as request {request_id} in {mode} mode to {destination};"
            " {count} expected slaves: {expected}",
            task=task,
            request_id=request_id,
            mode=options.mode.value,
            destination=options.destination,
            count=len(expected),
            expected=", ".join(sorted(expected)) or "(none)",
        )

        sent = maybeDeferred(
            self._connection.send,
            options.destination,
            body,
            headers,
            receipt=True,
            persistent=True,
            ttl=options.ttl,
        )
        sent.addErrback(self._on_send_failure, request, options.destination)
        return deferred

    def _check_new_request_id(self, request_id: str | None) -> str:
        if request_id is None:
            return new_request_id()
        try:
            uuid.UUID(request_id)
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"invalid request id {request_id!r}: expected a UUID") from None
        if request_id in self._pending or self._store.contains(request_id):
            raise ValueError(f"request id {request_id} is already in use")
        return request_id

    def _on_send_failure(self, failure: Failure, request: PendingRequest, destination: str) -> None:
        self._stats["send_failures"] += 1
        if isinstance(failure.value, StompError):
            self.log.error(
                "could not send request {request_id} to {destination}: {error}",
                request_id=request.request_id,
                destination=destination,
                error=failure.value,
            )
        else:
            self.log.failure(
                "unexpected error sending request {request_id} to {destination}",
                failure,
                request_id=request.request_id,
                destination=destination,
            )
        self._finish(
            request,
            TaskEvent.SEND_FAILED,
            f"could not send the task to {destination}: {failure.value}",
        )

    # -- Replies -------------------------------------------------------------

    def _on_reply_message(self, message: StompMessage) -> None:
        """
        Handle one message from the reply queue and acknowledge it once
        everything it changed is in the database.

        A message that could not be stored is not acknowledged, so the broker
        delivers it again after the next reconnect or master start.
        """
        if not self.running:
            # Unacknowledged, the message goes back to the queue when the
            # subscription ends.
            return
        try:
            decoded = decode(message.headers, message.body)
            if isinstance(decoded, ProgressMessage):
                self._on_progress(decoded)
            elif isinstance(decoded, (ResultMessage, ErrorMessage)):
                self._on_final_reply(decoded)
            elif isinstance(decoded, AcceptedMessage):
                self._on_accepted(decoded)
            else:
                self._on_invalid_message(
                    message,
                    InvalidMessage(f"unexpected {type(decoded).__name__} on the reply queue"),
                )
        except InvalidMessage as e:
            self._on_invalid_message(message, e)
        except StoreError as e:
            self._on_store_failure(e, message.headers.get("request_id"))
            return
        except Exception:
            # The broker client must not see handler errors, so log them here.
            self._stats["handler_failures"] += 1
            self.log.failure(
                "unexpected error handling a message from {destination}",
                destination=message.destination,
            )
        acknowledged = maybeDeferred(self._connection.ack, message)
        acknowledged.addErrback(self._acknowledge_after_session, message)
        acknowledged.addErrback(self._on_ack_failure, message)

    def _acknowledge_after_session(
        self, failure: Failure, message: StompMessage
    ) -> Deferred[None] | Failure:
        """
        Retry an acknowledgement that failed because the session was not
        established yet.

        A broker may deliver queued messages as soon as a subscription is
        restored, before the connection reports the session as established
        (RabbitMQ 3.10 does), and the client then rejects the ACK.
        """
        if not isinstance(failure.value, NotConnected) or self._connection.is_connected:
            return failure
        retried: Deferred[None] = self._connection.when_connected()
        retried.addCallback(lambda _: self._connection.ack(message))
        return retried

    def _on_ack_failure(self, failure: Failure, message: StompMessage) -> None:
        # The broker delivers the message again, and the master drops the
        # copy as a duplicate.
        self._stats["ack_failures"] += 1
        if self._log_limiter.should_log("failed acknowledgements"):
            self.log.warn(
                "could not acknowledge message {message_id} from {destination}: {error};"
                " the broker will deliver it again",
                message_id=message.message_id,
                destination=message.destination,
                error=failure.value,
            )

    def _on_progress(self, progress: ProgressMessage) -> None:
        request = self._pending.get(progress.request_id)
        if request is None:
            self._on_unmatched_reply(progress)
            return
        if request.has_replied(progress.slave_id):
            # A report that arrives after the slave's own result changes nothing.
            return

        report = SlaveProgress(progress.percent, progress.message, self._clock.seconds())
        self._store.set_progress(request.request_id, progress.slave_id, report)
        self._stats["progress"] += 1
        request.progress[progress.slave_id] = report
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
            self._on_duplicate_reply(reply)
            return

        now = self._clock.seconds()
        if isinstance(reply, ResultMessage):
            self._store.add_result(request.request_id, slave_id, reply.result, now)
            self._stats["results"] += 1
            request.results[slave_id] = reply.result
            self.log.info(
                "slave {slave_id} returned a result for request {request_id}",
                slave_id=slave_id,
                request_id=request.request_id,
            )
        else:
            self._store.add_error(
                request.request_id, slave_id, reply.error_type, reply.message, now
            )
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
        if request.mode is DispatchMode.BROADCAST and slave_id not in request.expected:
            self._stats["unexpected_replies"] += 1

        ending = ending_after_reply(request)
        if ending is not None:
            self._finish(request, *ending)

    def _on_accepted(self, accepted: AcceptedMessage) -> None:
        request = self._pending.get(accepted.request_id)
        if request is None:
            self._on_accepted_without_pending_request(accepted)
            return
        if request.has_attempt(accepted.slave_id, accepted.attempt):
            self._stats["duplicate_accepted"] += 1
            if self._log_limiter.should_log("duplicate accepted messages"):
                self.log.warn(
                    "dropped a duplicate accepted message from slave {slave_id} for request"
                    " {request_id}, attempt {attempt}",
                    slave_id=accepted.slave_id,
                    request_id=accepted.request_id,
                    attempt=accepted.attempt,
                )
            return

        attempt = AcceptedAttempt(
            accepted.slave_id, accepted.attempt, accepted.redelivered, self._clock.seconds()
        )
        self._store.add_attempt(request.request_id, attempt)
        self._stats["accepted"] += 1
        request.attempts.append(attempt)
        self.log.info(
            "slave {slave_id} started request {request_id}, attempt {attempt}"
            " ({count} starts so far)",
            slave_id=accepted.slave_id,
            request_id=request.request_id,
            attempt=accepted.attempt,
            count=len(request.attempts),
            redelivered=accepted.redelivered,
        )

        ending = ending_after_reply(request)
        if ending is not None:
            self._finish(request, *ending)

    def _on_accepted_without_pending_request(self, accepted: AcceptedMessage) -> None:
        """
        Send a cancel message for a request that a slave started after the
        request ended, so that the slave drops a redelivered or duplicated task.
        """
        record = self._store.get(accepted.request_id)
        if record is None:
            self._on_unknown_reply(accepted)
            return
        self._stats["accepted_after_end"] += 1
        if self._log_limiter.should_log("accepted messages for ended requests"):
            self.log.warn(
                "slave {slave_id} started request {request_id}, which already ended as"
                " {state}; sending a cancel message",
                slave_id=accepted.slave_id,
                request_id=accepted.request_id,
                state=record.state.value,
            )
        self._send_cancel(
            accepted.request_id,
            f"request {accepted.request_id} already ended as {record.state.value}: {record.reason}",
        )

    def _on_unmatched_reply(self, reply: ProgressMessage | ResultMessage | ErrorMessage) -> None:
        record = self._store.get(reply.request_id)
        if record is None:
            self._on_unknown_reply(reply)
            return
        if not isinstance(reply, ProgressMessage) and (
            reply.slave_id in record.results
            or reply.slave_id in record.errors
            or (record.mode is not DispatchMode.BROADCAST and (record.results or record.errors))
        ):
            self._on_duplicate_reply(reply)
            return

        self._stats["late_replies"] += 1
        if self._log_limiter.should_log("late replies"):
            self.log.warn(
                "ignored a late {kind} from slave {slave_id} for request {request_id},"
                " which already ended as {state}",
                kind=type(reply).__name__,
                slave_id=reply.slave_id,
                request_id=reply.request_id,
                state=record.state.value,
            )

    def _on_duplicate_reply(self, reply: ResultMessage | ErrorMessage) -> None:
        self._stats["duplicate_replies"] += 1
        if self._log_limiter.should_log("duplicate replies"):
            self.log.warn(
                "dropped a duplicate reply from slave {slave_id} for request {request_id}",
                slave_id=reply.slave_id,
                request_id=reply.request_id,
            )

    def _on_unknown_reply(
        self, reply: ProgressMessage | ResultMessage | ErrorMessage | AcceptedMessage
    ) -> None:
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

    def _on_store_failure(self, error: StoreError, request_id: str | None) -> None:
        self._stats["store_failures"] += 1
        if self._log_limiter.should_log("database failures"):
            self.log.error(
                "database failure for request {request_id}: {error}",
                request_id=request_id,
                error=error,
            )

    # -- Timers and completion -------------------------------------------------

    def _resume(self, request: PendingRequest) -> None:
        """
        Continue a request reloaded from the database: end it at once if
        what was stored or a time limit that passed meanwhile decides it,
        else arm its timer.
        """
        if request.state.is_terminal:
            # A reply that waited on the queue ended it during subscribe.
            return
        ending = ending_after_reply(request)
        now = self._clock.seconds()
        if ending is None and now >= request.deadline:
            ending = ending_at_deadline(request)
        if ending is None and now >= request.start_by:
            ending = ending_at_start_by(request)
        if ending is not None:
            self._finish(request, *ending)
            return
        self._arm_timer(request)

    def _arm_timer(self, request: PendingRequest) -> None:
        """
        Arm the timer for the request's next time limit. A limit that has
        passed fires on the next reactor turn.
        """
        now = self._clock.seconds()
        if (
            request.mode is not DispatchMode.BROADCAST
            and request.start_by < request.deadline
            and now < request.start_by
        ):
            request.timer = self._clock.callLater(
                request.start_by - now, self._on_start_by, request
            )
            return
        request.timer = self._clock.callLater(
            max(0.0, request.deadline - now), self._on_deadline, request
        )

    def _on_start_by(self, request: PendingRequest) -> None:
        request.timer = None
        ending = ending_at_start_by(request)
        if ending is not None:
            self._finish(request, *ending)
            return
        now = self._clock.seconds()
        request.timer = self._clock.callLater(
            max(0.0, request.deadline - now), self._on_deadline, request
        )

    def _on_deadline(self, request: PendingRequest) -> None:
        request.timer = None
        self._finish(request, *ending_at_deadline(request))

    def _finish(self, request: PendingRequest, event: TaskEvent, reason: str) -> None:
        """
        End a pending request through the transition table and fire its Deferred.

        This is the only way out of ``PENDING``. Later calls for the same
        request do nothing. A database failure is logged, and the request
        still ends in memory. After a restart, the master decides again from
        what the database stored.
        """
        if request.state.is_terminal or self._pending.get(request.request_id) is not request:
            return
        transition = find_transition(request.state, event)
        finished_at = self._clock.seconds()
        try:
            self._store.finish(request.request_id, transition.target, reason, finished_at)
        except StoreError as e:
            self._on_store_failure(e, request.request_id)

        request.state = transition.target
        request.reason = reason
        request.finished_at = finished_at
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        del self._pending[request.request_id]
        record = request.snapshot()
        self._stats[transition.target.value] += 1
        if event is TaskEvent.POISON_DETECTED:
            self._stats["poison_messages"] += 1

        log_method = self.log.info if transition.target is TaskState.SUCCEEDED else self.log.warn
        log_method(
            "request {request_id} for task {task} ended as {state}: {reason}",
            request_id=request.request_id,
            task=request.task,
            state=transition.target.value,
            event=event.value,
            reason=reason,
            missing=record.missing,
        )
        if transition.cancels_work:
            self._send_cancel(
                request.request_id, f"request ended as {transition.target.value}: {reason}"
            )
        if request.deferred is not None:
            request.deferred.callback(record.to_outcome())

    def _send_cancel(self, request_id: str, reason: str) -> None:
        headers, body = encode(CancelMessage(request_id, reason))
        sent: Deferred[None] = maybeDeferred(
            self._connection.send, self._destinations.control, body, headers, persistent=True
        )
        self._stats["cancels_sent"] += 1
        self._cancel_sends.add(sent)
        sent.addErrback(self._on_cancel_send_failure, request_id)
        sent.addBoth(self._forget_cancel_send, sent)

    def _on_cancel_send_failure(self, failure: Failure, request_id: str) -> None:
        self._stats["cancel_send_failures"] += 1
        if self._log_limiter.should_log("failed cancel messages"):
            self.log.error(
                "could not send a cancel message for request {request_id} to {destination}:"
                " {error}",
                request_id=request_id,
                destination=self._destinations.control,
                error=failure.value,
            )

    def _forget_cancel_send(self, result: None, sent: Deferred[None]) -> None:
        self._cancel_sends.discard(sent)

    # -- Cancellation and inspection ----------------------------------------

    def cancel(self, request_id: str, reason: str = "cancelled by an operator") -> RequestRecord:
        """
        End a pending request as cancelled and tell the slaves to drop it.

        Returns:
            The record of the cancelled request.

        Raises:
            RequestNotFound: no pending or kept finished request has this id.
            RequestAlreadyEnded: the request has already ended.
        """
        request = self._pending.get(request_id)
        if request is None:
            record = self._store.get(request_id) if self._store.is_open else None
            if record is None:
                raise RequestNotFound(f"request {request_id} not found")
            raise RequestAlreadyEnded(record)
        self.log.info(
            "cancelling request {request_id}: {reason}", request_id=request_id, reason=reason
        )
        self._finish(request, TaskEvent.CANCEL_REQUESTED, reason)
        return request.snapshot()

    def get_request(self, request_id: str) -> RequestRecord | None:
        """
        Return a snapshot of a pending or kept finished request, or None.

        Finished requests come from the database while the service runs.
        """
        pending = self._pending.get(request_id)
        if pending is not None:
            return pending.snapshot()
        if not self._store.is_open:
            return None
        return self._store.get(request_id)

    def recent_requests(self, limit: int = DEFAULT_RECENT_LIMIT) -> list[RequestRecord]:
        """
        Return up to ``limit`` pending and finished requests, newest first.
        """
        records: list[RequestRecord] = []
        if self._store.is_open:
            records.extend(reversed(self._store.recent_finished(limit)))
        records.extend(request.snapshot() for request in self._pending.values())
        # Both parts are oldest first, so a stable ascending sort, then
        # reversed, keeps requests dispatched in the same clock tick newest
        # first too.
        records.sort(key=lambda record: record.created_at)
        records.reverse()
        return records[:limit]

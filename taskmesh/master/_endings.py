"""
Decide when and how a pending request ends, from what the master has
received so far.

Each function returns the :class:`TaskEvent` to feed into the transition
table together with the reason shown to callers and operators, or ``None``
while the request keeps waiting. ``docs/task-states.md`` lists the same
rules.
"""

from __future__ import annotations

from typing import Mapping

from taskmesh._messages import DispatchMode

from ._records import PendingRequest
from ._states import TaskEvent

# The error_type of a slave that skipped a task because its start_by had
# passed when the task arrived.
EXPIRED_ERROR_TYPE = "Expired"

Ending = tuple[TaskEvent, str]


def ending_after_reply(request: PendingRequest) -> Ending | None:
    """
    Return how ``request`` ends after a reply or an ``accepted`` arrived, or
    None while it waits for more.

    A broadcast request ends when every expected slave has replied. Without
    expected slaves it waits for the deadline. A queue or direct request ends
    at its first reply, or as a poison message when slaves started it more
    than ``max_attempts`` times without a reply.
    """
    if request.mode is DispatchMode.BROADCAST:
        if not request.expected or request.missing():
            return None
        return _ending_for_replies(request)

    if request.has_any_reply():
        return _ending_for_replies(request)
    if len(request.attempts) > request.max_attempts:
        slave_ids = ", ".join(attempt.slave_id for attempt in request.attempts)
        return (
            TaskEvent.POISON_DETECTED,
            f"poison message: started {len(request.attempts)} times without a result"
            f" (slaves {slave_ids})",
        )
    return None


def ending_at_start_by(request: PendingRequest) -> Ending | None:
    """
    Return how ``request`` ends when its time-to-live ends before its
    deadline, or None to wait for the deadline.

    Only a queue or direct task that no slave has started ends here, because
    no slave may start it any more. Broadcast slaves that received the task
    still reply, with an ``Expired`` error if they did not start it.
    """
    if request.mode is DispatchMode.BROADCAST or request.attempts or request.has_any_reply():
        return None
    return TaskEvent.NOT_STARTED, _describe_not_started(request)


def ending_at_deadline(request: PendingRequest) -> Ending:
    """
    Return how ``request`` ends when its deadline passes.
    """
    missing = request.missing()
    if request.errors:
        if missing:
            replied = len(request.results) + len(request.errors)
            reason = describe_errors(request.errors, replied)
            reason += (
                f"; {count_slaves(len(missing))} did not reply within"
                f" {request.timeout:g} s: {', '.join(missing)}"
            )
            return TaskEvent.DEADLINE_WITH_ERRORS, reason
        return _ending_for_replies(request)

    if request.mode is not DispatchMode.BROADCAST:
        if request.has_any_reply():
            return _ending_for_replies(request)
        if request.attempts:
            started = ", ".join(
                f"{attempt.slave_id} (attempt {attempt.attempt})" for attempt in request.attempts
            )
            return (
                TaskEvent.DEADLINE_PASSED,
                f"started by {started} but no result within {request.timeout:g} s",
            )
        return TaskEvent.NOT_STARTED, _describe_not_started(request)

    if missing:
        started_by = set(request.started_by())
        named = [
            f"{slave_id} (started)" if slave_id in started_by else slave_id for slave_id in missing
        ]
        return (
            TaskEvent.DEADLINE_PASSED,
            f"{len(missing)} of {count_slaves(len(request.expected))} did not reply"
            f" within {request.timeout:g} s: {', '.join(named)}",
        )
    if request.results:
        return (
            TaskEvent.RESULTS_RETURNED,
            f"{_describe_no_live_slave(request.selector)};"
            f" {count_slaves(len(request.results))} returned a result within {request.timeout:g} s",
        )
    return (
        TaskEvent.NOT_STARTED,
        f"{_describe_no_live_slave(request.selector)} and none replied"
        f" within {request.timeout:g} s",
    )


def _ending_for_replies(request: PendingRequest) -> Ending:
    """
    Return how a request ends whose replies are complete: every expected
    slave replied, or a queue or direct task got its reply.
    """
    replied = len(request.results) + len(request.errors)
    if request.errors:
        error_types = {error_type for error_type, _ in request.errors.values()}
        if not request.results and error_types == {EXPIRED_ERROR_TYPE}:
            slave_ids = ", ".join(sorted(request.errors))
            return (
                TaskEvent.NOT_STARTED,
                f"{count_slaves(len(request.errors))} skipped the task because its"
                f" time-to-live of {request.ttl:g} s had ended: {slave_ids}",
            )
        return TaskEvent.ERROR_RETURNED, describe_errors(request.errors, replied)
    if request.mode is DispatchMode.BROADCAST:
        return TaskEvent.RESULTS_RETURNED, f"{count_slaves(len(request.results))} returned a result"
    slave_id = next(iter(request.results))
    return TaskEvent.RESULTS_RETURNED, f"slave {slave_id} returned a result"


def _describe_not_started(request: PendingRequest) -> str:
    if request.mode is DispatchMode.DIRECT:
        return (
            f"slave {request.target} did not start the task within its time-to-live"
            f" of {request.ttl:g} s"
        )
    if request.selector:
        return (
            f"no slave with the tag {_describe_selector(request.selector)} started the task"
            f" within its time-to-live of {request.ttl:g} s"
        )
    return f"no slave started the task within its time-to-live of {request.ttl:g} s"


def _describe_no_live_slave(selector: Mapping[str, str]) -> str:
    if selector:
        return f"no live slave matched the tags {_describe_selector(selector)} at dispatch"
    return "no slave was live at dispatch"


def _describe_selector(selector: Mapping[str, str]) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted(selector.items()))


def count_slaves(count: int) -> str:
    return f"{count} slave" if count == 1 else f"{count} slaves"


def describe_errors(errors: Mapping[str, tuple[str, str]], replied: int) -> str:
    details = ", ".join(
        f"{slave_id} ({error_type})" for slave_id, (error_type, _) in sorted(errors.items())
    )
    return (
        f"{len(errors)} of {count_slaves(replied)} that replied"
        f" returned an error: {details}"
    )

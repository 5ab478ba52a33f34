"""
The life of a request as a small state machine: named states, the events
that end a request, and one transition table.

``docs/task-states.md`` draws the diagram and lists each event's trigger.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping


class TaskState(str, Enum):
    """
    State of a request.

    ``PENDING`` is the only state that a request leaves. A
    :class:`TaskOutcome` has ``PENDING`` only when the master stopped before
    the request ended and its database keeps the request for the next start.
    When some slaves returned an error and others did not reply, the state
    is ``FAILED``.
    """

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """
        Whether the request has ended in this state.
        """
        return self is not TaskState.PENDING


class TaskEvent(str, Enum):
    """
    An event that ends a pending request.
    """

    # Broadcast: every expected slave returned a result. Queue or direct: the
    # first result arrived. Broadcast with no expected slave: results arrived
    # before the deadline.
    RESULTS_RETURNED = "results_returned"
    # Every expected slave replied and at least one returned an error, or the
    # first reply of a queue or direct task is an error.
    ERROR_RETURNED = "error_returned"
    # The broker rejected the task, or the master had no broker session.
    SEND_FAILED = "send_failed"
    # A queue or direct task was started more than max_attempts times
    # without a reply.
    POISON_DETECTED = "poison_detected"
    # The deadline passed after some slaves returned an error while others
    # had not replied yet.
    DEADLINE_WITH_ERRORS = "deadline_with_errors"
    # The deadline passed while a slave that started the task, or an
    # expected broadcast slave, had not replied.
    DEADLINE_PASSED = "deadline_passed"
    # No slave started the task before its time-to-live ended, or every
    # reply is an ``Expired`` error.
    NOT_STARTED = "not_started"
    # A caller, an operator or the HTTP API cancelled the request.
    CANCEL_REQUESTED = "cancel_requested"
    # The master stopped with an in-memory database, so nothing can resume
    # the request.
    MASTER_STOPPED = "master_stopped"


@dataclass(frozen=True)
class Transition:
    """
    One row of the transition table.

    ``cancels_work`` is true when a slave may still run or start the task
    after the request ends, so the master sends a cancel message to the
    slaves.
    """

    source: TaskState
    event: TaskEvent
    target: TaskState
    cancels_work: bool


class InvalidTransition(ValueError):
    """
    An event that the transition table has no row for in the current state.
    """


TRANSITIONS: tuple[Transition, ...] = (
    Transition(TaskState.PENDING, TaskEvent.RESULTS_RETURNED, TaskState.SUCCEEDED, False),
    Transition(TaskState.PENDING, TaskEvent.ERROR_RETURNED, TaskState.FAILED, False),
    Transition(TaskState.PENDING, TaskEvent.SEND_FAILED, TaskState.FAILED, False),
    Transition(TaskState.PENDING, TaskEvent.POISON_DETECTED, TaskState.FAILED, True),
    Transition(TaskState.PENDING, TaskEvent.DEADLINE_WITH_ERRORS, TaskState.FAILED, True),
    Transition(TaskState.PENDING, TaskEvent.DEADLINE_PASSED, TaskState.TIMED_OUT, True),
    Transition(TaskState.PENDING, TaskEvent.NOT_STARTED, TaskState.EXPIRED, True),
    Transition(TaskState.PENDING, TaskEvent.CANCEL_REQUESTED, TaskState.CANCELLED, True),
    Transition(TaskState.PENDING, TaskEvent.MASTER_STOPPED, TaskState.CANCELLED, True),
)

TRANSITION_TABLE: Mapping[tuple[TaskState, TaskEvent], Transition] = {
    (transition.source, transition.event): transition for transition in TRANSITIONS
}


def find_transition(state: TaskState, event: TaskEvent) -> Transition:
    """
    Look up the transition for ``event`` in ``state``.

    Raises:
        InvalidTransition: the table has no such row, for example because
            the request has already ended.
    """
    transition = TRANSITION_TABLE.get((state, event))
    if transition is None:
        raise InvalidTransition(
            f"a request in state {state.value} cannot take the event {event.value}"
        )
    return transition

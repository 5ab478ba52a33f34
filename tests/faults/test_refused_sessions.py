"""
The broker refuses the session: a wrong passcode, or a namespace outside the
destinations that the user may read. Both daemons name the broker's reason in
their logs, the master also in ``taskmesh status``, and they retry with
exponential backoff instead of in a loop.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pytest

from ..e2e.harness import Daemon
from ._support import CONNECTION_LOST, FaultFigures, Fleet, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.faults]

# Text of each broker's ERROR frame for a wrong passcode and a forbidden destination.
WRONG_PASSCODE = {"activemq": "password is invalid", "rabbitmq": "Access refused for user 'foo'"}
FORBIDDEN = {
    "activemq": "not authorized to (read|write|create)",
    "rabbitmq": "refused for user 'foo'",
}

SESSION_FAILED = "could not establish a STOMP session"
RETRY_SCHEDULED = "reconnecting in"
# Seconds during which the retries are counted, from the first failure on.
WINDOW = 8.0
# The reconnect backoff of a plain tcp:// URI: the first delay in seconds and
# its factor per failure. Up to 1 s of jitter is added to each delay, and a
# session that ends within 10 s of starting does not reset the backoff.
INITIAL_DELAY = 1.0
MULTIPLIER = 2.0


def max_failures_within(window: float) -> int:
    """
    Return how many failed attempts fit in ``window`` seconds at most.

    The fastest schedule has no jitter and instant failures: attempts at
    0, 1, 3, 7, 15 s and so on, so attempt n starts at 2**(n-1) - 1 s.
    """
    return 1 + int(math.log(window / INITIAL_DELAY + 1, MULTIPLIER))


def count_retries(daemons: list[Daemon], failure: str) -> dict[str, tuple[int, int]]:
    """
    Count each daemon's failed attempts and scheduled retries over WINDOW seconds.

    The window starts when the first failure of any daemon appears in its log.
    """
    wait_until(
        lambda: any(re.search(failure, daemon.log()) for daemon in daemons), 20, "a refused session"
    )
    time.sleep(WINDOW)
    return {
        daemon.name: (daemon.log().count(SESSION_FAILED), daemon.log().count(RETRY_SCHEDULED))
        for daemon in daemons
    }


def master_status_names(fleet: Fleet, cause: str) -> str:
    """
    Run ``taskmesh status`` until it reports the master as not connected, and return its output.
    """

    def not_connected_output() -> str:
        status = fleet.deployment.cli("status")
        output = status.stdout + status.stderr
        return output if status.returncode == 1 and re.search(cause, output) else ""

    output: str = wait_until(not_connected_output, 10, f"taskmesh status to report {cause!r}")
    return output


def assert_session_rejected(
    fleet: Fleet, master: Daemon, slave: Daemon, cause: str, figures: FaultFigures
) -> None:
    fleet.deployment.wait_for_api()
    for daemon in (master, slave):
        daemon.wait_for_log(rf"({SESSION_FAILED}|broker sent ERROR|{CONNECTION_LOST}).*{cause}")

    counts = count_retries([master, slave], cause)
    status = master_status_names(fleet, cause)
    # Polling the logs adds up to about half a second to the window.
    upper = max_failures_within(WINDOW + 0.5)
    per_daemon = [
        f"{name}: {failed} failed, {retries} retries in {WINDOW:g} s"
        for name, (failed, retries) in counts.items()
    ]
    figures.note = ", ".join(per_daemon) + f" (bound {upper})"

    assert "not connected" in status, status
    for daemon in (master, slave):
        assert daemon.exit_status() is None, f"{daemon.name} exited; it must keep retrying"
        failed, retries = counts[daemon.name]
        # The first retry comes within 2 s and fails too, so each daemon
        # schedules at least two retries in the window.
        assert retries >= 2, (daemon.name, counts, daemon.log())
        assert retries <= upper, (daemon.name, counts, daemon.log())
        assert failed <= upper, (daemon.name, counts, daemon.log())


def test_wrong_passcode_backs_off(fleet: Fleet, broker: Any, figures: FaultFigures) -> None:
    wrong = fleet.deployment.directory / "wrong-passcode"
    wrong.write_text("not-the-passcode\n")
    master = fleet.master(passcode_file=str(wrong))
    slave = fleet.slave("b1", passcode_file=str(wrong))
    master.start()
    slave.start()
    figures.faults.append("wrong passcode")

    assert_session_rejected(fleet, master, slave, re.escape(WRONG_PASSCODE[broker.kind]), figures)


def test_forbidden_namespace_backs_off(fleet: Fleet, broker: Any, figures: FaultFigures) -> None:
    master = fleet.master(namespace="forbidden")
    slave = fleet.slave("b1", namespace="forbidden")
    master.start()
    slave.start()
    figures.faults.append("namespace outside myapp")

    assert_session_rejected(fleet, master, slave, FORBIDDEN[broker.kind], figures)

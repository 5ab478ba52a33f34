"""
Broadcast tasks while no slave exists: they end at their deadline, and the
master's API keeps responding while they wait.
"""

from __future__ import annotations

import time

import pytest

from ._support import TERMINAL_STATES, FaultFigures, Fleet, describe_states

pytestmark = [pytest.mark.broker, pytest.mark.faults]

TASKS = 3
TIMEOUT = 3.0


def test_broadcast_without_slaves_expires(fleet: Fleet, figures: FaultFigures) -> None:
    master = fleet.master()
    fleet.start(master)
    fleet.deployment.wait_for_api()

    request_ids = [
        fleet.submit("echo", {"number": number}, timeout=TIMEOUT) for number in range(TASKS)
    ]
    figures.tasks = TASKS
    figures.faults.append("no slave")

    # Poll /status until every request ended. Every poll must get a response.
    statuses = []
    records = {}
    deadline = time.monotonic() + TIMEOUT + 10
    while time.monotonic() < deadline:
        statuses.append(fleet.deployment.get("/status"))
        records = {request_id: fleet.record(request_id) for request_id in request_ids}
        if all(record["state"] in TERMINAL_STATES for record in records.values()):
            break
        time.sleep(0.5)
    after = fleet.deployment.get("/status")
    figures.count_states(records.values())
    figures.note = f"timeout {TIMEOUT:g} s, {len(statuses) + 1} /status responses"

    assert len(statuses) >= 2, "the requests ended before /status was polled while they waited"
    assert statuses[0]["pending_requests"] == TASKS
    for request_id, record in records.items():
        assert record["state"] in ("expired", "timed_out"), describe_states(records)
        assert record["missing"] == []
    assert after["pending_requests"] == 0
    assert after["broker_connected"] is True

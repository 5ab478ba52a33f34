"""
A daemon dies or restarts while work-queue tasks run: a slave killed with
SIGKILL mid-task, and a master stopped and started again on the same
database while its slaves keep working.
"""

from __future__ import annotations

from typing import Any

import pytest

from ._support import CONNECTED, FaultFigures, Fleet, describe_states, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.faults]


def accepted_by(record: dict[str, Any]) -> list[str]:
    """
    Return the slave ids of the record's ``accepted`` attempts, in arrival order.
    """
    assert "attempts" in record, f"the record has no 'attempts' field: {record}"
    return [attempt["slave_id"] for attempt in record["attempts"]]


def test_slave_killed_mid_task(fleet: Fleet, figures: FaultFigures) -> None:
    master = fleet.master()
    b1 = fleet.slave("b1", concurrency=1)
    fleet.start(master, b1)
    fleet.deployment.wait_for_api()
    fleet.deployment.wait_for_slaves("b1")

    # b2 starts only after b1 took the task, so that b1 is the one killed.
    request_id = fleet.submit(
        "probe.nap", {"token": "long", "seconds": 5}, mode="queue", timeout=40
    )
    figures.tasks = 1
    wait_until(lambda: fleet.journal.runs("start", ["long"]), 15, "b1 to start the task")
    wait_until(
        lambda: "b1" in accepted_by(fleet.record(request_id)),
        10,
        "the master to record b1's accepted",
    )
    b2 = fleet.slave("b2", concurrency=1)
    fleet.start(b2)

    b1.kill()
    figures.faults.append("slave SIGKILL")
    record = fleet.wait_for_terminal([request_id], timeout=40)[request_id]
    figures.count_states([record])
    figures.lost = 0 if record["state"] == "succeeded" else 1
    figures.reruns = fleet.journal.extra_runs("start", ["long"])
    figures.duplicates = fleet.journal.extra_runs("end", ["long"])
    figures.note = "5 s task, b1 killed after it started"

    assert record["state"] == "succeeded", describe_states({request_id: record})
    assert set(record["results"]) == {"b2"}
    starts = [(entry.event, entry.slave_id) for entry in fleet.journal.entries()]
    assert starts == [("start", "b1"), ("start", "b2"), ("end", "b2")]
    assert accepted_by(record) == ["b1", "b2"]


def test_master_restarted_mid_run(fleet: Fleet, figures: FaultFigures) -> None:
    tasks = 6
    # The harness gives the master a database file in the test's directory.
    master = fleet.master()
    b1 = fleet.slave("b1", concurrency=2)
    b2 = fleet.slave("b2", concurrency=2)
    fleet.start(master, b1, b2)
    fleet.deployment.wait_for_api()
    fleet.deployment.wait_for_slaves("b1", "b2")

    tokens = [f"m{number}" for number in range(tasks)]
    request_ids = [
        fleet.submit("probe.nap", {"token": token, "seconds": 3}, mode="queue", timeout=60)
        for token in tokens
    ]
    figures.tasks = tasks
    wait_until(lambda: len(fleet.journal.runs("start", tokens)) >= 2, 15, "2 tasks to start")

    master.stop()
    figures.faults.append("master SIGTERM")
    # The slaves finish every task and send the results while the master is down.
    wait_until(
        lambda: len(fleet.journal.runs("end", tokens)) >= tasks,
        30,
        "every task to end on the slaves",
    )
    offset = master.log_size()
    master.start(keep_log=True)
    master.wait_for_log(CONNECTED, since=offset)
    fleet.deployment.wait_for_api()

    records = fleet.wait_for_terminal(request_ids, timeout=30)
    figures.count_states(records.values())
    figures.lost = sum(1 for record in records.values() if record.get("state") != "succeeded")
    figures.reruns = fleet.journal.extra_runs("start", tokens)
    figures.duplicates = fleet.journal.extra_runs("end", tokens)
    figures.note = f"master down while {tasks} results were sent"

    for request_id, record in records.items():
        assert record["state"] == "succeeded", describe_states(records)
        assert len(record["results"]) == 1, record
    status = fleet.deployment.get("/status")
    assert status["stats"]["unknown_replies"] == 0, status

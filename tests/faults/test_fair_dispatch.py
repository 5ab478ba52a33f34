"""
Two slaves with ``concurrency = 1`` share 100 work-queue tasks even though one
of them was consuming first: with a prefetch of 1, the broker hands each slave
one task at a time instead of the whole backlog to the first subscriber.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from ._support import FaultFigures, Fleet, describe_states

pytestmark = [pytest.mark.broker, pytest.mark.faults]

TASKS = 100
MINIMUM_SHARE = 40


def test_prefetch_shares_work_queue(fleet: Fleet, figures: FaultFigures) -> None:
    master = fleet.master()
    b1 = fleet.slave("b1", concurrency=1)
    fleet.start(master, b1)
    fleet.deployment.wait_for_api()
    fleet.deployment.wait_for_slaves("b1")
    b1_ready = time.monotonic()

    tokens = [f"w{number:03d}" for number in range(TASKS)]
    request_ids = [
        fleet.submit("probe.nap", {"token": token, "seconds": 1}, mode="queue", timeout=120)
        for token in tokens
    ]
    figures.tasks = TASKS
    # b2 starts at least a second after b1 could take tasks.
    time.sleep(max(0.0, b1_ready + 1.0 - time.monotonic()))
    b2 = fleet.slave("b2", concurrency=1)
    fleet.start(b2)

    # Two slaves need about 50 s, one slave alone 100 s.
    records = fleet.wait_for_terminal(request_ids, timeout=90)
    per_slave = Counter(
        slave_id for record in records.values() for slave_id in record.get("results", {})
    )
    figures.count_states(records.values())
    figures.lost = sum(1 for record in records.values() if record.get("state") != "succeeded")
    figures.reruns = fleet.journal.extra_runs("start", tokens)
    figures.duplicates = fleet.journal.extra_runs("end", tokens)
    figures.note = f"b1 ran {per_slave['b1']}, b2 ran {per_slave['b2']}"

    failed = {
        request_id: record
        for request_id, record in records.items()
        if record.get("state") != "succeeded"
    }
    assert not failed, describe_states(failed)
    assert per_slave["b1"] >= MINIMUM_SHARE, per_slave
    assert per_slave["b2"] >= MINIMUM_SHARE, per_slave
    assert per_slave["b1"] + per_slave["b2"] == TASKS, per_slave

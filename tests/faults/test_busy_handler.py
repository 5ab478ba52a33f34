"""
A handler keeps a CPU busy for 30 s: blocking handlers run in the slave's
thread pool, so its reactor keeps sending heart-beats and the connection
survives.
"""

from __future__ import annotations

import pytest

from ._support import CONNECTION_LOST, FaultFigures, Fleet, describe_states

pytestmark = [pytest.mark.broker, pytest.mark.faults]

SPIN_SECONDS = 30


def test_cpu_bound_handler_keeps_connection(fleet: Fleet, figures: FaultFigures) -> None:
    # With 5 s heart-beats a taskmesh client closes a connection that stayed
    # silent for 12.5 s, and the brokers close one after a few missed
    # heart-beats: a stalled reactor would lose the connection within the
    # 30 s of spinning.
    master = fleet.master(heart_beat="5000,5000")
    b1 = fleet.slave("b1", concurrency=1, heart_beat="5000,5000")
    fleet.start(master, b1)
    fleet.deployment.wait_for_api()
    fleet.deployment.wait_for_slaves("b1")

    request_id = fleet.submit(
        "probe.spin", {"token": "spin", "seconds": SPIN_SECONDS}, timeout=SPIN_SECONDS + 15
    )
    figures.tasks = 1
    figures.faults.append(f"{SPIN_SECONDS} s CPU-bound handler")
    record = fleet.wait_for_terminal([request_id], timeout=SPIN_SECONDS + 20)[request_id]
    figures.count_states([record])
    figures.lost = 0 if record["state"] == "succeeded" else 1
    figures.reruns = fleet.journal.extra_runs("start", ["spin"])
    figures.duplicates = fleet.journal.extra_runs("end", ["spin"])
    figures.note = "heart-beat 5000,5000"

    assert record["state"] == "succeeded", describe_states({request_id: record})
    assert list(record["results"]) == ["b1"]
    assert record["results"]["b1"]["rounds"] > 0
    assert CONNECTION_LOST not in b1.log(), b1.log()
    assert CONNECTION_LOST not in master.log(), master.log()
    assert [entry.event for entry in fleet.journal.entries()] == ["start", "end"]
    stats = fleet.deployment.get("/status")["stats"]
    assert stats["duplicate_replies"] == 0, stats
    assert stats["late_replies"] == 0, stats

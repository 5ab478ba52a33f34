"""
Operator task handlers for the fault-injection tests.

The tests copy this module into a directory of their own and put that
directory on the slave's PYTHONPATH, as an operator would install a handler
module. Each handler appends ``start`` and ``end`` lines to a journal file, so
that a test counts how often each task really ran, whatever the daemons log.

Environment of the slave process:

- ``TASKMESH_FAULTS_JOURNAL``: path of the journal file.
- ``TASKMESH_FAULTS_SLAVE``: the slave id written into each journal line.

Each journal line is ``UNIX_TIME EVENT TOKEN SLAVE_ID``, where ``TOKEN`` is
the task's ``token`` argument.
"""

from __future__ import annotations

import os
import time
from typing import Any

JOURNAL_VARIABLE = "TASKMESH_FAULTS_JOURNAL"
SLAVE_VARIABLE = "TASKMESH_FAULTS_SLAVE"


def _note(event: str, token: str) -> None:
    line = f"{time.time():.3f} {event} {token} {os.environ[SLAVE_VARIABLE]}\n"
    # One write() of a short line to a file opened with O_APPEND lands whole,
    # even while other slave processes append to the same journal.
    descriptor = os.open(
        os.environ[JOURNAL_VARIABLE], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
    )
    try:
        os.write(descriptor, line.encode("ascii"))
    finally:
        os.close(descriptor)


def nap(args: dict[str, Any], progress: Any) -> dict[str, Any]:
    """
    Sleep for ``args["seconds"]`` seconds in the thread pool.
    """
    token = str(args["token"])
    seconds = float(args.get("seconds", 1.0))
    _note("start", token)
    progress.report(0.0, f"sleeping {seconds:g} s")
    time.sleep(seconds)
    _note("end", token)
    return {"token": token, "slept": seconds}


def spin(args: dict[str, Any], progress: Any) -> dict[str, Any]:
    """
    Keep one CPU busy for ``args["seconds"]`` seconds with pure-Python arithmetic.

    The loop holds the GIL except at the interpreter's switch interval, which
    is the worst case for the slave's reactor thread that sends heart-beats.
    """
    token = str(args["token"])
    seconds = float(args["seconds"])
    _note("start", token)
    end = time.monotonic() + seconds
    rounds = 0
    total = 0
    while time.monotonic() < end:
        for number in range(10_000):
            total = (total + number * number) % 1_000_003
        rounds += 1
    _note("end", token)
    return {"token": token, "rounds": rounds}

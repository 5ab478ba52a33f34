"""
Building blocks of the fault-injection tests: the figures that each test
reports, the journal of handler runs, and a fleet of real daemons that run
the probe handlers.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.error
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..e2e.harness import Daemon, Deployment

from .probe_handlers import JOURNAL_VARIABLE, SLAVE_VARIABLE

TERMINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "expired", "cancelled"})

# The tasks that every fleet slave runs besides the built-in echo and sleep.
PROBE_HANDLERS = {
    "probe.nap": "probe_handlers:nap",
    "probe.spin": "probe_handlers:spin",
}

CONNECTED = r"connected to tcp://127\.0\.0\.1:\d+ with STOMP 1\.2"
CONNECTION_LOST = "lost the broker connection"

# Seconds between two polls of the master's API while waiting for requests.
POLL_INTERVAL = 0.5

# Seconds that a stopping slave waits for running tasks, short so that a test
# that fails with tasks still running ends soon.
GRACE_PERIOD = 5


@dataclass
class FaultFigures:
    """
    What one fault-injection test did and saw, for the summary table.

    ``reruns`` counts handler starts beyond the first of each task (a task
    taken over after its slave died is one). ``duplicates`` counts handler
    runs that completed beyond the first, which repeat the task's side
    effects. ``lost`` counts tasks that should have succeeded and did not.
    """

    scenario: str
    broker: str
    tasks: int = 0
    faults: list[str] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    reruns: int = 0
    duplicates: int = 0
    note: str = ""
    outcome: str = "error"

    def count_states(self, records: Iterable[dict[str, Any]]) -> None:
        self.states = Counter(record.get("state", "missing") for record in records)


@dataclass(frozen=True)
class JournalEntry:
    time: float
    event: str
    token: str
    slave_id: str


class Journal:
    """
    The file to which the probe handlers of every slave append their runs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[JournalEntry]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            stamp, event, token, slave_id = line.split()
            entries.append(JournalEntry(float(stamp), event, token, slave_id))
        return entries

    def runs(self, event: str, tokens: Iterable[str] | None = None) -> list[JournalEntry]:
        """
        Return the entries of ``event`` (``start`` or ``end``), for ``tokens`` only if given.
        """
        selected = None if tokens is None else set(tokens)
        return [
            entry
            for entry in self.entries()
            if entry.event == event and (selected is None or entry.token in selected)
        ]

    def extra_runs(self, event: str, tokens: Iterable[str], per_slave: bool = False) -> int:
        """
        Count the ``event`` entries beyond one per token, or per token and slave.

        Broadcast tasks run once on each slave, so they are counted per slave.
        """
        counts = Counter(
            (entry.token, entry.slave_id if per_slave else "") for entry in self.runs(event, tokens)
        )
        return sum(count - 1 for count in counts.values() if count > 1)


def wait_until(condition: Callable[[], Any], timeout: float, description: str) -> Any:
    """
    Poll ``condition`` until it returns a true value and return that value.

    Fails the test with ``description`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {description}")
        time.sleep(0.2)


class Fleet:
    """
    A deployment whose slaves run the probe handlers and write one journal.
    """

    def __init__(self, deployment: Deployment, handlers_directory: Path) -> None:
        self.deployment = deployment
        self.journal = Journal(deployment.directory / "journal.txt")
        self._handlers_directory = handlers_directory
        handlers_directory.mkdir(exist_ok=True)
        shutil.copy(Path(__file__).with_name("probe_handlers.py"), handlers_directory)

    def master(self, *, master: dict[str, str] | None = None, **broker: str) -> Daemon:
        return self.deployment.master(master=master, **broker)

    def slave(
        self,
        slave_id: str,
        *,
        concurrency: int = 2,
        slave: dict[str, str] | None = None,
        **broker: str,
    ) -> Daemon:
        settings = {
            "announce_interval": "1",
            "concurrency": str(concurrency),
            "grace_period": str(GRACE_PERIOD),
            **(slave or {}),
        }
        daemon = self.deployment.slave(slave_id, handlers=PROBE_HANDLERS, slave=settings, **broker)
        daemon.env["PYTHONPATH"] = os.pathsep.join(
            [str(self._handlers_directory), daemon.env["PYTHONPATH"]]
        )
        daemon.env[JOURNAL_VARIABLE] = str(self.journal.path)
        daemon.env[SLAVE_VARIABLE] = slave_id
        return daemon

    def start(self, *daemons: Daemon) -> None:
        """
        Start ``daemons`` together and wait until each has a STOMP session.
        """
        for daemon in daemons:
            daemon.start()
        for daemon in daemons:
            daemon.wait_for_log(CONNECTED)

    def submit(
        self, task: str, args: dict[str, Any], *, timeout: float, mode: str | None = None
    ) -> str:
        """
        Submit a task through ``POST /tasks`` and return its request id.
        """
        payload: dict[str, Any] = {"task": task, "args": args, "timeout": timeout}
        if mode is not None:
            payload["mode"] = mode
        accepted = self.deployment.post("/tasks", payload)
        request_id: str = accepted["request_id"]
        return request_id

    def record(self, request_id: str) -> dict[str, Any]:
        record: dict[str, Any] = self.deployment.get(f"/tasks/{request_id}")
        return record

    def wait_for_terminal(
        self, request_ids: Iterable[str], timeout: float
    ) -> dict[str, dict[str, Any]]:
        """
        Poll until every request is in a terminal state, or ``timeout`` seconds pass.

        Returns the full record of each request, pending ones included, so
        that the caller's asserts name what did not end. A request for
        which the master responds 404 gets the state ``unknown``.
        """
        request_ids = list(request_ids)
        waiting = set(request_ids)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            # One GET /tasks lists the states of the recent requests. A
            # request beyond its limit is fetched on its own.
            states = {
                summary["request_id"]: summary["state"]
                for summary in self.deployment.get("/tasks")["requests"]
            }
            for request_id in list(waiting):
                state = states.get(request_id) or self._fetch(request_id).get("state")
                if state in TERMINAL_STATES:
                    waiting.discard(request_id)
            if waiting:
                time.sleep(POLL_INTERVAL)
        return {request_id: self._fetch(request_id) for request_id in request_ids}

    def _fetch(self, request_id: str) -> dict[str, Any]:
        try:
            return self.record(request_id)
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
            return {"request_id": request_id, "state": "unknown"}


def endings_logged(master: Daemon, request_id: str) -> int:
    """
    Count the master's log lines that report how ``request_id`` ended.
    """
    return len(re.findall(rf"request {re.escape(request_id)} for task \S+ ended as ", master.log()))


def describe_states(records: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"{request_id}: {record.get('state')} {record.get('reason', '')}"
        for request_id, record in records.items()
    ]
    return "\n".join(lines)

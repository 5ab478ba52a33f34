"""
Fixtures of the fault-injection suite, and the table of figures that it
prints at the end of the run.

Each test fills a :class:`FaultFigures` through the ``figures`` fixture. The
fixture keeps it in a session-wide list whether the test passes or fails, and
``pytest_terminal_summary`` prints the list as a table, so the figures appear
in CI output without ``-s``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Generator, Iterator

import pytest

from ..e2e.harness import Deployment
from ._support import FaultFigures, Fleet

FIGURES = pytest.StashKey[list[FaultFigures]]()
TEST_OUTCOME = pytest.StashKey[str]()

# Seconds that a daemon gets to stop after SIGTERM at the end of a test before
# it is killed, so that a test that failed with tasks still running ends soon.
STOP_TIMEOUT = 10.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, Any]:
    report = yield
    if report.when == "call" or report.outcome != "passed":
        item.stash[TEST_OUTCOME] = report.outcome
    return report


@pytest.fixture
def figures(request: pytest.FixtureRequest, broker: Any) -> Iterator[FaultFigures]:
    """
    The figures of this test, printed in the summary table after the run.
    """
    collected = request.config.stash.setdefault(FIGURES, [])
    scenario = request.node.originalname.removeprefix("test_").replace("_", " ")
    figures = FaultFigures(scenario=scenario, broker=broker.kind)
    yield figures
    figures.outcome = request.node.stash.get(TEST_OUTCOME, "error")
    collected.append(figures)


@pytest.fixture
def fleet(tmp_path: Path, broker: Any) -> Iterator[Fleet]:
    """
    A fleet in a namespace of its own below the broker's, so that messages
    left on a queue by one test never reach the daemons of another.

    The broker is started again at the end if a test left it stopped,
    because later tests share it.
    """
    namespace = f"{broker.namespace}.faults-{uuid.uuid4().hex[:12]}"
    deployment = Deployment(tmp_path, broker, namespace=namespace)
    yield Fleet(deployment, tmp_path / "handlers")
    for daemon in reversed(deployment.daemons):
        daemon.stop(timeout=STOP_TIMEOUT)
    if not broker.is_ready():
        broker.restart()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    collected = config.stash.get(FIGURES, [])
    if not collected:
        return
    rows = [
        (
            "scenario",
            "broker",
            "outcome",
            "tasks",
            "faults",
            "terminal states",
            "lost",
            "reruns",
            "duplicates",
            "note",
        )
    ]
    for figures in collected:
        states = " ".join(f"{state}={count}" for state, count in sorted(figures.states.items()))
        faults = f"{len(figures.faults)}: {', '.join(figures.faults)}" if figures.faults else "0"
        rows.append(
            (
                figures.scenario,
                figures.broker,
                figures.outcome,
                str(figures.tasks),
                faults,
                states or "-",
                str(figures.lost),
                str(figures.reruns),
                str(figures.duplicates),
                figures.note,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    terminalreporter.write_sep("=", "fault injection figures")
    for row in rows:
        terminalreporter.write_line(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        )

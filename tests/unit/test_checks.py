"""
Unit tests for the start-up destination check.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from taskmesh._checks import DestinationCheck
from taskmesh.testing import FakeBroker


def make_check() -> tuple[DestinationCheck, FakeBroker, Clock]:
    clock = Clock()
    broker = FakeBroker()
    connection = broker.connect()
    return DestinationCheck(connection, "myapp", clock=clock, timeout=5), broker, clock


def errors(events: list) -> list[str]:
    return [e["reason"] for e in events if e["log_level"] is LogLevel.error and "reason" in e]


def test_check_passes_when_probe_returns() -> None:
    check, broker, clock = make_check()
    with capturedLogs() as events:
        check.startService()
    assert check.last_result == "ok"
    assert broker.sent[0][0] == "/topic/myapp.probe"
    assert errors(events) == []
    check.stopService()
    assert clock.getDelayedCalls() == []


def test_check_reports_rejected_send() -> None:
    check, broker, clock = make_check()
    broker.reject_destination("/topic/myapp.probe", "User foo is not authorized to write to: topic://myapp.probe")
    with capturedLogs() as events:
        check.startService()
    [reason] = errors(events)
    assert "cannot send to /topic/myapp.probe" in reason
    assert "not authorized" in reason
    assert check.last_result == reason


def test_check_reports_probe_not_routed() -> None:
    check, broker, clock = make_check()
    connection = check.connection
    # A subscription that never receives stands for a broker that drops topics.
    check.connection.subscribe = lambda *args, **kwargs: None  # type: ignore[method-assign]
    with capturedLogs() as events:
        check.startService()
        clock.advance(5)
    [reason] = errors(events)
    assert "did not come back within 5 s" in reason
    assert connection.is_connected


def test_check_runs_after_each_session() -> None:
    check, broker, clock = make_check()
    check.startService()
    check.connection.disconnect()
    check.connection.reconnect()
    probes = [sent for sent in broker.sent if sent[0] == "/topic/myapp.probe"]
    assert len(probes) == 2

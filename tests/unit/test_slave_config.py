"""
Tests for the slave's ``[slave] grace_period`` setting, from the file to the service.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from taskmesh._config import ConfigError, SlaveSettings, load_slave_settings
from taskmesh.slave import SlaveService
from taskmesh.slave import tap as slave_tap
from taskmesh.testing import FakeBroker, SynchronousReactorThreads, SynchronousThreadPool

from .test_tap import FakeConnectionService

REPOSITORY = Path(__file__).resolve().parents[2]


def load(tmp_path: Path, text: str) -> SlaveSettings:
    path = tmp_path / "slave.ini"
    path.write_text(text, encoding="utf-8")
    return load_slave_settings(str(path), {}, {}, hostname="host-1")


def test_grace_period_default(tmp_path: Path) -> None:
    assert load(tmp_path, "[slave]\n").grace_period == 30.0


@pytest.mark.parametrize("text, seconds", [("0", 0.0), ("12.5", 12.5), (" 90 ", 90.0)])
def test_grace_period_values(tmp_path: Path, text: str, seconds: float) -> None:
    assert load(tmp_path, f"[slave]\ngrace_period = {text}\n").grace_period == seconds


@pytest.mark.parametrize("text", ["-1", "soon", "inf", "nan", ""])
def test_grace_period_invalid(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, f"[slave]\ngrace_period = {text}\n")

    assert f"[slave] grace_period: invalid value {text!r}" in str(raised.value)
    assert str(raised.value).endswith("expected a number of seconds, 0 or more")


def test_shipped_file_documents_grace_period() -> None:
    text = (REPOSITORY / "etc" / "taskmesh" / "slave.ini").read_text(encoding="utf-8")

    assert "\n#grace_period = 30\n" in text


def test_service_gets_grace_period() -> None:
    broker = FakeBroker()
    connection = FakeConnectionService(broker.connect(), [])
    settings = load_slave_settings(None, {}, {}, hostname="s1")
    settings = SlaveSettings(broker=settings.broker, slave_id="s1", grace_period=7.5)

    root = slave_tap.build_slave_service(
        settings,
        [],
        connection,
        clock=Clock(),
        reactor=SynchronousReactorThreads(),
        thread_pool=SynchronousThreadPool(),
    )

    slave = root.getServiceNamed("slave")
    assert isinstance(slave, SlaveService)
    assert slave.grace_period == 7.5

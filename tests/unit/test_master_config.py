"""
Tests for the master's ``[master]`` settings that keep requests and bound
their delivery, and for the service that ``twistd taskmesh-master`` builds
from them.
"""

# Twisted's usage.Options, MemoryReactorClock and MultiService are
# unannotated (Twisted 26.10), so every call into them would be reported.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from taskmesh._config import ConfigError, MasterSettings, load_master_settings
from taskmesh.master import MasterService
from taskmesh.master import tap as master_tap
from taskmesh.testing import FakeBroker
from tests.unit.test_tap import FakeConnectionService

REPOSITORY = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "master.ini"
    path.write_text(text, encoding="utf-8")
    return str(path)


def master_settings(path: str | None, **overrides: str | None) -> MasterSettings:
    return load_master_settings(path, overrides, {})


def test_delivery_defaults() -> None:
    settings = master_settings(None)

    assert settings.database == "/var/lib/taskmesh/master.sqlite3"
    assert settings.max_attempts == 3
    assert settings.default_ttl is None
    assert settings.max_finished == 10000


def test_shipped_file_documents_every_master_key() -> None:
    text = (REPOSITORY / "etc" / "taskmesh" / "master.ini").read_text(encoding="utf-8")

    for key in ("database", "max_attempts", "default_ttl", "max_finished"):
        assert f"\n#{key} =" in text, key


def test_every_delivery_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[master]\ndatabase = /srv/taskmesh/m.db\nmax_attempts = 5\ndefault_ttl = 12.5\n"
        "max_finished = 50\n",
    )

    settings = master_settings(path)

    assert settings.database == "/srv/taskmesh/m.db"
    assert settings.max_attempts == 5
    assert settings.default_ttl == 12.5
    assert settings.max_finished == 50


def test_memory_database_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "[master]\ndatabase = :memory:\n")

    assert master_settings(path).database == ":memory:"


def test_relative_database_beside_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[master]\ndatabase = state/master.sqlite3\n")

    assert master_settings(path).database == str(tmp_path / "state" / "master.sqlite3")


def test_empty_default_ttl_is_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "[master]\ndefault_ttl =\n")

    assert master_settings(path).default_ttl is None


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("database", "", "expected a file path such as /var/lib/taskmesh/master.sqlite3, or :memory:"),
        ("max_attempts", "0", "expected a positive integer"),
        ("max_attempts", "two", "expected a positive integer"),
        ("default_ttl", "-1", "expected a positive number of seconds"),
        ("default_ttl", "nan", "expected a positive number of seconds"),
        ("max_finished", "0", "expected a positive integer"),
    ],
)
def test_invalid_delivery_values(tmp_path: Path, key: str, value: str, expected: str) -> None:
    path = write(tmp_path, f"[master]\n{key} = {value}\n")

    with pytest.raises(ConfigError) as raised:
        master_settings(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: [master] {key}: invalid value {value!r}: ")
    assert expected in message


def test_database_option_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[master]\ndatabase = /srv/one.db\n")
    options = master_tap.Options(environ={}, require_signing=False)

    options.parseOptions(["--config", path, "--database", "/srv/two.db"])

    assert options.settings is not None
    assert options.settings.database == "/srv/two.db"


def test_service_built_from_settings(tmp_path: Path) -> None:
    database = str(tmp_path / "master.sqlite3")
    path = write(
        tmp_path,
        f"[master]\nhttp = tcp:0:interface=127.0.0.1\ndatabase = {database}\nmax_attempts = 7\n"
        "default_ttl = 9\n",
    )
    options = master_tap.Options(environ={}, require_signing=False)
    options.parseOptions(["--config", path])
    assert options.settings is not None
    reactor = MemoryReactorClock()

    root = master_tap.build_master_service(
        options.settings,
        FakeConnectionService(FakeBroker().connect(), []),
        clock=reactor,
        reactor=reactor,
    )

    master = root.getServiceNamed("master")
    assert isinstance(master, MasterService)
    assert master.database == database
    assert master.default_max_attempts == 7
    master.startService()
    master.dispatch("sleep", {}, mode="queue", timeout=30)
    record = master.recent_requests()[0]
    assert record.ttl == 9.0
    assert record.max_attempts == 7
    assert Path(database).exists()
    master.stopService()


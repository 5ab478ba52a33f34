"""
Tests for the INI configuration in :mod:`taskmesh._config`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taskmesh._config import (
    BrokerSettings,
    ConfigError,
    MasterSettings,
    SlaveSettings,
    load_master_settings,
    load_slave_settings,
    stomp_settings_from,
)

REPOSITORY = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "taskmesh.ini") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def slave(path: str | None, environ: dict[str, str] | None = None, **overrides: str | None) -> SlaveSettings:
    return load_slave_settings(path, overrides, environ or {}, hostname="host-1")


def master(path: str | None, environ: dict[str, str] | None = None, **overrides: str | None) -> MasterSettings:
    return load_master_settings(path, overrides, environ or {})


# Defaults and every key


def test_master_defaults() -> None:
    settings = master(None)

    assert settings == MasterSettings(
        broker=BrokerSettings(
            uri="tcp://127.0.0.1:61613",
            login=None,
            passcode=None,
            vhost=None,
            namespace="myapp",
            stomp_version="1.2",
            heart_beat=(10000, 10000),
            max_frame_size=10485760,
        ),
        http_endpoint="tcp:8750:interface=127.0.0.1",
        default_timeout=60.0,
    )


def test_slave_defaults() -> None:
    settings = slave(None)

    assert settings == SlaveSettings(
        broker=BrokerSettings(),
        slave_id="host-1",
        announce_interval=10.0,
        concurrency=4,
        tags={},
        handlers={},
    )


def test_shipped_files_load_with_defaults() -> None:
    master_path = str(REPOSITORY / "etc" / "taskmesh" / "master.ini")
    slave_path = str(REPOSITORY / "etc" / "taskmesh" / "slave.ini")
    assert master(master_path) == master(None)
    assert slave(slave_path) == slave(None)


def test_every_broker_and_master_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[broker]
uri = failover:(tcp://a:61613,tcp://b:61613)?initialReconnectDelay=100,maxReconnectDelay=30000
login = operator
passcode = s3cret
vhost = /
namespace = ops.batch
stomp_version = 1.1
heart_beat = 5000, 0
max_frame_size = 1024

[master]
http = tcp:9000:interface=\\:\\:1
default_timeout = 2.5
""",
    )

    settings = master(path)

    assert settings.broker == BrokerSettings(
        uri="failover:(tcp://a:61613,tcp://b:61613)?initialReconnectDelay=100,maxReconnectDelay=30000",
        login="operator",
        passcode="s3cret",
        vhost="/",
        namespace="ops.batch",
        stomp_version="1.1",
        heart_beat=(5000, 0),
        max_frame_size=1024,
    )
    assert settings.http_endpoint == "tcp:9000:interface=\\:\\:1"
    assert settings.default_timeout == 2.5


def test_every_slave_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[broker]
uri = ssl://broker.example:61614

[slave]
id = db-1@rack4
announce_interval = 0.5
concurrency = 16
tags = role=db, zone=eu-west.a

[handlers]
backup.DB = mycompany.tasks:backup_database
report = mycompany.reports:Reports.build
""",
    )

    settings = slave(path)

    assert settings.broker.uri == "ssl://broker.example:61614"
    assert settings.slave_id == "db-1@rack4"
    assert settings.announce_interval == 0.5
    assert settings.concurrency == 16
    assert settings.tags == {"role": "db", "zone": "eu-west.a"}
    # Task names keep their case.
    assert settings.handlers == {
        "backup.DB": "mycompany.tasks:backup_database",
        "report": "mycompany.reports:Reports.build",
    }


def test_empty_optional_values_are_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nlogin =\nvhost =\npasscode =\n[slave]\nid =\ntags =\n")
    settings = slave(path)
    assert settings.broker.login is None
    assert settings.broker.vhost is None
    assert settings.broker.passcode is None
    assert settings.slave_id == "host-1"
    assert settings.tags == {}


@pytest.mark.parametrize(
    "version, offered",
    [("1.0", ("1.0",)), ("1.1", ("1.0", "1.1")), ("1.2", ("1.0", "1.1", "1.2"))],
)
def test_versions_up_to_stomp_version(version: str, offered: tuple[str, ...]) -> None:
    assert BrokerSettings(stomp_version=version).versions == offered


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nuri = tcp://a:1\nlogin = a\n[slave]\nconcurrency = 2\n")

    settings = slave(
        path,
        **{
            "broker.uri": "tcp://b:2",
            "broker.login": None,
            "broker.namespace": "other",
            "slave.id": "s9",
            "slave.concurrency": "8",
        },
    )

    assert settings.broker.uri == "tcp://b:2"
    assert settings.broker.login == "a"
    assert settings.broker.namespace == "other"
    assert settings.slave_id == "s9"
    assert settings.concurrency == 8


def test_slave_id_defaults_to_hostname() -> None:
    assert load_slave_settings(None, {}, {}, hostname="web-3.example").slave_id == "web-3.example"


def test_unusable_hostname_needs_slave_id() -> None:
    with pytest.raises(ConfigError) as raised:
        load_slave_settings(None, {}, {}, hostname="bad host")
    assert str(raised.value).startswith("[slave] id is not set, and the host name is not a valid slave id")
    assert "use --slave-id" in str(raised.value)


# Passcode


def test_passcode_precedence(tmp_path: Path) -> None:
    secret_file = tmp_path / "passcode"
    secret_file.write_text("  from-file\n", encoding="utf-8")
    path = write(tmp_path, "[broker]\npasscode = from-config\npasscode_file = passcode\n")
    config_only = write(tmp_path, "[broker]\npasscode = from-config\n", "plain.ini")

    assert slave(path, {"TASKMESH_PASSCODE": "from-env"}).broker.passcode == "from-env"
    assert slave(path).broker.passcode == "from-file"
    assert slave(path, {"TASKMESH_PASSCODE": ""}).broker.passcode == "from-file"
    assert slave(config_only).broker.passcode == "from-config"
    assert master(None, {"TASKMESH_PASSCODE": "from-env"}).broker.passcode == "from-env"


def test_passcode_file_absolute_path(tmp_path: Path) -> None:
    secret_file = tmp_path / "elsewhere.secret"
    secret_file.write_text("abs", encoding="utf-8")
    path = write(tmp_path, f"[broker]\npasscode_file = {secret_file}\n")
    assert master(path).broker.passcode == "abs"


def test_passcode_file_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\npasscode_file = nowhere\n")
    with pytest.raises(ConfigError) as raised:
        slave(path)
    assert str(raised.value) == (
        f"{path}: [broker] passcode_file: cannot read {str(tmp_path / 'nowhere')!r}:"
        " No such file or directory"
    )


def test_passcode_file_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    path = write(tmp_path, "[broker]\npasscode_file = empty\n")
    with pytest.raises(ConfigError, match="is empty: expected the passcode"):
        slave(path)


def test_passcode_not_from_overrides() -> None:
    for key in ("broker.passcode", "broker.passcode_file"):
        with pytest.raises(ConfigError, match="cannot be set on the command line"):
            slave(None, **{key: "x"})


def test_repr_hides_passcode(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\npasscode = hunter2-secret\n")
    master_settings = master(path)
    slave_settings = slave(path)

    for settings in (master_settings, slave_settings, master_settings.broker):
        assert "hunter2-secret" not in repr(settings)
        assert "hunter2-secret" not in str(settings)
    assert "passcode=<hidden>" in repr(master_settings.broker)
    assert "passcode=None" in repr(BrokerSettings())


# Errors


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.ini")
    with pytest.raises(ConfigError) as raised:
        slave(path)
    assert str(raised.value) == f"configuration file not found: {path}"


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[slave]\nid = x\n")
    with pytest.raises(ConfigError) as raised:
        master(path)
    assert str(raised.value) == f"{path}: unknown section [slave] (expected [broker], [master], [security])"


def test_default_section_is_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "[DEFAULT]\nuri = tcp://a:1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[DEFAULT\]"):
        slave(path)


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[slave]\nconcurency = 3\n")
    with pytest.raises(ConfigError) as raised:
        slave(path)
    assert str(raised.value) == (
        f"{path}: [slave] concurency: unknown key"
        " (expected one of id, announce_interval, concurrency, tags, grace_period)"
    )


def test_key_case_matters(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nURI = tcp://a:1\n")
    with pytest.raises(ConfigError, match=r"\[broker\] URI: unknown key"):
        master(path)


def test_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[slave]\nid = a\nid = b\n")
    with pytest.raises(ConfigError) as raised:
        slave(path)
    assert str(raised.value).startswith(f"{path}: invalid configuration file: ")
    assert "'id'" in str(raised.value)


def test_key_outside_section(tmp_path: Path) -> None:
    path = write(tmp_path, "id = a\n")
    with pytest.raises(ConfigError, match="invalid configuration file"):
        slave(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.ini"
    path.write_bytes("[slave]\nid = caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        slave(str(path))


def test_non_ascii_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[slave]\ntags = city=Zürich\n")
    assert slave(path).tags == {"city": "Zürich"}


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("slave", "concurrency", "x", "expected a positive integer"),
        ("slave", "concurrency", "0", "expected a positive integer"),
        ("slave", "concurrency", "1.5", "expected a positive integer"),
        ("slave", "announce_interval", "-1", "expected a positive number of seconds"),
        ("slave", "announce_interval", "nan", "expected a positive number of seconds"),
        ("slave", "announce_interval", "soon", "expected a positive number of seconds"),
        ("slave", "id", "has space", "invalid slave id 'has space'"),
        ("slave", "tags", "role", "expected comma-separated name=value pairs"),
        ("slave", "tags", "role=", "expected comma-separated name=value pairs"),
        ("slave", "tags", "a=1, a=2", "tag 'a' is set twice"),
        ("broker", "namespace", "my app", "expected letters, digits, '_' and '-'"),
        ("broker", "namespace", "a..b", "expected letters, digits, '_' and '-'"),
        ("broker", "stomp_version", "2.0", "expected one of 1.0, 1.1, 1.2"),
        ("broker", "heart_beat", "1000", "expected two non-negative integers in milliseconds"),
        ("broker", "heart_beat", "-1,5", "expected two non-negative integers in milliseconds"),
        ("broker", "max_frame_size", "10MB", "expected a positive integer number of bytes"),
        ("broker", "uri", "http://a:1", "is not tcp://HOST:PORT or ssl://HOST:PORT"),
        ("broker", "uri", "tcp://a:99999", "port 99999 is not between 1 and 65535"),
        ("broker", "uri", "failover:(tcp://a:1)?bogus=1", "unknown failover option 'bogus'"),
        ("handlers", "backup", "mycompany.tasks", "expected 'package.module:function'"),
        ("handlers", "backup", "my-company:run", "expected 'package.module:function'"),
    ],
)
def test_invalid_slave_values(tmp_path: Path, section: str, key: str, value: str, expected: str) -> None:
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")

    with pytest.raises(ConfigError) as raised:
        slave(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: [{section}] {key}: invalid value {value!r}: ")
    assert expected in message


def test_error_message_example(tmp_path: Path) -> None:
    path = write(tmp_path, "[slave]\nconcurrency = x\n")
    with pytest.raises(ConfigError) as raised:
        slave(path)
    assert str(raised.value) == f"{path}: [slave] concurrency: invalid value 'x': expected a positive integer"


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("http", "tcp:notaport", "expected a Twisted server endpoint"),
        ("http", "carrier-pigeon:1", "expected a Twisted server endpoint"),
        ("http", "tcp:8750:colour=blue", "expected a Twisted server endpoint"),
        ("default_timeout", "0", "expected a positive number of seconds"),
        ("default_timeout", "inf", "expected a positive number of seconds"),
    ],
)
def test_invalid_master_values(tmp_path: Path, key: str, value: str, expected: str) -> None:
    path = write(tmp_path, f"[master]\n{key} = {value}\n")

    with pytest.raises(ConfigError) as raised:
        master(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: [master] {key}: invalid value {value!r}: ")
    assert expected in message


def test_invalid_handler_task_name(tmp_path: Path) -> None:
    path = write(tmp_path, "[handlers]\nbad/name = a.b:c\n")
    with pytest.raises(ConfigError) as raised:
        slave(path)
    assert str(raised.value).startswith(f"{path}: [handlers] bad/name: invalid task name 'bad/name'")


def test_invalid_override_names_command_line() -> None:
    with pytest.raises(ConfigError) as raised:
        slave(None, **{"slave.concurrency": "x"})
    assert str(raised.value) == "command line: [slave] concurrency: invalid value 'x': expected a positive integer"


def test_unknown_override() -> None:
    with pytest.raises(ConfigError, match="unknown configuration override 'master.http'"):
        slave(None, **{"master.http": "tcp:1"})
    with pytest.raises(ConfigError, match=r"\[slave\] colour: unknown key"):
        slave(None, **{"slave.colour": "blue"})


def test_stomp_settings_from() -> None:
    broker = BrokerSettings(
        uri="tcp://a:1",
        login="me",
        passcode="pw",
        vhost="/",
        stomp_version="1.1",
        heart_beat=(1, 2),
        max_frame_size=99,
    )

    settings = stomp_settings_from(broker)

    assert settings.uri == "tcp://a:1"
    assert settings.login == "me"
    assert settings.passcode == "pw"
    assert settings.vhost == "/"
    assert settings.versions == ("1.0", "1.1")
    assert settings.heart_beat == (1, 2)
    assert settings.max_frame_size == 99


def test_broker_type_rabbitmq_defaults_vhost(tmp_path) -> None:
    from taskmesh._config import load_master_settings, stomp_settings_from

    path = tmp_path / "master.ini"
    path.write_text("[broker]\nbroker_type = rabbitmq\n")
    settings = load_master_settings(str(path), {}, {})
    assert settings.broker.broker_type == "rabbitmq"
    stomp = stomp_settings_from(settings.broker)
    assert stomp.vhost == "/"
    assert stomp.broker_type == "rabbitmq"


def test_broker_type_invalid_named(tmp_path) -> None:
    from taskmesh._config import ConfigError, load_master_settings

    path = tmp_path / "master.ini"
    path.write_text("[broker]\nbroker_type = kafka\n")
    with pytest.raises(ConfigError, match=r"\[broker\] broker_type: invalid value 'kafka'"):
        load_master_settings(str(path), {}, {})

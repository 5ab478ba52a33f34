"""
Tests for the twistd plugins: option parsing and the service trees.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceMaker, Service
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from taskmesh._config import SlaveSettings
from taskmesh._messages import Announcement, Destinations, SlaveState, decode
from taskmesh._service_tree import SequentialMultiService
from taskmesh.master import tap as master_tap
from taskmesh.slave import HandlerSpec, SlaveService
from taskmesh.slave import tap as slave_tap
from taskmesh.stomp import StompMessage
from taskmesh.testing import FakeBroker, FakeConnection, SynchronousReactorThreads, SynchronousThreadPool

REPOSITORY = Path(__file__).resolve().parents[2]


class FakeConnectionService(Service):
    """
    A FakeConnection that is also a service, standing in for StompClientService.
    """

    def __init__(self, connection: FakeConnection, events: list[str]) -> None:
        self.connection = connection
        self.events = events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)

    @property
    def is_connected(self) -> bool:
        return self.connection.is_connected

    @property
    def last_error(self) -> str | None:
        return self.connection.last_error

    def stopService(self) -> None:
        super().stopService()
        self.events.append("stomp stopped")
        self.connection.disconnect("the STOMP client stopped")


def parse_slave(*argv: str, environ: dict[str, str] | None = None, entry_points: Any = ()) -> slave_tap.Options:
    options = slave_tap.Options(environ=environ or {}, entry_points=entry_points, require_signing=False)
    options.parseOptions(list(argv))
    return options


def parse_master(*argv: str, environ: dict[str, str] | None = None) -> master_tap.Options:
    options = master_tap.Options(environ=environ or {}, require_signing=False)
    options.parseOptions(list(argv))
    return options


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "taskmesh.ini"
    path.write_text(text, encoding="utf-8")
    return str(path)


# Slave options


def test_slave_options_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[slave]\nconcurrency = 2\n")

    options = parse_slave(
        "--config", path,
        "--broker", "tcp://127.0.0.1:61000",
        "--login", "worker",
        "--namespace", "ops",
        "--slave-id", "b7",
        "--concurrency", "9",
        environ={"TASKMESH_PASSCODE": "pw"},
    )

    assert options.settings is not None
    assert options.settings.broker.uri == "tcp://127.0.0.1:61000"
    assert options.settings.broker.login == "worker"
    assert options.settings.broker.passcode == "pw"
    assert options.settings.broker.namespace == "ops"
    assert options.settings.slave_id == "b7"
    assert options.settings.concurrency == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--concurrency", "x"), "command line: [slave] concurrency: invalid value 'x': expected a positive integer"),
        (("--concurrency", "0"), "command line: [slave] concurrency: invalid value '0': expected a positive integer"),
        (("--slave-id", "a b"), "command line: [slave] id: invalid value 'a b': invalid slave id 'a b'"),
        (("--broker", "http://x:1"), "command line: [broker] uri: invalid value 'http://x:1': invalid broker URI"),
        (("--namespace", "a/b"), "command line: [broker] namespace: invalid value 'a/b'"),
        (("--config", "/nonexistent/slave.ini"), "configuration file not found: /nonexistent/slave.ini"),
    ],
)
def test_slave_options_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse_slave("--slave-id", "s1", *argv)
    assert str(raised.value).startswith(message)


def test_slave_rejects_passcode_option() -> None:
    with pytest.raises(usage.UsageError, match="option --passcode not recognized"):
        parse_slave("--passcode", "secret")


def test_master_rejects_passcode_option() -> None:
    with pytest.raises(usage.UsageError, match="option --passcode not recognized"):
        parse_master("--passcode", "secret")


def test_help_explains_passcode() -> None:
    for options in (slave_tap.Options(environ={}), master_tap.Options(environ={})):
        text = " ".join(str(options).split())
        assert "TASKMESH_PASSCODE" in text
        assert "passcode_file" in text
        assert "--passcode" not in text


def test_slave_handler_import_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[handlers]\nbackup = no_such_module_for_taskmesh.tasks:backup\n")

    with pytest.raises(usage.UsageError) as raised:
        parse_slave("--config", path, "--slave-id", "s1")

    message = str(raised.value)
    assert "[handlers] backup = no_such_module_for_taskmesh.tasks:backup" in message
    assert "importing module 'no_such_module_for_taskmesh.tasks' failed with ModuleNotFoundError" in message


def test_slave_handler_missing_function(tmp_path: Path) -> None:
    path = write(tmp_path, "[handlers]\nbackup = json:no_such_function\n")

    with pytest.raises(usage.UsageError, match="module 'json' has no attribute 'no_such_function'"):
        parse_slave("--config", path, "--slave-id", "s1")


def test_slave_handler_not_builtin_name(tmp_path: Path) -> None:
    path = write(tmp_path, "[handlers]\necho = json:dumps\n")

    with pytest.raises(usage.UsageError, match="'echo' is a built-in task"):
        parse_slave("--config", path, "--slave-id", "s1")


def test_slave_loads_handlers(tmp_path: Path) -> None:
    path = write(tmp_path, "[handlers]\njson.dump = json:dumps\n")
    entry_point = importlib.metadata.EntryPoint("b64", "base64:b64encode", "taskmesh.handlers")

    options = parse_slave("--config", path, "--slave-id", "s1", entry_points=[entry_point])

    assert [(s.name, s.blocking) for s in options.handler_specs] == [("b64", True), ("json.dump", True)]


def test_entry_point_conflicts_with_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[handlers]\nb64 = json:dumps\n")
    entry_point = importlib.metadata.EntryPoint("b64", "base64:b64encode", "taskmesh.handlers")

    with pytest.raises(usage.UsageError, match="task 'b64' already has a handler from entry point 'b64'"):
        parse_slave("--config", path, "--slave-id", "s1", entry_points=[entry_point])


# Master options


def test_master_options_overrides() -> None:
    options = parse_master(
        "--broker", "ssl://broker.example:61614",
        "--login", "boss",
        "--namespace", "ops",
        "--http", "tcp:0:interface=127.0.0.1",
    )

    assert options.settings is not None
    assert options.settings.broker.uri == "ssl://broker.example:61614"
    assert options.settings.broker.login == "boss"
    assert options.settings.broker.namespace == "ops"
    assert options.settings.http_endpoint == "tcp:0:interface=127.0.0.1"


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--http", "tcp:port"), "command line: [master] http: invalid value 'tcp:port': expected a Twisted server endpoint"),
        (("--http", "nonsense:1"), "command line: [master] http: invalid value 'nonsense:1': expected a Twisted server endpoint"),
        (("--broker", ""), "command line: [broker] uri: invalid value '': empty broker URI"),
        (("--namespace", ""), "command line: [broker] namespace: invalid value ''"),
        (("--slave-id", "x"), "option --slave-id not recognized"),
    ],
)
def test_master_options_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse_master(*argv)
    assert str(raised.value).startswith(message)


# Service trees


def test_build_slave_service_children() -> None:
    broker = FakeBroker()
    events: list[str] = []
    connection = FakeConnectionService(broker.connect(), events)
    settings = SlaveSettings(broker=parse_slave("--slave-id", "s1").settings.broker, slave_id="s1")  # type: ignore[union-attr]
    spec = HandlerSpec("double", lambda args, progress: args["n"] * 2, True, "test")

    root = slave_tap.build_slave_service(
        settings,
        [spec],
        connection,
        clock=Clock(),
        reactor=SynchronousReactorThreads(),
        thread_pool=SynchronousThreadPool(),
    )

    assert isinstance(root, SequentialMultiService)
    assert root.name == "taskmesh-slave"
    assert [child.name for child in root] == ["stomp", "check", "slave"]
    slave = root.getServiceNamed("slave")
    assert isinstance(slave, SlaveService)
    assert slave.registry.names() == ("double", "echo", "sleep")
    assert slave.slave_id == "s1"


def test_slave_stops_before_connection() -> None:
    broker = FakeBroker()
    events: list[str] = []
    connection = FakeConnectionService(broker.connect(), events)
    settings = parse_slave("--slave-id", "s1").settings
    assert settings is not None
    root = slave_tap.build_slave_service(
        settings,
        [],
        connection,
        clock=Clock(),
        reactor=SynchronousReactorThreads(),
        thread_pool=SynchronousThreadPool(),
    )
    presence = Destinations(settings.broker.namespace).presence

    def on_presence(message: StompMessage) -> None:
        decoded = decode(message.headers, message.body)
        assert isinstance(decoded, Announcement)
        events.append(f"announced {decoded.state.value}")

    broker.connect().subscribe(presence, on_presence)

    root.startService()
    stopping = root.stopService()

    assert stopping.called
    assert events == ["announced up", "announced down", "stomp stopped"]


def test_slave_make_service_real_client() -> None:
    from taskmesh.stomp import StompClientService

    options = parse_slave("--slave-id", "s1", "--broker", "tcp://127.0.0.1:61613")

    root = slave_tap.makeService(options)

    assert root.name == "taskmesh-slave"
    assert [child.name for child in root] == ["stomp", "check", "slave"]  # type: ignore[attr-defined]
    assert isinstance(root.getServiceNamed("stomp"), StompClientService)  # type: ignore[attr-defined]
    assert not root.running


def test_build_master_service_children() -> None:
    from taskmesh.master import MasterService

    events: list[str] = []
    connection = FakeConnectionService(FakeBroker().connect(), events)
    options = parse_master("--http", "tcp:0:interface=127.0.0.1")
    assert options.settings is not None
    reactor = MemoryReactorClock()

    root = master_tap.build_master_service(options.settings, connection, clock=reactor, reactor=reactor)

    assert root.name == "taskmesh-master"
    assert [child.name for child in root] == ["stomp", "check", "master", "http"]
    assert isinstance(root.getServiceNamed("master"), MasterService)


def test_master_make_service_real_client() -> None:
    from taskmesh.stomp import StompClientService

    options = parse_master("--http", "tcp:0:interface=127.0.0.1")

    root = master_tap.makeService(options)

    assert [child.name for child in root] == ["stomp", "check", "master", "http"]  # type: ignore[attr-defined]
    assert isinstance(root.getServiceNamed("stomp"), StompClientService)  # type: ignore[attr-defined]
    assert not root.running


def test_make_service_needs_parsed_options() -> None:
    with pytest.raises(ValueError, match="Options that were parsed first"):
        slave_tap.makeService(slave_tap.Options(environ={}))


def test_plugin_file_defines_two_service_makers() -> None:
    path = REPOSITORY / "twisted" / "plugins" / "taskmesh_plugins.py"
    spec = importlib.util.spec_from_file_location("taskmesh_plugins_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    makers = [value for value in vars(module).values() if IServiceMaker.providedBy(value)]

    assert sorted(m.tapname for m in makers) == ["taskmesh-master", "taskmesh-slave"]
    for maker in makers:
        assert maker.options in (slave_tap.Options, master_tap.Options)
        assert maker.makeService in (slave_tap.makeService, master_tap.makeService)
    assert not (REPOSITORY / "twisted" / "__init__.py").exists()
    assert not (REPOSITORY / "twisted" / "plugins" / "__init__.py").exists()


def test_sequential_stop_continues_after_failure() -> None:
    events: list[str] = []

    class Failing(Service):
        def stopService(self) -> None:
            events.append("failing stopped")
            raise RuntimeError("cannot stop")

    class Recording(Service):
        def stopService(self) -> None:
            events.append("recording stopped")

    root = SequentialMultiService("root")
    Recording().setServiceParent(root)
    Failing().setServiceParent(root)
    root.startService()

    stopping = root.stopService()

    assert stopping.called
    assert events == ["failing stopped", "recording stopped"]

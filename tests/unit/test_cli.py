"""
Tests for the ``taskmesh`` command against a stub HTTP server and against a
real master site, both on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
import pytest_twisted  # type: ignore[import-untyped]  # pytest-twisted 1.14 has no types
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread

from taskmesh._messages import (
    AcceptedMessage,
    Announcement,
    Destinations,
    DiscoverMessage,
    Message,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
)
from taskmesh.cli import main
from taskmesh.master import MasterService, make_http_site
from taskmesh.stomp import StompMessage
from taskmesh.testing import FakeBroker, FakeConnection

REQUEST_ID = "3f2a7c1e-8d4b-4f6a-9c2e-1b5d7e9f0a42"
FAST_POLL = 0.01


class StubApi:
    """
    A master API stand-in on 127.0.0.1 that returns scripted JSON responses.

    Each route has a list of ``(status, body)`` responses that are returned in
    order, the last one repeatedly. A ``bytes`` body is sent as it is.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.requests: list[tuple[str, str, bytes]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._respond()

            def do_POST(self) -> None:
                self._respond()

            def _respond(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                stub.requests.append((self.command, self.path, self.rfile.read(length)))
                responses = stub.routes.get((self.command, self.path))
                if not responses:
                    status, body = 404, {"error": f"no such resource: {self.path}"}
                elif len(responses) > 1:
                    status, body = responses.pop(0)
                else:
                    status, body = responses[0]
                data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval makes shutdown() return quickly.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def route(self, method: str, path: str, *responses: tuple[int, Any]) -> None:
        self.routes[(method, path)] = list(responses)

    def posted_json(self, path: str) -> list[Any]:
        return [
            json.loads(body)
            for method, requested_path, body in self.requests
            if method == "POST" and requested_path == path
        ]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep proxies configured on the machine away from 127.0.0.1, and start
    # without an API address from the environment.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("TASKMESH_API", raising=False)


@pytest.fixture
def api() -> Iterator[StubApi]:
    stub = StubApi()
    stub.start()
    yield stub
    stub.stop()


def record(state: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": REQUEST_ID,
        "task": "sleep",
        "args": {"seconds": 5},
        "state": state,
        "expected": ["b1", "b22"],
        "progress": {},
        "results": {},
        "errors": {},
        "missing": [],
        "reason": "",
        "timeout": 30.0,
        "created_at": 1_700_000_000.0,
        "deadline": 1_700_000_030.0,
        "finished_at": None,
    }
    base.update(fields)
    return base


def accepted(expected: list[str]) -> tuple[int, dict[str, Any]]:
    return 202, {"request_id": REQUEST_ID, "expected": expected, "deadline": 1_700_000_030.0}


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- submit ------------------------------------------------------------------------


def test_submit_prints_progress_and_results(
    api: StubApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.route("POST", "/tasks", accepted(["b1", "b22"]))
    progress_b1 = {"percent": 40.0, "message": "slept 2 of 5 s", "updated_at": 1.0}
    api.route(
        "GET",
        f"/tasks/{REQUEST_ID}",
        (200, record("pending", progress={"b1": progress_b1})),
        (200, record("pending", progress={"b1": progress_b1})),
        (
            200,
            record(
                "pending",
                progress={
                    "b1": progress_b1,
                    "b22": {"percent": 100, "message": "", "updated_at": 2.0},
                },
                results={"b22": {"slept": 5}},
            ),
        ),
        (
            200,
            record(
                "succeeded",
                progress={"b1": progress_b1},
                results={"b1": {"slept": 5}, "b22": {"slept": 5}},
                reason="2 slaves returned a result",
            ),
        ),
    )

    code = main(
        ["--api", api.url, "submit", "sleep", '{"seconds": 5}', "--timeout", "30"],
        poll_interval=FAST_POLL,
    )

    output = capsys.readouterr().out.splitlines()
    assert code == 0
    assert output == [
        f"request {REQUEST_ID}: task sleep sent to 2 live slaves: b1, b22",
        "b1    40%  slept 2 of 5 s",
        "b22  100%",
        'b22  result  {"slept": 5}',
        'b1   result  {"slept": 5}',
        "succeeded: 2 slaves returned a result",
    ]
    assert api.posted_json("/tasks") == [{"task": "sleep", "args": {"seconds": 5}, "timeout": 30.0}]


def test_submit_timed_out_names_missing(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route("POST", "/tasks", accepted(["b1", "b2"]))
    api.route(
        "GET",
        f"/tasks/{REQUEST_ID}",
        (
            200,
            record(
                "timed_out",
                expected=["b1", "b2"],
                results={"b1": 1},
                missing=["b2"],
                reason="1 of 2 slaves did not reply within 30 s: b2",
            ),
        ),
    )

    code = main(["--api", api.url, "submit", "sleep"], poll_interval=FAST_POLL)

    output = capsys.readouterr().out.splitlines()
    assert code == 1
    assert output[-2] == "timed_out: 1 of 2 slaves did not reply within 30 s: b2"
    assert output[-1] == "missing: b2"
    assert api.posted_json("/tasks") == [{"task": "sleep", "args": {}}]


def test_submit_failed_prints_error(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route("POST", "/tasks", accepted(["b1"]))
    api.route(
        "GET",
        f"/tasks/{REQUEST_ID}",
        (
            200,
            record(
                "failed",
                expected=["b1"],
                errors={"b1": {"error_type": "ValueError", "message": "seconds must be positive"}},
                reason="1 of 1 slave that replied returned an error: b1 (ValueError)",
            ),
        ),
    )

    code = main(["--api", api.url, "submit", "sleep", '{"seconds": -1}'], poll_interval=FAST_POLL)

    output = capsys.readouterr().out.splitlines()
    assert code == 1
    assert "b1  error   ValueError: seconds must be positive" in output
    assert output[-1].startswith("failed: ")


def test_submit_without_slaves_expires(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route("POST", "/tasks", accepted([]))
    api.route(
        "GET",
        f"/tasks/{REQUEST_ID}",
        (200, record("expired", expected=[], reason="no slave was live at dispatch")),
    )

    code = main(["--api", api.url, "submit", "sleep"], poll_interval=FAST_POLL)

    output = capsys.readouterr().out.splitlines()
    assert code == 1
    assert "no slave is live" in output[0]
    assert output[-1] == "expired: no slave was live at dispatch"


@pytest.mark.parametrize("state", ["cancelled", "failed", "expired", "timed_out"])
def test_submit_exit_status_by_state(api: StubApi, state: str) -> None:
    api.route("POST", "/tasks", accepted(["b1"]))
    api.route("GET", f"/tasks/{REQUEST_ID}", (200, record(state, reason="x")))

    assert main(["--api", api.url, "submit", "sleep"], poll_interval=FAST_POLL) == 1


def test_submit_rejected_by_master_is_usage_error(
    api: StubApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.route("POST", "/tasks", (400, {"error": "unknown field 'timout'"}))

    code = main(["--api", api.url, "submit", "sleep"])

    assert code == 2
    assert "the master responded 400: unknown field 'timout'" in capsys.readouterr().err


def test_submit_master_disconnected(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    error = "the master is not connected to the broker: connection refused"
    api.route("POST", "/tasks", (503, {"error": error}))

    code = main(["--api", api.url, "submit", "sleep"])

    assert code == 1
    assert error in capsys.readouterr().err


def test_submit_request_lost_on_master(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route("POST", "/tasks", accepted(["b1"]))

    code = main(["--api", api.url, "submit", "sleep"], poll_interval=FAST_POLL)

    assert code == 1
    assert "no longer known to the master" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected_message"),
    [
        (["submit", "sleep", '{"seconds": '], "invalid ARGS_JSON"),
        (["submit", "sleep", '{"seconds": '], "Expecting value: line 1 column 13"),
        (["submit", "sleep", "[1, 2]"], "ARGS_JSON must be a JSON object"),
        (["submit", "sleep", '{"x": NaN}'], "NaN is not valid JSON"),
        (["submit", "no spaces"], "invalid task name 'no spaces'"),
        (["submit", "sleep", "--timeout", "0"], "timeout must be a positive number of seconds"),
        (["submit", "sleep", "--timeout", "soon"], "invalid number of seconds: 'soon'"),
        (["show", "42"], "invalid request id '42': expected a UUID"),
        (["--api", "127.0.0.1:8750", "status"], "invalid API URL '127.0.0.1:8750'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(
    api: StubApi, capsys: pytest.CaptureFixture[str], argv: list[str], expected_message: str
) -> None:
    code = main(["--api", api.url, *argv] if "--api" not in argv else argv)

    assert code == 2
    assert expected_message in capsys.readouterr().err
    assert api.requests == []


def test_args_json_from_stdin(
    api: StubApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO('{"seconds": 3}'))
    api.route("POST", "/tasks", accepted(["b1"]))
    api.route("GET", f"/tasks/{REQUEST_ID}", (200, record("succeeded", results={"b1": 3})))

    code = main(["--api", api.url, "submit", "sleep", "-"], poll_interval=FAST_POLL)

    assert code == 0
    assert api.posted_json("/tasks") == [{"task": "sleep", "args": {"seconds": 3}}]


# -- Reaching the API ------------------------------------------------------------


def test_unreachable_api_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{unused_port()}"

    code = main(["--api", url, "submit", "sleep"])

    error = capsys.readouterr().err
    assert code == 3
    assert f"cannot reach the taskmesh master API at {url}/tasks" in error
    assert "Check that the master is running" in error
    assert "--api" in error
    assert "TASKMESH_API" in error


def test_non_json_server_exit_3(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route("GET", "/slaves", (200, b"<html>hello</html>"))

    code = main(["--api", api.url, "slaves"])

    assert code == 3
    assert "did not respond with JSON" in capsys.readouterr().err


def test_api_from_environment(
    api: StubApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TASKMESH_API", api.url + "/")
    api.route("GET", "/slaves", (200, {"time": 10.0, "slaves": []}))

    code = main(["slaves"])

    assert code == 0
    assert capsys.readouterr().out == "no live slaves\n"


def test_api_option_after_command(api: StubApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKMESH_API", f"http://127.0.0.1:{unused_port()}")
    api.route("GET", "/slaves", (200, {"time": 10.0, "slaves": []}))

    assert main(["slaves", "--api", api.url]) == 0


# -- slaves, status, show ----------------------------------------------------------


def test_slaves_table(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    slaves = [
        {
            "slave_id": "b1",
            "hostname": "build-1.example",
            "pid": 4242,
            "tasks": ["sleep", "echo"],
            "last_seen": 97.0,
        },
        {"slave_id": "gpu-10", "hostname": "", "pid": 0, "tasks": [], "last_seen": 100.0},
    ]
    api.route("GET", "/slaves", (200, {"time": 100.0, "slaves": slaves}))

    code = main(["--api", api.url, "slaves"])

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "SLAVE   HOST             PID   TASKS        LAST SEEN",
        "b1      build-1.example  4242  sleep, echo  3 s ago",
        "gpu-10  -                -     -            0 s ago",
    ]


def test_status_connected(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    status = {
        "version": "0.1.0",
        "namespace": "myapp",
        "running": True,
        "broker_connected": True,
        "broker_last_error": None,
        "live_slaves": 2,
        "pending_requests": 1,
        "stats": {"dispatched": 3, "succeeded": 2},
    }
    api.route("GET", "/status", (200, status))

    code = main(["--api", api.url, "status"])

    output = capsys.readouterr().out.splitlines()
    assert code == 0
    assert f"api          {api.url}" in output
    assert "broker       connected" in output
    assert "live slaves  2" in output
    assert "dispatched  3" in output


def test_status_disconnected_exit_1(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    status = {
        "version": "0.1.0",
        "broker_connected": False,
        "broker_last_error": "connection refused",
    }
    api.route("GET", "/status", (200, status))

    code = main(["--api", api.url, "status"])

    assert code == 1
    assert "broker       not connected: connection refused" in capsys.readouterr().out


def test_show_prints_record(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route(
        "GET",
        f"/tasks/{REQUEST_ID}",
        (
            200,
            record(
                "timed_out",
                progress={"b22": {"percent": 50, "message": "half", "updated_at": 2.0}},
                results={"b1": "ok"},
                missing=["b22"],
                reason="1 of 2 slaves did not reply within 30 s: b22",
                finished_at=1_700_000_030.0,
            ),
        ),
    )

    code = main(["--api", api.url, "show", REQUEST_ID])

    output = capsys.readouterr().out.splitlines()
    assert code == 0
    assert f"request   {REQUEST_ID}" in output
    assert "state     timed_out" in output
    assert "expected  b1, b22" in output
    assert "missing   b22" in output
    assert 'args      {"seconds": 5}' in output
    assert "b22   50%  half" in output
    assert 'b1   result  "ok"' in output


def test_show_unknown_request_exit_1(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--api", api.url, "show", REQUEST_ID])

    assert code == 1
    assert "no such resource" in capsys.readouterr().err


# -- Against a real master ---------------------------------------------------------


class SimulatedSlave:
    """
    A slave that announces itself and replies to each task after ``delay`` seconds.

    It sends a progress report at once, then a result, or nothing at all when
    ``silent`` is true.
    """

    def __init__(
        self,
        connection: FakeConnection,
        clock: IReactorTime,
        slave_id: str,
        destinations: Destinations,
        *,
        delay: float = 0.3,
        silent: bool = False,
    ) -> None:
        self._connection = connection
        self._clock = clock
        self._slave_id = slave_id
        self._destinations = destinations
        self._delay = delay
        self._silent = silent
        connection.subscribe(destinations.tasks, self._on_task)
        connection.subscribe(destinations.presence, self._on_presence)
        self._send(destinations.presence, Announcement(slave_id, SlaveState.UP, tasks=("sleep",)))

    def _send(self, destination: str, message: Message) -> None:
        headers, body = encode(message)
        self._connection.send(destination, body, headers)

    def _on_presence(self, message: StompMessage) -> None:
        if isinstance(decode(message.headers, message.body), DiscoverMessage):
            announcement = Announcement(self._slave_id, SlaveState.ALIVE, tasks=("sleep",))
            self._send(self._destinations.presence, announcement)

    def _on_task(self, message: StompMessage) -> None:
        task = decode(message.headers, message.body)
        assert isinstance(task, TaskMessage)
        if self._silent:
            return
        progress = ProgressMessage(task.request_id, self._slave_id, 50.0, "halfway")
        self._send(task.reply_to, progress)
        result = ResultMessage(task.request_id, self._slave_id, {"echo": dict(task.args)})
        self._clock.callLater(self._delay, self._send, task.reply_to, result)


async def run_against_master(slaves: list[tuple[str, bool]], argv: list[str]) -> int:
    """
    Run ``main(argv)`` in a thread against a master site on 127.0.0.1 and
    return its exit status; ``slaves`` lists ``(slave_id, silent)``.
    """
    from twisted.internet import reactor

    destinations = Destinations("clitest")
    broker = FakeBroker()
    master = MasterService(broker.connect(), "clitest", clock=reactor)
    master.startService()
    for slave_id, silent in slaves:
        SimulatedSlave(broker.connect(), reactor, slave_id, destinations, silent=silent)
    site = make_http_site(master)
    # Site is unannotated in Twisted 26.10, so mypy cannot see that it is a ServerFactory.
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    api = f"http://127.0.0.1:{address.port}"
    try:
        code: int = await deferToThread(main, ["--api", api, *argv], poll_interval=0.05)
    finally:
        await maybeDeferred(port.stopListening)
        await master.stopService()
    assert broker.handler_failures == []
    return code


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_submit_real_master_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_against_master(
        [("b1", False), ("b2", False)], ["submit", "sleep", '{"seconds": 1}', "--timeout", "10"]
    )

    output = capsys.readouterr().out.splitlines()
    assert code == 0
    assert output[0].endswith("task sleep sent to 2 live slaves: b1, b2")
    assert "b1   50%  halfway" in output
    assert "b2   50%  halfway" in output
    assert 'b1  result  {"echo": {"seconds": 1}}' in output
    assert 'b2  result  {"echo": {"seconds": 1}}' in output
    assert output[-1] == "succeeded: 2 slaves returned a result"


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_submit_real_master_times_out(capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_against_master(
        [("b1", False), ("b2", True)], ["submit", "sleep", "--timeout", "0.5"]
    )

    output = capsys.readouterr().out.splitlines()
    assert code == 1
    assert output[-2] == "timed_out: 1 of 2 slaves did not reply within 0.5 s: b2"
    assert output[-1] == "missing: b2"


# -- Delivery options, cancel and attempts -----------------------------------------------


def test_submit_sends_delivery_options(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route("POST", "/tasks", (202, {"request_id": REQUEST_ID, "mode": "queue", "expected": []}))
    api.route(
        "GET",
        f"/tasks/{REQUEST_ID}",
        (
            200,
            record(
                "succeeded",
                mode="queue",
                expected=[],
                attempts=[
                    {"slave_id": "b1", "attempt": 1, "redelivered": False, "accepted_at": 1.0},
                    {"slave_id": "b22", "attempt": 2, "redelivered": True, "accepted_at": 2.0},
                ],
                results={"b22": 7},
                reason="slave b22 returned a result",
            ),
        ),
    )

    code = main(
        [
            "--api", api.url, "submit", "sleep",
            "--mode", "queue", "--tag", "role=db", "--timeout", "20", "--ttl", "5",
            "--max-attempts", "2",
        ],
        poll_interval=FAST_POLL,
    )

    output = capsys.readouterr().out.splitlines()
    assert code == 0
    assert api.posted_json("/tasks") == [
        {
            "task": "sleep",
            "args": {},
            "mode": "queue",
            "tags": {"role": "db"},
            "timeout": 20.0,
            "ttl": 5.0,
            "max_attempts": 2,
        }
    ]
    assert output == [
        f"request {REQUEST_ID}: task sleep queued for one slave with the tag role=db",
        "b1   started  attempt 1",
        "b22  started  attempt 2 (redelivered)",
        "b22  result  7",
        "succeeded: slave b22 returned a result",
    ]


def test_submit_slave_implies_direct(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route("POST", "/tasks", (202, {"request_id": REQUEST_ID, "mode": "direct", "expected": ["b7"]}))
    api.route("GET", f"/tasks/{REQUEST_ID}", (200, record("expired", reason="not started")))

    code = main(["--api", api.url, "submit", "sleep", "--slave", "b7"], poll_interval=FAST_POLL)

    output = capsys.readouterr().out.splitlines()
    assert code == 1
    assert api.posted_json("/tasks") == [
        {"task": "sleep", "args": {}, "mode": "direct", "slave": "b7"}
    ]
    assert output[0] == f"request {REQUEST_ID}: task sleep queued for slave b7"
    assert output[-1] == "expired: not started"


def test_submit_broadcast_tags_without_match(
    api: StubApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.route("POST", "/tasks", accepted([]))
    api.route("GET", f"/tasks/{REQUEST_ID}", (200, record("expired", reason="x")))

    main(
        ["--api", api.url, "submit", "sleep", "--tag", "zone=a", "--tag", "role=db"],
        poll_interval=FAST_POLL,
    )

    output = capsys.readouterr().out.splitlines()
    assert output[0] == (
        f"request {REQUEST_ID}: task sleep sent, but no live slave has the tags zone=a, role=db;"
        " waiting for replies until the deadline"
    )
    assert api.posted_json("/tasks")[0]["tags"] == {"zone": "a", "role": "db"}


@pytest.mark.parametrize(
    ("argv", "expected_message"),
    [
        (["submit", "sleep", "--mode", "direct"], "--mode direct needs --slave ID"),
        (["submit", "sleep", "--mode", "queue", "--slave", "b1"], "--slave is only for --mode direct, not --mode queue"),
        (["submit", "sleep", "--slave", "b 1"], "invalid slave id 'b 1'"),
        (["submit", "sleep", "--mode", "fanout"], "invalid choice: 'fanout'"),
        (["submit", "sleep", "--tag", "role"], "invalid --tag 'role': expected NAME=VALUE"),
        (["submit", "sleep", "--tag", "role=d b"], "invalid tag 'role'='d b'"),
        (["submit", "sleep", "--tag", "a=1", "--tag", "a=2"], "--tag a is given twice"),
        (["submit", "sleep", "--mode", "queue", "--tag", "a=1", "--tag", "b=2"], "at most one --tag"),
        (["submit", "sleep", "--slave", "b1", "--tag", "a=1"], "--tag cannot be combined with --mode direct"),
        (["submit", "sleep", "--timeout", "5", "--ttl", "6"], "--ttl 6 is longer than --timeout 5"),
        (["submit", "sleep", "--ttl", "0"], "ttl must be a positive number of seconds, not '0'"),
        (["submit", "sleep", "--max-attempts", "0"], "must be a positive integer, not '0'"),
        (["submit", "sleep", "--max-attempts", "x"], "invalid integer: 'x'"),
        (["cancel", "42"], "invalid request id '42': expected a UUID"),
    ],
)
def test_delivery_usage_errors_exit_2(
    api: StubApi, capsys: pytest.CaptureFixture[str], argv: list[str], expected_message: str
) -> None:
    code = main(["--api", api.url, *argv])

    assert code == 2
    assert expected_message in capsys.readouterr().err
    assert api.requests == []


def test_cancel_prints_state(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route(
        "POST",
        f"/tasks/{REQUEST_ID}/cancel",
        (200, record("cancelled", reason="wrong input")),
    )

    code = main(["--api", api.url, "cancel", REQUEST_ID, "--reason", "wrong input"])

    assert code == 0
    assert capsys.readouterr().out == "cancelled: wrong input\n"
    assert api.posted_json(f"/tasks/{REQUEST_ID}/cancel") == [{"reason": "wrong input"}]


def test_cancel_without_reason_posts_empty_object(api: StubApi) -> None:
    api.route("POST", f"/tasks/{REQUEST_ID}/cancel", (200, record("cancelled")))

    assert main(["--api", api.url, "cancel", REQUEST_ID]) == 0
    assert api.posted_json(f"/tasks/{REQUEST_ID}/cancel") == [{}]


@pytest.mark.parametrize("status", [404, 409])
def test_cancel_unknown_or_ended_exit_1(
    api: StubApi, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    error = f"request {REQUEST_ID} already ended as succeeded: done"
    api.route("POST", f"/tasks/{REQUEST_ID}/cancel", (status, {"error": error}))

    code = main(["--api", api.url, "cancel", REQUEST_ID])

    assert code == 1
    assert error in capsys.readouterr().err


def test_show_prints_attempts_and_reason(
    api: StubApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.route(
        "GET",
        f"/tasks/{REQUEST_ID}",
        (
            200,
            record(
                "failed",
                mode="queue",
                tags={"role": "db"},
                expected=[],
                max_attempts=2,
                start_by=1_700_000_010.0,
                attempts=[
                    {"slave_id": "b1", "attempt": 1, "redelivered": False, "accepted_at": 1.0},
                    {"slave_id": "b2", "attempt": 1, "redelivered": True, "accepted_at": 2.0},
                    {"slave_id": "b1", "attempt": 2, "redelivered": True, "accepted_at": 3.0},
                ],
                reason="poison message: started 3 times without a result (slaves b1, b2, b1)",
            ),
        ),
    )

    code = main(["--api", api.url, "show", REQUEST_ID])

    output = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "mode      queue" in output
    assert "tags      role=db" in output
    assert "state     failed" in output
    assert (
        "reason    poison message: started 3 times without a result (slaves b1, b2, b1)"
        in output
    )
    assert "attempts  3 started, at most 2 without a result" in output
    assert any(line.startswith("start by  ") for line in output)
    assert output[-3:] == [
        "b1  started  attempt 1",
        "b2  started  attempt 1 (redelivered)",
        "b1  started  attempt 2 (redelivered)",
    ]


def test_show_direct_names_slave(api: StubApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.route(
        "GET", f"/tasks/{REQUEST_ID}", (200, record("pending", mode="direct", slave="b7"))
    )

    main(["--api", api.url, "show", REQUEST_ID])

    output = capsys.readouterr().out.splitlines()
    assert "slave     b7" in output
    assert "attempts  0 started" in output


class QueueSlave:
    """
    A slave that takes tasks from the shared work queue, sends ``accepted``
    and a result, and acknowledges each task after its result.
    """

    def __init__(self, connection: FakeConnection, slave_id: str, destinations: Destinations) -> None:
        self._connection = connection
        self._slave_id = slave_id
        connection.subscribe(destinations.work(), self._on_task, ack="client-individual")

    def _send(self, destination: str, message: Message) -> None:
        headers, body = encode(message)
        self._connection.send(destination, body, headers)

    def _on_task(self, message: StompMessage) -> None:
        task = decode(message.headers, message.body)
        assert isinstance(task, TaskMessage)
        self._send(task.reply_to, AcceptedMessage(task.request_id, self._slave_id))
        self._send(task.reply_to, ResultMessage(task.request_id, self._slave_id, "queued"))
        self._connection.ack(message)


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]  # pytest-twisted is untyped
async def test_submit_queue_real_master(capsys: pytest.CaptureFixture[str]) -> None:
    from twisted.internet import reactor

    broker = FakeBroker()
    master = MasterService(broker.connect(), "clitest", clock=reactor)
    master.startService()
    QueueSlave(broker.connect(), "q1", Destinations("clitest"))
    site = make_http_site(master)
    # Site is unannotated in Twisted 26.10, so mypy cannot see that it is a ServerFactory.
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    api = f"http://127.0.0.1:{address.port}"
    try:
        code: int = await deferToThread(
            main, ["--api", api, "submit", "sleep", "--mode", "queue"], poll_interval=0.05
        )
        unknown: int = await deferToThread(
            main, ["--api", api, "cancel", "00000000-0000-4000-8000-000000000000"]
        )
    finally:
        await maybeDeferred(port.stopListening)
        await master.stopService()
    assert broker.handler_failures == []

    output = capsys.readouterr()
    assert code == 0
    assert output.out.splitlines()[1:] == [
        "q1  started  attempt 1",
        'q1  result  "queued"',
        "succeeded: slave q1 returned a result",
    ]
    assert unknown == 1
    assert "not found" in output.err


def test_submit_warns_when_no_slave_matches(
    api: StubApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.route("POST", "/tasks", (202, {"request_id": REQUEST_ID, "mode": "direct", "expected": ["b7"]}))
    api.route("GET", "/slaves", (200, {"slaves": [{"slave_id": "b1", "tags": {}}]}))
    api.route("GET", f"/tasks/{REQUEST_ID}", (200, record("expired", reason="not started")))

    main(["--api", api.url, "submit", "sleep", "--slave", "b7"], poll_interval=FAST_POLL)

    error = capsys.readouterr().err
    assert "warning: no live slave b7 (live slaves: b1)" in error


def test_submit_no_warning_when_slave_live(
    api: StubApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.route("POST", "/tasks", (202, {"request_id": REQUEST_ID, "mode": "queue", "expected": []}))
    api.route("GET", "/slaves", (200, {"slaves": [{"slave_id": "b1", "tags": {"role": "db"}}]}))
    api.route("GET", f"/tasks/{REQUEST_ID}", (200, record("succeeded", reason="done")))

    main(["--api", api.url, "submit", "sleep", "--mode", "queue", "--tag", "role=db"], poll_interval=FAST_POLL)

    assert "warning" not in capsys.readouterr().err

"""
Tests for the master's HTTP API, driving the real ``Site`` over an in-memory
transport.
"""

# Twisted's HTTPChannel, StringTransport and Failure are unannotated (Twisted
# 26.10), so every call into them would otherwise be reported.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import http.client
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from taskmesh import __version__
from taskmesh._messages import (
    AcceptedMessage,
    Announcement,
    CancelMessage,
    Destinations,
    ErrorMessage,
    Message,
    ProgressMessage,
    ResultMessage,
    SlaveState,
    TaskMessage,
    decode,
    encode,
)
from taskmesh.master import MasterService, StoreError, make_http_site
from taskmesh.master._http import MAX_BODY_SIZE
from taskmesh.testing import FakeBroker, FakeConnection

NAMESPACE = "testns"
DESTINATIONS = Destinations(NAMESPACE)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _RecordedSocket:
    """
    Just enough of a socket for ``http.client.HTTPResponse`` to parse bytes.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._data)


def call(
    site: Site,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    chunked: bool = False,
    content_length: int | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """
    Send one HTTP/1.1 request to ``site`` over a ``StringTransport`` and parse
    the response. ``headers`` are added to the request's headers.
    """
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)

    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    payload = b""
    if body is not None:
        head.append("Content-Type: application/json")
        if chunked:
            head.append("Transfer-Encoding: chunked")
            for start in range(0, len(body), 65536):
                piece = body[start : start + 65536]
                payload += b"%x\r\n%s\r\n" % (len(piece), piece)
            payload += b"0\r\n\r\n"
        else:
            length = len(body) if content_length is None else content_length
            head.append(f"Content-Length: {length}")
            payload = body
    channel.dataReceived("\r\n".join(head).encode("ascii") + b"\r\n\r\n" + payload)

    raw = transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    response = http.client.HTTPResponse(_RecordedSocket(raw))  # type: ignore[arg-type]
    response.begin()
    headers = {name.lower(): value for name, value in response.getheaders()}
    return Response(response.status, headers, response.read())


def post_json(site: Site, path: str, payload: Any) -> Response:
    return call(site, "POST", path, json.dumps(payload).encode("utf-8"))


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    broker = FakeBroker()
    yield broker
    assert broker.handler_failures == []


@pytest.fixture
def connection(broker: FakeBroker) -> FakeConnection:
    return broker.connect()


@pytest.fixture
def slaves(broker: FakeBroker) -> FakeConnection:
    return broker.connect()


@pytest.fixture
def master(clock: Clock, connection: FakeConnection) -> Iterator[MasterService]:
    service = MasterService(connection, NAMESPACE, clock=clock, default_timeout=30.0)
    service.startService()
    yield service
    if service.running:
        service.stopService()
    assert clock.getDelayedCalls() == []


@pytest.fixture
def site(master: MasterService) -> Site:
    return make_http_site(master)


def send(connection: FakeConnection, destination: str, message: Message) -> None:
    headers, body = encode(message)
    connection.send(destination, body, headers)


def announce(slaves: FakeConnection, slave_id: str) -> None:
    announcement = Announcement(
        slave_id, SlaveState.UP, tasks=("sleep",), hostname=f"{slave_id}.example", pid=7
    )
    send(slaves, DESTINATIONS.presence, announcement)


def last_task(broker: FakeBroker) -> TaskMessage:
    headers, body = broker.sent_to(DESTINATIONS.tasks)[-1]
    message = decode(headers, body)
    assert isinstance(message, TaskMessage)
    return message


# -- POST /tasks -----------------------------------------------------------------


def test_post_task_dispatches(
    site: Site, slaves: FakeConnection, broker: FakeBroker, clock: Clock
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")

    response = post_json(site, "/tasks", {"task": "sleep", "args": {"seconds": 5}, "timeout": 12})

    assert response.status == 202
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    task = last_task(broker)
    assert body["request_id"] == task.request_id
    assert body["expected"] == ["b1", "b2"]
    assert body["deadline"] == clock.seconds() + 12
    assert response.headers["location"] == f"/tasks/{task.request_id}"
    assert task.task == "sleep"
    assert task.args == {"seconds": 5}
    assert task.deadline == clock.seconds() + 12


def test_post_task_defaults(site: Site, broker: FakeBroker, clock: Clock) -> None:
    response = post_json(site, "/tasks/", {"task": "sleep"})

    assert response.status == 202
    task = last_task(broker)
    assert task.args == {}
    assert task.deadline == clock.seconds() + 30


@pytest.mark.parametrize(
    ("payload", "expected_message"),
    [
        ([], "request body must be a JSON object"),
        ("sleep", "request body must be a JSON object"),
        ({"args": {}}, "missing field 'task'"),
        ({"task": 5}, "field 'task' must be a string, not a number"),
        ({"task": ""}, "invalid task name ''"),
        ({"task": "rm -rf"}, "invalid task name 'rm -rf'"),
        ({"task": "sleep", "args": [1]}, "field 'args' must be a JSON object, not an array"),
        ({"task": "sleep", "args": None}, "field 'args' must be a JSON object, not null"),
        ({"task": "sleep", "timeout": "10"}, "must be a positive number of seconds, not \"10\""),
        ({"task": "sleep", "timeout": 0}, "must be a positive number of seconds, not 0"),
        ({"task": "sleep", "timeout": -1.5}, "not -1.5"),
        ({"task": "sleep", "timeout": True}, "not true"),
        ({"task": "sleep", "timout": 5}, "unknown field 'timout'"),
    ],
)
def test_post_invalid_fields_rejected(
    site: Site, broker: FakeBroker, payload: Any, expected_message: str
) -> None:
    response = post_json(site, "/tasks", payload)

    assert response.status == 400
    assert response.headers["content-type"] == "application/json"
    assert expected_message in response.json()["error"]
    assert broker.sent_to(DESTINATIONS.tasks) == []


@pytest.mark.parametrize(
    ("body", "expected_message"),
    [
        (b"{", "request body is not valid JSON"),
        (b"", "request body is not valid JSON"),
        (b'{"task": NaN}', "request body is not valid JSON: NaN is not valid JSON"),
        (b"\xff\xfe", "request body is not valid UTF-8"),
        (b'{"task": "sleep", "timeout": 1e400}', "field 'timeout' must be a positive number"),
    ],
)
def test_post_invalid_json_rejected(site: Site, body: bytes, expected_message: str) -> None:
    response = call(site, "POST", "/tasks", body)

    assert response.status == 400
    assert expected_message in response.json()["error"]


def test_post_when_disconnected_is_503(
    site: Site, connection: FakeConnection, broker: FakeBroker
) -> None:
    connection.disconnect("connection refused by 127.0.0.1:61613")

    response = post_json(site, "/tasks", {"task": "sleep"})

    assert response.status == 503
    assert response.json()["error"] == (
        "the master is not connected to the broker: connection refused by 127.0.0.1:61613"
    )
    assert broker.sent_to(DESTINATIONS.tasks) == []


def test_post_when_master_stopped_is_503(site: Site, master: MasterService) -> None:
    master.stopService()

    response = post_json(site, "/tasks", {"task": "sleep"})

    assert response.status == 503
    assert "not running" in response.json()["error"]


def test_post_large_body_is_413(site: Site, broker: FakeBroker) -> None:
    padding = "x" * MAX_BODY_SIZE
    body = json.dumps({"task": "sleep", "args": {"padding": padding}}).encode("ascii")

    response = call(site, "POST", "/tasks", body)

    assert response.status == 413
    assert str(MAX_BODY_SIZE) in response.json()["error"]
    assert broker.sent_to(DESTINATIONS.tasks) == []


def test_post_large_chunked_body_is_413(site: Site) -> None:
    body = json.dumps({"task": "sleep", "args": {"padding": "x" * MAX_BODY_SIZE}}).encode("ascii")

    response = call(site, "POST", "/tasks", body, chunked=True)

    assert response.status == 413


def test_post_body_at_limit_accepted(site: Site) -> None:
    template = json.dumps({"task": "sleep", "args": {"padding": ""}})
    padding = "x" * (MAX_BODY_SIZE - len(template))
    body = json.dumps({"task": "sleep", "args": {"padding": padding}}).encode("ascii")
    assert len(body) == MAX_BODY_SIZE

    response = call(site, "POST", "/tasks", body, chunked=True)

    assert response.status == 202


# -- GET /tasks/<request_id> and /tasks ---------------------------------------------


def test_get_task_while_pending_and_after(
    site: Site, slaves: FakeConnection, broker: FakeBroker, clock: Clock
) -> None:
    announce(slaves, "b1")
    announce(slaves, "b2")
    submitted = post_json(site, "/tasks", {"task": "sleep", "args": {"seconds": 5}})
    request_id = submitted.json()["request_id"]
    clock.advance(0.5)
    send(slaves, DESTINATIONS.reply, ProgressMessage(request_id, "b1", 40.0, "slept 2 of 5 s"))
    send(slaves, DESTINATIONS.reply, ResultMessage(request_id, "b2", {"slept": 5}))

    pending = call(site, "GET", f"/tasks/{request_id}")

    assert pending.status == 200
    assert pending.headers["content-type"] == "application/json"
    record = pending.json()
    assert record["state"] == "pending"
    assert record["task"] == "sleep"
    assert record["args"] == {"seconds": 5}
    assert record["expected"] == ["b1", "b2"]
    assert record["missing"] == ["b1"]
    assert record["progress"] == {
        "b1": {"percent": 40.0, "message": "slept 2 of 5 s", "updated_at": clock.seconds()}
    }
    assert record["results"] == {"b2": {"slept": 5}}
    assert record["finished_at"] is None
    assert record["deadline"] == record["created_at"] + 30

    send(slaves, DESTINATIONS.reply, ErrorMessage(request_id, "b1", "ValueError", "too sleepy"))
    finished = call(site, "GET", f"/tasks/{request_id}").json()

    assert finished["state"] == "failed"
    assert finished["errors"] == {"b1": {"error_type": "ValueError", "message": "too sleepy"}}
    assert finished["missing"] == []
    assert "b1 (ValueError)" in finished["reason"]
    assert finished["finished_at"] == clock.seconds()


def test_get_timed_out_task_names_missing(
    site: Site, slaves: FakeConnection, clock: Clock
) -> None:
    announce(slaves, "b1")
    request_id = post_json(site, "/tasks", {"task": "sleep", "timeout": 5}).json()["request_id"]

    clock.advance(5)
    record = call(site, "GET", f"/tasks/{request_id}").json()

    assert record["state"] == "timed_out"
    assert record["missing"] == ["b1"]


def test_get_unknown_task_is_404(site: Site) -> None:
    response = call(site, "GET", "/tasks/00000000-0000-4000-8000-000000000000")

    assert response.status == 404
    assert response.headers["content-type"] == "application/json"
    assert "00000000-0000-4000-8000-000000000000 not found" in response.json()["error"]


def test_list_tasks_newest_first(site: Site, clock: Clock) -> None:
    first = post_json(site, "/tasks", {"task": "sleep", "timeout": 1}).json()["request_id"]
    clock.advance(1)
    second = post_json(site, "/tasks", {"task": "echo"}).json()["request_id"]

    response = call(site, "GET", "/tasks")

    assert response.status == 200
    requests = response.json()["requests"]
    assert [r["request_id"] for r in requests] == [second, first]
    assert [r["state"] for r in requests] == ["pending", "expired"]
    assert requests[1]["result_count"] == 0
    assert requests[1]["error_count"] == 0


# -- GET /slaves and /status -----------------------------------------------------


def test_get_slaves(site: Site, slaves: FakeConnection, clock: Clock) -> None:
    announce(slaves, "b2")
    announce(slaves, "b1")

    body = call(site, "GET", "/slaves").json()

    assert body["time"] == clock.seconds()
    assert [s["slave_id"] for s in body["slaves"]] == ["b1", "b2"]
    assert body["slaves"][0] == {
        "slave_id": "b1",
        "hostname": "b1.example",
        "pid": 7,
        "tasks": ["sleep"],
        "tags": {},
        "interval": 10.0,
        "first_seen": clock.seconds(),
        "last_seen": clock.seconds(),
    }


def test_get_status(site: Site, slaves: FakeConnection, connection: FakeConnection) -> None:
    announce(slaves, "b1")
    post_json(site, "/tasks", {"task": "sleep"})

    status = call(site, "GET", "/status").json()

    assert status["version"] == __version__
    assert status["namespace"] == NAMESPACE
    assert status["broker_connected"] is True
    assert status["broker_last_error"] is None
    assert status["live_slaves"] == 1
    assert status["pending_requests"] == 1
    assert status["stats"]["dispatched"] == 1

    connection.disconnect("heart-beat timed out")
    status = call(site, "GET", "/status").json()

    assert status["broker_connected"] is False
    assert status["broker_last_error"] == "heart-beat timed out"


# -- Errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/nope", "/slaves/b1", "/status/x", "/tasks/00000000-0000-4000-8000-000000000000/x"]
)
def test_unknown_path_is_json_404(site: Site, path: str) -> None:
    response = call(site, "GET", path)

    assert response.status == 404
    assert response.headers["content-type"] == "application/json"
    assert "no such resource" in response.json()["error"]


def test_wrong_method_is_json_405(site: Site) -> None:
    response = call(site, "DELETE", "/tasks")

    assert response.status == 405
    assert response.headers["content-type"] == "application/json"
    assert "DELETE" in response.json()["error"]
    assert "POST" in response.headers["allow"]


def test_internal_error_is_json_500(site: Site, master: MasterService) -> None:
    def broken() -> list[Any]:
        raise RuntimeError("simulated bug")

    master.live_slaves = broken  # type: ignore[method-assign]

    response = call(site, "GET", "/slaves")

    assert response.status == 500
    assert response.headers["content-type"] == "application/json"
    assert "internal server error" in response.json()["error"]


def test_root_lists_endpoints(site: Site) -> None:
    response = call(site, "GET", "/")

    assert response.status == 200
    assert "POST /tasks" in response.json()["endpoints"]


# -- Dispatch modes and cancellation ---------------------------------------------------


def test_post_queue_task_with_tag(site: Site, broker: FakeBroker, clock: Clock) -> None:
    response = post_json(
        site,
        "/tasks",
        {
            "task": "sleep",
            "mode": "queue",
            "tags": {"role": "db"},
            "timeout": 20,
            "ttl": 5,
            "max_attempts": 2,
        },
    )

    assert response.status == 202
    body = response.json()
    assert body["mode"] == "queue"
    assert body["expected"] == []
    assert body["start_by"] == clock.seconds() + 5
    [(headers, raw)] = broker.sent_to("/queue/testns.work.role.db")
    task = decode(headers, raw)
    assert isinstance(task, TaskMessage)
    assert task.request_id == body["request_id"]
    assert task.max_attempts == 2
    assert task.start_by == clock.seconds() + 5


def test_post_direct_task(site: Site, broker: FakeBroker) -> None:
    response = post_json(site, "/tasks", {"task": "sleep", "mode": "direct", "slave": "b7"})

    assert response.status == 202
    assert response.json()["expected"] == ["b7"]
    assert len(broker.sent_to(DESTINATIONS.direct("b7"))) == 1


@pytest.mark.parametrize(
    ("payload", "expected_message"),
    [
        ({"task": "sleep", "mode": "fanout"}, 'field \'mode\' must be one of "broadcast", "queue", "direct", not "fanout"'),
        ({"task": "sleep", "mode": 1}, "field 'mode' must be one of"),
        ({"task": "sleep", "mode": "direct"}, "missing field 'slave': mode \"direct\" needs"),
        ({"task": "sleep", "slave": "b1"}, "field 'slave' is only for mode \"direct\", not \"broadcast\""),
        ({"task": "sleep", "mode": "direct", "slave": "b 1"}, "field 'slave': invalid slave id 'b 1'"),
        ({"task": "sleep", "mode": "direct", "slave": 7}, "field 'slave' must be a string, not a number"),
        ({"task": "sleep", "tags": ["role"]}, "field 'tags' must be a JSON object"),
        ({"task": "sleep", "tags": {"role": 1}}, "field 'tags' must map tag names to strings"),
        ({"task": "sleep", "tags": {"role": "d b"}}, "field 'tags': invalid tag 'role'='d b'"),
        ({"task": "sleep", "mode": "queue", "tags": {"a": "1", "b": "2"}}, "field 'tags' has 2 tags, but mode \"queue\""),
        ({"task": "sleep", "mode": "direct", "slave": "b1", "tags": {"a": "1"}}, "field 'tags' is not allowed with mode \"direct\""),
        ({"task": "sleep", "ttl": 0}, "field 'ttl' must be a positive number of seconds, not 0"),
        ({"task": "sleep", "ttl": "5"}, "field 'ttl' must be a positive number of seconds, not \"5\""),
        ({"task": "sleep", "timeout": 5, "ttl": 6}, "ttl 6 s is longer than the timeout 5 s"),
        ({"task": "sleep", "max_attempts": 0}, "field 'max_attempts' must be a positive integer, not 0"),
        ({"task": "sleep", "max_attempts": 1.5}, "field 'max_attempts' must be a positive integer, not 1.5"),
        ({"task": "sleep", "max_attempts": True}, "field 'max_attempts' must be a positive integer, not true"),
    ],
)
def test_post_invalid_delivery_fields_rejected(
    site: Site, broker: FakeBroker, payload: Any, expected_message: str
) -> None:
    response = post_json(site, "/tasks", payload)

    assert response.status == 400
    assert expected_message in response.json()["error"]
    assert [destination for destination, _, _ in broker.sent if "presence" not in destination] == []


def test_post_store_failure_is_503(site: Site, master: MasterService, broker: FakeBroker) -> None:
    def fail_to_store(request: Any) -> None:
        raise StoreError("cannot write to the master database /x: disk I/O error")

    master._store.add_request = fail_to_store  # type: ignore[method-assign]

    response = post_json(site, "/tasks", {"task": "sleep"})

    assert response.status == 503
    assert "the master cannot store the request" in response.json()["error"]
    assert broker.sent_to(DESTINATIONS.tasks) == []


def test_get_task_shows_attempts_and_mode(
    site: Site, slaves: FakeConnection, clock: Clock
) -> None:
    submitted = post_json(site, "/tasks", {"task": "sleep", "mode": "queue", "ttl": 10})
    request_id = submitted.json()["request_id"]
    send(slaves, DESTINATIONS.reply, AcceptedMessage(request_id, "b1", 2, True))

    record = call(site, "GET", f"/tasks/{request_id}").json()

    assert record["mode"] == "queue"
    assert record["tags"] == {}
    assert record["slave"] is None
    assert record["max_attempts"] == 3
    assert record["ttl"] == 10
    assert record["start_by"] == clock.seconds() + 10
    assert record["attempts"] == [
        {"slave_id": "b1", "attempt": 2, "redelivered": True, "accepted_at": clock.seconds()}
    ]
    assert record["missing"] == ["b1"]
    summary = call(site, "GET", "/tasks").json()["requests"][0]
    assert summary["attempt_count"] == 1
    assert summary["mode"] == "queue"


def test_cancel_pending_task(site: Site, broker: FakeBroker) -> None:
    request_id = post_json(site, "/tasks", {"task": "sleep"}).json()["request_id"]

    response = post_json(site, f"/tasks/{request_id}/cancel", {"reason": "wrong input"})

    assert response.status == 200
    body = response.json()
    assert body["state"] == "cancelled"
    assert body["reason"] == "wrong input"
    [(headers, raw)] = broker.sent_to(DESTINATIONS.control)
    assert decode(headers, raw) == CancelMessage(
        request_id, "request ended as cancelled: wrong input"
    )


def test_cancel_without_body_uses_default_reason(site: Site) -> None:
    request_id = post_json(site, "/tasks", {"task": "sleep"}).json()["request_id"]

    response = call(site, "POST", f"/tasks/{request_id}/cancel", b"")

    assert response.status == 200
    assert response.json()["reason"] == "cancelled through the HTTP API"


def test_cancel_ended_task_is_409(site: Site) -> None:
    request_id = post_json(site, "/tasks", {"task": "sleep"}).json()["request_id"]
    post_json(site, f"/tasks/{request_id}/cancel", {})

    response = post_json(site, f"/tasks/{request_id}/cancel", {})

    assert response.status == 409
    body = response.json()
    assert body["error"].startswith(f"request {request_id} already ended as cancelled")
    assert body["state"] == "cancelled"


def test_cancel_unknown_task_is_404(site: Site) -> None:
    response = post_json(site, "/tasks/00000000-0000-4000-8000-000000000000/cancel", {})

    assert response.status == 404
    assert "not found" in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "expected_message"),
    [
        (b"[]", "request body must be empty or a JSON object"),
        (b'{"reason": 5}', "field 'reason' must be a string, not a number"),
        (b'{"why": "x"}', "unknown field 'why': expected only 'reason'"),
        (b"{", "request body is not valid JSON"),
    ],
)
def test_cancel_invalid_body_is_400(site: Site, body: bytes, expected_message: str) -> None:
    request_id = post_json(site, "/tasks", {"task": "sleep"}).json()["request_id"]

    response = call(site, "POST", f"/tasks/{request_id}/cancel", body)

    assert response.status == 400
    assert expected_message in response.json()["error"]


def test_cancel_needs_post(site: Site) -> None:
    response = call(site, "GET", "/tasks/00000000-0000-4000-8000-000000000000/cancel")

    assert response.status == 405
    assert "POST" in response.headers["allow"]

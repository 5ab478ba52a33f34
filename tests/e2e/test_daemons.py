"""
End to end: real twistd master and slaves, the real taskmesh command, and the
private ActiveMQ and RabbitMQ that the test command starts. Each test runs
once per broker.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from .harness import Deployment

pytestmark = pytest.mark.broker


@pytest.fixture
def deployment(tmp_path: Path, broker: Any) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path, broker)
    yield deployment
    deployment.stop_all()


@pytest.fixture
def running(deployment: Deployment) -> Deployment:
    """
    A master and the slaves b1 and b2, all connected.
    """
    master = deployment.master().start()
    b1 = deployment.slave("b1").start()
    b2 = deployment.slave("b2").start()
    for daemon in (master, b1, b2):
        daemon.wait_for_log(r"connected to tcp://127\.0\.0\.1:\d+ with STOMP 1\.2")
    deployment.wait_for_api()
    deployment.wait_for_slaves("b1", "b2")
    return deployment


def test_broadcast_reaches_both_slaves(running: Deployment) -> None:
    result = running.cli("submit", "sleep", '{"seconds": 3}', "--timeout", "30")
    output = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    ids = re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", output)
    assert ids, output
    record_id = ids[0]

    record = running.get(f"/tasks/{record_id}")
    assert record["state"] == "succeeded"
    assert set(record["results"]) == {"b1", "b2"}
    assert record["results"]["b1"] == {"slept": 3}
    assert record["missing"] == []
    # Progress from both slaves reached the master and the command line.
    assert set(record["progress"]) == {"b1", "b2"}
    for slave_id in ("b1", "b2"):
        assert record["progress"][slave_id]["percent"] == 100
        progress_lines = [line for line in output.splitlines() if line.strip().startswith(slave_id)]
        assert len(progress_lines) >= 2, output
    for daemon in running.daemons[1:]:
        assert record_id in daemon.log()


def test_slaves_command_lists_live_slaves(running: Deployment) -> None:
    result = running.cli("slaves")
    assert result.returncode == 0, result.stderr
    assert "b1" in result.stdout
    assert "b2" in result.stdout
    assert "sleep" in result.stdout


def test_task_errors_reported_per_slave(running: Deployment) -> None:
    result = running.cli("submit", "sleep", '{"seconds": "soon"}')
    assert result.returncode == 1
    assert "InvalidArguments" in result.stdout
    unknown = running.cli("submit", "resize", "{}")
    assert unknown.returncode == 1
    assert "UnknownTask" in unknown.stdout


def test_malformed_task_body_gets_error_reply(running: Deployment, broker: Any) -> None:
    request_id = str(uuid.uuid4())
    reply_queue = f"/queue/{broker.namespace}.e2e.{uuid.uuid4().hex}"
    with RawStomp(broker) as stomp:
        stomp.subscribe(reply_queue)
        tasks = f"/topic/{broker.namespace}.tasks"
        headers, body = running.seal(
            {
                "taskmesh-type": "task",
                "request_id": request_id,
                "task": "echo",
                "reply-to": reply_queue,
                "content-type": "application/json;charset=utf-8",
            },
            b'{"task": "echo", "args": ',
            tasks,
        )
        stomp.send(tasks, body, headers)
        replies = [stomp.receive() for _ in range(2)]
    by_slave = {headers["slave_id"]: (headers, json.loads(body)) for headers, body in replies}
    assert set(by_slave) == {"b1", "b2"}
    for headers, body in by_slave.values():
        assert headers["request_id"] == request_id
        assert headers["taskmesh-type"] == "error"
        assert body["error_type"] == "InvalidTask"
        assert "not valid JSON" in body["message"]
    # Both slaves keep working.
    result = running.cli("submit", "echo", '{"still": "alive"}')
    assert result.returncode == 0, result.stdout + result.stderr


# What each broker reports for a wrong passcode and a forbidden destination.
WRONG_PASSCODE = {"activemq": "password is invalid", "rabbitmq": "Access refused for user 'foo'"}
FORBIDDEN = {"activemq": "not authorized to (read|write|create)", "rabbitmq": "refused for user 'foo'"}


def test_unsigned_and_forged_tasks_rejected(running: Deployment, broker: Any) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from twisted.internet.task import Clock

    from taskmesh.security import Signer, key_id_of, seal_message

    tasks = f"/topic/{broker.namespace}.tasks"
    reply_queue = f"/queue/{broker.namespace}.reply"

    def task_headers() -> dict[str, str]:
        return {
            "taskmesh-type": "task",
            "request_id": str(uuid.uuid4()),
            "task": "echo",
            "reply-to": reply_queue,
            "content-type": "application/json;charset=utf-8",
        }

    body = b'{"task": "echo", "args": {"from": "intruder"}}'
    intruder = Ed25519PrivateKey.generate()
    clock = Clock()
    clock.advance(time.time())
    forged_headers, forged_body = seal_message(
        task_headers(), body, tasks, Signer(intruder, key_id_of(intruder.public_key()), clock)
    )
    genuine_headers, _ = running.seal(task_headers(), body, tasks)
    tampered_body = body.replace(b"intruder", b"attacker")
    with RawStomp(broker) as stomp:
        stomp.send(tasks, body, task_headers())
        stomp.send(tasks, forged_body, forged_headers)
        stomp.send(tasks, tampered_body, genuine_headers)
    for slave in running.daemons[1:]:
        slave.wait_for_log(r"rejected a message on .*unsigned message")
        slave.wait_for_log(r"rejected a message on .*unknown key")
        slave.wait_for_log(r"rejected a message on .*invalid signature")
        assert "intruder" not in slave.log().split("rejected")[0]
    result = running.cli("submit", "echo", '{"still": "serving"}')
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_passcode_names_cause(deployment: Deployment, broker: Any) -> None:
    cause = WRONG_PASSCODE[broker.kind]
    (deployment.directory / "wrong").write_text("not-the-passcode\n")
    master = deployment.master(passcode_file=str(deployment.directory / "wrong")).start()
    master.wait_for_log(r"could not establish a STOMP session .*" + re.escape(cause))
    deployment.wait_for_api()
    status = deployment.cli("status")
    assert status.returncode == 1
    assert cause in status.stdout + status.stderr
    submit = deployment.cli("submit", "echo", "{}")
    assert submit.returncode == 1
    assert cause in submit.stdout + submit.stderr
    # Retries back off: a few attempts in the first seconds, not a hot loop.
    attempts = master.log().count("could not establish a STOMP session")
    assert attempts <= 5, master.log()


def test_unauthorized_namespace_names_cause(deployment: Deployment, broker: Any) -> None:
    slave = deployment.slave("b1", namespace="forbidden").start()
    slave.wait_for_log(r"(could not establish a STOMP session|broker sent ERROR).*" + FORBIDDEN[broker.kind])
    assert slave.exit_status() is None, "the slave keeps running and retries"


class RawStomp:
    """
    A minimal blocking STOMP 1.2 client on a socket, to act as a foreign program.
    """

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.buffer = b""

    def __enter__(self) -> RawStomp:
        self.socket = socket.create_connection((self.broker.host, self.broker.port), timeout=30)
        self.write(
            "CONNECT",
            {
                "accept-version": "1.2",
                "host": getattr(self.broker, "vhost", None) or "localhost",
                "login": self.broker.login,
                "passcode": self.broker.passcode,
            },
        )
        command, headers, _ = self.read_frame()
        assert command == "CONNECTED", headers
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.socket.close()

    def write(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        lines = [command] + [f"{k}:{v}" for k, v in headers.items()]
        self.socket.sendall("\n".join(lines).encode() + b"\n\n" + body + b"\x00")

    def subscribe(self, destination: str) -> None:
        self.write("SUBSCRIBE", {"id": "e2e", "destination": destination, "ack": "auto", "receipt": "sub"})
        command, headers, _ = self.read_frame()
        assert command == "RECEIPT", headers

    def send(self, destination: str, body: bytes, headers: dict[str, str]) -> None:
        self.write(
            "SEND",
            {"destination": destination, "content-length": str(len(body)), "receipt": "sent", **headers},
            body,
        )
        command, received, _ = self.read_frame()
        assert command == "RECEIPT", received

    def receive(self) -> tuple[dict[str, str], bytes]:
        command, headers, body = self.read_frame()
        assert command == "MESSAGE", (command, headers, body)
        return headers, body

    def read_frame(self) -> tuple[str, dict[str, str], bytes]:
        while True:
            self.buffer = self.buffer.lstrip(b"\r\n")
            head_end = self.buffer.find(b"\n\n")
            if head_end >= 0:
                head = self.buffer[:head_end].decode()
                command, *lines = head.split("\n")
                headers: dict[str, str] = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers.setdefault(name, _unescape(value))
                start = head_end + 2
                if "content-length" in headers:
                    end = start + int(headers["content-length"])
                else:
                    end = self.buffer.find(b"\x00", start)
                if end >= 0 and len(self.buffer) > end:
                    body = self.buffer[start:end]
                    self.buffer = self.buffer[end + 1 :]
                    return command, headers, body
            chunk = self.socket.recv(65536)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            self.buffer += chunk


def _unescape(value: str) -> str:
    replacements = {"\\c": ":", "\\n": "\n", "\\r": "\r", "\\\\": "\\"}
    out = []
    index = 0
    while index < len(value):
        pair = value[index : index + 2]
        if pair in replacements:
            out.append(replacements[pair])
            index += 2
        else:
            out.append(value[index])
            index += 1
    return "".join(out)

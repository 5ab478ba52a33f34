"""
Real ``twistd`` daemons and the real ``taskmesh`` command for end-to-end tests.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """
    Return a TCP port on 127.0.0.1 that is free now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def command(name: str) -> list[str]:
    """
    Return the argv prefix for an installed console script.

    ``scripts/test`` installs taskmesh into the virtual environment, so the
    scripts sit next to the interpreter. Outside it, fall back to running the
    same entry points through the interpreter.
    """
    script = BIN / name
    if script.exists():
        return [str(script)]
    if name == "twistd":
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    return [sys.executable, "-c", "import sys; from taskmesh.cli import main; sys.exit(main())"]


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("TASKMESH_PASSCODE", None)
    env.update(extra)
    return env


def write_config(path: Path, sections: dict[str, dict[str, str]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Daemon:
    """
    One ``twistd --nodaemon`` process with its log file.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=environment)
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, keep_log: bool = False) -> Daemon:
        """
        Start the process. With ``keep_log``, append to the log of an earlier
        run instead of emptying it.
        """
        if not keep_log:
            self.log_path.write_text("")
        self.process = subprocess.Popen(
            [*command("twistd"), "--nodaemon", "--pidfile=", f"--logfile={self.log_path}", *self.argv],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log(self, since: int = 0) -> str:
        """
        Return the log text from character offset ``since`` on.
        """
        return self.log_path.read_text(errors="replace")[since:]

    def log_size(self) -> int:
        """
        Return the log's length in characters, an offset for ``log`` and ``wait_for_log``.
        """
        return len(self.log())

    def wait_for_log(self, pattern: str, timeout: float = 30.0, since: int = 0) -> re.Match[str]:
        """
        Wait until the log from offset ``since`` on matches ``pattern``, and
        fail with the log's tail if it does not.
        """
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while time.monotonic() < deadline:
            match = compiled.search(self.log(since))
            if match:
                return match
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(
            f"{self.name}: no log line matching {pattern!r} within {timeout} s"
            f" (exit status {self.exit_status()}).\n{self.describe()}"
        )

    def exit_status(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def describe(self) -> str:
        output = b""
        if self.process is not None and self.process.poll() is not None and self.process.stdout:
            output = self.process.stdout.read()
        return f"--- {self.name} log tail ---\n{self.log()[-4000:]}\n--- output ---\n{output.decode(errors='replace')[-2000:]}"

    def stop(self, timeout: float = 30.0) -> int | None:
        """
        Send SIGTERM and wait; SIGKILL the process group if it does not exit.
        """
        if self.process is None or self.process.poll() is not None:
            return self.exit_status()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@dataclass
class Deployment:
    """
    Configuration files and daemons of one test, all under ``directory``.
    """

    directory: Path
    broker: Any
    namespace: str = ""
    http_port: int = field(default_factory=free_port)
    daemons: list[Daemon] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.namespace = self.namespace or self.broker.namespace
        (self.directory / "passcode").write_text(self.broker.passcode + "\n")
        os.chmod(self.directory / "passcode", 0o600)
        self._write_keys()

    def _write_keys(self) -> None:
        """
        Create the signing keys as an operator would, with taskmesh-keygen.

        The master has its own key; the slaves share one key. Each side's
        keyring contains the other side's public key, limited to the message
        types that side sends.
        """
        from taskmesh._keygen import main as keygen

        keys = self.directory / "keys"
        keys.mkdir(exist_ok=True)
        for name in ("master", "slaves"):
            if not (keys / f"{name}.key").exists():
                quiet = io.StringIO()
                status = keygen(
                    ["--private", str(keys / f"{name}.key"), "--public", str(keys / f"{name}.pub")],
                    stdout=quiet,
                )
                assert status == 0, quiet.getvalue()
        (keys / "master-keyring.ini").write_text(
            "[slaves]\npublic_key_file = slaves.pub\n"
            "types = progress result error accepted announce\n"
        )
        (keys / "slave-keyring.ini").write_text(
            "[master]\npublic_key_file = master.pub\ntypes = task cancel discover\n"
        )

    def security_section(self, role: str) -> dict[str, str]:
        keys = self.directory / "keys"
        name = "master" if role == "master" else "slaves"
        return {"signing_key": str(keys / f"{name}.key"), "keyring": str(keys / f"{role}-keyring.ini")}

    def seal(self, headers: dict[str, str], body: bytes, destination: str) -> tuple[dict[str, str], bytes]:
        """
        Sign a message with the master's key, as a foreign master program would.
        """
        from twisted.internet.task import Clock

        from taskmesh.security import Signer, load_signing_key, seal_message

        key = load_signing_key(self.directory / "keys" / "master.key")
        clock = Clock()
        clock.advance(time.time())
        return seal_message(headers, body, destination, Signer(key, key.key_id, clock))

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def broker_section(self, **overrides: str) -> dict[str, str]:
        section = {
            "uri": self.broker.uri,
            "login": self.broker.login,
            "passcode_file": str(self.directory / "passcode"),
            "namespace": self.namespace,
            "heart_beat": "2000,2000",
            "broker_type": self.broker.kind,
        }
        vhost = getattr(self.broker, "vhost", None)
        if vhost:
            section["vhost"] = vhost
        section.update(overrides)
        return section

    def master(self, *extra: str, master: dict[str, str] | None = None, **broker: str) -> Daemon:
        config = write_config(
            self.directory / "master.ini",
            {
                "broker": self.broker_section(**broker),
                "security": self.security_section("master"),
                "master": {
                    "http": f"tcp:{self.http_port}:interface=127.0.0.1",
                    "default_timeout": "30",
                    # The default database path is below /var/lib, outside the test's directory.
                    "database": str(self.directory / "master.sqlite3"),
                    **(master or {}),
                },
            },
        )
        return self._add(Daemon("master", ["taskmesh-master", "--config", str(config), *extra],
                                self.directory / "master.log"))

    def slave(self, slave_id: str, *extra: str, handlers: dict[str, str] | None = None,
              slave: dict[str, str] | None = None, **broker: str) -> Daemon:
        sections = {
            "broker": self.broker_section(**broker),
            "security": self.security_section("slave"),
            "slave": {"announce_interval": "2", **(slave or {})},
        }
        if handlers:
            sections["handlers"] = handlers
        config = write_config(self.directory / f"slave-{slave_id}.ini", sections)
        return self._add(Daemon(
            f"slave {slave_id}",
            ["taskmesh-slave", "--config", str(config), "--slave-id", slave_id, *extra],
            self.directory / f"slave-{slave_id}.log",
        ))

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command("taskmesh"), "--api", self.api, *args],
            cwd=REPO,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.api + path, timeout=10) as response:
            return json.load(response)

    def post(self, path: str, payload: Any) -> Any:
        """
        Send ``payload`` as JSON to the API and return the decoded response.

        An HTTP error status fails the test with the master's error message.
        """
        request = urllib.request.Request(
            self.api + path,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            body = error.read().decode("utf-8", "replace")
            raise AssertionError(f"POST {path} {payload} failed with {error.code}: {body}") from None

    def wait_for_api(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/status")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise AssertionError(f"master API {self.api} did not answer within {timeout} s")

    def wait_for_slaves(self, *slave_ids: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        live: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            live = self.get("/slaves")["slaves"]
            if set(slave_ids) <= {s["slave_id"] for s in live}:
                return live
            time.sleep(0.2)
        raise AssertionError(f"slaves {slave_ids} not live within {timeout} s; live: {live}")

    def stop_all(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()

    def _add(self, daemon: Daemon) -> Daemon:
        self.daemons.append(daemon)
        return daemon

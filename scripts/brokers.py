#!/usr/bin/env python3
"""Start, stop and check a private ActiveMQ Classic broker for tests and demos.

The broker runs from the configuration that taskmesh ships,
etc/activemq/activemq.xml, and keeps all its files in one scratch directory:

    DIR/instance.json     pid and STOMP port of the broker started last
    DIR/activemq.log      standard output and error of the JVM (the broker log)
    DIR/conf/             log4j.properties, written on every start
    DIR/data/             KahaDB store, kept across stop, kill and restart
    DIR/tmp/              java.io.tmpdir of the JVM

Command line:

    python3 scripts/brokers.py activemq start --dir DIR [--port N]
    python3 scripts/brokers.py activemq status --dir DIR
    python3 scripts/brokers.py activemq stop --dir DIR

From Python, for example in a pytest fixture:

    broker = ActiveMQ(tmp_path / "activemq")
    broker.start()
    ... connect to broker.host, broker.port as broker.login/broker.passcode ...
    broker.stop()

Only the standard library is used, so this file runs before the project's
virtual environment exists.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("brokers")

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
ACTIVEMQ_CONFIG = REPOSITORY_ROOT / "etc" / "activemq" / "activemq.xml"

# Paths of the Debian package "activemq".
ACTIVEMQ_HOME = Path("/usr/share/activemq")
ACTIVEMQ_JAR = ACTIVEMQ_HOME / "bin" / "activemq.jar"

LOOPBACK = "127.0.0.1"
MAX_HEAP = "512m"
STARTUP_TIMEOUT = 90.0  # seconds until the broker must accept a STOMP CONNECT
STOP_TIMEOUT = 30.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_LINES = 40
STACK_FRAME = re.compile(r"\s+(at |\.\.\. \d+ more)")
PORT_ATTEMPTS = 3  # tries with a fresh free port when the picked one was taken

# Logging for the JVM. The Debian package runs ActiveMQ with log4j 1.2 and
# ships no log4j.properties for it, so without this file the broker logs
# nothing.
LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, stdout
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c - %m%n
"""

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Loaded in the parent, because die_with_parent runs between fork and exec,
# where loading a library could deadlock on a lock held by another thread.
LIBC = ctypes.CDLL(None, use_errno=True)


class BrokerError(Exception):
    """Failure to install, start or stop a broker."""


class BrokerUnavailable(BrokerError):
    """Missing ActiveMQ or Java that this process cannot install."""


class BrokerStartError(BrokerError):
    """Failure of a started broker to accept a STOMP CONNECT in time."""


# --- Installation ---------------------------------------------------------


def install_activemq() -> None:
    """Install the Debian package "activemq" (which pulls in Java) if missing.

    Raises BrokerUnavailable when the package is missing and this process
    cannot install it (not root, or no apt-get), or when apt-get fails.
    """
    if ACTIVEMQ_JAR.exists():
        return
    if shutil.which("apt-get") is None:
        raise BrokerUnavailable(
            f"ActiveMQ is not installed ({ACTIVEMQ_JAR} not found) and apt-get is "
            f"missing: install ActiveMQ Classic 5.17 by hand"
        )
    if os.geteuid() != 0:
        raise BrokerUnavailable(
            f"ActiveMQ is not installed ({ACTIVEMQ_JAR} not found): run "
            f"'apt-get update && apt-get install -y activemq' as root"
        )

    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "activemq"]):
        log.info("running %s", " ".join(command))
        status = subprocess.run(command, env=environment, check=False).returncode
        if status != 0:
            raise BrokerUnavailable(
                f"'{' '.join(command)}' failed with exit status {status}"
            )
    if not ACTIVEMQ_JAR.exists():
        raise BrokerUnavailable(
            f"apt-get installed activemq but {ACTIVEMQ_JAR} is still missing"
        )


def find_java() -> str:
    """Return the path of the java executable, preferring $JAVA_HOME."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home, "bin", "java"), os.X_OK):
        return str(Path(java_home, "bin", "java"))
    java = shutil.which("java")
    if java is None:
        raise BrokerUnavailable(
            "java not found in $JAVA_HOME/bin or PATH: install default-jre-headless"
        )
    return java


def check_installed() -> str:
    """Return the java path, or raise BrokerUnavailable naming what is missing."""
    if not ACTIVEMQ_JAR.exists():
        raise BrokerUnavailable(
            f"ActiveMQ is not installed ({ACTIVEMQ_JAR} not found): run "
            f"'apt-get update && apt-get install -y activemq' as root"
        )
    return find_java()


# --- STOMP probe ----------------------------------------------------------


def unescape_header(value: str) -> str:
    """Decode the STOMP 1.2 header escapes \\r, \\n, \\c and \\\\."""
    replacements = {"r": "\r", "n": "\n", "c": ":", "\\": "\\"}
    result = []
    characters = iter(value)
    for character in characters:
        if character == "\\":
            escaped = next(characters, "")
            result.append(replacements.get(escaped, "\\" + escaped))
        else:
            result.append(character)
    return "".join(result)


def stomp_connect(
    host: str, port: int, login: str, passcode: str, timeout: float = 5.0
) -> tuple[str, dict[str, str]]:
    """Send a STOMP 1.2 CONNECT and return the reply's command and headers.

    The reply is CONNECTED or ERROR. Raises OSError when the connection
    fails, and ConnectionError when the peer closes it before replying.
    """
    connect_frame = (
        f"CONNECT\naccept-version:1.2\nhost:localhost\n"
        f"login:{login}\npasscode:{passcode}\n\n\0"
    ).encode()
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(connect_frame)
        received = b""
        while b"\0" not in received:
            chunk = connection.recv(4096)
            if not chunk:
                raise ConnectionError(
                    f"{host}:{port} closed the connection before replying to CONNECT"
                )
            received += chunk
        frame = received.split(b"\0", 1)[0].decode("utf-8", "replace")
        with contextlib.suppress(OSError):
            connection.sendall(b"DISCONNECT\n\n\0")

    # Leading end-of-line characters are heart-beats, not part of the frame.
    head = frame.lstrip("\r\n").split("\n\n", 1)[0]
    lines = head.replace("\r\n", "\n").split("\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        # STOMP 1.2: when a header repeats, the first value counts.
        headers.setdefault(unescape_header(name), unescape_header(value))
    return lines[0], headers


# --- Processes ------------------------------------------------------------


def pick_free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on host that nothing listens on right now.

    Another process may take the port before the broker binds it. The
    broker then exits with "Address already in use", and ActiveMQ.start
    retries with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Match the broker, which also binds with SO_REUSEADDR, so that
        # connections left in TIME_WAIT by a stopped broker do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def process_is_alive(pid: int) -> bool:
    """Return whether pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name.
    state = stat.rsplit(b")", 1)[1].split()[0]
    return state not in (b"Z", b"X")


def process_command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            raw = cmdline_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [argument.decode(errors="replace") for argument in raw.split(b"\0") if argument]


def signal_process_group(pgid: int, signal_number: int) -> None:
    try:
        os.killpg(pgid, signal_number)
    except ProcessLookupError:
        pass


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child process when its parent exits.

    Runs in the child between fork and exec. Linux sends the signal when the
    thread that forked the child exits, which for pytest is the main thread.
    """
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def read_log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last lines of the log file after byte offset.

    Java stack frames ("at ..." and "... N more") are left out, so that a
    long stack trace does not push the error message out of the tail.
    """
    try:
        with open(path, "rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log file at {path})"
    messages = [line for line in text.splitlines() if not STACK_FRAME.match(line)]
    tail = messages[-lines:]
    return "\n".join(tail) if tail else f"(log file {path} is empty)"


# --- ActiveMQ -------------------------------------------------------------


class ActiveMQ:
    """A private ActiveMQ Classic broker with a STOMP listener on loopback.

    The broker runs as the current user, straight from activemq.jar. That
    avoids the packaged launcher, which switches to the "activemq" user and
    writes /run/activemq.pid.

    Accounts, groups and the destination namespace come from the shipped
    configuration, so login, passcode and namespace must match
    etc/activemq/activemq.xml. Of the properties that the configuration
    reads, the instance sets activemq.data and taskmesh.stomp.port.
    """

    host = LOOPBACK
    login = "foo"
    passcode = "bar"
    namespace = "myapp"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        port: int | None = None,
        *,
        config: str | os.PathLike[str] = ACTIVEMQ_CONFIG,
        max_heap: str = MAX_HEAP,
        startup_timeout: float = STARTUP_TIMEOUT,
        stop_with_parent: bool = True,
    ) -> None:
        """Set up a broker instance in directory without starting it.

        port: the STOMP port. None reuses the port of the instance that last
        ran in directory, or else picks a free one.
        max_heap: the JVM's -Xmx value.
        stop_with_parent: send the broker SIGTERM when the thread that called
        start() exits, for example when a test run is killed. The command
        line turns it off so that the broker outlives "start".
        """
        self.directory = Path(directory).resolve()
        self.config = Path(config).resolve()
        self.max_heap = max_heap
        self.startup_timeout = startup_timeout
        self.stop_with_parent = stop_with_parent

        self.log_path = self.directory / "activemq.log"
        self.state_path = self.directory / "instance.json"
        self.conf_directory = self.directory / "conf"
        self.data_directory = self.directory / "data"
        self.tmp_directory = self.directory / "tmp"

        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

        saved_port = self._read_state().get("port")
        if port is not None:
            self.port = port
            self._port_is_automatic = False
        elif isinstance(saved_port, int):
            self.port = saved_port
            self._port_is_automatic = False
        else:
            self.port = pick_free_port(self.host)
            self._port_is_automatic = True

    @property
    def uri(self) -> str:
        """The STOMP address as tcp://HOST:PORT."""
        return f"tcp://{self.host}:{self.port}"

    def __enter__(self) -> "ActiveMQ":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Public operations

    def start(self) -> None:
        """Start the broker and wait until it accepts a STOMP CONNECT.

        Raises BrokerUnavailable when ActiveMQ or Java is missing, and
        BrokerStartError (with the tail of the broker log) when the broker
        does not become ready within startup_timeout seconds.
        """
        java = check_installed()
        if not self.config.is_file():
            raise BrokerUnavailable(f"ActiveMQ configuration not found: {self.config}")
        running_pid = self.pid()
        if running_pid is not None:
            raise BrokerError(
                f"an ActiveMQ broker from {self.directory} is already running "
                f"(pid {running_pid}): stop it first"
            )

        for attempt in range(1, PORT_ATTEMPTS + 1):
            if not port_is_free(self.host, self.port):
                if not self._port_is_automatic or attempt == PORT_ATTEMPTS:
                    raise BrokerStartError(
                        f"cannot start ActiveMQ: {self.host}:{self.port} is already "
                        f"in use. Choose another port."
                    )
                self.port = pick_free_port(self.host)
                continue
            try:
                self._start_once(java)
            except BrokerStartError as error:
                address_taken = "Address already in use" in str(error)
                if not (self._port_is_automatic and address_taken) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("port %d was taken before ActiveMQ bound it, retrying", self.port)
                self.port = pick_free_port(self.host)
            else:
                # Later starts must keep the port that clients know.
                self._port_is_automatic = False
                return

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after timeout seconds.

        Signals go to the broker's process group. Does nothing when the
        broker is not running. Raises BrokerError if the JVM survives SIGKILL.
        """
        pid = self.pid()
        if pid is None:
            self._forget_process()
            return
        log.info("stopping ActiveMQ (pid %d)", pid)
        signal_process_group(pid, signal.SIGTERM)
        if not self._wait_for_exit(pid, timeout):
            log.warning(
                "ActiveMQ (pid %d) did not stop within %.0f s of SIGTERM, sending SIGKILL",
                pid,
                timeout,
            )
            self._kill_group(pid)
        self._forget_process()
        log.info("stopped ActiveMQ (pid %d)", pid)

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash would. The store is kept."""
        pid = self.pid()
        if pid is None:
            self._forget_process()
            return
        log.info("killing ActiveMQ (pid %d) with SIGKILL", pid)
        self._kill_group(pid)
        self._forget_process()

    def restart(self) -> None:
        """Stop the broker if it runs, then start it on the same port and store."""
        self.stop()
        self.start()

    def pid(self) -> int | None:
        """Return the broker's pid, or None when it is not running.

        A pid from instance.json counts only while its command line contains
        -Dactivemq.base=DIRECTORY, so a reused pid is never signalled.
        """
        if self._process is not None:
            if self._process.poll() is None:
                return self._process.pid
            return None
        pid = self._read_state().get("pid")
        if not isinstance(pid, int) or not process_is_alive(pid):
            return None
        if f"-Dactivemq.base={self.directory}" not in process_command_line(pid):
            return None
        return pid

    def is_ready(self) -> bool:
        """Return whether the broker accepts a STOMP CONNECT right now."""
        try:
            command, _headers = stomp_connect(self.host, self.port, self.login, self.passcode)
        except OSError:
            return False
        return command == "CONNECTED"

    # Internals

    def _java_command(self, java: str) -> list[str]:
        return [
            java,
            f"-Xmx{self.max_heap}",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={self.tmp_directory}",
            f"-Dlog4j.configuration=file:{self.conf_directory / 'log4j.properties'}",
            f"-Dactivemq.home={ACTIVEMQ_HOME}",
            f"-Dactivemq.base={self.directory}",
            f"-Dactivemq.conf={self.conf_directory}",
            f"-Dactivemq.data={self.data_directory}",
            f"-Dtaskmesh.stomp.port={self.port}",
            "-jar",
            str(ACTIVEMQ_JAR),
            # "start" runs the broker in the foreground until SIGTERM.
            "start",
            f"xbean:file:{self.config}",
        ]

    def _start_once(self, java: str) -> None:
        for directory in (self.conf_directory, self.data_directory, self.tmp_directory):
            directory.mkdir(parents=True, exist_ok=True)
        (self.conf_directory / "log4j.properties").write_text(LOG4J_PROPERTIES)

        command = self._java_command(java)
        with open(self.log_path, "ab") as log_file:
            log_offset = log_file.tell()
            log_file.write(
                f"--- brokers.py: starting ActiveMQ on {self.host}:{self.port} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode()
            )
            log_file.flush()
            log.info("starting ActiveMQ on %s:%d, log %s", self.host, self.port, self.log_path)
            started = time.monotonic()
            self._process = subprocess.Popen(
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # A new session and process group, so stop() and kill() reach
                # the whole JVM and a Ctrl-C in the terminal does not.
                start_new_session=True,
                preexec_fn=die_with_parent if self.stop_with_parent else None,
            )
        self._write_state({"pid": self._process.pid, "port": self.port})

        try:
            self._wait_until_ready(started, log_offset)
        except BrokerStartError:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info(
            "ActiveMQ (pid %d) accepted STOMP CONNECT on %s:%d after %.1f s",
            self._process.pid,
            self.host,
            self.port,
            self.startup_seconds,
        )

    def _wait_until_ready(self, started: float, log_offset: int) -> None:
        assert self._process is not None
        deadline = started + self.startup_timeout
        while True:
            status = self._process.poll()
            if status is not None:
                self._fail_start(f"the JVM exited with status {status}", log_offset)
            try:
                command, headers = stomp_connect(
                    self.host, self.port, self.login, self.passcode
                )
            except OSError:
                # Not listening yet, or the connection dropped during startup.
                if time.monotonic() > deadline:
                    self._fail_start(
                        f"no STOMP CONNECTED within {self.startup_timeout:g} s",
                        log_offset,
                    )
                time.sleep(0.2)
                continue
            if command == "CONNECTED":
                return
            self._fail_start(
                f"CONNECT as {self.login!r} got {command}: "
                f"{headers.get('message', '(no message header)')}",
                log_offset,
            )

    def _fail_start(self, reason: str, log_offset: int) -> None:
        raise BrokerStartError(
            f"ActiveMQ failed to start on {self.host}:{self.port}: {reason}\n"
            f"Last lines of {self.log_path}:\n"
            f"{read_log_tail(self.log_path, log_offset)}"
        )

    def _wait_for_exit(self, pid: int, timeout: float) -> bool:
        if self._process is not None and self._process.pid == pid:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        # Started by another process (the command line): poll /proc.
        deadline = time.monotonic() + timeout
        while process_is_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _kill_group(self, pid: int) -> None:
        signal_process_group(pid, signal.SIGKILL)
        if not self._wait_for_exit(pid, 10.0):
            raise BrokerError(f"ActiveMQ (pid {pid}) is still running after SIGKILL")

    def _forget_process(self) -> None:
        self._process = None
        # Keep the port so that the next start reuses it.
        self._write_state({"port": self.port})

    def _read_state(self) -> dict[str, object]:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as error:
            log.warning("ignoring invalid %s: %s", self.state_path, error)
            return {}
        if not isinstance(state, dict):
            log.warning("ignoring %s: expected a JSON object", self.state_path)
            return {}
        return state

    def _write_state(self, state: dict[str, object]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state) + "\n")
        temporary.replace(self.state_path)


# --- Command line ---------------------------------------------------------


def command_start(arguments: argparse.Namespace) -> int:
    if arguments.install:
        install_activemq()
    broker = ActiveMQ(
        arguments.dir,
        arguments.port,
        startup_timeout=arguments.timeout,
        stop_with_parent=False,
    )
    broker.start()
    print(
        f"ActiveMQ is ready after {broker.startup_seconds:.1f} s: STOMP {broker.uri}, "
        f"login {broker.login}, namespace {broker.namespace}, pid {broker.pid()}, "
        f"log {broker.log_path}"
    )
    return 0


def command_stop(arguments: argparse.Namespace) -> int:
    broker = ActiveMQ(arguments.dir)
    pid = broker.pid()
    broker.stop(timeout=arguments.timeout)
    if pid is None:
        print(f"ActiveMQ from {broker.directory} was not running")
    else:
        print(f"ActiveMQ (pid {pid}) stopped")
    return 0


def command_status(arguments: argparse.Namespace) -> int:
    """Print the state. Exit status: 0 ready, 1 running but not ready, 3 stopped."""
    broker = ActiveMQ(arguments.dir)
    pid = broker.pid()
    if pid is None:
        print(f"ActiveMQ from {broker.directory} is not running")
        return 3
    if broker.is_ready():
        print(f"ActiveMQ (pid {pid}) is running and accepts STOMP on {broker.uri}")
        return 0
    print(
        f"ActiveMQ (pid {pid}) is running but rejects or does not answer STOMP "
        f"CONNECT on {broker.uri}; see {broker.log_path}"
    )
    return 1


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Manage a private ActiveMQ Classic broker for taskmesh tests and demos."
    )
    brokers = parser.add_subparsers(dest="broker", required=True, metavar="BROKER")
    activemq = brokers.add_parser("activemq", help="ActiveMQ Classic from the Debian package")
    actions = activemq.add_subparsers(dest="action", required=True, metavar="ACTION")

    start = actions.add_parser(
        "start", help="install ActiveMQ if missing, start it and wait for STOMP"
    )
    start.add_argument(
        "--port",
        type=int,
        help="STOMP port on 127.0.0.1 (default: the instance's previous port, else a free one)",
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=STARTUP_TIMEOUT,
        help="seconds to wait for a STOMP CONNECTED frame (default: %(default)s)",
    )
    start.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="fail instead of running apt-get when ActiveMQ is missing",
    )
    start.set_defaults(handler=command_start)

    stop = actions.add_parser("stop", help="stop the broker (SIGTERM, then SIGKILL)")
    stop.add_argument(
        "--timeout",
        type=float,
        default=STOP_TIMEOUT,
        help="seconds between SIGTERM and SIGKILL (default: %(default)s)",
    )
    stop.set_defaults(handler=command_stop)

    status = actions.add_parser(
        "status", help="exit 0 if the broker accepts STOMP, 1 if not, 3 if stopped"
    )
    status.set_defaults(handler=command_status)

    for action in (start, stop, status):
        action.add_argument(
            "--dir", required=True, type=Path, help="instance directory (created if missing)"
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="brokers: %(message)s")
    arguments = parse_arguments(argv)
    try:
        status: int = arguments.handler(arguments)
    except BrokerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())

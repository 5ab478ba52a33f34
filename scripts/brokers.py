#!/usr/bin/env python3
"""Start, stop and check private STOMP brokers for tests and demos.

Two brokers are supported: ActiveMQ Classic (class ActiveMQ) and RabbitMQ
with its STOMP plugin (class RabbitMQ). Both classes have the same API.

The ActiveMQ broker runs from the configuration that taskmesh ships,
etc/activemq/activemq.xml, and keeps all its files in one scratch directory:

    DIR/instance.json     pid and STOMP ports of the broker started last
    DIR/activemq.log      standard output and error of the JVM (the broker log)
    DIR/conf/             log4j.properties, and with TLS the key store
                          password in taskmesh-tls.properties, written on
                          every start
    DIR/data/             KahaDB store, kept across stop, kill and restart
    DIR/tmp/              java.io.tmpdir of the JVM

The RabbitMQ broker is a private node, separate from any system node, that
runs from etc/rabbitmq/rabbitmq.conf and etc/rabbitmq/enabled_plugins:

    DIR/instance.json     node name, pids and ports of the node started last
    DIR/rabbitmq.log      output of the node and of its epmd (the broker log)
    DIR/conf/             rabbitmq.conf with test ports, written on every start
    DIR/home/             $HOME of the node, with its .erlang.cookie
    DIR/mnesia/           node database and message stores, kept across
                          stop, kill and restart

Command line (BROKER is activemq or rabbitmq):

    python3 scripts/brokers.py BROKER start --dir DIR [--port N]
    python3 scripts/brokers.py BROKER status --dir DIR
    python3 scripts/brokers.py BROKER stop --dir DIR

From Python, for example in a pytest fixture:

    broker = ActiveMQ(tmp_path / "activemq")   # or RabbitMQ(...)
    broker.start()
    ... connect to broker.host, broker.port as broker.login/broker.passcode ...
    broker.stop()

ActiveMQ(..., tls_keystore=PKCS12_FILE, tls_keystore_password=PASSWORD) also
accepts STOMP over TLS on broker.ssl_uri. The command line has no TLS option.

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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

log = logging.getLogger("brokers")

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
ACTIVEMQ_CONFIG = REPOSITORY_ROOT / "etc" / "activemq" / "activemq.xml"
# activemq.xml plus a STOMP listener with TLS, for brokers with a key store.
ACTIVEMQ_TLS_CONFIG = REPOSITORY_ROOT / "etc" / "activemq" / "activemq-tls.xml"
# Read by activemq-tls.xml from the instance's conf directory.
ACTIVEMQ_TLS_PROPERTIES = "taskmesh-tls.properties"

# Paths of the Debian package "activemq".
ACTIVEMQ_HOME = Path("/usr/share/activemq")
ACTIVEMQ_JAR = ACTIVEMQ_HOME / "bin" / "activemq.jar"

RABBITMQ_CONFIG_DIRECTORY = REPOSITORY_ROOT / "etc" / "rabbitmq"

# Paths of the Debian package "rabbitmq-server". The scripts in /usr/sbin are
# wrappers that switch to the "rabbitmq" user and its home directory, which
# contains the system node's Erlang cookie, so the private node calls the real
# scripts directly.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_SERVER = RABBITMQ_BIN / "rabbitmq-server"
RABBITMQCTL = RABBITMQ_BIN / "rabbitmqctl"
RABBITMQCTL_TIMEOUT = 60.0  # seconds for one rabbitmqctl command
EPMD_TIMEOUT = 10.0  # seconds until the private epmd must listen

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


def install_debian_package(
    package: str, installed_file: Path, name: str, release: str
) -> None:
    """Install a Debian package with apt-get unless installed_file exists.

    name is the broker's name in messages, and release what to install by
    hand where apt-get is missing.

    Raises BrokerUnavailable when the package is missing and this process
    cannot install it (not root, or no apt-get), or when apt-get fails.
    """
    if installed_file.exists():
        return
    if shutil.which("apt-get") is None:
        raise BrokerUnavailable(
            f"{name} is not installed ({installed_file} not found) and "
            f"apt-get is missing: install {release} by hand"
        )
    if os.geteuid() != 0:
        raise BrokerUnavailable(
            f"{name} is not installed ({installed_file} not found): run "
            f"'apt-get update && apt-get install -y {package}' as root"
        )

    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", package]):
        log.info("running %s", " ".join(command))
        status = subprocess.run(command, env=environment, check=False).returncode
        if status != 0:
            raise BrokerUnavailable(
                f"'{' '.join(command)}' failed with exit status {status}"
            )
    if not installed_file.exists():
        raise BrokerUnavailable(
            f"apt-get installed {package} but {installed_file} is still missing"
        )


def install_activemq() -> None:
    """Install the Debian package "activemq" (which pulls in Java) if missing.

    Raises BrokerUnavailable when the package is missing and this process
    cannot install it (not root, or no apt-get), or when apt-get fails.
    """
    install_debian_package("activemq", ACTIVEMQ_JAR, "ActiveMQ", "ActiveMQ Classic 5.17")


def install_rabbitmq() -> None:
    """Install the Debian package "rabbitmq-server" (which pulls in Erlang) if missing.

    Raises BrokerUnavailable like install_activemq.
    """
    # NOTE: the package's postinst starts the system node through
    # invoke-rc.d unless a policy-rc.d forbids it. That node uses the
    # package's ports (AMQP 5672, distribution 25672), not the private node's.
    install_debian_package("rabbitmq-server", RABBITMQ_SERVER, "RabbitMQ", "RabbitMQ 3.10")


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


def check_rabbitmq_installed() -> str:
    """Return the epmd path, or raise BrokerUnavailable naming what is missing."""
    for required in (RABBITMQ_SERVER, RABBITMQCTL):
        if not os.access(required, os.X_OK):
            raise BrokerUnavailable(
                f"RabbitMQ is not installed ({required} not found): run "
                f"'apt-get update && apt-get install -y rabbitmq-server' as root"
            )
    # epmd, the Erlang port mapper, comes with the package erlang-base.
    epmd = shutil.which("epmd")
    if epmd is None:
        raise BrokerUnavailable("epmd not found in PATH: install erlang-base")
    return epmd


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
    host: str,
    port: int,
    login: str,
    passcode: str,
    timeout: float = 5.0,
    *,
    vhost: str = "localhost",
) -> tuple[str, dict[str, str]]:
    """Send a STOMP 1.2 CONNECT and return the reply's command and headers.

    vhost is the CONNECT "host" header, which RabbitMQ uses as the virtual
    host. The reply is CONNECTED or ERROR. Raises OSError when the connection
    fails, and ConnectionError when the peer closes it before replying.
    """
    connect_frame = (
        f"CONNECT\naccept-version:1.2\nhost:{vhost}\n"
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


def java_properties_value(value: str) -> str:
    """Escape value for a Java .properties file written in ISO 8859-1.

    Backslashes, a leading space and control characters are escaped, and characters
    outside ISO 8859-1 become \\uXXXX escapes (UTF-16 code units).
    """
    escaped = []
    for index, character in enumerate(value):
        if character == "\\":
            escaped.append("\\\\")
        elif character == " " and index == 0:
            escaped.append("\\ ")
        elif character in "\n\r\t\f":
            escaped.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f"}[character])
        elif ord(character) > 0xFF:
            encoded = character.encode("utf-16-be")
            for offset in range(0, len(encoded), 2):
                escaped.append(f"\\u{int.from_bytes(encoded[offset:offset + 2], 'big'):04x}")
        else:
            escaped.append(character)
    return "".join(escaped)


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


def process_environment(pid: int) -> dict[str, str]:
    """Return the environment that pid was started with, or {} if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ_file:
            raw = environ_file.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    environment = {}
    for entry in raw.split(b"\0"):
        name, separator, value = entry.decode(errors="replace").partition("=")
        if separator:
            environment[name] = value
    return environment


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


def read_state_file(path: Path) -> dict[str, object]:
    """Return the JSON object in path, or {} when it is missing or invalid."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as error:
        log.warning("ignoring invalid %s: %s", path, error)
        return {}
    if not isinstance(state, dict):
        log.warning("ignoring %s: expected a JSON object", path)
        return {}
    return state


def write_state_file(path: Path, state: dict[str, object]) -> None:
    """Replace path with state as JSON, atomically, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state) + "\n")
    temporary.replace(path)


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

    With tls_keystore, the broker runs from etc/activemq/activemq-tls.xml
    and also accepts STOMP over TLS on ssl_port (ssl_uri). The instance then
    sets taskmesh.stomp.ssl.port and taskmesh.ssl.keystore, and writes the
    key store password to DIR/conf/taskmesh-tls.properties.
    """

    kind = "activemq"
    host = LOOPBACK
    login = "foo"
    passcode = "bar"
    namespace = "myapp"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        port: int | None = None,
        *,
        config: str | os.PathLike[str] | None = None,
        max_heap: str = MAX_HEAP,
        startup_timeout: float = STARTUP_TIMEOUT,
        stop_with_parent: bool = True,
        tls_keystore: str | os.PathLike[str] | None = None,
        tls_keystore_password: str | None = None,
        ssl_port: int | None = None,
    ) -> None:
        """Set up a broker instance in directory without starting it.

        port: the STOMP port. None reuses the port of the instance that last
        ran in directory, or else picks a free one.
        config: the broker configuration. None means ACTIVEMQ_CONFIG, or
        ACTIVEMQ_TLS_CONFIG when tls_keystore is set.
        max_heap: the JVM's -Xmx value.
        stop_with_parent: send the broker SIGTERM when the thread that called
        start() exits, for example when a test run is killed. The command
        line turns it off so that the broker outlives "start".
        tls_keystore: a PKCS#12 key store with the broker's private key and
        certificate, which turns on the STOMP over TLS listener.
        tls_keystore_password: the key store's password, required with
        tls_keystore.
        ssl_port: the STOMP over TLS port, chosen like port.
        """
        if tls_keystore is not None and tls_keystore_password is None:
            raise ValueError("tls_keystore needs tls_keystore_password")
        if config is None:
            config = ACTIVEMQ_CONFIG if tls_keystore is None else ACTIVEMQ_TLS_CONFIG
        self.directory = Path(directory).resolve()
        self.config = Path(config).resolve()
        self.tls_keystore = None if tls_keystore is None else Path(tls_keystore).resolve()
        self.tls_keystore_password = tls_keystore_password
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

        saved_ssl_port = self._read_state().get("ssl_port")
        self.ssl_port: int | None = None
        self._ssl_port_is_automatic = False
        if self.tls_keystore is None:
            pass
        elif ssl_port is not None:
            self.ssl_port = ssl_port
        elif isinstance(saved_ssl_port, int):
            self.ssl_port = saved_ssl_port
        else:
            self.ssl_port = pick_free_port(self.host)
            self._ssl_port_is_automatic = True

    @property
    def uri(self) -> str:
        """The STOMP address as tcp://HOST:PORT."""
        return f"tcp://{self.host}:{self.port}"

    @property
    def ssl_uri(self) -> str:
        """The STOMP over TLS address as ssl://HOST:SSL_PORT.

        Raises BrokerError when the instance has no tls_keystore.
        """
        if self.ssl_port is None:
            raise BrokerError(
                f"the ActiveMQ instance in {self.directory} has no TLS listener: "
                "create it with tls_keystore"
            )
        return f"ssl://{self.host}:{self.ssl_port}"

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
        if self.tls_keystore is not None and not self.tls_keystore.is_file():
            raise BrokerError(f"ActiveMQ TLS key store not found: {self.tls_keystore}")
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
            if self.ssl_port is not None and not port_is_free(self.host, self.ssl_port):
                if not self._ssl_port_is_automatic or attempt == PORT_ATTEMPTS:
                    raise BrokerStartError(
                        f"cannot start ActiveMQ: the TLS port {self.host}:{self.ssl_port} "
                        f"is already in use. Choose another port."
                    )
                self.ssl_port = pick_free_port(self.host)
                continue
            try:
                self._start_once(java)
            except BrokerStartError as error:
                address_taken = "Address already in use" in str(error)
                automatic = self._port_is_automatic or self._ssl_port_is_automatic
                if not (automatic and address_taken) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("a port was taken before ActiveMQ bound it, retrying")
                if self._port_is_automatic:
                    self.port = pick_free_port(self.host)
                if self._ssl_port_is_automatic:
                    self.ssl_port = pick_free_port(self.host)
            else:
                # Later starts must keep the ports that clients know.
                self._port_is_automatic = False
                self._ssl_port_is_automatic = False
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
            *self._tls_options(),
            "-jar",
            str(ACTIVEMQ_JAR),
            # "start" runs the broker in the foreground until SIGTERM.
            "start",
            f"xbean:file:{self.config}",
        ]

    def _tls_options(self) -> list[str]:
        if self.tls_keystore is None:
            return []
        return [
            f"-Dtaskmesh.stomp.ssl.port={self.ssl_port}",
            f"-Dtaskmesh.ssl.keystore={self.tls_keystore}",
        ]

    def _write_tls_properties(self) -> None:
        """Write the key store password where activemq-tls.xml reads it.

        The file, unlike a java -D option, is not visible to other users.
        """
        path = self.conf_directory / ACTIVEMQ_TLS_PROPERTIES
        if self.tls_keystore_password is None:
            path.unlink(missing_ok=True)
            return
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="latin-1") as properties_file:
            properties_file.write(
                "taskmesh.ssl.keystore.password="
                f"{java_properties_value(self.tls_keystore_password)}\n"
            )

    def _start_once(self, java: str) -> None:
        for directory in (self.conf_directory, self.data_directory, self.tmp_directory):
            directory.mkdir(parents=True, exist_ok=True)
        (self.conf_directory / "log4j.properties").write_text(LOG4J_PROPERTIES)
        self._write_tls_properties()

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
        self._write_state({"pid": self._process.pid, **self._ports()})

        try:
            self._wait_until_ready(started, log_offset)
        except BrokerStartError:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info(
            "ActiveMQ (pid %d) accepted STOMP CONNECT on %s:%d after %.1f s%s",
            self._process.pid,
            self.host,
            self.port,
            self.startup_seconds,
            "" if self.ssl_port is None else f", STOMP over TLS on port {self.ssl_port}",
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
                self._wait_for_tls_listener(deadline, log_offset)
                return
            self._fail_start(
                f"CONNECT as {self.login!r} got {command}: "
                f"{headers.get('message', '(no message header)')}",
                log_offset,
            )

    def _wait_for_tls_listener(self, deadline: float, log_offset: int) -> None:
        """Wait until the TLS port accepts TCP connections.

        The probe does no TLS handshake, because this module has no CA to
        verify the broker with. The tests check the handshake.
        """
        assert self._process is not None
        if self.ssl_port is None:
            return
        while True:
            try:
                socket.create_connection((self.host, self.ssl_port), timeout=5.0).close()
            except OSError:
                status = self._process.poll()
                if status is not None:
                    self._fail_start(f"the JVM exited with status {status}", log_offset)
                if time.monotonic() > deadline:
                    self._fail_start(
                        f"no TLS listener on port {self.ssl_port} within "
                        f"{self.startup_timeout:g} s",
                        log_offset,
                    )
                time.sleep(0.2)
                continue
            return

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
        # Keep the ports so that the next start reuses them.
        self._write_state(self._ports())

    def _ports(self) -> dict[str, object]:
        ports: dict[str, object] = {"port": self.port}
        if self.ssl_port is not None:
            ports["ssl_port"] = self.ssl_port
        return ports

    def _read_state(self) -> dict[str, object]:
        return read_state_file(self.state_path)

    def _write_state(self, state: dict[str, object]) -> None:
        write_state_file(self.state_path, state)


# --- RabbitMQ -------------------------------------------------------------

# Characters that RabbitMQ 3.10 does not support in its data and plugin paths
# on Unix (see "File and Directory Locations" in RabbitMQ's documentation).
RABBITMQ_UNSUPPORTED_PATH_CHARACTERS = frozenset("*?^![]{}")

# The keys of etc/rabbitmq/rabbitmq.conf that the private node replaces.
AMQP_LISTENER_KEY = "listeners.tcp.1"
STOMP_LISTENER_KEY = "stomp.listeners.tcp.1"

# Restrict the Erlang distribution listeners of the node and of rabbitmqctl
# to loopback. Without it they listen on every interface.
LOOPBACK_DISTRIBUTION_ARGUMENTS = "-kernel inet_dist_use_interface {127,0,0,1}"


def render_rabbitmq_conf(text: str, settings: dict[str, str], source: Path) -> str:
    """Return the rabbitmq.conf text with the values of settings' keys replaced.

    Every key must be set on exactly one uncommented line of text, so that
    the node never silently keeps the shipped port. Raises BrokerUnavailable
    naming source otherwise.
    """
    lines = text.splitlines(keepends=True)
    counts = dict.fromkeys(settings, 0)
    for index, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            continue
        key, separator, _value = line.partition("=")
        key = key.strip()
        if separator and key in settings:
            lines[index] = f"{key} = {settings[key]}\n"
            counts[key] += 1
    for key, count in counts.items():
        if count != 1:
            raise BrokerUnavailable(
                f"{source} must set {key} on exactly one line, found {count}"
            )
    return "".join(lines)


def rabbitmq_permissions(namespace: str) -> tuple[str, str, str]:
    """Return the configure, write and read patterns for rabbitmqctl set_permissions.

    They allow the STOMP destinations /queue/NAMESPACE.* and topic
    subscriptions, whose routing keys rabbitmq_topic_pattern limits.
    etc/rabbitmq/rabbitmq.conf explains each part, and why write on
    amq.default also reaches other existing queues.
    """
    prefix = namespace.replace(".", r"\.")
    subscription_queues = "stomp-subscription-.*"
    configure = rf"^({prefix}\..*|{subscription_queues})$"
    write = rf"^({subscription_queues}|amq\.default|amq\.topic)$"
    read = rf"^({prefix}\..*|{subscription_queues}|amq\.topic)$"
    return configure, write, read


def rabbitmq_topic_pattern(namespace: str) -> str:
    """Return the routing-key pattern for rabbitmqctl set_topic_permissions."""
    return "^" + namespace.replace(".", r"\.") + r"\."


def epmd_list_names(host: str, port: int, timeout: float = 1.0) -> bytes:
    """Send epmd's NAMES_REQ and return the reply: epmd's port, then one line per node.

    Raises OSError when epmd does not listen or closes the connection early.
    """
    with socket.create_connection((host, port), timeout=timeout) as connection:
        # Request: 2-byte big-endian length, then the request code 110 ("n").
        connection.sendall(b"\x00\x01n")
        reply = b""
        while True:
            chunk = connection.recv(4096)
            if not chunk:
                break
            reply += chunk
    if len(reply) < 4:
        raise ConnectionError(f"epmd on {host}:{port} sent a short reply: {reply!r}")
    return reply


def read_stat_fields(path: str) -> list[bytes]:
    """Return the fields of a /proc stat file after the command name, or [] if it is gone.

    The fields start with the state letter, the parent pid and the process
    group id.
    """
    try:
        with open(path, "rb") as stat_file:
            stat = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return stat.rsplit(b")", 1)[1].split()


def process_group_members(pgid: int) -> list[int]:
    """Return the pids of the processes in group pgid that have a running thread.

    A killed multi-threaded process shows the zombie state as soon as its
    main thread has exited, while other threads may still hold its files
    and sockets, so every thread is checked.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = read_stat_fields(f"/proc/{entry}/stat")
        if not fields or int(fields[2]) != pgid:
            continue
        try:
            threads = os.listdir(f"/proc/{entry}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for thread in threads:
            thread_fields = read_stat_fields(f"/proc/{entry}/task/{thread}/stat")
            if thread_fields and thread_fields[0] not in (b"Z", b"X"):
                members.append(int(entry))
                break
    return members


def wait_for_exit(process: subprocess.Popen[bytes] | None, pid: int, timeout: float) -> bool:
    """Wait until pid and the rest of its process group exit.

    Returns False if a process still runs after timeout seconds. process is
    the Popen object when this process started pid, so that the child is
    reaped. pid must lead its process group. Waiting for the whole group
    matters because the Erlang VM, a child of the rabbitmq-server script,
    may still hold the listening sockets after the script has exited.
    """
    deadline = time.monotonic() + timeout
    if process is not None and process.pid == pid:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
    while process_is_alive(pid) or process_group_members(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class RabbitMQ:
    """A private RabbitMQ node with the STOMP plugin, listening on loopback.

    The node runs as the current user with its own node name, Erlang cookie,
    epmd, data directory and ports, so it never talks to the system node
    that the Debian package starts. Its configuration is the shipped
    etc/rabbitmq/rabbitmq.conf with only the two listener addresses replaced,
    and the shipped etc/rabbitmq/enabled_plugins.

    After each boot, start() runs rabbitmqctl to create the account
    login/passcode with permissions limited to the namespace, and to delete
    the default "guest" account, the steps that etc/rabbitmq/rabbitmq.conf
    describes for operators.
    """

    kind = "rabbitmq"
    host = LOOPBACK
    login = "foo"
    passcode = "bar"
    namespace = "myapp"
    vhost = "/"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        port: int | None = None,
        *,
        config_directory: str | os.PathLike[str] = RABBITMQ_CONFIG_DIRECTORY,
        startup_timeout: float = STARTUP_TIMEOUT,
        stop_with_parent: bool = True,
    ) -> None:
        """Set up a node in directory without starting it.

        port: the STOMP port. None reuses the port of the node that last ran
        in directory, or else picks a free one.
        config_directory: the directory that contains rabbitmq.conf and
        enabled_plugins.
        stop_with_parent: send the node and its epmd SIGTERM when the thread
        that called start() exits. The command line turns it off so that the
        node outlives "start".
        """
        self.directory = Path(directory).resolve()
        self.config_directory = Path(config_directory).resolve()
        self.startup_timeout = startup_timeout
        self.stop_with_parent = stop_with_parent

        self.log_path = self.directory / "rabbitmq.log"
        self.state_path = self.directory / "instance.json"
        self.conf_directory = self.directory / "conf"
        self.home_directory = self.directory / "home"
        self.mnesia_directory = self.directory / "mnesia"
        self.log_directory = self.directory / "log"

        self.startup_seconds: float | None = None
        self._server_process: subprocess.Popen[bytes] | None = None
        self._epmd_process: subprocess.Popen[bytes] | None = None

        state = self._read_state()
        # The node name must stay the same across restarts, because the
        # node's database lives in mnesia/NODE.
        saved_node = state.get("node")
        self.node = (
            saved_node if isinstance(saved_node, str) else f"taskmesh-test-{os.getpid()}@localhost"
        )
        saved_port = state.get("port")
        if port is not None:
            self.port = port
            self._port_is_automatic = False
        elif isinstance(saved_port, int):
            self.port = saved_port
            self._port_is_automatic = False
        else:
            self.port = pick_free_port(self.host)
            self._port_is_automatic = True

        # Internal ports, picked again on every start.
        self.amqp_port: int | None = None
        self.distribution_port: int | None = None
        self.epmd_port: int | None = self._saved_int(state, "epmd_port")

    @property
    def uri(self) -> str:
        """The STOMP address as tcp://HOST:PORT."""
        return f"tcp://{self.host}:{self.port}"

    def __enter__(self) -> "RabbitMQ":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Public operations

    def start(self) -> None:
        """Start the node and wait until it accepts a STOMP CONNECT as login.

        Raises BrokerUnavailable when RabbitMQ or the shipped configuration
        is missing, and BrokerStartError (with the tail of the node's log)
        when the node does not become ready within startup_timeout seconds.
        """
        epmd = check_rabbitmq_installed()
        for shipped in ("rabbitmq.conf", "enabled_plugins"):
            if not (self.config_directory / shipped).is_file():
                raise BrokerUnavailable(
                    f"RabbitMQ configuration not found: {self.config_directory / shipped}"
                )
        unsupported = RABBITMQ_UNSUPPORTED_PATH_CHARACTERS.intersection(str(self.directory))
        if unsupported:
            raise BrokerStartError(
                f"cannot start RabbitMQ in {self.directory}: RabbitMQ does not support "
                f"the characters {''.join(sorted(unsupported))} in its paths. "
                f"Choose another directory."
            )
        running_pid = self.pid()
        if running_pid is not None:
            raise BrokerError(
                f"a RabbitMQ node from {self.directory} is already running "
                f"(pid {running_pid}): stop it first"
            )
        # An epmd left by a node that crashed before its epmd was stopped.
        self._stop_epmd()

        for attempt in range(1, PORT_ATTEMPTS + 1):
            if not port_is_free(self.host, self.port):
                if not self._port_is_automatic or attempt == PORT_ATTEMPTS:
                    raise BrokerStartError(
                        f"cannot start RabbitMQ: {self.host}:{self.port} is already "
                        f"in use. Choose another port."
                    )
                self.port = pick_free_port(self.host)
                continue
            try:
                self._start_once(epmd)
            except BrokerStartError as error:
                # Each attempt picks new internal ports, so retry when one of
                # them, or an automatic STOMP port, was taken between picking
                # and binding.
                if "eaddrinuse" not in str(error) or attempt == PORT_ATTEMPTS:
                    raise
                if not self._port_is_automatic and not port_is_free(self.host, self.port):
                    raise
                log.warning("a port was taken before RabbitMQ bound it, retrying")
                if self._port_is_automatic:
                    self.port = pick_free_port(self.host)
            else:
                # Later starts must keep the port that clients know.
                self._port_is_automatic = False
                return

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the node: SIGTERM, then SIGKILL after timeout seconds.

        Signals go to the node's process group (the rabbitmq-server script
        and the Erlang VM). Its private epmd is stopped afterwards. Does
        nothing when the node is not running. Raises BrokerError if a process
        survives SIGKILL.
        """
        pid = self.pid()
        if pid is not None:
            log.info("stopping RabbitMQ node %s (pid %d)", self.node, pid)
            signal_process_group(pid, signal.SIGTERM)
            if not wait_for_exit(self._server_process, pid, timeout):
                log.warning(
                    "RabbitMQ (pid %d) did not stop within %.0f s of SIGTERM, sending SIGKILL",
                    pid,
                    timeout,
                )
                self._kill_group(self._server_process, pid, "RabbitMQ")
            log.info("stopped RabbitMQ node %s (pid %d)", self.node, pid)
        self._stop_epmd()
        self._forget_processes()

    def kill(self) -> None:
        """Kill the node's process group and its epmd with SIGKILL, as a crash would.

        The node's database and persistent messages are kept.
        """
        pid = self.pid()
        if pid is not None:
            log.info("killing RabbitMQ node %s (pid %d) with SIGKILL", self.node, pid)
            self._kill_group(self._server_process, pid, "RabbitMQ")
        epmd_pid = self._epmd_pid()
        if epmd_pid is not None:
            self._kill_group(self._epmd_process, epmd_pid, "epmd")
        self._forget_processes()

    def restart(self) -> None:
        """Stop the node if it runs, then start it on the same STOMP port and database."""
        self.stop()
        self.start()

    def pid(self) -> int | None:
        """Return the pid of the node's rabbitmq-server script, or None when it is not running.

        The script leads the process group of the node. A pid from
        instance.json counts only while the process was started for this
        directory, so a reused pid is never signalled.
        """
        return self._live_pid(self._server_process, "server_pid")

    def is_ready(self) -> bool:
        """Return whether the node accepts a STOMP CONNECT as login right now."""
        try:
            command, _headers = stomp_connect(
                self.host, self.port, self.login, self.passcode, vhost=self.vhost
            )
        except OSError:
            return False
        return command == "CONNECTED"

    def rabbitmqctl(self, *arguments: str, input_text: str | None = None) -> str:
        """Run rabbitmqctl against this node and return its standard output.

        For example rabbitmqctl("list_queues", "name", "messages"). Raises
        BrokerError when the command fails or times out.
        """
        if self.epmd_port is None:
            raise BrokerError(f"RabbitMQ node {self.node} has not been started")
        command = [str(RABBITMQCTL), "-n", self.node, *arguments]
        try:
            result = subprocess.run(
                command,
                cwd=self.directory,
                env=self._environment(),
                input=input_text,
                capture_output=True,
                text=True,
                timeout=RABBITMQCTL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise BrokerError(
                f"'rabbitmqctl {' '.join(arguments)}' timed out after {RABBITMQCTL_TIMEOUT:g} s"
            ) from error
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip() or "(no output)"
            raise BrokerError(
                f"'rabbitmqctl {' '.join(arguments)}' failed with exit status "
                f"{result.returncode}: {output}"
            )
        return result.stdout

    # Internals

    def _environment(self) -> dict[str, str]:
        """Return the environment of the node, its epmd and rabbitmqctl.

        RabbitMQ and Erlang variables of the caller are left out, so that
        nothing from the caller's environment or from /etc/rabbitmq reaches
        the private node.
        """
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("RABBITMQ_", "ERL_"))
        }
        environment.update(
            {
                # Erlang reads and creates the cookie in $HOME/.erlang.cookie.
                "HOME": str(self.home_directory),
                "RABBITMQ_NODENAME": self.node,
                # An empty file in place of /etc/rabbitmq/rabbitmq-env.conf,
                # which names the system node.
                "RABBITMQ_CONF_ENV_FILE": str(self.conf_directory / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.conf_directory / "rabbitmq.conf"),
                "RABBITMQ_CONFIG_FILES": str(self.conf_directory / "conf.d"),
                # Not created, so the node has no advanced configuration.
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.conf_directory / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.conf_directory / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(self.mnesia_directory),
                "RABBITMQ_LOG_BASE": str(self.log_directory),
                # "-" sends the node's log to standard output, which goes to log_path.
                "RABBITMQ_LOGS": "-",
                "ERL_EPMD_ADDRESS": LOOPBACK,
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DISTRIBUTION_ARGUMENTS,
                "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DISTRIBUTION_ARGUMENTS,
                # Marks the processes of this node for pid().
                "TASKMESH_RABBITMQ_DIRECTORY": str(self.directory),
            }
        )
        if self.distribution_port is not None:
            environment["RABBITMQ_DIST_PORT"] = str(self.distribution_port)
        return environment

    def _pick_internal_ports(self) -> None:
        """Pick free AMQP, distribution and epmd ports, distinct from the STOMP port."""
        taken = {self.port}
        picked: list[int] = []
        while len(picked) < 3:
            port = pick_free_port(self.host)
            if port not in taken:
                taken.add(port)
                picked.append(port)
        self.amqp_port, self.distribution_port, self.epmd_port = picked

    def _write_configuration(self) -> None:
        for directory in (
            self.conf_directory / "conf.d",
            self.home_directory,
            self.mnesia_directory,
            self.log_directory,
        ):
            directory.mkdir(parents=True, exist_ok=True)

        shipped_conf = self.config_directory / "rabbitmq.conf"
        conf = render_rabbitmq_conf(
            shipped_conf.read_text(),
            {
                AMQP_LISTENER_KEY: f"{self.host}:{self.amqp_port}",
                STOMP_LISTENER_KEY: f"{self.host}:{self.port}",
            },
            shipped_conf,
        )
        (self.conf_directory / "rabbitmq.conf").write_text(conf)
        shutil.copyfile(
            self.config_directory / "enabled_plugins", self.conf_directory / "enabled_plugins"
        )
        (self.conf_directory / "rabbitmq-env.conf").write_text("")

        cookie_path = self.home_directory / ".erlang.cookie"
        if not cookie_path.exists():
            # Erlang rejects a cookie file that others can read.
            descriptor = os.open(cookie_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(descriptor, "w") as cookie_file:
                cookie_file.write(secrets.token_hex(20))

    def _start_once(self, epmd: str) -> None:
        self._pick_internal_ports()
        self._write_configuration()
        environment = self._environment()
        preexec = die_with_parent if self.stop_with_parent else None

        with open(self.log_path, "ab") as log_file:
            log_offset = log_file.tell()
            log_file.write(
                f"--- brokers.py: starting RabbitMQ node {self.node} with STOMP on "
                f"{self.host}:{self.port} at {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode()
            )
            log_file.flush()
            log.info(
                "starting RabbitMQ node %s on %s:%d, log %s",
                self.node,
                self.host,
                self.port,
                self.log_path,
            )
            started = time.monotonic()
            # A private epmd, in the foreground so that stop() and kill()
            # can end it. Without one, the node would start a shared
            # "epmd -daemon" that outlives it.
            self._epmd_process = subprocess.Popen(
                [epmd, "-port", str(self.epmd_port), "-address", LOOPBACK],
                cwd=self.directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
            self._write_state()
            try:
                self._wait_for_epmd(log_offset)
            except BrokerStartError:
                self.kill()
                raise
            self._server_process = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                cwd=self.directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # A new session and process group, so stop() and kill() reach
                # the script and the Erlang VM, and a Ctrl-C in the terminal
                # does not.
                start_new_session=True,
                preexec_fn=preexec,
            )
        self._write_state()

        deadline = started + self.startup_timeout
        try:
            self._wait_for_listener(deadline, log_offset)
            booted = time.monotonic()
            self._set_up_accounts(log_offset)
            self._wait_until_ready(deadline, log_offset)
        except BrokerStartError:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info(
            "RabbitMQ node %s (pid %d) accepted STOMP CONNECT on %s:%d after %.1f s "
            "(boot %.1f s, account setup %.1f s)",
            self.node,
            self._server_process.pid,
            self.host,
            self.port,
            self.startup_seconds,
            booted - started,
            self.startup_seconds - (booted - started),
        )

    def _wait_for_epmd(self, log_offset: int) -> None:
        assert self._epmd_process is not None and self.epmd_port is not None
        deadline = time.monotonic() + EPMD_TIMEOUT
        while True:
            status = self._epmd_process.poll()
            if status is not None:
                self._fail_start(f"epmd exited with status {status}", log_offset)
            try:
                epmd_list_names(self.host, self.epmd_port)
            except OSError:
                if time.monotonic() > deadline:
                    self._fail_start(
                        f"epmd did not listen on port {self.epmd_port} "
                        f"within {EPMD_TIMEOUT:g} s",
                        log_offset,
                    )
                time.sleep(0.05)
                continue
            return

    def _wait_for_listener(self, deadline: float, log_offset: int) -> None:
        """Wait until the STOMP port replies to a CONNECT with any STOMP frame.

        The STOMP listener starts at the end of the node's boot, after the
        user database is available to rabbitmqctl. On the first boot the
        reply is an ERROR, because the account does not exist yet.
        """
        assert self._server_process is not None
        while True:
            status = self._server_process.poll()
            if status is not None:
                self._fail_start(
                    f"the node exited during boot (rabbitmq-server exit status {status})",
                    log_offset,
                )
            try:
                stomp_connect(
                    self.host, self.port, self.login, self.passcode, vhost=self.vhost
                )
            except OSError:
                if time.monotonic() > deadline:
                    self._fail_start(
                        f"no STOMP listener within {self.startup_timeout:g} s", log_offset
                    )
                time.sleep(0.2)
                continue
            return

    def _set_up_accounts(self, log_offset: int) -> None:
        """Create the login account with namespace permissions and delete "guest".

        Runs on every start. An existing account keeps its password, and its
        permissions are set again.
        """
        configure, write, read = rabbitmq_permissions(self.namespace)
        topic = rabbitmq_topic_pattern(self.namespace)
        try:
            users = {
                line.split("\t", 1)[0]
                for line in self.rabbitmqctl("list_users", "--silent").splitlines()
            }
            if self.login not in users:
                # The password goes through standard input, never the command line.
                self.rabbitmqctl("add_user", self.login, input_text=self.passcode + "\n")
            self.rabbitmqctl("set_permissions", "-p", self.vhost, self.login, configure, write, read)
            self.rabbitmqctl(
                "set_topic_permissions", "-p", self.vhost, self.login, "amq.topic", topic, topic
            )
            if "guest" in users:
                self.rabbitmqctl("delete_user", "guest")
        except BrokerError as error:
            self._fail_start(f"account setup failed: {error}", log_offset)

    def _wait_until_ready(self, deadline: float, log_offset: int) -> None:
        assert self._server_process is not None
        while True:
            status = self._server_process.poll()
            if status is not None:
                self._fail_start(
                    f"the node exited during boot (rabbitmq-server exit status {status})",
                    log_offset,
                )
            try:
                command, headers = stomp_connect(
                    self.host, self.port, self.login, self.passcode, vhost=self.vhost
                )
            except OSError:
                if time.monotonic() > deadline:
                    self._fail_start(
                        f"no STOMP CONNECTED within {self.startup_timeout:g} s", log_offset
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
            f"RabbitMQ failed to start on {self.host}:{self.port}: {reason}\n"
            f"Last lines of {self.log_path}:\n"
            f"{read_log_tail(self.log_path, log_offset)}"
        )

    def _live_pid(self, process: subprocess.Popen[bytes] | None, state_key: str) -> int | None:
        if process is not None:
            return process.pid if process.poll() is None else None
        pid = self._read_state().get(state_key)
        if not isinstance(pid, int) or not process_is_alive(pid):
            return None
        marker = process_environment(pid).get("TASKMESH_RABBITMQ_DIRECTORY")
        return pid if marker == str(self.directory) else None

    def _epmd_pid(self) -> int | None:
        return self._live_pid(self._epmd_process, "epmd_pid")

    def _stop_epmd(self) -> None:
        pid = self._epmd_pid()
        if pid is None:
            return
        signal_process_group(pid, signal.SIGTERM)
        if not wait_for_exit(self._epmd_process, pid, 5.0):
            self._kill_group(self._epmd_process, pid, "epmd")

    def _kill_group(
        self, process: subprocess.Popen[bytes] | None, pid: int, name: str
    ) -> None:
        signal_process_group(pid, signal.SIGKILL)
        if not wait_for_exit(process, pid, 10.0):
            raise BrokerError(f"{name} (pid {pid}) is still running after SIGKILL")

    def _forget_processes(self) -> None:
        self._server_process = None
        self._epmd_process = None
        # Keep the node name and port so that the next start reuses them.
        self._write_state()

    @staticmethod
    def _saved_int(state: dict[str, object], key: str) -> int | None:
        value = state.get(key)
        return value if isinstance(value, int) else None

    def _read_state(self) -> dict[str, object]:
        return read_state_file(self.state_path)

    def _write_state(self) -> None:
        state: dict[str, object] = {"node": self.node, "port": self.port}
        if self.epmd_port is not None:
            state["epmd_port"] = self.epmd_port
        for key, process in (
            ("server_pid", self._server_process),
            ("epmd_pid", self._epmd_process),
        ):
            if process is not None:
                state[key] = process.pid
        write_state_file(self.state_path, state)


# --- Command line ---------------------------------------------------------

class BrokerKind(NamedTuple):
    """A broker that the command line manages."""

    broker_class: type[ActiveMQ] | type[RabbitMQ]
    name: str  # the broker's name in messages
    install: Callable[[], None]
    help: str  # help text of the broker's subcommand


BROKER_KINDS = {
    "activemq": BrokerKind(
        ActiveMQ, "ActiveMQ", install_activemq, "ActiveMQ Classic from the Debian package"
    ),
    "rabbitmq": BrokerKind(
        RabbitMQ,
        "RabbitMQ",
        install_rabbitmq,
        "a private RabbitMQ node with STOMP, from the Debian package rabbitmq-server",
    ),
}


def command_start(arguments: argparse.Namespace) -> int:
    kind = BROKER_KINDS[arguments.broker]
    if arguments.install:
        kind.install()
    broker = kind.broker_class(
        arguments.dir,
        arguments.port,
        startup_timeout=arguments.timeout,
        stop_with_parent=False,
    )
    broker.start()
    print(
        f"{kind.name} is ready after {broker.startup_seconds:.1f} s: STOMP {broker.uri}, "
        f"login {broker.login}, namespace {broker.namespace}, pid {broker.pid()}, "
        f"log {broker.log_path}"
    )
    return 0


def command_stop(arguments: argparse.Namespace) -> int:
    kind = BROKER_KINDS[arguments.broker]
    broker = kind.broker_class(arguments.dir)
    pid = broker.pid()
    broker.stop(timeout=arguments.timeout)
    if pid is None:
        print(f"{kind.name} from {broker.directory} was not running")
    else:
        print(f"{kind.name} (pid {pid}) stopped")
    return 0


def command_status(arguments: argparse.Namespace) -> int:
    """Print the state. Exit status: 0 ready, 1 running but not ready, 3 stopped."""
    kind = BROKER_KINDS[arguments.broker]
    broker = kind.broker_class(arguments.dir)
    pid = broker.pid()
    if pid is None:
        print(f"{kind.name} from {broker.directory} is not running")
        return 3
    if broker.is_ready():
        print(f"{kind.name} (pid {pid}) is running and accepts STOMP on {broker.uri}")
        return 0
    print(
        f"{kind.name} (pid {pid}) is running but rejects or does not answer STOMP "
        f"CONNECT on {broker.uri}; see {broker.log_path}"
    )
    return 1


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Manage a private STOMP broker for taskmesh tests and demos."
    )
    brokers = parser.add_subparsers(dest="broker", required=True, metavar="BROKER")
    for command, kind in BROKER_KINDS.items():
        add_actions(brokers.add_parser(command, help=kind.help), kind.name)
    return parser.parse_args(argv)


def add_actions(broker_parser: argparse.ArgumentParser, name: str) -> None:
    """Add the start, stop and status subcommands of one broker."""
    actions = broker_parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    start = actions.add_parser(
        "start", help=f"install {name} if missing, start it and wait for STOMP"
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
        help=f"fail instead of running apt-get when {name} is missing",
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

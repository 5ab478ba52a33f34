"""
INI configuration of the master and slave daemons.

``etc/taskmesh/master.ini`` and ``etc/taskmesh/slave.ini`` document every key
with its default. Command-line overrides take precedence over the file. The
passcode comes from the ``TASKMESH_PASSCODE`` environment variable, else from
the file named by ``passcode_file``, else from ``passcode``, and never from the
command line.
"""

from __future__ import annotations

import configparser
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, TypeVar

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from taskmesh._api_token import (
    CREATE_TOKEN_COMMAND,
    MIN_TOKEN_LENGTH,
    TokenFileError,
    describe_public_listening,
    read_token_file,
)
from taskmesh._messages import (
    DEFAULT_MAX_ATTEMPTS,
    validate_namespace,
    validate_slave_id,
    validate_task_name,
)

if TYPE_CHECKING:
    from taskmesh.stomp import StompSettings

PASSCODE_ENVIRONMENT_VARIABLE = "TASKMESH_PASSCODE"
STOMP_VERSIONS = ("1.0", "1.1", "1.2")
COMMAND_LINE = "command line"

DEFAULT_BROKER_URI = "tcp://127.0.0.1:61613"
DEFAULT_NAMESPACE = "myapp"
DEFAULT_STOMP_VERSION = "1.2"
DEFAULT_HEART_BEAT = (10000, 10000)
DEFAULT_MAX_FRAME_SIZE = 10 * 1024 * 1024
DEFAULT_HTTP_ENDPOINT = "tcp:8750:interface=127.0.0.1"
DEFAULT_TIMEOUT = 60.0
DEFAULT_DATABASE = "/var/lib/taskmesh/master.sqlite3"
DEFAULT_MAX_FINISHED = 10_000
DEFAULT_BROKER_TYPE = "activemq"
DEFAULT_MAX_SKEW = 60.0
DEFAULT_ANNOUNCE_INTERVAL = 10.0
DEFAULT_CONCURRENCY = 4
DEFAULT_GRACE_PERIOD = 30.0

_BROKER_KEYS = (
    "uri",
    "login",
    "passcode",
    "passcode_file",
    "vhost",
    "namespace",
    "stomp_version",
    "heart_beat",
    "max_frame_size",
    "broker_type",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_insecure",
)
_MASTER_KEYS = (
    "http",
    "http_token_file",
    "default_timeout",
    "database",
    "max_attempts",
    "default_ttl",
    "max_finished",
)
_SLAVE_KEYS = ("id", "announce_interval", "concurrency", "tags", "grace_period")
# A section whose key list is None accepts any key, because [handlers] keys
# are task names.
_SECURITY_KEYS = (
    "signing_key",
    "keyring",
    "payload_key",
    "require_encryption",
    "max_skew",
    "allow_unsigned",
)
_MASTER_SECTIONS: dict[str, tuple[str, ...] | None] = {
    "broker": _BROKER_KEYS,
    "master": _MASTER_KEYS,
    "security": _SECURITY_KEYS,
}
_SLAVE_SECTIONS: dict[str, tuple[str, ...] | None] = {
    "broker": _BROKER_KEYS,
    "slave": _SLAVE_KEYS,
    "handlers": None,
    "security": _SECURITY_KEYS,
}
_SECRET_KEYS = ("passcode", "passcode_file")

_HANDLER_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_TAG_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_DIGITS = re.compile(r"^[0-9]+$")
_HEART_BEAT = re.compile(r"^\s*([0-9]+)\s*,\s*([0-9]+)\s*$")

_T = TypeVar("_T")


class ConfigError(ValueError):
    """
    An invalid configuration file, key or value.

    The message names the file (or ``command line``), the section, the key,
    the value and what is expected.
    """


@dataclass(frozen=True)
class BrokerSettings:
    """
    How to reach the STOMP broker, from the ``[broker]`` section.

    ``vhost`` is the STOMP ``host`` header. ``None`` sends the host name of
    the broker being connected to, except with ``broker_type`` ``rabbitmq``,
    where it means RabbitMQ's default virtual host ``/``. ``stomp_version`` is
    the highest version offered. ``heart_beat`` is (send, receive) in
    milliseconds. ``broker_type`` selects the broker profile (``activemq``,
    ``rabbitmq`` or ``generic``). The ``tls_*`` settings apply to ``ssl://``
    brokers, and their paths are absolute (see :class:`StompSettings`). The
    repr never shows the passcode.
    """

    uri: str = DEFAULT_BROKER_URI
    login: str | None = None
    passcode: str | None = None
    vhost: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    stomp_version: str = DEFAULT_STOMP_VERSION
    heart_beat: tuple[int, int] = DEFAULT_HEART_BEAT
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    broker_type: str = DEFAULT_BROKER_TYPE
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_insecure: bool = False

    @property
    def versions(self) -> tuple[str, ...]:
        """
        The STOMP versions to offer: every version up to ``stomp_version``.
        """
        return STOMP_VERSIONS[: STOMP_VERSIONS.index(self.stomp_version) + 1]

    def __repr__(self) -> str:
        passcode = None if self.passcode is None else "<hidden>"
        return (
            f"BrokerSettings(uri={self.uri!r}, login={self.login!r}, passcode={passcode},"
            f" vhost={self.vhost!r}, namespace={self.namespace!r},"
            f" stomp_version={self.stomp_version!r}, heart_beat={self.heart_beat!r},"
            f" max_frame_size={self.max_frame_size!r}, broker_type={self.broker_type!r},"
            f" tls_ca_file={self.tls_ca_file!r}, tls_cert_file={self.tls_cert_file!r},"
            f" tls_key_file={self.tls_key_file!r}, tls_insecure={self.tls_insecure!r})"
        )


@dataclass(frozen=True)
class SecuritySettings:
    """
    Message signing and payload encryption, from the ``[security]`` section.

    ``signing_key`` is this daemon's Ed25519 private key file, ``keyring``
    the public keys it accepts messages from, and ``payload_key`` the
    optional AES-256-GCM key file. Paths are absolute. With
    ``allow_unsigned`` and no keys, messages are neither signed nor checked.
    """

    signing_key: str | None = None
    keyring: str | None = None
    payload_key: str | None = None
    require_encryption: bool = False
    max_skew: float = DEFAULT_MAX_SKEW
    allow_unsigned: bool = False

    @property
    def enabled(self) -> bool:
        """
        Whether messages are signed and verified.
        """
        return self.signing_key is not None


@dataclass(frozen=True)
class MasterSettings:
    """
    Settings of the master daemon.

    ``http_endpoint`` is a Twisted server endpoint string for the HTTP API.
    ``http_token`` is the bearer token that every API request must send, or
    ``None`` for no token. It is read from the absolute path
    ``http_token_file``, and the repr never shows it. ``default_timeout``
    and ``default_ttl`` are in seconds, and ``default_ttl`` ``None`` makes a
    task's time-to-live equal to its timeout. ``database`` is the SQLite file
    that keeps requests, or ``:memory:``. ``max_attempts`` is the default
    number of starts of a queue or direct task before it fails as a poison
    message. ``max_finished`` is the number of finished requests that the
    database keeps.
    """

    broker: BrokerSettings = field(default_factory=BrokerSettings)
    http_endpoint: str = DEFAULT_HTTP_ENDPOINT
    default_timeout: float = DEFAULT_TIMEOUT
    database: str = DEFAULT_DATABASE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    default_ttl: float | None = None
    max_finished: int = DEFAULT_MAX_FINISHED
    security: SecuritySettings = field(default_factory=SecuritySettings)
    http_token_file: str | None = None
    http_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SlaveSettings:
    """
    Settings of the slave daemon.

    ``announce_interval`` and ``grace_period`` are in seconds. ``handlers``
    maps task names to ``package.module:function`` strings from the
    ``[handlers]`` section.
    """

    broker: BrokerSettings
    slave_id: str
    announce_interval: float = DEFAULT_ANNOUNCE_INTERVAL
    concurrency: int = DEFAULT_CONCURRENCY
    tags: dict[str, str] = field(default_factory=dict)
    handlers: dict[str, str] = field(default_factory=dict)
    grace_period: float = DEFAULT_GRACE_PERIOD
    security: SecuritySettings = field(default_factory=SecuritySettings)


class _Values:
    """
    Raw configuration values with the file or ``command line`` each came from.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.sections: dict[str, dict[str, tuple[str, str]]] = {}

    def get(self, section: str, key: str) -> tuple[str, str] | None:
        return self.sections.get(section, {}).get(key)

    def parse(
        self,
        section: str,
        key: str,
        parser: Callable[[str], _T],
        default: _T,
        expected: str,
    ) -> _T:
        """
        Parse one value, or return ``default`` when the key is absent.

        ``parser`` raises ValueError for an invalid value. Its message is
        used when ``expected`` is empty.
        """
        entry = self.get(section, key)
        if entry is None:
            return default
        value, source = entry
        try:
            return parser(value.strip())
        except ValueError as e:
            raise ConfigError(
                f"{source}: [{section}] {key}: invalid value {value!r}: {expected or e}"
            ) from None

    def optional_text(self, section: str, key: str) -> str | None:
        entry = self.get(section, key)
        if entry is None or not entry[0].strip():
            return None
        return entry[0].strip()


def load_master_settings(
    path: str | None,
    overrides: Mapping[str, str | None],
    environ: Mapping[str, str],
) -> MasterSettings:
    """
    Load the master's settings from an INI file, command-line overrides and
    the environment.

    ``path`` ``None`` means built-in defaults only. ``overrides`` maps
    ``section.key`` (for example ``broker.uri``) to a value, and ``None``
    values are ignored.

    Raises:
        ConfigError: the file is missing or unreadable, or a section, key or
            value is invalid.
    """
    values = _read(path, _MASTER_SECTIONS, overrides)
    http_endpoint = values.parse("master", "http", _server_endpoint, DEFAULT_HTTP_ENDPOINT, "")
    http_token_file, http_token = _http_token(values, http_endpoint)
    return MasterSettings(
        broker=_broker_settings(values, environ),
        security=_security_settings(values),
        http_endpoint=http_endpoint,
        http_token_file=http_token_file,
        http_token=http_token,
        default_timeout=values.parse(
            "master",
            "default_timeout",
            _positive_seconds,
            DEFAULT_TIMEOUT,
            "expected a positive number of seconds",
        ),
        database=_database_path(values),
        max_attempts=values.parse(
            "master",
            "max_attempts",
            _positive_int,
            DEFAULT_MAX_ATTEMPTS,
            "expected a positive integer",
        ),
        default_ttl=values.parse(
            "master",
            "default_ttl",
            _optional_positive_seconds,
            None,
            "expected a positive number of seconds, or nothing for the timeout",
        ),
        max_finished=values.parse(
            "master",
            "max_finished",
            _positive_int,
            DEFAULT_MAX_FINISHED,
            "expected a positive integer",
        ),
    )


def load_slave_settings(
    path: str | None,
    overrides: Mapping[str, str | None],
    environ: Mapping[str, str],
    *,
    hostname: str | None = None,
) -> SlaveSettings:
    """
    Load a slave's settings from an INI file, command-line overrides and the
    environment.

    Arguments are as for :func:`load_master_settings`. The slave id defaults
    to ``hostname``, which defaults to this machine's host name.

    Raises:
        ConfigError: the file is missing or unreadable, or a section, key or
            value is invalid.
    """
    values = _read(path, _SLAVE_SECTIONS, overrides)
    broker = _broker_settings(values, environ)

    slave_id = values.optional_text("slave", "id")
    if slave_id is None:
        default_id = hostname if hostname is not None else socket.gethostname()
        try:
            slave_id = validate_slave_id(default_id)
        except ValueError as e:
            raise ConfigError(
                f"[slave] id is not set, and the host name is not a valid slave id ({e})."
                " Set [slave] id in the configuration file or use --slave-id"
            ) from None
    else:
        slave_id = values.parse("slave", "id", validate_slave_id, slave_id, "")

    handlers: dict[str, str] = {}
    for name, (target, source) in values.sections.get("handlers", {}).items():
        try:
            validate_task_name(name)
        except ValueError as e:
            raise ConfigError(f"{source}: [handlers] {name}: {e}") from None
        handlers[name] = values.parse(
            "handlers",
            name,
            _handler_target,
            target,
            "expected 'package.module:function'",
        )

    return SlaveSettings(
        broker=broker,
        security=_security_settings(values),
        slave_id=slave_id,
        announce_interval=values.parse(
            "slave",
            "announce_interval",
            _positive_seconds,
            DEFAULT_ANNOUNCE_INTERVAL,
            "expected a positive number of seconds",
        ),
        concurrency=values.parse(
            "slave",
            "concurrency",
            _positive_int,
            DEFAULT_CONCURRENCY,
            "expected a positive integer",
        ),
        tags=values.parse(
            "slave",
            "tags",
            _tags,
            {},
            "",
        ),
        handlers=handlers,
        grace_period=values.parse(
            "slave",
            "grace_period",
            _non_negative_seconds,
            DEFAULT_GRACE_PERIOD,
            "expected a number of seconds, 0 or more",
        ),
    )


def stomp_settings_from(broker: BrokerSettings) -> StompSettings:
    """
    Build the STOMP client's settings from the ``[broker]`` settings.
    """
    from taskmesh.stomp import StompSettings

    vhost = broker.vhost
    if vhost is None and broker.broker_type == "rabbitmq":
        # RabbitMQ reads the host header as a virtual host name, and it has no
        # virtual host named after the broker's host name.
        vhost = "/"
    return StompSettings(
        uri=broker.uri,
        login=broker.login,
        passcode=broker.passcode,
        vhost=vhost,
        broker_type=broker.broker_type,
        versions=broker.versions,
        heart_beat=broker.heart_beat,
        max_frame_size=broker.max_frame_size,
        tls_ca_file=broker.tls_ca_file,
        tls_cert_file=broker.tls_cert_file,
        tls_key_file=broker.tls_key_file,
        tls_insecure=broker.tls_insecure,
    )


def _read(
    path: str | None,
    sections: Mapping[str, tuple[str, ...] | None],
    overrides: Mapping[str, str | None],
) -> _Values:
    values = _Values(path)
    if path is not None:
        _read_file(path, sections, values)

    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if key in _SECRET_KEYS:
            raise ConfigError(
                f"{COMMAND_LINE}: [{section}] {key} cannot be set on the command line"
            )
        if section not in sections or not key:
            raise ConfigError(f"{COMMAND_LINE}: unknown configuration override {dotted!r}")
        _check_key(COMMAND_LINE, section, key, sections[section])
        values.sections.setdefault(section, {})[key] = (value, COMMAND_LINE)
    return values


def _read_file(path: str, sections: Mapping[str, tuple[str, ...] | None], values: _Values) -> None:
    # No DEFAULT section: a [DEFAULT] in the file is reported as an unknown
    # section instead of silently applying its keys to every section.
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00")
    # Keep keys case-sensitive, because [handlers] keys are task names.
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # documented way to keep case
    try:
        with open(path, encoding="utf-8") as config_file:
            parser.read_file(config_file)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid configuration file: not UTF-8 text ({e})") from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: invalid configuration file: {e}") from None

    for section in parser.sections():
        if section not in sections:
            raise ConfigError(
                f"{path}: unknown section [{section}]"
                f" (expected {', '.join(f'[{s}]' for s in sections)})"
            )
        allowed = sections[section]
        for key, value in parser.items(section):
            _check_key(path, section, key, allowed)
            values.sections.setdefault(section, {})[key] = (value, path)


def _check_key(source: str, section: str, key: str, allowed: tuple[str, ...] | None) -> None:
    if allowed is not None and key not in allowed:
        raise ConfigError(
            f"{source}: [{section}] {key}: unknown key (expected one of {', '.join(allowed)})"
        )


def _broker_settings(values: _Values, environ: Mapping[str, str]) -> BrokerSettings:
    broker = BrokerSettings(
        uri=values.parse("broker", "uri", _broker_uri, DEFAULT_BROKER_URI, ""),
        login=values.optional_text("broker", "login"),
        passcode=_passcode(values, environ),
        vhost=values.optional_text("broker", "vhost"),
        namespace=values.parse(
            "broker",
            "namespace",
            validate_namespace,
            DEFAULT_NAMESPACE,
            "expected letters, digits, '_' and '-' in parts separated by single dots"
            " (for example 'myapp')",
        ),
        stomp_version=values.parse(
            "broker",
            "stomp_version",
            _stomp_version,
            DEFAULT_STOMP_VERSION,
            f"expected one of {', '.join(STOMP_VERSIONS)}",
        ),
        heart_beat=values.parse(
            "broker",
            "heart_beat",
            _heart_beat,
            DEFAULT_HEART_BEAT,
            "expected two non-negative integers in milliseconds, 'send,receive'"
            " (for example '10000,10000')",
        ),
        max_frame_size=values.parse(
            "broker",
            "max_frame_size",
            _positive_int,
            DEFAULT_MAX_FRAME_SIZE,
            "expected a positive integer number of bytes",
        ),
        broker_type=values.parse(
            "broker",
            "broker_type",
            _broker_type,
            DEFAULT_BROKER_TYPE,
            "expected one of activemq, rabbitmq, generic",
        ),
        tls_ca_file=_tls_file(values, "tls_ca_file"),
        tls_cert_file=_tls_file(values, "tls_cert_file"),
        tls_key_file=_tls_file(values, "tls_key_file"),
        tls_insecure=values.parse(
            "broker",
            "tls_insecure",
            _boolean,
            False,
            "expected true or false",
        ),
    )
    _check_tls(values, broker)
    return broker


def _tls_file(values: _Values, key: str) -> str | None:
    entry = values.get("broker", key)
    if entry is None or not entry[0].strip():
        return None
    path, source = entry[0].strip(), entry[1]
    # A relative path in the file is relative to the file's directory, as for
    # passcode_file, and one from the command line to the working directory.
    if source == COMMAND_LINE or values.path is None:
        return os.path.abspath(path)
    return os.path.join(os.path.dirname(os.path.abspath(values.path)), path)


def _check_tls(values: _Values, broker: BrokerSettings) -> None:
    """
    Check the [broker] TLS keys together and read their files.

    The STOMP client reads the files again when the daemon builds it, so a
    file that is invalid now stops the daemon before it starts.
    """
    from taskmesh.stomp import TLSFileError, parse_broker_uri

    def source_of(key: str) -> str:
        entry = values.get("broker", key)
        return entry[1] if entry is not None else COMMAND_LINE

    if (broker.tls_cert_file is None) != (broker.tls_key_file is None):
        present, missing = ("tls_cert_file", "tls_key_file")
        if broker.tls_cert_file is None:
            present, missing = missing, present
        raise ConfigError(
            f"{source_of(present)}: [broker] {present} is set but {missing} is not:"
            " a client certificate needs both, the certificate and its private key"
        )
    if broker.tls_insecure:
        entry = values.get("broker", "tls_insecure")
        source, value = (entry[1], entry[0]) if entry is not None else (COMMAND_LINE, "true")
        if broker.tls_ca_file is not None:
            raise ConfigError(
                f"{source}: [broker] tls_insecure: invalid value {value!r}: it turns off"
                " certificate verification, so tls_ca_file would be ignored: set only one"
                " of them"
            )
        # An unused tls_insecure is an error so that it cannot take effect
        # unnoticed when the URI changes to ssl:// later.
        if all(b.scheme != "ssl" for b in parse_broker_uri(broker.uri).brokers):
            raise ConfigError(
                f"{source}: [broker] tls_insecure: invalid value {value!r}: the broker URI"
                f" {broker.uri!r} names no ssl:// broker, so there is no certificate to"
                " skip: remove tls_insecure"
            )
    try:
        stomp_settings_from(broker)
    except TLSFileError as e:
        entry = values.get("broker", e.setting)
        value = entry[0] if entry is not None else e.path
        raise ConfigError(
            f"{source_of(e.setting)}: [broker] {e.setting}: invalid value {value!r}:"
            f" {e.path}: {e.reason}"
        ) from None


def _security_settings(values: _Values) -> SecuritySettings:
    """
    Read the [security] section and check that its key files load.
    """
    from taskmesh.security import KeyFileError, load_keyring, load_signing_key, load_symmetric_key

    paths: dict[str, str | None] = {}
    for key in ("signing_key", "keyring", "payload_key"):
        paths[key] = _relative_path(values, "security", key)
    settings = SecuritySettings(
        signing_key=paths["signing_key"],
        keyring=paths["keyring"],
        payload_key=paths["payload_key"],
        require_encryption=values.parse(
            "security", "require_encryption", _boolean, False, "expected true or false"
        ),
        max_skew=values.parse(
            "security",
            "max_skew",
            _non_negative_seconds,
            DEFAULT_MAX_SKEW,
            "expected a number of seconds, 0 or more",
        ),
        allow_unsigned=values.parse(
            "security", "allow_unsigned", _boolean, False, "expected true or false"
        ),
    )

    source = values.path or COMMAND_LINE
    if (settings.signing_key is None) != (settings.keyring is None):
        given, missing = ("signing_key", "keyring")
        if settings.signing_key is None:
            given, missing = missing, given
        raise ConfigError(
            f"{source}: [security] {given} is set but {missing} is not: a daemon signs with"
            " its own private key (signing_key) and accepts only messages signed by the"
            " public keys in its keyring"
        )
    if settings.signing_key is None and (settings.payload_key or settings.require_encryption):
        raise ConfigError(
            f"{source}: [security] payload_key and require_encryption need signing_key and"
            " keyring, because encrypted payloads are also signed"
        )
    if settings.require_encryption and settings.payload_key is None:
        raise ConfigError(f"{source}: [security] require_encryption = true needs payload_key")

    loaders = (
        ("signing_key", load_signing_key),
        ("keyring", load_keyring),
        ("payload_key", load_symmetric_key),
    )
    for key, loader in loaders:
        path = paths[key]
        if path is None:
            continue
        try:
            loader(path)
        except (KeyFileError, OSError) as e:
            raise ConfigError(f"{source}: [security] {key}: {e}") from None
    return settings


def require_signing(security: SecuritySettings, source: str | None) -> None:
    """
    Reject settings that neither sign messages nor explicitly allow that.

    The daemons call this when they parse their options, so that a missing
    ``[security]`` section cannot silently run without signatures.

    Raises:
        ConfigError: no signing key is set and ``allow_unsigned`` is false.
    """
    if security.enabled or security.allow_unsigned:
        return
    raise ConfigError(
        f"{source or COMMAND_LINE}: [security] signing_key and keyring are not set, so"
        " anyone who can publish to the broker could run tasks or forge results. Create"
        " keys with taskmesh-keygen and set both (see docs/security.md), or set"
        " [security] allow_unsigned = true to run without signatures"
    )


def _relative_path(values: _Values, section: str, key: str) -> str | None:
    entry = values.get(section, key)
    if entry is None or not entry[0].strip():
        return None
    path, source = entry[0].strip(), entry[1]
    # A relative path in the file is relative to the file's directory, as for
    # passcode_file, and one from the command line to the working directory.
    if source == COMMAND_LINE or values.path is None:
        return os.path.abspath(path)
    return os.path.join(os.path.dirname(os.path.abspath(values.path)), path)


def _boolean(value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise ValueError(value)
    return text == "true"


def _broker_type(value: str) -> str:
    broker_type = value.strip()
    if broker_type not in ("activemq", "rabbitmq", "generic"):
        raise ValueError(broker_type)
    return broker_type


def _passcode(values: _Values, environ: Mapping[str, str]) -> str | None:
    from_environment = environ.get(PASSCODE_ENVIRONMENT_VARIABLE)
    if from_environment:
        return from_environment

    entry = values.get("broker", "passcode_file")
    if entry is not None and entry[0].strip():
        file_name, source = entry[0].strip(), entry[1]
        # A relative path is relative to the configuration file's directory.
        if values.path is not None:
            file_name = os.path.join(os.path.dirname(os.path.abspath(values.path)), file_name)
        try:
            with open(file_name, encoding="utf-8") as passcode_file:
                passcode = passcode_file.read().strip()
        except OSError as e:
            raise ConfigError(
                f"{source}: [broker] passcode_file: cannot read {file_name!r}: {e.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"{source}: [broker] passcode_file: {file_name!r} is not UTF-8 text"
            ) from None
        if not passcode:
            raise ConfigError(
                f"{source}: [broker] passcode_file: {file_name!r} is empty:"
                " expected the passcode"
            )
        return passcode

    return values.optional_text("broker", "passcode")


def _broker_uri(value: str) -> str:
    from taskmesh.stomp import validate_broker_uri

    uri = value.strip()
    validate_broker_uri(uri)
    return uri


def _server_endpoint(value: str) -> str:
    description = value.strip()
    try:
        # Parsing builds an endpoint object without listening. An ssl:
        # endpoint reads its certificate and key files here.
        # Twisted leaves serverFromString unannotated.
        serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError, OSError) as e:
        raise ValueError(
            "expected a Twisted server endpoint such as 'tcp:8750:interface=127.0.0.1'"
            f" ({type(e).__name__}: {e})"
        ) from None
    return description


def _http_token(values: _Values, endpoint: str) -> tuple[str | None, str | None]:
    """
    Read ``[master] http_token_file``, which an endpoint outside loopback needs.

    Return the absolute path of the token file and the token, or two
    ``None`` when no file is set.
    """
    token_file = _relative_path(values, "master", "http_token_file")
    if token_file is None:
        public = describe_public_listening(endpoint)
        if public is None:
            return None, None
        entry = values.get("master", "http")
        source = entry[1] if entry is not None else COMMAND_LINE
        suggested = "/etc/taskmesh/api-token"
        if values.path is not None:
            suggested = os.path.join(os.path.dirname(os.path.abspath(values.path)), "api-token")
        raise ConfigError(
            f"{source}: [master] http: {endpoint} {public}, so [master] http_token_file is"
            " required. Create one with: "
            + CREATE_TOKEN_COMMAND.format(path=suggested)
            + f" and set http_token_file = {suggested}"
        )

    entry = values.get("master", "http_token_file")
    source = entry[1] if entry is not None else COMMAND_LINE
    try:
        token = read_token_file(token_file, owner_only=True, min_length=MIN_TOKEN_LENGTH)
    except TokenFileError as e:
        message = f"{source}: [master] http_token_file: {e}"
        if e.needs_new_token:
            message += ". Create a token with: " + CREATE_TOKEN_COMMAND.format(path=token_file)
        raise ConfigError(message) from None
    return token_file, token


def _database_path(values: _Values) -> str:
    entry = values.get("master", "database")
    if entry is None:
        return DEFAULT_DATABASE
    value, source = entry
    path = value.strip()
    if not path:
        raise ConfigError(
            f"{source}: [master] database: invalid value {value!r}: expected a file path"
            " such as /var/lib/taskmesh/master.sqlite3, or :memory:"
        )
    if path == ":memory:" or os.path.isabs(path):
        return path
    # A relative path in the file is relative to the file's directory, as for
    # passcode_file, and one from the command line to the working directory.
    if source == COMMAND_LINE or values.path is None:
        return os.path.abspath(path)
    return os.path.join(os.path.dirname(os.path.abspath(values.path)), path)


def _optional_positive_seconds(value: str) -> float | None:
    if not value.strip():
        return None
    return _positive_seconds(value)


def _positive_int(value: str) -> int:
    text = value.strip()
    if not _DIGITS.match(text) or int(text) <= 0:
        raise ValueError(text)
    return int(text)


def _positive_seconds(value: str) -> float:
    seconds = float(value.strip())
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(value)
    return seconds


def _non_negative_seconds(value: str) -> float:
    seconds = float(value.strip())
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(value)
    return seconds


def _stomp_version(value: str) -> str:
    version = value.strip()
    if version not in STOMP_VERSIONS:
        raise ValueError(version)
    return version


def _heart_beat(value: str) -> tuple[int, int]:
    match = _HEART_BEAT.match(value)
    if match is None:
        raise ValueError(value)
    return int(match[1]), int(match[2])


def _tags(value: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in re.split(r"[,\n]", value):
        item = item.strip()
        if not item:
            continue
        name, equals, tag_value = (part.strip() for part in item.partition("="))
        if not equals or not _TAG_NAME.match(name) or not tag_value:
            raise ValueError(
                f"expected comma-separated name=value pairs such as 'role=db, zone=a',"
                f" with names of letters, digits, '_', '.' and '-' (bad pair {item!r})"
            )
        if name in tags:
            raise ValueError(f"tag {name!r} is set twice")
        tags[name] = tag_value
    return tags


def _handler_target(value: str) -> str:
    target = value.strip()
    if not _HANDLER_TARGET.match(target):
        raise ValueError(target)
    return target

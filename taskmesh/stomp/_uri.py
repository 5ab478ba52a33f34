"""
Broker URIs: ``tcp://host:port``, ``ssl://host:port`` and ActiveMQ-style
failover URIs, parsed with stompest's ``StompFailoverUri``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from stompest.protocol.failover import StompFailoverUri

_MEMBER = re.compile(r"^(?P<scheme>tcp|ssl)://(?P<host>[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")

# Options of stompest's failover URI that taskmesh honours, in milliseconds
# where they are delays.
_OPTIONS = (
    "initialReconnectDelay",
    "maxReconnectDelay",
    "useExponentialBackOff",
    "backOffMultiplier",
    "reconnectDelayJitter",
    "randomize",
    "priorityBackup",
    "maxReconnectAttempts",
    "startupMaxReconnectAttempts",
)

# Backoff for a plain tcp:// or ssl:// URI, in seconds.
DEFAULT_INITIAL_DELAY = 1.0
DEFAULT_MAX_DELAY = 30.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_JITTER = 1.0


@dataclass(frozen=True)
class BrokerAddress:
    """
    One broker: ``scheme`` is ``tcp`` or ``ssl``.
    """

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class BrokerURI:
    """
    A parsed broker URI: the brokers to try in turn and the reconnect backoff.

    Delays are in seconds. ``randomize`` shuffles the brokers once, at start.
    """

    brokers: tuple[BrokerAddress, ...]
    initial_delay: float = DEFAULT_INITIAL_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    multiplier: float = DEFAULT_MULTIPLIER
    jitter: float = DEFAULT_JITTER
    randomize: bool = False

    def retry_policy(self, uniform: Callable[[], float] = random.random) -> Callable[[int], float]:
        """
        Return a function from the number of failed attempts to a delay in seconds.

        The delay grows by ``multiplier`` per failure up to ``max_delay``, plus
        up to ``jitter`` seconds at random so that many clients restarted
        together do not reconnect in lockstep.
        """

        def delay(failures: int) -> float:
            exponent = max(failures - 1, 0)
            try:
                base = self.initial_delay * self.multiplier**exponent
            except OverflowError:
                base = self.max_delay
            return min(base, self.max_delay) + uniform() * self.jitter

        return delay


def parse_broker_uri(uri: str) -> BrokerURI:
    """
    Parse a broker URI.

    Failover options may be separated by ``&`` as in ActiveMQ or by ``,`` as
    in stompest.

    Raises:
        ValueError: the URI is malformed; the message names the part at fault.
    """
    text = uri.strip()
    if not text:
        raise ValueError("empty broker URI: expected tcp://HOST:PORT, ssl://HOST:PORT or failover:(...)")
    if not text.startswith("failover:"):
        return BrokerURI((_parse_member(text, uri),))

    members_part, _, options_part = text[len("failover:") :].partition("?")
    if members_part.startswith("(") and members_part.endswith(")"):
        members_part = members_part[1:-1]
    members = [m.strip() for m in members_part.split(",") if m.strip()]
    if not members:
        raise ValueError(f"invalid broker URI {uri!r}: the failover list names no broker")
    brokers = tuple(_parse_member(m, uri) for m in members)

    options_part = options_part.replace("&", ",")
    for option in filter(None, options_part.split(",")):
        name = option.partition("=")[0]
        if name not in _OPTIONS:
            raise ValueError(
                f"invalid broker URI {uri!r}: unknown failover option {name!r};"
                f" supported: {', '.join(_OPTIONS)}"
            )
    normalised = "failover:(" + ",".join(str(b) for b in brokers) + ")"
    if options_part:
        normalised += "?" + options_part
    try:
        options = StompFailoverUri(normalised).options
    except ValueError as e:
        raise ValueError(f"invalid broker URI {uri!r}: {e}") from None

    multiplier = float(options["backOffMultiplier"]) if options["useExponentialBackOff"] else 1.0
    return BrokerURI(
        brokers,
        initial_delay=max(int(options["initialReconnectDelay"]), 0) / 1000.0,
        max_delay=max(int(options["maxReconnectDelay"]), 0) / 1000.0,
        multiplier=max(multiplier, 1.0),
        jitter=max(int(options["reconnectDelayJitter"]), 0) / 1000.0,
        randomize=bool(options["randomize"]),
    )


def validate_broker_uri(uri: str) -> None:
    """
    Check a broker URI at configuration time.

    Raises:
        ValueError: see :func:`parse_broker_uri`.
    """
    parse_broker_uri(uri)


def _parse_member(member: str, uri: str) -> BrokerAddress:
    match = _MEMBER.match(member.rstrip("/"))
    if match is None:
        raise ValueError(
            f"invalid broker URI {uri!r}: {member!r} is not tcp://HOST:PORT or ssl://HOST:PORT"
        )
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"invalid broker URI {uri!r}: port {port} is not between 1 and 65535")
    return BrokerAddress(match["scheme"], match["host"], port)

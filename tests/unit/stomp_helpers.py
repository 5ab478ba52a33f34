"""
Helpers for driving :class:`StompClientProtocol` over a ``StringTransport``.
"""

from __future__ import annotations

from stompest.protocol import StompParser
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from taskmesh.stomp import StompClientProtocol, StompSettings


def connected_frame(version: str = "1.2", heart_beat: str = "0,0", session: str = "s-1") -> bytes:
    """
    Build a CONNECTED frame as a broker sends it.
    """
    headers = f"version:{version}\nsession:{session}\nserver:fake/1.0\nheart-beat:{heart_beat}\n"
    if version == "1.0":
        headers = f"session:{session}\n"
    return f"CONNECTED\n{headers}\n".encode() + b"\x00"


def sent_frames(transport: StringTransport, version: str = "1.2") -> list:
    """
    Parse everything written to ``transport`` since the last call, then clear it.
    """
    parser = StompParser(version)
    parser.add(transport.value())
    transport.clear()
    frames = []
    while parser.canRead():
        frames.append(parser.get())
    return frames


def make_protocol(
    settings: StompSettings | None = None,
    *,
    clock: Clock | None = None,
    host: str = "broker.example",
) -> tuple[StompClientProtocol, StringTransport, Clock]:
    """
    Create a protocol on a ``StringTransport``; CONNECT is already written.
    """
    clock = clock or Clock()
    protocol = StompClientProtocol(settings or StompSettings(login="foo", passcode="bar"), clock, host)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def connect(
    settings: StompSettings | None = None,
    *,
    version: str = "1.2",
    heart_beat: str = "0,0",
) -> tuple[StompClientProtocol, StringTransport, Clock]:
    """
    Create a protocol and complete the STOMP handshake with ``version``.
    """
    protocol, transport, clock = make_protocol(settings)
    protocol.dataReceived(connected_frame(version, heart_beat))
    transport.clear()
    return protocol, transport, clock

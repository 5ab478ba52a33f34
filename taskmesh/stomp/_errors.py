"""
Exceptions raised by the STOMP client.
"""

from __future__ import annotations

from typing import Mapping


class StompError(Exception):
    """
    Base class for every error of the STOMP client.
    """


class NotConnected(StompError):
    """
    An operation needs a STOMP session but none is established.
    """


class BrokerError(StompError):
    """
    The broker sent an ERROR frame.

    ``message`` is the frame's ``message`` header (for example ``User name
    [foo] or password is invalid.`` from ActiveMQ) and ``details`` its body.
    """

    def __init__(self, message: str, details: str = "", headers: Mapping[str, str] | None = None) -> None:
        self.message = message
        self.details = details
        self.headers = dict(headers or {})
        super().__init__(message)

    def __str__(self) -> str:
        if self.details and self.details.strip() != self.message:
            first_line = self.details.strip().splitlines()[0] if self.details.strip() else ""
            if first_line and first_line != self.message:
                return f"broker error: {self.message} ({first_line})"
        return f"broker error: {self.message}"


class HeartBeatTimeout(StompError):
    """
    The broker sent nothing within the negotiated heart-beat period plus grace.
    """


class FrameTooLarge(StompError):
    """
    A frame from the broker exceeded the configured maximum size.
    """


class ProtocolViolation(StompError):
    """
    The broker sent bytes that do not form a valid STOMP frame.
    """


class ConnectionClosed(StompError):
    """
    The connection closed before an awaited frame (CONNECTED or RECEIPT) arrived.
    """


class TLSError(ConnectionClosed):
    """
    The TLS layer of the broker connection failed.

    Examples: the broker's certificate does not chain to a trusted CA, does
    not name the broker's host, or the broker rejected the client's
    certificate.
    """

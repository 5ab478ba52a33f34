"""
A Twisted STOMP client built on stompest's protocol core.

This package has no notion of tasks: it connects, sends, subscribes,
acknowledges and reconnects.
"""

from ._errors import (
    BrokerError,
    ConnectionClosed,
    FrameTooLarge,
    HeartBeatTimeout,
    NotConnected,
    ProtocolViolation,
    StompError,
    TLSError,
)
from ._interfaces import (
    ACK_AUTO,
    ACK_CLIENT,
    ACK_CLIENT_INDIVIDUAL,
    MessageHandler,
    StompConnection,
    StompMessage,
    Subscription,
)
from ._profiles import ACTIVEMQ, BROKER_TYPES, GENERIC, RABBITMQ, BrokerProfile, profile_for
from ._protocol import VERSIONS, StompClientProtocol, StompSettings
from ._service import FailoverEndpoint, StompClientService
from ._tls import ClientTLS, TLSFileError, load_client_tls
from ._uri import BrokerAddress, BrokerURI, parse_broker_uri, validate_broker_uri

__all__ = [
    "ACTIVEMQ",
    "BROKER_TYPES",
    "GENERIC",
    "RABBITMQ",
    "BrokerProfile",
    "profile_for",
    "ACK_AUTO",
    "ACK_CLIENT",
    "ACK_CLIENT_INDIVIDUAL",
    "VERSIONS",
    "BrokerAddress",
    "BrokerError",
    "BrokerURI",
    "ClientTLS",
    "ConnectionClosed",
    "FailoverEndpoint",
    "FrameTooLarge",
    "HeartBeatTimeout",
    "MessageHandler",
    "NotConnected",
    "ProtocolViolation",
    "StompClientProtocol",
    "StompClientService",
    "StompConnection",
    "StompError",
    "StompMessage",
    "StompSettings",
    "Subscription",
    "TLSError",
    "TLSFileError",
    "load_client_tls",
    "parse_broker_uri",
    "validate_broker_uri",
]

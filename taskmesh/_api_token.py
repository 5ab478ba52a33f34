"""
The bearer token of the master's HTTP API.

The master's configuration uses this module to decide whether an HTTP
endpoint needs a token and to read ``[master] http_token_file``. The
``taskmesh`` command uses it to read the token that it sends.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor

MIN_TOKEN_LENGTH = 32
# A token file contains one token. Reading stops after this many bytes, so
# that a wrong path, such as a log file, cannot fill the memory.
MAX_TOKEN_FILE_SIZE = 4096

# Visible ASCII characters only, so that the token fits into an HTTP header
# unchanged and cannot end one early.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")
# Permission bits that let users other than the owner read or change a file.
_SHARED_BITS = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH

CREATE_TOKEN_COMMAND = (
    "(umask 077 && head -c 32 /dev/urandom | base64 > {path} && chmod 600 {path})"
)


class TokenFileError(ValueError):
    """
    A token file that cannot be read or does not contain a valid token.

    The message names the file and what to do, and never contains the file's
    content. ``needs_new_token`` is true when the file is missing or its
    content is not a valid token, so that creating a new token fixes it.
    """

    def __init__(self, message: str, *, needs_new_token: bool) -> None:
        super().__init__(message)
        self.needs_new_token = needs_new_token


def describe_public_listening(endpoint: str) -> str | None:
    """
    Describe the addresses outside loopback that a server endpoint listens on.

    ``endpoint`` is a Twisted server endpoint string that has already been
    checked. Return ``None`` when the endpoint listens on loopback addresses
    (127.0.0.0/8, ::1 or ``localhost``) or on a UNIX socket only. Otherwise
    return a phrase for an error message, such as ``"listens on all
    addresses"``. An endpoint type that does not listen through TCP, TLS or
    a UNIX socket, such as ``systemd:``, counts as not loopback, because its
    addresses are unknown here.
    """
    # Listening on a MemoryReactor records the port, interface and socket path
    # that the endpoint would request from a real reactor, without opening a
    # socket.
    reactor = MemoryReactor()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    try:
        # Twisted leaves serverFromString unannotated.
        parsed = serverFromString(reactor, endpoint)  # type: ignore[no-untyped-call]
        listening: Deferred[object] = parsed.listen(Factory())
    except (ValueError, TypeError, KeyError, IndexError, OSError):
        return "listens on addresses that taskmesh cannot determine"
    failures: list[object] = []
    listening.addErrback(failures.append)

    interfaces = [server[3] for server in reactor.tcpServers]
    interfaces += [server[4] for server in reactor.sslServers]
    if failures or not (interfaces or reactor.unixServers):
        return "listens on addresses that taskmesh cannot determine"
    for interface in interfaces:
        if _is_any_address(interface):
            return "listens on all addresses"
        if not _is_loopback(interface):
            return f"listens on {interface}, which is not a loopback address"
    return None


def _is_any_address(interface: str) -> bool:
    if interface == "":
        return True
    try:
        return ipaddress.ip_address(interface).is_unspecified
    except ValueError:
        return False


def _is_loopback(interface: str) -> bool:
    if interface.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(interface)
    except ValueError:
        # Another host name: it may resolve to any address.
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def read_token_file(path: str, *, owner_only: bool, min_length: int = 1) -> str:
    """
    Read a token from ``path``: the file's content without surrounding
    whitespace.

    Args:
        path: the token file.
        owner_only: reject a file that group or others may read or write.
        min_length: the minimum number of characters of the token.

    Raises:
        TokenFileError: the file cannot be read, its mode is too open, or it
            does not contain one valid token.
    """
    try:
        with open(path, "rb") as token_file:
            mode = stat.S_IMODE(os.fstat(token_file.fileno()).st_mode)
            data = token_file.read(MAX_TOKEN_FILE_SIZE + 1)
    except FileNotFoundError:
        raise TokenFileError(f"{path} not found", needs_new_token=True) from None
    except OSError as e:
        raise TokenFileError(f"cannot read {path}: {e.strerror}", needs_new_token=False) from None

    if owner_only and mode & _SHARED_BITS:
        raise TokenFileError(
            f"{path} has mode {mode:04o}, so users other than its owner can read or change"
            f" the token: run chmod 600 {path}",
            needs_new_token=False,
        )
    if len(data) > MAX_TOKEN_FILE_SIZE:
        raise TokenFileError(
            f"{path} is larger than {MAX_TOKEN_FILE_SIZE} bytes: expected a file with one token",
            needs_new_token=True,
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise TokenFileError(
            f"{path} contains bytes that are not ASCII: expected one token of visible"
            " ASCII characters",
            needs_new_token=True,
        ) from None
    try:
        return check_token(text.strip(), min_length=min_length)
    except ValueError as e:
        raise TokenFileError(f"{path} {e}", needs_new_token=True) from None


def check_token(token: str, *, min_length: int = 1) -> str:
    """
    Return ``token`` if it can be sent as a bearer token.

    Raises:
        ValueError: the token is empty, shorter than ``min_length``, or has
            characters other than visible ASCII. The message starts with a
            verb, so that callers can put the token's source in front, and
            never contains the token.
    """
    if not token:
        raise ValueError("is empty: expected one token")
    if not _TOKEN.match(token):
        raise ValueError(
            "contains spaces, line breaks or characters that are not visible ASCII:"
            " expected one token"
        )
    if len(token) < min_length:
        raise ValueError(
            f"has a token of {len(token)} characters, fewer than the minimum of {min_length}"
        )
    return token

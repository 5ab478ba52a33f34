"""
Key files: Ed25519 signing keys, public keyrings and payload encryption keys.

Private and symmetric keys are secrets, so they are read only from regular
files that the current user owns and that group and others cannot access
(mode 0600 or stricter). Keyrings and public key files are not secret, but a
user who can change them chooses which keys may run tasks, so they must not
be writable by group or others.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import AbstractSet, Any, Callable, Mapping, NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .._messages import MessageType, validate_slave_id, validate_task_name

KEY_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
SYMMETRIC_KEY_SIZE = 32

# Key files are a few hundred bytes, so a larger file is not a key.
MAX_KEY_FILE_SIZE = 64 * 1024

_PKCS8_PEM_HEADER = b"-----BEGIN PRIVATE KEY-----"
_ENCRYPTED_PEM_HEADER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_PUBLIC_PEM_HEADER = "-----BEGIN PUBLIC KEY-----"
_SYMMETRIC_KEY_ID_CONTEXT = b"taskmesh payload key id\x00"


class KeyFileError(ValueError):
    """
    A key or keyring file that is missing, unsafe or malformed.

    The message names the file and gives the fix.
    """


class TrustedKey(NamedTuple):
    """
    A public key that a verifier accepts, and the messages that it may sign.

    ``tasks`` lists the task names that the key may send in ``task``
    messages, or is ``None`` for every task. ``types`` lists the message
    types (``taskmesh-type`` values) that the key may sign, or is ``None``
    for every type. ``slave_ids`` lists the ``slave_id`` header values that
    the key may sign, so that one slave's key cannot speak for another
    slave, or is ``None`` for every slave id.
    """

    public_key: Ed25519PublicKey
    tasks: frozenset[str] | None = None
    types: frozenset[str] | None = None
    name: str = ""
    slave_ids: frozenset[str] | None = None


@dataclass(frozen=True)
class SigningKey:
    """
    An Ed25519 private key and the key id of its public key.
    """

    private_key: Ed25519PrivateKey = field(repr=False)
    key_id: str


@dataclass(frozen=True)
class SymmetricKey:
    """
    A 256-bit AES key for payload encryption and its key id.

    The key id is derived with SHA-256 from the key, so it names the key
    without revealing it.
    """

    key: bytes = field(repr=False)
    key_id: str

    def __post_init__(self) -> None:
        if len(self.key) != SYMMETRIC_KEY_SIZE:
            raise ValueError(
                f"invalid payload key: expected {SYMMETRIC_KEY_SIZE} bytes, got {len(self.key)}"
            )

    @classmethod
    def from_bytes(cls, key: bytes) -> SymmetricKey:
        """
        Wrap raw key bytes and derive their key id.
        """
        return cls(key, symmetric_key_id(key))


# Key ids


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """
    Return the key id of a public key: the first 16 hex digits of the
    SHA-256 digest of its 32 raw bytes.
    """
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def symmetric_key_id(key: bytes) -> str:
    """
    Return the key id of a payload key: the first 16 hex digits of the
    SHA-256 digest of a fixed context string followed by the key.
    """
    return hashlib.sha256(_SYMMETRIC_KEY_ID_CONTEXT + key).hexdigest()[:16]


# Secret files


def _read_secret_file(path: Path, file_kind: str) -> bytes:
    """
    Read a file that contains a secret, after checking its owner and mode.

    The checks run on the open file descriptor, so the file that is checked
    is the file that is read. Symbolic links are followed, and the checks
    apply to their target.
    """
    return _read_checked(path, file_kind, _check_secret_status)


def _read_public_file(path: Path, file_kind: str) -> bytes:
    """
    Read a keyring or public key file that group and others cannot change.
    """
    return _read_checked(path, file_kind, _check_public_status)


def _read_checked(
    path: Path, file_kind: str, check: Callable[[os.stat_result, Path, str], None]
) -> bytes:
    try:
        # O_NONBLOCK keeps a FIFO from blocking the open. The check below
        # then rejects it as not a regular file.
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise KeyFileError(f"cannot read {file_kind} {path}: {e.strerror}") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(f"{file_kind} {path} is not a regular file")
        check(status, path, file_kind)
        data = _read_up_to(descriptor, MAX_KEY_FILE_SIZE + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read {file_kind} {path}: {e.strerror}") from None
    finally:
        os.close(descriptor)
    if len(data) > MAX_KEY_FILE_SIZE:
        raise KeyFileError(
            f"{file_kind} {path} is larger than {MAX_KEY_FILE_SIZE} bytes, so it is not a"
            " key file"
        )
    return data


def _read_up_to(descriptor: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(descriptor, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _check_secret_status(status: os.stat_result, path: Path, file_kind: str) -> None:
    user = os.geteuid()
    if status.st_uid != user:
        raise KeyFileError(
            f"{file_kind} {path} is owned by uid {status.st_uid}, not by the user that runs"
            f" taskmesh (uid {user}); run 'chown {user} {path}' or start taskmesh as its"
            " owner"
        )
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{file_kind} {path} has mode {mode:04o}, so other users may read it;"
            f" run 'chmod 600 {path}'"
        )


def _check_public_status(status: os.stat_result, path: Path, file_kind: str) -> None:
    user = os.geteuid()
    if status.st_uid not in (user, 0):
        raise KeyFileError(
            f"{file_kind} {path} is owned by uid {status.st_uid}, which is neither root"
            f" nor the user that runs taskmesh (uid {user}); run 'chown root {path}'"
        )
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o022:
        raise KeyFileError(
            f"{file_kind} {path} has mode {mode:04o}, so other users may change which"
            f" keys are trusted; run 'chmod go-w {path}'"
        )


# Signing keys


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """
    Load an unencrypted PKCS#8 PEM Ed25519 private key, as written by
    ``taskmesh-keygen``.

    Raises:
        KeyFileError: the file is missing, owned by another user, readable
            by group or others, or does not contain an unencrypted Ed25519
            private key.
    """
    path = Path(path)
    data = _read_secret_file(path, "private key file")
    if _ENCRYPTED_PEM_HEADER in data:
        raise KeyFileError(
            f"private key file {path} is encrypted with a passphrase; taskmesh daemons start"
            " unattended, so protect the key with file permissions instead"
        )
    if _PKCS8_PEM_HEADER not in data:
        raise KeyFileError(
            f"private key file {path} is not a PKCS#8 PEM private key (expected a"
            f" '{_PKCS8_PEM_HEADER.decode()}' line); create one with taskmesh-keygen"
        )
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"private key file {path} is not a valid PEM private key: {e}") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(
            f"private key file {path} contains a {type(private_key).__name__}, not an"
            " Ed25519 key"
        )
    return SigningKey(private_key, key_id_of(private_key.public_key()))


def parse_public_key(text: str, source: str) -> Ed25519PublicKey:
    """
    Parse an Ed25519 public key given as PEM or as the base64 of its 32 raw
    bytes. ``source`` names where the text came from, for error messages.

    Raises:
        KeyFileError: the text is neither.
    """
    text = text.strip()
    if _PUBLIC_PEM_HEADER in text:
        try:
            public_key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as e:
            raise KeyFileError(f"{source}: not a valid PEM public key: {e}") from None
        if not isinstance(public_key, Ed25519PublicKey):
            raise KeyFileError(
                f"{source}: contains a {type(public_key).__name__}, not an Ed25519 public key"
            )
        return public_key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(
            f"{source}: expected a PEM public key or the base64 of 32 raw Ed25519 key bytes"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """
    Load an Ed25519 public key file (PEM or base64 of the raw key).

    Raises:
        KeyFileError: the file is missing, writable by group or others, or
            does not contain an Ed25519 public key.
    """
    path = Path(path)
    data = _read_public_file(path, "public key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"public key file {path} is not ASCII text") from None
    return parse_public_key(text, f"public key file {path}")


# Keyrings


def load_keyring(path: str | os.PathLike[str]) -> dict[str, TrustedKey]:
    """
    Load the public keys that a verifier trusts, by key id.

    A file whose name ends in ``.json`` contains
    ``{"keys": [{"name": ..., "public_key": ..., "tasks": [...], "types": [...]}]}``.
    Any other file is INI with one section per key and the same entries, with
    list items separated by commas or whitespace. Each key
    gives ``public_key`` (PEM or base64 of the raw key) or
    ``public_key_file`` (relative to the keyring's directory). ``tasks``,
    ``types`` and ``slave_ids`` are optional and mean "all" when missing. An optional
    ``key_id`` must match the key.

    Raises:
        KeyFileError: the file is unsafe or malformed, lists no key, or lists
            one key twice.
    """
    path = Path(path)
    data = _read_public_file(path, "keyring")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"keyring {path} is not UTF-8 text") from None
    if path.suffix == ".json":
        entries = _json_entries(text, path)
    else:
        entries = _ini_entries(text, path)

    keyring: dict[str, TrustedKey] = {}
    for name, entry in entries:
        source = f"keyring {path}, key {name!r}"
        trusted = _trusted_key(entry, name, source, path.parent)
        key_id = key_id_of(trusted.public_key)
        if key_id in keyring:
            raise KeyFileError(
                f"{source}: key id {key_id} is already listed as {keyring[key_id].name!r}"
            )
        keyring[key_id] = trusted
    if not keyring:
        raise KeyFileError(f"keyring {path} lists no keys, so every message would be rejected")
    return keyring


def _json_entries(text: str, path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    try:
        loaded = json.loads(text)
    except ValueError as e:
        raise KeyFileError(f"keyring {path} is not valid JSON: {e}") from None
    keys = loaded.get("keys") if isinstance(loaded, dict) else None
    if not isinstance(keys, list):
        raise KeyFileError(f"keyring {path}: expected an object with a 'keys' list")
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for index, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise KeyFileError(f"keyring {path}: entry {index} of 'keys' is not an object")
        name = entry.get("name", f"#{index}")
        entries.append((str(name), entry))
    return entries


def _ini_entries(text: str, path: Path) -> list[tuple[str, Mapping[str, Any]]]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as e:
        raise KeyFileError(f"keyring {path} is not a valid INI file: {e}") from None
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for name in parser.sections():
        section: dict[str, Any] = dict(parser[name])
        for list_key in ("tasks", "types", "slave_ids"):
            if list_key in section:
                section[list_key] = section[list_key].replace(",", " ").split()
        entries.append((name, section))
    return entries


_ENTRY_KEYS = {
    "name",
    "key_id",
    "public_key",
    "public_key_file",
    "tasks",
    "types",
    "slave_ids",
    "comment",
}


def _trusted_key(entry: Mapping[str, Any], name: str, source: str, directory: Path) -> TrustedKey:
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise KeyFileError(
            f"{source}: unknown entries {', '.join(sorted(unknown))}; expected"
            f" {', '.join(sorted(_ENTRY_KEYS))}"
        )
    inline = entry.get("public_key")
    file_name = entry.get("public_key_file")
    if (inline is None) == (file_name is None):
        raise KeyFileError(f"{source}: give exactly one of public_key and public_key_file")
    if inline is not None:
        if not isinstance(inline, str):
            raise KeyFileError(f"{source}: public_key must be a string")
        public_key = parse_public_key(inline, source)
    else:
        if not isinstance(file_name, str):
            raise KeyFileError(f"{source}: public_key_file must be a string")
        try:
            public_key = load_public_key(directory / file_name)
        except KeyFileError as e:
            raise KeyFileError(f"{source}: {e}") from None

    expected_id = entry.get("key_id")
    actual_id = key_id_of(public_key)
    if expected_id is not None and expected_id != actual_id:
        raise KeyFileError(f"{source}: key_id {expected_id!r} does not match the key ({actual_id})")
    return TrustedKey(
        public_key,
        tasks=_task_names(entry.get("tasks"), source),
        types=_message_types(entry.get("types"), source),
        slave_ids=_slave_ids(entry.get("slave_ids"), source),
        name=name,
    )


def _task_names(value: Any, source: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise KeyFileError(f"{source}: tasks must be a list of task names")
    try:
        return frozenset(validate_task_name(item) for item in value)
    except ValueError as e:
        raise KeyFileError(f"{source}: {e}") from None


def _slave_ids(value: Any, source: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise KeyFileError(f"{source}: slave_ids must be a list of slave ids")
    try:
        return frozenset(validate_slave_id(item) for item in value)
    except ValueError as e:
        raise KeyFileError(f"{source}: {e}") from None


def _message_types(value: Any, source: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise KeyFileError(f"{source}: types must be a list of message types")
    known = {kind.value for kind in MessageType}
    unknown = set(value) - known
    if unknown:
        raise KeyFileError(
            f"{source}: unknown message types {', '.join(sorted(unknown))}; expected some of"
            f" {', '.join(kind.value for kind in MessageType)}"
        )
    return frozenset(value)


def normalize_trusted(
    trusted: Mapping[str, TrustedKey | tuple[Ed25519PublicKey, AbstractSet[str] | None]],
) -> dict[str, TrustedKey]:
    """
    Turn ``key id -> TrustedKey or (public key, allowed tasks)`` into
    ``key id -> TrustedKey``, checking that each key id matches its key.

    Raises:
        ValueError: a key id does not match its public key.
    """
    normalized: dict[str, TrustedKey] = {}
    for key_id, value in trusted.items():
        if isinstance(value, TrustedKey):
            entry = value
        else:
            public_key, tasks = value
            entry = TrustedKey(public_key, None if tasks is None else frozenset(tasks))
        actual_id = key_id_of(entry.public_key)
        if key_id != actual_id:
            raise ValueError(f"key id {key_id!r} does not match its public key ({actual_id})")
        normalized[key_id] = entry
    return normalized


# Payload keys


def load_symmetric_key(path: str | os.PathLike[str]) -> SymmetricKey:
    """
    Load a payload encryption key: the base64 of 32 random bytes, as written
    by ``taskmesh-keygen --symmetric``.

    Raises:
        KeyFileError: the file is missing, owned by another user, readable
            by group or others, or does not contain a base64 256-bit key.
    """
    path = Path(path)
    data = _read_secret_file(path, "payload key file")
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != SYMMETRIC_KEY_SIZE:
        raise KeyFileError(
            f"payload key file {path} does not contain the base64 of {SYMMETRIC_KEY_SIZE}"
            " bytes; create one with 'taskmesh-keygen --symmetric PATH'"
        )
    return SymmetricKey.from_bytes(key)


# Writing keys


def generate_signing_key() -> SigningKey:
    """
    Generate a new Ed25519 key pair.
    """
    private_key = Ed25519PrivateKey.generate()
    return SigningKey(private_key, key_id_of(private_key.public_key()))


def generate_symmetric_key() -> SymmetricKey:
    """
    Generate a new random 256-bit payload key.
    """
    return SymmetricKey.from_bytes(os.urandom(SYMMETRIC_KEY_SIZE))


def private_key_pem(key: SigningKey) -> bytes:
    """
    Return a private key as unencrypted PKCS#8 PEM.
    """
    return key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """
    Return a public key as SubjectPublicKeyInfo PEM.
    """
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_base64(public_key: Ed25519PublicKey) -> str:
    """
    Return the base64 of a public key's 32 raw bytes, for a keyring entry.
    """
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def symmetric_key_text(key: SymmetricKey) -> bytes:
    """
    Return the contents of a payload key file: the base64 of the key and a
    line feed.
    """
    return base64.b64encode(key.key) + b"\n"


def write_new_file(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """
    Create ``path`` with ``mode`` and write ``data``, never overwriting a file.

    The file is created with ``O_EXCL``, so an existing file or symbolic link
    at ``path`` makes this fail. Its mode is set before any data is written.

    Raises:
        FileExistsError: ``path`` exists.
        OSError: the file cannot be created or written.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(descriptor, "wb") as new_file:
        # The umask may have cleared bits of ``mode``, so set it exactly.
        os.fchmod(new_file.fileno(), mode)
        new_file.write(data)

"""
Unit tests for SecureConnection: signing, verification and the daemons' wiring.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock

from taskmesh._config import ConfigError, SecuritySettings, load_slave_settings, require_signing
from taskmesh._messages import Destinations, TaskMessage, decode, encode
from taskmesh._secure import SLAVE_TYPES, SecureConnection
from taskmesh.security import Signer, TrustedKey, Verifier, key_id_of
from taskmesh.stomp import StompMessage
from taskmesh.testing import FakeBroker

REQUEST_ID = "0b5c8a5e-8d0f-4a59-9a2c-0e8f0f2f3c11"
TASKS = Destinations("myapp").tasks


def key_pair() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    return private, key_id_of(private.public_key())


def secure(connection, clock, signing, trusted, **kwargs) -> SecureConnection:
    private, key_id = signing
    return SecureConnection(
        connection,
        Signer(private, key_id, clock),
        Verifier({k: TrustedKey(p.public_key()) for k, p in trusted}, clock),
        clock=clock,
        **kwargs,
    )


def task_frame() -> tuple[dict[str, str], bytes]:
    return encode(TaskMessage(REQUEST_ID, "echo", {"x": 1}, "/queue/myapp.reply"))


def test_signed_task_reaches_handler() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    broker = FakeBroker()
    master_key, slave_key = key_pair(), key_pair()
    master = secure(broker.connect(), clock, master_key, [(slave_key[1], slave_key[0])])
    slave = secure(broker.connect(), clock, slave_key, [(master_key[1], master_key[0])], accept_types=SLAVE_TYPES)
    received: list[StompMessage] = []
    slave.subscribe(TASKS, received.append)
    headers, body = task_frame()
    master.send(TASKS, body, headers)
    [message] = received
    task = decode(message.headers, message.body)
    assert isinstance(task, TaskMessage)
    assert task.request_id == REQUEST_ID
    assert slave.stats["verified"] == 1


def test_unsigned_task_rejected_and_counted() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    broker = FakeBroker()
    master_key, slave_key = key_pair(), key_pair()
    slave = secure(broker.connect(), clock, slave_key, [(master_key[1], master_key[0])], accept_types=SLAVE_TYPES)
    received: list[StompMessage] = []
    slave.subscribe(TASKS, received.append)
    headers, body = task_frame()
    broker.connect().send(TASKS, body, headers)
    assert received == []
    assert slave.stats["rejected_unsigned"] == 1


def test_task_from_unknown_key_rejected() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    broker = FakeBroker()
    master_key, slave_key, intruder_key = key_pair(), key_pair(), key_pair()
    slave = secure(broker.connect(), clock, slave_key, [(master_key[1], master_key[0])], accept_types=SLAVE_TYPES)
    intruder = secure(broker.connect(), clock, intruder_key, [(slave_key[1], slave_key[0])])
    received: list[StompMessage] = []
    slave.subscribe(TASKS, received.append)
    headers, body = task_frame()
    intruder.send(TASKS, body, headers)
    assert received == []
    assert slave.stats["rejected_unknown_key"] == 1


def test_rejected_queue_message_acknowledged() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    broker = FakeBroker()
    master_key, slave_key = key_pair(), key_pair()
    slave = secure(broker.connect(), clock, slave_key, [(master_key[1], master_key[0])], accept_types=SLAVE_TYPES)
    work = Destinations("myapp").work()
    received: list[StompMessage] = []
    slave.subscribe(work, received.append, ack="client-individual", prefetch=1)
    headers, body = task_frame()
    sender = broker.connect()
    sender.send(work, body, headers)
    sender.send(work, body, headers)
    assert received == []
    assert slave.stats["rejected_unsigned"] == 2, "prefetch 1: the first was acknowledged"


def test_other_types_ignored_before_verification() -> None:
    clock = Clock()
    broker = FakeBroker()
    master_key = key_pair()
    slave = secure(broker.connect(), clock, key_pair(), [(master_key[1], master_key[0])], accept_types=SLAVE_TYPES)
    received: list[StompMessage] = []
    slave.subscribe("/topic/myapp.presence", received.append)
    broker.connect().send("/topic/myapp.presence", b"{}", {"taskmesh-type": "announce"})
    assert received == []
    assert slave.stats["ignored_types"] == 1


def test_signing_required_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="allow_unsigned = true"):
        require_signing(SecuritySettings(), "/etc/taskmesh/slave.ini")
    require_signing(SecuritySettings(allow_unsigned=True), None)


def test_security_keys_must_come_in_pairs(tmp_path: Path) -> None:
    path = tmp_path / "slave.ini"
    path.write_text("[security]\nsigning_key = slave.key\n")
    with pytest.raises(ConfigError, match="signing_key is set but keyring is not"):
        load_slave_settings(str(path), {}, {}, hostname="b1")


def test_unsafe_signing_key_file_rejected(tmp_path: Path) -> None:
    from taskmesh._keygen import main as keygen

    assert keygen(["--private", str(tmp_path / "b1.key"), "--public", str(tmp_path / "b1.pub")]) == 0
    (tmp_path / "b1.key").chmod(0o644)
    (tmp_path / "keyring.ini").write_text("[b1]\npublic_key_file = b1.pub\n")
    (tmp_path / "keyring.ini").chmod(0o644)
    path = tmp_path / "slave.ini"
    path.write_text("[security]\nsigning_key = b1.key\nkeyring = keyring.ini\n")
    with pytest.raises(ConfigError, match="chmod 600"):
        load_slave_settings(str(path), {}, {}, hostname="b1")


def test_redelivery_after_reconnect_accepted_replay_rejected() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    broker = FakeBroker()
    master_key, slave_key = key_pair(), key_pair()
    master = secure(broker.connect(), clock, master_key, [(slave_key[1], slave_key[0])])
    slave_connection = broker.connect()
    slave = secure(slave_connection, clock, slave_key, [(master_key[1], master_key[0])], accept_types=SLAVE_TYPES)
    work = Destinations("myapp").work()
    received: list[StompMessage] = []
    slave.subscribe(work, received.append, ack="client-individual", prefetch=1)
    headers, body = task_frame()
    master.send(work, body, headers)
    assert len(received) == 1

    # The connection drops before the ACK: the broker delivers the task again.
    slave_connection.disconnect()
    slave_connection.reconnect()
    assert len(received) == 2
    assert slave.stats["redeliveries_accepted"] == 1

    # The same signed message published again on this connection is a replay.
    sealed = broker.sent_to(work)[0]
    slave.ack(received[1])
    broker.connect().send(work, sealed[1], sealed[0])
    assert len(received) == 2
    assert slave.stats["rejected_replay"] == 1

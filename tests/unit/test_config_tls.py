"""
Tests for the TLS keys of the ``[broker]`` section in :mod:`taskmesh._config`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taskmesh._config import (
    BrokerSettings,
    ConfigError,
    MasterSettings,
    SlaveSettings,
    load_master_settings,
    load_slave_settings,
    stomp_settings_from,
)
from tests.certificates import CertificateAuthority


def write(tmp_path: Path, text: str, name: str = "taskmesh.ini") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def slave(path: str | None, **overrides: str | None) -> SlaveSettings:
    return load_slave_settings(path, overrides, {}, hostname="host-1")


def master(path: str | None, **overrides: str | None) -> MasterSettings:
    return load_master_settings(path, overrides, {})


@pytest.fixture
def tls_directory(tmp_path: Path) -> Path:
    """
    A directory with ca.pem, client.pem and client.key.
    """
    directory = tmp_path / "tls"
    directory.mkdir()
    authority = CertificateAuthority.create("config test CA")
    authority.write_pem(directory / "ca.pem")
    client = authority.issue("client", client=True)
    client.write_pem(directory / "client.pem", directory / "client.key")
    return directory


def test_tls_defaults() -> None:
    broker = master(None).broker

    assert broker.tls_ca_file is None
    assert broker.tls_cert_file is None
    assert broker.tls_key_file is None
    assert broker.tls_insecure is False


def test_every_tls_key(tmp_path: Path, tls_directory: Path) -> None:
    path = write(
        tmp_path,
        f"""
[broker]
uri = ssl://broker.example:61614
tls_ca_file = {tls_directory / "ca.pem"}
tls_cert_file = {tls_directory / "client.pem"}
tls_key_file = {tls_directory / "client.key"}
tls_insecure = false
""",
    )

    broker = slave(path).broker

    assert broker.tls_ca_file == str(tls_directory / "ca.pem")
    assert broker.tls_cert_file == str(tls_directory / "client.pem")
    assert broker.tls_key_file == str(tls_directory / "client.key")
    assert broker.tls_insecure is False


def test_relative_tls_paths_from_file_directory(tmp_path: Path, tls_directory: Path) -> None:
    path = write(
        tmp_path,
        "[broker]\ntls_ca_file = tls/ca.pem\n"
        "tls_cert_file = tls/client.pem\ntls_key_file = tls/client.key\n",
    )

    broker = master(path).broker

    assert broker.tls_ca_file == str(tls_directory / "ca.pem")
    assert broker.tls_cert_file == str(tls_directory / "client.pem")
    assert broker.tls_key_file == str(tls_directory / "client.key")


def test_relative_tls_path_from_command_line(
    tmp_path: Path, tls_directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tls_directory)

    broker = master(None, **{"broker.tls_ca_file": "ca.pem"}).broker

    assert broker.tls_ca_file == str(tls_directory / "ca.pem")


def test_empty_tls_values_are_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\ntls_ca_file =\ntls_cert_file =\ntls_key_file =\n")

    broker = master(path).broker

    assert broker.tls_ca_file is None
    assert broker.tls_cert_file is None
    assert broker.tls_key_file is None


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("True", True), (" false ", False)]
)
def test_tls_insecure_values(tmp_path: Path, value: str, expected: bool) -> None:
    path = write(tmp_path, f"[broker]\nuri = ssl://a:61614\ntls_insecure = {value}\n")

    assert master(path).broker.tls_insecure is expected


@pytest.mark.parametrize("value", ["yes", "1", "on", "maybe"])
def test_tls_insecure_needs_true_or_false(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[broker]\nuri = ssl://a:61614\ntls_insecure = {value}\n")

    with pytest.raises(ConfigError) as raised:
        master(path)

    assert str(raised.value) == (
        f"{path}: [broker] tls_insecure: invalid value {value!r}: expected true or false"
    )


@pytest.mark.parametrize(
    "uri", ["tcp://127.0.0.1:61613", "failover:(tcp://a:61613,tcp://b:61613)"]
)
def test_tls_insecure_without_ssl_broker(tmp_path: Path, uri: str) -> None:
    path = write(tmp_path, f"[broker]\nuri = {uri}\ntls_insecure = true\n")

    with pytest.raises(ConfigError) as raised:
        slave(path)

    assert str(raised.value) == (
        f"{path}: [broker] tls_insecure: invalid value 'true': the broker URI {uri!r}"
        " names no ssl:// broker, so there is no certificate to skip: remove tls_insecure"
    )


def test_tls_insecure_with_ssl_failover_member(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[broker]\nuri = failover:(tcp://a:61613,ssl://b:61614)\ntls_insecure = true\n"
    )

    assert master(path).broker.tls_insecure is True


def test_tls_insecure_with_ca_file(tmp_path: Path, tls_directory: Path) -> None:
    path = write(
        tmp_path,
        f"[broker]\nuri = ssl://a:61614\ntls_ca_file = {tls_directory / 'ca.pem'}\n"
        "tls_insecure = true\n",
    )

    with pytest.raises(ConfigError) as raised:
        master(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: [broker] tls_insecure: invalid value 'true': ")
    assert "tls_ca_file would be ignored" in message


@pytest.mark.parametrize(
    ("present", "missing"),
    [("tls_cert_file", "tls_key_file"), ("tls_key_file", "tls_cert_file")],
)
def test_client_certificate_needs_cert_and_key(
    tmp_path: Path, tls_directory: Path, present: str, missing: str
) -> None:
    file_name = "client.pem" if present == "tls_cert_file" else "client.key"
    path = write(tmp_path, f"[broker]\n{present} = {tls_directory / file_name}\n")

    with pytest.raises(ConfigError) as raised:
        master(path)

    assert str(raised.value) == (
        f"{path}: [broker] {present} is set but {missing} is not: a client certificate"
        " needs both, the certificate and its private key"
    )


def test_missing_ca_file_names_key_and_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[broker]\nuri = ssl://a:61614\ntls_ca_file = missing.pem\n")

    with pytest.raises(ConfigError) as raised:
        slave(path)

    assert str(raised.value) == (
        f"{path}: [broker] tls_ca_file: invalid value 'missing.pem':"
        f" {tmp_path / 'missing.pem'}: file not found"
    )


def test_invalid_ca_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not PEM\n")
    path = write(tmp_path, "[broker]\ntls_ca_file = ca.pem\n")

    with pytest.raises(ConfigError) as raised:
        master(path)

    message = str(raised.value)
    assert message.startswith(f"{path}: [broker] tls_ca_file: invalid value 'ca.pem': ")
    assert "contains no PEM certificate" in message


def test_invalid_key_file_from_command_line(tls_directory: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        master(
            None,
            **{
                "broker.tls_cert_file": str(tls_directory / "client.pem"),
                "broker.tls_key_file": str(tls_directory / "ca.pem"),
            },
        )

    message = str(raised.value)
    assert message.startswith("command line: [broker] tls_key_file: invalid value ")
    assert "contains no PEM private key" in message


def test_stomp_settings_from_passes_tls(tls_directory: Path) -> None:
    broker = BrokerSettings(
        uri="ssl://a:61614",
        tls_ca_file=str(tls_directory / "ca.pem"),
        tls_cert_file=str(tls_directory / "client.pem"),
        tls_key_file=str(tls_directory / "client.key"),
    )

    settings = stomp_settings_from(broker)

    assert settings.tls_ca_file == str(tls_directory / "ca.pem")
    assert settings.tls_cert_file == str(tls_directory / "client.pem")
    assert settings.tls_key_file == str(tls_directory / "client.key")
    assert settings.tls_insecure is False
    assert len(settings.client_tls.ca_certificates) == 1
    assert settings.client_tls.client_certificate is not None


def test_repr_shows_tls_paths() -> None:
    broker = BrokerSettings(
        uri="ssl://a:61614", tls_ca_file="/etc/taskmesh/ca.pem", tls_insecure=False
    )

    assert "tls_ca_file='/etc/taskmesh/ca.pem'" in repr(broker)
    assert "tls_insecure=False" in repr(broker)

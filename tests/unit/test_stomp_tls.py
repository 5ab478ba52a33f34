"""
Unit tests for TLS to the broker: settings, files, connection creators and
handshake failure messages. Handshakes run in memory, with no sockets.
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect

from taskmesh.stomp import (
    BrokerAddress,
    ClientTLS,
    FailoverEndpoint,
    StompClientProtocol,
    StompSettings,
    TLSError,
    TLSFileError,
    load_client_tls,
)
from taskmesh.stomp._tls import describe_tls_failure
from tests.certificates import CertificateAuthority, IssuedCertificate

LOCALHOST = "127.0.0.1"


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority.create("unit test CA")


@pytest.fixture(scope="module")
def broker_certificate(authority: CertificateAuthority) -> IssuedCertificate:
    return authority.issue("localhost", dns_names=("localhost",), ip_addresses=(LOCALHOST,))


@pytest.fixture
def ca_file(tmp_path: Path, authority: CertificateAuthority) -> str:
    path = tmp_path / "ca.pem"
    authority.write_pem(path)
    return str(path)


@pytest.fixture
def client_files(tmp_path: Path, authority: CertificateAuthority) -> tuple[str, str]:
    client = authority.issue("unit test client", client=True)
    client.write_pem(tmp_path / "client.pem", tmp_path / "client.key")
    return str(tmp_path / "client.pem"), str(tmp_path / "client.key")


def server_options(
    certificate: IssuedCertificate, client_authority: CertificateAuthority | None = None
) -> CertificateOptions:
    """
    Return server TLS options that present ``certificate``.

    With ``client_authority`` the server requires a client certificate from it.
    """
    key_pem = certificate.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private = PrivateCertificate.loadPEM(certificate.pem() + key_pem)
    if client_authority is None:
        return private.options()
    authority_pem = client_authority.certificate.public_bytes(serialization.Encoding.PEM)
    return private.options(Certificate.loadPEM(authority_pem))


class Recorder(Protocol):
    """
    A protocol that records why its connection was lost.
    """

    def __init__(self) -> None:
        self.reason: Failure | None = None

    def connectionLost(self, reason: Failure = Failure(Exception("not lost"))) -> None:
        self.reason = reason


def pump_handshake(client: Any, server_options_: CertificateOptions) -> tuple[Any, Any, IOPump]:
    """
    Connect the client-side protocol ``client`` to an in-memory TLS server and
    run the handshake. Return the server's TLS protocol, its application
    protocol and the pump.
    """
    server_factory = TLSMemoryBIOFactory(
        server_options_, False, Factory.forProtocol(Recorder), clock=Clock()
    )
    server = server_factory.buildProtocol(IPv4Address("TCP", LOCALHOST, 61614))
    pump = connect(
        server,
        FakeTransport(server, isServer=True),
        client,
        FakeTransport(client, isServer=False),
        greet=False,
    )
    pump.flush()
    return server, server.wrappedProtocol, pump


def handshake(
    creator: IOpenSSLClientConnectionCreator,
    certificate: IssuedCertificate,
    client_authority: CertificateAuthority | None = None,
) -> tuple[Recorder, Any]:
    """
    Run a TLS handshake between ``creator`` and a server that presents
    ``certificate``. Return the client's application protocol and the
    server's TLS protocol.
    """
    recorder = Recorder()
    client_factory = TLSMemoryBIOFactory(
        creator, True, Factory.forProtocol(lambda: recorder), clock=Clock()
    )
    client = client_factory.buildProtocol(IPv4Address("TCP", LOCALHOST, 61614))
    server, _, _ = pump_handshake(client, server_options(certificate, client_authority))
    return recorder, server


def peer_common_name(transport: Any) -> str:
    certificate = transport.getPeerCertificate()
    if certificate is None:
        return ""
    name: str = certificate.to_cryptography().subject.rfc4514_string()
    return name


# Settings and files


def test_settings_without_tls_files_use_system_trust() -> None:
    settings = StompSettings(uri="ssl://broker.example:61614")

    assert settings.client_tls == ClientTLS()
    assert settings.client_tls.trust_description == "the system's trusted CAs"


def test_settings_read_ca_file(ca_file: str, authority: CertificateAuthority) -> None:
    settings = StompSettings(uri="ssl://broker.example:61614", tls_ca_file=ca_file)

    assert settings.client_tls.ca_certificates == (authority.certificate,)
    assert settings.client_tls.trust_description == f"the CAs in {ca_file}"


def test_ca_file_with_several_certificates(tmp_path: Path, authority: CertificateAuthority) -> None:
    other = CertificateAuthority.create("second CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        authority.certificate.public_bytes(serialization.Encoding.PEM)
        + b"# comments between blocks are allowed\n"
        + other.certificate.public_bytes(serialization.Encoding.PEM)
    )

    tls = load_client_tls(ca_file=str(bundle))

    assert tls.ca_certificates == (authority.certificate, other.certificate)


def test_settings_read_client_certificate(client_files: tuple[str, str]) -> None:
    cert_file, key_file = client_files

    settings = StompSettings(tls_cert_file=cert_file, tls_key_file=key_file)

    certificate = settings.client_tls.client_certificate
    assert certificate is not None
    assert certificate.original.to_cryptography().subject.rfc4514_string() == (
        "CN=unit test client,O=taskmesh tests"
    )
    assert settings.client_tls.client_chain == ()


def test_settings_equality_ignores_loaded_files(ca_file: str) -> None:
    first = StompSettings(tls_ca_file=ca_file)
    second = StompSettings(tls_ca_file=ca_file)

    assert first == second
    assert "client_tls" not in repr(first)
    assert replace(first, login="me").client_tls.ca_file == ca_file


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "file not found"),
        (b"", "contains no PEM certificate"),
        (b"not a certificate\n", "contains no PEM certificate"),
        (
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            "invalid PEM certificate",
        ),
    ],
)
def test_invalid_ca_file_names_path(tmp_path: Path, content: bytes | None, reason: str) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(TLSFileError) as raised:
        StompSettings(tls_ca_file=str(path))

    assert raised.value.setting == "tls_ca_file"
    assert raised.value.path == str(path)
    assert reason in raised.value.reason
    assert str(raised.value).startswith(f"invalid tls_ca_file {str(path)!r}: ")


def test_unreadable_ca_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root.
    with pytest.raises(TLSFileError, match="cannot read the file: Is a directory"):
        load_client_tls(ca_file=str(tmp_path))


def test_encrypted_key_rejected(tmp_path: Path, authority: CertificateAuthority) -> None:
    client = authority.issue("client", client=True)
    client.write_pem(tmp_path / "client.pem", tmp_path / "client.key", password="secret")

    with pytest.raises(TLSFileError) as raised:
        load_client_tls(
            cert_file=str(tmp_path / "client.pem"), key_file=str(tmp_path / "client.key")
        )

    assert raised.value.setting == "tls_key_file"
    assert "the private key is encrypted" in raised.value.reason


def test_key_file_without_key(tmp_path: Path, client_files: tuple[str, str]) -> None:
    cert_file, _ = client_files
    # A certificate where the key belongs.
    with pytest.raises(TLSFileError) as raised:
        load_client_tls(cert_file=cert_file, key_file=cert_file)

    assert raised.value.setting == "tls_key_file"
    assert "contains no PEM private key" in raised.value.reason


def test_key_of_another_certificate_rejected(
    tmp_path: Path, authority: CertificateAuthority, client_files: tuple[str, str]
) -> None:
    cert_file, _ = client_files
    other = authority.issue("other client", client=True)
    other.write_pem(tmp_path / "other.pem", tmp_path / "other.key")

    with pytest.raises(TLSFileError) as raised:
        load_client_tls(cert_file=cert_file, key_file=str(tmp_path / "other.key"))

    assert raised.value.setting == "tls_key_file"
    assert raised.value.reason == (
        f"the private key does not belong to the certificate in {cert_file}"
    )


@pytest.mark.parametrize("missing", ["tls_cert_file", "tls_key_file"])
def test_client_certificate_needs_both_files(client_files: tuple[str, str], missing: str) -> None:
    cert_file, key_file = client_files
    files = {"tls_cert_file": cert_file, "tls_key_file": key_file}
    del files[missing]

    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file must be set together"):
        StompSettings(**files)  # type: ignore[arg-type]


def test_insecure_needs_ssl_broker() -> None:
    with pytest.raises(ValueError, match="names no ssl:// broker: remove tls_insecure"):
        StompSettings(uri="tcp://127.0.0.1:61613", tls_insecure=True)


def test_insecure_with_ssl_member_of_failover_uri() -> None:
    settings = StompSettings(uri="failover:(tcp://a:61613,ssl://b:61614)", tls_insecure=True)

    assert settings.client_tls.insecure is True


def test_insecure_excludes_ca_file(ca_file: str) -> None:
    with pytest.raises(ValueError, match="tls_ca_file .* would be ignored"):
        StompSettings(uri="ssl://a:61614", tls_ca_file=ca_file, tls_insecure=True)


# Handshakes against an in-memory server


def test_trusted_ca_and_host_name_verified(
    ca_file: str, broker_certificate: IssuedCertificate
) -> None:
    creator = load_client_tls(ca_file=ca_file).connection_creator("localhost")

    client, _ = handshake(creator, broker_certificate)

    assert client.reason is None
    assert "CN=localhost" in peer_common_name(client.transport)


def test_ip_address_verified(ca_file: str, broker_certificate: IssuedCertificate) -> None:
    creator = load_client_tls(ca_file=ca_file).connection_creator(LOCALHOST)

    client, _ = handshake(creator, broker_certificate)

    assert client.reason is None


def test_system_trust_rejects_private_ca(broker_certificate: IssuedCertificate) -> None:
    creator = ClientTLS().connection_creator("localhost")

    client, _ = handshake(creator, broker_certificate)

    assert client.reason is not None
    assert client.reason.check(SSL.Error)


def test_unrelated_ca_rejected(tmp_path: Path, broker_certificate: IssuedCertificate) -> None:
    other = CertificateAuthority.create("unrelated CA")
    other.write_pem(tmp_path / "other.pem")
    creator = load_client_tls(ca_file=str(tmp_path / "other.pem")).connection_creator("localhost")

    client, _ = handshake(creator, broker_certificate)

    assert client.reason is not None
    assert client.reason.check(SSL.Error)


def test_wrong_host_name_rejected(ca_file: str, authority: CertificateAuthority) -> None:
    wrong_host = authority.issue("wrong.example", dns_names=("wrong.example",))
    creator = load_client_tls(ca_file=ca_file).connection_creator("localhost")

    client, _ = handshake(creator, wrong_host)

    assert client.reason is not None
    assert client.reason.check(VerificationError)


def test_insecure_accepts_wrong_host_and_ca(authority: CertificateAuthority) -> None:
    wrong_host = authority.issue("wrong.example", dns_names=("wrong.example",))
    creator = ClientTLS(insecure=True).connection_creator("localhost")

    client, _ = handshake(creator, wrong_host)

    assert client.reason is None
    assert "CN=wrong.example" in peer_common_name(client.transport)


def test_client_certificate_presented(
    ca_file: str,
    client_files: tuple[str, str],
    authority: CertificateAuthority,
    broker_certificate: IssuedCertificate,
) -> None:
    cert_file, key_file = client_files
    tls = load_client_tls(ca_file=ca_file, cert_file=cert_file, key_file=key_file)

    client, server = handshake(tls.connection_creator("localhost"), broker_certificate, authority)

    assert client.reason is None
    assert "CN=unit test client" in peer_common_name(server)


def test_missing_client_certificate_rejected_by_server(
    ca_file: str, authority: CertificateAuthority, broker_certificate: IssuedCertificate
) -> None:
    creator = load_client_tls(ca_file=ca_file).connection_creator("localhost")

    client, _ = handshake(creator, broker_certificate, authority)

    assert client.reason is not None
    assert client.reason.check(SSL.Error)


def test_client_certificate_chain_sent(
    tmp_path: Path,
    ca_file: str,
    authority: CertificateAuthority,
    broker_certificate: IssuedCertificate,
) -> None:
    intermediate = authority.issue_authority("unit test intermediate CA")
    client = intermediate.issue("chained client", client=True)
    client.write_pem(tmp_path / "chained.pem", tmp_path / "chained.key")
    tls = load_client_tls(
        ca_file=ca_file,
        cert_file=str(tmp_path / "chained.pem"),
        key_file=str(tmp_path / "chained.key"),
    )

    recorder, server = handshake(tls.connection_creator("localhost"), broker_certificate, authority)

    assert len(tls.client_chain) == 1
    assert recorder.reason is None
    assert "CN=chained client" in peer_common_name(server)


def test_insecure_client_certificate_presented(
    client_files: tuple[str, str],
    authority: CertificateAuthority,
    broker_certificate: IssuedCertificate,
) -> None:
    cert_file, key_file = client_files
    tls = replace(load_client_tls(cert_file=cert_file, key_file=key_file), insecure=True)

    client, server = handshake(tls.connection_creator("localhost"), broker_certificate, authority)

    assert client.reason is None
    assert "CN=unit test client" in peer_common_name(server)


# FailoverEndpoint


def test_endpoint_wraps_only_ssl_members(ca_file: str) -> None:
    tcp = BrokerAddress("tcp", LOCALHOST, 61613)
    ssl = BrokerAddress("ssl", LOCALHOST, 61614)

    tls = load_client_tls(ca_file=ca_file)

    endpoint = FailoverEndpoint(MemoryReactorClock(), (tcp, ssl), tls=tls)

    assert endpoint.connection_creator(tcp) is None
    assert endpoint.connection_creator(ssl) is not None


def test_endpoint_verifies_with_ca_file(
    ca_file: str, broker_certificate: IssuedCertificate
) -> None:
    reactor = MemoryReactorClock()
    endpoint = FailoverEndpoint(
        reactor, (BrokerAddress("ssl", LOCALHOST, 61614),), tls=load_client_tls(ca_file=ca_file)
    )

    connected = endpoint.connect(Factory.forProtocol(Recorder))
    host, port, factory, _, _ = reactor.tcpClients[0]
    client = factory.buildProtocol(IPv4Address("TCP", host, port))
    pump_handshake(client, server_options(broker_certificate))

    recorder = connected.result
    assert (host, port) == (LOCALHOST, 61614)
    assert recorder.reason is None
    assert "CN=localhost" in peer_common_name(recorder.transport)


def test_endpoint_rejects_unrelated_ca(
    tmp_path: Path, broker_certificate: IssuedCertificate
) -> None:
    other = CertificateAuthority.create("unrelated CA")
    other.write_pem(tmp_path / "other.pem")
    reactor = MemoryReactorClock()
    endpoint = FailoverEndpoint(
        reactor,
        (BrokerAddress("ssl", LOCALHOST, 61614),),
        tls=load_client_tls(ca_file=str(tmp_path / "other.pem")),
    )

    connected = endpoint.connect(Factory.forProtocol(Recorder))
    _, _, factory, _, _ = reactor.tcpClients[0]
    pump_handshake(factory.buildProtocol(None), server_options(broker_certificate))

    recorder = connected.result
    assert recorder.reason is not None
    assert recorder.reason.check(SSL.Error)


def test_endpoint_insecure_warns_on_every_attempt() -> None:
    reactor = MemoryReactorClock()
    endpoint = FailoverEndpoint(
        reactor, (BrokerAddress("ssl", LOCALHOST, 61614),), tls=ClientTLS(insecure=True)
    )

    with capturedLogs() as events:
        endpoint.connect(Factory.forProtocol(Recorder))
        endpoint.connect(Factory.forProtocol(Recorder))

    warnings = [event for event in events if "NOT verified" in event["log_format"]]
    assert len(warnings) == 2
    assert warnings[0]["broker"] == f"ssl://{LOCALHOST}:61614"
    assert warnings[0]["log_level"].name == "warn"


def test_endpoint_verified_logs_no_warning(ca_file: str) -> None:
    reactor = MemoryReactorClock()
    endpoint = FailoverEndpoint(
        reactor, (BrokerAddress("ssl", LOCALHOST, 61614),), tls=load_client_tls(ca_file=ca_file)
    )

    with capturedLogs() as events:
        endpoint.connect(Factory.forProtocol(Recorder))

    assert not [event for event in events if "NOT verified" in event["log_format"]]


# Failure messages


def stomp_over_tls(
    settings: StompSettings, host: str, certificate: IssuedCertificate
) -> BaseException:
    """
    Run the STOMP client's TLS handshake against an in-memory server, and
    return the error that the client's CONNECTED waiter fails with.
    """
    clock = Clock()
    protocol = StompClientProtocol(settings, clock, host=host)
    failures: list[Failure] = []
    protocol.when_connected().addErrback(failures.append)
    creator = settings.client_tls.connection_creator(host)
    factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: protocol), clock=clock)

    pump_handshake(factory.buildProtocol(None), server_options(certificate))

    assert len(failures) == 1
    return failures[0].value


def test_protocol_reports_unrelated_ca(
    tmp_path: Path, broker_certificate: IssuedCertificate
) -> None:
    other = CertificateAuthority.create("unrelated CA")
    other.write_pem(tmp_path / "other.pem")
    settings = StompSettings(uri="ssl://localhost:61614", tls_ca_file=str(tmp_path / "other.pem"))

    error = stomp_over_tls(settings, "localhost", broker_certificate)

    assert isinstance(error, TLSError)
    assert str(error) == (
        "TLS handshake failed: certificate verify failed: the broker's certificate"
        " CN=localhost,O=taskmesh tests is issued by CN=unit test CA,O=taskmesh tests,"
        f" and no CA of this chain is among the CAs in {tmp_path / 'other.pem'}"
    )


def test_protocol_reports_hostname_mismatch(ca_file: str, authority: CertificateAuthority) -> None:
    wrong_host = authority.issue(
        "wrong.example", dns_names=("wrong.example",), ip_addresses=("192.0.2.1",)
    )
    settings = StompSettings(uri="ssl://localhost:61614", tls_ca_file=ca_file)

    error = stomp_over_tls(settings, "localhost", wrong_host)

    assert isinstance(error, TLSError)
    assert str(error) == (
        "TLS handshake failed: hostname mismatch: the broker's certificate is for"
        " DNS:wrong.example, IP:192.0.2.1, not for 'localhost'"
    )


def test_protocol_reports_system_trust(broker_certificate: IssuedCertificate) -> None:
    settings = StompSettings(uri="ssl://localhost:61614")

    error = stomp_over_tls(settings, "localhost", broker_certificate)

    assert str(error) == (
        "TLS handshake failed: certificate verify failed: the broker's certificate"
        " CN=localhost,O=taskmesh tests is issued by CN=unit test CA,O=taskmesh tests,"
        " and OpenSSL found no valid chain from it to the system's trusted CAs"
    )


def test_protocol_keeps_plain_errors(ca_file: str) -> None:
    protocol = StompClientProtocol(StompSettings(tls_ca_file=ca_file), Clock(), host="localhost")
    failures: list[Failure] = []
    protocol.when_connected().addErrback(failures.append)
    protocol.makeConnection(FakeTransport(protocol, isServer=False))

    protocol.connectionLost(Failure(ConnectionResetError("reset by peer")))

    assert len(failures) == 1
    assert not isinstance(failures[0].value, TLSError)
    assert str(failures[0].value) == "connection to the broker closed: reset by peer"


def test_protocol_timeout_names_unfinished_handshake(ca_file: str) -> None:
    # A plain TCP server that never replies to the ClientHello, like a plain
    # STOMP port behind an ssl:// URI.
    clock = Clock()
    settings = StompSettings(uri="ssl://localhost:61613", tls_ca_file=ca_file, connect_timeout=5.0)
    protocol = StompClientProtocol(settings, clock, host="localhost")
    failures: list[Failure] = []
    protocol.when_connected().addErrback(failures.append)
    creator = settings.client_tls.connection_creator("localhost")
    factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: protocol), clock=clock)
    client = factory.buildProtocol(None)
    server = Recorder()
    pump = connect(
        server,
        FakeTransport(server, isServer=True),
        client,
        FakeTransport(client, isServer=False),
        greet=False,
    )
    pump.flush()

    clock.advance(5.0)
    pump.flush()

    assert len(failures) == 1
    assert str(failures[0].value) == (
        "no CONNECTED frame from the broker within 5 s, and the TLS handshake did not"
        " complete: check that the port accepts STOMP over TLS"
    )


def verify_failed() -> Failure:
    return Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))


def test_describe_expired_certificate(broker_certificate: IssuedCertificate, ca_file: str) -> None:
    later = broker_certificate.certificate.not_valid_after_utc + datetime.timedelta(days=1)

    leaf = broker_certificate.certificate

    error = describe_tls_failure(
        verify_failed(), "localhost", [leaf], load_client_tls(ca_file=ca_file), later
    )

    assert str(error) == (
        "TLS handshake failed: certificate verify failed: the broker's certificate"
        f" CN=localhost,O=taskmesh tests expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )


def test_describe_certificate_not_yet_valid(
    broker_certificate: IssuedCertificate, ca_file: str
) -> None:
    earlier = broker_certificate.certificate.not_valid_before_utc - datetime.timedelta(days=1)

    error = describe_tls_failure(
        verify_failed(),
        "localhost",
        [broker_certificate.certificate],
        load_client_tls(ca_file=ca_file),
        earlier,
    )

    assert error is not None
    assert "is not valid before" in str(error)


def test_describe_trusted_issuer_rejected_for_other_reason(
    broker_certificate: IssuedCertificate, ca_file: str
) -> None:
    error = describe_tls_failure(
        verify_failed(),
        "localhost",
        [broker_certificate.certificate],
        load_client_tls(ca_file=ca_file),
    )

    assert error is not None
    assert "and a CA of this chain is among the CAs in" in str(error)
    assert "OpenSSL rejected the chain" in str(error)


def test_describe_chain_from_unrelated_root(tmp_path: Path, ca_file: str) -> None:
    root = CertificateAuthority.create("other root")
    intermediate = root.issue_authority("other intermediate")
    leaf = intermediate.issue("localhost", dns_names=("localhost",))

    error = describe_tls_failure(
        verify_failed(),
        "localhost",
        [leaf.certificate, intermediate.certificate],
        load_client_tls(ca_file=ca_file),
    )

    assert str(error) == (
        "TLS handshake failed: certificate verify failed: the broker's certificate"
        " CN=localhost,O=taskmesh tests is issued by CN=other intermediate,O=taskmesh tests,"
        " and its chain ends at CN=other root,O=taskmesh tests, and no CA of this chain is"
        f" among the CAs in {ca_file}"
    )


def test_describe_without_peer_certificate(ca_file: str) -> None:
    error = describe_tls_failure(verify_failed(), "localhost", [], load_client_tls(ca_file=ca_file))

    assert str(error) == (
        "TLS handshake failed: certificate verify failed: the broker's certificate does not"
        f" chain to the CAs in {ca_file}, or it is expired or not yet valid"
    )


def test_describe_other_openssl_error() -> None:
    reason = Failure(SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")]))

    error = describe_tls_failure(reason, "localhost", [], ClientTLS())

    assert str(error) == "TLS connection failed: tlsv13 alert certificate required"


def test_describe_reply_without_tls() -> None:
    reason = Failure(SSL.Error([("SSL routines", "", "wrong version number")]))

    error = describe_tls_failure(reason, "localhost", [], ClientTLS())

    assert str(error) == (
        "TLS connection failed: wrong version number: the broker did not reply with TLS,"
        " check that the port accepts STOMP over TLS"
    )


def test_protocol_reports_plain_stomp_reply(ca_file: str) -> None:
    class PlainStompServer(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"ERROR\nmessage:Unknown STOMP action\n\n\x00")
            self.transport.loseConnection()

    clock = Clock()
    settings = StompSettings(uri="ssl://localhost:61613", tls_ca_file=ca_file)
    protocol = StompClientProtocol(settings, clock, host="localhost")
    failures: list[Failure] = []
    protocol.when_connected().addErrback(failures.append)
    creator = settings.client_tls.connection_creator("localhost")
    factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: protocol), clock=clock)
    client = factory.buildProtocol(None)
    server = PlainStompServer()

    pump = connect(
        server, FakeTransport(server, True), client, FakeTransport(client, False), greet=False
    )
    pump.flush()

    assert len(failures) == 1
    assert isinstance(failures[0].value, TLSError)
    assert "the broker did not reply with TLS" in str(failures[0].value)


def test_describe_ignores_other_errors() -> None:
    reason = Failure(ConnectionResetError())

    assert describe_tls_failure(reason, "localhost", [], ClientTLS()) is None

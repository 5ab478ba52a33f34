"""
TLS for ``ssl://`` brokers: the trusted CAs and the client certificate, read
once from PEM files, and readable reasons for failed handshakes.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from OpenSSL.crypto import FILETYPE_PEM
from service_identity import VerificationError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ._errors import TLSError

SYSTEM_TRUST = "the system's trusted CAs"

# OpenSSL's reasons when the peer's first bytes are not a TLS record, as
# when a plain STOMP port replies to the ClientHello with an ERROR frame.
_NOT_TLS_REASONS = ("wrong version number", "packet length too long")


class TLSFileError(ValueError):
    """
    A TLS file that is missing, unreadable or invalid.

    ``setting`` names the setting that points to the file (``tls_ca_file``,
    ``tls_cert_file`` or ``tls_key_file``), ``path`` the file, and
    ``reason`` what is wrong with it.
    """

    def __init__(self, setting: str, path: str, reason: str) -> None:
        self.setting = setting
        self.path = path
        self.reason = reason
        super().__init__(f"invalid {setting} {path!r}: {reason}")


@dataclass(frozen=True)
class ClientTLS:
    """
    The TLS configuration of a client, with every file already read.

    Attributes:
        ca_certificates: CA certificates to trust instead of the system's
            trust store; empty for the system's trust store.
        ca_file: The file that ``ca_certificates`` came from, for messages.
        client_certificate: The certificate and private key that the client
            presents when the broker requests one, or ``None``.
        client_chain: Intermediate CA certificates sent after
            ``client_certificate``.
        insecure: Accept any server certificate for any host name.
    """

    ca_certificates: tuple[x509.Certificate, ...] = ()
    ca_file: str | None = None
    client_certificate: PrivateCertificate | None = field(default=None, repr=False)
    client_chain: tuple[Certificate, ...] = field(default=(), repr=False)
    insecure: bool = False

    @property
    def trust_description(self) -> str:
        """
        The CAs that verify the broker, as a phrase for messages.
        """
        if self.ca_file is None:
            return SYSTEM_TRUST
        return f"the CAs in {self.ca_file}"

    def connection_creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """
        Build the TLS connection creator for the broker ``host``.

        The broker's certificate must chain to a trusted CA and name
        ``host`` as a DNS name or IP address in its subject alternative
        names, unless ``insecure`` is set.
        """
        chain = [certificate.original for certificate in self.client_chain]
        if self.insecure:
            client = self.client_certificate
            options = CertificateOptions(
                privateKey=client.privateKey.original if client is not None else None,
                certificate=client.original if client is not None else None,
                extraCertChain=chain or None,
                verify=False,
            )
            return _UnverifiedConnectionCreator(options, host)

        trust_root = None
        if self.ca_certificates:
            # Twisted leaves trustRootFromCertificates unannotated.
            trust_root = trustRootFromCertificates(  # type: ignore[no-untyped-call]
                [_twisted_certificate(certificate) for certificate in self.ca_certificates]
            )
        return optionsForClientTLS(
            host,
            trustRoot=trust_root,
            clientCertificate=self.client_certificate,
            extraCertificateOptions={"extraCertChain": chain} if chain else None,
        )


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedConnectionCreator:
    """
    A connection creator that checks neither the certificate nor the host name.

    It still sends the host name with Server Name Indication, so that a
    broker that serves several names picks the same certificate as for a
    verifying client.
    """

    def __init__(self, options: CertificateOptions, host: str) -> None:
        self._options = options
        is_address = isIPAddress(host) or isIPv6Address(host)
        self._server_name = None if is_address else host.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def load_client_tls(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    insecure: bool = False,
) -> ClientTLS:
    """
    Read the PEM files of a client TLS configuration.

    ``ca_file`` contains one or more CA certificates. ``cert_file`` contains
    the client certificate, optionally followed by intermediate CA
    certificates, and ``key_file`` its unencrypted private key. Give both or
    neither.

    Raises:
        TLSFileError: a file is missing, unreadable or invalid, or the key
            does not belong to the certificate.
        ValueError: only one of ``cert_file`` and ``key_file`` is given.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError(
            "tls_cert_file and tls_key_file must be set together:"
            f" tls_cert_file is {cert_file!r} and tls_key_file is {key_file!r}"
        )
    ca_certificates: tuple[x509.Certificate, ...] = ()
    if ca_file is not None:
        ca_certificates = tuple(_load_certificates("tls_ca_file", ca_file))

    client_certificate = None
    client_chain: tuple[Certificate, ...] = ()
    if cert_file is not None and key_file is not None:
        chain = _load_certificates("tls_cert_file", cert_file)
        key = _load_private_key("tls_key_file", key_file)
        if _public_key_der(chain[0]) != _public_key_der(key):
            raise TLSFileError(
                "tls_key_file",
                key_file,
                f"the private key does not belong to the certificate in {cert_file}",
            )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        key_pair = KeyPair.load(key_pem, FILETYPE_PEM)
        # Twisted leaves fromCertificateAndKeyPair unannotated.
        from_pair = PrivateCertificate.fromCertificateAndKeyPair
        client_certificate = from_pair(  # type: ignore[no-untyped-call]
            _twisted_certificate(chain[0]), key_pair
        )
        client_chain = tuple(_twisted_certificate(certificate) for certificate in chain[1:])

    return ClientTLS(
        ca_certificates=ca_certificates,
        ca_file=ca_file,
        client_certificate=client_certificate,
        client_chain=client_chain,
        insecure=insecure,
    )


def describe_tls_failure(
    reason: Failure,
    host: str,
    peer_chain: Sequence[x509.Certificate],
    tls: ClientTLS,
    now: datetime.datetime | None = None,
) -> TLSError | None:
    """
    Explain why a TLS connection to the broker ``host`` failed.

    ``peer_chain`` is the certificate chain that the broker sent, leaf
    first, or empty when none arrived. Returns ``None`` when ``reason`` is
    not a TLS error.
    """
    leaf = peer_chain[0] if peer_chain else None
    if isinstance(reason.value, VerificationError):
        names = _subject_alternative_names(leaf) if leaf is not None else []
        if names:
            detail = f"the broker's certificate is for {', '.join(names)}, not for {host!r}"
        else:
            detail = f"the broker's certificate does not name {host!r}"
        return TLSError(f"TLS handshake failed: hostname mismatch: {detail}")
    if not isinstance(reason.value, SSL.Error):
        return None

    errors = _openssl_reasons(reason.value)
    summary = "; ".join(errors) or reason.getErrorMessage()
    if any(error in _NOT_TLS_REASONS for error in errors):
        return TLSError(
            f"TLS connection failed: {summary}: the broker did not reply with TLS,"
            " check that the port accepts STOMP over TLS"
        )
    if "certificate verify failed" not in errors:
        return TLSError(f"TLS connection failed: {summary}")
    prefix = "TLS handshake failed: certificate verify failed"
    if leaf is None:
        return TLSError(
            f"{prefix}: the broker's certificate does not chain to {tls.trust_description},"
            " or it is expired or not yet valid"
        )

    moment = now or datetime.datetime.now(datetime.timezone.utc)
    subject = leaf.subject.rfc4514_string()
    if moment > leaf.not_valid_after_utc:
        return TLSError(
            f"{prefix}: the broker's certificate {subject} expired on"
            f" {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if moment < leaf.not_valid_before_utc:
        return TLSError(
            f"{prefix}: the broker's certificate {subject} is not valid before"
            f" {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    origin = f"the broker's certificate {subject} is issued by {leaf.issuer.rfc4514_string()}"
    # The last certificate that the broker sent is the one closest to the root.
    top_issuer = peer_chain[-1].issuer
    if top_issuer != leaf.issuer:
        origin += f", and its chain ends at {top_issuer.rfc4514_string()}"
    if not tls.ca_certificates:
        return TLSError(
            f"{prefix}: {origin}, and OpenSSL found no valid chain from it to"
            f" {tls.trust_description}"
        )
    trusted = {certificate.subject for certificate in tls.ca_certificates}
    if any(certificate.issuer in trusted for certificate in peer_chain):
        return TLSError(
            f"{prefix}: {origin}, and a CA of this chain is among {tls.trust_description},"
            " but OpenSSL rejected the chain: check the validity dates, CA flag and key usage"
            " of each certificate"
        )
    return TLSError(
        f"{prefix}: {origin}, and no CA of this chain is among {tls.trust_description}"
    )


def _load_certificates(setting: str, path: str) -> list[x509.Certificate]:
    data = _read(setting, path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise TLSFileError(
                setting, path, "contains no PEM certificate (a '-----BEGIN CERTIFICATE-----' block)"
            ) from None
        raise TLSFileError(setting, path, f"invalid PEM certificate: {e}") from None
    return certificates


def _load_private_key(setting: str, path: str) -> PrivateKeyTypes:
    data = _read(setting, path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError for an encrypted key without a password.
        raise TLSFileError(
            setting,
            path,
            "the private key is encrypted, but taskmesh reads only unencrypted keys:"
            " protect the file with permissions instead (mode 0600)",
        ) from None
    except ValueError as e:
        if b"PRIVATE KEY-----" not in data:
            raise TLSFileError(
                setting, path, "contains no PEM private key (a '-----BEGIN PRIVATE KEY-----' block)"
            ) from None
        raise TLSFileError(setting, path, f"invalid PEM private key: {e}") from None


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as pem_file:
            return pem_file.read()
    except FileNotFoundError:
        raise TLSFileError(setting, path, "file not found") from None
    except OSError as e:
        raise TLSFileError(setting, path, f"cannot read the file: {e.strerror}") from None


def _public_key_der(owner: x509.Certificate | PrivateKeyTypes) -> bytes:
    return owner.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _twisted_certificate(certificate: x509.Certificate) -> Certificate:
    return Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))


def _subject_alternative_names(certificate: x509.Certificate) -> list[str]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = [f"DNS:{name}" for name in extension.value.get_values_for_type(x509.DNSName)]
    names += [f"IP:{address}" for address in extension.value.get_values_for_type(x509.IPAddress)]
    return names


def _openssl_reasons(error: BaseException) -> list[str]:
    # pyOpenSSL's SSL.Error carries a list of (library, function, reason)
    # tuples from OpenSSL's error queue.
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry]

"""
Private certificate authorities and certificates for the TLS tests.

Everything is generated with the ``cryptography`` package into a scratch
directory: PEM files for the taskmesh client, and PKCS#12 key stores, which
Java 17 reads as ActiveMQ key stores without ``keytool``. Keys are ECDSA
P-256, so generating a full set takes milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Password of every PKCS#12 key store written here. The key stores hold
# throw-away test keys only.
KEYSTORE_PASSWORD = "taskmesh-test"

VALIDITY = datetime.timedelta(days=2)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "taskmesh tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    # Start an hour early, so that a clock a little behind still accepts it.
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(hours=1), now + VALIDITY


def _sign_authority(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    signing_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    not_before, not_after = _validity()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(signing_key, hashes.SHA256())
    )


@dataclass(frozen=True)
class IssuedCertificate:
    """
    A certificate with its private key, signed by ``issuer``.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    issuer: CertificateAuthority

    def write_pem(
        self, certificate_path: Path, key_path: Path, password: str | None = None
    ) -> None:
        """
        Write the certificate, followed by its issuer's chain, and the PKCS#8
        private key as PEM.

        The key is encrypted with ``password`` when one is given.
        """
        certificates = (self.certificate, *self.issuer.chain)
        certificate_path.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
        )
        encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
        if password is not None:
            encryption = serialization.BestAvailableEncryption(password.encode())
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )
        key_path.chmod(0o600)

    def pem(self) -> bytes:
        """
        Return the certificate as PEM.
        """
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write_pkcs12(self, path: Path, password: str = KEYSTORE_PASSWORD) -> None:
        """
        Write a PKCS#12 key store with the key, the certificate and the CA.
        """
        path.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"broker",
                self.key,
                self.certificate,
                [self.issuer.certificate],
                serialization.BestAvailableEncryption(password.encode()),
            )
        )
        path.chmod(0o600)


@dataclass(frozen=True)
class CertificateAuthority:
    """
    A CA that issues server, client and intermediate CA certificates.

    ``chain`` contains the certificates that a peer sends after a
    certificate from this CA: this CA's own certificate and those of its
    parent CAs, nearest first, without the root. It is empty for a root CA.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def create(cls, common_name: str) -> CertificateAuthority:
        """
        Create a self-signed root CA.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _sign_authority(_name(common_name), key, _name(common_name), key)
        return cls(certificate, key)

    def issue_authority(self, common_name: str) -> CertificateAuthority:
        """
        Create an intermediate CA signed by this CA.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _sign_authority(_name(common_name), key, self.certificate.subject, self.key)
        return CertificateAuthority(certificate, key, (certificate, *self.chain))

    def issue(
        self,
        common_name: str,
        *,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        client: bool = False,
    ) -> IssuedCertificate:
        """
        Issue a server certificate, or a client certificate when ``client`` is set.

        The subject alternative names are ``dns_names`` and ``ip_addresses``.
        Clients check these names and ignore the common name.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        not_before, not_after = _validity()
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(certificate, key, self)

    def write_pem(self, path: Path) -> None:
        """
        Write the CA certificate as PEM, the format of ``tls_ca_file``.
        """
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class TLSFiles:
    """
    Paths of a generated set of CAs, certificates and key stores.

    ``ca_file`` is the CA that signed both broker certificates and the
    client certificate. ``other_ca_file`` is an unrelated CA. The broker key
    stores are PKCS#12 files protected by :data:`KEYSTORE_PASSWORD`:
    ``broker_keystore`` names ``localhost`` and ``127.0.0.1``, and
    ``wrong_host_keystore`` names only ``wrong.example``.
    """

    directory: Path
    ca_file: Path
    other_ca_file: Path
    broker_keystore: Path
    wrong_host_keystore: Path
    client_cert_file: Path
    client_key_file: Path
    keystore_password: str = KEYSTORE_PASSWORD


def write_tls_files(directory: Path) -> TLSFiles:
    """
    Generate two CAs and the broker and client certificates into ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority.create("taskmesh test CA")
    other_authority = CertificateAuthority.create("unrelated test CA")
    files = TLSFiles(
        directory=directory,
        ca_file=directory / "ca.pem",
        other_ca_file=directory / "other-ca.pem",
        broker_keystore=directory / "broker.p12",
        wrong_host_keystore=directory / "wrong-host.p12",
        client_cert_file=directory / "client.pem",
        client_key_file=directory / "client.key",
    )

    authority.write_pem(files.ca_file)
    other_authority.write_pem(files.other_ca_file)
    broker = authority.issue("localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    broker.write_pkcs12(files.broker_keystore)
    wrong_host = authority.issue("wrong.example", dns_names=("wrong.example",))
    wrong_host.write_pkcs12(files.wrong_host_keystore)
    client = authority.issue("taskmesh client", client=True)
    client.write_pem(files.client_cert_file, files.client_key_file)
    return files

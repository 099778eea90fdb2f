"""A throwaway certificate authority for tests of TLS to the mediator, and a client that records the greeting."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

Key = ec.EllipticCurvePrivateKey


def _builder(subject: str, issuer: x509.Name, key: Key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(name: str) -> tuple[x509.Certificate, Key]:
    """A self-signed CA certificate called C{name}, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(
    ca: x509.Certificate, ca_key: Key, common_name: str, names: list[x509.GeneralName] | None = None
) -> tuple[x509.Certificate, Key]:
    """
    A server certificate signed by C{ca}, with C{names} as its subjectAltName
    (default: C{common_name} as a DNS name; an empty list: no subjectAltName).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(common_name)] if names is None else names
    builder = (
        _builder(common_name, ca.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def pem_cert(cert: x509.Certificate) -> bytes:
    """C{cert} as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def pem_key(key: Key) -> bytes:
    """C{key} as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Greeted(Protocol):
    """Records the first bytes the mediator sends (its greeting), then hangs up; C{lost} fires with why it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        self.lost.callback(reason.value)  # the exception, not the Failure (which would errback)

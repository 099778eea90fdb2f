"""Tests for natbypass.identity."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import (
    BadSignature,
    Fingerprint,
    FingerprintError,
    Identity,
    IdentityFileError,
    InsecureKeyFile,
    default_identity_path,
    load_or_create,
    read_identity,
    registration_message,
    verify_registration,
)

# RFC 8032 section 7.1, test 1: secret and public key.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def rfc8032_identity() -> Identity:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Identity(Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET))


class FingerprintTests(SynchronousTestCase):
    def test_vector(self) -> None:
        """The fingerprint is SHA-256 of the SPKI DER (12-byte Ed25519 header + raw key), first 20 bytes."""
        ident = rfc8032_identity()
        self.assertEqual(ident.public_bytes(), RFC8032_PUBLIC)
        spki = bytes.fromhex("302a300506032b6570032100") + RFC8032_PUBLIC
        digest = hashlib.sha256(spki).digest()[:20]
        self.assertEqual(ident.fingerprint.digest, digest)
        text = str(ident.fingerprint)
        self.assertEqual(text.replace("-", "")[3:], base64.b32encode(digest).decode().lower())
        self.assertRegex(text, r"^nb1(-[a-z2-7]{4}){8}$")
        self.assertEqual(len(text), 43)

    def test_parse_forgiving_input(self) -> None:
        fp = rfc8032_identity().fingerprint
        text = str(fp)
        for variant in (
            text,
            text.upper(),
            text.replace("-", ""),
            text.replace("-", " "),
            "  " + text.replace("-", ":") + "\n",
            "NB1 " + text[4:].upper(),
        ):
            self.assertEqual(Fingerprint.parse(variant), fp, variant)

    def test_parse_errors_say_what(self) -> None:
        text = str(rfc8032_identity().fingerprint)
        cases = {
            "sha256:" + text: "starts with 'nb1'",
            text[:-1]: "has 31",
            text + "a": "has 33",
            text[:-1] + "1": "digits 2-7",
            "x" * 200: "too long",
        }
        for bad, words in cases.items():
            e = self.assertRaises(FingerprintError, Fingerprint.parse, bad)
            self.assertIn(words, str(e))
        self.assertRaises(FingerprintError, Fingerprint, b"short")

    @given(st.binary(min_size=20, max_size=20))
    def test_round_trip(self, digest: bytes) -> None:
        fp = Fingerprint(digest)
        self.assertEqual(Fingerprint.parse(str(fp)), fp)
        self.assertEqual(Fingerprint.parse(str(fp).upper().replace("-", " ")), fp)

    @given(st.text(max_size=300))
    def test_parse_never_crashes(self, text: str) -> None:
        try:
            Fingerprint.parse(text)
        except FingerprintError:
            pass

    def test_certificate_and_other_key_types(self) -> None:
        ident = Identity.generate()
        cert = ident.certificate(Clock())
        self.assertEqual(Fingerprint.of_certificate(cert), ident.fingerprint)
        self.assertEqual(Fingerprint.of_certificate(cert.public_bytes(serialization.Encoding.DER)), ident.fingerprint)
        ec = generate_private_key(SECP256R1()).public_key()
        spki = ec.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(Fingerprint.of_spki(spki).digest, hashlib.sha256(spki).digest()[:20])

    def test_matches(self) -> None:
        a, b = Identity.generate().fingerprint, Identity.generate().fingerprint
        self.assertTrue(a.matches(Fingerprint(a.digest)))
        self.assertFalse(a.matches(b))


class SignatureTests(SynchronousTestCase):
    def test_registration_proof(self) -> None:
        ident = Identity.generate()
        sig = ident.sign_registration(b"nonce-1", "alice")
        self.assertEqual(verify_registration(ident.public_key, sig, b"nonce-1", "alice"), ident.fingerprint)
        for nonce, peer in ((b"nonce-2", "alice"), (b"nonce-1", "mallory")):
            self.assertRaises(BadSignature, verify_registration, ident.public_key, sig, nonce, peer)
        other = Identity.generate()
        self.assertRaises(BadSignature, verify_registration, other.public_key, sig, b"nonce-1", "alice")

    def test_message_is_unambiguous(self) -> None:
        self.assertNotEqual(registration_message(b"ab", "c"), registration_message(b"a", "bc"))
        self.assertTrue(registration_message(b"n", "p").startswith(b"natbypass registration proof v1\x00"))


class CertificateTests(SynchronousTestCase):
    def test_self_signed_short_lived(self) -> None:
        clock = Clock()
        clock.advance(1_700_000_000)
        ident = Identity.generate()
        cert = ident.certificate(clock)
        self.assertEqual(cert.issuer, cert.subject)
        self.assertEqual(cert.subject.rfc4514_string(), f"CN={ident.fingerprint}")
        self.assertEqual(cert.not_valid_before_utc.timestamp(), 1_700_000_000 - 3600)
        self.assertEqual(cert.not_valid_after_utc.timestamp(), 1_700_000_000 + 2 * 86400)
        cert.verify_directly_issued_by(cert)
        self.assertRaises(x509.ExtensionNotFound, cert.extensions.get_extension_for_class, x509.SubjectAlternativeName)
        self.assertNotEqual(cert.serial_number, ident.certificate(clock).serial_number)
        self.assertIn(b"BEGIN CERTIFICATE", ident.certificate_pem(clock))

    def test_pyopenssl_accepts_it(self) -> None:
        from OpenSSL import SSL, crypto

        ident = Identity.generate()
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(crypto.X509.from_cryptography(ident.certificate(Clock())))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(ident.private_key))
        ctx.check_privatekey()


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.path = os.path.join(self.dir, "sub", "identity.pem")

    def test_created_0600_and_reloaded(self) -> None:
        first = load_or_create(self.path)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)
        self.assertEqual(os.listdir(os.path.dirname(self.path)), ["identity.pem"])
        again = load_or_create(self.path)
        self.assertEqual(again.fingerprint, first.fingerprint)
        self.assertEqual(read_identity(self.path).fingerprint, first.fingerprint)

    def test_refuses_readable_by_others(self) -> None:
        load_or_create(self.path)
        for mode in (0o644, 0o640, 0o604, 0o660):
            os.chmod(self.path, mode)
            e = self.assertRaises(InsecureKeyFile, load_or_create, self.path)
            self.assertIn(f"chmod 600 {self.path}", str(e))
        os.chmod(self.path, 0o400)
        load_or_create(self.path)

    def test_bad_contents(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"not a key")
        os.close(fd)
        e = self.assertRaises(IdentityFileError, load_or_create, self.path)
        self.assertIn(self.path, str(e))
        with open(self.path, "wb") as f:
            f.write(
                generate_private_key(SECP256R1()).private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        e = self.assertRaises(IdentityFileError, load_or_create, self.path)
        self.assertIn("must be Ed25519", str(e))

    def test_refuses_symlink(self) -> None:
        load_or_create(self.path)
        link = os.path.join(self.dir, "link.pem")
        os.symlink(self.path, link)
        self.assertRaises(IdentityFileError, load_or_create, link)

    def test_default_path(self) -> None:
        self.assertEqual(
            default_identity_path({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/home/u"}), "/x/cfg/natbypass/identity.pem"
        )
        self.assertEqual(
            default_identity_path({"XDG_CONFIG_HOME": "relative", "HOME": "/home/u"}),
            "/home/u/.config/natbypass/identity.pem",
        )
        self.assertEqual(default_identity_path({"HOME": "/home/u"}), "/home/u/.config/natbypass/identity.pem")

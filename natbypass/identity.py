"""
A peer's long-term identity: an Ed25519 key pair, its fingerprint, and the
certificate that carries it into TLS and QUIC handshakes.

The key lives in a PEM file that only its owner can read (created 0600,
atomically; a key file that group or others can read is refused).  Everything
else is derived from it:

  - the L{Fingerprint}: C{nb1-} and the first 20 bytes of SHA-256 over the
    public key's DER C{SubjectPublicKeyInfo}, in lower-case base32, in groups
    of four (C{nb1-xxxx-xxxx-xxxx-xxxx-xxxx-xxxx-xxxx-xxxx});
  - a short-lived self-signed X.509 certificate (L{Identity.certificate}), made
    in memory at each start: it has no host name semantics, its only job is to
    carry the public key, which the other side checks against a pinned
    fingerprint;
  - signatures, e.g. the registration proof (L{Identity.sign_registration}).

See C{docs/security.md} for why the formats are what they are.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import re
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = [
    "BadSignature",
    "Fingerprint",
    "FingerprintError",
    "Identity",
    "IdentityFileError",
    "InsecureKeyFile",
    "default_identity_path",
    "load_or_create",
    "registration_message",
    "verify_registration",
]

log = Logger()

#: The version tag every fingerprint starts with.
FINGERPRINT_PREFIX = "nb1"
#: How many bytes of the SHA-256 digest a fingerprint keeps (160 bits).
FINGERPRINT_BYTES = 20
#: Base32 characters per group when a fingerprint is shown.
FINGERPRINT_GROUP = 4
#: Longest text L{Fingerprint.parse} looks at: a canonical fingerprint is 43
#: characters; this leaves room for spaces and separators, nothing more.
FINGERPRINT_MAX_INPUT = 128
_B32_CHARS = FINGERPRINT_BYTES * 8 // 5  # 32, no padding since 160 = 32 * 5
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
#: Separators a person may type between groups; all are dropped when parsing.
_SEPARATORS = re.compile(r"[\s\-:_.]+")

#: Longest key file we read (an Ed25519 PKCS#8 PEM is 119 bytes).
MAX_KEY_FILE = 16 * 1024
#: Domain separation for the registration proof.
REGISTRATION_CONTEXT = b"natbypass registration proof v1\x00"


class FingerprintError(ValueError):
    """Text is not a fingerprint; the message says what is wrong."""


class IdentityFileError(Exception):
    """The identity key file cannot be used; the message says what to do."""


class InsecureKeyFile(IdentityFileError):
    """The key file can be read (or written) by other users."""


class BadSignature(Exception):
    """A signature does not verify for the given key and message."""


@dataclass(frozen=True, order=True)
class Fingerprint:
    """
    The short, typeable name of an identity key.

    C{digest} is the first L{FINGERPRINT_BYTES} bytes of SHA-256 over the DER
    C{SubjectPublicKeyInfo} of the key.  C{str()} gives the one display form;
    L{parse} accepts it back in any case, with or without separators.
    """

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != FINGERPRINT_BYTES:
            raise FingerprintError(f"a fingerprint digest is {FINGERPRINT_BYTES} bytes")

    def __str__(self) -> str:
        text = base64.b32encode(self.digest).decode("ascii").lower()
        groups = [text[i : i + FINGERPRINT_GROUP] for i in range(0, len(text), FINGERPRINT_GROUP)]
        return "-".join([FINGERPRINT_PREFIX, *groups])

    def __repr__(self) -> str:
        return f"Fingerprint({str(self)!r})"

    def matches(self, other: Fingerprint) -> bool:
        """Compare with C{other} in constant time."""
        return hmac.compare_digest(self.digest, other.digest)

    @classmethod
    def parse(cls, text: str) -> Fingerprint:
        """
        Read a fingerprint a person typed or a file holds.

        Case does not matter; spaces, C{-}, C{:}, C{_} and C{.} between
        characters are ignored.  The text must start with C{nb1} and hold
        exactly 32 base32 characters (C{a-z}, C{2-7}) after it.

        @raise FingerprintError: with a message that says what is wrong.
        """
        if not isinstance(text, str):
            raise FingerprintError("a fingerprint is text")
        if len(text) > FINGERPRINT_MAX_INPUT:
            raise FingerprintError(f"too long for a fingerprint ({len(text)} characters)")
        compact = _SEPARATORS.sub("", text).lower()
        if not compact.startswith(FINGERPRINT_PREFIX):
            raise FingerprintError(
                f"a fingerprint starts with {FINGERPRINT_PREFIX!r} (like nb1-abcd-...), got {text!r}"
            )
        body = compact[len(FINGERPRINT_PREFIX) :]
        bad = sorted(set(body) - _B32_ALPHABET)
        if bad:
            raise FingerprintError(
                f"a fingerprint holds only the letters a-z and digits 2-7; {text!r} has {''.join(bad)!r}"
            )
        if len(body) != _B32_CHARS:
            raise FingerprintError(
                f"a fingerprint has {_B32_CHARS} characters after {FINGERPRINT_PREFIX!r}, {text!r} has {len(body)}"
            )
        return cls(base64.b32decode(body.upper()))

    @classmethod
    def of_public_key(cls, key: Ed25519PublicKey) -> Fingerprint:
        """The fingerprint of a public key."""
        spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls.of_spki(spki)

    @classmethod
    def of_spki(cls, spki_der: bytes) -> Fingerprint:
        """The fingerprint of a DER C{SubjectPublicKeyInfo} (any key type)."""
        return cls(hashlib.sha256(spki_der).digest()[:FINGERPRINT_BYTES])

    @classmethod
    def of_certificate(cls, certificate: x509.Certificate | bytes) -> Fingerprint:
        """
        The fingerprint of the key a certificate carries.

        @param certificate: a C{cryptography} certificate or its DER bytes.
        """
        if isinstance(certificate, bytes):
            certificate = x509.load_der_x509_certificate(certificate)
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls.of_spki(spki)


def registration_message(nonce: bytes, peer_id: str) -> bytes:
    """
    The bytes a peer signs to prove it holds its key when registering.

    Length-prefixed fields after a context string, so no two (nonce, id)
    pairs encode alike and the signature is useless in any other protocol.
    """
    ident = peer_id.encode("utf-8")
    return REGISTRATION_CONTEXT + struct.pack("!H", len(nonce)) + nonce + struct.pack("!H", len(ident)) + ident


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    """
    Load a raw 32-byte Ed25519 public key (as L{Identity.public_bytes} gives).

    @raise ValueError: when C{raw} is not a public key.
    """
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """
    Check an Ed25519 signature.

    @raise BadSignature: when it does not verify.
    """
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        raise BadSignature("the signature does not verify with this key") from None


def verify_registration(public_key: Ed25519PublicKey, signature: bytes, nonce: bytes, peer_id: str) -> Fingerprint:
    """
    Check a registration proof; return the fingerprint of the key that made it.

    @raise BadSignature: when the proof is not for this key, nonce and id.
    """
    verify(public_key, signature, registration_message(nonce, peer_id))
    return Fingerprint.of_public_key(public_key)


class Identity:
    """
    An Ed25519 identity key pair.

    Build one with L{generate}, L{from_pem} or L{load_or_create}.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.fingerprint: Fingerprint = Fingerprint.of_public_key(self.public_key)

    def __repr__(self) -> str:
        return f"<Identity {self.fingerprint}>"

    @classmethod
    def generate(cls) -> Identity:
        """A new random identity (not stored anywhere)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> Identity:
        """
        Load an unencrypted PKCS#8 PEM Ed25519 private key.

        @raise IdentityFileError: when C{data} is not one.
        """
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityFileError(f"not an unencrypted PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityFileError(f"the identity key must be Ed25519, not {type(key).__name__}")
        return cls(key)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (what the key file holds)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The private key, for TLS/QUIC stacks that need it in memory."""
        return self._key

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key (what goes on the wire)."""
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        """An Ed25519 signature over C{message} (callers add their own context string)."""
        return self._key.sign(message)

    def sign_registration(self, nonce: bytes, peer_id: str) -> bytes:
        """Sign the mediator greeting's C{nonce} and our C{peer_id} (see L{verify_registration})."""
        return self.sign(registration_message(nonce, peer_id))

    def certificate(
        self, clock: IReactorTime, validity: datetime.timedelta = datetime.timedelta(days=2)
    ) -> x509.Certificate:
        """
        A fresh self-signed certificate for this key.

        Valid from an hour before C{clock.seconds()} (clock skew) for
        C{validity}; subject and issuer CN are the fingerprint; no host
        names.  Peers never check dates or names: the pinned fingerprint is
        the check.  Make a new one at each start.
        """
        now = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(self.fingerprint))])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._key, algorithm=None)
        )

    def certificate_pem(self, clock: IReactorTime) -> bytes:
        """L{certificate} as PEM."""
        return self.certificate(clock).public_bytes(serialization.Encoding.PEM)


def config_path(name: str, environ: Mapping[str, str] | None = None) -> str:
    """
    C{$XDG_CONFIG_HOME/natbypass/NAME} when C{XDG_CONFIG_HOME} is an
    absolute path, else C{~/.config/natbypass/NAME}.
    """
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".config")
    return os.path.join(base, "natbypass", name)


def default_identity_path(environ: Mapping[str, str] | None = None) -> str:
    """Where a user's identity key lives by default (L{config_path} C{identity.pem})."""
    return config_path("identity.pem", environ)


def default_known_peers_path(environ: Mapping[str, str] | None = None) -> str:
    """Where a user's known peers (trust on first use) are kept by default (L{config_path} C{known_peers})."""
    return config_path("known_peers", environ)


def _check_permissions(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise IdentityFileError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise InsecureKeyFile(
            f"{path} can be read or written by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it holds a private key: run 'chmod 600 {path}' (and, if others may have copied it, "
            f"delete it to make a new identity)"
        )
    getuid = getattr(os, "getuid", None)
    if getuid is not None and st.st_uid != getuid():
        raise InsecureKeyFile(
            f"{path} belongs to another user (uid {st.st_uid}); "
            f"use a key file of your own: 'chown $(id -u) {path}' or another --identity path"
        )


def read_identity(path: str) -> Identity:
    """
    Load the identity key at C{path}, refusing a file others can read.

    @raise InsecureKeyFile: when the file's mode lets group/others in.
    @raise IdentityFileError: when the file is not a usable key.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise IdentityFileError(f"cannot open the identity key {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        _check_permissions(path, os.fstat(f.fileno()))
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise IdentityFileError(f"{path} is too large to be an identity key")
    try:
        return Identity.from_pem(data)
    except IdentityFileError as e:
        raise IdentityFileError(f"{path}: {e}") from None


def write_identity(path: str, identity: Identity) -> None:
    """
    Store C{identity} at C{path}, which must not exist.

    The key is written to a temporary file created 0600 in the same
    directory, synced, then hard-linked into place (which fails if C{path}
    appeared meanwhile), so C{path} never holds a partial key and an existing
    key is never replaced.  Missing directories are created 0700.

    @raise FileExistsError: when C{path} already exists.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(identity.private_pem())
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def load_or_create(path: str | None = None) -> Identity:
    """
    The identity stored at C{path} (default: L{default_identity_path}),
    made and stored first if the file does not exist.

    @raise InsecureKeyFile: when an existing file is readable by others.
    @raise IdentityFileError: when an existing file is not a usable key.
    """
    if path is None:
        path = default_identity_path()
    if not os.path.lexists(path):
        identity = Identity.generate()
        try:
            write_identity(path, identity)
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as e:
            raise IdentityFileError(f"cannot create the identity key {path}: {e.strerror}") from None
        else:
            log.info("created identity {fingerprint} in {path}", fingerprint=str(identity.fingerprint), path=path)
            return identity
    return read_identity(path)

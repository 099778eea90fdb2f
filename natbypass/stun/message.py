"""
Pure STUN codec (RFC 8489, RFC 5780, RFC 3489 compatibility): bytes <-> Message.

No I/O here.  Decoding is strict: every malformed input raises
L{StunDecodeError} and nothing else, so datagram handlers can drop and count
with a single C{except}.  Decoded messages are immutable; building a response
means building a new L{Message}.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, TypeVar

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
FINGERPRINT_XOR = 0x5354554E

HEADER = struct.Struct("!HHI12s")
ATTR_HEADER = struct.Struct("!HH")
HEADER_SIZE = HEADER.size
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ADDR_HEAD = struct.Struct("!BBH")

#: Text attributes may hold up to 763 bytes on decode (RFC 8489 14.3/14.9/14.14).
MAX_TEXT_BYTES = 763
MAX_USERNAME_BYTES = 513


class StunDecodeError(ValueError):
    """The bytes are not a well-formed STUN message (the only decode error)."""


class MessageClass(IntEnum):
    """The class bits of a message type (RFC 8489 5): request, indication, success or error response."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(IntEnum):
    """STUN methods: RFC 8489 defines only Binding, the one that NAT discovery and traversal need."""

    BINDING = 0x001


class AttributeType(IntEnum):
    """Type codes of the attributes this codec has classes for (RFC 8489, RFC 5780 and RFC 3489; see L{ATTRIBUTES})."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002
    CHANGE_REQUEST = 0x0003
    SOURCE_ADDRESS = 0x0004
    CHANGED_ADDRESS = 0x0005
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026
    RESPONSE_PORT = 0x0027
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


def message_type(method: int, cls: int) -> int:
    """Interleave the 12 method bits and the 2 class bits (RFC 8489 5)."""
    return (
        ((method & 0xF80) << 2) | ((method & 0x070) << 1) | (method & 0x00F) | ((cls & 0b10) << 7) | ((cls & 0b01) << 4)
    )


def split_message_type(mtype: int) -> tuple[int, int]:
    """Inverse of L{message_type}: (method, class)."""
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = ((mtype >> 7) & 0b10) | ((mtype >> 4) & 0b01)
    return method, cls


def is_stun(data: bytes) -> bool:
    """
    The demultiplexing test of a socket that STUN shares with other traffic:
    does this datagram belong to STUN?  A whole header whose first byte is
    0-3 (RFC 7983 section 7: the top two bits of every STUN message are
    zero) and that carries the magic cookie (RFC 8489 section 5: the cookie
    is what tells STUN apart from other protocols on the same port).

    Deliberately no more than that: the length and padding checks of RFC
    8489 section 6.3 decide whether a STUN message is *valid*, which is
    L{decode}'s job, so a malformed STUN message is dropped and counted as
    malformed STUN, not passed on to the other protocol.  RFC 3489 messages
    (no cookie) are only recognised as answers to our requests, which carry
    the cookie in the transaction id the server echoes.
    """
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == MAGIC_COOKIE_BYTES


class StunFramingError(Exception):
    """A byte stream carries something that does not frame as STUN."""


class StreamFramer:
    """
    Cut a TCP byte stream into STUN messages (RFC 8489 section 6.2.2:
    messages are self-delimiting through the length field of their header).
    Pure: bytes in, frames out; the protocols on either side decide what a
    framing error costs (the connection: a stream that lost its framing
    cannot be resynchronised).

    C{require_cookie}: refuse a header without the magic cookie (a client
    talks to RFC 8489 servers only; a server also frames RFC 3489 requests).
    C{max_size}: refuse a message longer than this, header included.
    """

    def __init__(self, *, require_cookie: bool = True, max_size: int | None = None) -> None:
        self._buffer = b""
        self._require_cookie = require_cookie
        self._max_size = max_size

    def feed(self, data: bytes) -> list[bytes]:
        """
        Every message that C{data} completes, in order.  Raises
        L{StunFramingError} (and forgets what it held) when the stream does
        not frame as STUN; messages before the error are lost with it, use
        L{frames} to take them one at a time.
        """
        return list(self.frames(data))

    def frames(self, data: bytes) -> Iterator[bytes]:
        """Like L{feed}, yielding each message before looking at the next."""
        self._buffer += data
        return self._drain()

    def _drain(self) -> Iterator[bytes]:
        while len(self._buffer) >= HEADER_SIZE:
            head = self._buffer
            length = (head[2] << 8) | head[3]
            size = HEADER_SIZE + length
            why = None
            if head[0] >= 0x40 or (self._require_cookie and head[4:8] != MAGIC_COOKIE_BYTES):
                why = "the stream does not carry STUN messages"
            elif length % 4:
                why = "STUN length is not a multiple of 4"
            elif self._max_size is not None and size > self._max_size:
                why = f"a {size}-byte STUN message is over the {self._max_size}-byte limit"
            if why is not None:
                self._buffer = b""
                raise StunFramingError(why)
            if len(head) < size:
                return
            self._buffer = head[size:]
            yield head[:size]

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buffer)


# ---------------------------------------------------------------- attributes


class Attribute:
    """Base of the typed attributes; subclasses set C{TYPE}."""

    TYPE: ClassVar[int]

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> Attribute:
        raise NotImplementedError


@dataclass(frozen=True)
class UnknownAttribute(Attribute):
    """An attribute this codec does not interpret, kept raw."""

    type: int
    value: bytes

    @property
    def comprehension_required(self) -> bool:
        return self.type < 0x8000

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return self.value


def _family_and_packed(host: str) -> tuple[int, bytes]:
    try:
        return 0x01, socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            return 0x02, socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise ValueError(f"not an IP address: {host!r}") from None


def _decode_address(value: bytes) -> tuple[int, bytes, int]:
    if len(value) < 4:
        raise StunDecodeError("address attribute too short")
    _, family, port = _ADDR_HEAD.unpack_from(value)
    raw = value[4:]
    if family == 0x01:
        if len(raw) != 4:
            raise StunDecodeError("IPv4 address attribute has the wrong length")
    elif family == 0x02:
        if len(raw) != 16:
            raise StunDecodeError("IPv6 address attribute has the wrong length")
    else:
        raise StunDecodeError(f"unknown address family {family}")
    return family, raw, port


def _ntop(family: int, raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == 0x01 else socket.AF_INET6, raw)


def _xor_bytes(raw: bytes, pad: bytes) -> bytes:
    return (int.from_bytes(raw, "big") ^ int.from_bytes(pad[: len(raw)], "big")).to_bytes(len(raw), "big")


@dataclass(frozen=True)
class _AddressAttribute(Attribute):
    """A plain (not XORed) transport address."""

    host: str
    port: int

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        family, raw = _family_and_packed(self.host)
        return _ADDR_HEAD.pack(0, family, self.port) + raw

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> _AddressAttribute:
        family, raw, port = _decode_address(value)
        return cls(_ntop(family, raw), port)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True)
class MappedAddress(_AddressAttribute):
    """
    MAPPED-ADDRESS: the reflexive address, not XORed.  What RFC 3489 servers
    answer with; RFC 5780 servers send it next to XOR-MAPPED-ADDRESS.
    """

    TYPE = AttributeType.MAPPED_ADDRESS


@dataclass(frozen=True)
class ResponseAddress(_AddressAttribute):
    """
    RESPONSE-ADDRESS (RFC 3489): send the response to another address.  The
    responder refuses it with 420: it would reflect traffic at third parties.
    """

    TYPE = AttributeType.RESPONSE_ADDRESS


@dataclass(frozen=True)
class SourceAddress(_AddressAttribute):
    """SOURCE-ADDRESS (RFC 3489): the server address the response was sent from (RESPONSE-ORIGIN in RFC 5780)."""

    TYPE = AttributeType.SOURCE_ADDRESS


@dataclass(frozen=True)
class ChangedAddress(_AddressAttribute):
    """
    CHANGED-ADDRESS (RFC 3489): the server's other IP and port, for the
    change-request tests (OTHER-ADDRESS in RFC 5780).
    """

    TYPE = AttributeType.CHANGED_ADDRESS


@dataclass(frozen=True)
class AlternateServer(_AddressAttribute):
    """ALTERNATE-SERVER (RFC 8489 14.15): the server that a 300 (Try Alternate) error response points to."""

    TYPE = AttributeType.ALTERNATE_SERVER


@dataclass(frozen=True)
class ResponseOrigin(_AddressAttribute):
    """
    RESPONSE-ORIGIN (RFC 5780 7.3): the server address the response was sent
    from, so a client can tell which of the server's addresses answered.
    """

    TYPE = AttributeType.RESPONSE_ORIGIN


@dataclass(frozen=True)
class OtherAddress(_AddressAttribute):
    """
    OTHER-ADDRESS (RFC 5780 7.4): the server's alternate IP and port, where
    the mapping and filtering tests send their requests.
    """

    TYPE = AttributeType.OTHER_ADDRESS


@dataclass(frozen=True)
class XorMappedAddress(_AddressAttribute):
    """The reflexive address, XORed with the cookie (and txid for IPv6)."""

    TYPE = AttributeType.XOR_MAPPED_ADDRESS

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        family, raw = _family_and_packed(self.host)
        pad = _U32.pack(cookie) + txid
        return _ADDR_HEAD.pack(0, family, self.port ^ (cookie >> 16)) + _xor_bytes(raw, pad)

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> XorMappedAddress:
        family, raw, port = _decode_address(value)
        pad = _U32.pack(cookie) + txid
        return cls(_ntop(family, _xor_bytes(raw, pad)), port ^ (cookie >> 16))


@dataclass(frozen=True)
class _TextAttribute(Attribute):
    text: str
    MAX: ClassVar[int] = MAX_TEXT_BYTES

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return self.text.encode("utf-8")

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> _TextAttribute:
        if len(value) > cls.MAX:
            raise StunDecodeError(f"{cls.__name__} longer than {cls.MAX} bytes")
        try:
            return cls(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise StunDecodeError(f"{cls.__name__} is not UTF-8") from None


@dataclass(frozen=True)
class Username(_TextAttribute):
    """USERNAME (RFC 8489 14.3): at most 513 bytes, a tighter bound than the other text attributes."""

    TYPE = AttributeType.USERNAME
    MAX = MAX_USERNAME_BYTES


@dataclass(frozen=True)
class Software(_TextAttribute):
    """SOFTWARE (RFC 8489 14.14): what software sent the message; for diagnostics only."""

    TYPE = AttributeType.SOFTWARE


@dataclass(frozen=True)
class Realm(_TextAttribute):
    """REALM (RFC 8489 14.9): names the long-term credentials to use (see L{long_term_key})."""

    TYPE = AttributeType.REALM


@dataclass(frozen=True)
class Nonce(_TextAttribute):
    """NONCE (RFC 8489 14.10): the server's nonce for long-term credential authentication."""

    TYPE = AttributeType.NONCE


@dataclass(frozen=True)
class ErrorCode(Attribute):
    """
    ERROR-CODE (RFC 8489 14.8): the code (300..699) and reason phrase of an
    error response; encoding refuses codes outside that range.
    """

    TYPE = AttributeType.ERROR_CODE
    code: int
    reason: str = ""

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        if not 300 <= self.code <= 699:
            raise ValueError(f"error code {self.code} outside 300..699")
        cls_, number = divmod(self.code, 100)
        return struct.pack("!HBB", 0, cls_, number) + self.reason.encode("utf-8")

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> ErrorCode:
        if len(value) < 4:
            raise StunDecodeError("ERROR-CODE too short")
        if len(value) > 4 + MAX_TEXT_BYTES:
            raise StunDecodeError("ERROR-CODE reason too long")
        klass, number = value[2] & 0x07, value[3]
        if not 3 <= klass <= 6 or number > 99:
            raise StunDecodeError("ERROR-CODE out of range")
        try:
            reason = value[4:].decode("utf-8")
        except UnicodeDecodeError:
            raise StunDecodeError("ERROR-CODE reason is not UTF-8") from None
        return cls(klass * 100 + number, reason)


@dataclass(frozen=True)
class UnknownAttributes(Attribute):
    """
    UNKNOWN-ATTRIBUTES (RFC 8489 14.13): in a 420 response, the
    comprehension-required attribute types the server did not understand.
    """

    TYPE = AttributeType.UNKNOWN_ATTRIBUTES
    types: tuple[int, ...]

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return b"".join(_U16.pack(t) for t in self.types)

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> UnknownAttributes:
        if len(value) % 2:
            raise StunDecodeError("UNKNOWN-ATTRIBUTES has an odd length")
        return cls(tuple(_U16.unpack_from(value, i)[0] for i in range(0, len(value), 2)))


@dataclass(frozen=True)
class ChangeRequest(Attribute):
    """RFC 5780 7.2: ask the server to answer from its other IP and/or port."""

    TYPE = AttributeType.CHANGE_REQUEST
    change_ip: bool = False
    change_port: bool = False

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return _U32.pack((0x4 if self.change_ip else 0) | (0x2 if self.change_port else 0))

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> ChangeRequest:
        if len(value) != 4:
            raise StunDecodeError("CHANGE-REQUEST must be 4 bytes")
        (flags,) = _U32.unpack(value)
        return cls(bool(flags & 0x4), bool(flags & 0x2))


@dataclass(frozen=True)
class ResponsePort(Attribute):
    """RFC 5780 7.5: send the response to this port of the source IP."""

    TYPE = AttributeType.RESPONSE_PORT
    port: int

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return _U16.pack(self.port) + b"\0\0"

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> ResponsePort:
        if len(value) != 4:
            raise StunDecodeError("RESPONSE-PORT must be 4 bytes")
        return cls(_U16.unpack_from(value)[0])


@dataclass(frozen=True)
class Padding(Attribute):
    """RFC 5780 7.6: bytes of padding; only the length matters."""

    TYPE = AttributeType.PADDING
    length: int

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return bytes(self.length)

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> Padding:
        return cls(len(value))


@dataclass(frozen=True)
class MessageIntegrity(Attribute):
    """HMAC-SHA1 over the message up to this attribute (RFC 8489 14.5)."""

    TYPE = AttributeType.MESSAGE_INTEGRITY
    SIZE: ClassVar[int] = 20
    mac: bytes

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return self.mac

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> MessageIntegrity:
        if len(value) != cls.SIZE:
            raise StunDecodeError("MESSAGE-INTEGRITY must be 20 bytes")
        return cls(value)


@dataclass(frozen=True)
class MessageIntegritySha256(Attribute):
    """HMAC-SHA256, possibly truncated to 16..32 bytes (RFC 8489 14.6)."""

    TYPE = AttributeType.MESSAGE_INTEGRITY_SHA256
    mac: bytes

    def encode_value(self, txid: bytes, cookie: int) -> bytes:
        return self.mac

    @classmethod
    def decode_value(cls, value: bytes, txid: bytes, cookie: int) -> MessageIntegritySha256:
        if not 16 <= len(value) <= 32 or len(value) % 4:
            raise StunDecodeError("MESSAGE-INTEGRITY-SHA256 must be 16..32 bytes, a multiple of 4")
        return cls(value)


@dataclass(frozen=True)
class Fingerprint(Attribute):
    """
    CRC-32 of the message xor 0x5354554e (RFC 8489 14.7).  Carries no
    value: the decoder checks it and the encoder computes it.
    """

    TYPE = AttributeType.FINGERPRINT

    def encode_value(self, txid: bytes, cookie: int) -> bytes:  # pragma: no cover
        raise AssertionError("FINGERPRINT is computed by Message.encode")


ATTRIBUTES: dict[int, type[Attribute]] = {
    cls.TYPE: cls
    for cls in (
        MappedAddress,
        ResponseAddress,
        SourceAddress,
        ChangedAddress,
        AlternateServer,
        ResponseOrigin,
        OtherAddress,
        XorMappedAddress,
        Username,
        Software,
        Realm,
        Nonce,
        ErrorCode,
        UnknownAttributes,
        ChangeRequest,
        ResponsePort,
        Padding,
        MessageIntegrity,
        MessageIntegritySha256,
    )
}

#: Attributes this codec understands; anything comprehension-required and
#: not in here makes a request fail with 420.
KNOWN_TYPES = frozenset(ATTRIBUTES) | {AttributeType.FINGERPRINT}

A = TypeVar("A", bound=Attribute)


def _fingerprint(data: bytes) -> int:
    return (zlib.crc32(data) & 0xFFFFFFFF) ^ FINGERPRINT_XOR


# ------------------------------------------------------------------- message


@dataclass(frozen=True)
class Message:
    """
    One STUN message.  C{cookie} other than L{MAGIC_COOKIE} marks an RFC
    3489 message, whose 128-bit transaction id is C{cookie} + C{transaction_id}.

    C{raw} keeps the bytes a decoded message came from, so integrity can be
    checked against exactly what was received.
    """

    method: int
    cls: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()
    cookie: int = MAGIC_COOKIE
    raw: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def is_rfc3489(self) -> bool:
        return self.cookie != MAGIC_COOKIE

    def get(self, kind: type[A]) -> A | None:
        """The first attribute of this type, or None."""
        for attr in self.attributes:
            if type(attr) is kind:
                return attr  # type: ignore[return-value]
        return None

    def unknown_required(self) -> tuple[int, ...]:
        """Types of comprehension-required attributes this codec does not know."""
        return tuple(a.type for a in self.attributes if isinstance(a, UnknownAttribute) and a.comprehension_required)

    def reply(self, cls: int, attributes: Iterable[Attribute]) -> Message:
        """A response to this request: same method, transaction id and cookie."""
        return Message(self.method, cls, self.transaction_id, tuple(attributes), self.cookie)

    # ------------------------------------------------------------ encoding

    def encode(
        self,
        *,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        fingerprint: bool = False,
    ) -> bytes:
        """
        Serialise.  The keys append MESSAGE-INTEGRITY(-SHA256) computed over
        what precedes them; C{fingerprint} (or a L{Fingerprint} attribute)
        appends FINGERPRINT last.
        """
        txid, cookie = self.transaction_id, self.cookie
        if len(txid) != 12:
            raise ValueError("transaction id must be 12 bytes")
        parts: list[bytes] = []
        for attr in self.attributes:
            if type(attr) is Fingerprint:
                fingerprint = True
                continue
            value = attr.encode_value(txid, cookie)
            attr_type = attr.type if type(attr) is UnknownAttribute else attr.TYPE  # type: ignore[attr-defined]
            parts.append(ATTR_HEADER.pack(attr_type, len(value)) + value + bytes(-len(value) % 4))
        body = b"".join(parts)
        mtype = message_type(self.method, self.cls)

        def header(extra: int) -> bytes:
            return HEADER.pack(mtype, len(body) + extra, cookie, txid)

        if integrity_key is not None:
            mac = hmac.new(integrity_key, header(24) + body, hashlib.sha1).digest()
            body += ATTR_HEADER.pack(AttributeType.MESSAGE_INTEGRITY, 20) + mac
        if integrity_sha256_key is not None:
            mac = hmac.new(integrity_sha256_key, header(36) + body, hashlib.sha256).digest()
            body += ATTR_HEADER.pack(AttributeType.MESSAGE_INTEGRITY_SHA256, 32) + mac
        if fingerprint:
            crc = _fingerprint(header(8) + body)
            body += ATTR_HEADER.pack(AttributeType.FINGERPRINT, 4) + _U32.pack(crc)
        return header(0) + body

    # ----------------------------------------------------------- integrity

    def check_integrity(self, key: bytes) -> bool:
        """
        Verify MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY,
        against the received bytes.  False when there is none to check.
        """
        if self.raw is None:
            raise ValueError("only decoded messages can be checked")
        for kind, digest in (
            (AttributeType.MESSAGE_INTEGRITY_SHA256, hashlib.sha256),
            (AttributeType.MESSAGE_INTEGRITY, hashlib.sha1),
        ):
            found = _find_attribute(self.raw, kind)
            if found is None:
                continue
            offset, length = found
            expected = self.raw[offset + 4 : offset + 4 + length]
            head = bytearray(self.raw[:HEADER_SIZE])
            _U16.pack_into(head, 2, offset - HEADER_SIZE + 4 + length)
            mac = hmac.new(key, bytes(head) + self.raw[HEADER_SIZE:offset], digest).digest()
            return hmac.compare_digest(mac[:length], expected)
        return False


def _find_attribute(data: bytes, kind: int) -> tuple[int, int] | None:
    """Offset and value length of the first attribute of C{kind}."""
    offset = HEADER_SIZE
    while offset + 4 <= len(data):
        attr_type, length = ATTR_HEADER.unpack_from(data, offset)
        if attr_type == kind:
            return offset, length
        offset += 4 + length + (-length % 4)
    return None


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 9.2.2 key for MESSAGE-INTEGRITY: MD5(username:realm:password)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


def decode(data: bytes) -> Message:
    """
    Parse one STUN message.  Raises L{StunDecodeError} for anything
    malformed: bad header, length mismatch, truncated or badly padded
    attributes, malformed known attributes, a FINGERPRINT that is not last
    or does not match.  Attributes after MESSAGE-INTEGRITY other than
    MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored (RFC 8489 14.5).
    """
    size = len(data)
    if size < HEADER_SIZE:
        raise StunDecodeError("shorter than a STUN header")
    mtype, length, cookie, txid = HEADER.unpack_from(data)
    if mtype & 0xC000:
        raise StunDecodeError("top two bits of the message type are not zero")
    if length != size - HEADER_SIZE:
        raise StunDecodeError("length field does not match the message size")
    if length % 4:
        raise StunDecodeError("length is not a multiple of 4")
    attrs: list[Attribute] = []
    seen_integrity = False
    offset = HEADER_SIZE
    while offset < size:
        if offset + 4 > size:
            raise StunDecodeError("truncated attribute header")
        attr_type, alen = ATTR_HEADER.unpack_from(data, offset)
        start = offset + 4
        end = start + alen
        offset = end + (-alen % 4)
        if offset > size:
            raise StunDecodeError("attribute runs past the end of the message")
        value = data[start:end]
        if attr_type == AttributeType.FINGERPRINT:
            if alen != 4:
                raise StunDecodeError("FINGERPRINT must be 4 bytes")
            if offset != size:
                raise StunDecodeError("FINGERPRINT is not the last attribute")
            if _U32.unpack(value)[0] != _fingerprint(data[: start - 4]):
                raise StunDecodeError("FINGERPRINT does not match")
            attrs.append(Fingerprint())
            break
        if seen_integrity and attr_type != AttributeType.MESSAGE_INTEGRITY_SHA256:
            continue
        kind = ATTRIBUTES.get(attr_type)
        if kind is None:
            attrs.append(UnknownAttribute(attr_type, value))
        else:
            attrs.append(kind.decode_value(value, txid, cookie))
            if kind is MessageIntegrity or kind is MessageIntegritySha256:
                seen_integrity = True
    method, cls = split_message_type(mtype)
    return Message(method, cls, txid, tuple(attrs), cookie, data)

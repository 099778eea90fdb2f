"""
The punch packet codec: the datagrams two peers exchange on the UDP path.

Pure bytes <-> L{PunchPacket}, no I/O.  Every packet is authenticated
with the session key the mediator gave both peers, so a host that does not
know the key can neither open a path nor divert one.

Only the punch itself uses these packets: a PROBE and the ACK that answers
it.  Once a path is chosen, everything else (application data, liveness,
close) is QUIC on the same 5-tuple (C{natbypass.secure.quic}), encrypted and
authenticated by the peers' identity keys, which the mediator does not know.

Layout (network byte order)::

    offset  size  field
    0       1     MAGIC 0xCE  -- top two bits 11: a STUN message always
                                 starts with 00, so both share one socket
                                 (C{natbypass.stun.message.is_stun} tells them apart)
    1       1     VERSION 2   (1 also had DATA/KEEPALIVE/CLOSE; never QUIC's first version byte)
    2       1     type (PacketType)
    3       1     flags: bit 0 = sender's role (0 or 1); other bits zero
    4       1     n = length of the session id (1..64)
    5       n     session id (the mediator's, as bytes)
    5+n     8     nonce: fresh and random from the sender (PROBE and ACK)
    13+n    8     echo: the nonce of the PROBE this ACK answers; zero in a PROBE
    21+n    16    MAC = HMAC-SHA256(session key, every byte before it)[:16]

The role bit is inside the MAC, so a packet cannot be reflected back to its
sender and pass as the peer's.  Decoding is strict (reserved bits zero, exact
lengths), so each packet has one encoding and C{verify} can re-encode.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC = 0xCE
VERSION = 2
MAC_SIZE = 16
MAX_SESSION_ID = 64
#: magic, version, type, flags, session id length
HEADER = struct.Struct("!BBBBB")
#: nonce, echo
COUNTERS = struct.Struct("!QQ")
#: The size of a packet around its session id.
OVERHEAD = HEADER.size + COUNTERS.size + MAC_SIZE


class PacketType(enum.IntEnum):
    """What a punch packet is (types 3..6, keepalives, data and close, are gone: QUIC carries them)."""

    PROBE = 1
    ACK = 2


class PunchDecodeError(ValueError):
    """The bytes are not a well-formed punch packet (the one decode error)."""


@dataclass(frozen=True)
class PunchPacket:
    """One decoded punch packet; C{mac} is as received, check it with L{verify}."""

    type: PacketType
    role: int
    session_id: bytes
    nonce: int
    echo: int = 0
    mac: bytes = b""


def _body(type_: PacketType, role: int, session_id: bytes, nonce: int, echo: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type_, role, len(session_id)) + session_id + COUNTERS.pack(nonce, echo)


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_SIZE]


def encode(
    type_: PacketType,
    role: int,
    session_id: bytes,
    nonce: int,
    key: bytes,
    echo: int = 0,
) -> bytes:
    """Build and authenticate one packet."""
    if role not in (0, 1):
        raise ValueError(f"role must be 0 or 1, not {role!r}")
    if not 1 <= len(session_id) <= MAX_SESSION_ID:
        raise ValueError(f"session id must be 1..{MAX_SESSION_ID} bytes, not {len(session_id)}")
    if not 0 <= nonce < 2**64 or not 0 <= echo < 2**64:
        raise ValueError("nonce and echo are 64-bit unsigned integers")
    body = _body(PacketType(type_), role, session_id, nonce, echo)
    return body + _mac(key, body)


def decode(data: bytes) -> PunchPacket:
    """Parse C{data}; raise L{PunchDecodeError} for anything malformed."""
    if len(data) < OVERHEAD + 1:
        raise PunchDecodeError(f"too short for a punch packet: {len(data)} bytes")
    magic, version, type_, flags, sid_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PunchDecodeError(f"bad magic 0x{magic:02x}")
    if version != VERSION:
        raise PunchDecodeError(f"unsupported version {version}")
    try:
        ptype = PacketType(type_)
    except ValueError:
        raise PunchDecodeError(f"unknown packet type {type_}") from None
    if flags & ~1:
        raise PunchDecodeError(f"reserved flag bits set: 0x{flags:02x}")
    if not 1 <= sid_len <= MAX_SESSION_ID:
        raise PunchDecodeError(f"bad session id length {sid_len}")
    counters_at = HEADER.size + sid_len
    mac_at = counters_at + COUNTERS.size
    if len(data) != mac_at + MAC_SIZE:
        raise PunchDecodeError(f"a {ptype.name} packet is {mac_at + MAC_SIZE} bytes, not {len(data)}")
    nonce, echo = COUNTERS.unpack_from(data, counters_at)
    return PunchPacket(
        type=ptype,
        role=flags & 1,
        session_id=bytes(data[HEADER.size : counters_at]),
        nonce=nonce,
        echo=echo,
        mac=bytes(data[mac_at:]),
    )


def verify(packet: PunchPacket, key: bytes) -> bool:
    """True when C{packet}'s MAC is right for C{key} (constant-time compare)."""
    body = _body(packet.type, packet.role, packet.session_id, packet.nonce, packet.echo)
    return hmac.compare_digest(_mac(key, body), packet.mac)

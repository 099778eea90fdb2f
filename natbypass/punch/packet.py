"""
The punch packet codec: the datagrams two peers exchange on the UDP path.

Pure bytes <-> L{PunchPacket}, no I/O.  Every packet is authenticated
with the session key the mediator gave both peers, so a host that does not
know the key can neither open a path nor divert or inject into one.

Layout (network byte order)::

    offset  size  field
    0       1     MAGIC 0xCE  -- top two bits 11: a STUN message always
                                 starts with 00, so both share one socket
                                 (C{natbypass.stun.message.is_stun} tells them apart)
    1       1     VERSION 1
    2       1     type (PacketType)
    3       1     flags: bit 0 = sender's role (0 or 1); other bits zero
    4       1     n = length of the session id (1..64)
    5       n     session id (the mediator's, as bytes)
    5+n     8     nonce: random for PROBE/ACK/KEEPALIVE/KEEPALIVE_ACK/CLOSE,
                  the sequence number for DATA
    13+n    8     echo: the nonce this packet answers (ACK, KEEPALIVE_ACK),
                  zero otherwise
    21+n    ...   payload (DATA only; empty for every other type)
    end-16  16    MAC = HMAC-SHA256(session key, every byte before it)[:16]

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
VERSION = 1
MAC_SIZE = 16
MAX_SESSION_ID = 64
#: magic, version, type, flags, session id length
HEADER = struct.Struct("!BBBBB")
#: nonce, echo
COUNTERS = struct.Struct("!QQ")
#: The size of a packet around its session id and payload.
OVERHEAD = HEADER.size + COUNTERS.size + MAC_SIZE
#: The largest DATA payload we send: keeps a frame within a 1280-byte IPv6
#: minimum MTU path with room for IP/UDP headers and a 64-byte session id.
MAX_PAYLOAD = 1280 - 48 - OVERHEAD - MAX_SESSION_ID


class PacketType(enum.IntEnum):
    PROBE = 1
    ACK = 2
    KEEPALIVE = 3
    KEEPALIVE_ACK = 4
    DATA = 5
    CLOSE = 6


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
    payload: bytes = b""
    mac: bytes = b""


def _body(type_: PacketType, role: int, session_id: bytes, nonce: int, echo: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, type_, role, len(session_id)) + session_id + COUNTERS.pack(nonce, echo) + payload


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_SIZE]


def encode(
    type_: PacketType,
    role: int,
    session_id: bytes,
    nonce: int,
    key: bytes,
    echo: int = 0,
    payload: bytes = b"",
) -> bytes:
    """Build and authenticate one packet."""
    if role not in (0, 1):
        raise ValueError(f"role must be 0 or 1, not {role!r}")
    if not 1 <= len(session_id) <= MAX_SESSION_ID:
        raise ValueError(f"session id must be 1..{MAX_SESSION_ID} bytes, not {len(session_id)}")
    if payload and type_ != PacketType.DATA:
        raise ValueError(f"only DATA packets carry a payload, not {type_.name}")
    body = _body(PacketType(type_), role, session_id, nonce, echo, payload)
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
    payload_at = counters_at + COUNTERS.size
    if len(data) < payload_at + MAC_SIZE:
        raise PunchDecodeError("truncated packet")
    nonce, echo = COUNTERS.unpack_from(data, counters_at)
    payload = data[payload_at:-MAC_SIZE]
    if payload and ptype != PacketType.DATA:
        raise PunchDecodeError(f"{ptype.name} packet with a {len(payload)}-byte payload")
    return PunchPacket(
        type=ptype,
        role=flags & 1,
        session_id=bytes(data[HEADER.size : counters_at]),
        nonce=nonce,
        echo=echo,
        payload=bytes(payload),
        mac=bytes(data[-MAC_SIZE:]),
    )


def verify(packet: PunchPacket, key: bytes) -> bool:
    """True when C{packet}'s MAC is right for C{key} (constant-time compare)."""
    body = _body(packet.type, packet.role, packet.session_id, packet.nonce, packet.echo, packet.payload)
    return hmac.compare_digest(_mac(key, body), packet.mac)

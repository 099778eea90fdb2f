"""
PCP (RFC 6887) MAP messages: bytes <-> frozen dataclasses, no I/O.

A request is a 24-byte common header (version 2, opcode, requested
lifetime, the client's own address as IPv6) and, for MAP, a 36-byte body
(a 12-byte nonce that ties renewals and deletion to the mapping, the IANA
protocol number, the internal port, a suggested external port and
address); options follow in 4-byte aligned TLVs.  Responses carry the same
body with the external port and address the server assigned.  Only MAP is
built; THIRD_PARTY and the other options are left out (unknown options in
responses are kept as raw bytes and otherwise ignored).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from .errors import DecodeError

PORT = 5351
VERSION = 2
OP_ANNOUNCE = 0
OP_MAP = 1
RESPONSE_BIT = 0x80
#: RFC 6887 8.1.1: initial retransmission time 3 s, doubling (with +/-10% jitter) up to 1024 s.
IRT, MRT = 3.0, 1024.0
MAX_MESSAGE = 1100

REQUEST_HEADER = struct.Struct("!BBHI16s")
RESPONSE_HEADER = struct.Struct("!BBBBII12s")
MAP_BODY = struct.Struct("!12sB3sHH16s")
OPTION_HEADER = struct.Struct("!BBH")

IANA_PROTOCOLS = {"udp": 17, "tcp": 6}
_NAMES = {v: k for k, v in IANA_PROTOCOLS.items()}


class Result(enum.IntEnum):
    """RFC 6887 7.4 result codes."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def result_name(code: int) -> str:
    """A result code as a word (unknown ones by number)."""
    try:
        return Result(code).name.lower().replace("_", "-")
    except ValueError:
        return f"result-{code}"


def to_ipv6(address: str) -> bytes:
    """An IP as PCP's 16-byte field: IPv4 as ::ffff:a.b.c.d (RFC 6887 5)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        return ipaddress.IPv6Address("::ffff:" + str(ip)).packed
    return ip.packed


def from_ipv6(packed: bytes) -> str:
    """The text form of a 16-byte PCP address: IPv4-mapped ones as plain IPv4."""
    ip = ipaddress.IPv6Address(packed)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


@dataclass(frozen=True)
class Option:
    """A PCP option as it travels: code and data (the padding is not part of it)."""

    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        pad = b"\0" * (-len(self.data) % 4)
        return OPTION_HEADER.pack(self.code, 0, len(self.data)) + self.data + pad


def _decode_options(data: bytes) -> tuple[Option, ...]:
    options = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < OPTION_HEADER.size:
            raise DecodeError("truncated PCP option header")
        code, _, length = OPTION_HEADER.unpack_from(data, offset)
        offset += OPTION_HEADER.size
        end = offset + length
        if end > len(data):
            raise DecodeError(f"PCP option {code} says {length} bytes, only {len(data) - offset} left")
        options.append(Option(code, bytes(data[offset:end])))
        offset = end + (-length % 4)
        if offset > len(data):
            raise DecodeError(f"PCP option {code} is not padded to 4 bytes")
    return tuple(options)


def _check_map(nonce: bytes, protocol: str, internal_port: int, external_port: int, lifetime: int) -> None:
    if len(nonce) != 12:
        raise ValueError("the mapping nonce has 12 bytes")
    if protocol not in IANA_PROTOCOLS:
        raise ValueError(f"protocol must be udp or tcp, not {protocol!r}")
    if not 0 <= internal_port <= 0xFFFF or not 0 <= external_port <= 0xFFFF:
        raise ValueError("ports must fit 16 bits")
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError("lifetime must fit 32 bits")


@dataclass(frozen=True)
class MapRequest:
    """A MAP request; lifetime 0 deletes the mapping the nonce names."""

    client: str
    nonce: bytes
    protocol: str
    internal_port: int
    lifetime: int
    external_port: int = 0
    external_address: str = "0.0.0.0"
    options: tuple[Option, ...] = ()

    def __post_init__(self) -> None:
        _check_map(self.nonce, self.protocol, self.internal_port, self.external_port, self.lifetime)
        if self.internal_port == 0:
            raise ValueError("internal port 0 (all ports) is not supported")

    def encode(self) -> bytes:
        header = REQUEST_HEADER.pack(VERSION, OP_MAP, 0, self.lifetime, to_ipv6(self.client))
        body = MAP_BODY.pack(
            self.nonce,
            IANA_PROTOCOLS[self.protocol],
            b"\0\0\0",
            self.internal_port,
            self.external_port,
            to_ipv6(self.external_address),
        )
        return header + body + b"".join(o.encode() for o in self.options)


@dataclass(frozen=True)
class MapResponse:
    """A MAP response: result, granted lifetime, epoch and the assigned external endpoint."""

    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: str
    internal_port: int
    external_port: int
    external_address: str
    options: tuple[Option, ...] = ()

    def encode(self) -> bytes:
        header = RESPONSE_HEADER.pack(
            VERSION, RESPONSE_BIT | OP_MAP, 0, self.result, self.lifetime, self.epoch, bytes(12)
        )
        body = MAP_BODY.pack(
            self.nonce,
            IANA_PROTOCOLS[self.protocol],
            b"\0\0\0",
            self.internal_port,
            self.external_port,
            to_ipv6(self.external_address),
        )
        return header + body + b"".join(o.encode() for o in self.options)


@dataclass(frozen=True)
class ErrorResponse:
    """
    A response that carries no MAP body we can read: any opcode with a
    non-success result (a server that does not know MAP answers with only
    the header), or one whose version is not 2 (a NAT-PMP-only server
    answers a PCP request with version 0, result 1: RFC 6887 9).
    """

    version: int
    opcode: int
    result: int
    lifetime: int = 0
    epoch: int = 0


Response = MapResponse | ErrorResponse


def decode_response(data: bytes) -> Response:
    """
    A server's response to a PCP request.

    @raise DecodeError: not a response, truncated, too long, or a bad option.
    """
    if len(data) > MAX_MESSAGE:
        raise DecodeError(f"a PCP message has at most {MAX_MESSAGE} bytes, not {len(data)}")
    if len(data) < 4:
        raise DecodeError(f"a PCP response has at least 4 bytes, not {len(data)}")
    version, r_opcode = data[0], data[1]
    if version != VERSION:
        # A NAT-PMP server: version 0, opcode 128 + ours, a 16-bit result (RFC 6886 3.5).
        if version == 0 and len(data) >= 4:
            (result,) = struct.unpack_from("!H", data, 2)
            return ErrorResponse(version, r_opcode & 0x7F, result)
        raise DecodeError(f"PCP version {version}, expected {VERSION}")
    if not r_opcode & RESPONSE_BIT:
        raise DecodeError("the R bit is clear: a request, not a response")
    if len(data) < RESPONSE_HEADER.size or len(data) % 4:
        raise DecodeError(f"a PCP response is a multiple of 4 bytes, at least {RESPONSE_HEADER.size}, not {len(data)}")
    _, _, _, result, lifetime, epoch, _ = RESPONSE_HEADER.unpack_from(data)
    opcode = r_opcode & 0x7F
    if opcode != OP_MAP or len(data) < RESPONSE_HEADER.size + MAP_BODY.size:
        if result == Result.SUCCESS and opcode == OP_MAP:
            raise DecodeError("a successful MAP response without its 36-byte body")
        return ErrorResponse(version, opcode, result, lifetime, epoch)
    nonce, proto, _, internal, external, ext_addr = MAP_BODY.unpack_from(data, RESPONSE_HEADER.size)
    if proto not in _NAMES:
        if result == Result.SUCCESS:
            raise DecodeError(f"a MAP response for IANA protocol {proto}, not UDP or TCP")
        return ErrorResponse(version, opcode, result, lifetime, epoch)
    options = _decode_options(data[RESPONSE_HEADER.size + MAP_BODY.size :])
    return MapResponse(result, lifetime, epoch, nonce, _NAMES[proto], internal, external, from_ipv6(ext_addr), options)


def decode_map_request(data: bytes) -> MapRequest:
    """A MAP request as a server reads it (the test gateways use it)."""
    if len(data) < REQUEST_HEADER.size + MAP_BODY.size or len(data) > MAX_MESSAGE or len(data) % 4:
        raise DecodeError(f"a MAP request is a multiple of 4 bytes from 60 to {MAX_MESSAGE}, not {len(data)}")
    version, opcode, _, lifetime, client = REQUEST_HEADER.unpack_from(data)
    if version != VERSION or opcode != OP_MAP:
        raise DecodeError(f"not a PCP MAP request (version {version}, opcode {opcode})")
    nonce, proto, _, internal, external, ext_addr = MAP_BODY.unpack_from(data, REQUEST_HEADER.size)
    if proto not in _NAMES:
        raise DecodeError(f"IANA protocol {proto} is not UDP or TCP")
    if internal == 0:
        raise DecodeError("internal port 0 (all ports) is not supported")
    options = _decode_options(data[REQUEST_HEADER.size + MAP_BODY.size :])
    return MapRequest(
        from_ipv6(client), nonce, _NAMES[proto], internal, lifetime, external, from_ipv6(ext_addr), options
    )

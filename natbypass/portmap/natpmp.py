"""
NAT-PMP (RFC 6886) messages: bytes <-> frozen dataclasses, no I/O.

Requests go to the gateway's UDP port 5351; every response echoes the
request's opcode plus 128, a result code and the gateway's epoch (seconds
since its mappings were last lost).  Only what a client needs is here: the
external address request and the UDP/TCP map request (lifetime 0 deletes).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from .errors import DecodeError

PORT = 5351
VERSION = 0
#: RFC 6886 3.1: the first request is resent after 250 ms, the interval doubling, 9 sends in all.
INITIAL_RTO = 0.25
MAX_SENDS = 9
#: RFC 6886 3.3: the lifetime a client should ask for.
RECOMMENDED_LIFETIME = 7200

OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 128

HEADER = struct.Struct("!BB")
ADDRESS_RESPONSE = struct.Struct("!BBHI4s")
MAP_REQUEST = struct.Struct("!BBHHHI")
MAP_RESPONSE = struct.Struct("!BBHIHHI")

_OPCODES = {"udp": OP_MAP_UDP, "tcp": OP_MAP_TCP}
_PROTOCOLS = {v: k for k, v in _OPCODES.items()}


class Result(enum.IntEnum):
    """RFC 6886 3.5 result codes."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def result_name(code: int) -> str:
    """A result code as a word, unknown ones by number (the RFC lets servers add codes)."""
    try:
        return Result(code).name.lower().replace("_", "-")
    except ValueError:
        return f"result-{code}"


@dataclass(frozen=True)
class ExternalAddressRequest:
    """Opcode 0: what is the gateway's external IPv4 address."""

    def encode(self) -> bytes:
        return HEADER.pack(VERSION, OP_EXTERNAL_ADDRESS)


@dataclass(frozen=True)
class MapRequest:
    """Opcode 1 (UDP) or 2 (TCP): map C{internal_port}; lifetime 0 with external port 0 deletes."""

    protocol: str
    internal_port: int
    external_port: int = 0
    lifetime: int = RECOMMENDED_LIFETIME

    def __post_init__(self) -> None:
        if self.protocol not in _OPCODES:
            raise ValueError(f"protocol must be udp or tcp, not {self.protocol!r}")
        if not 1 <= self.internal_port <= 0xFFFF or not 0 <= self.external_port <= 0xFFFF:
            raise ValueError("ports must fit 16 bits (internal port not 0)")
        if not 0 <= self.lifetime <= 0xFFFFFFFF:
            raise ValueError("lifetime must fit 32 bits")

    @property
    def opcode(self) -> int:
        return _OPCODES[self.protocol]

    def encode(self) -> bytes:
        return MAP_REQUEST.pack(VERSION, self.opcode, 0, self.internal_port, self.external_port, self.lifetime)


@dataclass(frozen=True)
class ExternalAddressResponse:
    """The answer to opcode 0: result, epoch and (on success) the external address."""

    result: int
    epoch: int
    address: str

    def encode(self) -> bytes:
        packed = ipaddress.IPv4Address(self.address).packed
        return ADDRESS_RESPONSE.pack(VERSION, RESPONSE_BIT + OP_EXTERNAL_ADDRESS, self.result, self.epoch, packed)


@dataclass(frozen=True)
class MapResponse:
    """The answer to a map request: the external port and lifetime the gateway granted."""

    protocol: str
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int

    def encode(self) -> bytes:
        opcode = RESPONSE_BIT + _OPCODES[self.protocol]
        return MAP_RESPONSE.pack(
            VERSION, opcode, self.result, self.epoch, self.internal_port, self.external_port, self.lifetime
        )


Response = ExternalAddressResponse | MapResponse


def decode_response(data: bytes) -> Response:
    """
    A gateway's response.  A response with a non-zero result may be as short
    as 8 bytes (RFC 6886 3.5: a server that does not know the opcode sends
    only the header); its other fields are then 0.

    @raise DecodeError: anything else than a version-0 response of a known opcode.
    """
    if len(data) < 8:
        raise DecodeError(f"a NAT-PMP response has at least 8 bytes, not {len(data)}")
    version, opcode = HEADER.unpack_from(data)
    if version != VERSION:
        raise DecodeError(f"NAT-PMP version {version}, expected {VERSION}")
    if opcode < RESPONSE_BIT:
        raise DecodeError(f"opcode {opcode} is a request, not a response")
    op = opcode - RESPONSE_BIT
    result, epoch = struct.unpack_from("!HI", data, 2)
    if result != Result.SUCCESS and len(data) == 8:
        if op == OP_EXTERNAL_ADDRESS:
            return ExternalAddressResponse(result, epoch, "0.0.0.0")
        if op in _PROTOCOLS:
            return MapResponse(_PROTOCOLS[op], result, epoch, 0, 0, 0)
    if op == OP_EXTERNAL_ADDRESS:
        if len(data) != ADDRESS_RESPONSE.size:
            raise DecodeError(f"an external address response has {ADDRESS_RESPONSE.size} bytes, not {len(data)}")
        _, _, result, epoch, packed = ADDRESS_RESPONSE.unpack(data)
        return ExternalAddressResponse(result, epoch, str(ipaddress.IPv4Address(packed)))
    if op in _PROTOCOLS:
        if len(data) != MAP_RESPONSE.size:
            raise DecodeError(f"a map response has {MAP_RESPONSE.size} bytes, not {len(data)}")
        _, _, result, epoch, internal, external, lifetime = MAP_RESPONSE.unpack(data)
        return MapResponse(_PROTOCOLS[op], result, epoch, internal, external, lifetime)
    raise DecodeError(f"unknown NAT-PMP response opcode {opcode}")


Request = ExternalAddressRequest | MapRequest


def decode_request(data: bytes) -> Request:
    """A client's request as a gateway reads it (the test gateways use it)."""
    if len(data) < 2:
        raise DecodeError("a NAT-PMP request has at least 2 bytes")
    version, opcode = HEADER.unpack_from(data)
    if version != VERSION:
        raise DecodeError(f"NAT-PMP version {version}, expected {VERSION}")
    if opcode == OP_EXTERNAL_ADDRESS:
        if len(data) != HEADER.size:
            raise DecodeError(f"an external address request has 2 bytes, not {len(data)}")
        return ExternalAddressRequest()
    if opcode in _PROTOCOLS:
        if len(data) != MAP_REQUEST.size:
            raise DecodeError(f"a map request has {MAP_REQUEST.size} bytes, not {len(data)}")
        _, _, _, internal, external, lifetime = MAP_REQUEST.unpack(data)
        if internal == 0:
            raise DecodeError("internal port 0 is not a port")
        return MapRequest(_PROTOCOLS[opcode], internal, external, lifetime)
    raise DecodeError(f"unknown NAT-PMP request opcode {opcode}")

"""
The stream layer's wire formats (pure: bytes in, frames out, no I/O).

Frames (yamux's header, RFC-style big-endian, 12 bytes)::

    version (1) | type (1) | flags (2) | stream id (4) | length (4)

  - C{DATA}: C{length} bytes of a stream follow (TCP path only; QUIC carries
    stream bytes natively).  Flags: C{FIN} ends the sender's direction,
    C{RST} aborts the stream both ways (C{length} is then an error code and
    no payload follows).
  - C{WINDOW_UPDATE}: the receiver grants C{length} more bytes of credit on
    the stream (both paths: on QUIC it travels on the control stream).
  - C{PING}: C{length} is an opaque value; C{SYN} asks, C{ACK} answers
    (TCP path keepalive and round-trip time).
  - C{GO_AWAY}: the sender opens no more streams and closes; C{length} is
    the reason code.
  - C{DATAGRAM}: one message of C{length} bytes follows (TCP path: what
    C{IPeerConnection.send} carries there; QUIC uses DATAGRAM frames).

Every stream starts with an I{open request} from its opener (version,
service name) and an I{answer} from the acceptor (accepted, or refused with a
reason), in the stream's own bytes, before any application data.

The decoder never buffers more than one frame (at most L{MAX_FRAME}
payload bytes plus a header): a peer that announces more is a protocol error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VERSION = 0

DATA = 0
WINDOW_UPDATE = 1
PING = 2
GO_AWAY = 3
DATAGRAM = 4
_TYPES = frozenset({DATA, WINDOW_UPDATE, PING, GO_AWAY, DATAGRAM})

SYN = 0x1
ACK = 0x2
FIN = 0x4
RST = 0x8
_FLAGS = SYN | ACK | FIN | RST

HEADER = struct.Struct("!BBHII")

#: The largest DATA or DATAGRAM payload a decoder accepts.
MAX_FRAME = 1 << 16
#: The largest message C{send} takes on the TCP path.
MAX_DATAGRAM = MAX_FRAME - HEADER.size

#: Reset and GO_AWAY codes.
NO_ERROR = 0
PROTOCOL_ERROR = 1
FLOW_CONTROL_ERROR = 2
REFUSED = 3
CANCELLED = 4
INTERNAL_ERROR = 5

CODE_NAMES = {
    NO_ERROR: "no error",
    PROTOCOL_ERROR: "protocol error",
    FLOW_CONTROL_ERROR: "flow control violated",
    REFUSED: "refused",
    CANCELLED: "cancelled",
    INTERNAL_ERROR: "internal error",
}


def code_name(code: int) -> str:
    """A reset or GO_AWAY code in words."""
    return CODE_NAMES.get(code, f"code {code}")


class FrameError(ValueError):
    """The peer broke the framing: the connection cannot continue."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame (C{payload} only for DATA and DATAGRAM)."""

    type: int
    flags: int
    stream_id: int
    length: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode(self.type, self.flags, self.stream_id, self.length, self.payload)


def encode(type_: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    """A frame's bytes."""
    return HEADER.pack(VERSION, type_, flags, stream_id, length) + payload


def data(stream_id: int, payload: bytes, fin: bool = False) -> bytes:
    """Stream bytes (C{fin}: the last)."""
    return encode(DATA, FIN if fin else 0, stream_id, len(payload), payload)


def reset(stream_id: int, code: int) -> bytes:
    """Abort a stream both ways."""
    return encode(DATA, RST, stream_id, code)


def window_update(stream_id: int, delta: int) -> bytes:
    """Grant C{delta} more bytes of credit."""
    return encode(WINDOW_UPDATE, 0, stream_id, delta)


def ping(value: int, answer: bool = False) -> bytes:
    """A keepalive ask, or its answer."""
    return encode(PING, ACK if answer else SYN, 0, value)


def go_away(code: int) -> bytes:
    """No more streams from the sender."""
    return encode(GO_AWAY, 0, 0, code)


def datagram(payload: bytes) -> bytes:
    """One message of C{IPeerConnection.send} (TCP path)."""
    if len(payload) > MAX_DATAGRAM:
        raise ValueError(f"a datagram holds at most {MAX_DATAGRAM} bytes, not {len(payload)}")
    return encode(DATAGRAM, 0, 0, len(payload), payload)


def _carries_payload(type_: int, flags: int) -> bool:
    return type_ == DATAGRAM or (type_ == DATA and not flags & RST)


class FrameDecoder:
    """
    Split a byte stream into L{Frame}s.

    @param allowed: the frame types this path may carry (QUIC's control
        stream takes only window updates and GO_AWAY).
    """

    def __init__(self, allowed: frozenset[int] = _TYPES) -> None:
        self._buffer = bytearray()
        self._allowed = allowed

    def feed(self, data: bytes) -> list[Frame]:
        """
        The frames C{data} completes, in order.

        @raise FrameError: the bytes are not valid frames (the caller must
            close the connection: the stream cannot be resynchronised).
        """
        self._buffer += data
        frames = []
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= HEADER.size:
            version, type_, flags, stream_id, length = HEADER.unpack_from(buf, offset)
            if version != VERSION:
                raise FrameError(f"unknown frame version {version}")
            if type_ not in self._allowed:
                raise FrameError(f"frame type {type_} is not allowed here")
            if flags & ~_FLAGS:
                raise FrameError(f"unknown frame flags {flags:#x}")
            size = 0
            if _carries_payload(type_, flags):
                if length > MAX_FRAME:
                    raise FrameError(f"a frame of {length} bytes exceeds the limit of {MAX_FRAME}")
                size = length
            if len(buf) - offset < HEADER.size + size:
                break
            start = offset + HEADER.size
            frames.append(Frame(type_, flags, stream_id, length, bytes(buf[start : start + size])))
            offset = start + size
        del buf[:offset]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# --- the open request and its answer, at the start of every stream ------------------

OPEN_VERSION = 1
MAX_SERVICE = 255
MAX_REASON = 512
_ANSWER = struct.Struct("!BH")
ACCEPTED = 0
REFUSED_ANSWER = 1


class OpenError(ValueError):
    """A malformed open request or answer."""


def valid_service(service: str) -> bytes:
    """The wire form of a service name: 1-255 bytes of printable UTF-8, no whitespace."""
    raw = service.encode("utf-8")
    if not 0 < len(raw) <= MAX_SERVICE or not service.isprintable() or any(c.isspace() for c in service):
        raise ValueError(f"a service name is 1-{MAX_SERVICE} bytes of printable text without spaces: {service!r}")
    return raw


def open_request(service: str) -> bytes:
    """The first bytes of a stream we open to C{service}."""
    raw = valid_service(service)
    return bytes((OPEN_VERSION, len(raw))) + raw


def parse_open(buffer: bytes) -> tuple[str, int] | None:
    """
    C{(service, bytes used)} once C{buffer} holds a whole open request, None
    while it is incomplete.

    @raise OpenError: it is not a valid request.
    """
    if len(buffer) < 2:
        return None
    if buffer[0] != OPEN_VERSION:
        raise OpenError(f"unknown stream open version {buffer[0]}")
    size = buffer[1]
    if len(buffer) < 2 + size:
        return None
    try:
        service = bytes(buffer[2 : 2 + size]).decode("utf-8")
        valid_service(service)
    except ValueError:
        raise OpenError("the service name is not valid") from None
    return service, 2 + size


def answer(reason: str | None = None) -> bytes:
    """C{None}: accepted; else refused with C{reason} (cut to L{MAX_REASON} bytes)."""
    if reason is None:
        return _ANSWER.pack(ACCEPTED, 0)
    raw = reason.encode("utf-8", "replace")[:MAX_REASON]
    return _ANSWER.pack(REFUSED_ANSWER, len(raw)) + raw


def parse_answer(buffer: bytes) -> tuple[str | None, int] | None:
    """
    C{(refusal reason or None, bytes used)} once C{buffer} holds a whole
    answer, None while it is incomplete.

    @raise OpenError: it is not a valid answer.
    """
    if len(buffer) < _ANSWER.size:
        return None
    status, size = _ANSWER.unpack_from(buffer)
    if status not in (ACCEPTED, REFUSED_ANSWER) or size > MAX_REASON or (status == ACCEPTED and size):
        raise OpenError("malformed stream answer")
    if len(buffer) < _ANSWER.size + size:
        return None
    if status == ACCEPTED:
        return None, _ANSWER.size
    reason = bytes(buffer[_ANSWER.size : _ANSWER.size + size]).decode("utf-8", "replace")
    return reason or "refused", _ANSWER.size + size

"""Stream-layer test helpers: protocols that record or echo, a handler by service name, carriers in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.identity import Identity
from natbypass.streams.address import PeerAddress
from natbypass.streams.errors import StreamRefused
from natbypass.streams.session import FIRST_STREAM, StreamSession


@implementer(IHalfCloseableProtocol)
class Collect(Protocol):
    """Keep what arrives, note the peer's FIN and how the stream ended."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.write_closed = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof = True

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """Write back what arrives; close when the peer has finished."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Services:
    """An L{natbypass.interfaces.IStreamHandler}: protocol classes by service name; the rest refused."""

    def __init__(self, **services: Callable[[], IProtocol]) -> None:
        self.services = services
        self.requests: list[PeerAddress] = []

    def streamRequested(self, connection: Any, address: PeerAddress) -> IProtocol:
        self.requests.append(address)
        make = self.services.get(address.service)
        if make is None:
            raise StreamRefused(f"no service {address.service!r} here")
        return make()


class _Ends:
    def __init__(self, local: str, peer: str) -> None:
        self.local_id, self.peer_id = local, peer
        self.local_fingerprint = Identity.generate().fingerprint
        self.peer_fingerprint = None
        self.local_address = self.remote_address = None


class MemoryCarrier:
    """
    One side of an in-memory carrier pair: what it writes reaches the other
    side's session when L{MemoryPair.pump} runs; C{room} bounds what it takes
    before it stops being writable (the path's send buffer).
    """

    path = "memory"

    def __init__(self, role: int) -> None:
        self._next = FIRST_STREAM + role
        self.out: list[tuple[str, Any]] = []
        self.room: int | None = None
        #: Like QUIC's stream limit: streams with ids below 4 x this may be opened.
        self.max_streams: int | None = None
        self.queued = 0
        self.session: StreamSession | None = None

    def openStream(self) -> int:
        stream_id, self._next = self._next, self._next + 4
        return stream_id

    def writeStream(self, stream_id: int, data: bytes, fin: bool) -> None:
        self.queued += len(data)
        self.out.append(("data", (stream_id, data, fin)))

    def resetStream(self, stream_id: int, code: int) -> None:
        self.out.append(("reset", (stream_id, code)))

    def writeControl(self, frame: bytes) -> None:
        self.out.append(("control", frame))

    def writable(self, stream_id: int) -> bool:
        return self.room is None or self.queued < self.room

    def canOpen(self) -> bool:
        return self.max_streams is None or self._next // 4 < self.max_streams


class MemoryPair:
    """Two stream sessions joined in memory (role 0 C{a}, role 1 C{b}), on one Clock."""

    def __init__(self) -> None:
        from natbypass.streams import frames

        self._frames = frames
        self.clock = Clock()
        self.ca, self.cb = MemoryCarrier(0), MemoryCarrier(1)
        self.a = StreamSession(self.ca, 0, self.clock, _Ends("alice", "bob"))
        self.b = StreamSession(self.cb, 1, self.clock, _Ends("bob", "alice"))
        self.ca.session, self.cb.session = self.a, self.b
        self.delivered = 0

    def pump(self, rounds: int = 50) -> None:
        """Deliver what each side wrote, until nothing moves (or C{rounds})."""
        for _ in range(rounds):
            moved = False
            for src, dst in ((self.ca, self.b), (self.cb, self.a)):
                out, src.out = src.out, []
                src.queued = 0
                for kind, item in out:
                    moved = True
                    if kind == "data":
                        self.delivered += len(item[1])
                        dst.streamData(*item)
                    elif kind == "reset":
                        dst.streamReset(*item)
                    else:
                        for frame in self._frames.FrameDecoder().feed(item):
                            dst.control(frame)
                if out:
                    src.session.writable()  # type: ignore[union-attr]
            if not moved:
                return

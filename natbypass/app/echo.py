"""
The echo application both commands use to show that a path works: the
C{natbypass-peer} plugin serves the stream service C{echo} (L{EchoStream}:
every byte back, half-close respected) and still echoes datagram lines on the
connection itself (L{EchoHandler}, for clients older than streams);
C{natbypass connect} opens a stream to C{echo}, sends numbered lines and
times the round trips (L{EchoStreamClient}).

Lines (C{\\n}-terminated) make the same client work over datagrams and over a
byte stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from natbypass.interfaces import IIncomingHandler, IPeerConnection, IPeerReceiver

MAX_LINE = 1024

#: The stream service natbypass-peer echoes on.
ECHO_SERVICE = "echo"


class LineBuffer:
    """Split a byte stream (or datagrams) into lines; drops over-long lines."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._buffer = b""
        self._deliver = deliver

    def feed(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
        for line in lines:
            self._deliver(line)


@implementer(IPeerReceiver)
class EchoReceiver:
    """Send every line back where it came from."""

    log = Logger()

    def __init__(self, connection: IPeerConnection) -> None:
        self.connection = connection
        self.lines = LineBuffer(lambda line: connection.send(line + b"\n"))

    def dataReceived(self, data: bytes) -> None:
        self.lines.feed(data)

    def connectionLost(self, reason: Any) -> None:
        self.log.info(
            "connection from {peer} over {protocol} closed: {reason}",
            peer=self.connection.peer_id,
            protocol=self.connection.protocol,
            reason=reason.getErrorMessage(),
        )


@implementer(IIncomingHandler)
class EchoHandler:
    """Echo on every incoming connection."""

    log = Logger()

    def connectionArrived(self, connection: IPeerConnection) -> None:
        self.log.info(
            "{peer} connected over {protocol} from {remote}",
            peer=connection.peer_id,
            protocol=connection.protocol,
            remote=connection.remote_address,
        )
        connection.setReceiver(EchoReceiver(connection))


class _Pinger:
    """Numbered lines out, their echoes timed: shared by the datagram and the stream clients."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._waiting: dict[bytes, Deferred[float]] = {}
        self._sent_at: dict[bytes, float] = {}
        self.lines = LineBuffer(self._line)

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def ping(self, n: int) -> Deferred[float]:
        """Send line C{n}; fires with the round-trip time in seconds."""
        tag = b"natbypass-echo %d" % n
        d: Deferred[float] = Deferred()
        self._waiting[tag] = d
        self._sent_at[tag] = self.clock.seconds()
        self._send(tag + b"\n")
        return d

    def _line(self, line: bytes) -> None:
        d = self._waiting.pop(line, None)
        if d is not None:
            d.callback(self.clock.seconds() - self._sent_at.pop(line))

    def dataReceived(self, data: bytes) -> None:
        self.lines.feed(data)

    def connectionLost(self, reason: Any) -> None:
        waiting, self._waiting = self._waiting, {}
        for d in waiting.values():
            d.errback(reason)


@implementer(IPeerReceiver)
class EchoClient(_Pinger):
    """Send numbered lines one at a time as datagrams; C{ping} fires when its echo is back."""

    def __init__(self, connection: IPeerConnection, clock: Any) -> None:
        super().__init__(clock)
        self.connection = connection
        connection.setReceiver(self)

    def _send(self, data: bytes) -> None:
        self.connection.send(data)


class EchoStreamClient(_Pinger, Protocol):
    """
    The same over a stream to the C{echo} service: C{ping} writes a line to
    the stream, and fails with the stream's loss reason if it ends first.
    """

    def _send(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        _Pinger.connectionLost(self, reason)


@implementer(IHalfCloseableProtocol)
class EchoStream(Protocol):
    """
    The C{echo} stream service: every byte back, as it arrives; the peer's
    end of data ends ours once what it sent is echoed (so C{nc}-style clients
    see everything come back before the stream closes).
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Only the peer half-closes this service's streams."""


def echo_factory() -> Factory:
    """The factory natbypass-peer serves C{echo} with."""
    return Factory.forProtocol(EchoStream)

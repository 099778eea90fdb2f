"""
The echo application both commands use to show that a path works: the
C{natbypass-peer} plugin echoes what it receives; C{natbypass connect}
sends numbered lines and times the round trips.

Lines (C{\\n}-terminated) make the same code work over datagrams and over a
byte stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from natbypass.interfaces import IIncomingHandler, IPeerConnection, IPeerReceiver

MAX_LINE = 1024


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


@implementer(IPeerReceiver)
class EchoClient:
    """Send numbered lines one at a time; C{ping} fires when its echo is back."""

    def __init__(self, connection: IPeerConnection, clock: Any) -> None:
        self.connection = connection
        self.clock = clock
        self._waiting: dict[bytes, Deferred[float]] = {}
        self._sent_at: dict[bytes, float] = {}
        self.lines = LineBuffer(self._line)
        connection.setReceiver(self)

    def ping(self, n: int) -> Deferred[float]:
        """Send line C{n}; fires with the round-trip time in seconds."""
        tag = b"natbypass-echo %d" % n
        d: Deferred[float] = Deferred()
        self._waiting[tag] = d
        self._sent_at[tag] = self.clock.seconds()
        self.connection.send(tag + b"\n")
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

"""
Relaying between two stream transports (a local TCP connection and a peer
stream, stdio and a stream): L{join} registers each side as the other's
producer, as C{twisted.protocols.portforward} does, so a slow reader stops its
writer instead of growing a buffer; half-close travels both ways, and an
abort stays an abort.  Used by C{natbypass forward} and C{natbypass pipe}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

# ----------------------------------------------------------------- relaying


@implementer(IPushProducer)
class _Pausing:
    """
    A transport as the producer of the other side: pause and resume pass
    through, stop does not (the relay decides how each side ends, so an
    abort is not turned into a clean close).
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The relay ends the sides (L{Relay.connectionLost})."""


@implementer(IHalfCloseableProtocol)
class Relay(Protocol):
    """
    One side of a relayed pair (a TCP connection, a stream, stdio): what it
    reads is written to the other side.  It is paused from C{connectionMade}
    until L{join} pairs it, so nothing is read that could not be passed on.

    @ivar bytes: what this side read (and handed to the other).
    @ivar lost: the reason it ended, once it did.
    """

    def __init__(self, on_lost: Callable[[Relay, Failure], None] | None = None) -> None:
        self.other: Relay | None = None
        self.bytes = 0
        self.read_done = False
        self.write_done = False
        self.lost: Failure | None = None
        self._on_lost = on_lost
        self._made: Deferred[Relay] = Deferred()

    def whenMade(self) -> Deferred[Relay]:
        """Fires with this side once its C{connectionMade} ran."""
        return self._made

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self._made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.other is not None and self.other.lost is None:
            self.other.transport.write(data)

    def readConnectionLost(self) -> None:
        """Our side sent all it will: end the other side's writing (after what is queued)."""
        self.read_done = True
        other = self.other
        if other is not None and other.lost is None:
            other.transport.unregisterProducer()
            other.transport.loseWriteConnection()
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self.write_done = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self.read_done and self.write_done:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        if not isinstance(reason, Failure):
            reason = Failure(reason)
        self.lost = reason
        other = self.other
        if other is not None and other.lost is None:
            other.transport.unregisterProducer()
            if reason.check(ConnectionDone):
                other.transport.loseConnection()
            else:
                getattr(other.transport, "abortConnection", other.transport.loseConnection)()
        if self._on_lost is not None:
            self._on_lost(self, reason)


def join(a: Relay, b: Relay) -> None:
    """Relay C{a} and C{b} both ways, each the other's producer, then let data flow."""
    a.other, b.other = b, a
    a.transport.registerProducer(_Pausing(b.transport), True)
    b.transport.registerProducer(_Pausing(a.transport), True)
    for side in (a, b):
        side.transport.resumeProducing()


class OneProtocol(Factory):
    """A factory that hands out one protocol made in advance (a stream's side of a relay)."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance

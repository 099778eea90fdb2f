"""
Races between a QUIC connection closing and the streams on it, with real
peers on loopback.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol

from natbypass.testing.loopback import LoopbackMediator


class Plain(Protocol):
    """Not half-closeable: the peer's FIN makes the transport close it (and send our FIN)."""


class CloseRace(LoopbackMediator):
    @defer.inlineCallbacks
    def test_fin_then_close(self) -> defer.Deferred:
        """A stream's FIN and the connection's close in one burst: answering the FIN raises nothing."""
        bob = yield self.peer("bob", "udp")
        bob.serve("plain", Factory.forProtocol(Plain))
        alice = yield self.peer("alice", "udp")
        proto = yield alice.openStream("bob", "plain", Factory.forProtocol(Protocol), "udp")
        yield task.deferLater(reactor, 0.2, lambda: None)
        proto.transport.loseConnection()
        yield alice.stopService()
        yield task.deferLater(reactor, 0.5, lambda: None)

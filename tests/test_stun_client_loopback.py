"""
natbypass.stun.client on real loopback sockets (127.0.0.1 and 127.0.0.2):
TCP connections from one shared local port.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from natbypass.stun import message as m
from natbypass.stun.client import (
    StunStreamFramer,
    binding_request,
    connect_tcp_from,
    mapped_address,
    tcp_binding,
)


class EchoMappedAddress(Protocol):
    """A minimal TCP STUN responder for the loopback tests."""

    def connectionMade(self) -> None:
        self.framer = StunStreamFramer()

    def dataReceived(self, data: bytes) -> None:
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        for frame in self.framer.feed(data):
            req = m.decode(frame)
            self.transport.write(
                req.reply(
                    m.MessageClass.SUCCESS,
                    [m.XorMappedAddress(peer.host, peer.port), m.ResponseOrigin(host.host, host.port)],
                ).encode()
            )


class SharedPortTests(TestCase):
    """Two connections from one local port, on loopback (127.0.0.1 and 127.0.0.2)."""

    def listen(self, host: str):
        port = reactor.listenTCP(0, Factory.forProtocol(EchoMappedAddress), interface=host)
        self.addCleanup(port.stopListening)
        return port.getHost()

    @defer.inlineCallbacks
    def test_two_servers_from_one_port(self) -> None:
        a = self.listen("127.0.0.1")
        b = self.listen("127.0.0.2")
        first = yield connect_tcp_from(reactor, (a.host, a.port), ("127.0.0.1", 0))
        self.addCleanup(first.transport.loseConnection)
        local = first.transport.getHost()
        second = yield connect_tcp_from(reactor, (b.host, b.port), ("127.0.0.1", local.port))
        self.addCleanup(second.transport.loseConnection)
        self.assertEqual(second.transport.getHost().port, local.port)
        r1, _ = yield first.request(binding_request())
        r2, _ = yield second.request(binding_request())
        self.assertEqual(mapped_address(r1), ("127.0.0.1", local.port))
        self.assertEqual(mapped_address(r2), ("127.0.0.1", local.port))
        # The port stays usable for a listener (TCP simultaneous open needs
        # one) that sets the same options.
        s = socket.socket()
        self.addCleanup(s.close)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", local.port))
        s.listen(1)

    @defer.inlineCallbacks
    def test_tcp_binding_helper(self) -> None:
        a = self.listen("127.0.0.1")
        result = yield tcp_binding(reactor, (a.host, a.port), ("127.0.0.1", 0))
        self.assertEqual(result.mapped, result.local)
        self.assertEqual(result.origin, (a.host, a.port))
        # From the very same port to another server, right after the first
        # connection closed (the RFC 5780 TCP tests do this).  The same
        # server again would hit the 4-tuple in TIME_WAIT.
        b = self.listen("127.0.0.2")
        again = yield tcp_binding(reactor, (b.host, b.port), result.local)
        self.assertEqual(again.local, result.local)
        self.assertEqual(again.mapped, result.local)

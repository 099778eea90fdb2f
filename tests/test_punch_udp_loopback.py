"""natbypass.punch.udp and natbypass.punch.mux on real UDP sockets on 127.0.0.1."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from natbypass.interfaces import IPeerReceiver
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.packet import PacketType, encode
from natbypass.punch.session import PunchSession
from natbypass.punch.udp import punch_udp

KEY = b"k" * 32
A = PunchSession("sess-1", KEY, 0, peer_id="bob")
B = PunchSession("sess-1", KEY, 1, peer_id="alice")


class LoopbackTests(TestCase):
    """Two real UDP sockets on 127.0.0.1, punching each other."""

    @defer.inlineCallbacks
    def test_real_sockets(self):
        ep_a, ep_b = PunchEndpoint(), PunchEndpoint()
        port_a = reactor.listenUDP(0, UDPMux(other=ep_a), interface="127.0.0.1")
        port_b = reactor.listenUDP(0, UDPMux(other=ep_b), interface="127.0.0.1")
        self.addCleanup(port_a.stopListening)
        self.addCleanup(port_b.stopListening)
        a_addr = ("127.0.0.1", port_a.getHost().port)
        b_addr = ("127.0.0.1", port_b.getHost().port)
        start = reactor.seconds()
        a, b = yield defer.gatherResults(
            [
                punch_udp(ep_a, A, [b_addr], reactor, start_delay=0.02),
                punch_udp(ep_b, B, [a_addr], reactor, start_delay=0.02),
            ]
        )
        elapsed = reactor.seconds() - start
        self.assertLess(elapsed, 2.0)
        got = defer.Deferred()

        @implementer(IPeerReceiver)
        class R:
            def dataReceived(self, data):
                got.callback(data)

            def connectionLost(self, reason):
                pass

        b.setReceiver(R())
        a.send(b"hello over a punched path")
        self.assertEqual((yield got), b"hello over a punched path")
        a.close()
        b.close()


class SharedPortLoopbackTests(TestCase):
    """STUN and punching on one real socket: the mapped port is the punching port."""

    @defer.inlineCallbacks
    def test_stun_then_punch_on_one_port(self):
        from natbypass.stun.client import StunUDPProtocol, binding_request, mapped_address
        from natbypass.stun.server import BindingResponder, ResponderConfig, STUNDatagramProtocol, STUNServer

        server = STUNServer()
        server_port = reactor.listenUDP(0, STUNDatagramProtocol(server), interface="127.0.0.1")
        self.addCleanup(server_port.stopListening)
        stun_address = ("127.0.0.1", server_port.getHost().port)
        server.responder = BindingResponder(ResponderConfig(stun_address))

        endpoints, mapped, ports = [], [], []
        for _ in range(2):
            stun, ep = StunUDPProtocol(reactor), PunchEndpoint()
            port = reactor.listenUDP(0, UDPMux(stun, ep), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            response, _ = yield stun.request(binding_request(), stun_address)
            mapped.append(mapped_address(response))
            endpoints.append(ep)
            ports.append(port.getHost().port)
        self.assertEqual([m[1] for m in mapped], ports)

        # A third socket forges packets for the session while the punch runs.
        evil = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(evil.stopListening)
        for nonce in range(1, 20):
            for t in (PacketType.PROBE, PacketType.ACK):
                evil.write(encode(t, 1, b"sess-1", nonce, b"x" * 32, echo=nonce), mapped[0])

        a, b = yield defer.gatherResults(
            [
                punch_udp(endpoints[0], A, [mapped[1]], reactor, start_delay=0.05),
                punch_udp(endpoints[1], B, [mapped[0]], reactor, start_delay=0.05),
            ]
        )
        self.assertEqual((a.remote_address.host, a.remote_address.port), mapped[1])
        self.assertEqual((b.remote_address.host, b.remote_address.port), mapped[0])
        self.assertGreater(a.punch_stats.invalid, 0)
        a.close()
        b.close()

"""natbypass.punch.udp and natbypass.punch.mux on real UDP sockets on 127.0.0.1: punching, then QUIC."""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from natbypass.identity import Identity
from natbypass.interfaces import IPeerReceiver
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.packet import PacketType, encode
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.udp import punch_udp
from natbypass.secure import ChannelSecurity
from natbypass.trust import pinned

KEY = b"k" * 32
A = PunchSession("sess-1", KEY, 0, peer_id="bob")
B = PunchSession("sess-1", KEY, 1, peer_id="alice")
ALICE, BOB = Identity.generate(), Identity.generate()
SEC_A = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
SEC_B = ChannelSecurity(BOB, pinned(ALICE.fingerprint))


class Recorder(DatagramProtocol):
    """Every datagram one side's socket received, to check what crossed the wire."""

    def __init__(self, inner: DatagramProtocol) -> None:
        self.inner = inner
        self.seen: list[bytes] = []

    def startProtocol(self) -> None:
        self.inner.makeConnection(self.transport)

    def datagramReceived(self, data, addr) -> None:
        self.seen.append(data)
        self.inner.datagramReceived(data, addr)


class LoopbackTests(TestCase):
    """Two real UDP sockets on 127.0.0.1, punching each other."""

    @defer.inlineCallbacks
    def test_real_sockets(self):
        ep_a, ep_b = PunchEndpoint(), PunchEndpoint()
        wire_b = Recorder(UDPMux(other=ep_b))
        port_a = reactor.listenUDP(0, UDPMux(other=ep_a), interface="127.0.0.1")
        port_b = reactor.listenUDP(0, wire_b, interface="127.0.0.1")
        self.addCleanup(port_a.stopListening)
        self.addCleanup(port_b.stopListening)
        a_addr = ("127.0.0.1", port_a.getHost().port)
        b_addr = ("127.0.0.1", port_b.getHost().port)
        start = reactor.seconds()
        a, b = yield defer.gatherResults(
            [
                punch_udp(ep_a, A, [b_addr], reactor, start_delay=0.02, security=SEC_A),
                punch_udp(ep_b, B, [a_addr], reactor, start_delay=0.02, security=SEC_B),
            ]
        )
        elapsed = reactor.seconds() - start
        self.assertLess(elapsed, 2.0)
        self.assertEqual((a.secure, a.peer_fingerprint, b.peer_fingerprint), (True, BOB.fingerprint, ALICE.fingerprint))
        self.assertTrue(a.cipher.startswith("QUICv1 TLS_"), a.cipher)
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
        self.assertFalse(any(b"hello over" in d for d in wire_b.seen), "only ciphertext on the wire")
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
                punch_udp(endpoints[0], A, [mapped[1]], reactor, start_delay=0.05, security=SEC_A),
                punch_udp(endpoints[1], B, [mapped[0]], reactor, start_delay=0.05, security=SEC_B),
            ]
        )
        self.assertEqual((a.remote_address.host, a.remote_address.port), mapped[1])
        self.assertEqual((b.remote_address.host, b.remote_address.port), mapped[0])
        self.assertGreater(a.punch_stats.invalid, 0)
        a.close()
        b.close()


class RefusedKeyLoopbackTests(TestCase):
    """Real sockets, the wrong pin: the punch works, the attempt fails naming the keys."""

    @defer.inlineCallbacks
    def test_wrong_pin(self):
        ep_a, ep_b = PunchEndpoint(), PunchEndpoint()
        port_a = reactor.listenUDP(0, UDPMux(other=ep_a), interface="127.0.0.1")
        port_b = reactor.listenUDP(0, UDPMux(other=ep_b), interface="127.0.0.1")
        self.addCleanup(port_a.stopListening)
        self.addCleanup(port_b.stopListening)
        a_addr = ("127.0.0.1", port_a.getHost().port)
        b_addr = ("127.0.0.1", port_b.getHost().port)
        other = Identity.generate()
        da = punch_udp(ep_a, A, [b_addr], reactor, security=ChannelSecurity(ALICE, pinned(other.fingerprint)))
        db = punch_udp(ep_b, B, [a_addr], reactor, security=SEC_B, handshake_timeout=1.0)
        results = yield defer.DeferredList([da, db], consumeErrors=True)
        (ok_a, fa), (ok_b, fb) = results
        self.assertFalse(ok_a)
        fa.trap(PunchFailed)
        self.assertIn(f"is {BOB.fingerprint}, expected {other.fingerprint}", fa.value.reason)
        self.assertFalse(ok_b)
        fb.trap(PunchFailed)

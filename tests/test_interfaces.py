"""Every implementer of natbypass.interfaces provides what it declares."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from natbypass.identity import Identity
from natbypass.interfaces import IIncomingHandler, IPeer, IPeerConnection, IPeerReceiver
from natbypass.peer import Peer
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.session import PunchSession
from natbypass.punch.tcp import TCPPeerConnection, TCPPunchAttempt, _HandshakeProtocol
from natbypass.punch.udp import UDPPeerConnection, punch_udp
from natbypass.secure import ChannelSecurity
from natbypass.testing.udp import MemoryUDPNetwork
from natbypass.trust import pinned

KEY = b"k" * 32


class InterfaceShapeTests(SynchronousTestCase):
    def test_connection_api(self) -> None:
        """The names the public API promises (issue: 'One API')."""
        names = set(IPeerConnection.names())
        self.assertTrue(
            {
                "peer_id",
                "protocol",
                "local_address",
                "remote_address",
                "send",
                "close",
                "setReceiver",
                "whenLost",
                "delivery",
                "secure",
                "role",
            }
            <= names,
            names,
        )
        self.assertEqual(set(IPeerReceiver.names()), {"dataReceived", "connectionLost"})
        self.assertTrue({"connect", "listen", "startService", "stopService"} <= set(IPeer.names()))
        self.assertEqual(set(IIncomingHandler.names()), {"connectionArrived"})


class ImplementerTests(SynchronousTestCase):
    def test_udp_connection(self) -> None:
        verifyClass(IPeerConnection, UDPPeerConnection)
        net = MemoryUDPNetwork(Clock())
        alice, bob = Identity.generate(), Identity.generate()
        a_addr, b_addr = ("198.18.1.1", 4000), ("198.18.2.1", 5000)
        eps = [PunchEndpoint(), PunchEndpoint()]
        net.listen(a_addr, UDPMux(other=eps[0]))
        net.listen(b_addr, UDPMux(other=eps[1]))
        conns = []
        for role, ep, me, other, remote in ((0, eps[0], alice, bob, b_addr), (1, eps[1], bob, alice, a_addr)):
            punch_udp(
                ep,
                PunchSession("s", KEY, role, "peer"),
                [remote],
                net.clock,
                security=ChannelSecurity(me, pinned(other.fingerprint)),
            ).addCallback(conns.append)
        net.clock.pump([0.01] * 50)
        self.assertEqual(len(conns), 2)
        for conn in conns:
            verifyObject(IPeerConnection, conn)
            self.assertEqual((conn.protocol, conn.delivery, conn.secure), ("udp", "datagram", True))
        conns[0].close()

    def test_tcp_connection(self) -> None:
        verifyClass(IPeerConnection, TCPPeerConnection)
        results = []
        protos = []
        clock = MemoryReactorClock()
        ids = [Identity.generate(), Identity.generate()]
        for role in (0, 1):
            attempt = TCPPunchAttempt(
                clock,
                PunchSession("s", KEY, role),
                ("127.0.0.1", 1),
                [],
                keepalive_interval=None,
                security=ChannelSecurity(ids[role], pinned(ids[1 - role].fingerprint)),
            )
            attempt.deferred.addCallback(results.append)
            protos.append(_HandshakeProtocol(attempt, "test"))
        p0, p1 = protos
        # TLS on the connection, role 0 selects it; both sides are handed the same one.
        iosim.connect(p0, iosim.FakeTransport(p0, True), p1, iosim.FakeTransport(p1, False), clock=clock)
        self.assertEqual(len(results), 2)
        for conn in results:
            verifyObject(IPeerConnection, conn)
            self.assertEqual((conn.protocol, conn.delivery, conn.max_datagram_size), ("tcp", "datagram", 65524))
            self.assertTrue(conn.secure)

    def test_peer_service(self) -> None:
        verifyClass(IPeer, Peer)

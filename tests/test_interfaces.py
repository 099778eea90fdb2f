"""Every implementer of natbypass.interfaces provides what it declares."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from natbypass.interfaces import IIncomingHandler, IPeer, IPeerConnection, IPeerReceiver
from natbypass.peer import Peer
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.session import PunchSession
from natbypass.punch.tcp import TCPPeerConnection, TCPPunchAttempt, _HandshakeProtocol
from natbypass.punch.udp import UDPPeerConnection
from natbypass.testing.udp import MemoryUDPNetwork

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
        ep = PunchEndpoint()
        net.listen(("198.18.1.1", 4000), UDPMux(other=ep))
        conn = UDPPeerConnection(ep, PunchSession("s", KEY, 0, "bob"), ("198.18.2.1", 5000), net.clock)
        verifyObject(IPeerConnection, conn)
        self.assertEqual((conn.protocol, conn.delivery, conn.secure, conn.role), ("udp", "datagram", False, 0))
        conn.close()

    def test_tcp_connection(self) -> None:
        verifyClass(IPeerConnection, TCPPeerConnection)
        results = []
        protos = []
        for role in (0, 1):
            attempt = TCPPunchAttempt(
                MemoryReactorClock(), PunchSession("s", KEY, role), ("127.0.0.1", 1), [], keepalive_interval=None
            )
            attempt.deferred.addCallback(results.append)
            protos.append(_HandshakeProtocol(attempt, "test"))
        p0, p1 = protos
        iosim.connect(p0, iosim.FakeTransport(p0, True), p1, iosim.FakeTransport(p1, False))
        for conn in results:
            verifyObject(IPeerConnection, conn)
            self.assertEqual((conn.protocol, conn.delivery, conn.max_datagram_size), ("tcp", "stream", None))

    def test_peer_service(self) -> None:
        verifyClass(IPeer, Peer)

"""
End-to-end tests of the Peer service on loopback: a real mediator (STUN on
127.0.0.1 + 127.0.0.2, signalling on 127.0.0.1) and two real peers in this
process.  No NAT here (the NAT lab tests do that); these prove the
composition: registration, offer/answer, punching over UDP and TCP, echo,
fallback, and that a path survives the mediator going away.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from natbypass.app.echo import EchoClient, EchoHandler
from natbypass.interfaces import IPeer, IPeerConnection
from natbypass.nat import NatSummary
from natbypass.peer import Peer, PeerConfig
from natbypass.punch.race import AllAttemptsFailed
from natbypass.signaling.client import SignalingClient
from natbypass.signaling.service import makeSignalingService
from natbypass.signaling.wire import Candidate, Description
from natbypass.stun.server import STUNService


class PeerLoopbackTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.stun = STUNService(reactor, ("127.0.0.1", 0), ("127.0.0.2", 0), stats_interval=0)
        self.stun.startService()
        self.addCleanup(self._stop, self.stun)
        self.signal = makeSignalingService("tcp:0:interface=127.0.0.1", reactor, status_interval=0)
        self.signal.startService()
        self.addCleanup(self._stop, self.signal)
        port = yield self.signal.whenListening()
        self.signal_port = port.getHost().port
        self.stun_address = self.stun.config.primary

    def _stop(self, service: Any) -> Any:
        return defer.maybeDeferred(service.stopService) if service.running else None

    @defer.inlineCallbacks
    def peer(self, name: str, protocol: str = "auto", **config: Any) -> Any:
        config.setdefault("loopback_candidates", True)
        config.setdefault("bind_host", "127.0.0.1")
        config.setdefault("punch_timeout", 3.0)
        p = Peer(
            reactor,
            name,
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.signal_port),
            self.stun_address,
            protocol=protocol,
            config=PeerConfig(**config),
        )
        p.startService()
        self.addCleanup(self._stop, p)
        yield p.whenReady()
        return p

    @defer.inlineCallbacks
    def pair(self, protocol: str) -> Any:
        b = yield self.peer("bob")
        b.listen(EchoHandler())
        a = yield self.peer("alice", protocol)
        conn = yield a.connect("bob")
        self.addCleanup(conn.close)
        return a, b, conn

    @defer.inlineCallbacks
    def assertEchoes(self, conn: Any, n: int = 3) -> Any:
        client = EchoClient(conn, reactor)
        for i in range(n):
            rtt = yield client.ping(i).addTimeout(5, reactor)
            self.assertGreaterEqual(rtt, 0)

    def test_interfaces(self) -> None:
        p = Peer(reactor, "x", TCP4ClientEndpoint(reactor, "127.0.0.1", 1), ("127.0.0.1", 3478))
        self.assertTrue(verifyObject(IPeer, p))

    @defer.inlineCallbacks
    def test_learns_mappings(self) -> Any:
        a = yield self.peer("alice")
        self.assertEqual(a.udp_mapped, a.local_udp_address())
        self.assertEqual(a.tcp_mapped, a.local_tcp_address())
        yield a.whenDiscovered()
        self.assertEqual(a.nat.mapping, "none")

    @defer.inlineCallbacks
    def test_udp(self) -> Any:
        a, b, conn = yield self.pair("udp")
        self.assertTrue(verifyObject(IPeerConnection, conn))
        self.assertEqual((conn.protocol, conn.peer_id), ("udp", "bob"))
        self.assertEqual(conn.remote_address.port, b.local_udp_address()[1])
        yield self.assertEchoes(conn)

    @defer.inlineCallbacks
    def test_tcp(self) -> Any:
        a, b, conn = yield self.pair("tcp")
        self.assertEqual(conn.protocol, "tcp")
        self.assertEqual(conn.remote_address.port, b.local_tcp_address()[1])
        yield self.assertEchoes(conn)

    @defer.inlineCallbacks
    def test_auto_prefers_udp_and_records_attempts(self) -> Any:
        a, b, conn = yield self.pair("auto")
        self.assertEqual(conn.protocol, "udp")
        self.assertEqual(conn.outcome.winner, "udp")
        self.assertEqual(conn.outcome.attempts[0].result, "connected")
        yield self.assertEchoes(conn)

    @defer.inlineCallbacks
    def test_predictable_symmetric_nat_punches_from_a_fresh_socket(self) -> Any:
        """
        Behind a NAT that hands out ports in sequence, each session gets a
        fresh socket whose mapping is learned just before the offer; it is
        closed when the path closes.
        """
        b = yield self.peer("bob")
        b.listen(EchoHandler())
        a = yield self.peer("alice", "udp", discover=False)  # discovery would find "no NAT"
        a.nat = NatSummary("address-and-port-dependent", "address-and-port-dependent", False, port_delta=1)
        conn = yield a.connect("bob")
        self.assertNotEqual(conn.local_address.port, a.local_udp_address()[1])
        yield self.assertEchoes(conn)
        conn.close()
        conn2 = yield a.connect("bob")
        self.addCleanup(conn2.close)
        self.assertNotEqual(conn2.local_address.port, a.local_udp_address()[1])  # the first one's may be reused
        yield self.assertEchoes(conn2)

    @defer.inlineCallbacks
    def test_survives_mediator_going_away(self) -> Any:
        a, b, conn = yield self.pair("udp")
        yield self.signal.stopService()
        yield self.stun.stopService()
        yield self.assertEchoes(conn, 5)

    @defer.inlineCallbacks
    def test_unknown_peer_fails_clearly(self) -> Any:
        a = yield self.peer("alice")
        with self.assertRaises(Exception) as caught:
            yield a.connect("nobody")
        self.assertIn("nobody", str(caught.exception))

    @defer.inlineCallbacks
    def test_peer_without_listener_rejects(self) -> Any:
        yield self.peer("bob")
        a = yield self.peer("alice")
        with self.assertRaises(Exception) as caught:
            yield a.connect("bob")
        self.assertIn("accepts no connections", str(caught.exception))

    @defer.inlineCallbacks
    def test_failure_names_every_attempt(self) -> Any:
        """
        Bob advertises a UDP port that never answers and a TCP port nobody
        listens on: both protocols fail, each with its reason.
        """
        silent_udp = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(silent_udp.stopListening)
        closed_tcp = socket.socket()
        closed_tcp.bind(("127.0.0.1", 0))
        self.addCleanup(closed_tcp.close)

        # Bob is only a signalling client: it accepts with those candidates and never punches.
        bob = SignalingClient(TCP4ClientEndpoint(reactor, "127.0.0.1", self.signal_port), "bob", clock=reactor)
        bob.setOfferHandler(
            lambda offer: Description(
                (
                    Candidate("host", "127.0.0.1", silent_udp.getHost().port),
                    Candidate("tcp-host", "127.0.0.1", closed_tcp.getsockname()[1]),
                )
            )
        )
        bob.startService()
        self.addCleanup(bob.stopService)
        yield bob.whenRegistered()
        a = yield self.peer("alice", punch_timeout=0.5)
        with self.assertRaises(AllAttemptsFailed) as caught:
            yield a.connect("bob")
        attempts = caught.exception.outcome.attempts
        self.assertEqual([r.protocol for r in attempts], ["udp", "tcp"])
        for r in attempts:
            self.assertEqual(r.result, "failed")
            self.assertTrue(r.reason)

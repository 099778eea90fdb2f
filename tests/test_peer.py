"""
The Peer service in memory, on a Clock: a MemoryUDPReactor (natbypass.testing.udp)
carries its UDP sockets and holds its TCP ports, our STUN responder runs on the
same reactor, and the mediator's signalling runs over iosim (natbypass.testing.signaling).
These pin the port lifecycle and the retry after discovery; the loopback tests
(tests/test_peer_loopback.py) prove the same composition on real sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app.echo import EchoHandler
from natbypass.nat import NatSummary
from natbypass.peer import Peer, PeerConfig
from natbypass.punch.race import AllAttemptsFailed
from natbypass.signaling.client import SignalingClient
from natbypass.signaling.server import Limits, SignalingFactory, SignalingState
from natbypass.signaling.wire import Candidate, Description
from natbypass.stun.server import STUNService
from natbypass.testing.signaling import MemoryNetwork
from natbypass.testing.udp import MemoryUDPReactor

STUN = ("127.0.0.1", 3478)
STUN_ALTERNATE = ("127.0.0.2", 3479)
#: Candidates nobody answers at: every attempt towards them fails.
NOWHERE = Description((Candidate("host", "127.0.0.9", 9),))


class PeerInMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryUDPReactor(latency=0.02)
        self.stun = STUNService(self.reactor, STUN, STUN_ALTERNATE, stats_interval=0)
        self.stun.startService()
        self.addCleanup(self.stun.stopService)
        self.stun_ports = set(self.reactor.open_udp_ports())
        state = SignalingState(self.reactor, Limits(offer_timeout=10.0))
        self.mediator = MemoryNetwork(SignalingFactory(state), self.reactor)
        self.peers: list[Any] = []
        self.addCleanup(self.stop_all)

    def stop_all(self) -> None:
        for p in self.peers:
            if p.running:
                p.stopService()
        self.settle(Deferred(), limit=1.0, check=False)

    def settle(self, d: Deferred[Any], limit: float = 30.0, check: bool = True) -> Any:
        """Move bytes and time (10 ms steps) until C{d} has a result, then return it."""
        out: list[Any] = []
        d.addBoth(out.append)
        end = self.reactor.seconds() + limit
        while not out and self.reactor.seconds() < end:
            self.mediator.flush()
            self.reactor.refuse_tcp_connections()  # STUN over TCP: nobody listens in memory
            self.reactor.advance(0.01)
        if check:
            self.assertTrue(out, "did not finish")
            if isinstance(out[0], Failure):
                out[0].raiseException()
            return out[0]
        return None

    def peer(self, name: str, host: str, protocol: str = "udp", **config: Any) -> Peer:
        config.setdefault("punch_timeout", 1.0)
        config.setdefault("stun_timeout", 1.0)
        p = Peer(
            self.reactor,
            name,
            self.mediator.endpoint(host),
            STUN,
            protocol=protocol,
            config=PeerConfig(bind_host=host, **config),
            reserve_tcp_port=self.reactor.reserve_tcp_port,
        )
        p.startService()
        self.peers.append(p)
        return p

    def mute_bob(self) -> list[Description]:
        """Bob is only a signalling client: he accepts every offer with NOWHERE and records it."""
        offers: list[Description] = []
        bob = SignalingClient(self.mediator.endpoint("127.0.0.3"), "bob", clock=self.reactor)
        bob.set_offer_handler(lambda offer: offers.append(offer.description) or NOWHERE)
        bob.startService()
        self.addCleanup(bob.stopService)
        self.settle(bob.whenRegistered())
        return offers

    def own_ports(self) -> set[tuple[str, int]]:
        return set(self.reactor.open_udp_ports()) - self.stun_ports

    def test_ports_bound_once_and_closed_at_stop(self) -> None:
        a = self.peer("alice", "127.0.0.1", discover=False)
        self.settle(a.whenReady())
        self.assertEqual(self.own_ports(), {a.local_udp_address()})
        self.assertEqual(self.reactor.open_tcp_sockets(), [a.local_tcp_address()])
        self.assertEqual(a.udp_mapped, a.local_udp_address())  # no NAT in front of it
        self.reactor.advance(a.config.host_refresh * 2)  # refreshing host addresses binds nothing
        self.assertEqual(self.own_ports(), {a.local_udp_address()})
        self.assertEqual(len(self.reactor.tcp_reserved), 1)
        self.settle(a.stopService())
        self.assertEqual(self.own_ports(), set())
        self.assertEqual(self.reactor.open_tcp_sockets(), [])

    def test_session_sockets_closed_after_the_session(self) -> None:
        """
        Behind a NAT that hands out ports in sequence, each session punches
        from a fresh UDP socket; it lives as long as the path, then closes.
        """
        b = self.peer("bob", "127.0.0.3", discover=False)
        b.listen(EchoHandler())
        a = self.peer("alice", "127.0.0.1", discover=False)
        self.settle(a.whenReady())
        self.settle(b.whenReady())
        a.nat = NatSummary("address-and-port-dependent", "address-and-port-dependent", False, port_delta=1)
        conn = self.settle(a.connect("bob"))
        fresh = (conn.local_address.host, conn.local_address.port)
        self.assertNotEqual(fresh, a.local_udp_address())
        self.assertIn(fresh, self.own_ports())
        self.assertEqual(len(self.reactor.tcp_reserved), 2)  # a UDP-only session takes no fresh TCP port
        conn.close()
        self.settle(Deferred(), limit=0.5, check=False)
        self.assertNotIn(fresh, self.own_ports())
        self.assertEqual(self.own_ports(), {a.local_udp_address(), b.local_udp_address()})

    def test_session_sockets_closed_after_a_failed_session(self) -> None:
        self.mute_bob()
        a = self.peer("alice", "127.0.0.1", protocol="auto", discover=False)
        self.settle(a.whenReady())
        a.nat = NatSummary("address-and-port-dependent", "address-and-port-dependent", False, port_delta=1)
        self.assertRaises(AllAttemptsFailed, self.settle, a.connect("bob"))
        self.assertEqual(self.own_ports(), {a.local_udp_address()})
        self.assertEqual(self.reactor.open_tcp_sockets(), [a.local_tcp_address()])
        self.assertEqual(len(self.reactor.tcp_reserved), 2)  # auto: one fresh TCP port too

    def test_retry_once_after_discovery_found_something_new(self) -> None:
        """
        The first connect does not wait for discovery; it fails, discovery
        has meanwhile found what the NAT does, so the peer offers once more
        with it (and, failing again, gives up).
        """
        offers = self.mute_bob()
        a = self.peer("alice", "127.0.0.1")
        self.settle(a.whenReady())
        self.assertEqual(a.nat, NatSummary())  # discovery is still running
        self.assertRaises(AllAttemptsFailed, self.settle, a.connect("bob"))
        self.assertEqual(len(offers), 2)
        self.assertEqual(offers[0].nat, NatSummary())
        self.assertEqual(offers[1].nat, a.nat)
        self.assertEqual(str(a.nat.mapping), "none")

    def test_no_retry_when_discovery_found_nothing_new(self) -> None:
        offers = self.mute_bob()
        a = self.peer("alice", "127.0.0.1", discover=False)
        self.settle(a.whenReady())
        self.assertRaises(AllAttemptsFailed, self.settle, a.connect("bob"))
        self.assertEqual(len(offers), 1)

    def test_host_candidates_revealed_by_default(self) -> None:
        """Our own offers and answers to approved offers carry our interface addresses (a LAN meets directly)."""
        a = self.peer("alice", "127.0.0.1", discover=False)
        self.settle(a.whenReady())
        kinds = {c.kind for c in a.description().candidates}
        self.assertTrue({"host", "tcp-host"} <= kinds, kinds)

    def test_host_candidates_never_revealed(self) -> None:
        """PeerConfig.reveal_host_candidates=False (--no-host-candidates): only the mapped addresses."""
        offers = self.mute_bob()
        a = self.peer("alice", "127.0.0.1", discover=False, reveal_host_candidates=False)
        self.settle(a.whenReady())
        self.assertEqual({c.kind for c in a.description().candidates}, {"srflx"})
        self.assertRaises(AllAttemptsFailed, self.settle, a.connect("bob"))
        self.assertEqual({c.kind for c in offers[0].candidates}, {"srflx"})

    def test_no_host_candidates_option(self) -> None:
        from twisted.internet import reactor

        from natbypass.app.peer_options import PEER_OPTIONS, make_peer

        self.assertIn("no-host-candidates", [s.name for s in PEER_OPTIONS if s.flag])
        options = {s.name: s.default for s in PEER_OPTIONS}
        options.update(
            {
                "mediator": "tcp:127.0.0.1:7000",
                "id": "x",
                "stun": STUN,
                "identity": self.mktemp(),
                "no-discovery": False,
            }
        )
        for flag, reveal in ((False, True), (True, False)):
            options["no-host-candidates"] = flag
            self.assertIs(make_peer(reactor, options).config.reveal_host_candidates, reveal)

"""
The Peer service in memory, on a Clock: a MemoryUDPReactor (natbypass.testing.udp)
carries its UDP sockets and holds its TCP ports, our STUN responder runs on the
same reactor, and the mediator's signalling runs over iosim (natbypass.testing.signaling).
These pin the port lifecycle and the retry after discovery; the loopback tests
(tests/test_peer_loopback.py) prove the same composition on real sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app.echo import EchoHandler
from natbypass.nat import NatSummary
from natbypass.peer import Peer
from natbypass.punch.candidates import PortRange
from natbypass.punch.race import AllAttemptsFailed
from natbypass.signaling.client import SignalingClient
from natbypass.signaling.wire import Candidate, Description
from natbypass.stun.server import STUNService
from natbypass.testing.mediator import MemoryMediator

STUN = MemoryMediator.stun_address
STUN_ALTERNATE = MemoryMediator.stun_alternate
#: Candidates nobody answers at: every attempt towards them fails.
NOWHERE = Description((Candidate("host", "127.0.0.9", 9),))


class PeerInMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MemoryMediator()
        self.addCleanup(self.m.stop)
        self.reactor, self.mediator, self.settle = self.m.reactor, self.m.network, self.m.settle

    def peer(self, name: str, host: str, protocol: str = "udp", **config: Any) -> Peer:
        return self.m.peer(name, host, protocol, **config)

    def mute_bob(self) -> list[Description]:
        """Bob is only a signalling client: he accepts every offer with NOWHERE and records it."""
        offers: list[Description] = []
        bob = SignalingClient(self.mediator.endpoint("127.0.0.3"), "bob", clock=self.reactor)
        bob.setOfferHandler(lambda offer: offers.append(offer.description) or NOWHERE)
        bob.startService()
        self.addCleanup(bob.stopService)
        self.settle(bob.whenRegistered())
        return offers

    def own_ports(self) -> set[tuple[str, int]]:
        return self.m.peer_ports()

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

    def test_stop_during_the_mapping_probe(self) -> None:
        """Stopped while its mapping probe waits for STUN: the probe is cancelled quietly (nothing unhandled)."""
        import gc

        a = self.peer("alice", "127.0.0.1")
        self.assertIsNotNone(a._probe)
        self.assertFalse(a._probe.called)
        probe = a._probe
        self.settle(a.stopService())
        self.assertTrue(probe.called)
        a._probe = None
        del probe
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(CancelledError), [])
        self.assertEqual(self.own_ports(), set())

    def test_retry_once_after_discovery_found_something_new(self) -> None:
        """
        The first connect does not wait for discovery (only for the mapping
        probe); it fails, discovery has meanwhile found what the NAT does,
        so the peer offers once more with it (and, failing again, gives up).
        """
        offers = self.mute_bob()
        a = self.peer("alice", "127.0.0.1")
        self.settle(a.whenReady())
        self.settle(a.whenMappingKnown())
        probed = NatSummary("none")  # the probe: no NAT; filtering not measured yet
        self.assertEqual(a.nat, probed)
        self.assertRaises(AllAttemptsFailed, self.settle, a.connect("bob"))
        self.assertEqual(len(offers), 2)
        self.assertEqual(offers[0].nat, probed)
        self.assertEqual(offers[1].nat, a.nat)
        self.assertEqual(str(a.nat.mapping), "none")

    def alice_to_bob(self) -> tuple[Peer, Any]:
        """Alice, and her connection to bob (an echo peer)."""
        b = self.peer("bob", "127.0.0.3", discover=False)
        b.listen(EchoHandler())
        a = self.peer("alice", "127.0.0.1", discover=False)
        self.settle(a.whenReady())
        self.settle(b.whenReady())
        return a, self.settle(a.connect("bob"))

    def test_reconnect_replaces_the_live_connection(self) -> None:
        """
        reconnect closes the live path and makes a fresh one, pinned to the key
        the old one proved; with no live path (it was lost) it just connects.
        """
        a, first = self.alice_to_bob()
        second = self.settle(a.reconnect("bob"))
        self.assertIsNot(second, first)
        self.assertIs(a.connectionTo("bob"), second)
        self.assertEqual(second.peer_fingerprint, first.peer_fingerprint)
        self.assertIsNotNone(self.successResultOf(first.whenLost()))
        second.close()
        self.settle(Deferred(), limit=0.5, check=False)
        self.assertIsNone(a.connectionTo("bob"))
        third = self.settle(a.reconnect("bob"))
        self.assertIs(a.connectionTo("bob"), third)

    def test_udp_path_repunched_through_the_mediator(self) -> None:
        """
        A UDP path gets a re-puncher on both sides; a suspect path asks the
        (in-memory) mediator, the other side is told and probes; closing the
        path takes the re-punchers away.  No NAT here: the address named is
        the one the mediator's STUN sees, at the signalling address.
        """
        b = self.peer("bob", "127.0.0.3", discover=False)
        b.listen(EchoHandler())
        a = self.peer("alice", "127.0.0.1", discover=False)
        self.settle(a.whenReady())
        self.settle(b.whenReady())
        conn = self.settle(a.connect("bob"))
        self.settle(Deferred(), limit=0.5, check=False)  # bob's side of the race ends a moment later
        self.assertEqual((len(a.repunchers), len(b.repunchers)), (1, 1))
        mine, theirs = a.repunchers.get(conn.session_id), b.repunchers.get(conn.session_id)
        # As PathWatch does when a probe goes unanswered (the path itself is fine in memory).
        conn.path.watch.suspect_since = self.reactor.seconds()
        conn.path.on_suspect(2.0)
        self.settle(Deferred(), limit=0.5, check=False)
        self.assertEqual((mine.plan.asked, mine.failures), (1, 0))
        self.assertEqual((theirs.plan.honoured, theirs.probes_sent), (1, theirs.plan.bounds.probes))
        conn.close()
        self.settle(Deferred(), limit=0.5, check=False)
        self.assertEqual((len(a.repunchers), len(b.repunchers)), (0, 0))

    def test_repunch_off(self) -> None:
        b = self.peer("bob", "127.0.0.3", discover=False, repunch=False)
        b.listen(EchoHandler())
        a = self.peer("alice", "127.0.0.1", discover=False, repunch=False)
        self.settle(a.whenReady())
        self.settle(b.whenReady())
        self.settle(a.connect("bob"))
        self.settle(Deferred(), limit=0.5, check=False)
        self.assertEqual((len(a.repunchers), len(b.repunchers)), (0, 0))

    def test_reconnect_keeps_the_old_pin(self) -> None:
        """A peer that now shows another key is refused: the old connection's key is the pin."""
        a, first = self.alice_to_bob()
        seen: list = []
        a.connect = lambda peer_id, protocol=None, fingerprint=None: seen.append(fingerprint) or Deferred()
        a.reconnect("bob")
        self.assertEqual(seen, [first.peer_fingerprint])

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

    def test_when_ready_cancels_cleanly(self) -> None:
        """Cancelling (or timing out) whenReady fails it with CancelledError, not a FirstError around it."""
        a = self.peer("alice", "127.0.0.1", discover=False)
        d = a.whenReady()
        d.cancel()
        self.failureResultOf(d, CancelledError)


class DualStackInMemoryTests(SynchronousTestCase):
    """C{PeerConfig(ipv6=True)}: IPv6 ports beside the IPv4 ones, IPv6 candidates, and an IPv6 path preferred."""

    STUN6 = ("2001:db8::53", 3478)

    def setUp(self) -> None:
        self.m = MemoryMediator()
        self.addCleanup(self.m.stop)
        self.stun6 = STUNService(self.m.reactor, self.STUN6, None, stats_interval=0)
        self.stun6.startService()
        self.addCleanup(self.stun6.stopService)
        self.m.stun_ports |= {self.STUN6}

    def peer(self, name: str, host: str, host6: str | None, **config: Any) -> Peer:
        if host6 is not None:
            config.update(ipv6=True, bind_host6=host6, stun6=self.STUN6)
        return self.m.peer(name, host, "udp", discover=False, **config)

    def test_ports_and_candidates(self) -> None:
        a = self.peer("alice", "127.0.0.1", "2001:db8::1")
        self.m.settle(a.whenReady())
        udp6 = [p for p in self.m.peer_ports() if ":" in p[0]]
        self.assertEqual([h for h, _ in udp6], ["2001:db8::1"])
        offered = {(c.kind, c.host) for c in a.description().candidates}
        # No NAT66: the IPv6 srflx equals the host candidate, which is offered once.
        self.assertLessEqual({("host", "2001:db8::1"), ("tcp-host", "2001:db8::1"), ("host", "127.0.0.1")}, offered)
        self.assertIn(("srflx", "2001:db8::1"), {(c.kind, c.host) for c in a.publication().candidates})
        self.m.settle(a.stopService())
        self.assertEqual(self.m.peer_ports(), set())
        self.assertEqual(self.m.reactor.open_tcp_sockets(), [])

    def test_no_ipv6_ports_means_ipv4_only(self) -> None:
        """IPv6 ports that cannot be bound (no IPv6 here, or none free) leave a working IPv4-only peer."""
        for port in range(41000, 41004):
            self.m.reactor.taken.add(("tcp", "2001:db8::1", port))
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a = self.peer("alice", "127.0.0.1", "2001:db8::1", port_range=PortRange(41000, 41003))
        self.m.settle(a.whenReady())
        self.assertEqual({h for h, _ in self.m.peer_ports()}, {"127.0.0.1"})
        self.assertFalse([c for c in a.description().candidates if ":" in c.host])
        self.assertTrue(any("no IPv6 ports" in str(e.get("log_format")) for e in observer))

    def test_prefers_ipv6(self) -> None:
        b = self.peer("bob", "127.0.0.3", "2001:db8::3")
        b.listen(EchoHandler())
        a = self.peer("alice", "127.0.0.1", "2001:db8::1")
        self.m.settle(a.whenReady())
        self.m.settle(b.whenReady())
        conn = self.m.settle(a.connect("bob"))
        self.assertEqual(conn.remote_address.host, "2001:db8::3")
        self.assertEqual(conn.local_address.host, "2001:db8::1")

    def test_ipv4_only_peer(self) -> None:
        """A dual-stack peer and an IPv4-only one meet over IPv4 (no IPv6 attempt, so no delay either)."""
        b = self.peer("bob", "127.0.0.3", None)
        b.listen(EchoHandler())
        a = self.peer("alice", "127.0.0.1", "2001:db8::1")
        self.m.settle(a.whenReady())
        self.m.settle(b.whenReady())
        conn = self.m.settle(a.connect("bob"))
        self.assertEqual(conn.remote_address.host, "127.0.0.3")


class PredictableFirstConnectTests(SynchronousTestCase):
    """
    Two peers behind symmetric NATs that hand out ports in sequence (issue
    12): the first connect, made as soon as the connecting peer is ready,
    already carries its NAT's port step, so it succeeds without a retry.
    """

    ALICE, BOB = "10.0.1.2", "10.0.2.2"

    def setUp(self) -> None:
        from natbypass.testing.udp import ADDRESS_AND_PORT_DEPENDENT as APD
        from natbypass.testing.udp import MemoryNAT

        self.m = MemoryMediator()
        self.addCleanup(self.m.stop)
        nats = self.m.reactor.network.nats
        nats.append(MemoryNAT([self.ALICE], "198.51.100.10", APD, APD, first_port=20000))
        nats.append(MemoryNAT([self.BOB], "198.51.100.20", APD, APD, first_port=30000))

    def test_first_connect_succeeds_without_a_retry(self) -> None:
        bob = self.m.peer("bob", self.BOB, "udp")
        bob.listen(EchoHandler())
        self.m.settle(bob.whenReady())
        self.m.settle(bob.whenDiscovered())
        self.assertEqual(bob.nat.port_delta, 1)
        alice = self.m.peer("alice", self.ALICE, "udp")
        self.m.settle(alice.whenReady())
        started = self.m.reactor.seconds()
        conn = self.m.settle(alice.connect("bob"))
        elapsed = self.m.reactor.seconds() - started
        self.assertEqual(conn.protocol, "udp")
        # One traversal, and it connected: no failed first attempt, no retry.
        self.m.settle(Deferred(), limit=0.5, check=False)  # bob's side finishes its handshake
        self.assertEqual(alice.stats.outcomes, {("connected", "udp"): 1})
        self.assertEqual(bob.stats.outcomes, {("connected", "udp"): 1})
        self.assertEqual(alice.nat.kind(), "symmetric-predictable")
        self.assertIsNone(alice.behavior)  # full discovery was still running: the probe was enough
        # Well within one punch timeout (the retry cost one and more).
        self.assertLess(elapsed, alice.config.punch_timeout)

    def test_probe_socket_closed(self) -> None:
        alice = self.m.peer("alice", self.ALICE, "udp")
        self.m.settle(alice.whenReady())
        self.m.settle(alice.whenMappingKnown())
        self.assertEqual(alice.nat.port_delta, 1)
        self.assertEqual(self.m.peer_ports(), {alice.local_udp_address()})

    def test_discovery_result_replaces_the_probe(self) -> None:
        alice = self.m.peer("alice", self.ALICE, "udp")
        self.m.settle(alice.whenReady())
        self.m.settle(alice.whenDiscovered())
        self.assertIsNotNone(alice.behavior)
        self.assertEqual(alice.nat, alice.behavior.summary())
        self.assertEqual(str(alice.nat.filtering), "address-and-port-dependent")

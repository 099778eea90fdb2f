"""
A listening Peer under abuse, in memory (natbypass.testing: MemoryUDPReactor,
its Clock, the mediator over iosim): what an offerer can make it send, and
which per-offer sockets it keeps.

The offerer here is a bare signalling client ("mallory") that offers whatever
candidates it likes and never punches; bob is a real L{Peer} that approves
everyone (the echo demo's default), as in the review that found these.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app.echo import EchoHandler
from natbypass.nat import NatSummary
from natbypass.peer import Peer
from natbypass.punch.candidates import MAX_OFFER_BYTES
from natbypass.signaling.client import SignalingClient
from natbypass.signaling.wire import MAX_CANDIDATES, Candidate, Connect, Description, encode
from natbypass.testing.mediator import MemoryMediator

STUN = MemoryMediator.stun_address
STUN_ALTERNATE = MemoryMediator.stun_alternate
BOB = "10.0.0.3"
MALLORY = "198.51.100.66"
#: The victim of the reflection: a third party's address.
VICTIM = "198.51.100.7"
#: The review's offer: as many server-reflexive candidates as the wire allows,
#: each with a port step, so each is probed at itself and 8 predicted ports.
SCAN = Description(
    tuple(Candidate("srflx", VICTIM, 1000 + 100 * i) for i in range(MAX_CANDIDATES)),
    NatSummary("address-and-port-dependent", "address-and-port-dependent", False, port_delta=1),
)
#: Candidates no peer has, beside one good one.
ODD = Description(
    (
        Candidate("srflx", "127.0.0.1", 22),
        Candidate("srflx", "224.0.0.251", 5353),
        Candidate("srflx", "255.255.255.255", 67),
        Candidate("srflx", "0.0.0.0", 80),
        Candidate("srflx", "169.254.169.254", 80),
        Candidate("host", "169.254.10.10", 4000),
        Candidate("host", "fe80::1", 4000),
        Candidate("host", "::ffff:127.0.0.1", 4000),
        Candidate("host", "ff02::1", 4000),
        Candidate("host", "240.0.0.1", 4000),
        Candidate("srflx", VICTIM, 4000),
    )
)


class AbuseTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MemoryMediator()
        self.addCleanup(self.m.stop)
        self.reactor, self.mediator, self.settle = self.m.reactor, self.m.network, self.m.settle

    def bob(self, **config: Any) -> Peer:
        config.setdefault("punch_timeout", 5.0)
        config.setdefault("discover", False)
        p = self.m.peer("bob", BOB, "udp", **config)
        p.listen(EchoHandler())
        self.settle(p.whenReady())
        return p

    def mallory(self) -> SignalingClient:
        m = self.m.start(SignalingClient(self.mediator.endpoint(MALLORY), "mallory", clock=self.reactor))
        self.settle(m.whenRegistered())
        return m

    def sent_by(self, host: str, since: float = 0.0) -> list[tuple[tuple[str, int], bytes]]:
        """What C{host} sent to anyone but the STUN server, from C{since}."""
        return [
            (dest, data)
            for t, source, dest, data in self.reactor.network.sent
            if source[0] == host and dest not in (STUN, STUN_ALTERNATE) and t >= since
        ]

    def own_ports(self) -> set[tuple[str, int]]:
        return self.m.peer_ports()


class ReflectionTests(AbuseTestCase):
    """Finding 2: reflection and scanning through listening peers."""

    def offer(self, description: Description) -> tuple[Peer, int, list[tuple[tuple[str, int], bytes]]]:
        """Mallory offers C{description} to bob; what bob then sends in the whole attempt, and the line's size."""
        bob = self.bob()
        mallory = self.mallory()
        line = len(encode(Connect(1, "bob", description))) + 1  # and its newline
        start = self.reactor.seconds()
        self.settle(mallory.connect("bob", description))
        self.settle(Deferred(), limit=bob.config.punch_timeout + 2.0, check=False)
        return bob, line, self.sent_by(BOB, start)

    def test_amplification_bounded(self) -> None:
        """
        The review's scenario: one connect line of about 2.5 KB, 32
        candidates with a port step.  Before: bob sent about 7,200
        datagrams (381 KB) to 288 ports in 5 s, 154 times the line.  Now
        at most 8 candidates, 8 predicted ports, and L{MAX_OFFER_BYTES}
        over the whole attempt.
        """
        _, line, sent = self.offer(SCAN)
        total = sum(len(data) for _, data in sent)
        factor = total / line
        self.assertLessEqual(total, MAX_OFFER_BYTES)
        self.assertLessEqual(len({dest for dest, _ in sent}), 16)
        self.assertLessEqual(factor, 4.0, f"bob sent {total} bytes for a {line}-byte line: {factor:.1f}x")

    def test_odd_addresses_refused(self) -> None:
        """Loopback, multicast, broadcast, unspecified, link-local, metadata, mapped: never probed."""
        _, _, sent = self.offer(ODD)
        self.assertEqual({dest for dest, _ in sent}, {(VICTIM, 4000)})

    def test_refusals_logged_once_per_offer(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.offer(ODD)
        refusals = [e for e in events if "refused_count" in e]
        self.assertEqual(len(refusals), 1)
        self.assertEqual(refusals[0]["refused_count"], 10)
        self.assertIn("'169.254.169.254'", refusals[0]["refused"])


class OfferSocketTests(AbuseTestCase):
    """
    Finding 10: per-offer sockets of an answering peer.  Behind a NAT that
    hands out ports in sequence, bob answers each offer from a fresh UDP
    socket (and TCP port); it must close them on every path, not only when
    the session arrives.
    """

    def predictable_bob(self) -> Peer:
        bob = self.bob(punch_timeout=1.0)
        bob.nat = NatSummary("address-and-port-dependent", "address-and-port-dependent", False, port_delta=1)
        return bob

    def assertOnlyMainPorts(self, bob: Peer) -> None:
        self.assertEqual(self.own_ports(), {bob.local_udp_address()})
        self.assertEqual(self.reactor.open_tcp_sockets(), [bob.local_tcp_address()])

    def test_session_closes_them(self) -> None:
        """The ordinary path: the session arrives, the attempt fails, the sockets close."""
        bob = self.predictable_bob()
        mallory = self.mallory()
        self.settle(mallory.connect("bob", Description((Candidate("srflx", VICTIM, 4000),))))
        self.settle(Deferred(), limit=3.0, check=False)
        self.assertOnlyMainPorts(bob)

    def test_offerer_leaves_while_bob_answers(self) -> None:
        """Mallory disconnects while bob learns its fresh port's mapping: the offer is withdrawn."""
        bob = self.predictable_bob()
        mallory = self.mallory()
        mallory.connect("bob", Description((Candidate("srflx", VICTIM, 4000),))).addErrback(lambda _: None)
        self.mediator.flush()  # the offer reaches bob, who binds a fresh port and asks STUN
        self.assertEqual(len(self.own_ports()), 2)
        mallory.stopService()
        self.settle(Deferred(), limit=30.0, check=False)
        self.assertOnlyMainPorts(bob)

    def test_accept_never_answered(self) -> None:
        """
        Bob accepted, but the mediator went away before the session came
        back (bob reconnects; nothing ever says the offer is over).
        """
        bob = self.predictable_bob()
        mallory = self.mallory()
        mallory.connect("bob", Description((Candidate("srflx", VICTIM, 4000),))).addErrback(lambda _: None)
        self.mediator.flush()
        self.reactor.advance(0.05)  # bob's fresh port learned its mapping: the accept is written
        self.mediator.up = False
        for p in self.mediator.pumps:
            p.serverIO.loseConnection()
        self.settle(Deferred(), limit=60.0, check=False)
        self.assertOnlyMainPorts(bob)

    def test_stop_closes_them(self) -> None:
        bob = self.predictable_bob()
        mallory = self.mallory()
        mallory.connect("bob", Description((Candidate("srflx", VICTIM, 4000),))).addErrback(lambda _: None)
        self.mediator.flush()
        self.reactor.advance(0.05)
        self.settle(bob.stopService())
        self.assertEqual(self.own_ports(), set())
        self.assertEqual(self.reactor.open_tcp_sockets(), [])

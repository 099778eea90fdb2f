"""
Introductions in one mediator round trip, end to end in memory: Peers on a
MemoryMediator (natbypass.testing.mediator) publish their mapped candidates,
a connect gets its session at once, and the target's approval still gates
the path: a refusal revokes the initiator's session, nothing is punched.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from natbypass.app.echo import EchoHandler
from natbypass.interfaces import IIncomingHandler, IPeerApprover
from natbypass.nat import NatSummary
from natbypass.peer import Peer
from natbypass.signaling.client import OfferRejected
from natbypass.signaling.wire import PUBLISHABLE_KINDS
from natbypass.testing.mediator import MemoryMediator
from natbypass.trust import AllowList


@implementer(IIncomingHandler, IPeerApprover)
class LateNo(EchoHandler):
    """Refuses every peer, C{delay} seconds after being asked (an application that looks something up)."""

    def __init__(self, clock: Any, delay: float) -> None:
        super().__init__()
        self.clock, self.delay = clock, delay
        self.asked: list[str] = []

    def approvePeer(self, peer_id: str, fingerprint: Any) -> Deferred[bool]:
        self.asked.append(peer_id)
        d: Deferred[bool] = Deferred()
        self.clock.callLater(self.delay, d.callback, False)
        return d


class IntroductionInMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MemoryMediator(latency=0.025)
        self.addCleanup(self.m.stop)
        self.reactor, self.settle = self.m.reactor, self.m.settle

    def pair(self, publish: bool = True, **bob: Any) -> tuple[Peer, Peer]:
        b = self.m.peer("bob", "127.0.0.3", discover=False, publish_candidates=publish, **bob)
        a = self.m.peer("alice", "127.0.0.1", discover=False, publish_candidates=publish)
        self.settle(a.whenReady())
        self.settle(b.whenReady())
        self.settle(Deferred(), limit=0.2, check=False)  # the publications arrive
        return a, b

    def counters(self) -> dict[str, int]:
        return self.m.state.status()["counters"]

    def connect_time(self, a: Peer) -> float:
        start = self.reactor.seconds()
        conn = self.settle(a.connect("bob"))
        self.addCleanup(conn.close)
        self.assertTrue(conn.secure)
        return self.reactor.seconds() - start

    def test_one_round_trip(self) -> None:
        """With publications bob gets an introduction (no offer to answer first); without, an offer."""
        a, b = self.pair()
        b.listen(EchoHandler())
        fast = self.connect_time(a)
        self.assertEqual((self.counters()["introductions"], self.counters()["introductions:accepted"]), (1, 1))
        self.m.stop()
        self.setUp()
        a, b = self.pair(publish=False)
        b.listen(EchoHandler())
        slow = self.connect_time(a)
        self.assertNotIn("introductions", self.counters())
        # The signalling here has no latency (iosim), so the round trip saved shows in the lab
        # (bench/connect_time.py); in memory the paths just form alike.
        self.assertLessEqual(fast, slow)

    def test_publication_has_no_host_candidates(self) -> None:
        a, b = self.pair()
        kinds = {c.kind for c in b.publication().candidates}
        self.assertTrue(kinds and kinds <= PUBLISHABLE_KINDS, kinds)
        self.assertIn("host", {c.kind for c in b.description().candidates})
        b.nat = NatSummary("address-and-port-dependent", "address-and-port-dependent", False, port_delta=1)
        self.assertEqual(b.publication().candidates, ())  # ports predicted per session: nothing to publish

    def test_refusal_by_allow_list_fails_the_connect_nothing_punched(self) -> None:
        a, b = self.pair(peer_args=None)
        b.allow = AllowList()  # nobody
        b.listen(EchoHandler())
        start = self.reactor.seconds()
        e = self.assertRaises(OfferRejected, self.settle, a.connect("bob"))
        self.assertIn("allow list", str(e))
        self.assertLess(self.reactor.seconds() - start, 0.2)  # the reject's round trip, not a punch timeout
        self.assertEqual(self.counters()["introductions:rejected"], 1)
        self.settle(Deferred(), limit=2.0, check=False)
        self.assertEqual((b.traversals, b.stats.outcomes, b.stats.attempts), (0, {}, {}))

    def test_refusal_after_the_initiator_got_its_session(self) -> None:
        """The initiator punches already; the target's late no stops it with the reason."""
        a, b = self.pair()
        gate = LateNo(self.reactor, 0.3)
        b.listen(gate)
        start = self.reactor.seconds()
        d = a.connect("bob")
        self.settle(Deferred(), limit=0.2, check=False)
        self.assertEqual(a.traversals, 1)  # alice has her session and is punching
        self.assertEqual(gate.asked, ["alice"])
        e = self.assertRaises(OfferRejected, self.settle, d)
        self.assertIn("refused alice", str(e))
        self.assertLess(self.reactor.seconds() - start, 0.5)
        self.assertEqual(a.traversals, 0)
        self.settle(Deferred(), limit=2.0, check=False)
        self.assertEqual((b.traversals, b.stats.attempts), (0, {}))
        self.assertEqual(self.counters()["introductions:rejected"], 1)

    def test_republished_when_the_mapping_changes(self) -> None:
        """A publication follows what the peer knows (here a new mapped address), so it never goes stale."""
        a, b = self.pair()
        before = self.counters()["publications"]
        b._main.udp.mapped = ("127.0.0.3", 1)  # the NAT moved us (what a new STUN answer would say)
        b._publish()
        self.settle(Deferred(), limit=0.2, check=False)
        self.assertEqual(self.counters()["publications"], before + 1)
        b._publish()  # unchanged: not sent again
        self.settle(Deferred(), limit=0.2, check=False)
        self.assertEqual(self.counters()["publications"], before + 1)

    def test_publication_sent_again_after_reconnecting(self) -> None:
        """The mediator forgets a publication with its connection; the client brings it back first thing."""
        a, b = self.pair()
        b.listen(EchoHandler())
        before = self.counters()["publications"]
        self.m.network.drop_all()
        self.settle(Deferred(), limit=3.0, check=False)  # both reconnect (backoff) and register again
        self.assertEqual(self.counters()["publications"], before + 2)
        self.connect_time(a)
        self.assertEqual(self.counters()["introductions:accepted"], 1)

"""
The peer's side of a re-punch (natbypass.punch.repunch): when it asks the
mediator, what a notice makes it send, and the bounds a hostile peer or
mediator meets.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch import packet
from natbypass.punch.repunch import RepunchBounds, Repuncher, RepunchPlan, RepunchRegistry, attach, probe_packet
from natbypass.punch.session import PunchSession
from natbypass.testing.udp import ADDRESS_AND_PORT_DEPENDENT
from tests.test_punch_migration import A_REBOUND, longest_gap, stream
from tests.test_punch_udp import B_SRFLX, A, B, ConePair

SESSION = PunchSession("c2Vzc2lvbg", b"k" * 32, 1, "bob")
REMOTE = ("198.51.100.2", 5000)
NEW = ("203.0.113.1", 41000)


class PlanTests(SynchronousTestCase):
    def test_asks_spaced_and_budgeted(self) -> None:
        p = RepunchPlan(RepunchBounds(ask_interval=5.0, max_asks=2, window=60.0))
        self.assertEqual([p.ask(t) for t in (0.0, 1.0, 5.0, 10.0, 59.0, 60.0)], [True, False, True, False, False, True])

    def test_notices_budgeted(self) -> None:
        p = RepunchPlan(RepunchBounds(max_notices=3, window=10.0))
        self.assertEqual([p.notice(float(t)) for t in range(6)], [True, True, True, False, False, False])
        self.assertEqual((p.honoured, p.ignored), (3, 3))
        self.assertTrue(p.notice(10.0))


class Harness:
    def __init__(self, mapped=NEW, bounds: RepunchBounds = RepunchBounds()) -> None:
        self.clock = Clock()
        self.suspect = True
        self.asks: list[tuple[str, object]] = []
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.ask_result: defer.Deferred | None = None
        self.mapped = mapped

        def learn():
            if isinstance(self.mapped, Exception):
                raise self.mapped
            return self.mapped

        def ask(sid, addr):
            self.asks.append((sid, addr))
            return self.ask_result if self.ask_result is not None else defer.succeed(None)

        self.r = Repuncher(
            SESSION,
            self.clock,
            learn,
            ask,
            lambda data, addr: self.sent.append((data, addr)),
            lambda: REMOTE,
            lambda: self.suspect,
            bounds,
        )


class RepuncherTests(SynchronousTestCase):
    def test_suspect_asks_with_the_mapping(self) -> None:
        h = Harness()
        h.r.suspect(1.5)
        self.assertEqual(h.asks, [(SESSION.session_id, NEW)])

    def test_asks_again_while_suspect_then_stops(self) -> None:
        h = Harness()
        h.r.suspect()
        h.r.suspect()  # the follower calling again does not ask twice
        h.clock.advance(5.0)
        self.assertEqual(len(h.asks), 2)
        h.suspect = False  # heard again
        h.clock.advance(30.0)
        self.assertEqual(len(h.asks), 2)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_asks_bounded_while_suspect_forever(self) -> None:
        h = Harness()
        h.r.suspect()
        h.clock.pump([1.0] * 600)  # ten minutes suspect
        self.assertLessEqual(len(h.asks), 4 * 11)  # windows starting at 0, 60, ..., 600 s
        self.assertGreaterEqual(len(h.asks), 4 * 9)

    def test_no_mapping_asks_without_address(self) -> None:
        h = Harness(mapped=None)
        h.r.suspect()
        self.assertEqual(h.asks, [(SESSION.session_id, None)])
        h = Harness(mapped=TimeoutError("stun"))
        h.r.suspect()
        self.assertEqual(h.asks, [(SESSION.session_id, None)])

    def test_mediator_refusal_counted(self) -> None:
        h = Harness()
        h.ask_result = defer.fail(ValueError("rate-limited"))
        h.r.suspect()
        self.assertEqual(h.r.failures, 1)

    def test_notice_sends_authenticated_probes(self) -> None:
        h = Harness()
        h.r.noticed(NEW)
        h.clock.pump([0.1] * 10)
        b = RepunchBounds()
        self.assertEqual(len(h.sent), b.probes)
        for data, addr in h.sent:
            self.assertEqual(addr, NEW)
            p = packet.decode(data)
            self.assertTrue(packet.verify(p, SESSION.key))
            self.assertEqual((p.type, p.role, p.session_id), (packet.PacketType.PROBE, 1, SESSION.sid))

    def test_notice_without_address_probes_the_path(self) -> None:
        h = Harness()
        h.r.noticed(None)
        self.assertEqual(h.sent[0][1], REMOTE)

    def test_notice_flood_bounded(self) -> None:
        """A hostile peer (or mediator) repeating notices: at most max_notices x probes a window."""
        h = Harness()
        for _ in range(1000):
            h.r.noticed(NEW)
        h.clock.pump([0.1] * 10)
        b = RepunchBounds()
        self.assertEqual(len(h.sent), b.max_notices * b.probes)
        self.assertEqual(h.r.plan.ignored, 1000 - b.max_notices)

    def test_notice_to_a_refused_address_sends_nothing(self) -> None:
        """
        A hostile mediator names an address the punch itself would refuse
        (loopback, a metadata service, multicast, another family): no probe,
        and the notice budget is not spent.
        """
        h = Harness()
        for target in (("127.0.0.1", 22), ("169.254.169.254", 80), ("224.0.0.1", 5000), ("2001:db8::1", 5000)):
            h.r.noticed(target)
        h.clock.pump([0.1] * 10)
        self.assertEqual(h.sent, [])
        self.assertEqual((h.r.refused, h.r.plan.honoured), (4, 0))
        h.r.noticed(NEW)
        self.assertEqual(h.sent[0][1], NEW)

    def test_notice_screened_with_the_callers_networks(self) -> None:
        """The peer's own screening decides (a peer on loopback may be re-punched there)."""
        h = Harness()
        h.r = Repuncher(SESSION, h.clock, lambda: None, lambda s, a: defer.succeed(None),
                        lambda data, addr: h.sent.append((data, addr)), lambda: ("127.0.0.2", 5000),
                        lambda: True, refusal=lambda host: None)  # fmt: skip
        h.r.noticed(("127.0.0.3", 6000))
        self.assertEqual(h.sent[0][1], ("127.0.0.3", 6000))

    def test_stop_cancels_everything(self) -> None:
        h = Harness()
        h.r.suspect()
        h.r.noticed(NEW)
        h.r.stop()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.r.noticed(NEW)
        h.r.suspect()
        self.assertEqual((len(h.sent), len(h.asks)), (1, 1))

    def test_probe_packet_is_a_probe(self) -> None:
        p = packet.decode(probe_packet(SESSION, nonce=7))
        self.assertEqual((p.nonce, p.echo), (7, 0))


class RegistryTests(SynchronousTestCase):
    def test_routes_by_session_and_drops_others(self) -> None:
        h = Harness()
        reg = RepunchRegistry()
        reg.add(h.r)
        reg.noticed("someone-elses", NEW)
        self.assertEqual((reg.unknown, h.sent), (1, []))
        reg.noticed(SESSION.session_id, NEW)
        self.assertEqual(len(h.sent), 1)
        reg.remove(h.r)
        self.assertEqual(len(reg), 0)
        reg.noticed(SESSION.session_id, NEW)
        self.assertEqual(reg.unknown, 2)


class InMemoryRepunchTests(SynchronousTestCase):
    """
    The case QUIC migration alone cannot follow (tests.test_punch_migration,
    RebindingTests.test_port_restricted_peer_path_is_reported_suspect_then_lost):
    A's endpoint-independent NAT forgets everything and maps A to a new port;
    B's NAT filters by address and port.  With re-punchers attached (the
    mediator stood in for by a relay with 100 ms of delay, STUN by the
    mapping A's NAT hands out next), the path moves and the stream goes on.
    """

    def connected(self) -> tuple[ConePair, object, object, RepunchRegistry, RepunchRegistry]:
        p = ConePair(keepalive_interval=2.0)
        p.net.nats[1].filtering = ADDRESS_AND_PORT_DEPENDENT
        p.run(1.0)
        a, b = p.results["a"], p.results["b"]
        ra, rb = RepunchRegistry(), RepunchRegistry()
        self.asked: list[tuple[str, object]] = []

        def mediator(to: RepunchRegistry):
            def ask(sid: str, mapped):
                self.asked.append((sid, mapped))
                p.clock.callLater(0.1, to.noticed, sid, mapped)
                return defer.succeed(None)

            return ask

        attach(a, A, ra, p.clock, lambda: A_REBOUND, mediator(rb), p.ep_a.sendTo)
        attach(b, B, rb, p.clock, lambda: B_SRFLX, mediator(ra), p.ep_b.sendTo)
        return p, a, b, ra, rb

    def check(self, src_name: str) -> None:
        p, a, b, ra, rb = self.connected()
        src, dst = (a, b) if src_name == "a" else (b, a)
        got, sent, loop = stream(p, src, dst)
        p.run(1.0)
        flushed = p.clock.seconds()
        p.net.nats[0].flush(A_REBOUND[1])
        p.run(8.0)
        loop.stop()
        p.run(0.5)
        self.assertEqual([m.new for m in b.path.moves], [A_REBOUND])
        self.assertFalse(any(isinstance(d, Exception) for _, d in got), got[-3:])
        self.assertGreater(got[-1][0], flushed + 7)  # the same connection carried the stream on
        self.assertIn((A.session_id, A_REBOUND), self.asked)
        stall = longest_gap(got, flushed - 0.1)
        # The quiet bound and the answer timeout make A suspect; then STUN,
        # the mediator's relay, B's probes, A's next probe and B's validation:
        # a few seconds, well inside the idle timeout that ended the path before.
        self.assertLess(stall, 4.0)
        # B probed A's new address for the notice: that is what opened its NAT's filter.
        [rep_b] = rb._paths.values()
        self.assertGreater(rep_b.probes_sent, 0)
        a.close()
        p.run(1.0)
        self.assertEqual((len(ra), len(rb)), (0, 0))

    def test_rebinding_side_reads(self) -> None:
        self.check("b")

    def test_rebinding_side_writes(self) -> None:
        self.check("a")


class FailureRetryTests(SynchronousTestCase):
    def test_failed_ask_retried_soon_within_budget(self) -> None:
        """A rebinding NAT also broke the signalling connection: the ask fails, and is tried again after 1 s."""
        h = Harness()
        h.ask_result = defer.fail(ConnectionError("signalling connection lost"))
        h.r.suspect()
        h.ask_result = defer.succeed(None)
        h.clock.advance(1.0)
        self.assertEqual(len(h.asks), 2)
        self.assertEqual(h.r.failures, 1)

    def test_failing_forever_is_budgeted(self) -> None:
        h = Harness()
        h.ask_result = None

        def failing(sid, addr):
            h.asks.append((sid, addr))
            return defer.fail(ConnectionError("no mediator"))

        h.r._ask = failing
        h.r.suspect()
        h.clock.pump([0.5] * 119)  # just under a minute: the window of the first ask
        self.assertEqual(len(h.asks), RepunchBounds().max_asks)

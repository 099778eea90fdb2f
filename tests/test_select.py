"""Tests for natbypass.punch.select: the selection table and the happy-eyeballs race."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch.select import (
    AD,
    APD,
    EI,
    NONE,
    UNKNOWN,
    AllAttemptsFailed,
    Kind,
    NatSummary,
    NetworkFacts,
    NoCommonProtocol,
    TABLE,
    decide,
    feasibility,
    parse_wish,
    predictable_delta,
    choose_order,
    Outcome,
    race,
)
from natbypass.punch.session import PunchFailed

OPEN = NatSummary(NONE, NONE)
FULL = NatSummary(EI, EI)
RESTRICTED = NatSummary(EI, AD)
PORT_RESTRICTED = NatSummary(EI, APD)
SYM_PRED = NatSummary(APD, APD, port_delta=1)
SYM_RANDOM = NatSummary(APD, APD)
LAB = {
    "open": OPEN,
    "full-cone": FULL,
    "restricted-cone": RESTRICTED,
    "port-restricted-cone": PORT_RESTRICTED,
    "symmetric-predictable": SYM_PRED,
    "symmetric-random": SYM_RANDOM,
}

summaries = st.builds(
    NatSummary,
    mapping=st.sampled_from([EI, AD, APD, NONE, UNKNOWN]),
    filtering=st.sampled_from([EI, AD, APD, NONE, UNKNOWN]),
    port_delta=st.sampled_from([None, 1, 2]),
    tcp_mapping=st.sampled_from([None, EI, APD]),
    udp_blocked=st.booleans(),
)
wishes = st.sampled_from(["auto", "udp", "tcp", ("udp", "tcp"), ("tcp", "udp")])


class KindTests(SynchronousTestCase):
    def test_lab_kinds(self) -> None:
        for name, summary in LAB.items():
            self.assertEqual(summary.kind(), Kind(name))

    def test_firewall_without_nat_is_port_restricted(self) -> None:
        self.assertEqual(NatSummary(NONE, APD).kind(), Kind.PORT_RESTRICTED)

    def test_tcp_mapping_measured_apart(self) -> None:
        s = NatSummary(EI, APD, tcp_mapping=APD)
        self.assertEqual((s.kind("udp"), s.kind("tcp")), (Kind.PORT_RESTRICTED, Kind.SYMMETRIC_RANDOM))

    def test_bad_behaviour_name(self) -> None:
        self.assertRaises(ValueError, NatSummary, "eim", APD)

    def test_predictable_delta(self) -> None:
        self.assertEqual(predictable_delta([4000, 4001, 4001, 4002]), 1)
        self.assertEqual(predictable_delta([4000, 4002, 4004]), 2)
        self.assertIsNone(predictable_delta([4000, 4001]))
        self.assertIsNone(predictable_delta([4000, 4001, 4003]))
        self.assertIsNone(predictable_delta([4000, 31000, 62000]))

    def test_from_behavior(self) -> None:
        class T:
            def __init__(self, port):
                self.mapped = ("198.18.0.5", port) if port else None

        class B:
            mapping, filtering, port_preserving, reachable = APD, APD, False, True
            tcp_mapping = None
            tests = (T(5000), T(5001), T(None), T(5002))

        s = NatSummary.from_behavior(B())
        self.assertEqual((s.kind(), s.port_delta, s.udp_blocked), (Kind.SYMMETRIC_PREDICTABLE, 1, False))

        class Interleaved(B):
            # Other flows took ports between the Binding and the two
            # back-to-back mapping tests (seen in the lab: TCP tests run alongside).
            tests = (T(20003), T(None), T(None), T(20006), T(20007))

        s = NatSummary.from_behavior(Interleaved())
        self.assertEqual((s.kind(), s.port_delta), (Kind.SYMMETRIC_PREDICTABLE, 1))

        class Random(B):
            tests = (T(20003), T(41234), T(3311))

        self.assertIsNone(NatSummary.from_behavior(Random()).port_delta)


class TableTests(SynchronousTestCase):
    def test_every_pair_has_a_row(self) -> None:
        for a in Kind:
            for b in Kind:
                expected, reason = TABLE[frozenset((a, b))]
                self.assertTrue(reason)

    def test_lab_matrix(self) -> None:
        """The issue's claim: all pairs work except PRC x symmetric and symmetric x symmetric,
        which need port prediction (done here for predictable symmetric NATs)."""
        failing = {
            frozenset(("port-restricted-cone", "symmetric-random")),
            frozenset(("symmetric-random",)),
            frozenset(("symmetric-predictable", "symmetric-random")),
        }
        for a, sa in LAB.items():
            for b, sb in LAB.items():
                row = feasibility(sa, sb, "udp")
                self.assertEqual(row.expected, frozenset((a, b)) not in failing, (a, b, row.reason))
                if row.expected is False:
                    self.assertIn("port prediction", row.reason)

    def test_prediction_requested_only_where_needed(self) -> None:
        self.assertEqual(feasibility(PORT_RESTRICTED, SYM_PRED, "udp").predict_remote_delta, 1)
        self.assertEqual(feasibility(SYM_PRED, SYM_PRED, "udp").predict_remote_delta, 1)
        self.assertIsNone(feasibility(SYM_PRED, PORT_RESTRICTED, "udp").predict_remote_delta)
        self.assertIsNone(feasibility(FULL, SYM_PRED, "udp").predict_remote_delta)

    def test_unknown(self) -> None:
        row = feasibility(NatSummary(), FULL, "udp")
        self.assertIsNone(row.expected)


class DecideTests(SynchronousTestCase):
    def test_auto_prefers_udp(self) -> None:
        plan = decide(PORT_RESTRICTED, FULL)
        self.assertEqual(plan.order, ("udp", "tcp"))
        self.assertIn("UDP first", plan.why)

    def test_auto_tcp_first_when_only_tcp_expected(self) -> None:
        local = NatSummary(EI, APD, tcp_mapping=EI)
        remote = NatSummary(APD, APD, tcp_mapping=EI)  # symmetric for UDP only
        plan = decide(local, remote)
        self.assertEqual(plan.order, ("tcp", "udp"))
        self.assertFalse(plan.rows["udp"].expected)

    def test_udp_blocked(self) -> None:
        self.assertEqual(decide(FULL, FULL, facts=NetworkFacts(udp_blocked=True)).order, ("tcp",))
        remote = NatSummary(EI, APD, udp_blocked=True)
        plan = decide(FULL, remote)
        self.assertEqual(plan.order, ("tcp",))
        self.assertIn("blocked", plan.rows["udp"].reason)

    def test_explicit_wishes(self) -> None:
        self.assertEqual(decide(FULL, FULL, "udp").order, ("udp",))
        self.assertEqual(decide(FULL, FULL, "auto", "tcp").order, ("tcp",))
        self.assertEqual(decide(FULL, FULL, ("tcp", "udp"), ("udp", "tcp"), local_role=0).order, ("tcp", "udp"))
        self.assertEqual(decide(FULL, FULL, ("tcp", "udp"), ("udp", "tcp"), local_role=1).order, ("udp", "tcp"))
        self.assertRaises(NoCommonProtocol, decide, FULL, FULL, "udp", "tcp")

    def test_parse_wish(self) -> None:
        self.assertIsNone(parse_wish("auto"))
        self.assertEqual(parse_wish("tcp,udp"), ("tcp", "udp"))
        for bad in ("quic", "", ("udp", "udp"), ("auto", "udp")):
            self.assertRaises(ValueError, parse_wish, bad)

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(summaries, summaries, wishes, wishes, st.booleans(), st.booleans())
    def test_both_sides_agree(self, a, b, wa, wb, ub, tb) -> None:
        """Each peer calls decide() with itself as local; the orders must match."""
        facts = NetworkFacts(udp_blocked=ub, tcp_blocked=tb)
        try:
            mine = decide(a, b, wa, wb, 0, facts)
        except NoCommonProtocol:
            self.assertRaises(NoCommonProtocol, decide, b, a, wb, wa, 1, facts)
            return
        theirs = decide(b, a, wb, wa, 1, facts)
        self.assertEqual(mine.order, theirs.order)
        for p in ("udp", "tcp"):
            self.assertEqual(mine.rows[p].expected, theirs.rows[p].expected)


class Conn:
    def __init__(self, name):
        self.name = name
        self.closed = False

    def close(self):
        self.closed = True


class RaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pending: dict[str, Deferred] = {}
        self.cancelled: list[str] = []

    def factory(self, name):
        def make():
            d = Deferred(lambda _: self.cancelled.append(name))
            self.pending[name] = d
            return d

        return make

    def test_first_wins_second_never_starts(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25, outcome=outcome)
        self.clock.advance(0.1)
        conn = Conn("udp")
        self.pending["udp"].callback(conn)
        self.assertIs(self.successResultOf(d), conn)
        self.clock.advance(1)
        self.assertNotIn("tcp", self.pending)
        self.assertEqual(outcome.winner, "udp")
        self.assertEqual([(a.protocol, a.result) for a in outcome.attempts], [("udp", "connected"), ("tcp", "not-started")])
        self.assertEqual((outcome.attempts[0].started_ms, outcome.attempts[0].ended_ms), (0, 100))

    def test_head_start_then_second_wins(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25, outcome=outcome)
        self.clock.advance(0.2)
        self.assertNotIn("tcp", self.pending)
        self.clock.advance(0.05)
        self.assertIn("tcp", self.pending)
        self.clock.advance(0.25)
        self.pending["tcp"].callback(Conn("tcp"))
        self.assertEqual(self.successResultOf(d).name, "tcp")
        self.assertEqual(self.cancelled, ["udp"])
        udp, tcp = outcome.attempts
        self.assertEqual((udp.result, udp.reason, udp.ended_ms), ("cancelled", "another attempt won", 500))
        self.assertEqual((tcp.result, tcp.started_ms, tcp.ended_ms), ("connected", 250, 500))

    def test_failure_starts_next_at_once(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25, outcome=outcome)
        self.clock.advance(0.1)
        self.pending["udp"].errback(PunchFailed("udp", "nothing came back"))
        self.assertIn("tcp", self.pending)
        self.assertEqual(outcome.attempts[1].started_ms, 100)
        self.clock.advance(10)  # the cancelled head-start timer does not start anything twice
        self.pending["tcp"].errback(PunchFailed("tcp", "refused"))
        f = self.failureResultOf(d, AllAttemptsFailed)
        self.assertEqual(
            [(a.protocol, a.result, a.reason) for a in f.value.outcome.attempts],
            [("udp", "failed", "nothing came back"), ("tcp", "failed", "refused")],
        )
        self.assertIn("udp: failed after 100 ms (nothing came back)", str(f.value))

    def test_failure_while_other_running_waits_for_it(self) -> None:
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25)
        self.clock.advance(0.3)
        self.pending["udp"].errback(PunchFailed("udp", "x"))
        self.assertNoResult(d)
        self.pending["tcp"].callback(Conn("tcp"))
        self.assertEqual(self.successResultOf(d).name, "tcp")

    def test_caller_cancels(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, outcome=outcome)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.cancelled, ["udp"])
        self.assertEqual(outcome.attempts[0].result, "cancelled")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_factory_raising(self) -> None:
        def broken():
            raise RuntimeError("no socket")

        outcome = Outcome()
        d = race([("udp", broken), ("tcp", lambda: fail(PunchFailed("tcp", "nope")))], self.clock, outcome=outcome)
        f = self.failureResultOf(d, AllAttemptsFailed)
        self.assertEqual(f.value.outcome.attempts[0].reason, "no socket")
        self.assertEqual(outcome.to_json()["attempts"][1]["result"], "failed")


class ChooseOrderTests(SynchronousTestCase):
    def test_hook(self) -> None:
        class Wire:
            def __init__(self, mapping, filtering):
                self.mapping, self.filtering, self.port_preserving = mapping, filtering, None

        self.assertEqual(choose_order(Wire(EI, APD), Wire(EI, EI), (), ()), ["udp", "tcp"])
        self.assertEqual(choose_order(Wire(EI, APD), Wire(EI, EI), ("tcp",), ()), ["tcp"])
        self.assertEqual(choose_order(Wire(EI, APD), Wire(EI, EI), ("tcp",), ("udp",)), [])


class DocTests(SynchronousTestCase):
    def test_every_reason_documented(self) -> None:
        """docs/selection.md holds each row's reason word for word."""
        import os

        path = os.path.join(os.path.dirname(__file__), "..", "docs", "selection.md")
        with open(path, encoding="utf-8") as f:
            doc = " ".join(f.read().split())
        for expected, reason in TABLE.values():
            self.assertIn(reason, doc)

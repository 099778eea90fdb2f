"""Tests for natbypass.selection: the table, the plan and the mediator's order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.nat import Mapping, NatKind, NatSummary
from natbypass.selection import (
    TABLE,
    TCP_NO_BIRTHDAY,
    NetworkFacts,
    NoCommonProtocol,
    choose_order,
    decide,
    feasibility,
    parse_wish,
)

EI, AD, APD = Mapping.ENDPOINT_INDEPENDENT, Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT
NONE, UNKNOWN = Mapping.NONE, Mapping.UNKNOWN

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


class TableTests(SynchronousTestCase):
    def test_every_pair_has_a_row(self) -> None:
        for a in NatKind:
            for b in NatKind:
                expected, reason = TABLE[frozenset((a, b))]
                self.assertTrue(reason)

    def test_lab_matrix(self) -> None:
        """The issue's claim: all pairs work except symmetric x symmetric with a random side,
        which needs port prediction (done here for predictable symmetric NATs) or a port
        mapping; PRC x random symmetric works by birthday punching."""
        failing = {
            frozenset(("symmetric-random",)),
            frozenset(("symmetric-predictable", "symmetric-random")),
        }
        for a, sa in LAB.items():
            for b, sb in LAB.items():
                row = feasibility(sa, sb, "udp")
                self.assertEqual(row.expected, frozenset((a, b)) not in failing, (a, b, row.reason))
                self.assertEqual(row.fail_fast, frozenset((a, b)) in failing, (a, b))
                self.assertEqual(row.birthday is not None, {a, b} == {"port-restricted-cone", "symmetric-random"})
                if row.expected is False:
                    self.assertIn("port prediction", row.reason)
                    self.assertIn("--port-mapping", row.reason)
                    self.assertIn("fails at once", row.reason)

    def test_birthday_roles(self) -> None:
        """The random symmetric side opens sockets, the port-restricted side probes; TCP is not birthday-punched."""
        self.assertEqual(feasibility(SYM_RANDOM, PORT_RESTRICTED, "udp").birthday, "open")
        self.assertEqual(feasibility(PORT_RESTRICTED, SYM_RANDOM, "udp").birthday, "probe")
        tcp = feasibility(PORT_RESTRICTED, SYM_RANDOM, "tcp")
        self.assertEqual((tcp.expected, tcp.birthday, tcp.fail_fast), (False, None, False))
        self.assertIn("TCP is not birthday-punched", tcp.reason)
        # Cones that need no guessing get a plain punch.
        for easy in (FULL, RESTRICTED, OPEN):
            self.assertIsNone(feasibility(easy, SYM_RANDOM, "udp").birthday)

    def test_birthday_before_filtering_is_known(self) -> None:
        """
        A fresh peer's first offer carries the mapping probe's result only
        (endpoint-independent, filtering not yet tested): against a random
        symmetric NAT it birthday-punches at once, rather than failing a plain
        punch and retrying after discovery (the lab's port-restricted x
        symmetric-random cell took 5 s that way).
        """
        fresh = NatSummary(EI, UNKNOWN)
        self.assertEqual(feasibility(fresh, SYM_RANDOM, "udp").birthday, "probe")
        self.assertEqual(feasibility(SYM_RANDOM, fresh, "udp").birthday, "open")
        self.assertIsNone(feasibility(fresh, SYM_RANDOM, "tcp").birthday)
        self.assertIsNone(feasibility(fresh, SYM_RANDOM, "udp").expected)  # still "try it and see"
        # Nothing to guess against a mapping we do not know, or against a predictable one.
        self.assertIsNone(feasibility(NatSummary(), SYM_RANDOM, "udp").birthday)
        self.assertIsNone(feasibility(fresh, SYM_PRED, "udp").birthday)

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
        # UDP would take a birthday punch: a TCP path that opens plainly is cheaper.
        self.assertEqual(plan.rows["udp"].birthday, "probe")
        self.assertIn("birthday", plan.why)

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


class ChooseOrderTests(SynchronousTestCase):
    def test_mediator_order(self) -> None:
        self.assertEqual(choose_order(PORT_RESTRICTED, FULL, (), ()), ["udp", "tcp"])
        self.assertEqual(choose_order(PORT_RESTRICTED, FULL, ("tcp",), ()), ["tcp"])
        self.assertEqual(choose_order(PORT_RESTRICTED, FULL, ("tcp",), ("udp",)), [])

    def test_tcp_mapping_counts(self) -> None:
        """A TCP mapping measured apart from UDP's decides the TCP row (the mediator used to drop it)."""
        udp_random_tcp_cone = NatSummary(APD, APD, False, tcp_mapping=EI)
        self.assertEqual(choose_order(udp_random_tcp_cone, PORT_RESTRICTED, (), ()), ["tcp", "udp"])
        self.assertEqual(choose_order(SYM_RANDOM, PORT_RESTRICTED, (), ()), ["udp", "tcp"])


class DocTests(SynchronousTestCase):
    def test_every_reason_documented(self) -> None:
        """docs/selection.md holds each row's reason word for word."""
        import os

        path = os.path.join(os.path.dirname(__file__), "..", "docs", "selection.md")
        with open(path, encoding="utf-8") as f:
            doc = " ".join(f.read().split())
        for _expected, reason in TABLE.values():
            self.assertIn(reason, doc)
        self.assertIn(TCP_NO_BIRTHDAY, doc)

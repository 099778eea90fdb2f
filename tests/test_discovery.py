"""
Tests for natbypass.stun.discovery: the pure classification, and the RFC 5780
test sequence run against an in-memory NAT and STUN server
(natbypass.testing.stun) on a Clock.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from natbypass.nat import ClassicName, Mapping, classic_name
from natbypass.stun import discovery as dv
from natbypass.stun.client import RetransmitPolicy
from natbypass.testing.stun import (
    INSIDE,
    LATENCY,
    OTHER,
    PRIMARY,
    PUBLIC_IP,
    FakeTCPBinder,
    MemoryInternet,
)

EIM = EIF = Mapping.ENDPOINT_INDEPENDENT
ADM = ADF = Mapping.ADDRESS_DEPENDENT
APDM = APDF = Mapping.ADDRESS_AND_PORT_DEPENDENT


CLASSIC = {
    (EIM, EIF): ClassicName.FULL_CONE,
    (EIM, ADF): ClassicName.RESTRICTED_CONE,
    (EIM, APDF): ClassicName.PORT_RESTRICTED_CONE,
    (ADM, EIF): ClassicName.SYMMETRIC,
    (ADM, ADF): ClassicName.SYMMETRIC,
    (ADM, APDF): ClassicName.SYMMETRIC,
    (APDM, EIF): ClassicName.SYMMETRIC,
    (APDM, ADF): ClassicName.SYMMETRIC,
    (APDM, APDF): ClassicName.SYMMETRIC,
}


class ClassificationTests(SynchronousTestCase):
    A, B, C = ("198.51.100.7", 1000), ("198.51.100.7", 1001), ("198.51.100.7", 1002)

    def test_mapping(self) -> None:
        A, B, C = self.A, self.B, self.C
        self.assertEqual(dv.classify_mapping(INSIDE, INSIDE, None, None), Mapping.NONE)
        self.assertEqual(dv.classify_mapping(INSIDE, A, A, A), EIM)
        self.assertEqual(dv.classify_mapping(INSIDE, A, B, B), ADM)
        self.assertEqual(dv.classify_mapping(INSIDE, A, B, C), APDM)
        self.assertEqual(dv.classify_mapping(INSIDE, None, None, None), Mapping.UNKNOWN)
        self.assertEqual(dv.classify_mapping(INSIDE, A, None, None), Mapping.UNKNOWN)
        self.assertEqual(dv.classify_mapping(INSIDE, A, B, None), Mapping.UNKNOWN)
        self.assertEqual(dv.classify_mapping(INSIDE, A, None, A), EIM)
        self.assertEqual(dv.classify_mapping(INSIDE, A, None, B), Mapping.UNKNOWN)
        self.assertEqual(dv.classify_mapping(None, INSIDE, INSIDE, INSIDE), EIM)

    def test_filtering(self) -> None:
        self.assertEqual(dv.classify_filtering(True, True), EIF)
        self.assertEqual(dv.classify_filtering(True, None), EIF)
        self.assertEqual(dv.classify_filtering(False, True), ADF)
        self.assertEqual(dv.classify_filtering(False, False), APDF)
        self.assertEqual(dv.classify_filtering(None, False), APDF)
        self.assertEqual(dv.classify_filtering(None, True), Mapping.UNKNOWN)
        self.assertEqual(dv.classify_filtering(None, None), Mapping.UNKNOWN)
        self.assertEqual(dv.classify_filtering(False, None), Mapping.UNKNOWN)

    def test_classic_names(self) -> None:
        for (mapping, filtering), name in CLASSIC.items():
            self.assertEqual(classic_name(True, mapping, filtering), name)
        self.assertEqual(classic_name(True, Mapping.NONE, Mapping.NONE), ClassicName.OPEN)
        self.assertEqual(classic_name(True, Mapping.NONE, ADF), ClassicName.SYMMETRIC_FIREWALL)
        self.assertEqual(classic_name(True, Mapping.NONE, APDF), ClassicName.SYMMETRIC_FIREWALL)
        self.assertEqual(classic_name(False, Mapping.UNKNOWN, Mapping.UNKNOWN), ClassicName.UDP_BLOCKED)
        self.assertEqual(classic_name(True, EIM, Mapping.UNKNOWN), Mapping.UNKNOWN)
        self.assertEqual(classic_name(True, Mapping.UNKNOWN, EIF), Mapping.UNKNOWN)
        self.assertEqual(classic_name(True, Mapping.NONE, Mapping.UNKNOWN), Mapping.UNKNOWN)

    def test_other_address_must_differ_in_ip_and_port(self) -> None:
        self.assertEqual(dv.usable_other_address(PRIMARY, OTHER), (OTHER, None))
        for bad in (None, (PRIMARY[0], 3479), ("192.0.2.2", PRIMARY[1])):
            other, why = dv.usable_other_address(PRIMARY, bad)
            self.assertIsNone(other)
            self.assertTrue(why)


class UDPDiscoveryTests(SynchronousTestCase):
    def test_every_nat(self) -> None:
        for (mapping, filtering), name in CLASSIC.items():
            net = MemoryInternet(mapping, filtering)
            b = net.discover()
            self.assertEqual((b.mapping, b.filtering, b.nat_type), (mapping, filtering, name), (mapping, filtering))
            self.assertTrue(b.reachable)
            self.assertEqual(b.public_address, net.mappings[next(iter(net.mappings))])
            self.assertEqual(b.local_address, INSIDE)
            self.assertEqual(b.other_address, OTHER)
            self.assertIs(b.port_preserving, False)
            self.assertEqual(b.notes, ())

    @given(
        st.sampled_from([EIM, ADM, APDM]),
        st.sampled_from([EIF, ADF, APDF]),
        st.booleans(),
        st.booleans(),
    )
    @settings(max_examples=40, deadline=None)
    def test_finds_what_the_nat_does(self, mapping, filtering, translate, preserving) -> None:
        net = MemoryInternet(mapping, filtering, translate=translate, port_preserving=preserving)
        b = net.discover()
        if translate:
            self.assertEqual((b.mapping, b.filtering), (mapping, filtering))
            self.assertEqual(b.port_preserving, preserving)
        else:
            self.assertEqual(b.mapping, Mapping.NONE)
            self.assertEqual(b.filtering, Mapping.NONE if filtering == EIF else filtering)
            self.assertTrue(b.port_preserving)
        self.assertEqual(b.nat_type, classic_name(True, b.mapping, b.filtering))

    def test_open(self) -> None:
        b = MemoryInternet(filtering=EIF, translate=False).discover()
        self.assertEqual((b.mapping, b.filtering, b.nat_type), (Mapping.NONE, Mapping.NONE, ClassicName.OPEN))
        self.assertEqual(b.public_address, INSIDE)

    def test_symmetric_firewall(self) -> None:
        for filtering in (ADF, APDF):
            b = MemoryInternet(filtering=filtering, translate=False).discover()
            self.assertEqual(
                (b.mapping, b.filtering, b.nat_type), (Mapping.NONE, filtering, ClassicName.SYMMETRIC_FIREWALL)
            )

    def test_udp_blocked(self) -> None:
        net = MemoryInternet(blocked=True)
        b = net.discover(policy=RetransmitPolicy.within(3.0, rto=0.25))
        self.assertEqual(
            (b.nat_type, b.mapping, b.filtering), (ClassicName.UDP_BLOCKED, Mapping.UNKNOWN, Mapping.UNKNOWN)
        )
        self.assertFalse(b.reachable)
        self.assertIsNone(b.public_address)
        self.assertAlmostEqual(b.elapsed_ms, 3000, delta=1e-6)
        self.assertIn("unreachable", b.notes[0])
        # Retransmitted with doubling intervals: 0, .25, .75, 1.75 s.
        self.assertEqual([round(t, 3) for t, _ in net.outbound], [0, 0.25, 0.75, 1.75])

    def test_filtering_tests_precede_any_packet_to_the_alternate_address(self) -> None:
        """RFC 5780: sending to OTHER first would open an address-dependent filter."""
        net = MemoryInternet(EIM, ADF)
        b = net.discover()
        self.assertEqual(b.filtering, ADF)
        change_tests_end = max(t.elapsed_ms for t in b.tests if t.name.startswith("filtering")) / 1000
        to_other = [t for t, dst in net.outbound if dst[0] == OTHER[0]]
        self.assertTrue(to_other)
        self.assertGreaterEqual(min(to_other), change_tests_end)

    def test_worst_case_time_is_one_filtering_timeout(self) -> None:
        net = MemoryInternet(APDM, APDF)
        filtering_policy = RetransmitPolicy.within(1.5, rto=0.25)
        b = net.discover(filtering_policy=filtering_policy)
        self.assertEqual(b.nat_type, ClassicName.SYMMETRIC)
        # Test I, then both filtering tests at once, then both mapping tests at once.
        rtt = 2 * LATENCY
        self.assertGreaterEqual(b.elapsed_ms, 1500)
        self.assertLessEqual(b.elapsed_ms, 1500 + 3 * rtt * 1000 + 20)

    def test_single_address_server_behind_nat(self) -> None:
        net = MemoryInternet(EIM, EIF, server_mode="single", port_preserving=True)
        b = net.discover()
        self.assertEqual((b.mapping, b.filtering, b.nat_type), (Mapping.UNKNOWN, Mapping.UNKNOWN, Mapping.UNKNOWN))
        self.assertEqual(b.public_address, (PUBLIC_IP, INSIDE[1]))
        self.assertIs(b.port_preserving, True)
        self.assertIn("OTHER-ADDRESS", b.notes[0])
        self.assertEqual([t.name for t in b.tests], ["binding"])

    def test_single_address_server_no_nat(self) -> None:
        b = MemoryInternet(translate=False, server_mode="single").discover()
        self.assertEqual((b.mapping, b.filtering, b.nat_type), (Mapping.NONE, Mapping.UNKNOWN, Mapping.UNKNOWN))

    def test_server_ignoring_change_request(self) -> None:
        b = MemoryInternet(EIM, EIF, server_mode="ignore-change").discover()
        self.assertEqual(b.filtering, Mapping.UNKNOWN)
        self.assertEqual(b.mapping, EIM)  # the mapping tests still work
        self.assertTrue(any("not from a changed" in n for n in b.notes))

    def test_server_refusing_change_request(self) -> None:
        b = MemoryInternet(EIM, EIF, server_mode="refuse-change").discover()
        self.assertEqual(b.filtering, Mapping.UNKNOWN)
        self.assertTrue(any("420" in n for n in b.notes))

    def test_cancel_stops_everything(self) -> None:
        net = MemoryInternet(EIM, APDF)
        d = dv.discover(net.client, PRIMARY, INSIDE, net.clock)
        net.clock.pump([0.05] * 10)  # in the middle of the filtering tests
        self.assertEqual(net.client.pending, 2)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(net.client.pending, 0)
        net.clock.advance(0.1)  # answers in flight arrive: consumed as late, nothing fires
        self.assertEqual([c for c in net.clock.getDelayedCalls()], [])

    def test_logs_the_outcome(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        MemoryInternet(EIM, ADF).discover()
        outcome = [e for e in observer if "nat_type" in e]
        self.assertEqual(len(outcome), 1)
        self.assertEqual(
            (outcome[0]["nat_type"], outcome[0]["mapping"], outcome[0]["filtering"]),
            (ClassicName.RESTRICTED_CONE, EIM, ADF),
        )
        tests = [e["test"] for e in observer if "test" in e]
        self.assertEqual(tests[0], "binding")

    def test_json_shape(self) -> None:
        b = MemoryInternet(EIM, APDF, port_preserving=True).discover()
        out = b.to_json()
        for key in (
            "nat_type",
            "mapping",
            "filtering",
            "public_address",
            "local_address",
            "port_preserving",
            "elapsed_ms",
        ):
            self.assertIn(key, out)
        self.assertEqual(out["public_address"], f"{PUBLIC_IP}:{INSIDE[1]}")
        self.assertEqual(out["local_address"], "10.0.0.2:40000")
        self.assertNotIn("tcp_mapping", out)
        self.assertEqual([t["name"] for t in out["tests"]][0], "binding")


class MappingProbeTests(SynchronousTestCase):
    """probe_mapping: the mapping and port step in two round trips, with no filtering timeout to wait out."""

    def probe(self, net: MemoryInternet) -> dv.MappingProbe:
        return net.run(dv.probe_mapping(net.client, PRIMARY, INSIDE, net.clock))

    @given(st.sampled_from([EIM, ADM, APDM]), st.sampled_from([EIF, ADF, APDF]), st.booleans())
    @settings(max_examples=30, deadline=None)
    def test_finds_the_mapping_discovery_finds(self, mapping, filtering, preserving) -> None:
        probed = self.probe(MemoryInternet(mapping, filtering, port_preserving=preserving))
        discovered = MemoryInternet(mapping, filtering, port_preserving=preserving).discover()
        self.assertEqual(probed.mapping, discovered.mapping)
        self.assertEqual(probed.port_delta, discovered.summary().port_delta)
        if mapping != EIM:  # a symmetric NAT's row does not depend on the filtering, still unknown here
            self.assertEqual(probed.summary().kind(), discovered.summary().kind())

    def test_symmetric_port_step_in_two_round_trips(self) -> None:
        net = MemoryInternet(APDM, APDF)
        probed = self.probe(net)
        self.assertEqual((probed.mapping, probed.port_delta), (APDM, 1))
        self.assertEqual(probed.summary().kind(), "symmetric-predictable")
        self.assertAlmostEqual(net.clock.seconds(), 2 * 2 * LATENCY)
        # Tests II and III go back to back, after test I's answer.
        self.assertEqual([round(t, 3) for t, _ in net.outbound], [0, 2 * LATENCY, 2 * LATENCY])

    def test_port_step_of_the_back_to_back_tests_when_another_flow_came_between(self) -> None:
        """A flow of another socket between test I and the others: the step of II and III still tells."""
        net = MemoryInternet(APDM, APDF)
        d = dv.probe_mapping(net.client, PRIMARY, INSIDE, net.clock)
        net.nat.outbound(("10.0.0.2", 50000), PRIMARY)  # another program's flow takes the next port
        self.assertEqual(net.run(d).port_delta, 1)

    def test_no_nat_in_one_round_trip(self) -> None:
        net = MemoryInternet(translate=False)
        probed = self.probe(net)
        self.assertEqual((probed.mapping, probed.port_delta), (Mapping.NONE, None))
        self.assertEqual(len(net.outbound), 1)

    def test_single_address_server(self) -> None:
        probed = self.probe(MemoryInternet(APDM, APDF, server_mode="single"))
        self.assertEqual((probed.mapping, probed.port_delta), (Mapping.UNKNOWN, None))

    def test_unreachable(self) -> None:
        net = MemoryInternet(blocked=True)
        probed = net.run(
            dv.probe_mapping(net.client, PRIMARY, INSIDE, net.clock, policy=RetransmitPolicy.within(1.0, rto=0.25))
        )
        self.assertEqual((probed.mapping, probed.port_delta), (Mapping.UNKNOWN, None))
        self.assertEqual(net.clock.seconds(), 1.0)


class TCPDiscoveryTests(SynchronousTestCase):
    def tcp(self, binder, **kw) -> dv.TCPBehavior:
        return self.successResultOf(dv.discover_tcp(binder, PRIMARY, Clock(), **kw))

    def test_mappings(self) -> None:
        for mapping in (EIM, ADM, APDM):
            binder = FakeTCPBinder(mapping)
            t = self.tcp(binder)
            self.assertEqual(t.mapping, mapping)
            self.assertEqual(t.local_address, ("10.0.0.2", 45000))
            # Every connection after the first leaves from the first one's port.
            self.assertEqual([local for _, local in binder.calls[1:]], [("10.0.0.2", 45000)] * 2)
            self.assertEqual(
                [remote for remote, _ in binder.calls],
                [PRIMARY, (OTHER[0], PRIMARY[1]), OTHER],
            )

    def test_no_nat(self) -> None:
        binder = FakeTCPBinder(None)
        t = self.tcp(binder)
        self.assertEqual(t.mapping, Mapping.NONE)
        self.assertEqual(len(binder.calls), 1)

    def test_unreachable(self) -> None:
        t = self.tcp(FakeTCPBinder(EIM, refused={PRIMARY}))
        self.assertEqual(t.mapping, Mapping.UNKNOWN)
        self.assertIn("no answer", t.notes[0])

    def test_alternate_refused(self) -> None:
        t = self.tcp(FakeTCPBinder(ADM, refused={OTHER}))
        self.assertEqual(t.mapping, Mapping.UNKNOWN)
        self.assertTrue(any("tcp-mapping-alternate-ip-port" in n for n in t.notes))

    def test_single_address(self) -> None:
        t = self.tcp(FakeTCPBinder(EIM, other=None))
        self.assertEqual(t.mapping, Mapping.UNKNOWN)
        self.assertIn("OTHER-ADDRESS", t.notes[0])

    def test_discover_runs_both(self) -> None:
        net = MemoryInternet(EIM, APDF)
        b = net.discover(tcp_binder=FakeTCPBinder(APDM))
        self.assertEqual((b.mapping, b.filtering, b.tcp_mapping), (EIM, APDF, APDM))
        self.assertTrue(b.tcp_reachable)
        out = b.to_json()
        self.assertEqual(out["tcp_mapping"], APDM)
        self.assertEqual(out["tcp_local_address"], "10.0.0.2:45000")

    def test_tcp_when_udp_is_blocked(self) -> None:
        net = MemoryInternet(blocked=True)
        b = net.discover(tcp_binder=FakeTCPBinder(EIM))
        self.assertEqual(b.nat_type, ClassicName.UDP_BLOCKED)
        self.assertFalse(b.reachable)
        self.assertTrue(b.tcp_reachable)
        self.assertEqual(b.tcp_mapping, EIM)

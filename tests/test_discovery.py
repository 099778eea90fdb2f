"""
Tests for natbypass.stun.discovery: the pure classification, and the RFC 5780
test sequence run against an in-memory NAT and STUN server on a Clock.

L{FakeInternet} is reused by tests/test_detect.py.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from natbypass.stun import discovery as dv
from natbypass.stun import message as m
from natbypass.stun.client import RetransmitPolicy, StunClient, TCPBinding, binding_request

PRIMARY = ("192.0.2.1", 3478)
OTHER = ("192.0.2.2", 3479)
INSIDE = ("10.0.0.2", 40000)
PUBLIC_IP = "198.51.100.7"
LATENCY = 0.01

EIM = EIF = dv.ENDPOINT_INDEPENDENT
ADM = ADF = dv.ADDRESS_DEPENDENT
APDM = APDF = dv.ADDRESS_AND_PORT_DEPENDENT


class FakeServer:
    """
    An RFC 5780 server on PRIMARY and OTHER (and the two mixed addresses).
    C{mode}: "rfc5780", "single" (no OTHER-ADDRESS, ignores CHANGE-REQUEST),
    "ignore-change" (advertises OTHER-ADDRESS, answers from where it was
    asked), "refuse-change" (420 to CHANGE-REQUEST).
    """

    def __init__(self, net: "FakeInternet", mode: str = "rfc5780") -> None:
        self.net = net
        self.mode = mode
        self.received: list[tuple[float, tuple, tuple]] = []

    def receive(self, data: bytes, src, dst) -> None:
        self.received.append((self.net.clock.seconds(), src, dst))
        req = m.decode(data)
        change = req.get(m.ChangeRequest)
        if change is not None and self.mode == "refuse-change":
            reply = req.reply(m.MessageClass.ERROR, [m.ErrorCode(420, "Unknown Attribute")])
            self.net.to_client(reply.encode(), dst, src)
            return
        origin = dst
        if change is not None and self.mode == "rfc5780":
            ips = {PRIMARY[0]: OTHER[0], OTHER[0]: PRIMARY[0]}
            ports = {PRIMARY[1]: OTHER[1], OTHER[1]: PRIMARY[1]}
            origin = (
                ips[dst[0]] if change.change_ip else dst[0],
                ports[dst[1]] if change.change_port else dst[1],
            )
        attrs: list[m.Attribute] = [m.XorMappedAddress(*src), m.ResponseOrigin(*origin)]
        if self.mode != "single":
            attrs.append(m.OtherAddress(*OTHER))
        self.net.to_client(req.reply(m.MessageClass.SUCCESS, attrs).encode(), origin, src)


class FakeInternet:
    """
    One client behind one NAT (or none: C{translate=False}, a firewall that
    only filters), one server.  Mapping and filtering follow RFC 4787.
    """

    def __init__(
        self,
        mapping: str = EIM,
        filtering: str = EIF,
        *,
        translate: bool = True,
        port_preserving: bool = False,
        blocked: bool = False,
        server_mode: str = "rfc5780",
    ) -> None:
        self.clock = Clock()
        self.mapping = mapping
        self.filtering = filtering
        self.translate = translate
        self.port_preserving = port_preserving
        self.blocked = blocked
        self.server = FakeServer(self, server_mode)
        self.client = StunClient(self.from_client, self.clock)
        self.mappings: dict[tuple, tuple[str, int]] = {}
        self.permissions: set[tuple] = set()
        self._ports = itertools.count(61000)
        self.outbound: list[tuple[float, tuple]] = []

    def public_for(self, dst) -> tuple[str, int]:
        if not self.translate:
            return INSIDE
        key = {EIM: (), ADM: (dst[0],), APDM: tuple(dst)}[self.mapping]
        if key not in self.mappings:
            preserve = self.port_preserving and not self.mappings
            self.mappings[key] = (PUBLIC_IP, INSIDE[1] if preserve else next(self._ports))
        return self.mappings[key]

    def from_client(self, data: bytes, dst) -> None:
        self.outbound.append((self.clock.seconds(), dst))
        if self.blocked:
            return
        public = self.public_for(dst)
        self.permissions |= {(public, "any"), (public, dst[0]), (public, tuple(dst))}
        self.clock.callLater(LATENCY, self.server.receive, data, public, tuple(dst))

    def to_client(self, data: bytes, src, dst) -> None:
        if self.blocked:
            return
        key = {EIF: "any", ADF: src[0], APDF: tuple(src), dv.NONE: "any"}[self.filtering]
        if (tuple(dst), key) in self.permissions:
            self.clock.callLater(LATENCY, self.client.handle, data, tuple(src))

    def run(self, d: defer.Deferred, limit: float = 120.0):
        """Advance the clock until C{d} fires; return its result."""
        result: list = []
        d.addBoth(result.append)
        while not result and self.clock.seconds() < limit:
            calls = self.clock.getDelayedCalls()
            assert calls, "nothing scheduled and nothing fired"
            # Jump to the next event: exact times, no drift.
            self.clock.advance(max(0, min(c.getTime() for c in calls) - self.clock.seconds()))
        assert result, "discovery did not finish"
        if isinstance(result[0], Exception) or hasattr(result[0], "raiseException"):
            result[0].raiseException()
        return result[0]

    def discover(self, **kw) -> dv.NATBehavior:
        return self.run(dv.discover(self.client, PRIMARY, INSIDE, self.clock, **kw))


CLASSIC = {
    (EIM, EIF): dv.FULL_CONE,
    (EIM, ADF): dv.RESTRICTED_CONE,
    (EIM, APDF): dv.PORT_RESTRICTED_CONE,
    (ADM, EIF): dv.SYMMETRIC,
    (ADM, ADF): dv.SYMMETRIC,
    (ADM, APDF): dv.SYMMETRIC,
    (APDM, EIF): dv.SYMMETRIC,
    (APDM, ADF): dv.SYMMETRIC,
    (APDM, APDF): dv.SYMMETRIC,
}


class ClassificationTests(SynchronousTestCase):
    A, B, C = ("198.51.100.7", 1000), ("198.51.100.7", 1001), ("198.51.100.7", 1002)

    def test_mapping(self) -> None:
        A, B, C = self.A, self.B, self.C
        self.assertEqual(dv.classify_mapping(INSIDE, INSIDE, None, None), dv.NONE)
        self.assertEqual(dv.classify_mapping(INSIDE, A, A, A), EIM)
        self.assertEqual(dv.classify_mapping(INSIDE, A, B, B), ADM)
        self.assertEqual(dv.classify_mapping(INSIDE, A, B, C), APDM)
        self.assertEqual(dv.classify_mapping(INSIDE, None, None, None), dv.UNKNOWN)
        self.assertEqual(dv.classify_mapping(INSIDE, A, None, None), dv.UNKNOWN)
        self.assertEqual(dv.classify_mapping(INSIDE, A, B, None), dv.UNKNOWN)
        self.assertEqual(dv.classify_mapping(INSIDE, A, None, A), EIM)
        self.assertEqual(dv.classify_mapping(INSIDE, A, None, B), dv.UNKNOWN)
        self.assertEqual(dv.classify_mapping(None, INSIDE, INSIDE, INSIDE), EIM)

    def test_filtering(self) -> None:
        self.assertEqual(dv.classify_filtering(True, True), EIF)
        self.assertEqual(dv.classify_filtering(True, None), EIF)
        self.assertEqual(dv.classify_filtering(False, True), ADF)
        self.assertEqual(dv.classify_filtering(False, False), APDF)
        self.assertEqual(dv.classify_filtering(None, False), APDF)
        self.assertEqual(dv.classify_filtering(None, True), dv.UNKNOWN)
        self.assertEqual(dv.classify_filtering(None, None), dv.UNKNOWN)
        self.assertEqual(dv.classify_filtering(False, None), dv.UNKNOWN)

    def test_classic_names(self) -> None:
        for (mapping, filtering), name in CLASSIC.items():
            self.assertEqual(dv.classic_name(True, mapping, filtering), name)
        self.assertEqual(dv.classic_name(True, dv.NONE, dv.NONE), dv.OPEN)
        self.assertEqual(dv.classic_name(True, dv.NONE, ADF), dv.SYMMETRIC_FIREWALL)
        self.assertEqual(dv.classic_name(True, dv.NONE, APDF), dv.SYMMETRIC_FIREWALL)
        self.assertEqual(dv.classic_name(False, dv.UNKNOWN, dv.UNKNOWN), dv.UDP_BLOCKED)
        self.assertEqual(dv.classic_name(True, EIM, dv.UNKNOWN), dv.UNKNOWN)
        self.assertEqual(dv.classic_name(True, dv.UNKNOWN, EIF), dv.UNKNOWN)
        self.assertEqual(dv.classic_name(True, dv.NONE, dv.UNKNOWN), dv.UNKNOWN)

    def test_other_address_must_differ_in_ip_and_port(self) -> None:
        self.assertEqual(dv.usable_other_address(PRIMARY, OTHER), (OTHER, None))
        for bad in (None, (PRIMARY[0], 3479), ("192.0.2.2", PRIMARY[1])):
            other, why = dv.usable_other_address(PRIMARY, bad)
            self.assertIsNone(other)
            self.assertTrue(why)


class UDPDiscoveryTests(SynchronousTestCase):
    def test_every_nat(self) -> None:
        for (mapping, filtering), name in CLASSIC.items():
            net = FakeInternet(mapping, filtering)
            b = net.discover()
            self.assertEqual(
                (b.mapping, b.filtering, b.nat_type), (mapping, filtering, name), (mapping, filtering)
            )
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
        net = FakeInternet(mapping, filtering, translate=translate, port_preserving=preserving)
        b = net.discover()
        if translate:
            self.assertEqual((b.mapping, b.filtering), (mapping, filtering))
            self.assertEqual(b.port_preserving, preserving)
        else:
            self.assertEqual(b.mapping, dv.NONE)
            self.assertEqual(b.filtering, dv.NONE if filtering == EIF else filtering)
            self.assertTrue(b.port_preserving)
        self.assertEqual(b.nat_type, dv.classic_name(True, b.mapping, b.filtering))

    def test_open(self) -> None:
        b = FakeInternet(filtering=EIF, translate=False).discover()
        self.assertEqual((b.mapping, b.filtering, b.nat_type), (dv.NONE, dv.NONE, dv.OPEN))
        self.assertEqual(b.public_address, INSIDE)

    def test_symmetric_firewall(self) -> None:
        for filtering in (ADF, APDF):
            b = FakeInternet(filtering=filtering, translate=False).discover()
            self.assertEqual(
                (b.mapping, b.filtering, b.nat_type), (dv.NONE, filtering, dv.SYMMETRIC_FIREWALL)
            )

    def test_udp_blocked(self) -> None:
        net = FakeInternet(blocked=True)
        b = net.discover(policy=RetransmitPolicy.within(3.0, rto=0.25))
        self.assertEqual((b.nat_type, b.mapping, b.filtering), (dv.UDP_BLOCKED, dv.UNKNOWN, dv.UNKNOWN))
        self.assertFalse(b.reachable)
        self.assertIsNone(b.public_address)
        self.assertAlmostEqual(b.elapsed_ms, 3000, delta=1e-6)
        self.assertIn("unreachable", b.notes[0])
        # Retransmitted with doubling intervals: 0, .25, .75, 1.75 s.
        self.assertEqual([round(t, 3) for t, _ in net.outbound], [0, 0.25, 0.75, 1.75])

    def test_filtering_tests_precede_any_packet_to_the_alternate_address(self) -> None:
        """RFC 5780: sending to OTHER first would open an address-dependent filter."""
        net = FakeInternet(EIM, ADF)
        b = net.discover()
        self.assertEqual(b.filtering, ADF)
        change_tests_end = max(
            t.elapsed_ms for t in b.tests if t.name.startswith("filtering")
        ) / 1000
        to_other = [t for t, dst in net.outbound if dst[0] == OTHER[0]]
        self.assertTrue(to_other)
        self.assertGreaterEqual(min(to_other), change_tests_end)

    def test_worst_case_time_is_one_filtering_timeout(self) -> None:
        net = FakeInternet(APDM, APDF)
        filtering_policy = RetransmitPolicy.within(1.5, rto=0.25)
        b = net.discover(filtering_policy=filtering_policy)
        self.assertEqual(b.nat_type, dv.SYMMETRIC)
        # Test I, then both filtering tests at once, then both mapping tests at once.
        rtt = 2 * LATENCY
        self.assertGreaterEqual(b.elapsed_ms, 1500)
        self.assertLessEqual(b.elapsed_ms, 1500 + 3 * rtt * 1000 + 20)

    def test_single_address_server_behind_nat(self) -> None:
        net = FakeInternet(EIM, EIF, server_mode="single", port_preserving=True)
        b = net.discover()
        self.assertEqual((b.mapping, b.filtering, b.nat_type), (dv.UNKNOWN, dv.UNKNOWN, dv.UNKNOWN))
        self.assertEqual(b.public_address, (PUBLIC_IP, INSIDE[1]))
        self.assertIs(b.port_preserving, True)
        self.assertIn("OTHER-ADDRESS", b.notes[0])
        self.assertEqual([t.name for t in b.tests], ["binding"])

    def test_single_address_server_no_nat(self) -> None:
        b = FakeInternet(translate=False, server_mode="single").discover()
        self.assertEqual((b.mapping, b.filtering, b.nat_type), (dv.NONE, dv.UNKNOWN, dv.UNKNOWN))

    def test_server_ignoring_change_request(self) -> None:
        b = FakeInternet(EIM, EIF, server_mode="ignore-change").discover()
        self.assertEqual(b.filtering, dv.UNKNOWN)
        self.assertEqual(b.mapping, EIM)  # the mapping tests still work
        self.assertTrue(any("not from a changed" in n for n in b.notes))

    def test_server_refusing_change_request(self) -> None:
        b = FakeInternet(EIM, EIF, server_mode="refuse-change").discover()
        self.assertEqual(b.filtering, dv.UNKNOWN)
        self.assertTrue(any("420" in n for n in b.notes))

    def test_cancel_stops_everything(self) -> None:
        net = FakeInternet(EIM, APDF)
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
        FakeInternet(EIM, ADF).discover()
        outcome = [e for e in observer if "nat_type" in e]
        self.assertEqual(len(outcome), 1)
        self.assertEqual(
            (outcome[0]["nat_type"], outcome[0]["mapping"], outcome[0]["filtering"]),
            (dv.RESTRICTED_CONE, EIM, ADF),
        )
        tests = [e["test"] for e in observer if "test" in e]
        self.assertEqual(tests[0], "binding")

    def test_json_shape(self) -> None:
        b = FakeInternet(EIM, APDF, port_preserving=True).discover()
        out = b.to_json()
        for key in ("nat_type", "mapping", "filtering", "public_address", "local_address",
                    "port_preserving", "elapsed_ms"):
            self.assertIn(key, out)
        self.assertEqual(out["public_address"], f"{PUBLIC_IP}:{INSIDE[1]}")
        self.assertEqual(out["local_address"], "10.0.0.2:40000")
        self.assertNotIn("tcp_mapping", out)
        self.assertEqual([t["name"] for t in out["tests"]][0], "binding")


class FakeTCP:
    """connect-and-bind for the TCP tests, through a NAT with C{mapping}."""

    def __init__(self, mapping: str | None, refused=(), other=OTHER) -> None:
        self.mapping = mapping
        self.refused = set(refused)
        self.other = other
        self.calls: list[tuple[tuple, tuple | None]] = []
        self.mappings: dict[tuple, tuple] = {}
        self._ports = itertools.count(62000)

    def __call__(self, remote, local):
        self.calls.append((remote, local))
        if remote in self.refused:
            return defer.fail(ConnectionRefusedError())
        bound = ("10.0.0.2", 45000) if local is None or local[1] == 0 else local
        if self.mapping is None:
            mapped = bound
        else:
            key = {EIM: (), ADM: (remote[0],), APDM: remote}[self.mapping]
            mapped = self.mappings.setdefault(key, (PUBLIC_IP, next(self._ports)))
        response = binding_request().reply(m.MessageClass.SUCCESS, [])
        return defer.succeed(TCPBinding(bound, mapped, self.other, remote, response))


class TCPDiscoveryTests(SynchronousTestCase):
    def tcp(self, binder, **kw) -> dv.TCPBehavior:
        return self.successResultOf(dv.discover_tcp(binder, PRIMARY, Clock(), **kw))

    def test_mappings(self) -> None:
        for mapping in (EIM, ADM, APDM):
            binder = FakeTCP(mapping)
            t = self.tcp(binder)
            self.assertEqual(t.mapping, mapping)
            self.assertEqual(t.local_address, ("10.0.0.2", 45000))
            # Every connection after the first leaves from the first one's port.
            self.assertEqual(
                [local for _, local in binder.calls[1:]], [("10.0.0.2", 45000)] * 2
            )
            self.assertEqual(
                [remote for remote, _ in binder.calls],
                [PRIMARY, (OTHER[0], PRIMARY[1]), OTHER],
            )

    def test_no_nat(self) -> None:
        binder = FakeTCP(None)
        t = self.tcp(binder)
        self.assertEqual(t.mapping, dv.NONE)
        self.assertEqual(len(binder.calls), 1)

    def test_unreachable(self) -> None:
        t = self.tcp(FakeTCP(EIM, refused={PRIMARY}))
        self.assertEqual(t.mapping, dv.UNKNOWN)
        self.assertIn("no answer", t.notes[0])

    def test_alternate_refused(self) -> None:
        t = self.tcp(FakeTCP(ADM, refused={OTHER}))
        self.assertEqual(t.mapping, dv.UNKNOWN)
        self.assertTrue(any("tcp-mapping-alternate-ip-port" in n for n in t.notes))

    def test_single_address(self) -> None:
        t = self.tcp(FakeTCP(EIM, other=None))
        self.assertEqual(t.mapping, dv.UNKNOWN)
        self.assertIn("OTHER-ADDRESS", t.notes[0])

    def test_discover_runs_both(self) -> None:
        net = FakeInternet(EIM, APDF)
        b = net.discover(tcp_binder=FakeTCP(APDM))
        self.assertEqual((b.mapping, b.filtering, b.tcp_mapping), (EIM, APDF, APDM))
        self.assertTrue(b.tcp_reachable)
        out = b.to_json()
        self.assertEqual(out["tcp_mapping"], APDM)
        self.assertEqual(out["tcp_local_address"], "10.0.0.2:45000")

    def test_tcp_when_udp_is_blocked(self) -> None:
        net = FakeInternet(blocked=True)
        b = net.discover(tcp_binder=FakeTCP(EIM))
        self.assertEqual(b.nat_type, dv.UDP_BLOCKED)
        self.assertFalse(b.reachable)
        self.assertTrue(b.tcp_reachable)
        self.assertEqual(b.tcp_mapping, EIM)

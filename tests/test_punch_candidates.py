"""Tests for natbypass.punch.candidates."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch.candidates import (
    CandidateError,
    InterfaceAddress,
    PortRange,
    host_addresses,
    interface_flags,
    predicted_ports,
    read_interface_addresses,
    remote_addresses,
    usable_addresses,
)

# The interfaces of a lab host: loopback, one that is up, one that is down.
LAB_HOST = [
    InterfaceAddress("lo", "127.0.0.1", True, True),
    InterfaceAddress("lo", "::1", True, True),
    InterfaceAddress("eth0", "10.1.0.2", True, False),
    InterfaceAddress("eth0", "169.254.3.3", True, False),
    InterfaceAddress("eth0", "fe80::1", True, False),
    InterfaceAddress("eth0", "2001:db8::2", True, False),
    InterfaceAddress("eth1", "10.9.0.2", False, False),
]

interface_addresses = st.lists(
    st.builds(
        InterfaceAddress,
        st.text(max_size=6),
        st.ip_addresses().map(str) | st.text(max_size=12),
        st.none() | st.booleans(),
        st.none() | st.booleans(),
    ),
    max_size=8,
)


def adapter(name: str, *ips: object) -> SimpleNamespace:
    """What ifaddr.get_adapters gives: IPv4 as str, IPv6 as (address, flowinfo, scope_id)."""
    return SimpleNamespace(name=name, ips=[SimpleNamespace(ip=ip) for ip in ips])


class PortRangeTests(SynchronousTestCase):
    def test_parse(self) -> None:
        r = PortRange.parse("40000-40002")
        self.assertEqual((list(r), len(r), str(r)), ([40000, 40001, 40002], 3, "40000-40002"))
        self.assertEqual(list(PortRange.parse("5000")), [5000])

    def test_bad(self) -> None:
        for text in ("", "a-b", "5-4", "0-10", "1-70000", "1-2-3", "-5", "1 - x", "²", "1-²", "123456"):
            self.assertRaises(CandidateError, PortRange.parse, text)

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.text(max_size=20))
    def test_arbitrary_text(self, text: str) -> None:
        try:
            r = PortRange.parse(text)
        except CandidateError:
            return
        self.assertTrue(1 <= r.low <= r.high <= 65535)

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.integers(1, 65535), st.integers(0, 100))
    def test_round_trip(self, low: int, width: int) -> None:
        r = PortRange(low, min(low + width, 65535))
        self.assertEqual(PortRange.parse(str(r)), r)


class HostAddressTests(SynchronousTestCase):
    def test_filter(self) -> None:
        """Up interfaces only; no link-local; loopback only when asked."""
        self.assertEqual(usable_addresses(LAB_HOST), ["10.1.0.2"])
        self.assertEqual(usable_addresses(LAB_HOST, include_loopback=True), ["127.0.0.1", "10.1.0.2"])
        self.assertEqual(usable_addresses(LAB_HOST, families=("inet", "inet6")), ["10.1.0.2", "2001:db8::2"])
        self.assertEqual(usable_addresses(LAB_HOST, families=("inet6",)), ["2001:db8::2"])

    def test_unknown_flags(self) -> None:
        """Without interface flags (not Linux): counted as up, loopback known by its addresses."""
        unknown = [InterfaceAddress(a.interface, a.address) for a in LAB_HOST]
        self.assertEqual(usable_addresses(unknown), ["10.1.0.2", "10.9.0.2"])
        self.assertEqual(usable_addresses(unknown, include_loopback=True), ["127.0.0.1", "10.1.0.2", "10.9.0.2"])

    def test_loopback_interface_skipped_whole(self) -> None:
        """An address on the loopback interface (an anycast /32, say) goes with it, as before."""
        lo = [InterfaceAddress("lo", "192.0.2.53", True, True)]
        self.assertEqual(usable_addresses(lo), [])
        self.assertEqual(usable_addresses(lo, include_loopback=True), ["192.0.2.53"])

    def test_zone_and_duplicates(self) -> None:
        same = [
            InterfaceAddress("a", "10.0.0.1", True, False),
            InterfaceAddress("a:1", "10.0.0.1", True, False),
            InterfaceAddress("b", "fe80::2%b", True, False),
        ]
        self.assertEqual(usable_addresses(same, families=("inet", "inet6")), ["10.0.0.1"])

    def test_not_an_address(self) -> None:
        self.assertRaises(CandidateError, usable_addresses, [InterfaceAddress("x", "nonsense", True, False)])

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(interface_addresses, st.booleans())
    def test_arbitrary_input_one_error_type(self, addresses, include_loopback) -> None:
        try:
            out = usable_addresses(addresses, include_loopback, ("inet", "inet6"))
        except CandidateError:
            return
        self.assertEqual(len(out), len(set(out)))

    def test_read_from_ifaddr(self) -> None:
        """ifaddr's adapters with the flags read separately; IPv6 tuples unpacked."""
        adapters = [adapter("lo", "127.0.0.1", ("::1", 0, 0)), adapter("eth0", "10.1.0.2", ("fe80::1", 0, 2))]
        flags = {"lo": (True, True), "eth0": (True, False)}
        self.assertEqual(
            read_interface_addresses(lambda: adapters, flags.get),
            [
                InterfaceAddress("lo", "127.0.0.1", True, True),
                InterfaceAddress("lo", "::1", True, True),
                InterfaceAddress("eth0", "10.1.0.2", True, False),
                InterfaceAddress("eth0", "fe80::1", True, False),
            ],
        )
        self.assertEqual(read_interface_addresses(lambda: adapters, lambda name: None)[0].up, None)

    def test_listing_refused(self) -> None:
        def refused():
            raise OSError(24, "Too many open files")

        e = self.assertRaises(CandidateError, host_addresses, read=lambda: read_interface_addresses(refused))
        self.assertIn("Too many open files", str(e))

    def test_real_interfaces(self) -> None:
        """This machine's own, read without a child process."""
        addrs = host_addresses(include_loopback=True)
        self.assertIn("127.0.0.1", addrs)
        self.assertNotIn("127.0.0.1", host_addresses())
        flags = interface_flags("lo")
        if flags is not None:
            self.assertEqual(flags, (True, True))
        self.assertIsNone(interface_flags("no-such-if0"))


class OrderTests(SynchronousTestCase):
    def test_predicted(self) -> None:
        self.assertEqual(predicted_ports(("h", 65534), 1, 3), [("h", 65535)])
        self.assertEqual(predicted_ports(("h", 100), -2, 2), [("h", 98), ("h", 96)])

    def test_without_prediction(self) -> None:
        self.assertEqual(
            remote_addresses([("198.18.2.1", 61000)], [("10.2.0.5", 5000), ("198.18.2.1", 61000)]),
            [("198.18.2.1", 61000), ("10.2.0.5", 5000)],
        )

    def test_predicted_first(self) -> None:
        self.assertEqual(
            remote_addresses([("198.18.2.1", 61000)], [("10.2.0.5", 5000)], predict_delta=1, span=2),
            [("198.18.2.1", 61001), ("198.18.2.1", 61002), ("198.18.2.1", 61000), ("10.2.0.5", 5000)],
        )


# ---------------------------------------------------------------- screening and budgets

from ipaddress import IPv4Address, IPv4Network  # noqa: E402

from twisted.internet.task import Clock  # noqa: E402

from natbypass.punch.candidates import (  # noqa: E402
    MAX_CANDIDATES_PER_PROTOCOL,
    LocalNetworks,
    ProbeBudget,
    TokenBucket,
    refusal,
    screen,
)

LAN = LocalNetworks.of([InterfaceAddress("eth0", "192.168.1.20", True, False, 24)])


def _v4_in(network: str) -> st.SearchStrategy[str]:
    net = IPv4Network(network)
    return st.integers(int(net.network_address), int(net.broadcast_address)).map(lambda i: str(IPv4Address(i)))


class RefusalTests(SynchronousTestCase):
    @given(
        _v4_in("127.0.0.0/8")
        | _v4_in("224.0.0.0/4")
        | _v4_in("240.0.0.0/4")
        | _v4_in("0.0.0.0/8")
        | _v4_in("169.254.0.0/16")
        | st.ip_addresses(v=6, network="ff00::/8").map(str)
        | st.ip_addresses(v=6, network="fe80::/10").map(str)
        | st.ip_addresses(v=6, network="::ffff:0:0/96").map(str)
    )
    def test_refused_off_their_network(self, host: str) -> None:
        """Loopback, multicast, reserved, unspecified, link-local, IPv4-mapped: refused on a LAN peer."""
        self.assertIsNotNone(refusal(host, LAN))

    @given(
        _v4_in("198.18.0.0/15")
        | _v4_in("10.0.0.0/8")
        | _v4_in("100.64.0.0/10")
        | _v4_in("192.0.2.0/24")
        | _v4_in("8.0.0.0/8")
        | st.ip_addresses(v=6, network="2000::/3").map(str)
    )
    def test_peers_addresses_allowed(self, host: str) -> None:
        """The NAT lab (198.18/15), LANs, CGN, documentation, public: allowed."""
        if host not in ("100.100.100.200",):
            self.assertIsNone(refusal(host, LAN))

    def test_on_their_network(self) -> None:
        self.assertIsNotNone(refusal("127.0.0.1", LocalNetworks()))
        self.assertIsNone(refusal("127.0.0.1", LocalNetworks(loopback=True)))
        self.assertIsNone(refusal("127.0.0.5", LocalNetworks.of([], bind_host="127.0.0.1")))
        link = LocalNetworks.of([InterfaceAddress("eth1", "169.254.7.7", True, False, 16)])
        self.assertIsNone(refusal("169.254.3.3", link))
        self.assertIsNotNone(refusal("fe80::1", link))  # no zone on the wire

    @given(
        st.ip_addresses(v=6, network="fc00::/7").map(str)
        | st.ip_addresses(v=6, network="2001:2::/48").map(str)
        | st.ip_addresses(v=6, network="2001:db8::/32").map(str)
    )
    def test_ipv6_peers_allowed(self, host: str) -> None:
        """Unique local (a LAN's), benchmarking (the lab's IPv6) and documentation IPv6: allowed, as for IPv4."""
        if host != "fd00:ec2::254":
            self.assertIsNone(refusal(host, LAN))

    @given(
        st.ip_addresses(v=6, network="fec0::/10").map(str)
        | st.ip_addresses(v=6, network="100::/64").map(str)
        | st.ip_addresses(v=6, network="::/96").map(str)
    )
    def test_ipv6_refused(self, host: str) -> None:
        """Site-local (deprecated, RFC 3879: ambiguous), discard-only, IPv4-compatible and unspecified: refused."""
        self.assertIsNotNone(refusal(host, LAN))

    def test_ipv6_site_local_reason(self) -> None:
        self.assertEqual(refusal("fec0::1", LAN), "IPv6 site-local (deprecated, RFC 3879)")
        self.assertNotIn(
            "fec0::1", usable_addresses([InterfaceAddress("eth0", "fec0::1", True, False, 64)], families=("inet6",))
        )

    def test_metadata_always(self) -> None:
        link = LocalNetworks.of([InterfaceAddress("eth1", "169.254.7.7", True, False, 16)], loopback=True)
        for host in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"):
            self.assertEqual(refusal(host, link), "a cloud metadata service")

    def test_broadcast(self) -> None:
        self.assertEqual(refusal("255.255.255.255", LAN), "broadcast")
        self.assertIn("broadcast address of our network 192.168.1.0/24", refusal("192.168.1.255", LAN))
        self.assertIsNone(refusal("192.168.1.255", LocalNetworks()))  # not ours: another network's host
        self.assertIsNone(refusal("192.168.1.21", LAN))

    def test_bound_address_only(self) -> None:
        """Bound to one address: only its network counts (another interface's is not reachable from it)."""
        both = [
            InterfaceAddress("eth0", "192.168.1.20", True, False, 24),
            InterfaceAddress("eth1", "169.254.7.7", True, False, 16),
        ]
        local = LocalNetworks.of(both, bind_host="192.168.1.20")
        self.assertIsNotNone(refusal("169.254.3.3", local))
        self.assertIsNotNone(refusal("192.168.1.255", local))

    @given(st.text(max_size=20))
    def test_never_raises(self, host: str) -> None:
        refusal(host, LAN)


addresses = st.tuples(
    st.ip_addresses(v=4).map(str) | st.sampled_from(["127.0.0.1", "224.0.0.1", "10.0.0.1", "198.18.1.2"]),
    st.integers(1, 65535),
)


class ScreenTests(SynchronousTestCase):
    @given(st.lists(addresses, max_size=40), st.lists(addresses, max_size=40), st.integers(0, 12))
    def test_bounded_and_partitioned(self, srflx: list, hosts: list, limit: int) -> None:
        out = screen(srflx, hosts, LAN, limit)
        kept = [*out.srflx, *out.hosts]
        self.assertLessEqual(len(kept), limit)
        self.assertEqual(len(kept), len(set(kept)))
        self.assertTrue(set(out.srflx) <= set(srflx))
        self.assertTrue(all(refusal(h, LAN) is None for h, _ in kept))
        self.assertTrue(all(refusal(h, LAN) is not None for (h, _), _ in out.refused))
        self.assertEqual(len(set(srflx) | set(hosts)), len(kept) + len(out.refused) + out.over_cap)

    def test_srflx_first(self) -> None:
        hosts = [("10.0.0.1", p) for p in range(1, 10)]
        out = screen(hosts, [("198.18.0.9", 1)], LAN, MAX_CANDIDATES_PER_PROTOCOL)
        self.assertEqual(len(out.srflx), 8)
        self.assertEqual(out.hosts, ())
        self.assertEqual(out.over_cap, 2)

    def test_both_families_share_the_cap(self) -> None:
        """A hostile peer's flood of IPv6 and IPv4 candidates: at most the cap per protocol, families together."""
        v6 = [(f"2001:db8::{k:x}", 1000 + k) for k in range(1, 21)]
        v4 = [(f"198.18.1.{k}", 1000 + k) for k in range(1, 21)]
        out = screen(v6 + v4, v4 + v6, LAN, MAX_CANDIDATES_PER_PROTOCOL)
        self.assertEqual(len(out.srflx) + len(out.hosts), MAX_CANDIDATES_PER_PROTOCOL)
        self.assertEqual(out.over_cap, 40 - MAX_CANDIDATES_PER_PROTOCOL)

    @given(st.lists(addresses, max_size=32), st.integers(-16, 16).filter(bool))
    def test_predicted_bounded(self, srflx: list, delta: int) -> None:
        out = remote_addresses(srflx, predict_delta=delta, max_predicted=8)
        self.assertLessEqual(len(out), 8 + len(set(srflx)))


class BudgetTests(SynchronousTestCase):
    @given(st.lists(st.tuples(st.floats(0, 2), st.integers(1, 3000)), max_size=300))
    def test_bucket_never_exceeds_its_rate(self, steps: list) -> None:
        clock = Clock()
        bucket = TokenBucket(clock, rate=100.0, burst=500.0)
        taken = 0
        for dt, n in steps:
            clock.advance(dt)
            if bucket.take(n):
                taken += n
        self.assertLessEqual(taken, 500.0 + 100.0 * clock.seconds() + 1e-6)

    @given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 1500)), max_size=400))
    def test_offer_budget_totals(self, sends: list) -> None:
        clock = Clock()
        budget = ProbeBudget(clock, TokenBucket(clock, 16384.0, 32768.0))
        for dt, size in sends:
            clock.advance(dt)
            budget.spend(size)
        self.assertLessEqual(budget.bytes, budget.max_bytes)
        self.assertLessEqual(budget.packets, budget.max_packets)
        self.assertLessEqual(budget.packets, 40 + 16 * clock.seconds() + 1e-6)
        self.assertEqual(budget.packets + budget.withheld, len(sends))

    def test_peer_wide_pace_shared(self) -> None:
        clock = Clock()
        pace = TokenBucket(clock, 1000.0, 1000.0)
        a, b = ProbeBudget(clock, pace), ProbeBudget(clock, pace)
        self.assertTrue(a.spend(600))
        self.assertFalse(b.spend(600))
        clock.advance(0.2)
        self.assertTrue(b.spend(600))

    def test_prefix_read(self) -> None:
        adapter = SimpleNamespace(name="eth0", ips=[SimpleNamespace(ip="192.168.1.20", network_prefix=24)])
        (entry,) = read_interface_addresses(lambda: [adapter], flags=lambda _: (True, False))
        self.assertEqual(entry.prefix, 24)

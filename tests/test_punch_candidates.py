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

"""Tests for natbypass.punch.candidates."""

from __future__ import annotations

import json
import shutil
import socket

from hypothesis import given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from natbypass.punch.candidates import (
    CandidateError,
    PortRange,
    bind_udp,
    host_addresses,
    parse_ip_addr_json,
    predicted_ports,
    remote_addresses,
    reserve_tcp_port,
)
from natbypass.punch.tcp import reusable_socket

# Trimmed output of `ip -j addr show` on a lab host.
IP_JSON = json.dumps(
    [
        {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"],
         "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"},
                       {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"}]},
        {"ifindex": 2, "ifname": "eth0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
         "addr_info": [{"family": "inet", "local": "10.1.0.2", "prefixlen": 24, "scope": "global"},
                       {"family": "inet", "local": "169.254.3.3", "prefixlen": 16, "scope": "link"},
                       {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
                       {"family": "inet6", "local": "2001:db8::2", "prefixlen": 64, "scope": "global"}]},
        {"ifindex": 3, "ifname": "eth1", "flags": ["BROADCAST", "MULTICAST"],
         "addr_info": [{"family": "inet", "local": "10.9.0.2", "prefixlen": 24, "scope": "global"}]},
    ]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


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
    def test_parse(self) -> None:
        self.assertEqual(parse_ip_addr_json(IP_JSON), ["10.1.0.2"])
        self.assertEqual(parse_ip_addr_json(IP_JSON, include_loopback=True), ["127.0.0.1", "10.1.0.2"])
        self.assertEqual(parse_ip_addr_json(IP_JSON, families=("inet", "inet6")), ["10.1.0.2", "2001:db8::2"])

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(json_values)
    def test_arbitrary_json(self, obj) -> None:
        try:
            out = parse_ip_addr_json(json.dumps(obj))
        except CandidateError:
            return
        self.assertIsInstance(out, list)

    def test_not_json(self) -> None:
        self.assertRaises(CandidateError, parse_ip_addr_json, "1: lo: <LOOPBACK,UP>")

    def test_ip_missing(self) -> None:
        def run():
            raise FileNotFoundError("ip")

        self.assertRaises(CandidateError, host_addresses, run=run)

    def test_real_ip_command(self) -> None:
        if shutil.which("ip") is None:
            raise self.skipTest("iproute2's 'ip' is not installed")
        addrs = host_addresses(include_loopback=True)
        self.assertIn("127.0.0.1", addrs)
        self.assertNotIn("127.0.0.1", host_addresses())


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


class BindTests(TestCase):
    """Real binds on 127.0.0.1 (no traffic)."""

    def free_range(self, n: int) -> PortRange:
        # Let the kernel pick a base, then use the ports above it: tests only
        # need the range to be mostly free and check what they occupy.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
        probe.close()
        base = min(base, 65535 - n)
        return PortRange(base, base + n - 1)

    def test_udp_skips_taken_port(self) -> None:
        r = self.free_range(3)
        first = bind_udp(reactor, DatagramProtocol(), r, "127.0.0.1")
        self.addCleanup(first.stopListening)
        second = bind_udp(reactor, DatagramProtocol(), r, "127.0.0.1")
        self.addCleanup(second.stopListening)
        self.assertNotEqual(first.getHost().port, second.getHost().port)
        self.assertIn(second.getHost().port, list(r))

    def test_udp_range_exhausted(self) -> None:
        p = bind_udp(reactor, DatagramProtocol(), None, "127.0.0.1")
        self.addCleanup(p.stopListening)
        port = p.getHost().port
        e = self.assertRaises(CandidateError, bind_udp, reactor, DatagramProtocol(), PortRange(port, port), "127.0.0.1")
        self.assertIn("widen --port-range", str(e))

    def test_tcp_reservation_shared_only_by_us(self) -> None:
        held = reserve_tcp_port(None, "127.0.0.1")
        self.addCleanup(held.close)
        port = held.getsockname()[1]
        # Our punching sockets can share the port ...
        s = reusable_socket(("127.0.0.1", port))
        s.close()
        # ... but another reservation (another NATbypass) skips it.
        self.assertRaises(CandidateError, reserve_tcp_port, PortRange(port, port), "127.0.0.1")

    def test_tcp_reservation_skips_reuseport_holder(self) -> None:
        other = reusable_socket(("127.0.0.1", 0), listen=True)
        self.addCleanup(other.close)
        port = other.getsockname()[1]
        self.assertRaises(CandidateError, reserve_tcp_port, PortRange(port, port), "127.0.0.1")

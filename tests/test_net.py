"""
The shared network helpers: address text (natbypass.address), sockets that
share a port (natbypass.net), and the one STUN stream framer.
"""

from __future__ import annotations

import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from natbypass import net
from natbypass.address import WILDCARDS, format_address, is_wildcard, parse_host_port
from natbypass.stun import message as m
from natbypass.stun.client import binding_request


class FormatAddressTests(SynchronousTestCase):
    def test_ipv6_in_brackets(self) -> None:
        self.assertEqual(format_address(("2001:db8::1", 3478)), "[2001:db8::1]:3478")
        self.assertEqual(format_address(("192.0.2.1", 3478)), "192.0.2.1:3478")
        self.assertEqual(format_address(IPv6Address("UDP", "::1", 5)), "[::1]:5")
        self.assertEqual(format_address(IPv4Address("TCP", "127.0.0.1", 5)), "127.0.0.1:5")

    @settings(deadline=None)
    @given(st.ip_addresses(), st.integers(1, 65535))
    def test_parses_back(self, ip, port) -> None:
        self.assertEqual(parse_host_port(format_address((str(ip), port))), (str(ip), port))


class WildcardTests(SynchronousTestCase):
    def test_wildcards(self) -> None:
        for host in ("0.0.0.0", "::", ""):
            self.assertTrue(is_wildcard(host))
        for host in ("127.0.0.1", "::1", "192.0.2.1", "0.0.0.1"):
            self.assertFalse(is_wildcard(host))
        self.assertEqual(WILDCARDS, {"0.0.0.0", "::", ""})


class ReusableSocketTests(SynchronousTestCase):
    """Real binds on 127.0.0.1 (no traffic)."""

    def test_our_sockets_share_a_port(self) -> None:
        first = net.reusable_socket(("127.0.0.1", 0), listen=True)
        self.addCleanup(first.close)
        port = first.getsockname()[1]
        second = net.reusable_socket(("127.0.0.1", port))
        self.addCleanup(second.close)
        self.assertEqual(second.getsockname()[1], port)
        self.assertFalse(first.getblocking())
        self.assertFalse(first.get_inheritable())

    def test_others_cannot(self) -> None:
        first = net.reusable_socket(("127.0.0.1", 0), listen=True)
        self.addCleanup(first.close)
        plain = socket.socket()
        self.addCleanup(plain.close)
        self.assertRaises(OSError, plain.bind, ("127.0.0.1", first.getsockname()[1]))

    def test_failed_bind_closes(self) -> None:
        self.assertRaises(OSError, net.reusable_socket, ("192.0.2.123", 0))

    def test_binding_for_twisted(self) -> None:
        binding = net.reusable_binding(("127.0.0.1", 0))
        if net.makeBinding is None:
            self.assertEqual(binding, ("127.0.0.1", 0))
        else:
            self.assertIsNotNone(binding)

    def test_route_source(self) -> None:
        self.assertEqual(net.route_source_address(("127.0.0.1", 9)), "127.0.0.1")
        self.assertEqual(net.family_of("::1"), socket.AF_INET6)
        self.assertEqual(net.family_of("127.0.0.1"), socket.AF_INET)


class StreamFramerTests(SynchronousTestCase):
    """The one framer, as the client (cookie required) and the server (RFC 3489 too, size cap) use it."""

    def test_server_mode_takes_rfc3489(self) -> None:
        classic = m.HEADER.pack(1, 0, 0xDEADBEEF, bytes(12))
        self.assertEqual(m.StreamFramer(require_cookie=False).feed(classic), [classic])
        self.assertRaises(m.StunFramingError, m.StreamFramer().feed, classic)

    def test_size_cap(self) -> None:
        big = b"\x00\x01\x10\x00" + m.MAGIC_COOKIE_BYTES + bytes(12)
        self.assertRaises(m.StunFramingError, m.StreamFramer(max_size=4096).feed, big)
        self.assertEqual(m.StreamFramer().feed(big), [])

    def test_frames_before_an_error_are_delivered_one_by_one(self) -> None:
        good = binding_request().encode()
        framer = m.StreamFramer()
        got = []
        with self.assertRaises(m.StunFramingError):
            for frame in framer.frames(good + b"\xff" * 30):
                got.append(frame)
        self.assertEqual(got, [good])
        self.assertEqual(framer.buffered, 0)

    @settings(deadline=None)
    @given(st.lists(st.integers(0, 3), min_size=1, max_size=4), st.data())
    def test_any_chunking(self, sizes, data) -> None:
        msgs = [binding_request([m.Software("x" * (4 * k))]).encode() for k in sizes]
        stream = b"".join(msgs)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        framer = m.StreamFramer(require_cookie=False, max_size=4096)
        out = []
        for a, b in zip([0] + cuts, cuts + [len(stream)]):
            out += framer.feed(stream[a:b])
        self.assertEqual(out, msgs)

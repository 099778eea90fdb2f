"""natbypass.punch.candidates' port binding, on real sockets on 127.0.0.1 (no traffic)."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from natbypass.punch.candidates import CandidateError, PortRange, bind_udp, reserve_tcp_port
from natbypass.punch.tcp import reusable_socket


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

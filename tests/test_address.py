"""natbypass.address: the one HOST:PORT grammar (detect, tap and peer options build on it)."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.address import is_ip, parse_host_port


class ParseHostPortTests(SynchronousTestCase):
    def test_names_allowed_unless_ip_only(self) -> None:
        self.assertEqual(parse_host_port("stun.example:3478"), ("stun.example", 3478))
        with self.assertRaises(ValueError) as caught:
            parse_host_port("stun.example:3478", ip_only=True)
        self.assertIn("is not an IP address", str(caught.exception))

    def test_default_port(self) -> None:
        self.assertEqual(parse_host_port("192.0.2.1", 9), ("192.0.2.1", 9))
        with self.assertRaises(ValueError) as caught:
            parse_host_port("192.0.2.1")
        self.assertIn("a port is needed", str(caught.exception))

    def test_port_zero_only_when_allowed(self) -> None:
        self.assertRaises(ValueError, parse_host_port, "0.0.0.0:0")
        self.assertEqual(parse_host_port("0.0.0.0:0", allow_zero=True), ("0.0.0.0", 0))

    @given(st.text(max_size=40), st.booleans())
    def test_only_value_errors(self, text: str, ip_only: bool) -> None:
        try:
            host, port = parse_host_port(text, 3478, ip_only=ip_only)
        except ValueError:
            return
        self.assertTrue(1 <= port <= 65535)
        if ip_only:
            self.assertTrue(is_ip(host))

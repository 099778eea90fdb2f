"""Tests for natbypass.app.peer_options and the protocol wish parser."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app.peer_options import check_peer_options, mediator_host, stun_server
from natbypass.peer import parse_wish


class MediatorHostTests(SynchronousTestCase):
    def test_positional(self) -> None:
        self.assertEqual(mediator_host("tcp:198.18.0.2:7000"), "198.18.0.2")
        self.assertEqual(mediator_host("tls:mediator.example:7443"), "mediator.example")

    def test_keyword(self) -> None:
        self.assertEqual(mediator_host("tcp:host=127.0.0.1:port=7000"), "127.0.0.1")
        self.assertEqual(mediator_host("tls:port=7443:host=m.example"), "m.example")

    def test_escaped_ipv6(self) -> None:
        self.assertEqual(mediator_host(r"tcp:\:\:1:7000"), "::1")

    def test_unparseable(self) -> None:
        self.assertRaises(ValueError, mediator_host, "unix:/tmp/sock")

    def test_stun_default_and_explicit(self) -> None:
        self.assertEqual(stun_server(None, "tcp:127.0.0.1:7000"), ("127.0.0.1", 3478))
        self.assertEqual(stun_server("127.0.0.2:5000", "tcp:127.0.0.1:7000"), ("127.0.0.2", 5000))

    @given(st.text(max_size=60))
    def test_arbitrary_text(self, text: str) -> None:
        try:
            mediator_host(text)
        except ValueError:
            pass


class WishTests(SynchronousTestCase):
    def test_values(self) -> None:
        """The wire form: () for auto, else the protocols in order."""
        self.assertEqual(parse_wish("auto"), ())
        self.assertEqual(parse_wish("udp"), ("udp",))
        self.assertEqual(parse_wish("tcp,udp"), ("tcp", "udp"))
        self.assertEqual(parse_wish(["udp", "tcp"]), ("udp", "tcp"))

    def test_invalid(self) -> None:
        for bad in ("", "quic", "udp,udp", "udp,", []):
            self.assertRaises(ValueError, parse_wish, bad)


class DualStackOptionTests(SynchronousTestCase):
    def options(self, **given: object) -> dict:
        options = {"protocol": "auto", "mediator": "tcp:198.18.0.2:7000", "ca": None, "port-range": None}
        options.update({"stun": None, "stun6": None, "ipv6": False}, **given)
        check_peer_options(options)
        return options

    def test_off_by_default(self) -> None:
        options = self.options()
        self.assertIsNone(options["stun6"])
        self.assertFalse(options["ipv6"])

    def test_stun6_implies_ipv6(self) -> None:
        options = self.options(stun6="[2001:2::2]")
        self.assertEqual(options["stun6"], ("2001:2::2", 3478))
        self.assertTrue(options["ipv6"])

    def test_stun6_must_be_ipv6(self) -> None:
        e = self.assertRaises(ValueError, self.options, stun6="198.18.0.2:3478")
        self.assertIn("--stun6: needs an IPv6 address", str(e))

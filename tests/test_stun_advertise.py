"""
Tests for --stun-advertise (the responder behind a 1:1 NAT): the config's
validation and public mapping, the addresses responses name (RFC 5780
RESPONSE-ORIGIN and OTHER-ADDRESS, RFC 3489 SOURCE-ADDRESS and
CHANGED-ADDRESS), CHANGE-REQUEST answered from the right local socket, and
the fast path against the codec path.  The lab test behind a real 1:1 NAT
is tests/test_lab_onetoone.py.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.stun import message as m
from natbypass.stun.server import BindingResponder, ResponderConfig

# The VM's local addresses and the public ones the cloud's 1:1 NAT maps onto them.
LA, LB = "10.128.0.2", "10.128.0.3"
PUBA, PUBB = "203.0.113.5", "203.0.113.6"
PA, PB = 3478, 3479
ADVERTISE = ((PUBA, LA), (PUBB, LB))
BEHIND = ResponderConfig((LA, PA), (LB, PB), "t", ADVERTISE)
CLIENT = ("198.51.100.7", 40000)


def respond(config: ResponderConfig, *attrs: m.Attribute, local=(LA, PA), rfc3489: bool = False):
    cookie = 0x01020304 if rfc3489 else m.MAGIC_COOKIE
    data = m.Message(1, 0, os.urandom(12), attrs, cookie).encode()
    reply = BindingResponder(config).respond(m.decode(data), CLIENT, local)
    return reply, m.decode(reply.data)


class ConfigTests(SynchronousTestCase):
    def test_public(self) -> None:
        self.assertEqual(BEHIND.public((LA, 1)), (PUBA, 1))
        self.assertEqual(BEHIND.public((LB, PB)), (PUBB, PB))
        self.assertEqual(BEHIND.public(("192.0.2.9", 5)), ("192.0.2.9", 5))  # not advertised: as is

    def test_partial(self) -> None:
        """Advertising one address only (the other has no NAT in front of it) is allowed."""
        config = ResponderConfig((LA, PA), (LB, PB), "t", ((PUBA, LA),))
        self.assertEqual(config.public((LB, PB)), (LB, PB))

    def test_invalid(self) -> None:
        for advertise in [
            ((PUBA, "10.9.9.9"),),  # not a responder address
            ((PUBA, LA), (PUBA, LB)),  # one public twice
            ((PUBA, LA), (PUBB, LA)),  # one local twice
            (("2001:db8::1", LA),),  # families differ
            (("0.0.0.0", LA),),  # wildcard
            (("example.com", LA),),
        ]:
            with self.assertRaises(ValueError, msg=advertise):
                ResponderConfig((LA, PA), (LB, PB), "t", advertise)

    def test_plain_server_with_wildcard_cannot_advertise_it(self) -> None:
        with self.assertRaises(ValueError):
            ResponderConfig(("0.0.0.0", PA), None, "t", ((PUBA, "0.0.0.0"),))


class ResponseTests(SynchronousTestCase):
    def test_binding_names_public_addresses(self) -> None:
        reply, response = respond(BEHIND)
        self.assertEqual(reply.origin, (LA, PA))  # sent from the local socket...
        self.assertEqual(response.get(m.ResponseOrigin).address, (PUBA, PA))  # ...which clients see as public
        self.assertEqual(response.get(m.OtherAddress).address, (PUBB, PB))
        self.assertEqual(response.get(m.XorMappedAddress).address, CLIENT)

    def test_every_socket(self) -> None:
        for local in BEHIND.addresses():
            _, response = respond(BEHIND, local=local)
            public = BEHIND.public(local)
            self.assertEqual(response.get(m.ResponseOrigin).address, public)
            other = response.get(m.OtherAddress).address
            self.assertNotEqual(other[0], public[0])
            self.assertNotEqual(other[1], public[1])
            self.assertIn(other[0], (PUBA, PUBB))

    def test_change_request_from_the_socket_of_the_public_address(self) -> None:
        for change_ip, change_port, origin, public in [
            (True, True, (LB, PB), (PUBB, PB)),
            (False, True, (LA, PB), (PUBA, PB)),
            (True, False, (LB, PA), (PUBB, PA)),
        ]:
            reply, response = respond(BEHIND, m.ChangeRequest(change_ip, change_port))
            self.assertEqual(reply.origin, origin)
            self.assertEqual(response.get(m.ResponseOrigin).address, public)

    def test_rfc3489_addresses(self) -> None:
        _, response = respond(BEHIND, m.ChangeRequest(False, True), rfc3489=True)
        self.assertEqual(response.get(m.SourceAddress).address, (PUBA, PB))
        self.assertEqual(response.get(m.ChangedAddress).address, (PUBB, PB))

    def test_without_advertise_local_addresses(self) -> None:
        _, response = respond(ResponderConfig((LA, PA), (LB, PB), "t"))
        self.assertEqual(response.get(m.ResponseOrigin).address, (LA, PA))
        self.assertEqual(response.get(m.OtherAddress).address, (LB, PB))

    @settings(max_examples=200)
    @given(
        st.binary(min_size=12, max_size=12),
        st.ip_addresses(v=4).map(str),
        st.integers(1, 65535),
        st.integers(0, 3),
        st.booleans(),
    )
    def test_fast_path_matches_codec_path(self, txid, host, port, which, fp) -> None:
        """The fast path's precomputed tail names the public addresses too, byte for byte."""
        local = BEHIND.addresses()[which]
        data = m.Message(1, 0, txid).encode(fingerprint=fp)
        responder = BindingResponder(BEHIND)
        fast = responder.fast_response(data, (host, port), local)
        self.assertIsNotNone(fast)
        slow = responder.respond(m.decode(data), (host, port), local)
        self.assertEqual(fast, slow.data)
        self.assertEqual(m.decode(fast).get(m.ResponseOrigin).address, BEHIND.public(local))

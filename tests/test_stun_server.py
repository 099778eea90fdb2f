"""
Tests for natbypass.stun.server: the pure responder (RFC 8489, RFC 5780,
RFC 3489 answers), its fast path against the codec path, the rate limiter,
the protocols on fake transports, and the service on an in-memory reactor
(natbypass.testing.udp).  Real loopback sockets: tests/test_stun_server_loopback.py.
"""

from __future__ import annotations

import errno
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from natbypass.stun import message as m
from natbypass.stun.batch import SEND_SIZE
from natbypass.stun.server import (
    MAX_RESPONSE_SIZE,
    MAX_SOFTWARE_BYTES,
    MAX_STREAM_MESSAGE,
    MAX_UNKNOWN_LISTED,
    BindingResponder,
    Counters,
    RateLimiter,
    ResponderConfig,
    STUNDatagramProtocol,
    STUNServer,
    STUNService,
    STUNStreamFactory,
)
from natbypass.testing.udp import MemoryUDPReactor

A, B = "192.0.2.1", "192.0.2.2"
PA, PB = 3478, 3479
PLAIN = ResponderConfig((A, PA), None, "test server")
FULL = ResponderConfig((A, PA), (B, PB), "test server")
CLIENT = ("198.51.100.7", 40000)


def request(*attrs: m.Attribute, cookie: int = m.MAGIC_COOKIE, method: int = 1,
            cls: int = m.MessageClass.REQUEST, txid: bytes | None = None) -> bytes:  # fmt: skip
    return m.Message(method, cls, txid or os.urandom(12), attrs, cookie).encode()


def answer(config: ResponderConfig, data: bytes, local=(A, PA), source=CLIENT, **kw):
    """Responder reply via the codec path, plus the decoded response."""
    reply = BindingResponder(config).respond(m.decode(data), source, local, **kw)
    return reply, (m.decode(reply.data) if reply is not None else None)


class ConfigTests(SynchronousTestCase):
    def test_addresses(self) -> None:
        self.assertEqual(PLAIN.addresses(), ((A, PA),))
        self.assertEqual(FULL.addresses(), ((A, PA), (A, PB), (B, PA), (B, PB)))
        self.assertFalse(PLAIN.rfc5780)
        self.assertTrue(FULL.rfc5780)

    def test_changed_follows_rfc5780_table(self) -> None:
        """RFC 5780 6.1 table 1, from every one of the four sockets."""
        for local in FULL.addresses():
            ip, port = local
            other_ip = B if ip == A else A
            other_port = PB if port == PA else PA
            self.assertEqual(FULL.changed(local, False, False), (ip, port))
            self.assertEqual(FULL.changed(local, True, False), (other_ip, port))
            self.assertEqual(FULL.changed(local, False, True), (ip, other_port))
            self.assertEqual(FULL.changed(local, True, True), (other_ip, other_port))
            self.assertEqual(FULL.other(local), (other_ip, other_port))

    def test_no_alternate_no_other(self) -> None:
        self.assertIsNone(PLAIN.other((A, PA)))
        self.assertIsNone(PLAIN.changed((A, PA), True, False))
        self.assertIsNone(FULL.other(("203.0.113.9", PA)))

    def test_invalid(self) -> None:
        for primary, alternate, software in [
            (("0.0.0.0", PA), (B, PB), "x"),
            ((A, PA), (A, PB), "x"),
            ((A, PA), (B, PA), "x"),
            ((A, PA), ("::1", PB), "x"),
            (("nothost", PA), None, "x"),
            ((A, PA), None, "x" * 129),
        ]:
            with self.assertRaises(ValueError):
                ResponderConfig(primary, alternate, software)

    def test_wildcard_allowed_without_alternate(self) -> None:
        self.assertEqual(ResponderConfig(("0.0.0.0", PA)).addresses(), (("0.0.0.0", PA),))


class PlainResponderTests(SynchronousTestCase):
    """Without a second address: a plain RFC 8489 server."""

    def test_binding(self) -> None:
        data = request()
        reply, response = answer(PLAIN, data)
        self.assertEqual(reply.origin, (A, PA))
        self.assertEqual(reply.destination, CLIENT)
        self.assertEqual(response.cls, m.MessageClass.SUCCESS)
        self.assertEqual(response.transaction_id, data[8:20])
        self.assertEqual(response.get(m.XorMappedAddress).address, CLIENT)
        self.assertEqual(response.get(m.Software), m.Software("test server"))
        self.assertIsInstance(response.attributes[-1], m.Fingerprint)
        for absent in (m.MappedAddress, m.ResponseOrigin, m.OtherAddress):
            self.assertIsNone(response.get(absent))

    def test_change_request_is_unknown(self) -> None:
        """RFC 5780 6: no alternate address -> 420 to a CHANGE-REQUEST."""
        for flags in [(True, False), (False, True), (True, True)]:
            reply, response = answer(PLAIN, request(m.ChangeRequest(*flags)))
            self.assertEqual(response.cls, m.MessageClass.ERROR)
            self.assertEqual(response.get(m.ErrorCode).code, 420)
            self.assertEqual(response.get(m.UnknownAttributes).types, (0x0003,))

    def test_empty_change_request_is_ignored(self) -> None:
        reply, response = answer(PLAIN, request(m.ChangeRequest(False, False)))
        self.assertEqual(response.cls, m.MessageClass.SUCCESS)

    def test_rfc5780_attributes_unknown(self) -> None:
        _, response = answer(PLAIN, request(m.ResponsePort(5000), m.Padding(8)))
        self.assertEqual(response.get(m.ErrorCode).code, 420)
        self.assertEqual(response.get(m.UnknownAttributes).types, (0x0027, 0x0026))

    def test_wildcard_rfc3489_has_no_source_address(self) -> None:
        config = ResponderConfig(("0.0.0.0", PA))
        _, response = answer(config, request(cookie=0x12345678), local=("0.0.0.0", PA))
        self.assertEqual(response.get(m.MappedAddress).address, CLIENT)
        self.assertIsNone(response.get(m.SourceAddress))

    def test_ipv6(self) -> None:
        config = ResponderConfig(("::1", PA))
        source = ("2001:db8::5", 5555)
        data = request()
        reply = BindingResponder(config).respond_datagram(data, source, ("::1", PA))
        self.assertEqual(m.decode(reply.data).get(m.XorMappedAddress).address, source)


class RFC5780ResponderTests(SynchronousTestCase):
    def test_every_socket(self) -> None:
        for local in FULL.addresses():
            reply, response = answer(FULL, request(), local=local)
            self.assertEqual(reply.origin, local)
            self.assertEqual(response.get(m.XorMappedAddress).address, CLIENT)
            self.assertEqual(response.get(m.MappedAddress).address, CLIENT)
            self.assertEqual(response.get(m.ResponseOrigin).address, local)
            self.assertEqual(response.get(m.OtherAddress).address, FULL.other(local))

    def test_change_request(self) -> None:
        for local in FULL.addresses():
            for flags in [(False, False), (True, False), (False, True), (True, True)]:
                reply, response = answer(FULL, request(m.ChangeRequest(*flags)), local=local)
                expected = FULL.changed(local, *flags)
                self.assertEqual(reply.origin, expected)
                self.assertEqual(reply.destination, CLIENT)
                self.assertEqual(response.get(m.ResponseOrigin).address, expected)
                # OTHER-ADDRESS names the receiving socket's opposite (table 1).
                self.assertEqual(response.get(m.OtherAddress).address, FULL.other(local))

    def test_ipv6_change_request(self) -> None:
        """RFC 5780 over IPv6 (two IPv6 addresses): every answer and address attribute is family 2."""
        full6 = ResponderConfig(("2001:2::2", PA), ("2001:2::3", PB), "test server")
        client6 = ("2001:2:0:7::2", 40000)
        for local in full6.addresses():
            for flags in [(False, False), (True, False), (False, True), (True, True)]:
                data = request(m.ChangeRequest(*flags))
                reply = BindingResponder(full6).respond_datagram(data, client6, local)
                response = m.decode(reply.data)
                self.assertEqual(reply.origin, full6.changed(local, *flags))
                self.assertEqual(response.get(m.XorMappedAddress).address, client6)
                self.assertEqual(response.get(m.ResponseOrigin).address, reply.origin)
                self.assertEqual(response.get(m.OtherAddress).address, full6.other(local))
                self.assertEqual(reply.data[m.HEADER_SIZE + 5], 0x02)  # the first attribute's family

    def test_response_port(self) -> None:
        reply, response = answer(FULL, request(m.ResponsePort(6000)))
        self.assertEqual(reply.destination, (CLIENT[0], 6000))
        self.assertEqual(response.get(m.XorMappedAddress).address, CLIENT)

    def test_response_port_zero_or_with_padding(self) -> None:
        for attrs in [(m.ResponsePort(0),), (m.ResponsePort(6000), m.Padding(100))]:
            reply, response = answer(FULL, request(*attrs))
            self.assertEqual(response.get(m.ErrorCode).code, 400)
            self.assertEqual(reply.destination, CLIENT)

    def test_padding_bounded_by_request(self) -> None:
        """A PADDING request gets a response padded to its size, never more."""
        for size in [0, 4, 40, 100, 1400]:
            data = request(m.Padding(size))
            reply, response = answer(FULL, data)
            self.assertLessEqual(len(reply.data), max(len(data), MAX_RESPONSE_SIZE))
            self.assertIsNotNone(response.get(m.Padding))
            if size >= 100:
                self.assertEqual(len(reply.data), len(data))

    def test_rfc3489_client(self) -> None:
        """No magic cookie: MAPPED-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS only."""
        data = request(m.ChangeRequest(False, False), cookie=0xDEADBEEF)
        reply, response = answer(FULL, data)
        self.assertEqual(response.cookie, 0xDEADBEEF)
        self.assertEqual(response.transaction_id, data[8:20])
        self.assertEqual(
            [type(a) for a in response.attributes],
            [m.MappedAddress, m.SourceAddress, m.ChangedAddress],
        )
        self.assertEqual(response.get(m.MappedAddress).address, CLIENT)
        self.assertEqual(response.get(m.SourceAddress).address, (A, PA))
        self.assertEqual(response.get(m.ChangedAddress).address, (B, PB))

    def test_rfc3489_change_request(self) -> None:
        data = request(m.ChangeRequest(True, True), cookie=0xDEADBEEF)
        reply, response = answer(FULL, data)
        self.assertEqual(reply.origin, (B, PB))
        self.assertEqual(response.get(m.SourceAddress).address, (B, PB))

    def test_tcp_cannot_change_or_redirect(self) -> None:
        for attrs in [(m.ChangeRequest(True, False),), (m.ResponsePort(6000),)]:
            reply, response = answer(FULL, request(*attrs), stream=True)
            self.assertEqual(response.get(m.ErrorCode).code, 400)

    def test_tcp_ignores_padding(self) -> None:
        data = request(m.Padding(400))
        reply, response = answer(FULL, data, stream=True)
        self.assertEqual(response.cls, m.MessageClass.SUCCESS)
        self.assertIsNone(response.get(m.Padding))


class ErrorTests(SynchronousTestCase):
    def test_unknown_required_attribute(self) -> None:
        data = request(m.UnknownAttribute(0x0024, b"\0\0\0\1"), m.UnknownAttribute(0x8029, b"x"))
        _, response = answer(FULL, data)
        self.assertEqual(response.cls, m.MessageClass.ERROR)
        self.assertEqual(response.get(m.ErrorCode).code, 420)
        self.assertEqual(response.get(m.UnknownAttributes).types, (0x0024,))
        self.assertIsInstance(response.attributes[-1], m.Fingerprint)

    def test_unknown_optional_attribute_ignored(self) -> None:
        _, response = answer(FULL, request(m.UnknownAttribute(0x8029, b"12345678")))
        self.assertEqual(response.cls, m.MessageClass.SUCCESS)

    def test_response_address_refused(self) -> None:
        """RESPONSE-ADDRESS would make us a reflector: 420, sent to the source."""
        for cookie in (m.MAGIC_COOKIE, 0x01020304):
            data = request(m.ResponseAddress("203.0.113.1", 53), cookie=cookie)
            reply, response = answer(FULL, data)
            self.assertEqual(reply.destination, CLIENT)
            self.assertEqual(response.get(m.ErrorCode).code, 420)
            self.assertEqual(response.get(m.UnknownAttributes).types[0], 0x0002)

    def test_unknown_list_bounded(self) -> None:
        attrs = [m.UnknownAttribute(0x4000 + i, b"") for i in range(100)]
        reply, response = answer(FULL, request(*attrs))
        self.assertEqual(len(response.get(m.UnknownAttributes).types), MAX_UNKNOWN_LISTED)
        self.assertLessEqual(len(reply.data), MAX_RESPONSE_SIZE)

    def test_rfc3489_unknown_list_padded_by_repetition(self) -> None:
        data = request(m.UnknownAttribute(0x4001, b""), cookie=0x01020304)
        _, response = answer(FULL, data)
        self.assertEqual(response.get(m.UnknownAttributes).types, (0x4001, 0x4001))
        self.assertNotIsInstance(response.attributes[-1], m.Fingerprint)

    def test_other_method(self) -> None:
        _, response = answer(FULL, request(method=0x003))
        self.assertEqual(response.method, 0x003)
        self.assertEqual(response.cls, m.MessageClass.ERROR)
        self.assertEqual(response.get(m.ErrorCode).code, 400)

    def test_not_answered(self) -> None:
        """Indications, responses, and source port 0 get nothing."""
        responder = BindingResponder(FULL)
        for cls in (m.MessageClass.INDICATION, m.MessageClass.SUCCESS, m.MessageClass.ERROR):
            self.assertIsNone(responder.respond_datagram(request(cls=cls), CLIENT, (A, PA)))
        self.assertIsNone(responder.respond_datagram(request(), (CLIENT[0], 0), (A, PA)))
        self.assertIsNone(responder.respond_datagram(request(m.Software("x")), (CLIENT[0], 0), (A, PA)))

    def test_malformed_raises_only_decode_error(self) -> None:
        responder = BindingResponder(FULL)
        bad_fingerprint = bytearray(m.Message(1, 0, bytes(12)).encode(fingerprint=True))
        bad_fingerprint[-1] ^= 1
        for data in [b"", b"\x00\x01", request()[:-1], b"\xff" * 20, request() + b"\0\0\0\0",
                     bytes(bad_fingerprint)]:  # fmt: skip
            with self.assertRaises(m.StunDecodeError):
                responder.respond_datagram(data, CLIENT, (A, PA))


ipv4 = st.builds(lambda b: socket.inet_ntoa(b), st.binary(min_size=4, max_size=4))
ports = st.integers(1, 65535)
configs = st.sampled_from([PLAIN, FULL, ResponderConfig((A, PA), (B, PB), "")])


@st.composite
def fast_shaped(draw) -> bytes:
    """Bare or FINGERPRINT-only Binding requests, some with one byte changed or cut short, and random bytes."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=40))
    data = bytearray(m.Message(1, 0, draw(st.binary(min_size=12, max_size=12))).encode(fingerprint=draw(st.booleans())))
    if draw(st.booleans()):
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    if draw(st.integers(0, 5)) == 0:
        del data[draw(st.integers(0, len(data) - 1)) :]
    return bytes(data)


attributes = st.one_of(
    st.builds(m.ChangeRequest, st.booleans(), st.booleans()),
    st.builds(m.ResponsePort, st.integers(0, 65535)),
    st.builds(m.Padding, st.integers(0, 600)),
    st.builds(m.Software, st.text(max_size=40)),
    st.builds(m.ResponseAddress, ipv4, ports),
    st.builds(
        m.UnknownAttribute, st.integers(0x0040, 0xFFFF).filter(lambda t: t not in m.KNOWN_TYPES), st.binary(max_size=16)
    ),  # fmt: skip
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(configs, st.binary(min_size=12, max_size=12), ipv4, ports, st.integers(0, 3),
           st.booleans())  # fmt: skip
    def test_fast_path_matches_codec_path(self, config, txid, host, port, which, fp) -> None:
        """The precomputed fast path gives the codec's bytes exactly."""
        local = config.addresses()[which % len(config.addresses())]
        data = m.Message(1, 0, txid).encode(fingerprint=fp)
        responder = BindingResponder(config)
        fast = responder.respond_datagram(data, (host, port), local)
        slow = responder.respond(m.decode(data), (host, port), local)
        self.assertEqual(fast, slow)
        self.assertEqual(m.decode(fast.data).get(m.XorMappedAddress).address, (host, port))

    def test_fast_path_taken(self) -> None:
        """Bare and FINGERPRINT-only Binding requests never reach the codec path."""

        class CodecPathForbidden(BindingResponder):
            def respond(self, *args, **kwargs):
                raise AssertionError("codec path used")

        for config in (PLAIN, FULL):
            responder = CodecPathForbidden(config)
            for fp in (False, True):
                data = m.Message(1, 0, os.urandom(12)).encode(fingerprint=fp)
                reply = responder.respond_datagram(data, CLIENT, (A, PA))
                self.assertEqual(m.decode(reply.data).get(m.XorMappedAddress).address, CLIENT)

    @settings(max_examples=300)
    @given(
        configs,
        st.lists(attributes, max_size=5),
        st.sampled_from([m.MAGIC_COOKIE, 0x01020304]),
        st.sampled_from([1, 2, 3]),
        st.sampled_from(list(m.MessageClass)),
        ipv4,
        ports,
        st.booleans(),
    )
    def test_replies_bounded_and_well_formed(self, config, attrs, cookie, method, cls, host, port, stream) -> None:
        """Whatever is asked: a decodable reply, to the source IP, small."""
        data = m.Message(method, cls, os.urandom(12), tuple(attrs), cookie).encode()
        responder = BindingResponder(config)
        local = config.addresses()[-1]
        if stream:
            reply = responder.respond(m.decode(data), (host, port), local, stream=True)
        else:
            reply = responder.respond_datagram(data, (host, port), local)
        if cls != m.MessageClass.REQUEST:
            self.assertIsNone(reply)
            return
        response = m.decode(reply.data)
        self.assertEqual(response.transaction_id, data[8:20])
        self.assertEqual(reply.destination[0], host)
        self.assertIn(reply.origin, config.addresses())
        self.assertLessEqual(len(reply.data), max(MAX_RESPONSE_SIZE, len(data)))
        if reply.destination != (host, port):
            self.assertEqual(response.cls, m.MessageClass.SUCCESS)

    @settings(max_examples=500)
    @given(configs, st.integers(0, 3), st.binary(min_size=6, max_size=6), fast_shaped())
    def test_fast_answer_of_raw_source(self, config, which, raw, data) -> None:
        """
        The fast path on raw sockaddr bytes (what the batched read loop
        gives it), for requests of every shape near its own: either None,
        or exactly the codec path's bytes, to the source those bytes name.
        """
        local = config.addresses()[which % len(config.addresses())]
        responder = BindingResponder(config)
        fast = responder.fast_answer(local)(data, raw)
        if fast is None:
            return
        source = (socket.inet_ntoa(raw[2:]), int.from_bytes(raw[:2], "big"))
        self.assertEqual(fast, responder.respond(m.decode(data), source, local).data)

    def test_fast_responses_fit_a_send_slot(self) -> None:
        """The largest fast-path response (RFC 5780, the longest SOFTWARE) fits the batched loop's send slot."""
        config = ResponderConfig((A, PA), (B, PB), "x" * MAX_SOFTWARE_BYTES)
        data = m.Message(1, 0, os.urandom(12)).encode(fingerprint=True)
        response = BindingResponder(config).fast_response(data, CLIENT, (A, PA))
        self.assertLessEqual(len(response), MAX_RESPONSE_SIZE)
        self.assertLessEqual(MAX_RESPONSE_SIZE, SEND_SIZE)

    def test_no_fast_path_for_ipv6(self) -> None:
        config = ResponderConfig(("2001:db8::1", PA), None, "test server")
        self.assertIsNone(BindingResponder(config).fast_answer(("2001:db8::1", PA)))
        self.assertIsNone(BindingResponder(PLAIN).fast_response(request(), ("2001:db8::2", 5), (A, PA)))

    @settings(max_examples=300)
    @given(st.binary(max_size=120))
    def test_arbitrary_bytes(self, data) -> None:
        try:
            BindingResponder(FULL).respond_datagram(data, CLIENT, (A, PA))
        except m.StunDecodeError:
            pass


class RateLimiterTests(SynchronousTestCase):
    def test_budget_per_second_per_source(self) -> None:
        clock = Clock()
        limiter = RateLimiter(3, clock)
        self.assertEqual([limiter.allow("a") for _ in range(4)], [True, True, True, False])
        self.assertTrue(limiter.allow("b"))
        clock.advance(1)
        self.assertTrue(limiter.allow("a"))

    def test_table_fixed(self) -> None:
        """A fixed number of buckets, whatever the number of sources (tests/test_stun_abuse.py floods it)."""
        limiter = RateLimiter(1, Clock(), buckets=4)
        self.assertEqual(limiter.buckets, 4)
        self.assertTrue(all(0 <= limiter.bucket(f"10.0.0.{i}") < 4 for i in range(100)))

    @given(
        st.integers(1, 5),
        st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([0, 0, 0, 0.3, 1.0])),
                 max_size=60),
    )  # fmt: skip
    def test_sources_do_not_share_budgets(self, rate, events) -> None:
        """Sources in different buckets: each gets exactly what it would get alone."""
        clock, alone_clock = Clock(), {h: Clock() for h in "abc"}
        limiter = RateLimiter(rate, clock, salt=b"fixed")
        self.assertEqual(len({limiter.bucket(h) for h in "abc"}), 3)
        alone = {h: RateLimiter(rate, alone_clock[h]) for h in "abc"}
        for host, advance in events:
            clock.advance(advance)
            for c in alone_clock.values():
                c.advance(advance)
            self.assertEqual(limiter.allow(host), alone[host].allow(host))

    def test_rate_must_be_positive(self) -> None:
        self.assertRaises(ValueError, RateLimiter, 0, Clock())


# ------------------------------------------------------- in-memory sockets


def udp_server(config: ResponderConfig, limiter=None, handles: bool = False):
    """A STUNServer with one in-memory UDP socket per configured address."""
    fake = MemoryUDPReactor(handles=handles)
    server = STUNServer(BindingResponder(config), limiter=limiter)
    for host, port in config.addresses():
        fake.listenUDP(port, STUNDatagramProtocol(server), interface=host)
    return server, fake


class DatagramProtocolTests(SynchronousTestCase):
    def test_answers_from_same_socket(self) -> None:
        server, fake = udp_server(FULL)
        data = request()
        server.sockets[(A, PA)].datagramReceived(data, CLIENT)
        [(sent, dest)] = fake.udp[(A, PA)].written
        self.assertEqual(dest, CLIENT)
        self.assertEqual(m.decode(sent).transaction_id, data[8:20])
        self.assertEqual(server.counters.snapshot()["answered"], 1)

    def test_sends_through_system_handle(self) -> None:
        """With ISystemHandle, both paths send with the socket, not Port.write."""
        server, fake = udp_server(FULL, handles=True)
        data = request()
        server.sockets[(A, PA)].datagramReceived(data, CLIENT)
        server.sockets[(A, PA)].datagramReceived(request(m.ChangeRequest(True, False)), CLIENT)
        self.assertEqual(fake.udp[(A, PA)].written, [])
        [(sent, dest)] = fake.udp[(A, PA)].handle.sent
        self.assertEqual((m.decode(sent).transaction_id, dest), (data[8:20], CLIENT))
        [(sent, dest)] = fake.udp[(B, PA)].handle.sent
        self.assertEqual(m.decode(sent).get(m.ResponseOrigin).address, (B, PA))
        self.assertEqual(server.counters.answered, 2)

    def test_socket_send_failure_counted(self) -> None:
        server, fake = udp_server(FULL, handles=True)
        fake.udp[(A, PA)].handle.fail = BlockingIOError(errno.EAGAIN, "full")
        server.sockets[(A, PA)].datagramReceived(request(), CLIENT)
        server.sockets[(A, PA)].datagramReceived(request(m.Software("slow path")), CLIENT)
        self.assertEqual((server.counters.send_failed, server.counters.answered), (2, 0))

    def test_change_request_answered_from_other_socket(self) -> None:
        server, fake = udp_server(FULL)
        server.sockets[(A, PA)].datagramReceived(request(m.ChangeRequest(True, True)), CLIENT)
        self.assertEqual(fake.udp[(A, PA)].written, [])
        [(sent, dest)] = fake.udp[(B, PB)].written
        self.assertEqual(m.decode(sent).get(m.ResponseOrigin).address, (B, PB))
        self.assertEqual(server.counters.answered, 1)

    def test_malformed_dropped_and_counted(self) -> None:
        server, fake = udp_server(FULL)
        proto = server.sockets[(A, PA)]
        for junk in [b"", b"GET / HTTP/1.0\r\n\r\n", request()[:-4], os.urandom(64)]:
            proto.datagramReceived(junk, CLIENT)
        self.assertEqual(fake.udp[(A, PA)].written, [])
        self.assertEqual(server.counters.malformed, 4)
        self.assertEqual(server.counters.received, 4)

    def test_indication_ignored(self) -> None:
        server, fake = udp_server(FULL)
        server.sockets[(A, PA)].datagramReceived(request(cls=m.MessageClass.INDICATION), CLIENT)
        self.assertEqual(server.counters.ignored, 1)
        self.assertEqual(fake.udp[(A, PA)].written, [])

    def test_rate_limited(self) -> None:
        clock = Clock()
        server, fake = udp_server(PLAIN, limiter=RateLimiter(2, clock))
        proto = server.sockets[(A, PA)]
        for _ in range(5):
            proto.datagramReceived(request(), CLIENT)
        proto.datagramReceived(request(), ("198.51.100.8", 1))
        self.assertEqual(len(fake.udp[(A, PA)].written), 3)
        self.assertEqual(server.counters.rate_limited, 3)
        clock.advance(1.0)
        proto.datagramReceived(request(), CLIENT)
        self.assertEqual(len(fake.udp[(A, PA)].written), 4)

    def test_send_failure_counted(self) -> None:
        server, fake = udp_server(FULL)
        fake.udp[(A, PA)].fail = OSError(errno.EPERM, "blocked")
        fake.udp[(B, PB)].fail = OSError(errno.EPERM, "blocked")
        server.sockets[(A, PA)].datagramReceived(request(), CLIENT)
        server.sockets[(A, PA)].datagramReceived(request(m.ChangeRequest(True, True)), CLIENT)
        self.assertEqual(server.counters.send_failed, 2)
        self.assertEqual(server.counters.answered, 0)

    def test_no_responder_yet(self) -> None:
        server, fake = udp_server(FULL)
        server.responder = None
        server.sockets[(A, PA)].datagramReceived(request(), CLIENT)
        self.assertEqual(server.counters.ignored, 1)

    def test_stopped_socket_leaves_table(self) -> None:
        server, fake = udp_server(FULL)
        fake.udp[(B, PB)].stopListening()
        self.assertNotIn((B, PB), server.sockets)
        server.sockets[(A, PA)].datagramReceived(request(m.ChangeRequest(True, True)), CLIENT)
        self.assertEqual(server.counters.send_failed, 1)


def stream(config: ResponderConfig = FULL, local=(A, PA), limiter=None):
    clock = Clock()
    server = STUNServer(BindingResponder(config), limiter=limiter)
    # first_timeout: the idle timeout alone here (the first-request deadline: test_stun_abuse.SlotHoldingTests).
    proto = STUNStreamFactory(server, clock, idle_timeout=10, first_timeout=10).buildProtocol(None)
    transport = StringTransport(hostAddress=IPv4Address("TCP", *local), peerAddress=IPv4Address("TCP", *CLIENT))
    proto.makeConnection(transport)
    return server, proto, transport, clock


def split_messages(data: bytes) -> list[m.Message]:
    out = []
    while data:
        total = 20 + int.from_bytes(data[2:4], "big")
        out.append(m.decode(data[:total]))
        data = data[total:]
    return out


class StreamProtocolTests(SynchronousTestCase):
    def test_two_messages_one_chunk(self) -> None:
        server, proto, transport, _ = stream()
        first, second = request(), request(cookie=0x01020304)
        proto.dataReceived(first + second)
        responses = split_messages(transport.value())
        self.assertEqual([r.transaction_id for r in responses], [first[8:20], second[8:20]])
        self.assertEqual(responses[0].get(m.XorMappedAddress).address, CLIENT)
        self.assertEqual(responses[0].get(m.ResponseOrigin).address, (A, PA))
        self.assertEqual(responses[1].get(m.MappedAddress).address, CLIENT)

    @given(st.lists(st.integers(1, 60), max_size=20), st.integers(1, 4))
    def test_any_chunking(self, cuts, count) -> None:
        """Replies do not depend on how TCP splits the bytes."""
        server, proto, transport, _ = stream()
        data = b"".join(request(m.Software("x" * i)) for i in range(count))
        position = 0
        for cut in cuts:
            proto.dataReceived(data[position : position + cut])
            position += cut
        proto.dataReceived(data[position:])
        self.assertEqual(len(split_messages(transport.value())), count)
        self.assertFalse(transport.disconnecting)

    def test_framing_error_closes(self) -> None:
        for junk in [b"\xff" * 20, b"\x00\x01\x00\x03" + bytes(16),
                     b"\x00\x01\xff\xfc" + bytes(16)]:  # fmt: skip
            server, proto, transport, _ = stream()
            proto.dataReceived(junk)
            self.assertTrue(transport.disconnecting)
            self.assertEqual(server.counters.malformed, 1)
        self.assertGreater(len(b"\x00\x01\xff\xfc") + 0xFFFC, MAX_STREAM_MESSAGE)

    def test_malformed_message_skipped(self) -> None:
        server, proto, transport, _ = stream()
        bad_with_fp = bytearray(m.Message(1, 0, os.urandom(12)).encode(fingerprint=True))
        bad_with_fp[-1] ^= 0xFF  # wrong FINGERPRINT
        proto.dataReceived(bytes(bad_with_fp) + request())
        self.assertEqual(server.counters.malformed, 1)
        self.assertEqual(len(split_messages(transport.value())), 1)
        self.assertFalse(transport.disconnecting)

    def test_change_request_over_tcp(self) -> None:
        server, proto, transport, _ = stream()
        proto.dataReceived(request(m.ChangeRequest(True, False)))
        [response] = split_messages(transport.value())
        self.assertEqual(response.get(m.ErrorCode).code, 400)

    def test_idle_timeout(self) -> None:
        server, proto, transport, clock = stream()
        clock.advance(9)
        proto.dataReceived(request())
        clock.advance(9)
        self.assertFalse(transport.disconnecting)
        clock.advance(1.5)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timer_cancelled_on_close(self) -> None:
        server, proto, transport, clock = stream()
        proto.connectionLost(None)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connection_cap(self) -> None:
        """
        Past max_connections, buildProtocol refuses a source that would hold as
        many as the biggest (eviction: test_stun_abuse.SlotHoldingTests); a
        closed one frees a place.
        """
        server = STUNServer(BindingResponder(FULL))
        factory = STUNStreamFactory(server, Clock(), idle_timeout=10, max_connections=2)
        client = IPv4Address("TCP", *CLIENT)
        protos = []
        for _ in range(2):
            proto = factory.buildProtocol(client)
            proto.makeConnection(StringTransport(hostAddress=IPv4Address("TCP", A, PA), peerAddress=client))
            protos.append(proto)
        self.assertIsNone(factory.buildProtocol(client))
        self.assertEqual(server.counters.tcp_refused, 1)
        protos[0].connectionLost(None)
        self.assertIsNotNone(factory.buildProtocol(client))

    def test_rate_limited(self) -> None:
        server, proto, transport, clock = stream(limiter=RateLimiter(1, Clock()))
        proto.dataReceived(request() + request())
        self.assertEqual(len(split_messages(transport.value())), 1)
        self.assertEqual(server.counters.rate_limited, 1)


class ServiceTests(SynchronousTestCase):
    def test_opens_four_sockets_each_way(self) -> None:
        fake = MemoryUDPReactor()
        service = STUNService(fake, (A, PA), (B, PB), stats_interval=0)
        service.startService()
        self.assertEqual(set(fake.udp), set(FULL.addresses()))
        self.assertEqual(set(fake.tcp), set(FULL.addresses()))
        self.assertEqual(service.config.addresses(), FULL.addresses())
        self.assertEqual(set(service.server.sockets), set(FULL.addresses()))
        service.stopService()
        self.assertFalse(any(p.listening for p in fake.udp.values()))
        self.assertFalse(any(p.listening for p in fake.tcp.values()))

    def test_plain_and_udp_only(self) -> None:
        fake = MemoryUDPReactor()
        service = STUNService(fake, (A, PA), tcp=False, stats_interval=0)
        service.startService()
        self.assertEqual(set(fake.udp), {(A, PA)})
        self.assertEqual(fake.tcp, {})

    def test_port_zero_picks_the_same_numbers_everywhere(self) -> None:
        fake = MemoryUDPReactor()
        # The first port the fake hands out is busy on the second IP:
        # the service must try again rather than fail.
        fake.taken.add(("udp", B, 40000))
        service = STUNService(fake, (A, 0), (B, 0), stats_interval=0)
        service.startService()
        config = service.config
        (a, pa), (b, pb) = config.primary, config.alternate
        self.assertEqual((a, b), (A, B))
        self.assertNotIn(0, (pa, pb))
        self.assertNotEqual(pa, pb)
        self.assertEqual(set(fake.tcp), set(config.addresses()))
        self.assertEqual({k for k, p in fake.udp.items() if p.listening}, set(config.addresses()))

    def test_busy_fixed_port_fails(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        fake = MemoryUDPReactor()
        fake.taken.add(("tcp", B, PB))
        service = STUNService(fake, (A, PA), (B, PB), stats_interval=0)
        self.assertRaises(CannotListenError, service.startService)
        self.assertFalse(any(p.listening for p in fake.udp.values()))
        [critical] = [e for e in observer if e["log_level"].name == "critical"]
        self.assertEqual((critical["host"], critical["port"]), (B, PB))

    def test_invalid_config_rejected_at_construction(self) -> None:
        self.assertRaises(ValueError, STUNService, MemoryUDPReactor(), (A, PA), (A, PB))

    def test_logs_rfc5780_state_and_counters(self) -> None:
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        fake = MemoryUDPReactor()
        service = STUNService(fake, (A, PA), stats_interval=60, rate=5)
        service.startService()
        [start] = [e for e in observer if e.get("rfc5780") is False]
        self.assertIn("--stun-alternate", start["log_format"])
        self.assertTrue(any(e.get("rate") == 5 for e in observer))
        service.server.sockets[(A, PA)].datagramReceived(b"junk", CLIENT)
        fake.advance(60)
        [stats] = [e for e in observer if "malformed" in e]
        self.assertEqual((stats["received"], stats["malformed"]), (1, 1))
        service.stopService()
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_counters_snapshot(self) -> None:
        counters = Counters(received=3)
        self.assertEqual(counters.snapshot()["received"], 3)
        self.assertEqual(set(counters.snapshot()), {
            "received", "answered", "malformed", "rate_limited", "ignored", "send_failed",
            "tcp_refused", "tcp_idle_closed", "tcp_connections", "errors",
            "rate_limited_global", "tcp_silent_closed", "tcp_evicted"})  # fmt: skip

"""
Tests for natbypass.stun.client: transactions on a Clock, demultiplexing,
TCP framing, in memory.  Connections from one shared local port, on real
loopback sockets, are in tests/test_stun_client_loopback.py.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.punch.mux import UDPMux
from natbypass.stun import message as m
from natbypass.stun.client import (
    RECENT_TRANSACTIONS,
    IStunClient,
    RetransmitPolicy,
    StunClient,
    StunErrorResponse,
    StunFramingError,
    StunStreamFramer,
    StunTCPProtocol,
    StunTimeout,
    StunUDPProtocol,
    binding_request,
    format_address,
    mapped_address,
    other_address,
)
from natbypass.testing.udp import MemoryUDPReactor

SERVER = ("192.0.2.1", 3478)


def success(request: m.Message, mapped=("198.51.100.7", 40000), **kw) -> bytes:
    attrs = [m.XorMappedAddress(*mapped)]
    if "other" in kw:
        attrs.append(m.OtherAddress(*kw["other"]))
    return request.reply(m.MessageClass.SUCCESS, attrs).encode(fingerprint=True)


class Recorder:
    """A send() that remembers what was sent, and when."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes, object]] = []

    def __call__(self, data: bytes, addr) -> None:
        self.sent.append((self.clock.seconds(), data, addr))

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in self.sent]


def make(policy: RetransmitPolicy = RetransmitPolicy(), **kw):
    clock = Clock()
    sent = Recorder(clock)
    return clock, sent, StunClient(sent, clock, policy, **kw)


class RetransmitPolicyTests(SynchronousTestCase):
    def test_rfc8489_example(self) -> None:
        """RFC 8489 6.2.1: sends at 0, 500, 1500, ... 31500 ms; failure at 39500 ms."""
        p = RetransmitPolicy()
        self.assertEqual(p.send_times(), (0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5))
        self.assertEqual(p.give_up_after(), 39.5)

    def test_invalid(self) -> None:
        for kw in ({"rto": 0}, {"rc": 0}, {"rm": 0}, {"ti": -1}):
            self.assertRaises(ValueError, RetransmitPolicy, **kw)
        self.assertRaises(ValueError, RetransmitPolicy.within, 0)

    @given(
        timeout=st.floats(min_value=0.01, max_value=100),
        rto=st.floats(min_value=0.01, max_value=5),
    )
    def test_within_fits(self, timeout: float, rto: float) -> None:
        """within(): gives up exactly at the timeout, keeps doubling, waits at least an RTO after the last send."""
        p = RetransmitPolicy.within(timeout, rto)
        self.assertAlmostEqual(p.give_up_after(), timeout, places=6)
        times = p.send_times()
        self.assertEqual(times[0], 0)
        for a, b, c in zip(times, times[1:], times[2:]):
            self.assertAlmostEqual(c - b, 2 * (b - a), places=6)
        self.assertGreaterEqual(p.rm, 1 - 1e-6)
        # One more doubling would not have left an RTO to wait.
        self.assertGreater(p.rto * (2**p.rc - 1) + p.rto, timeout - 1e-6)


class TransactionTests(SynchronousTestCase):
    def test_interface(self) -> None:
        _, _, client = make()
        self.assertTrue(verifyObject(IStunClient, client))

    def test_retransmits_on_schedule_then_times_out(self) -> None:
        clock, sent, client = make()
        d = client.request(binding_request(), SERVER)
        clock.pump([0.25] * 200)
        self.assertEqual(sent.times, [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        self.assertEqual({a for _, _, a in sent.sent}, {SERVER})
        self.assertEqual(len({data for _, data, _ in sent.sent}), 1)  # identical retransmissions
        f = self.failureResultOf(d, StunTimeout)
        self.assertEqual(f.value.attempts, 7)
        self.assertEqual(f.value.waited, 39.5)
        self.assertEqual(client.stats.timeouts, 1)
        self.assertEqual(client.stats.retransmissions, 6)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_not_before_the_deadline(self) -> None:
        clock, sent, client = make(RetransmitPolicy(rto=0.1, rc=3, rm=4))
        d = client.request(binding_request(), SERVER)
        clock.advance(0.1)
        clock.advance(0.2)
        self.assertEqual([round(t, 9) for t in sent.times], [0, 0.1, 0.3])
        clock.advance(0.39)
        self.assertNoResult(d)
        clock.advance(0.01)
        self.failureResultOf(d, StunTimeout)

    def test_per_request_policy(self) -> None:
        clock, sent, client = make()
        d = client.request(binding_request(), SERVER, RetransmitPolicy(rto=1, rc=2, rm=1))
        clock.pump([1, 1, 1])
        self.assertEqual(sent.times, [0, 1])
        self.failureResultOf(d, StunTimeout)

    def test_response_matched_by_transaction_id(self) -> None:
        clock, sent, client = make()
        req = binding_request()
        other = binding_request()
        d = client.request(req, SERVER)
        d2 = client.request(other, SERVER)
        clock.advance(0.5)
        self.assertTrue(client.handle(success(req), ("203.0.113.9", 3479)))
        message, source = self.successResultOf(d)
        self.assertEqual(message.transaction_id, req.transaction_id)
        self.assertEqual(source, ("203.0.113.9", 3479))  # any source: RFC 5780 answers come from elsewhere
        self.assertEqual(mapped_address(message), ("198.51.100.7", 40000))
        self.assertNoResult(d2)
        self.assertEqual(client.pending, 1)
        # No more retransmissions of the answered request.
        before = len(sent.sent)
        clock.advance(1.0)
        self.assertEqual(
            [data for _, data, _ in sent.sent[before:]],
            [other.encode(fingerprint=True)],
        )

    def test_error_response(self) -> None:
        _, _, client = make()
        req = binding_request()
        d = client.request(req, SERVER)
        reply = req.reply(m.MessageClass.ERROR, [m.ErrorCode(420, "Unknown Attribute")]).encode()
        self.assertTrue(client.handle(reply, SERVER))
        f = self.failureResultOf(d, StunErrorResponse)
        self.assertEqual((f.value.code, f.value.reason), (420, "Unknown Attribute"))
        self.assertEqual(client.stats.error_responses, 1)

    def test_cancel_stops_timers(self) -> None:
        clock, sent, client = make()
        d = client.request(binding_request(), SERVER)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(100)
        self.assertEqual(len(sent.sent), 1)
        self.assertEqual(client.stats.cancelled, 1)
        self.assertEqual(client.pending, 0)

    def test_duplicate_and_late_responses_consumed(self) -> None:
        """Answers to retransmissions after the first answer are ours: consumed, counted."""
        _, _, client = make()
        req = binding_request()
        d = client.request(req, SERVER)
        self.assertTrue(client.handle(success(req), SERVER))
        self.assertTrue(client.handle(success(req), SERVER))
        self.successResultOf(d)
        self.assertEqual(client.stats.late, 1)
        self.assertEqual(client.stats.responses, 1)

    def test_recent_memory_is_bounded(self) -> None:
        _, _, client = make()
        first = binding_request()
        for req in [first] + [binding_request() for _ in range(RECENT_TRANSACTIONS)]:
            d = client.request(req, SERVER)
            d.cancel()
            self.failureResultOf(d, defer.CancelledError)
        self.assertFalse(client.handle(success(first), SERVER))
        self.assertEqual(client.stats.unmatched, 1)

    def test_handle_leaves_what_is_not_ours(self) -> None:
        """The demux contract: False for everything that did not answer our transactions."""
        _, _, client = make()
        req = binding_request()
        d = client.request(req, SERVER)
        stranger = binding_request()
        garbled = bytearray(success(req))
        garbled[-1] ^= 0xFF  # breaks the FINGERPRINT
        for data in (
            b"\xce\x01punch packet",
            b"",
            bytes(garbled),
            success(stranger),  # unknown transaction
            binding_request().encode(),  # a request (e.g. a peer's check)
            m.Message(m.Method.BINDING, m.MessageClass.INDICATION, os.urandom(12)).encode(),
        ):
            self.assertFalse(client.handle(data, SERVER), data)
        self.assertNoResult(d)
        self.assertEqual(
            (client.stats.malformed, client.stats.unmatched, client.stats.not_responses),
            (1, 1, 2),
        )

    @given(st.binary(max_size=120), st.booleans())
    def test_any_datagram_is_handled_without_raising(self, data: bytes, stunlike: bool) -> None:
        _, _, client = make()
        req = binding_request()
        d = client.request(req, SERVER)
        if stunlike and len(data) >= 20:  # keep the header plausible, garble the rest
            data = success(req)[:8] + data[8:]
        consumed = client.handle(data, SERVER)
        self.assertIsInstance(consumed, bool)
        if consumed:
            message, _ = self.successResultOf(d)
            self.assertEqual(message.transaction_id, req.transaction_id)
        else:
            self.assertNoResult(d)
            d.cancel()
            self.failureResultOf(d, defer.CancelledError)

    def test_rfc3489_cookie_is_not_a_match(self) -> None:
        _, _, client = make()
        req = binding_request()
        d = client.request(req, SERVER)
        old = m.Message(
            m.Method.BINDING,
            m.MessageClass.SUCCESS,
            req.transaction_id,
            (m.MappedAddress("198.51.100.7", 1),),
            cookie=0x01020304,
        )
        self.assertFalse(client.handle(old.encode(), SERVER))
        self.assertNoResult(d)

    def test_rejects_bad_requests(self) -> None:
        _, _, client = make()
        req = binding_request()
        client.request(req, SERVER)
        self.assertRaises(ValueError, client.request, req, SERVER)
        reply = req.reply(m.MessageClass.SUCCESS, [])
        self.assertRaises(ValueError, client.request, reply, SERVER)

    def test_send_error_is_like_a_loss(self) -> None:
        clock = Clock()
        calls = []

        def send(data, addr):
            calls.append(clock.seconds())
            raise OSError("ECONNREFUSED")

        client = StunClient(send, clock, RetransmitPolicy(rto=1, rc=2, rm=1))
        d = client.request(binding_request(), SERVER)
        clock.pump([1, 1])
        self.assertEqual(calls, [0, 1])
        self.failureResultOf(d, StunTimeout)

    def test_synchronous_answer(self) -> None:
        """A send() that answers at once (as in-memory fakes do) leaves no timer behind."""
        clock = Clock()
        holder: list[StunClient] = []

        def send(data, addr):
            holder[0].handle(success(m.decode(data)), addr)

        holder.append(StunClient(send, clock))
        d = holder[0].request(binding_request(), SERVER)
        self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_reliable_sends_once(self) -> None:
        clock, sent, client = make(RetransmitPolicy(ti=39.5), reliable=True)
        d = client.request(binding_request(), None)
        clock.advance(39.4)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.failureResultOf(d, StunTimeout)
        self.assertEqual(sent.times, [0])

    def test_fail_all(self) -> None:
        _, _, client = make()
        d1 = client.request(binding_request(), SERVER)
        d2 = client.request(binding_request(), SERVER)
        client.failAll(Failure(ConnectionDone()))
        self.failureResultOf(d1, ConnectionDone)
        self.failureResultOf(d2, ConnectionDone)
        self.assertEqual(client.pending, 0)

    def test_fingerprint_option(self) -> None:
        _, sent, client = make(fingerprint=False)
        client.request(binding_request(), SERVER)
        self.assertIsNone(m.decode(sent.sent[0][1]).get(m.Fingerprint))
        _, sent, client = make()
        client.request(binding_request(), SERVER)
        self.assertIsNotNone(m.decode(sent.sent[0][1]).get(m.Fingerprint))

    def test_attribute_helpers(self) -> None:
        req = binding_request()
        plain = req.reply(m.MessageClass.SUCCESS, [m.MappedAddress("192.0.2.5", 7), m.ChangedAddress("192.0.2.6", 8)])
        self.assertEqual(mapped_address(plain), ("192.0.2.5", 7))
        self.assertEqual(other_address(plain), ("192.0.2.6", 8))
        self.assertIsNone(mapped_address(req))
        self.assertEqual(format_address(("::1", 3478)), "[::1]:3478")
        self.assertEqual(format_address(("127.0.0.1", 3478)), "127.0.0.1:3478")


class UDPProtocolTests(SynchronousTestCase):
    def test_request_and_answer(self) -> None:
        reactor = MemoryUDPReactor()
        proto = StunUDPProtocol(reactor)
        transport = reactor.listenUDP(40000, proto, interface="10.0.0.2")
        req = binding_request()
        d = proto.request(req, SERVER)
        self.assertEqual(transport.written, [(req.encode(fingerprint=True), SERVER)])
        proto.datagramReceived(b"not stun", SERVER)  # dropped, not raised
        proto.datagramReceived(success(req), SERVER)
        self.assertEqual(mapped_address(self.successResultOf(d)[0]), ("198.51.100.7", 40000))

    def test_closing_fails_pending(self) -> None:
        reactor = MemoryUDPReactor()
        proto = StunUDPProtocol(reactor)
        port = reactor.listenUDP(0, proto)
        d = proto.request(binding_request(), SERVER)
        port.stopListening()
        self.failureResultOf(d, ConnectionError)

    def test_as_the_stun_child_of_the_punch_mux(self) -> None:
        """On a socket shared with punch traffic (natbypass.punch.mux.UDPMux)."""
        reactor = MemoryUDPReactor()
        stun = StunUDPProtocol(reactor)
        seen = []

        class Other(DatagramProtocol):
            def datagramReceived(self, data, addr):
                seen.append(data)

        mux = UDPMux()
        mux.setSTUN(stun)
        mux.setOther(Other())
        transport = reactor.listenUDP(40000, mux, interface="10.0.0.2")
        req = binding_request()
        d = stun.request(req, SERVER)
        self.assertEqual(transport.written, [(req.encode(fingerprint=True), SERVER)])
        mux.datagramReceived(b"\xce punch", SERVER)
        mux.datagramReceived(success(req), SERVER)
        self.successResultOf(d)
        self.assertEqual(seen, [b"\xce punch"])

    def test_not_open(self) -> None:
        """Without a socket every send fails like a loss; the transaction times out."""
        clock = Clock()
        proto = StunUDPProtocol(clock, RetransmitPolicy(rto=1, rc=1, rm=1))
        d = proto.request(binding_request(), SERVER)
        clock.advance(1)
        self.failureResultOf(d, StunTimeout)


# ------------------------------------------------------------------- TCP

messages = st.builds(
    lambda txid, n, cls: m.Message(m.Method.BINDING, cls, txid, tuple(m.Software("x" * k) for k in n)).encode(),
    st.binary(min_size=12, max_size=12),
    st.lists(st.integers(0, 40), max_size=3),
    st.sampled_from(list(m.MessageClass)),
)


class FramerTests(SynchronousTestCase):
    @given(st.lists(messages, min_size=1, max_size=5), st.data())
    @settings(max_examples=200)
    def test_any_chunking_gives_the_messages_back(self, msgs, data) -> None:
        stream = b"".join(msgs)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
        framer = StunStreamFramer()
        frames = []
        for a, b in zip([0] + cuts, cuts + [len(stream)]):
            frames += framer.feed(stream[a:b])
        self.assertEqual(frames, msgs)
        self.assertEqual(framer.buffered, 0)

    @given(st.binary(min_size=20, max_size=60))
    def test_garbage_raises_only_framing_error(self, data) -> None:
        framer = StunStreamFramer()
        try:
            frames = framer.feed(data)
        except StunFramingError:
            return
        for f in frames:
            self.assertTrue(m.is_stun(f) or len(f) % 4 == 0)

    def test_rejects_non_stun(self) -> None:
        self.assertRaises(StunFramingError, StunStreamFramer().feed, b"GET / HTTP/1.1\r\n\r\n\0\0")
        bad_length = bytearray(binding_request().encode())
        bad_length[3] = 3
        self.assertRaises(StunFramingError, StunStreamFramer().feed, bytes(bad_length))


class TCPProtocolTests(SynchronousTestCase):
    def connect(self):
        clock = Clock()
        proto = StunTCPProtocol(clock, RetransmitPolicy(ti=5))
        transport = StringTransport(peerAddress=None)
        proto.makeConnection(transport)
        return clock, proto, transport

    def test_request_over_stream(self) -> None:
        clock, proto, transport = self.connect()
        req = binding_request()
        d = proto.request(req)
        self.assertEqual(transport.value(), req.encode(fingerprint=True))
        reply = success(req)
        for i in range(len(reply)):  # byte by byte
            proto.dataReceived(reply[i : i + 1])
        self.assertEqual(mapped_address(self.successResultOf(d)[0]), ("198.51.100.7", 40000))
        clock.advance(10)  # no retransmission over TCP
        self.assertEqual(transport.value(), req.encode(fingerprint=True))

    def test_timeout(self) -> None:
        clock, proto, _ = self.connect()
        d = proto.request(binding_request())
        clock.advance(5)
        self.failureResultOf(d, StunTimeout)

    def test_lost_framing_aborts(self) -> None:
        _, proto, transport = self.connect()
        d = proto.request(binding_request())
        proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ConnectionDone)

    def test_request_when_closed(self) -> None:
        _, proto, _ = self.connect()
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(proto.request(binding_request()), ConnectionError)

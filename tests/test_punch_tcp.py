"""Tests for natbypass.punch.tcp: TCP simultaneous open and its handshake."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass.interfaces import IPeerConnection, IPeerReceiver
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.tcp import (
    FRAME,
    TCPAuthError,
    TCPHandshake,
    TCPPeerConnection,
    TCPPunchAttempt,
    _HandshakeProtocol,
    accept_frame,
    hello_frame,
    parse_frame,
    reusable_socket,
)

KEY = b"k" * 32
S0 = PunchSession("sess-7", KEY, 0, peer_id="bob")
S1 = PunchSession("sess-7", KEY, 1, peer_id="alice")
N0, N1 = b"0" * 16, b"1" * 16


@implementer(IPeerReceiver)
class Receiver:
    def __init__(self) -> None:
        self.data = b""
        self.lost = []
        self.got = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.got.called:
            self.got.callback(None)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class HandshakeTests(SynchronousTestCase):
    def test_exchange(self) -> None:
        h0, h1 = TCPHandshake(S0, N0), TCPHandshake(S1, N1)
        self.assertEqual(h0.start(), b"")
        hello = h1.start()
        self.assertEqual(len(hello), FRAME.size)
        # HELLO arrives in two pieces, followed by nothing.
        self.assertEqual(h0.dataReceived(hello[:10]), b"")
        self.assertEqual(h0.state, "waiting")
        self.assertEqual(h0.dataReceived(hello[10:]), b"")
        self.assertEqual(h0.state, "verified")
        accept = h0.accept()
        self.assertEqual(h0.state, "done")
        # ACCEPT followed by the first application bytes.
        self.assertEqual(h1.dataReceived(accept + b"app data"), b"app data")
        self.assertEqual(h1.state, "done")

    def test_wrong_key(self) -> None:
        h0 = TCPHandshake(S0, N0)
        other = PunchSession("sess-7", b"x" * 32, 1)
        h0.dataReceived(hello_frame(other, N1))
        self.assertEqual(h0.state, "failed")
        self.assertIn("MAC", h0.error)

    def test_wrong_session(self) -> None:
        h0 = TCPHandshake(S0, N0)
        h0.dataReceived(hello_frame(PunchSession("sess-8", KEY, 1), N1))
        self.assertEqual(h0.state, "failed")

    def test_accept_must_cover_our_nonce(self) -> None:
        """An ACCEPT recorded on another connection (other nonce) is refused."""
        h1 = TCPHandshake(S1, N1)
        h1.dataReceived(accept_frame(S0, N0, b"2" * 16))
        self.assertEqual(h1.state, "failed")

    def test_reflection_refused(self) -> None:
        """Role 1's own HELLO echoed back to it does not pass."""
        h1 = TCPHandshake(S1, N1)
        h1.dataReceived(h1.start())
        self.assertEqual(h1.state, "failed")

    def test_not_a_peer(self) -> None:
        h0 = TCPHandshake(S0, N0)
        h0.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 40)
        self.assertEqual(h0.state, "failed")
        self.assertIn("magic", h0.error)

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(max_size=120))
    def test_parse_arbitrary_bytes(self, raw: bytes) -> None:
        try:
            frame = parse_frame(raw)
        except TCPAuthError:
            return
        self.assertEqual(len(raw), FRAME.size)
        self.assertIn((frame.type, frame.role), [(1, 1), (2, 0)])

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16))
    def test_round_trip_verifies(self, n0: bytes, n1: bytes) -> None:
        h0, h1 = TCPHandshake(S0, n0), TCPHandshake(S1, n1)
        h0.dataReceived(h1.start())
        h1.dataReceived(h0.accept())
        self.assertEqual((h0.state, h1.state), ("done", "done"))


class AttemptWithFakeTransportTests(SynchronousTestCase):
    """The attempt's handshake bookkeeping over iosim, no sockets."""

    def attempt(self, session):
        clock = MemoryReactorClock()
        a = TCPPunchAttempt(clock, session, ("127.0.0.1", 1), [], keepalive_interval=None, handshake_timeout=2.0)
        results = []
        a.deferred.addBoth(results.append)
        return clock, a, results

    def test_authenticated_pair(self) -> None:
        c0, a0, r0 = self.attempt(S0)
        c1, a1, r1 = self.attempt(S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump = iosim.connect(p0, iosim.FakeTransport(p0, True), p1, iosim.FakeTransport(p1, False))
        (conn0,), (conn1,) = r0, r1
        self.assertIsInstance(conn0, TCPPeerConnection)
        verifyObject(IPeerConnection, conn0)
        self.assertEqual((conn0.role, conn1.role, conn0.delivery), (0, 1, "stream"))
        rec0, rec1 = Receiver(), Receiver()
        conn1.send(b"before the receiver")
        pump.flush()
        conn0.setReceiver(rec0)
        conn1.setReceiver(rec1)
        conn0.send(b"pong")
        pump.flush()
        self.assertEqual((rec0.data, rec1.data), (b"before the receiver", b"pong"))
        lost = conn1.whenLost()
        conn0.close()
        pump.flush()
        rec1.lost[0].trap(ConnectionDone)
        self.assertIsInstance(self.successResultOf(lost), ConnectionDone)

    def test_impostor_rejected_then_real_peer_wins(self) -> None:
        c0, a0, r0 = self.attempt(S0)
        evil = PunchSession("sess-7", b"e" * 32, 1)
        _, ae, _ = self.attempt(evil)
        p0, pe = _HandshakeProtocol(a0, "accepted"), _HandshakeProtocol(ae, "evil")
        t0 = iosim.FakeTransport(p0, True)
        iosim.connect(p0, t0, pe, iosim.FakeTransport(pe, False))
        self.assertEqual((r0, a0.invalid), ([], 1))
        self.assertTrue(t0.disconnecting)
        _, a1, r1 = self.attempt(S1)
        q0, q1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        iosim.connect(q0, iosim.FakeTransport(q0, True), q1, iosim.FakeTransport(q1, False))
        self.assertIsInstance(r0[0], TCPPeerConnection)

    def test_silent_connection_times_out(self) -> None:
        c0, a0, r0 = self.attempt(S0)
        p0 = _HandshakeProtocol(a0, "accepted")
        t = iosim.FakeTransport(p0, True)
        p0.makeConnection(t)
        c0.advance(1.9)
        self.assertFalse(t.disconnecting)
        c0.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(a0.invalid, 1)

    def test_only_one_connection_picked(self) -> None:
        """Role 0 answers HELLO on the first connection only and closes the second."""
        c0, a0, r0 = self.attempt(S0)
        _, a1, r1 = self.attempt(S1)
        first, second = _HandshakeProtocol(a0, "one"), _HandshakeProtocol(a0, "two")
        t_second = iosim.FakeTransport(second, True)
        second.makeConnection(t_second)
        q1 = _HandshakeProtocol(a1, "one")
        iosim.connect(first, iosim.FakeTransport(first, True), q1, iosim.FakeTransport(q1, False))
        self.assertEqual(len(r0), 1)
        self.assertTrue(t_second.disconnecting)

    def test_window_expires_with_reason(self) -> None:
        clock = MemoryReactorClock()
        a = TCPPunchAttempt(clock, S0, ("127.0.0.1", 1), [], start_delay=0.5, window=3.0)
        clock.advance(3.4)
        self.assertNoResult(a.deferred)
        clock.advance(0.2)
        f = self.failureResultOf(a.deferred, PunchFailed)
        self.assertIn("within 3 s", f.value.reason)

    def test_one_acceptor_per_listener(self) -> None:
        clock = MemoryReactorClock()
        listener = reusable_socket(("127.0.0.1", 0), listen=True)
        self.addCleanup(listener.close)
        first = TCPPunchAttempt(clock, S0, ("127.0.0.1", 1), [], listener=listener)
        second = TCPPunchAttempt(clock, S1, ("127.0.0.1", 1), [], listener=listener)
        self.assertEqual(len(clock.getReaders()), 1)
        first.deferred.cancel()
        self.failureResultOf(first.deferred)
        self.assertEqual(clock.getReaders(), [])
        third = TCPPunchAttempt(clock, S1, ("127.0.0.1", 1), [], listener=listener)
        self.assertEqual(len(clock.getReaders()), 1)
        for a in (second, third):
            a.deferred.cancel()
            self.failureResultOf(a.deferred)

    def test_cancel(self) -> None:
        clock = MemoryReactorClock()
        a = TCPPunchAttempt(clock, S0, ("127.0.0.1", 1), [])
        a.deferred.cancel()
        self.failureResultOf(a.deferred, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

"""Tests for natbypass.punch.tcp: TCP simultaneous open and its handshake."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass.identity import Identity
from natbypass.interfaces import IPeerConnection, IPeerReceiver
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.tcp import (
    FRAME,
    HandshakeState,
    TCPAuthError,
    TCPHandshake,
    TCPPeerConnection,
    TCPPunchAttempt,
    _HandshakeProtocol,
    accept_frame,
    challenge_frame,
    hello_frame,
    parse_frame,
    reusable_socket,
)
from natbypass.secure import ChannelSecurity
from natbypass.trust import pinned

KEY = b"k" * 32
S0 = PunchSession("sess-7", KEY, 0, peer_id="bob")
S1 = PunchSession("sess-7", KEY, 1, peer_id="alice")
N0, N1 = b"0" * 16, b"1" * 16
ALICE, BOB = Identity.generate(), Identity.generate()
#: Role 0 is alice (S0 talks to bob), role 1 is bob.
SEC0 = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
SEC1 = ChannelSecurity(BOB, pinned(ALICE.fingerprint))
SECURITY = {0: SEC0, 1: SEC1}


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
        self.assertEqual(h1.start(), b"")
        challenge = h0.start()
        self.assertEqual(len(challenge), FRAME.size)
        # CHALLENGE arrives in two pieces; role 1 answers with HELLO at once.
        self.assertEqual(h1.dataReceived(challenge[:10]).send, b"")
        self.assertEqual(h1.state, HandshakeState.WAITING)
        hello = h1.dataReceived(challenge[10:]).send
        self.assertEqual((len(hello), h1.state), (FRAME.size, HandshakeState.ANSWERED))
        out = h0.dataReceived(hello)
        self.assertEqual((out.send, out.rest, h0.state), (b"", b"", HandshakeState.VERIFIED))
        accept = h0.accept()
        self.assertEqual(h0.state, HandshakeState.DONE)
        # ACCEPT followed by the first TLS bytes.
        out = h1.dataReceived(accept + b"\x16\x03\x01 ClientHello")
        self.assertEqual((out.send, out.rest, h1.state), (b"", b"\x16\x03\x01 ClientHello", HandshakeState.DONE))

    def test_frames_cover_both_nonces(self) -> None:
        self.assertEqual(parse_frame(hello_frame(S1, N1, N0)).nonce, N1)
        self.assertNotEqual(hello_frame(S1, N1, N0), hello_frame(S1, N1, b"2" * 16))
        self.assertNotEqual(accept_frame(S0, N0, N1), accept_frame(S0, N0, b"2" * 16))

    def test_wrong_key(self) -> None:
        h0 = TCPHandshake(S0, N0)
        other = PunchSession("sess-7", b"x" * 32, 1)
        h0.dataReceived(hello_frame(other, N1, N0))
        self.assertEqual(h0.state, HandshakeState.FAILED)
        self.assertIn("MAC", h0.error)

    def test_role_1_ignores_unauthenticated_challenge(self) -> None:
        """Role 1 MACs nothing for a host that does not know the session key."""
        h1 = TCPHandshake(S1, N1)
        out = h1.dataReceived(challenge_frame(PunchSession("sess-7", b"x" * 32, 0), N0))
        self.assertEqual((out.send, h1.state), (b"", HandshakeState.FAILED))

    def test_wrong_session(self) -> None:
        h0 = TCPHandshake(S0, N0)
        h0.dataReceived(hello_frame(PunchSession("sess-8", KEY, 1), N1, N0))
        self.assertEqual(h0.state, HandshakeState.FAILED)

    def test_hello_must_cover_our_nonce(self) -> None:
        """A HELLO made for another connection's CHALLENGE (a replay) is refused."""
        h0 = TCPHandshake(S0, N0)
        h0.dataReceived(hello_frame(S1, N1, b"2" * 16))
        self.assertEqual(h0.state, HandshakeState.FAILED)
        self.assertIn("replay", h0.error)

    def test_accept_must_cover_our_nonce(self) -> None:
        """An ACCEPT recorded on another connection (other nonce) is refused."""
        h1 = TCPHandshake(S1, N1)
        h1.dataReceived(challenge_frame(S0, N0))
        h1.dataReceived(accept_frame(S0, N0, b"2" * 16))
        self.assertEqual(h1.state, HandshakeState.FAILED)

    def test_accept_must_name_this_challenge(self) -> None:
        h1 = TCPHandshake(S1, N1)
        h1.dataReceived(challenge_frame(S0, N0))
        h1.dataReceived(accept_frame(S0, b"2" * 16, N1))
        self.assertEqual(h1.state, HandshakeState.FAILED)
        self.assertIn("another CHALLENGE", h1.error)

    def test_reflection_refused(self) -> None:
        """Role 0's CHALLENGE, and role 1's HELLO, echoed back to their sender do not pass."""
        h0 = TCPHandshake(S0, N0)
        h0.dataReceived(h0.start())
        self.assertEqual(h0.state, HandshakeState.FAILED)
        self.assertIn("reflection", h0.error)
        h1 = TCPHandshake(S1, N1)
        hello = h1.dataReceived(challenge_frame(S0, N0)).send
        h1.dataReceived(hello)
        self.assertEqual(h1.state, HandshakeState.FAILED)
        self.assertIn("reflection", h1.error)

    def test_out_of_order_refused(self) -> None:
        """ACCEPT before any CHALLENGE, or bytes after HELLO before ACCEPT, fail."""
        h1 = TCPHandshake(S1, N1)
        h1.dataReceived(accept_frame(S0, N0, N1))
        self.assertEqual(h1.state, HandshakeState.FAILED)
        h0 = TCPHandshake(S0, N0)
        h0.dataReceived(hello_frame(S1, N1, N0) + b"x")
        self.assertEqual(h0.state, HandshakeState.FAILED)

    def test_not_a_peer(self) -> None:
        h0 = TCPHandshake(S0, N0)
        h0.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 40)
        self.assertEqual(h0.state, HandshakeState.FAILED)
        self.assertIn("magic", h0.error)

    def test_nonce_size(self) -> None:
        self.assertRaises(ValueError, TCPHandshake, S0, b"short")

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(max_size=120))
    def test_parse_arbitrary_bytes(self, raw: bytes) -> None:
        try:
            frame = parse_frame(raw)
        except TCPAuthError:
            return
        self.assertEqual(len(raw), FRAME.size)
        self.assertIn((frame.type, frame.role), [(1, 0), (2, 1), (3, 0)])

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(max_size=200), st.booleans())
    def test_arbitrary_bytes_never_verify(self, raw: bytes, as_role_1: bool) -> None:
        h = TCPHandshake(S1 if as_role_1 else S0, N1 if as_role_1 else N0)
        h.dataReceived(raw)
        self.assertIn(h.state, (HandshakeState.WAITING, HandshakeState.FAILED))

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(1, 60))
    def test_round_trip_verifies(self, n0: bytes, n1: bytes, cut: int) -> None:
        h0, h1 = TCPHandshake(S0, n0), TCPHandshake(S1, n1)
        challenge = h0.start()
        hello = h1.dataReceived(challenge[:cut]).send + h1.dataReceived(challenge[cut:]).send
        h0.dataReceived(hello)
        h1.dataReceived(h0.accept())
        self.assertEqual((h0.state, h1.state), (HandshakeState.DONE, HandshakeState.DONE))


def attempt(clock, session, security=None, **kw):
    """A role's attempt on C{clock}, with no candidates (connections are made by hand), and its results."""
    kw.setdefault("keepalive_interval", None)
    security = security if security is not None else SECURITY[session.role]
    a = TCPPunchAttempt(clock, session, ("127.0.0.1", 1), [], security=security, **kw)
    results: list = []
    a.deferred.addBoth(results.append)
    return a, results


def join(clock, p0, p1, t0=None, t1=None, flush=True) -> iosim.IOPump:
    """Connect two protocols over iosim (C{p0} the server end); run until quiet unless told not to."""
    t0 = t0 if t0 is not None else iosim.FakeTransport(p0, True)
    t1 = t1 if t1 is not None else iosim.FakeTransport(p1, False)
    return iosim.connect(p0, t0, p1, t1, clock=clock, greet=flush)


class Sender(Protocol):
    """A host that sends fixed bytes as soon as it is connected, and records what it gets."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class AttemptWithFakeTransportTests(SynchronousTestCase):
    """The attempt's handshake bookkeeping over iosim, no sockets."""

    def test_authenticated_pair(self) -> None:
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump = join(clock, p0, p1)
        (conn0,), (conn1,) = r0, r1
        self.assertIsInstance(conn0, TCPPeerConnection)
        verifyObject(IPeerConnection, conn0)
        self.assertEqual((conn0.role, conn1.role, conn0.delivery, conn0.secure), (0, 1, "stream", True))
        self.assertEqual((conn0.peer_fingerprint, conn1.peer_fingerprint), (BOB.fingerprint, ALICE.fingerprint))
        self.assertRegex(conn0.cipher, r"^TLSv1\.3 TLS_")
        self.assertEqual(conn0.cipher, conn1.cipher)
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
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_handshake_ms_on_the_attempt_clock(self) -> None:
        """handshake_ms runs from the connected socket to both sides proven, on the injected clock."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump = join(clock, p0, p1, flush=False)
        flights = 0
        while not (r0 and r1):
            clock.advance(0.010)  # every flight takes 10 ms
            pump.pump()
            flights += 1
        (conn0,), (conn1,) = r0, r1
        # Session handshake 2 flights, TLS 3, confirmation 1: 6 flights (3 RTT) for role 0, 5 for role 1.
        self.assertEqual(flights, 6)
        self.assertAlmostEqual(conn0.handshake_ms, 60, delta=1)
        self.assertLess(conn1.handshake_ms, conn0.handshake_ms)

    def test_impostor_rejected_then_real_peer_wins(self) -> None:
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        evil = PunchSession("sess-7", b"e" * 32, 1)
        p0, pe = _HandshakeProtocol(a0, "accepted"), Sender(hello_frame(evil, N1, N0))
        t0 = iosim.FakeTransport(p0, True)
        join(clock, p0, pe, t0=t0)
        self.assertEqual((r0, a0.invalid), ([], 1))
        self.assertTrue(t0.disconnecting)
        # A peer with another key, running the real handshake, gets no HELLO out of role 1 either.
        a1, r1 = attempt(clock, S1)
        ae, _ = attempt(clock, PunchSession("sess-7", b"e" * 32, 0))
        q1, qe = _HandshakeProtocol(a1, "accepted"), _HandshakeProtocol(ae, "evil")
        t1 = iosim.FakeTransport(q1, True)
        join(clock, q1, qe, t0=t1)
        self.assertEqual((r1, a1.invalid), ([], 1))
        self.assertTrue(t1.disconnecting)
        q0, q1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        join(clock, q0, q1)
        self.assertIsInstance(r0[0], TCPPeerConnection)
        self.assertIsInstance(r1[0], TCPPeerConnection)

    def test_silent_connection_times_out(self) -> None:
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, handshake_timeout=2.0)
        p0 = _HandshakeProtocol(a0, "accepted")
        t = iosim.FakeTransport(p0, True)
        p0.makeConnection(t)
        clock.advance(1.9)
        self.assertFalse(t.disconnecting)
        clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(a0.invalid, 1)

    def test_only_one_connection_picked(self) -> None:
        """Role 0 answers HELLO on the first connection only and closes the second."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        first, second = _HandshakeProtocol(a0, "one"), _HandshakeProtocol(a0, "two")
        t_second = iosim.FakeTransport(second, True)
        second.makeConnection(t_second)
        q1 = _HandshakeProtocol(a1, "one")
        join(clock, first, q1)
        self.assertEqual(len(r0), 1)
        self.assertTrue(t_second.disconnecting)

    def test_cancel_during_tls(self) -> None:
        """Cancelling after the session handshake chose a connection aborts it and leaves no timer."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        t0 = iosim.FakeTransport(p0, True)
        pump = join(clock, p0, p1, t0=t0, flush=False)
        pump.pump()  # CHALLENGE
        pump.pump()  # HELLO: role 0 chose, sends ACCEPT + ClientHello; TLS runs
        self.assertIsNotNone(p0.tls)
        self.assertEqual(r0, [])
        a0.deferred.cancel()
        self.assertTrue(t0.disconnecting)
        pump.flush()
        r0[0].trap(defer.CancelledError)
        self.assertEqual(len(r0), 1)

    def test_tls_timeout(self) -> None:
        """A peer that passes the session handshake, then stalls TLS, fails the attempt in handshake_timeout."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, handshake_timeout=2.0)
        a1, _ = attempt(clock, S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        t0 = iosim.FakeTransport(p0, True)
        pump = join(clock, p0, p1, t0=t0, flush=False)
        pump.pump()  # CHALLENGE
        pump.pump()  # HELLO: role 0 chose
        self.assertIsNotNone(p0.tls)
        clock.advance(2.1)  # role 1's ServerHello never delivered (nothing pumped)
        self.assertTrue(t0.disconnecting)
        f = r0[0]
        f.trap(PunchFailed)
        self.assertIn("TLS did not complete within 2 s", f.value.reason)

    def test_window_expires_with_reason(self) -> None:
        clock = MemoryReactorClock()
        a = TCPPunchAttempt(clock, S0, ("127.0.0.1", 1), [], start_delay=0.5, window=3.0, security=SEC0)
        clock.advance(3.4)
        self.assertNoResult(a.deferred)
        clock.advance(0.2)
        f = self.failureResultOf(a.deferred, PunchFailed)
        self.assertIn("within 3 s", f.value.reason)

    def test_one_acceptor_per_listener(self) -> None:
        clock = MemoryReactorClock()
        listener = reusable_socket(("127.0.0.1", 0), listen=True)
        self.addCleanup(listener.close)
        first = TCPPunchAttempt(clock, S0, ("127.0.0.1", 1), [], listener=listener, security=SEC0)
        second = TCPPunchAttempt(clock, S1, ("127.0.0.1", 1), [], listener=listener, security=SEC1)
        self.assertEqual(len(clock.getReaders()), 1)
        first.deferred.cancel()
        self.failureResultOf(first.deferred)
        self.assertEqual(clock.getReaders(), [])
        third = TCPPunchAttempt(clock, S1, ("127.0.0.1", 1), [], listener=listener, security=SEC1)
        self.assertEqual(len(clock.getReaders()), 1)
        for a in (second, third):
            a.deferred.cancel()
            self.failureResultOf(a.deferred)

    def test_cancel(self) -> None:
        clock = MemoryReactorClock()
        a = TCPPunchAttempt(clock, S0, ("127.0.0.1", 1), [], security=SEC0)
        a.deferred.cancel()
        self.failureResultOf(a.deferred, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

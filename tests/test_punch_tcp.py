"""Tests for natbypass.punch.tcp: TLS on every connection, SELECT, and the attempt that picks one."""

from __future__ import annotations

import errno
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.identity import Identity
from natbypass.interfaces import IPeerConnection
from natbypass.punch.candidates import SYN_BYTES, TokenBucket
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.tcp import (
    ABORT_LINGER,
    MAX_TRIES,
    MAX_TRIES_PER_CANDIDATE,
    MIN_TRY_FRACTION,
    SELECT,
    SelectError,
    TCPPeerConnection,
    TCPPunchAttempt,
    _HandshakeProtocol,
    check_select,
    connect_timeout_at,
    reusable_socket,
    select_record,
)
from natbypass.secure import ChannelSecurity
from natbypass.secure.tls import PeerRefusedUs, start_tls
from natbypass.testing.connection import RecordingReceiver
from natbypass.trust import pinned

KEY = b"k" * 32
S0 = PunchSession("sess-7", KEY, 0, peer_id="bob")
S1 = PunchSession("sess-7", KEY, 1, peer_id="alice")
#: Two exporter values (two TLS connections).
X1, X2 = b"1" * 32, b"2" * 32
ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()
#: Role 0 is alice (S0 talks to bob), role 1 is bob.
SEC0 = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
SEC1 = ChannelSecurity(BOB, pinned(ALICE.fingerprint))
SECURITY = {0: SEC0, 1: SEC1}


class SelectTests(SynchronousTestCase):
    """The SELECT record: pure, strict, bound to the session and to one TLS channel."""

    def test_round_trip(self) -> None:
        record = select_record(S0, X1)
        self.assertEqual((len(record), record[:4]), (SELECT.size, b"NBT3"))
        check_select(S1, X1, record)  # both roles hold the same session

    def test_bound_to_the_channel(self) -> None:
        """A SELECT made for one TLS connection (exporter) is refused on any other."""
        self.assertRaises(SelectError, check_select, S1, X2, select_record(S0, X1))

    def test_bound_to_the_session(self) -> None:
        for other in (PunchSession("sess-8", KEY, 0), PunchSession("sess-7", b"x" * 32, 0)):
            e = self.assertRaises(SelectError, check_select, S1, X1, select_record(other, X1))
            self.assertIn("another session", str(e))

    def test_strict(self) -> None:
        record = select_record(S0, X1)
        for bad in (record[:-1], record + b"x", b"NBT2" + record[4:], b""):
            self.assertRaises(SelectError, check_select, S1, X1, bad)

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(max_size=80))
    def test_arbitrary_bytes_never_verify(self, raw: bytes) -> None:
        self.assertRaises(SelectError, check_select, S1, X1, raw)


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


class Silent(Protocol):
    """A host that completes TCP and never speaks TLS; records what it gets."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class AttemptWithFakeTransportTests(SynchronousTestCase):
    """The attempt over iosim, no sockets: TLS on every connection, SELECT on one."""

    def test_authenticated_pair(self) -> None:
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump = join(clock, p0, p1)
        (conn0,), (conn1,) = r0, r1
        self.assertIsInstance(conn0, TCPPeerConnection)
        verifyObject(IPeerConnection, conn0)
        self.assertEqual((conn0.role, conn1.role, conn0.delivery, conn0.secure), (0, 1, "datagram", True))
        self.assertEqual((conn0.peer_fingerprint, conn1.peer_fingerprint), (BOB.fingerprint, ALICE.fingerprint))
        self.assertRegex(conn0.cipher, r"^TLSv1\.3 TLS_")
        self.assertEqual(conn0.cipher, conn1.cipher)
        rec0, rec1 = RecordingReceiver(), RecordingReceiver()
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

    def test_one_rtt_for_role_0_and_a_half_more_for_role_1(self) -> None:
        """
        From the connected socket, on the injected clock, one flight every 10 ms
        (half a round trip): ClientHello; the server's flight, after which role 0
        is ready (1 RTT); role 0's Finished with SELECT, after which role 1 is
        ready (1.5 RTT).  handshake_ms says the same, and punched_at is the
        connected socket (the raw path, before TLS).
        """
        clock = MemoryReactorClock()
        connected = clock.seconds()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump = join(clock, p0, p1, flush=False)
        ready: dict[int, int] = {}
        flights = 0
        while len(ready) < 2 and flights < 10:
            clock.advance(0.010)
            pump.pump()
            flights += 1
            for role, results in ((0, r0), (1, r1)):
                if results and role not in ready:
                    ready[role] = flights
        self.assertEqual(ready, {0: 2, 1: 3})
        (conn0,), (conn1,) = r0, r1
        self.assertAlmostEqual(conn0.handshake_ms, 20, delta=1)
        self.assertAlmostEqual(conn1.handshake_ms, 30, delta=1)
        self.assertEqual((conn0.punched_at, conn1.punched_at), (connected, connected))

    def test_real_peer_wins_over_an_impostor(self) -> None:
        """
        Each side has two connections at once: one to a host that completes TCP
        but not TLS, one to the real peer.  The real one wins on both sides, the
        impostors are closed, and both sides hold the same connection.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        imp0, imp1 = Silent(), Silent()
        q0, q1 = _HandshakeProtocol(a0, "to impostor"), _HandshakeProtocol(a1, "to impostor")
        t_imp0, t_imp1 = iosim.FakeTransport(q0, True), iosim.FakeTransport(q1, False)
        pump_imp0 = join(clock, q0, imp0, t0=t_imp0, flush=False)
        pump_imp1 = join(clock, imp1, q1, t1=t_imp1, flush=False)
        p0, p1 = _HandshakeProtocol(a0, "to peer"), _HandshakeProtocol(a1, "to peer")
        t0, t1 = iosim.FakeTransport(p0, True), iosim.FakeTransport(p1, False)
        pump = join(clock, p0, p1, t0=t0, t1=t1, flush=False)
        for _ in range(5):
            for each in (pump_imp0, pump_imp1, pump):
                each.pump()
        (conn0,), (conn1,) = r0, r1
        self.assertTrue(t_imp0.disconnecting and t_imp1.disconnecting)
        self.assertFalse(t0.disconnecting or t1.disconnecting)
        self.assertEqual(imp0.received[:1], b"\x16")  # it got role 0's ClientHello, nothing after
        self.assertEqual(imp1.received, b"")  # role 1 (TLS server) says nothing to a silent client
        self.assertEqual((conn0.local_address, conn1.local_address), (t0.getHost(), t1.getHost()))
        rec = RecordingReceiver()
        conn1.setReceiver(rec)
        conn0.send(b"the same connection")
        pump.flush()
        self.assertEqual(rec.data, b"the same connection")

    def test_impostor_tls_peers_refused(self) -> None:
        """
        While the real peer's connection is in its handshake, a host that sends
        junk, and a NATbypass peer with another identity key (holding the session
        key), each fail TLS and are counted; the attempt goes on, and the real
        peer wins.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        q0, q1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        real = join(clock, q0, q1, flush=False)
        p0, junk = _HandshakeProtocol(a0, "accepted"), Sender(b"\x16\x03\x01\x00\x05junk!" * 4)
        t0 = iosim.FakeTransport(p0, True)
        join(clock, p0, junk, t0=t0)
        self.assertEqual((r0, a0.invalid), ([], 1))
        self.assertTrue(t0.disconnecting)
        ae, re_ = attempt(clock, S0, ChannelSecurity(MALLORY, pinned(BOB.fingerprint)))
        p1, pe = _HandshakeProtocol(a1, "accepted"), _HandshakeProtocol(ae, "evil")
        join(clock, p1, pe)
        self.assertEqual((r1, a1.invalid), ([], 1))
        # Mallory's client finished TLS (role 1 proved Bob's key), so it is "ready"; role 1 refused her.
        self.assertIsInstance(self.successResultOf(re_[0].whenLost()), PeerRefusedUs)
        real.flush()
        self.assertIsInstance(r0[0], TCPPeerConnection)
        self.assertIsInstance(r1[0], TCPPeerConnection)
        self.assertEqual(r1[0].peer_fingerprint, ALICE.fingerprint)

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
        self.assertEqual((a0.invalid, r0), (1, []))

    def test_select_with_another_session_key_refused(self) -> None:
        """Role 0 with the right identity key but another session key: role 1 refuses its SELECT."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, PunchSession("sess-7", b"x" * 32, 0, peer_id="bob"))
        a1, r1 = attempt(clock, S1, window=3.0)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        t1 = iosim.FakeTransport(p1, False)
        join(clock, p0, p1, t1=t1)
        self.assertEqual(len(r0), 1)  # role 0's TLS authenticated role 1
        self.assertEqual((r1, a1.invalid), ([], 1))
        self.assertTrue(t1.disconnecting)
        self.successResultOf(r0[0].whenLost())
        clock.advance(3.1)
        r1[0].trap(PunchFailed)

    def test_role_1_waits_for_select(self) -> None:
        """A TLS client with role 0's key that sends no SELECT gets nothing, and is closed at handshake_timeout."""
        clock = MemoryReactorClock()

        class TLSOnly(Protocol):
            def connectionMade(self) -> None:
                self.tls = start_tls(self.transport, Protocol(), ALICE, BOB.fingerprint, 0, clock)

            def dataReceived(self, data: bytes) -> None:
                self.tls.protocol.dataReceived(data)

            def connectionLost(self, reason) -> None:
                self.tls.protocol.connectionLost(reason)

        a1, r1 = attempt(clock, S1, handshake_timeout=2.0)
        p1, client = _HandshakeProtocol(a1, "test"), TLSOnly()
        t1 = iosim.FakeTransport(p1, True)
        pump = join(clock, p1, client, t0=t1)
        self.assertEqual(self.successResultOf(client.tls.handshake), BOB.fingerprint)
        self.assertTrue(p1.tls.handshake.called)
        clock.advance(1.9)
        self.assertFalse(t1.disconnecting)
        clock.advance(0.2)
        self.assertTrue(t1.disconnecting)
        pump.flush()
        self.assertEqual((r1, a1.invalid), ([], 1))

    def test_only_one_connection_picked(self) -> None:
        """
        Two connections to the real peer (a connect and an accept): role 0 selects
        the first that authenticated role 1, role 1 adopts that one, and both close
        the other.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        first0, first1 = _HandshakeProtocol(a0, "one"), _HandshakeProtocol(a1, "one")
        second0, second1 = _HandshakeProtocol(a0, "two"), _HandshakeProtocol(a1, "two")
        t_second0, t_second1 = iosim.FakeTransport(second0, True), iosim.FakeTransport(second1, False)
        pump2 = join(clock, second0, second1, t0=t_second0, t1=t_second1, flush=False)
        pump2.pump()  # the second connection's ClientHello reaches role 1 ...
        pump1 = join(clock, first0, first1)  # ... but the first connection completes first
        (conn0,), (conn1,) = r0, r1
        self.assertTrue(t_second0.disconnecting)
        pump2.flush()
        self.assertTrue(t_second1.disconnecting)
        rec = RecordingReceiver()
        conn0.setReceiver(rec)
        conn1.send(b"over the first")
        pump1.flush()
        self.assertEqual(rec.data, b"over the first")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_during_tls(self) -> None:
        """Cancelling while TLS runs aborts every connection and leaves no timer."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        t0 = iosim.FakeTransport(p0, True)
        pump = join(clock, p0, p1, t0=t0, flush=False)
        pump.pump()  # ClientHello
        self.assertIsNotNone(p0.tls)
        self.assertEqual(r0, [])
        a0.deferred.cancel()
        self.assertTrue(t0.disconnecting)
        pump.flush()
        r0[0].trap(defer.CancelledError)
        self.assertEqual(len(r0), 1)
        a1.deferred.cancel()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refused_key_fails_once_nothing_is_left(self) -> None:
        """With nothing else under way, a refused key fails both attempts at once, each naming it."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, ChannelSecurity(ALICE, pinned(MALLORY.fingerprint)))
        a1, r1 = attempt(clock, S1)
        join(clock, _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test"))
        f0, f1 = r0[0].value, r1[0].value
        self.assertIsInstance(f0, PunchFailed)
        self.assertIn("nothing left to try", f0.reason)
        self.assertIn(f"the peer's key is {BOB.fingerprint}, expected {MALLORY.fingerprint}", f0.reason)
        self.assertIn(f"the peer refused our key {BOB.fingerprint}", f1.reason)

    def test_refused_key_ends_nothing_while_another_connection_runs(self) -> None:
        """
        A refused key does not end the attempt while another connection is in its
        handshake (a stranger at a candidate must not be able to end it); once
        that one is gone too, the attempt fails naming the key.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, window=3.0, handshake_timeout=2.0)
        other = _HandshakeProtocol(a0, "silent")
        silent = join(clock, other, Silent(), flush=False)
        a1, r1 = attempt(clock, S1, ChannelSecurity(MALLORY, pinned(ALICE.fingerprint)))
        join(clock, _HandshakeProtocol(a0, "stranger"), _HandshakeProtocol(a1, "test"))
        self.assertEqual((r0, a0.invalid), ([], 1))
        clock.advance(2.1)  # the silent connection's handshake timeout
        silent.flush()
        (f0,) = r0
        f0.trap(PunchFailed)
        self.assertIn(f"the peer's key is {MALLORY.fingerprint}, expected {BOB.fingerprint}", f0.value.reason)
        self.assertIn("2 connections failed the handshake", f0.value.reason)

    def test_role_1_refuses_role_0(self) -> None:
        """
        Role 0 is ready after one round trip, before role 1 checked its key; role 1
        refuses it: role 0's connection is lost saying so, nothing it sent is
        delivered, and role 1's attempt fails naming the key.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0)
        a1, r1 = attempt(clock, S1, ChannelSecurity(BOB, pinned(MALLORY.fingerprint)))
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump = join(clock, p0, p1, flush=False)
        pump.pump()
        pump.pump()
        (conn0,) = r0
        rec = RecordingReceiver()
        conn0.setReceiver(rec)
        conn0.send(b"never delivered")
        pump.flush()
        (reason,) = rec.lost
        reason.trap(PeerRefusedUs)
        self.assertIn(f"the peer refused our key {ALICE.fingerprint}", reason.getErrorMessage())
        r1[0].trap(PunchFailed)
        self.assertIn(f"the peer's key is {ALICE.fingerprint}, expected {MALLORY.fingerprint}", r1[0].value.reason)

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


class ConnectBoundTests(SynchronousTestCase):
    """
    How many connect()s an attempt makes to candidates that refuse at once
    (here: a connect timeout of 1 ms on the Clock, so each try fails at
    once, like a closed port's RST).  The review counted 66 per closed
    candidate in a 5 s window (one every 75 ms).
    """

    def run_attempt(self, n: int, **kw) -> TCPPunchAttempt:
        clock = MemoryReactorClock()
        targets = [("127.0.0.1", 9 + i) for i in range(n)]
        a = TCPPunchAttempt(
            clock, S0, ("127.0.0.1", 0), targets, window=5.0, connect_timeout=0.001, security=SEC0, **kw
        )
        for _ in range(560):
            clock.advance(0.01)
        self.failureResultOf(a.deferred, PunchFailed)
        return a

    def test_tries_per_candidate_bounded(self) -> None:
        a = self.run_attempt(1)
        self.assertEqual(a.tries[("127.0.0.1", 9)], MAX_TRIES_PER_CANDIDATE)
        self.assertGreater(a.capped, 0)

    def test_tries_in_all_bounded(self) -> None:
        a = self.run_attempt(8)
        self.assertEqual(a.tries.total(), MAX_TRIES)
        self.assertTrue(all(n <= MAX_TRIES_PER_CANDIDATE for n in a.tries.values()))
        self.assertTrue(all(n >= MAX_TRIES // 8 - 1 for n in a.tries.values()))  # spread over all of them

    def test_peer_wide_pace(self) -> None:
        """A shared pace with room for three SYNs: three tries, the rest wait (and the window closes)."""
        clock = MemoryReactorClock()
        pace = TokenBucket(clock, rate=0.0, burst=3 * SYN_BYTES)
        a = self.run_attempt(2, pace=pace)
        self.assertEqual(a.tries.total(), 3)
        self.assertGreater(a.paced, 0)


class ScriptedSockets:
    """
    The attempt's C{make_socket}: sockets whose connect() answers what
    C{script(now)} says, no network; records when each connect() was made
    and how many sockets were open at most.
    """

    def __init__(self, clock, script) -> None:
        self.clock, self.script = clock, script
        self.connects: list[float] = []
        self.options: list = []
        self.open = 0
        self.max_open = 0

    def __call__(self, local):
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        return _ScriptedSocket(self)


class _ScriptedSocket:
    def __init__(self, owner: ScriptedSockets) -> None:
        self.owner = owner
        self.closed = False

    def connect_ex(self, target) -> int:
        self.owner.connects.append(self.owner.clock.seconds())
        return self.owner.script(self.owner.clock.seconds())

    def fileno(self) -> int:
        return -1

    def getsockopt(self, level: int, option: int) -> int:
        return 0  # SO_ERROR: connected

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, level: int, option: int, value) -> None:
        self.owner.options.append((level, option, value))

    family = 2  # AF_INET

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner.open -= 1


PEER = ("198.18.1.6", 52749)


class LossTests(SynchronousTestCase):
    """
    Retries under loss (issue 12): a lost SYN or SYN-ACK is retried within
    about a connect timeout, and EADDRNOTAVAIL (the peer's SYN reached our
    listener, so the kernel holds the 4-tuple) is waited out, not hammered.
    """

    def run_attempt(self, script, seconds: float = 5.0, **kw) -> tuple[TCPPunchAttempt, ScriptedSockets, list]:
        clock = MemoryReactorClock()
        sockets = ScriptedSockets(clock, script)
        a = TCPPunchAttempt(clock, S0, ("0.0.0.0", 40000), [PEER], window=5.0, make_socket=sockets, security=SEC0, **kw)
        results: list = []
        a.deferred.addBoth(results.append)
        for _ in range(int(seconds / 0.005)):
            clock.advance(0.005)
        return a, sockets, results

    def test_eaddrnotavail_is_not_a_storm(self) -> None:
        """The 4-tuple forming in the kernel for the whole window: a look every connect timeout, no try spent."""
        a, sockets, results = self.run_attempt(lambda now: errno.EADDRNOTAVAIL, seconds=5.1)
        self.assertLessEqual(len([t for t in sockets.connects if t < 1.0]), 3)  # today: 8 in the first second
        self.assertLessEqual(len(sockets.connects), 11)
        self.assertEqual((a.tries[PEER], a.capped), (0, 0))
        self.assertEqual(a.forming, len(sockets.connects))
        self.assertEqual(a.errors["EADDRNOTAVAIL"], len(sockets.connects))
        self.assertIn("EADDRNOTAVAIL", results[0].value.reason)

    def test_forming_spends_no_tries(self) -> None:
        """After 4 s of EADDRNOTAVAIL (the listener's connection did not complete) a SYN still goes out."""
        a, sockets, results = self.run_attempt(lambda now: errno.EADDRNOTAVAIL if now < 4.0 else errno.EINPROGRESS)
        self.assertEqual(a.capped, 0)
        self.assertTrue(any(t >= 4.0 for t in sockets.connects), sockets.connects)
        self.assertGreaterEqual(a.tries[PEER], 1)

    def test_lost_syns_retried_at_once_after_a_forming_spell(self) -> None:
        """
        SYNs lost (connect() in progress, never answered) after 2 s of
        EADDRNOTAVAIL: each is retried a connect timeout later, at once,
        not at a backed-off second (the kernel's own SYN backoff is 1 s,
        3 s); never two sockets at once.
        """
        a, sockets, results = self.run_attempt(lambda now: errno.EADDRNOTAVAIL if now < 2.0 else errno.EINPROGRESS)
        syns = [t for t in sockets.connects if t >= 2.0]
        self.assertGreaterEqual(len(syns), 5)
        gaps = [b - a for a, b in zip(syns, syns[1:])]
        self.assertLessEqual(max(gaps), 0.5 + 0.011, gaps)
        self.assertEqual(sockets.max_open, 1)
        self.assertEqual(a.errors["ETIMEDOUT"], len(syns) - (0 if results else 1))

    def test_tries_after_a_disruption_return_to_the_grid(self) -> None:
        """
        Refused for 0.2 s (RST: retried every 75 ms, off the grid of
        connect timeouts), then every SYN lost: the first try after that
        ends on the grid (at 0.5 s from the start), and every later one
        starts on it, as the peer's do (the peer's tries started together
        with ours, at the agreed start; out of phase, each side's SYN lands
        late in the other's timeout, issue 12).  Never two sockets at once.
        """
        a, sockets, results = self.run_attempt(lambda now: errno.ECONNREFUSED if now < 0.2 else errno.EINPROGRESS)
        late = [t for t in sockets.connects if t >= 0.2]
        self.assertLess(late[0], 0.3)
        for t in late[1:]:
            self.assertLess(abs(t - 0.5 * round(t / 0.5)), 0.011, late)
        self.assertGreaterEqual(len(late), 8)
        self.assertEqual(sockets.max_open, 1)

    def test_connect_timeout_at(self) -> None:
        """On the grid: one connect timeout; off it: to a grid line at least half a timeout away."""
        for now, expected in ((10.0, 0.5), (10.5, 0.5), (10.5 + 1e-7, 0.5), (12.162, 0.338), (12.3, 0.7)):
            self.assertLess(abs(connect_timeout_at(now, 10.0, 0.5) - expected), 1e-6, now)

    @given(st.floats(0, 100), st.floats(0.05, 2.0))
    def test_connect_timeout_at_is_bounded(self, elapsed: float, base: float) -> None:
        timeout = connect_timeout_at(5.0 + elapsed, 5.0, base)
        self.assertGreaterEqual(timeout, MIN_TRY_FRACTION * base - 1e-6)
        self.assertLessEqual(timeout, (1 + MIN_TRY_FRACTION) * base + 1e-6)

    def test_refusals_still_back_off(self) -> None:
        """A closed port (RST at once) is not hit every 75 ms for the whole window."""
        a, sockets, results = self.run_attempt(lambda now: errno.ECONNREFUSED)
        self.assertLessEqual(len(sockets.connects), MAX_TRIES_PER_CANDIDATE)
        gaps = [b - a for a, b in zip(sockets.connects, sockets.connects[1:])]
        self.assertGreater(max(gaps), 0.5)

    def test_no_connect_while_an_accepted_connection_from_the_peer_handshakes(self) -> None:
        """
        The peer's SYN came in through our listener: while that connection
        runs TLS, a connect() to the peer could only fail (the 4-tuple is
        taken), so none is made; once it is gone, connecting resumes.
        """
        clock = MemoryReactorClock()
        sockets = ScriptedSockets(clock, lambda now: errno.EADDRNOTAVAIL)
        a = TCPPunchAttempt(
            clock,
            S0,
            ("0.0.0.0", 40000),
            [PEER],
            window=5.0,
            handshake_timeout=2.0,
            make_socket=sockets,
            security=SEC0,
        )
        clock.advance(0)  # the first connect(): EADDRNOTAVAIL
        proto = _HandshakeProtocol(a, "accepted")
        transport = iosim.FakeTransport(proto, True, peerAddress=IPv4Address("TCP", *PEER))
        proto.makeConnection(transport)
        before = len(sockets.connects)
        for _ in range(205):
            clock.advance(0.01)
        self.assertEqual(len(sockets.connects), before)  # 2 s of TLS: no connect()
        self.assertTrue(transport.disconnecting)  # the handshake timed out at 2 s
        proto.connectionLost(Failure(ConnectionDone()))
        for _ in range(60):
            clock.advance(0.01)
        self.assertGreater(len(sockets.connects), before)
        a.deferred.cancel()
        self.failureResultOf(a.deferred, defer.CancelledError)

    def test_connection_lost_mid_handshake_retries_the_candidate(self) -> None:
        """Our connection to the peer reset before TLS finished: the candidate is tried again."""
        clock = MemoryReactorClock()
        sockets = ScriptedSockets(clock, lambda now: errno.EINPROGRESS)
        a = TCPPunchAttempt(clock, S0, ("0.0.0.0", 40000), [PEER], window=5.0, make_socket=sockets, security=SEC0)
        clock.advance(0)
        self.assertEqual(len(sockets.connects), 1)
        # It connected: the reactor finds the socket writable, the attempt adopts it.
        (pending,) = clock.getWriters()
        pending.doWrite()
        ((_, _, factory),) = clock.adoptedStreamConnections
        proto = factory.buildProtocol(None)
        transport = iosim.FakeTransport(proto, False, peerAddress=IPv4Address("TCP", *PEER))
        proto.makeConnection(transport)
        proto.connectionLost(Failure(ConnectionDone()))
        clock.advance(0.1)
        self.assertEqual(len(sockets.connects), 2)
        a.deferred.cancel()
        self.failureResultOf(a.deferred, defer.CancelledError)

    def test_slow_handshake_kept_while_bytes_come(self) -> None:
        """
        TLS over a lossy path: each flight a TCP retransmission timeout late
        (1.5 s apart).  The connection is not dropped at the handshake
        timeout while bytes keep coming; a silent one is.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, handshake_timeout=2.0, window=10.0)
        p0 = _HandshakeProtocol(a0, "accepted")
        t = iosim.FakeTransport(p0, True)
        p0.makeConnection(t)
        for _ in range(2):
            clock.advance(1.5)
            p0.dataReceived(b"\x16\x03\x03")  # the start of a TLS record, the rest still on its way
        clock.advance(1.9)
        self.assertFalse(t.disconnecting)  # 4.9 s after connecting, 1.9 s after the last bytes
        clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(a0.invalid, 1)

    def test_role_1_waits_longer_for_the_last_flight_once_it_answered(self) -> None:
        """
        Role 1 answered role 0's hello; role 0, ready once our flight arrived,
        may have taken this connection as its path, and its Finished and
        SELECT may be TCP retransmissions away (one round in 94 at 10% loss
        per link: role 1 dropped it at 2 s and role 0's path was lost).  Role
        1 waits two handshake timeouts from the last bytes; a silent
        connection still goes at one.
        """
        clock = MemoryReactorClock()
        a1, r1 = attempt(clock, S1, handshake_timeout=2.0, window=10.0)
        p1 = _HandshakeProtocol(a1, "accepted")
        t = iosim.FakeTransport(p1, True)
        p1.makeConnection(t)
        clock.advance(0.1)
        p1.dataReceived(b"\x16\x03\x01")  # the start of role 0's hello
        clock.advance(3.9)
        self.assertFalse(t.disconnecting)  # old: dropped 2 s after those bytes
        clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        silent = _HandshakeProtocol(a1, "accepted")
        ts = iosim.FakeTransport(silent, True)
        silent.makeConnection(ts)
        clock.advance(2.1)
        self.assertTrue(ts.disconnecting)

    def test_given_up_connects_are_aborted(self) -> None:
        """
        A connect() that timed out is closed with SO_LINGER 0: if the peer's
        crossing SYN had moved it to SYN_RECV, a plain close() would leave an
        orphan in FIN_WAIT1 holding the 4-tuple (then EADDRNOTAVAIL for
        seconds); the abort frees it at once.  So is every pending one when
        the attempt ends.
        """
        a, sockets, results = self.run_attempt(lambda now: errno.EINPROGRESS, seconds=5.1)
        aborts = sockets.options.count((socket.SOL_SOCKET, socket.SO_LINGER, ABORT_LINGER))
        self.assertEqual(aborts, len(sockets.connects))
        self.assertEqual(sockets.open, 0)
        self.assertEqual(struct.unpack("ii", ABORT_LINGER), (1, 0))

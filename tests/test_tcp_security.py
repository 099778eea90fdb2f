"""
Security of the TCP path: TLS 1.3 with pinned identity keys on every
connection, SELECT on the one both keep; replay, reflection, wrong keys, a
session-key holder in the middle, and no plaintext on the wire, in memory
(iosim).  See C{docs/security.md}, "TCP path".
"""

from __future__ import annotations

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import Identity
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.tcp import ROLE1_PATIENCE, SELECT_MAGIC, TCPPeerConnection, TCPPunchAttempt, _HandshakeProtocol
from natbypass.secure import ChannelSecurity
from natbypass.secure.tls import PeerRefusedUs
from natbypass.testing.connection import RecordingReceiver
from natbypass.trust import pinned

KEY = b"k" * 32
S0 = PunchSession("sess-7", KEY, 0, peer_id="bob")
S1 = PunchSession("sess-7", KEY, 1, peer_id="alice")
ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()
#: Role 0 is alice, role 1 is bob; each pins the other.
SEC0 = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
SEC1 = ChannelSecurity(BOB, pinned(ALICE.fingerprint))
SECRET = b"the plaintext nobody on the wire may read"


class Wire(iosim.FakeTransport):
    """A fake TCP transport that keeps a copy of every byte written to it."""

    def __init__(self, protocol, isServer: bool) -> None:
        super().__init__(protocol, isServer)
        self.sent = b""
        self.reading = True
        self.keepalive = False

    def write(self, data: bytes) -> None:
        self.sent += data
        super().write(data)

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = bool(enabled)


class Recorder(Protocol):
    """Eve's end of a connection: records what arrives."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class Replayer(Protocol):
    """Eve's end of a connection: sends recorded bytes as soon as it is up."""

    def __init__(self, recorded: bytes) -> None:
        self.recorded = recorded

    def connectionMade(self) -> None:
        self.transport.write(self.recorded)


class ReplayAndRecord(Replayer):
    """Eve's end of a connection: sends recorded bytes as soon as it is up, and records the answer."""

    answer = b""

    def dataReceived(self, data: bytes) -> None:
        self.answer += data


class Reflector(Protocol):
    """Sends every byte back to where it came from."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


#: The attempts' window: a refused key is reported when it closes.
WINDOW = 3.0


def attempt(clock, session: PunchSession, security: ChannelSecurity, keepalive_interval: float | None = None):
    """An attempt with no candidates (the tests connect its protocols by hand) and its results."""
    a = TCPPunchAttempt(
        clock,
        session,
        ("127.0.0.1", 1),
        [],
        window=WINDOW,
        keepalive_interval=keepalive_interval,
        security=security,
    )
    results: list = []
    a.deferred.addBoth(results.append)
    return a, results


def join(clock, server: Protocol, client: Protocol, flush: bool = True) -> tuple[iosim.IOPump, Wire, Wire]:
    """Connect two protocols over recording fake transports; run until quiet unless told not to."""
    ts, tc = Wire(server, True), Wire(client, False)
    pump = iosim.connect(server, ts, client, tc, clock=clock, greet=flush)
    return pump, ts, tc


class ReplayRegressionTests(SynchronousTestCase):
    """
    The review's finding against the first version: role 1's HELLO covered no
    nonce of role 0's, so a HELLO captured anywhere (role 1 sent it to every
    candidate, some of which may be someone else's machine) was taken by role
    0 on any connection.  There are no HELLOs any more: what role 1 shows a
    stranger is its TLS server flight, and a TLS flight is bound to the
    transcript of its own connection (both randoms, both key shares).  These
    tests replay each side's recorded flights on another connection.
    """

    def test_server_flight_sent_to_a_stranger_replayed_to_role_0(self) -> None:
        """
        Role 1 connects to a host candidate that is Eve's machine; Eve plays TLS
        client with a ClientHello role 0 once sent her, records role 1's answer and
        replays it to role 0 on another connection: role 0 refuses it.
        """
        clock = MemoryReactorClock()
        earlier0, _ = attempt(clock, S0, SEC0)
        p, eve_sees_hello = _HandshakeProtocol(earlier0, "to eve"), Recorder()
        join(clock, p, eve_sees_hello)
        self.assertEqual(eve_sees_hello.data[:1], b"\x16")  # role 0's ClientHello, all Eve got
        a1, r1 = attempt(clock, S1, SEC1)
        p1, eve = _HandshakeProtocol(a1, "to eve"), ReplayAndRecord(eve_sees_hello.data)
        _, _, to_eve = join(clock, eve, p1)
        self.assertTrue(eve.answer)  # role 1's ServerHello ... Finished
        a0, r0 = attempt(clock, S0, SEC0)
        p0, replay = _HandshakeProtocol(a0, "from eve"), Replayer(eve.answer)
        _, t0, _ = join(clock, p0, replay)
        self.assertEqual((r0, a0.invalid), ([], 1))
        self.assertTrue(t0.disconnecting)
        # Role 1 never got a Finished from Eve: closed at its handshake timeout (doubled once it answered a hello:
        # role 0 may have chosen such a connection, natbypass.punch.tcp.ROLE1_PATIENCE) or the window's end.
        clock.advance(min(2.0 * ROLE1_PATIENCE, WINDOW) + 0.1)
        self.assertTrue(to_eve.disconnecting)
        self.assertEqual(len(r1), 1)
        r1[0].trap(PunchFailed)

    def test_recorded_transcript_replayed_on_another_connection(self) -> None:
        """
        Eve recorded role 1's side of a complete exchange; replayed on another
        connection to role 0 (a fresh ClientHello), it is refused at once.
        """
        clock = MemoryReactorClock()
        old0, _ = attempt(clock, S0, SEC0)
        a1, _ = attempt(clock, S1, SEC1)
        q0, q1 = _HandshakeProtocol(old0, "earlier"), _HandshakeProtocol(a1, "earlier")
        _, _, t1 = join(clock, q0, q1)
        self.assertTrue(t1.sent)
        a0, r0 = attempt(clock, S0, SEC0)
        p0, replay = _HandshakeProtocol(a0, "from eve"), Replayer(t1.sent)
        _, t0, _ = join(clock, p0, replay)
        self.assertEqual((r0, a0.invalid), ([], 1))
        self.assertTrue(t0.disconnecting)

    def test_role_0_flights_replayed_to_role_1(self) -> None:
        """
        Eve recorded role 0's side of a complete exchange (ClientHello; then
        Certificate, CertificateVerify, Finished and SELECT) and replays it to
        role 1 on another connection: role 1 answers the old ClientHello with a
        fresh flight, so the old Finished fails, and no SELECT is ever read.
        """
        clock = MemoryReactorClock()
        a0, _ = attempt(clock, S0, SEC0)
        old1, _ = attempt(clock, S1, SEC1)
        q0, q1 = _HandshakeProtocol(a0, "earlier"), _HandshakeProtocol(old1, "earlier")
        _, t0, _ = join(clock, q0, q1)
        a1, r1 = attempt(clock, S1, SEC1)
        p1, replay = _HandshakeProtocol(a1, "from eve"), Replayer(t0.sent)
        _, _, t1 = join(clock, replay, p1)
        self.assertEqual((r1, a1.invalid), ([], 1))
        self.assertTrue(t1.disconnecting)

    def test_reflection_refused(self) -> None:
        """A host that echoes role 0's ClientHello back is refused (a client does not take a ClientHello)."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, SEC0)
        p0, mirror = _HandshakeProtocol(a0, "mirror"), Reflector()
        _, t0, _ = join(clock, p0, mirror)
        self.assertEqual((r0, a0.invalid), ([], 1))
        self.assertTrue(t0.disconnecting)


class TLSPathTests(SynchronousTestCase):
    """TLS 1.3 with pinned keys: what authenticates the path, and all that flows on it."""

    def pair(self, sec0: ChannelSecurity, sec1: ChannelSecurity, s0: PunchSession = S0, s1: PunchSession = S1):
        """Connect two attempts; run until quiet, then past the window unless both have a result."""
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, s0, sec0)
        a1, r1 = attempt(clock, s1, sec1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump, t0, t1 = join(clock, p0, p1)
        if not (r0 and r1):
            clock.advance(WINDOW + 0.1)
        return clock, pump, (t0, t1), (r0, r1)

    def test_right_keys_encrypted_round_trip(self) -> None:
        clock, pump, (t0, t1), ((c0,), (c1,)) = self.pair(SEC0, SEC1)
        self.assertIsInstance(c0, TCPPeerConnection)
        self.assertEqual((c0.secure, c1.secure), (True, True))
        self.assertEqual((c0.peer_fingerprint, c1.peer_fingerprint), (BOB.fingerprint, ALICE.fingerprint))
        self.assertRegex(c0.cipher, r"^TLSv1\.3 TLS_(AES_(128|256)_GCM_SHA(256|384)|CHACHA20_POLY1305_SHA256)$")
        self.assertGreaterEqual(c0.handshake_ms, 0)
        rec0, rec1 = RecordingReceiver(), RecordingReceiver()
        c0.setReceiver(rec0)
        c1.setReceiver(rec1)
        c0.send(SECRET)
        c1.send(SECRET[::-1])
        pump.flush()
        self.assertEqual((rec1.data, rec0.data), (SECRET, SECRET[::-1]))
        wire = t0.sent + t1.sent
        self.assertNotIn(SECRET, wire)
        self.assertNotIn(SECRET[::-1], wire)
        self.assertNotIn(SELECT_MAGIC, wire)  # SELECT travels inside TLS
        # Each side sends only TLS records, from the first byte: ClientHello (role 0), ServerHello (role 1).
        for sent in (t0.sent, t1.sent):
            self.assertEqual(sent[:1], b"\x16")
            while sent:
                self.assertIn(sent[0], (0x14, 0x15, 0x16, 0x17))  # TLS record content types
                self.assertIn(sent[1:3], (b"\x03\x01", b"\x03\x03"))  # legacy record versions
                sent = sent[5 + int.from_bytes(sent[3:5], "big") :]
        self.assertEqual(clock.getDelayedCalls(), [])

    def assertRefused(self, result: list, *needles: str) -> PunchFailed:
        (failure,) = result
        failure.trap(PunchFailed)
        for needle in needles:
            self.assertIn(needle, failure.value.reason)
        return failure.value

    def test_role_0_pins_another_key(self) -> None:
        """Role 0 refuses role 1's key; both attempts fail, each saying why."""
        _, _, _, (r0, r1) = self.pair(ChannelSecurity(ALICE, pinned(MALLORY.fingerprint)), SEC1)
        self.assertRefused(
            r0, "identity key was refused", f"the peer's key is {BOB.fingerprint}, expected {MALLORY.fingerprint}"
        )
        self.assertRefused(r1, f"the peer refused our key {BOB.fingerprint}")

    def test_role_1_pins_another_key(self) -> None:
        """
        Role 1 refuses role 0's key.  Role 0 (TLS 1.3 client) was ready after one
        round trip, before role 1 checked it: its connection is then lost saying
        its key was refused, and role 1 delivered nothing.
        """
        _, pump, _, (r0, r1) = self.pair(SEC0, ChannelSecurity(BOB, pinned(MALLORY.fingerprint)))
        self.assertRefused(r1, f"the peer's key is {ALICE.fingerprint}, expected {MALLORY.fingerprint}")
        (c0,) = r0
        lost = self.successResultOf(c0.whenLost())
        self.assertIsInstance(lost, PeerRefusedUs)
        self.assertIn(f"the peer refused our key {ALICE.fingerprint}", str(lost))

    def test_session_key_holder_cannot_be_role_1(self) -> None:
        """
        Mallory knows the session key (she runs the mediator) but not Bob's
        identity key: Alice's TLS refuses her, whatever she knows.
        """
        mallory = ChannelSecurity(MALLORY, pinned(ALICE.fingerprint))
        _, _, _, (r0, r1) = self.pair(SEC0, mallory)
        self.assertRefused(r0, f"the peer's key is {MALLORY.fingerprint}, expected {BOB.fingerprint}")
        self.assertRefused(r1)

    def test_session_key_holder_cannot_be_role_0(self) -> None:
        """As role 0, Mallory's client finishes TLS (Bob proved his key), but Bob refuses hers and selects nothing."""
        mallory = ChannelSecurity(MALLORY, pinned(BOB.fingerprint))
        _, _, _, (r0, r1) = self.pair(mallory, SEC1)
        self.assertRefused(r1, f"the peer's key is {MALLORY.fingerprint}, expected {ALICE.fingerprint}")
        self.assertIsInstance(self.successResultOf(r0[0].whenLost()), PeerRefusedUs)

    def test_mediator_in_the_middle(self) -> None:
        """
        Mallory stands between Alice and Bob with the session key, terminating
        TLS on each side with her own key: both refuse her, and no application
        byte reaches either.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, SEC0)  # Alice
        m1, _ = attempt(clock, S1, ChannelSecurity(MALLORY, pinned(ALICE.fingerprint)))  # Mallory as Bob
        m0, _ = attempt(clock, S0, ChannelSecurity(MALLORY, pinned(BOB.fingerprint)))  # Mallory as Alice
        a1, r1 = attempt(clock, S1, SEC1)  # Bob
        join(clock, _HandshakeProtocol(a0, "to mallory"), _HandshakeProtocol(m1, "from alice"))
        join(clock, _HandshakeProtocol(m0, "to bob"), _HandshakeProtocol(a1, "from mallory"))
        clock.advance(WINDOW + 0.1)
        self.assertRefused(r0, str(MALLORY.fingerprint))
        self.assertRefused(r1, str(MALLORY.fingerprint))

    def test_relay_sees_only_ciphertext(self) -> None:
        """
        A host that relays bytes between the two (as one of role 1's host
        candidates could) is just more network: the peers authenticate each
        other through it, and it sees no plaintext.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, SEC0)
        a1, r1 = attempt(clock, S1, SEC1)
        p0, p1 = _HandshakeProtocol(a0, "via relay"), _HandshakeProtocol(a1, "via relay")
        seen = []

        class Half(Protocol):
            other: Protocol

            def dataReceived(self, data: bytes) -> None:
                seen.append(data)
                self.other.transport.write(data)

        h0, h1 = Half(), Half()
        h0.other, h1.other = h1, h0
        pump_a, _, _ = join(clock, p0, h0, flush=False)
        pump_b, _, _ = join(clock, h1, p1, flush=False)
        for _ in range(20):
            pump_a.pump()
            pump_b.pump()
        (c0,), (c1,) = r0, r1
        self.assertEqual(c0.peer_fingerprint, BOB.fingerprint)
        rec = RecordingReceiver()
        c1.setReceiver(rec)
        c0.send(SECRET)
        for _ in range(5):
            pump_a.pump()
            pump_b.pump()
        self.assertEqual(rec.data, SECRET)
        self.assertNotIn(SECRET, b"".join(seen))

    def test_backpressure_and_keepalive(self) -> None:
        """
        Without a receiver, more than 1 MiB of early messages pauses
        reading from the socket until a receiver takes them; the kernel's TCP
        keepalive is on.
        """
        clock = MemoryReactorClock()
        a0, r0 = attempt(clock, S0, SEC0, keepalive_interval=15.0)
        a1, r1 = attempt(clock, S1, SEC1)
        p0, p1 = _HandshakeProtocol(a0, "test"), _HandshakeProtocol(a1, "test")
        pump, t0, _ = join(clock, p0, p1)
        (c0,), (c1,) = r0, r1
        self.assertTrue(t0.keepalive)
        chunk = b"x" * c1.max_datagram_size
        for _ in range(17):
            c1.send(chunk)
            pump.flush()
        self.assertFalse(t0.reading)
        rec = RecordingReceiver()
        c0.setReceiver(rec)
        self.assertTrue(t0.reading)
        self.assertEqual(len(rec.data), 17 * len(chunk))

    def test_close_and_when_lost(self) -> None:
        """close() ends TLS cleanly: both sides see ConnectionDone, once, on whenLost and the receiver."""
        _, pump, _, ((c0,), (c1,)) = self.pair(SEC0, SEC1)
        rec0, rec1 = RecordingReceiver(), RecordingReceiver()
        c0.setReceiver(rec0)
        c1.setReceiver(rec1)
        lost0, lost1 = c0.whenLost(), c1.whenLost()
        c1.close()
        c1.close()
        pump.flush()
        self.assertIsInstance(self.successResultOf(lost0), ConnectionDone)
        self.assertIsInstance(self.successResultOf(lost1), ConnectionDone)
        self.assertEqual((len(rec0.lost), len(rec1.lost)), (1, 1))
        c0.send(b"after the end")  # ignored
        self.assertIsInstance(self.successResultOf(c0.whenLost()), ConnectionDone)

    def test_no_plaintext_send_before_secured(self) -> None:
        """The connection refuses to send before TLS proved both sides (and is not handed out before)."""
        wire = Wire(Protocol(), True)
        conn = TCPPeerConnection(S0, wire, keepalive_interval=None)
        self.assertRaises(RuntimeError, conn.send, b"plaintext")
        self.assertEqual(wire.sent, b"")

"""
The UDP path against the attacks of issue 9, in memory on a Clock.

The punch (PROBE/ACK with the mediator's session key) only finds a 5-tuple;
everything on it is QUIC, mutually authenticated by the peers' identity
keys.  Each test plays one attacker: a host at a candidate address that
relays, a replayer, a flooder, a party that holds the session key.  The four
findings of the review each have a test here that failed on the code before
QUIC (where DATA was authenticated with the session key only, in clear).
"""

from __future__ import annotations

import itertools

from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import Identity
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.packet import PacketType, decode, encode
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.udp import MAX_LEARNED, SPECULATIVE_BUDGET, UDPPeerConnection, UDPPunchMachine, punch_udp
from natbypass.secure import ChannelSecurity
from natbypass.secure.quic import QuicChannel, get_engine, is_quic
from natbypass.testing.connection import RecordingReceiver
from natbypass.testing.udp import MemoryUDPNetwork
from natbypass.trust import pinned

KEY = b"k" * 32
A = PunchSession("sess-1", KEY, 0, peer_id="bob")
B = PunchSession("sess-1", KEY, 1, peer_id="alice")
A_ADDR = ("198.18.1.10", 40000)
B_ADDR = ("198.18.2.10", 50000)
#: A candidate address of B's that a third host holds (a stale host
#: candidate, a hostile LAN neighbour, a box on the path).
E_ADDR = ("198.18.3.10", 60000)
ALICE, BOB, MALLORY, OTHER = (Identity.generate() for _ in range(4))
SEC_A = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
SEC_B = ChannelSecurity(BOB, pinned(ALICE.fingerprint))


def anyone(fingerprint) -> None:
    """A PeerCheck that accepts every key (Mallory's)."""


def counter():
    it = itertools.count(1)
    return lambda: next(it)


class Net:
    """A Clock, a network with 25 ms one way, and the endpoints on it."""

    def __init__(self, drop=None) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.net = MemoryUDPNetwork(self.clock, latency=0.025, drop=drop)
        self.results: dict = {}

    def endpoint(self, addr) -> PunchEndpoint:
        ep = PunchEndpoint()
        self.net.listen(addr, UDPMux(other=ep))
        return ep

    def punch(self, name, ep, session, cands, security, **kw):
        d = punch_udp(ep, session, cands, self.clock, nonce_source=counter(), security=security, **kw)
        d.addBoth(lambda r: self._keep(name, r))
        return d

    def _keep(self, name, result):
        self.results[name] = result

    def run(self, seconds: float, step: float = 0.001) -> None:
        self.clock.pump([step] * round(seconds / step))

    def sent_by(self, source) -> list[bytes]:
        return [d for _, s, _, d in self.net.sent if s == source]


class Forwarder(DatagramProtocol):
    """A host at E_ADDR that relays between A and B (from its own address) and keeps what it saw."""

    def __init__(self, punch_only: bool = False) -> None:
        self.seen: list[bytes] = []
        self.punch_only = punch_only
        self.quic: QuicChannel | None = None

    def datagramReceived(self, data: bytes, addr) -> None:
        self.seen.append(data)
        if self.punch_only and is_quic(data):
            if self.quic is not None:
                self.quic.datagramReceived(data, addr)
            return
        self.transport.write(data, B_ADDR if addr == A_ADDR else A_ADDR)


class ForwarderTests(SynchronousTestCase):
    """
    Finding 1: a host at a candidate address became the selected path by
    forwarding four punch packets, then read the DATA in clear.
    """

    def test_forwarder_sees_only_ciphertext(self) -> None:
        # A cannot reach B directly, so the relay at E is the only path.
        n = Net(drop=lambda s, d, data: s == A_ADDR and d == B_ADDR)
        fwd = Forwarder()
        n.net.listen(E_ADDR, fwd)
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR, E_ADDR), SEC_A)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B)
        n.run(1.0)
        a, b = n.results["a"], n.results["b"]
        # The relay is the path (a relay can always be one), but the peers
        # proved their keys end to end through it ...
        self.assertEqual((a.remote_address.host, a.remote_address.port), E_ADDR)
        self.assertEqual((a.peer_fingerprint, b.peer_fingerprint), (BOB.fingerprint, ALICE.fingerprint))
        rb = RecordingReceiver(datagrams=True)
        b.setReceiver(rb)
        a.send(b"secret payload")
        n.run(0.2)
        self.assertEqual(rb.data, [b"secret payload"])
        # ... and all it saw was punch packets and QUIC ciphertext.
        self.assertGreater(len(fwd.seen), 4)
        self.assertFalse(any(b"secret payload" in d for d in fwd.seen), "the forwarder read the plaintext")
        self.assertTrue(all(is_quic(d) or d[0] == 0xCE for d in fwd.seen))

    def test_forwarder_cannot_complete_quic(self) -> None:
        """The forwarder relays the punch but answers the QUIC Initial itself: A refuses it."""
        n = Net(drop=lambda s, d, data: s == A_ADDR and d == B_ADDR)
        fwd = Forwarder(punch_only=True)
        n.net.listen(E_ADDR, fwd)
        fwd.quic = QuicChannel(MALLORY, anyone, 1, A_ADDR, fwd.transport.write, n.clock)
        fwd.quic.ready.addErrback(lambda f: None)
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR, E_ADDR), SEC_A)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B, handshake_timeout=2.0)
        n.run(3.0)
        failure = n.results["a"]
        failure.trap(PunchFailed)
        self.assertIn(
            f"198.18.3.10:60000 failed authentication: the peer's key is {MALLORY.fingerprint}", failure.value.reason
        )
        self.assertIn(f"expected {BOB.fingerprint}", failure.value.reason)
        # A never proved its key to the forwarder, and B (whose Initial never came) gave up.
        self.assertIsNone(fwd.quic.peer_fingerprint)
        n.results["b"].trap(PunchFailed)


class SessionKeyHolderTests(SynchronousTestCase):
    """
    Mallory knows the session key (she runs the mediator): she completes
    PROBE/ACK as either peer, but without the pinned identity key she cannot
    complete QUIC, as client or server.
    """

    def test_as_the_server(self) -> None:
        n = Net()
        ep_a, ep_m = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A)
        n.punch("m", ep_m, B, (A_ADDR,), ChannelSecurity(MALLORY, anyone))
        n.run(1.0)
        failure = n.results["a"]
        failure.trap(PunchFailed)
        self.assertIn(f"the peer's key is {MALLORY.fingerprint}, expected {BOB.fingerprint}", failure.value.reason)
        n.run(2.0)
        mallory = n.results["m"]
        mallory.trap(PunchFailed)  # Alice refused her; Alice never showed Mallory a proof
        self.assertIn("refused our identity key", mallory.value.reason)

    def test_as_the_client(self) -> None:
        n = Net()
        ep_m, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("m", ep_m, A, (B_ADDR,), ChannelSecurity(MALLORY, anyone))
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B)
        n.run(1.0)
        failure = n.results["b"]
        failure.trap(PunchFailed)
        self.assertIn(f"the peer's key is {MALLORY.fingerprint}, expected {ALICE.fingerprint}", failure.value.reason)
        # Mallory's client was ready after one round trip (Bob proved his key
        # first, as TLS 1.3 servers do), then Bob's refusal closed it: nothing
        # she sends is ever delivered.
        conn = n.results["m"]
        self.assertIsInstance(conn, UDPPeerConnection)
        lost = []
        conn.whenLost().addCallback(lost.append)
        conn.send(b"let me in")
        n.run(2.0)
        self.assertIsInstance(lost[0], ConnectionLost)
        self.assertIn("refused our identity key", str(lost[0]))


class WrongFingerprintTests(SynchronousTestCase):
    def test_client_refuses_the_server(self) -> None:
        n = Net()
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR,), ChannelSecurity(ALICE, pinned(OTHER.fingerprint)))
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B)
        n.run(2.0)
        a, b = n.results["a"], n.results["b"]
        a.trap(PunchFailed)
        self.assertIn(f"is {BOB.fingerprint}, expected {OTHER.fingerprint}", a.value.reason)
        b.trap(PunchFailed)
        self.assertIn(f"refused our identity key {BOB.fingerprint}", b.value.reason)
        self.assertEqual((ep_a.quicRoutes(), ep_b.quicRoutes()), (0, 0))

    def test_server_refuses_the_client(self) -> None:
        n = Net()
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A)
        n.punch("b", ep_b, B, (A_ADDR,), ChannelSecurity(BOB, pinned(OTHER.fingerprint)))
        n.run(0.2)
        b = n.results["b"]
        b.trap(PunchFailed)
        self.assertIn(f"is {ALICE.fingerprint}, expected {OTHER.fingerprint}", b.value.reason)
        a = n.results["a"]
        lost = []
        a.whenLost().addCallback(lost.append)
        n.run(2.0)
        self.assertIn("refused our identity key", str(lost[0]))


class ReplayTests(SynchronousTestCase):
    """
    Finding 2: early DATA bypassed the replay window (one frame delivered
    four times).  Now a replayed QUIC packet is dropped by its packet number,
    before the receiver is ready as after.
    """

    def test_replayed_datagrams_delivered_once(self) -> None:
        n = Net()
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B)
        while "a" not in n.results:
            n.run(0.001)
        a = n.results["a"]
        self.assertNotIn("b", n.results)  # B is not ready yet: A's data is early for it
        before = len(n.net.sent)
        a.send(b"once")
        captured = [d for _, s, _, d in n.net.sent[before:] if s == A_ADDR]
        self.assertTrue(captured)
        for _ in range(3):  # replayed while B is still in its handshake
            for data in captured:
                n.net.send(A_ADDR, B_ADDR, data)
        n.run(0.5)
        b = n.results["b"]
        rb = RecordingReceiver(datagrams=True)
        b.setReceiver(rb)
        for _ in range(3):  # and again once it is ready
            for data in captured:
                n.net.send(A_ADDR, B_ADDR, data)
        n.run(0.5)
        self.assertEqual(rb.data, [b"once"])


class CandidateFloodTests(SynchronousTestCase):
    """
    Finding 3: one captured probe replayed from many source addresses grew the
    candidate list without bound (2,001 candidates, each probed every round).
    """

    def test_machine_learns_at_most_max_learned(self) -> None:
        m = UDPPunchMachine(A, (B_ADDR,), start_at=1.0, nonce_source=counter())
        m.poll(1.0)
        probe = decode(encode(PacketType.PROBE, 1, b"sess-1", 99, KEY))
        for i in range(2000):
            m.packet_received(1.01, probe, (f"203.0.113.{i % 250}", 1000 + i))
        self.assertEqual(len(m.candidates), 1 + MAX_LEARNED)
        self.assertEqual(m.stats.learned_refused, 2000 - MAX_LEARNED)
        round_ = m.poll(1.5)
        self.assertEqual(len(round_), 1 + MAX_LEARNED)

    def test_attempt_bounded_under_a_flood(self) -> None:
        n = Net()
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A, start_delay=0.1)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B, start_delay=0.05)  # B starts first
        n.run(0.08)
        captured = next(d for d in n.sent_by(B_ADDR) if d[0] == 0xCE)
        spoofed = [(f"203.0.{i // 250}.{i % 250 + 1}", 2000 + i) for i in range(2001)]
        for source in spoofed:
            n.net.send(source, A_ADDR, captured)
        n.run(1.0)
        a = n.results["a"]
        self.assertIsInstance(a, UDPPeerConnection)
        self.assertEqual(a.punch_stats.learned_refused, 2001 - MAX_LEARNED)
        targets = {addr for _, s, addr, _ in n.net.sent if s == A_ADDR}
        self.assertLessEqual(len(targets - {B_ADDR}), MAX_LEARNED)
        self.assertEqual(ep_a.quicRoutes(), 1)

    def test_learned_cap_is_configurable(self) -> None:
        m = UDPPunchMachine(A, (B_ADDR,), start_at=1.0, max_learned=0)
        probe = decode(encode(PacketType.PROBE, 1, b"sess-1", 99, KEY))
        self.assertEqual(m.packet_received(1.0, probe, ("203.0.113.1", 1)), [])
        self.assertEqual(m.candidates, (B_ADDR,))


class LivenessReplayTests(SynchronousTestCase):
    """
    Finding 4: replayed keepalives kept a dead path alive for 600 s after the
    peer went silent.  Now only fresh authenticated QUIC packets refresh the
    idle timer; replays of old ones (PINGs, ACKs, anything) do not.
    """

    engine: str | None = None

    def test_replays_do_not_keep_a_dead_path_alive(self) -> None:
        silent, replaying = [], []
        n = Net(drop=lambda s, d, data: bool(silent) and s == B_ADDR and not replaying)
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        kw = {"keepalive_interval": 15.0, "engine": self.engine}
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A, **kw)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B, **kw)
        n.run(1.0)
        a = n.results["a"]
        ra = RecordingReceiver(datagrams=True)
        a.setReceiver(ra)
        n.clock.pump([1.0] * 60)  # a minute of PINGs and ACKs to capture
        captured = [d for d in n.sent_by(B_ADDR) if is_quic(d)]
        self.assertGreater(len(captured), 4)
        silent.append(True)  # B is gone
        went_silent = n.clock.seconds()
        for _ in range(120):  # ten minutes of replays, every 5 s
            replaying.append(True)
            for data in captured:
                n.net.send(B_ADDR, A_ADDR, data)
            replaying.clear()
            n.clock.pump([0.5] * 10)
            if ra.lost:
                break
        (reason,) = ra.lost
        reason.trap(ConnectionLost)
        self.assertIn("QUIC idle timeout", reason.getErrorMessage())
        # Lost within the idle timeout (45 s) plus one PING interval.
        self.assertLessEqual(n.clock.seconds() - went_silent, 45 + 15 + 1)


class LivenessReplayAioquicTests(LivenessReplayTests):
    engine = "aioquic"

    def setUp(self) -> None:
        try:
            get_engine("aioquic")
        except ImportError as e:
            raise self.skipTest(f"aioquic is not installed ({e})") from None


class SpeculationTests(SynchronousTestCase):
    """
    Role 0 sends its QUIC first flight at the start time to one candidate
    that has not proved anything yet.  That must not make it a traffic
    source against whoever holds that address, nor let anyone without the
    session key get a QUIC answer from role 1.
    """

    def quic_to(self, n: Net, dest) -> list[tuple[float, bytes]]:
        return [(t, d) for t, s, to, d in n.net.sent if s == A_ADDR and to == dest and is_quic(d)]

    def test_victim_gets_one_flight_while_the_peer_connects(self) -> None:
        """The first candidate is a third host's address: one first flight, within the budget, never more."""
        n = Net()
        n.net.listen(E_ADDR, DatagramProtocol())  # it only listens
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (E_ADDR, B_ADDR), SEC_A)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B)
        n.run(6.0)
        self.assertIsInstance(n.results["a"], UDPPeerConnection)
        sent = self.quic_to(n, E_ADDR)
        self.assertTrue(sent)
        self.assertEqual(len({t for t, _ in sent}), 1)  # all at the start time
        self.assertLessEqual(sum(len(d) for _, d in sent), SPECULATIVE_BUDGET)

    def test_no_retransmission_to_an_unproven_address(self) -> None:
        """Nobody answers for the whole punch: QUIC's retransmissions never reach the speculative target."""
        n = Net()
        ep_a = n.endpoint(A_ADDR)
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A)
        n.run(6.0)
        n.results["a"].trap(PunchFailed)
        sent = self.quic_to(n, B_ADDR)
        self.assertEqual(len({t for t, _ in sent}), 1)  # all at the start time
        self.assertLessEqual(sum(len(d) for _, d in sent), SPECULATIVE_BUDGET)
        # The abandoned connection left no timer and no route, and said nothing on its way out.
        self.assertEqual(n.clock.getDelayedCalls(), [])
        self.assertEqual(ep_a.quicRoutes(), 0)

    def test_speculative_initial_without_the_session_key_unanswered(self) -> None:
        """A client whose probes fail the MAC sends its flight in vain: role 1 answers only proven addresses."""
        n = Net()
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, PunchSession("sess-1", b"x" * 32, 0, peer_id="bob"), (B_ADDR,), SEC_A)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B, handshake_timeout=1.0)
        n.run(6.0)
        n.results["a"].trap(PunchFailed)
        n.results["b"].trap(PunchFailed)
        self.assertGreater(ep_b.unsolicited_quic, 0)
        self.assertEqual([d for d in n.sent_by(B_ADDR) if is_quic(d)], [])


class MuxRoutingTests(SynchronousTestCase):
    """QUIC reaches a channel only from the addresses the punch verified, and only while a session owns them."""

    def initial_from_a(self) -> bytes:
        """A real client Initial (what a spoofer would copy)."""
        n = Net()
        out = []
        ch = QuicChannel(ALICE, BOB.fingerprint, 0, B_ADDR, lambda d, a: out.append(d), n.clock)
        ch.ready.addErrback(lambda f: None)
        ch.start()
        ch.close()
        return out[0]

    def test_unsolicited_quic_dropped_and_counted(self) -> None:
        n = Net()
        ep = n.endpoint(B_ADDR)
        initial = self.initial_from_a()
        for i in range(50):
            n.net.send((f"203.0.113.{i + 1}", 443), B_ADDR, initial)
        n.net.send(A_ADDR, B_ADDR, bytes([0x41]) + bytes(60))
        n.run(0.1)
        self.assertEqual((ep.unsolicited_quic, ep.quicRoutes(), ep.undecodable), (51, 0, 0))
        self.assertEqual([d for _, s, _, d in n.net.sent if s == B_ADDR], [])

    def test_routes_only_for_verified_addresses(self) -> None:
        """
        Role 1 accepts the Initial only from an address that proved the session
        key; a spoofer's Initial from elsewhere is dropped, even mid-punch.
        """
        n = Net()
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B, start_delay=0.0)
        n.run(0.01)
        self.assertEqual(ep_b.quicRoutes(), 0)  # nothing verified yet
        initial = self.initial_from_a()
        n.net.send(("203.0.113.7", 9), B_ADDR, initial)
        n.run(0.05)
        self.assertEqual(ep_b.unsolicited_quic, 1)
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A, start_delay=0.0)
        n.run(0.03)  # A's probe verified at B: B routes QUIC from A_ADDR to its attempt
        self.assertEqual(ep_b.quicRoutes(), 1)
        n.run(1.0)
        self.assertIsInstance(n.results["b"], UDPPeerConnection)
        self.assertEqual(ep_b.quicRoutes(), 1)  # the one channel of the path

    def test_routes_bounded_by_the_learned_cap(self) -> None:
        n = Net()
        ep_b = n.endpoint(B_ADDR)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B, start_delay=0.0, max_learned=3)
        probe = encode(PacketType.PROBE, 0, b"sess-1", 77, KEY)
        for i in range(100):
            n.net.send((f"203.0.113.{i + 1}", 5000), B_ADDR, probe)
        n.run(0.05)
        self.assertEqual(ep_b.quicRoutes(), 3)

    def test_quic_from_elsewhere_after_connect_dropped(self) -> None:
        n = Net()
        ep_a, ep_b = n.endpoint(A_ADDR), n.endpoint(B_ADDR)
        n.punch("a", ep_a, A, (B_ADDR,), SEC_A)
        n.punch("b", ep_b, B, (A_ADDR,), SEC_B)
        n.run(1.0)
        a, b = n.results["a"], n.results["b"]
        rb = RecordingReceiver(datagrams=True)
        b.setReceiver(rb)
        before = len(n.net.sent)
        a.send(b"from a")
        packets = [d for _, s, _, d in n.net.sent[before:] if s == A_ADDR]
        n.run(0.1)
        for data in packets:  # the same ciphertext from another address
            n.net.send(E_ADDR, B_ADDR, data)
        n.run(0.1)
        self.assertEqual(rb.data, [b"from a"])
        # They carry B's connection id, so the path's follower offers them to
        # QUIC (a NAT rebinding looks like this), which drops them as replays:
        # nothing delivered twice, the path stays, nothing goes to the replayer.
        self.assertEqual((ep_b.unsolicited_quic, ep_b.migrating_quic), (0, len(packets)))
        self.assertEqual((b.remote_address.host, b.remote_address.port), A_ADDR)
        self.assertEqual(b.path.moves, [])
        self.assertNotIn(E_ADDR, [to for _, s, to, _ in n.net.sent if s == B_ADDR])
        a.close()
        n.run(2.0)
        self.assertEqual((ep_a.quicRoutes(), ep_b.quicRoutes()), (0, 0))

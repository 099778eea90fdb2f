"""
Tests for natbypass.punch.udp and natbypass.punch.mux: UDP hole punching and
QUIC on the punched path, in memory (real sockets: test_punch_udp_loopback.py;
the attacks: test_udp_security.py).
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass.identity import Identity
from natbypass.interfaces import IPeerConnection, IPeerReceiver
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.packet import PacketType, decode, encode
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.udp import (
    Failed,
    ProbeSchedule,
    Selected,
    Send,
    UDPPeerConnection,
    UDPPunchMachine,
    Verified,
    punch_udp,
)
from natbypass.secure import ChannelSecurity
from natbypass.secure.quic import is_quic
from natbypass.testing.udp import MemoryUDPNetwork
from natbypass.trust import pinned

KEY = b"k" * 32
A = PunchSession("sess-1", KEY, 0, peer_id="bob")
B = PunchSession("sess-1", KEY, 1, peer_id="alice")
A_ADDR = ("198.18.1.10", 40000)
B_ADDR = ("198.18.2.10", 50000)
ALICE, BOB = Identity.generate(), Identity.generate()
#: What each side is given: its key, and a pin of the other's.
SEC_A = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
SEC_B = ChannelSecurity(BOB, pinned(ALICE.fingerprint))


def counter():
    it = itertools.count(1)
    return lambda: next(it)


@implementer(IPeerReceiver)
class Receiver:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class ScheduleTests(SynchronousTestCase):
    def test_fast_then_backoff_then_capped(self) -> None:
        s = ProbeSchedule(fast_interval=0.02, fast_period=0.2, backoff=2, max_interval=0.5)
        self.assertEqual(s.next_interval(0.0, None), 0.02)
        self.assertEqual(s.next_interval(0.19, 0.02), 0.02)
        self.assertEqual(s.next_interval(0.2, 0.02), 0.04)
        self.assertEqual(s.next_interval(3.0, 0.4), 0.5)


class MachineTests(SynchronousTestCase):
    def machine(self, session=A, cands=(B_ADDR,), start=1.0, **kw) -> UDPPunchMachine:
        return UDPPunchMachine(session, cands, start_at=start, nonce_source=counter(), **kw)

    def test_waits_for_start_time(self) -> None:
        m = self.machine()
        self.assertEqual(m.next_wakeup(), 1.0)
        self.assertEqual(m.poll(0.5), [])
        actions = m.poll(1.0)
        self.assertEqual([type(a) for a in actions], [Send])
        self.assertEqual(actions[0].address, B_ADDR)
        p = decode(actions[0].data)
        self.assertEqual((p.type, p.role, p.session_id), (PacketType.PROBE, 0, b"sess-1"))

    def test_probes_every_candidate_on_schedule(self) -> None:
        other = ("10.0.0.2", 50000)
        m = self.machine(cands=(B_ADDR, other, B_ADDR), schedule=ProbeSchedule(timeout=1.0))
        sent = []
        now = 1.0
        while (w := m.next_wakeup()) is not None:
            now = w
            sent += m.poll(now)
        self.assertIsInstance(sent[-1], Failed)
        probes = [a for a in sent if isinstance(a, Send)]
        # Duplicates removed; both candidates get the same number of probes.
        self.assertEqual({a.address for a in probes}, {B_ADDR, other})
        self.assertEqual(len(probes) % 2, 0)
        # 10 fast rounds in the first 200 ms, then fewer as it backs off.
        self.assertGreater(len(probes) // 2, 10)
        self.assertLess(len(probes) // 2, 30)
        self.assertEqual(now, 2.0)
        self.assertIn("no verified UDP path within 1 s", sent[-1].reason)
        self.assertIn("nothing from the peer reached us", sent[-1].reason)
        self.assertIn("10.0.0.2:50000", sent[-1].reason)

    def test_two_machines_select_each_other(self) -> None:
        a = self.machine(A, (B_ADDR,))
        b = self.machine(B, (A_ADDR,))
        to_b = a.poll(1.0)[0]
        to_a = b.poll(1.0)[0]
        # Each answers the other's probe with an ACK echoing its nonce.
        ack_to_a = b.packet_received(1.25, decode(to_b.data), A_ADDR)[0]
        ack_to_b = a.packet_received(1.25, decode(to_a.data), B_ADDR)[0]
        self.assertEqual(decode(ack_to_a.data).echo, decode(to_b.data).nonce)
        self.assertEqual(a.packet_received(1.5, decode(ack_to_a.data), B_ADDR), [Selected(B_ADDR, 0.5)])
        self.assertEqual(b.packet_received(1.5, decode(ack_to_b.data), A_ADDR), [Selected(A_ADDR, 0.5)])
        self.assertTrue(a.done and b.done)
        self.assertIsNone(a.next_wakeup())

    def test_peer_reflexive_address_learned_and_probed(self) -> None:
        """The peer's NAT used a port we were not told of: answer and probe it."""
        a = self.machine(A, (B_ADDR,))
        prflx = ("198.18.2.10", 50007)
        probe = encode(PacketType.PROBE, 1, b"sess-1", 99, KEY)
        actions = a.packet_received(1.0, decode(probe), prflx)
        self.assertEqual([act.address for act in actions if isinstance(act, Send)][:2], [prflx, prflx])
        sends = [act for act in actions if isinstance(act, Send)]
        self.assertEqual(decode(sends[0].data).type, PacketType.ACK)
        self.assertEqual(decode(sends[1].data).type, PacketType.PROBE)
        self.assertEqual(a.prflx, [prflx])
        self.assertIn(prflx, a.candidates)

    def test_early_probe_starts_punching(self) -> None:
        """The peer's clock runs ahead: start probing when its probe arrives."""
        a = self.machine(A, (B_ADDR,), start=5.0)
        actions = a.packet_received(4.0, decode(encode(PacketType.PROBE, 1, b"sess-1", 7, KEY)), B_ADDR)
        self.assertEqual(actions[1], Verified(B_ADDR))
        self.assertEqual(
            [decode(x.data).type for x in actions if isinstance(x, Send)], [PacketType.ACK, PacketType.PROBE]
        )
        self.assertEqual(a.state, "punching")

    def test_wrong_key_role_and_reflection_ignored(self) -> None:
        a = self.machine(A, (B_ADDR,))
        a.poll(1.0)
        bad = [
            encode(PacketType.PROBE, 1, b"sess-1", 5, b"x" * 32),  # wrong key
            encode(PacketType.PROBE, 0, b"sess-1", 5, KEY),  # our own role: a reflection
            encode(PacketType.ACK, 0, b"sess-1", 5, KEY, echo=1),  # our probe's nonce, our role
        ]
        for data in bad:
            self.assertEqual(a.packet_received(1.01, decode(data), B_ADDR), [])
        self.assertEqual(a.stats.invalid, 3)
        self.assertFalse(a.done)

    def test_ack_from_other_address_does_not_select(self) -> None:
        """A replayed ACK arriving from a third host's address selects nothing."""
        a = self.machine(A, (B_ADDR,))
        probe = decode(a.poll(1.0)[0].data)
        ack = encode(PacketType.ACK, 1, b"sess-1", 77, KEY, echo=probe.nonce)
        self.assertEqual(a.packet_received(1.02, decode(ack), ("203.0.113.66", 1)), [])
        self.assertEqual(a.stats.stray_acks, 1)
        self.assertFalse(a.done)
        self.assertEqual(a.packet_received(1.5, decode(ack), B_ADDR), [Verified(B_ADDR), Selected(B_ADDR, 0.5)])
        self.assertEqual(a.verified, [B_ADDR])

    def test_failure_reason_when_only_inbound_works(self) -> None:
        a = self.machine(A, (B_ADDR,), schedule=ProbeSchedule(timeout=0.1))
        a.poll(1.0)
        a.packet_received(1.01, decode(encode(PacketType.PROBE, 1, b"sess-1", 5, KEY)), B_ADDR)
        (failed,) = a.poll(1.1)
        self.assertIn("the peer's probes reached us (1)", failed.reason)

    def test_probe_answered_once_per_source(self) -> None:
        """A replayed probe earns nothing: the peer never sends a nonce twice."""
        a = self.machine(A, (B_ADDR,))
        a.poll(1.0)
        probe = decode(encode(PacketType.PROBE, 1, b"sess-1", 5, KEY))
        self.assertEqual(decode(a.packet_received(1.01, probe, B_ADDR)[0].data).echo, 5)
        self.assertEqual(a.packet_received(1.02, probe, B_ADDR), [])
        self.assertEqual((a.stats.replayed, a.stats.acks_sent), (1, 1))

    def test_learned_addresses_capped(self) -> None:
        a = self.machine(A, (B_ADDR,), max_learned=2)
        a.poll(1.0)
        for i in range(5):
            probe = decode(encode(PacketType.PROBE, 1, b"sess-1", 100 + i, KEY))
            a.packet_received(1.01, probe, ("203.0.113.9", 1000 + i))
        self.assertEqual(len(a.prflx), 2)
        self.assertEqual(len(a.candidates), 3)
        self.assertEqual(a.stats.learned_refused, 3)
        self.assertEqual(len(a.verified), 2)

    def test_answers_known_addresses_after_success(self) -> None:
        """The peer may have missed our ACK: keep answering it, but learn nothing new."""
        a = self.machine(A, (B_ADDR,))
        probe = decode(a.poll(1.0)[0].data)
        a.packet_received(1.1, decode(encode(PacketType.ACK, 1, b"sess-1", 9, KEY, echo=probe.nonce)), B_ADDR)
        self.assertTrue(a.done)
        late = a.packet_received(1.2, decode(encode(PacketType.PROBE, 1, b"sess-1", 11, KEY)), B_ADDR)
        self.assertEqual([decode(x.data).echo for x in late if isinstance(x, Send)], [11])
        new = a.packet_received(1.2, decode(encode(PacketType.PROBE, 1, b"sess-1", 12, KEY)), ("203.0.113.9", 1))
        self.assertEqual(new, [])
        self.assertEqual(a.stats.learned_refused, 1)

    def test_adopt_needs_a_verified_address(self) -> None:
        a = self.machine(A, (B_ADDR,))
        a.poll(1.0)
        self.assertRaises(ValueError, a.adopt, B_ADDR)
        a.packet_received(1.01, decode(encode(PacketType.PROBE, 1, b"sess-1", 5, KEY)), B_ADDR)
        a.adopt(B_ADDR)
        self.assertEqual(a.state, "succeeded")
        self.assertIsNone(a.next_wakeup())


class Recorder(DatagramProtocol):
    def __init__(self) -> None:
        self.got = []

    def datagramReceived(self, data, addr) -> None:
        self.got.append((data, addr))


class MuxTests(SynchronousTestCase):
    def test_demux_and_shared_transport(self) -> None:
        clock = Clock()
        net = MemoryUDPNetwork(clock)
        stun, other = Recorder(), Recorder()
        mux = UDPMux(stun, other)
        net.listen(A_ADDR, mux)
        self.assertIs(stun.transport, mux.transport)
        self.assertIs(other.transport, mux.transport)
        binding = bytes.fromhex("0001 0000 2112a442") + bytes(12)
        punch = encode(PacketType.PROBE, 0, b"s", 1, KEY)
        net.send(B_ADDR, A_ADDR, binding)
        net.send(B_ADDR, A_ADDR, punch)
        net.send(B_ADDR, A_ADDR, b"junk")
        clock.advance(0)
        self.assertEqual(stun.got, [(binding, B_ADDR)])
        self.assertEqual(other.got, [(punch, B_ADDR), (b"junk", B_ADDR)])

    def test_late_attach(self) -> None:
        net = MemoryUDPNetwork(Clock())
        mux = UDPMux()
        net.listen(A_ADDR, mux)
        stun = Recorder()
        mux.setSTUN(stun)
        self.assertIs(stun.transport, mux.transport)

    def test_endpoint_counts_and_routes(self) -> None:
        clock = Clock()
        net = MemoryUDPNetwork(clock)
        ep = PunchEndpoint()
        net.listen(A_ADDR, UDPMux(other=ep))
        seen = []

        class H:
            def packetReceived(self, packet, source):
                seen.append((packet.nonce, source))

        h = H()
        ep.register(b"s", h)
        net.send(B_ADDR, A_ADDR, encode(PacketType.PROBE, 1, b"s", 5, KEY))
        net.send(B_ADDR, A_ADDR, encode(PacketType.PROBE, 1, b"other", 5, KEY))
        net.send(B_ADDR, A_ADDR, b"\xce garbage")
        clock.advance(0)
        self.assertEqual(seen, [(5, B_ADDR)])
        self.assertEqual((ep.unrouted, ep.undecodable), (1, 1))
        ep.unregister(b"s", object())  # not the owner: no effect
        ep.unregister(b"s", h)
        net.send(B_ADDR, A_ADDR, encode(PacketType.PROBE, 1, b"s", 6, KEY))
        clock.advance(0)
        self.assertEqual(len(seen), 1)


class QuicRoutingTests(SynchronousTestCase):
    """The endpoint hands QUIC only to the handler routed for its exact source address."""

    def test_routes_by_address(self) -> None:
        clock = Clock()
        net = MemoryUDPNetwork(clock)
        ep = PunchEndpoint()
        net.listen(A_ADDR, UDPMux(other=ep))
        quic = bytes([0x41]) + bytes(40)
        other = ("203.0.113.5", 7)
        got = Recorder()
        ep.routeQuic(B_ADDR, got)
        net.send(B_ADDR, A_ADDR, quic)
        net.send(other, A_ADDR, quic)
        clock.advance(0)
        self.assertEqual(got.got, [(quic, B_ADDR)])
        self.assertEqual((ep.unsolicited_quic, ep.undecodable, ep.quicRoutes()), (1, 0, 1))
        ep.unrouteQuic(B_ADDR, Recorder())  # not the owner: no effect
        self.assertEqual(ep.quicRoutes(), 1)
        ep.unrouteQuic(B_ADDR, got)
        net.send(B_ADDR, A_ADDR, quic)
        clock.advance(0)
        self.assertEqual((len(got.got), ep.unsolicited_quic, ep.quicRoutes()), (1, 2, 0))


def advance(p, seconds: float, step: float = 0.001) -> None:
    """Move the fake clock in small steps so packets sent on the way are delivered."""
    p.clock.pump([step] * round(seconds / step))


class Pair:
    """Two peers on a fake network, each with a mux + endpoint, punching with QUIC on top."""

    def __init__(self, latency=0.025, drop=None, a_cands=(B_ADDR,), b_cands=(A_ADDR,), sec_a=SEC_A, sec_b=SEC_B, **kw):
        self.clock = Clock()
        self.clock.advance(1000)
        self.net = MemoryUDPNetwork(self.clock, latency=latency, drop=drop)
        self.ep_a, self.ep_b = PunchEndpoint(), PunchEndpoint()
        self.net.listen(A_ADDR, UDPMux(other=self.ep_a))
        self.net.listen(B_ADDR, UDPMux(other=self.ep_b))
        self.results = {}
        self.at = {}
        self.started = self.clock.seconds()
        self.da = punch_udp(self.ep_a, A, a_cands, self.clock, nonce_source=counter(), security=sec_a, **kw)
        self.db = punch_udp(self.ep_b, B, b_cands, self.clock, nonce_source=counter(), security=sec_b, **kw)
        self.da.addBoth(self._keep, "a")
        self.db.addBoth(self._keep, "b")

    def _keep(self, result, name):
        self.results[name] = result
        self.at[name] = self.clock.seconds() - self.started


class AttemptTests(SynchronousTestCase):
    def test_connects_in_two_rtt(self) -> None:
        """
        One round trip of punching, then one of QUIC for the client (role 0);
        the server (role 1) is ready half a round trip later.
        """
        p = Pair(latency=0.025, start_delay=0.1)
        advance(p, 0.195)
        self.assertEqual(p.results, {})
        advance(p, 0.015)  # two 50 ms round trips after the start
        a = p.results["a"]
        self.assertIsInstance(a, UDPPeerConnection)
        self.assertNotIn("b", p.results)
        advance(p, 0.03)
        b = p.results["b"]
        # (The clock moves in 1 ms steps: a few ms of slack.)
        self.assertTrue(0.1 <= p.at["a"] - 0.1 < 0.11, p.at)
        self.assertTrue(0.125 <= p.at["b"] - 0.1 < 0.135, p.at)
        self.assertEqual((a.remote_address.host, a.remote_address.port), B_ADDR)
        self.assertEqual((b.remote_address.host, b.remote_address.port), A_ADDR)
        self.assertEqual(
            (a.peer_id, b.peer_id, a.protocol, a.delivery, a.secure), ("bob", "alice", "udp", "datagram", True)
        )
        self.assertEqual((a.peer_fingerprint, b.peer_fingerprint), (BOB.fingerprint, ALICE.fingerprint))
        self.assertRegex(a.cipher, r"^QUICv1 TLS_")
        self.assertTrue(50 <= a.handshake_ms < 55, a.handshake_ms)
        self.assertTrue(75 <= b.handshake_ms < 85, b.handshake_ms)
        self.assertTrue(0.05 <= a.rtt < 0.055, a.rtt)
        verifyObject(IPeerConnection, a)
        verifyObject(IPeerConnection, b)

    def test_data_both_ways_as_ciphertext(self) -> None:
        p = Pair()
        advance(p, 1)
        a, b = p.results["a"], p.results["b"]
        ra, rb = Receiver(), Receiver()
        a.send(b"early")  # before b has a receiver: kept
        advance(p, 0.1)
        b.setReceiver(rb)
        a.setReceiver(ra)
        b.send(b"pong")
        a.send(b"ping")
        a.send(b"m" * a.max_datagram_size)
        advance(p, 0.1)
        self.assertEqual(rb.data, [b"early", b"ping", b"m" * a.max_datagram_size])
        self.assertEqual(ra.data, [b"pong"])
        self.assertRaises(ValueError, a.send, b"x" * (a.max_datagram_size + 1))
        after_punch = [d for _, _, _, d in p.net.sent if not d.startswith(b"\xce")]
        self.assertTrue(all(is_quic(d) for d in after_punch))
        for plain in (b"early", b"ping", b"pong", b"m" * 16):
            self.assertFalse(any(plain in d for _, _, _, d in p.net.sent), plain)

    def test_fails_with_reason_when_nothing_gets_through(self) -> None:
        p = Pair(drop=lambda s, d, data: True, schedule=ProbeSchedule(timeout=2.0))
        advance(p, 2.01)
        err = p.results["a"]
        self.assertTrue(err.check(PunchFailed))
        self.assertEqual(err.value.protocol, "udp")
        self.assertIn("within 2 s", err.value.reason)
        p.results["b"].trap(PunchFailed)
        self.assertEqual((p.ep_a.quicRoutes(), p.ep_b.quicRoutes()), (0, 0))

    def test_one_way_filter_still_connects(self) -> None:
        """B's first probes are dropped (A's NAT has no mapping yet), A's get through."""
        opened = []

        def drop(src, dst, data):
            # A's "port-restricted NAT": inbound from B passes only once A sent to B.
            if dst == A_ADDR and not opened:
                return True
            if src == A_ADDR:
                opened.append(True)
            return False

        p = Pair(drop=drop, start_delay=0.0)
        advance(p, 0.3)
        self.assertIsInstance(p.results["a"], UDPPeerConnection)
        self.assertIsInstance(p.results["b"], UDPPeerConnection)

    def test_server_follows_the_clients_initial(self) -> None:
        """
        Every ACK to B is lost, so B's punch never selects: the client's QUIC
        Initial, from the address B got A's verified probes from, completes it.
        """

        def drop(src, dst, data):
            return dst == B_ADDR and not is_quic(data) and decode(data).type == PacketType.ACK

        p = Pair(drop=drop)
        advance(p, 0.5)
        b = p.results["b"]
        self.assertIsInstance(b, UDPPeerConnection)
        self.assertIsNone(b.rtt)
        self.assertEqual(b.punch_stats.probes_sent > 0, True)

    def test_cancel_stops_probing(self) -> None:
        p = Pair(drop=lambda s, d, data: True)
        advance(p, 0.1)
        p.da.cancel()
        p.results["a"].trap(defer.CancelledError)
        n = len(p.ep_a.transport.written)
        advance(p, 10)
        self.assertEqual(len(p.ep_a.transport.written), n)

    def test_cancel_during_the_handshake(self) -> None:
        """Cancelled after the punch: the channel is closed and unrouted, no timer is left."""
        p = Pair(drop=lambda s, d, data: is_quic(data) and d == A_ADDR)
        advance(p, 0.1)
        self.assertEqual(p.ep_a.quicRoutes(), 1)
        p.da.cancel()
        p.results["a"].trap(defer.CancelledError)
        self.assertEqual(p.ep_a.quicRoutes(), 0)
        advance(p, 10, step=0.1)
        p.results["b"].trap(PunchFailed)
        self.assertEqual(p.clock.getDelayedCalls(), [])

    def test_handshake_timeout(self) -> None:
        """The punch works but QUIC never gets through: both fail, saying so."""
        p = Pair(drop=lambda s, d, data: is_quic(data), handshake_timeout=2.0)
        advance(p, 3, step=0.01)
        for side in "ab":
            err = p.results[side]
            err.trap(PunchFailed)
            self.assertIn("was punched but", err.value.reason)
            self.assertIn("within 2 s", err.value.reason)
        self.assertEqual(p.clock.getDelayedCalls(), [])

    def test_spoofed_packets_do_not_divert(self) -> None:
        """A third host that knows the session id but not the key changes nothing."""
        evil = ("203.0.113.66", 6666)
        p = Pair(start_delay=0.05)
        for t in (PacketType.PROBE, PacketType.ACK):
            for nonce in range(1, 5):
                p.net.send(evil, A_ADDR, encode(t, 1, b"sess-1", nonce, b"x" * 32, echo=nonce))
        advance(p, 1)
        a = p.results["a"]
        self.assertEqual((a.remote_address.host, a.remote_address.port), B_ADDR)
        # Nothing was ever sent to the spoofer.
        self.assertNotIn(evil, [addr for _, addr in p.ep_a.transport.written])


class ConnectionTests(SynchronousTestCase):
    def connected(self, **kw):
        p = Pair(keepalive_interval=15.0, **kw)
        advance(p, 1)
        return p, p.results["a"], p.results["b"]

    def test_pings_hold_the_path(self) -> None:
        p, a, b = self.connected()
        lost = []
        a.whenLost().addCallback(lost.append)
        b.whenLost().addCallback(lost.append)
        n = len(p.net.sent)
        p.clock.pump([5.0] * 60)  # 5 minutes, with nothing to send but PINGs
        self.assertEqual(lost, [])
        # About a PING and an ACK each way every 15 s.
        self.assertGreaterEqual(len(p.net.sent) - n, 2 * 19)
        self.assertTrue(all(is_quic(d) for _, _, _, d in p.net.sent[n:]))

    def test_dead_path_reported(self) -> None:
        cut = []
        p, a, b = self.connected(drop=lambda s, d, data: bool(cut))
        ra = Receiver()
        a.setReceiver(ra)
        cut.append(True)
        p.clock.pump([1.0] * 44)
        self.assertEqual(ra.lost, [])
        p.clock.pump([1.0] * 20)
        (reason,) = ra.lost
        reason.trap(ConnectionLost)
        self.assertIn("for 45 s (QUIC idle timeout, PING every 15 s)", reason.getErrorMessage())
        # Timers stopped: nothing more is sent, no route is left.
        n = len(p.ep_a.transport.written)
        advance(p, 100, step=0.1)
        self.assertEqual(len(p.ep_a.transport.written), n)
        self.assertEqual(p.ep_a.quicRoutes(), 0)

    def test_close_tells_the_peer(self) -> None:
        p, a, b = self.connected()
        ra, rb = Receiver(), Receiver()
        a.setReceiver(ra)
        b.setReceiver(rb)
        d = b.whenLost()
        a.close()
        a.close()
        advance(p, 2)  # the peer reports the close after its draining period
        ra.lost[0].trap(ConnectionDone)
        rb.lost[0].trap(ConnectionDone)
        self.assertIn("peer closed", rb.lost[0].getErrorMessage())
        self.assertIsInstance(self.successResultOf(d), ConnectionDone)
        self.assertIsInstance(self.successResultOf(a.whenLost()), ConnectionDone)
        a.send(b"ignored")
        self.assertEqual((p.ep_a.quicRoutes(), p.ep_b.quicRoutes()), (0, 0))

    def test_late_probe_not_answered_after_ready(self) -> None:
        """Once QUIC is up the punch is over: probes of the session are dropped as unrouted."""
        p, a, b = self.connected()
        n = len(p.ep_a.transport.written)
        p.net.send(B_ADDR, A_ADDR, encode(PacketType.PROBE, 1, b"sess-1", 4242, KEY))
        advance(p, 0.03)
        self.assertEqual(len(p.ep_a.transport.written), n)
        self.assertEqual(p.ep_a.unrouted, 1)

    def test_peer_streams_ignored(self) -> None:
        p, a, b = self.connected()
        ra = Receiver()
        a.setReceiver(ra)
        b._channel.sendStream(b._channel.openStream(), b"not for a datagram connection", fin=True)
        advance(p, 0.1)
        self.assertEqual((ra.data, a.ignored_streams), ([], 1))

"""Tests for natbypass.punch.udp and natbypass.punch.mux: UDP hole punching, in memory (real sockets: test_punch_udp_loopback.py)."""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass.interfaces import IPeerConnection, IPeerReceiver
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.packet import PacketType, decode, encode
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.udp import (
    Failed,
    ProbeSchedule,
    ReplayWindow,
    Selected,
    Send,
    UDPPeerConnection,
    UDPPunchMachine,
    punch_udp,
)
from natbypass.testing.udp import MemoryUDPNetwork

KEY = b"k" * 32
A = PunchSession("sess-1", KEY, 0, peer_id="bob")
B = PunchSession("sess-1", KEY, 1, peer_id="alice")
A_ADDR = ("198.18.1.10", 40000)
B_ADDR = ("198.18.2.10", 50000)


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
        self.assertEqual(decode(actions[0].data).type, PacketType.ACK)
        self.assertEqual(decode(actions[1].data).type, PacketType.PROBE)
        self.assertEqual(a.prflx, [prflx])
        self.assertIn(prflx, a.candidates)

    def test_early_probe_starts_punching(self) -> None:
        """The peer's clock runs ahead: start probing when its probe arrives."""
        a = self.machine(A, (B_ADDR,), start=5.0)
        actions = a.packet_received(4.0, decode(encode(PacketType.PROBE, 1, b"sess-1", 7, KEY)), B_ADDR)
        self.assertEqual([decode(x.data).type for x in actions], [PacketType.ACK, PacketType.PROBE])
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
        self.assertEqual(a.packet_received(1.5, decode(ack), B_ADDR), [Selected(B_ADDR, 0.5)])

    def test_failure_reason_when_only_inbound_works(self) -> None:
        a = self.machine(A, (B_ADDR,), schedule=ProbeSchedule(timeout=0.1))
        a.poll(1.0)
        a.packet_received(1.01, decode(encode(PacketType.PROBE, 1, b"sess-1", 5, KEY)), B_ADDR)
        (failed,) = a.poll(1.1)
        self.assertIn("the peer's probes reached us (1)", failed.reason)

    def test_early_data_kept(self) -> None:
        a = self.machine(A, (B_ADDR,))
        a.poll(1.0)
        a.packet_received(1.01, decode(encode(PacketType.DATA, 1, b"sess-1", 1, KEY, payload=b"hi")), B_ADDR)
        self.assertEqual(a.early_data, [b"hi"])


class ReplayWindowTests(SynchronousTestCase):
    def test_window(self) -> None:
        w = ReplayWindow(size=4)
        self.assertEqual([w.accept(s) for s in (1, 3, 2, 3, 0)], [True, True, True, False, False])
        self.assertTrue(w.accept(10))
        self.assertFalse(w.accept(6))  # fell out of the window
        self.assertTrue(w.accept(7))
        self.assertFalse(w.accept(7))


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


def advance(p, seconds: float, step: float = 0.001) -> None:
    """Move the fake clock in small steps so packets sent on the way are delivered."""
    p.clock.pump([step] * round(seconds / step))


class Pair:
    """Two peers on a fake network, each with a mux + endpoint."""

    def __init__(self, latency=0.025, drop=None, a_cands=(B_ADDR,), b_cands=(A_ADDR,), **kw):
        self.clock = Clock()
        self.net = MemoryUDPNetwork(self.clock, latency=latency, drop=drop)
        self.ep_a, self.ep_b = PunchEndpoint(), PunchEndpoint()
        self.net.listen(A_ADDR, UDPMux(other=self.ep_a))
        self.net.listen(B_ADDR, UDPMux(other=self.ep_b))
        self.results = {}
        self.da = punch_udp(self.ep_a, A, a_cands, self.clock, nonce_source=counter(), **kw)
        self.db = punch_udp(self.ep_b, B, b_cands, self.clock, nonce_source=counter(), **kw)
        self.da.addBoth(lambda r: self.results.__setitem__("a", r))
        self.db.addBoth(lambda r: self.results.__setitem__("b", r))


class AttemptTests(SynchronousTestCase):
    def test_connects_in_one_rtt(self) -> None:
        p = Pair(latency=0.025, start_delay=0.1)
        advance(p, 0.145)
        self.assertEqual(p.results, {})
        advance(p, 0.01)  # one 50 ms round trip after the start
        a, b = p.results["a"], p.results["b"]
        self.assertIsInstance(a, UDPPeerConnection)
        self.assertEqual((a.remote_address.host, a.remote_address.port), B_ADDR)
        self.assertEqual((b.remote_address.host, b.remote_address.port), A_ADDR)
        self.assertEqual((a.peer_id, b.peer_id, a.protocol), ("bob", "alice", "udp"))
        verifyObject(IPeerConnection, a)

    def test_data_both_ways(self) -> None:
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
        advance(p, 0.1)
        self.assertEqual(rb.data, [b"early", b"ping"])
        self.assertEqual(ra.data, [b"pong"])
        self.assertRaises(ValueError, a.send, b"x" * (a.max_datagram_size + 1))

    def test_replayed_data_dropped(self) -> None:
        p = Pair()
        advance(p, 1)
        a, b = p.results["a"], p.results["b"]
        rb = Receiver()
        b.setReceiver(rb)
        transport = p.ep_a.transport
        a.send(b"once")
        frame = transport.written[-1][0]
        p.net.send(A_ADDR, B_ADDR, frame)  # a byte-identical replay
        advance(p, 0.1)
        self.assertEqual(rb.data, [b"once"])

    def test_fails_with_reason_when_nothing_gets_through(self) -> None:
        p = Pair(drop=lambda s, d, data: True, schedule=ProbeSchedule(timeout=2.0))
        advance(p, 2.01)
        err = p.results["a"]
        self.assertTrue(err.check(PunchFailed))
        self.assertEqual(err.value.protocol, "udp")
        self.assertIn("within 2 s", err.value.reason)
        p.results["b"].trap(PunchFailed)

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
        advance(p, 0.2)
        self.assertIsInstance(p.results["a"], UDPPeerConnection)
        self.assertIsInstance(p.results["b"], UDPPeerConnection)

    def test_cancel_stops_probing(self) -> None:
        p = Pair(drop=lambda s, d, data: True)
        advance(p, 0.1)
        p.da.cancel()
        p.results["a"].trap(defer.CancelledError)
        n = len(p.ep_a.transport.written)
        advance(p, 10)
        self.assertEqual(len(p.ep_a.transport.written), n)

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

    def test_keepalives_hold_the_path(self) -> None:
        p, a, b = self.connected()
        lost = []
        a.whenLost().addCallback(lost.append)
        p.clock.pump([5.0] * 60)  # 5 minutes
        self.assertEqual(lost, [])
        kinds = [decode(d).type for d, _ in p.ep_a.transport.written]
        self.assertGreaterEqual(kinds.count(PacketType.KEEPALIVE), 19)
        self.assertGreaterEqual(kinds.count(PacketType.KEEPALIVE_ACK), 19)

    def test_dead_path_reported(self) -> None:
        cut = []
        p, a, b = self.connected(drop=lambda s, d, data: bool(cut))
        ra = Receiver()
        a.setReceiver(ra)
        cut.append(True)
        p.clock.pump([1.0] * 44)
        self.assertEqual(ra.lost, [])
        p.clock.pump([1.0] * 2)
        (reason,) = ra.lost
        reason.trap(ConnectionLost)
        self.assertIn("for 45 s", reason.getErrorMessage())
        # Timers stopped: nothing more is sent.
        n = len(p.ep_a.transport.written)
        advance(p, 100)
        self.assertEqual(len(p.ep_a.transport.written), n)

    def test_close_tells_the_peer(self) -> None:
        p, a, b = self.connected()
        ra, rb = Receiver(), Receiver()
        a.setReceiver(ra)
        b.setReceiver(rb)
        d = b.whenLost()
        a.close()
        a.close()
        advance(p, 0.1)
        ra.lost[0].trap(ConnectionDone)
        rb.lost[0].trap(ConnectionDone)
        self.assertIn("peer closed", rb.lost[0].getErrorMessage())
        self.assertIsInstance(self.successResultOf(d), ConnectionDone)
        self.assertIsInstance(self.successResultOf(a.whenLost()), ConnectionDone)
        a.send(b"ignored")

    def test_late_probe_answered(self) -> None:
        """If the peer missed our ACK, the connection still answers its probes."""
        p, a, b = self.connected()
        p.net.send(B_ADDR, A_ADDR, encode(PacketType.PROBE, 1, b"sess-1", 4242, KEY))
        advance(p, 0.03)
        data, addr = p.ep_a.transport.written[-1]
        self.assertEqual((decode(data).type, decode(data).echo, addr), (PacketType.ACK, 4242, B_ADDR))

    def test_invalid_packets_counted(self) -> None:
        p, a, b = self.connected()
        p.net.send(B_ADDR, A_ADDR, encode(PacketType.CLOSE, 1, b"sess-1", 1, b"x" * 32))
        advance(p, 0.1)
        self.assertEqual(a.invalid, 1)
        self.assertFalse(a.whenLost().called)

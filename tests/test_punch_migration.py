"""
Tests for natbypass.punch.migration: the UDP path follows a NAT rebinding
(QUIC connection migration through the punch endpoint), a silent path is
probed and reported within seconds, and what a hostile sender can do about
it.  In memory (MemoryNAT.flush stands in for a conntrack flush); the same
through real kernel NATs: test_lab_migration.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch.migration import MAX_MOVES, TRIAL_BURST, MoveBudget, PathWatch, WatchBounds
from natbypass.testing.udp import ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, ENDPOINT_INDEPENDENT
from tests.test_punch_udp import A_ADDR, A_SRFLX, B_ADDR, ConePair, Pair, advance

#: Where A's NAT maps it after the flush.
A_REBOUND = (A_SRFLX[0], 61000)


class MoveBudgetTests(SynchronousTestCase):
    def test_limit_per_window(self) -> None:
        budget = MoveBudget(limit=2, window=10.0)
        self.assertTrue(budget.allows(0.0))
        budget.record(0.0)
        budget.record(1.0)
        self.assertFalse(budget.allows(5.0))
        self.assertTrue(budget.allows(10.0))  # the first move no longer counts

    def test_rejects_empty_budgets(self) -> None:
        self.assertRaises(ValueError, MoveBudget, 0)
        self.assertRaises(ValueError, MoveBudget, 1, 0.0)

    @given(st.lists(st.floats(min_value=0, max_value=1000), max_size=60))
    def test_never_more_than_limit_in_a_window(self, times: list[float]) -> None:
        budget = MoveBudget(limit=3, window=30.0)
        accepted: list[float] = []
        for now in sorted(times):
            if budget.allows(now):
                budget.record(now)
                accepted.append(now)
        for t in accepted:
            self.assertLessEqual(sum(1 for u in accepted if t <= u < t + 30.0), 3)


class PathWatchTests(SynchronousTestCase):
    def test_idle_path_is_not_probed(self) -> None:
        """Past the keepalive interval without data, the keepalive is enough: no probes."""
        watch = PathWatch(active_window=15.0)
        step = watch.poll(100.0, heard_at=50.0, data_at=50.0)
        self.assertFalse(step.probe)
        self.assertEqual(step.wake, 101.0)
        # Nor a path that never carried data (a fresh connection).
        self.assertFalse(watch.poll(2.0, heard_at=0.0, data_at=float("-inf")).probe)

    def test_silence_while_data_flows_is_probed(self) -> None:
        watch = PathWatch(active_window=15.0)
        self.assertFalse(watch.poll(10.5, heard_at=10.0, data_at=10.0).probe)
        step = watch.poll(11.0, heard_at=10.0, data_at=10.9)
        self.assertEqual((step.probe, step.suspect, step.wake), (True, None, 11.5))

    def test_unanswered_probe_makes_the_path_suspect_then_recovery_measures_the_stall(self) -> None:
        watch = PathWatch(active_window=15.0)
        watch.poll(11.0, heard_at=10.0, data_at=10.9)  # probe
        step = watch.poll(11.5, heard_at=10.0, data_at=10.9)
        self.assertEqual((step.probe, step.suspect), (True, 1.5))
        self.assertTrue(watch.suspect)
        # Still probing while suspect, even once data stopped long ago.
        self.assertTrue(watch.poll(40.0, heard_at=10.0, data_at=10.9).probe)
        self.assertIsNone(watch.poll(40.2, heard_at=10.0, data_at=10.9).suspect)  # reported once
        step = watch.poll(40.6, heard_at=40.5, data_at=40.5)
        self.assertEqual((step.recovered, watch.last_stall, watch.recoveries), (30.5, 30.5, 1))
        self.assertFalse(watch.suspect)

    def test_bounds_follow_the_round_trip(self) -> None:
        watch = PathWatch(active_window=15.0, bounds=WatchBounds())
        self.assertEqual((watch.quiet, watch.answer_timeout), (1.0, 0.5))
        watch.rtt = 0.4
        self.assertAlmostEqual(watch.quiet, 1.6)
        self.assertAlmostEqual(watch.answer_timeout, 1.2)
        watch.rtt = 5.0
        self.assertEqual((watch.quiet, watch.answer_timeout), (15.0, 3.0))  # capped

    @given(
        st.lists(
            st.tuples(st.floats(0.0, 2.0), st.booleans(), st.booleans()),
            min_size=1,
            max_size=80,
        ),
        st.one_of(st.none(), st.floats(0.001, 2.0)),
    )
    def test_probes_at_most_once_per_answer_timeout(self, steps, rtt) -> None:
        """Whatever the peer and the application do, probes are spaced by at least the answer timeout."""
        watch = PathWatch(active_window=15.0)
        watch.rtt = rtt
        now = heard = data = 0.0
        probes: list[float] = []
        for dt, hear, use in steps:
            now += dt
            heard = now if hear else heard
            data = now if use else data
            step = watch.poll(now, heard, data)
            if step.probe:
                probes.append(now)
            self.assertGreaterEqual(step.wake, now)
        for a, b in zip(probes, probes[1:]):
            self.assertGreaterEqual(b - a, min(watch.answer_timeout, watch.quiet) - 1e-9)


def stream(p, src, dst, interval=0.02):
    """C{src} sends a numbered datagram every C{interval}; what C{dst} receives is kept with its time."""
    got: list[tuple[float, bytes]] = []

    class R:
        def dataReceived(self, data):
            got.append((p.clock.seconds(), data))

        def connectionLost(self, reason):
            got.append((p.clock.seconds(), reason))

    dst.setReceiver(R())
    sent = [0]

    def tick():
        sent[0] += 1
        src.send(b"%d" % sent[0])

    loop = LoopingCall(tick)
    loop.clock = p.clock
    loop.start(interval)
    return got, sent, loop


def longest_gap(got, after: float) -> float:
    times = [t for t, d in got if isinstance(d, bytes) and t >= after]
    return max(b - a for a, b in zip(times, times[1:]))


class RebindingTests(SynchronousTestCase):
    """A's NAT (endpoint-independent mapping) forgets everything; B's NAT filters by address or not at all."""

    def pair(self, b_filtering=ADDRESS_DEPENDENT, **kw) -> ConePair:
        p = ConePair(**kw)
        p.net.nats[1].filtering = b_filtering
        p.run(1.0)
        self.a, self.b = p.results["a"], p.results["b"]
        return p

    def flush_under(self, p: ConePair, src, dst, after: float) -> tuple[list, list, float]:
        """A stream from C{src} to C{dst} for a second, A's NAT flushed, the stream on for C{after} seconds."""
        got, sent, loop = stream(p, src, dst)
        p.run(1.0)
        flushed = p.clock.seconds()
        p.net.nats[0].flush(A_REBOUND[1])
        p.run(after)
        loop.stop()
        p.run(0.2)
        return got, sent, flushed

    def test_rebinding_sender_moves_the_path_at_once(self) -> None:
        for filtering in (ADDRESS_DEPENDENT, ENDPOINT_INDEPENDENT):
            p = self.pair(filtering)
            got, sent, flushed = self.flush_under(p, self.a, self.b, 2.0)
            self.assertEqual([(m.old, m.new) for m in self.b.path.moves], [(A_SRFLX, A_REBOUND)], filtering)
            self.assertEqual((self.b.remote_address.host, self.b.remote_address.port), A_REBOUND)
            # Same connection, nothing lost but what was in flight at the flush (datagrams are unreliable).
            self.assertGreaterEqual(len(got), sent[0] - 3, filtering)
            self.assertLess(longest_gap(got, flushed - 0.1), 0.2, filtering)
            self.assertEqual(self.a.path.watch.suspects + self.b.path.watch.suspects, 0)

    def test_rebinding_receiver_probes_and_the_path_follows(self) -> None:
        """
        A only receives: after the flush nothing reaches it, it probes within
        its quiet bound, the probe opens its new mapping, B moves there.
        """
        p = self.pair()
        got, sent, flushed = self.flush_under(p, self.b, self.a, 4.0)
        self.assertEqual([m.new for m in self.b.path.moves], [A_REBOUND])
        stall = longest_gap(got, flushed - 0.1)
        # The quiet bound (1 s: 4 round trips of 100 ms are less), then B
        # validates A's new address (PATH_CHALLENGE and its answer: one
        # round trip) before it sends there: a few round trips in all.
        bound = self.a.path.watch.quiet + 5 * 0.1
        self.assertLess(stall, bound)
        self.assertGreater(stall, self.a.path.watch.quiet - 0.1)
        self.assertEqual(got[-1][0] > flushed + 3, True)
        self.assertFalse(any(isinstance(d, Exception) for _, d in got))

    def test_port_restricted_peer_path_is_reported_suspect_then_lost(self) -> None:
        """
        B's NAT filters by address and port: A's new mapping cannot reach
        it; both sides report the path suspect within seconds; it ends at
        QUIC's idle timeout (no re-punch through the mediator yet).
        """
        p = self.pair(ADDRESS_AND_PORT_DEPENDENT, keepalive_interval=2.0)
        got, sent, loop = stream(p, self.a, self.b)
        p.run(1.0)
        p.net.nats[0].flush(A_REBOUND[1])
        p.run(3.0)
        self.assertEqual(self.b.path.moves, [])
        self.assertEqual((self.a.path.watch.suspects, self.b.path.watch.suspects), (1, 1))
        loop.stop()
        p.run(6.0)
        reason = got[-1][1].value
        self.assertIsInstance(reason, ConnectionLost)
        self.assertIn("idle timeout", str(reason))

    def test_routes_gone_with_the_path(self) -> None:
        p = self.pair()
        self.assertGreater(p.ep_b.cidRoutes(), 0)
        self.a.close()
        p.run(2.0)
        self.assertEqual((p.ep_a.cidRoutes(), p.ep_b.cidRoutes()), (0, 0))
        self.assertEqual((p.ep_a.quicRoutes(), p.ep_b.quicRoutes()), (0, 0))

    def test_aioquic_follows_too(self) -> None:
        p = self.pair(engine="aioquic")
        got, sent, loop = stream(p, self.a, self.b)
        p.run(0.5)
        p.net.nats[0].flush(A_REBOUND[1])
        p.run(1.0)
        loop.stop()
        self.assertEqual([m.new for m in self.b.path.moves], [A_REBOUND])


E = "198.18.3."


class HostileTests(SynchronousTestCase):
    """What a sender that is not the peer can do to an established path (no NATs: A_ADDR <-> B_ADDR)."""

    def connected(self, drop=None, **kw) -> Pair:
        p = Pair(start_delay=0.05, drop=drop, **kw)
        advance(p, 1)
        self.a, self.b = p.results["a"], p.results["b"]
        return p

    def test_forged_packets_with_our_connection_id_move_nothing_and_are_rate_bounded(self) -> None:
        """
        An off-path sender that somehow learned B's connection id sends junk
        under it from many addresses: QUIC's AEAD drops it, the path stays,
        and at most the trial budget (64 at once, 64 a second) ever reaches
        the engine.
        """
        p = self.connected()
        cid = next(iter(self.b._channel.host_cids))
        for i in range(1000):
            p.net.send((E + str(i % 250 + 1), 7000 + i), B_ADDR, b"\x40" + cid + bytes(40))
        advance(p, 0.1)
        self.assertEqual(p.ep_b.migrating_quic, 1000)
        self.assertEqual(self.b.path.throttled, 1000 - TRIAL_BURST)
        self.assertEqual(self.b.path.moves, [])
        self.assertEqual([s for _, s, to, _ in p.net.sent if s == B_ADDR and to[0].startswith(E)], [])
        got, sent, loop = stream(p, self.a, self.b)
        advance(p, 0.5)
        loop.stop()
        self.assertGreaterEqual(len(got), sent[0] - 2)

    def race(self, engine: str) -> tuple[Pair, list, list]:
        """
        An on-path attacker copies each of A's packets and gets the copy to B
        first, each time from a new address of its own, for two seconds.
        """
        copies = [0]
        state = {"net": None}

        def race(src, dst, data):
            if src == A_ADDR and dst == B_ADDR and data[0] & 0xC0 == 0x40 and state["net"] is not None:
                copies[0] += 1
                state["net"].send((E + str(copies[0]), 9000), B_ADDR, data)
            return False

        p = self.connected(drop=race, engine=engine)
        got, sent, loop = stream(p, self.a, self.b, interval=0.05)
        advance(p, 1.0)
        state["net"] = p.net
        advance(p, 2.0)
        state["net"] = None
        advance(p, 1.0)
        loop.stop()
        advance(p, 0.2)
        self.assertGreater(copies[0], 30)
        data = [d for _, d in got]
        self.assertEqual(len(data), len(set(data)), "a datagram was delivered twice")
        self.assertEqual(data[-1], b"%d" % sent[0])
        self.assertEqual((self.b.remote_address.host, self.b.remote_address.port), A_ADDR)
        return p, got, sent

    def test_racing_copies_do_not_move_a_qh3_path(self) -> None:
        """
        qh3 validates a new address (PATH_CHALLENGE, answered from there)
        before it moves: the attacker cannot answer, so the path never moves.
        """
        p, got, sent = self.race("qh3")
        self.assertEqual(self.b.path.moves, [])
        self.assertEqual(len(got), sent[0])

    def test_racing_copies_move_an_aioquic_path_a_bounded_number_of_times(self) -> None:
        """
        aioquic moves at once (RFC 9000 allows it) and validates afterwards:
        the copies move the path, but only MAX_MOVES times in the window; the
        genuine packets then bring it back, for free.
        """
        p, got, sent = self.race("aioquic")
        new = [m.new for m in self.b.path.moves if m.new != A_ADDR]
        self.assertEqual(len(new), MAX_MOVES)
        self.assertGreater(self.b.path.refused, 0)
        self.assertEqual(self.b.path.moves[-1].new, A_ADDR)

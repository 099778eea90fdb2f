"""Tests for natbypass.punch.flight: when a handshake flight is sent again, on a Clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch import flight
from natbypass.punch.flight import FlightResender


class Harness:
    def __init__(self, rtt: float | None = 0.1) -> None:
        self.clock = Clock()
        self.out: list[tuple[float, bytes]] = []
        self.wanted = True
        self.r = FlightResender(self.clock, lambda d: self.out.append((self.clock.seconds(), d)), lambda: self.wanted)
        if rtt is not None:
            self.r.knowRtt(rtt)

    def run(self, seconds: float) -> None:
        """Advance from timer to timer (exact times) for C{seconds}."""
        end = self.clock.seconds() + seconds
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= end]
            if not due:
                break
            self.clock.advance(min(due) - self.clock.seconds())
        self.clock.advance(end - self.clock.seconds())


class FlightResenderTests(SynchronousTestCase):
    def test_resent_at_two_four_eight_round_trips(self) -> None:
        h = Harness(rtt=0.1)
        h.r.sent(b"a")
        h.r.sent(b"b")
        h.run(5.0)
        times = sorted({round(t, 3) for t, _ in h.out})
        # 2R after the last send, then 4R, 8R, 16R after each resend: four resends, no more.
        self.assertEqual(times, [0.2, 0.6, 1.4, 3.0])
        self.assertEqual([d for _, d in h.out], [b"a", b"b"] * flight.MAX_RESENDS)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_guessed_round_trip_until_measured(self) -> None:
        h = Harness(rtt=None)
        h.r.sent(b"a")
        h.run(0.1)
        h.r.knowRtt(0.03)  # measured: 2R after the send is past, so at once
        h.run(0.1)
        self.assertEqual([round(t, 3) for t, _ in h.out], [0.1])
        h2 = Harness(rtt=None)
        h2.r.sent(b"a")
        h2.run(0.25)
        self.assertEqual([round(t, 3) for t, _ in h2.out], [2 * flight.GUESS_RTT])

    def test_each_send_restarts_the_wait(self) -> None:
        h = Harness(rtt=0.1)
        h.r.sent(b"a")
        h.run(0.15)
        h.r.sent(b"b")  # the engine sent more: the handshake moves, wait again
        h.run(0.1)
        self.assertEqual(h.out, [])
        h.run(0.11)
        self.assertEqual([d for _, d in h.out], [b"a", b"b"])

    def test_keeps_the_latest_datagrams_only(self) -> None:
        h = Harness(rtt=0.1)
        for i in range(flight.MAX_DATAGRAMS + 3):
            h.r.sent(bytes([i]))
        h.run(0.21)
        self.assertEqual([d for _, d in h.out], [bytes([i]) for i in range(3, flight.MAX_DATAGRAMS + 3)])

    def test_a_repeat_from_the_peer_is_answered_at_once(self) -> None:
        h = Harness(rtt=0.1)
        h.r.received(b"hello")
        h.r.sent(b"answer")
        h.run(0.1)
        h.r.received(b"hello")  # the peer repeats itself: it did not hear our answer
        self.assertEqual([(round(t, 3), d) for t, d in h.out], [(0.1, b"answer")])
        h.r.received(b"other")  # new bytes are not a repeat
        self.assertEqual(len(h.out), 1)

    def test_repeats_within_the_least_wait_are_ignored(self) -> None:
        h = Harness(rtt=0.1)
        h.r.received(b"hello")
        h.r.sent(b"answer")
        h.run(flight.MIN_WAIT / 2)
        h.r.received(b"hello")
        self.assertEqual(h.out, [])

    def test_nothing_when_not_wanted_or_stopped(self) -> None:
        h = Harness(rtt=0.1)
        h.r.sent(b"a")
        h.wanted = False
        h.run(1.0)
        self.assertEqual(h.out, [])
        h2 = Harness(rtt=0.1)
        h2.r.sent(b"a")
        h2.r.stop()
        h2.r.sent(b"b")
        h2.r.received(b"x")
        h2.r.received(b"x")
        h2.run(1.0)
        self.assertEqual(h2.out, [])
        self.assertEqual(h2.clock.getDelayedCalls(), [])

    @given(st.lists(st.tuples(st.sampled_from(["sent", "received", "advance"]), st.binary(max_size=3)), max_size=60))
    @settings(max_examples=60, deadline=None)
    def test_bounded_whatever_the_peer_sends(self, events) -> None:
        """A hostile peer repeating datagrams cannot make us send more than MAX_RESENDS flights."""
        h = Harness(rtt=0.01)
        sent = 0
        for kind, data in events:
            if kind == "sent":
                h.r.sent(data)
                sent += 1
            elif kind == "received":
                h.r.received(data)
            else:
                h.clock.advance(0.06)
        h.run(2.0)
        self.assertLessEqual(len(h.out), flight.MAX_RESENDS * flight.MAX_DATAGRAMS)
        self.assertLessEqual(h.r.resends, flight.MAX_RESENDS)

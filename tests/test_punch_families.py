"""
Tests for natbypass.punch.families: happy eyeballs across address families
(RFC 8305 style), on a Clock.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch import families
from natbypass.punch.race import AllAttemptsFailed


class Attempts:
    """Attempt factories whose Deferreds the test fires by hand."""

    def __init__(self) -> None:
        self.started: dict[str, Deferred] = {}
        self.delays: dict[str, float] = {}
        self.cancelled: list[str] = []

    def factory(self, name: str):
        def start(delay: float) -> Deferred:
            d: Deferred = Deferred(lambda _: self.cancelled.append(name))
            self.started[name] = d
            self.delays[name] = delay
            return d

        return start


class SplitTests(SynchronousTestCase):
    def test_split(self) -> None:
        v6, v4 = families.split([("2001:2::1", 1), ("198.18.1.1", 2), ("::1", 3)])
        self.assertEqual(v6, [("2001:2::1", 1), ("::1", 3)])
        self.assertEqual(v4, [("198.18.1.1", 2)])

    @given(st.lists(st.tuples(st.ip_addresses().map(str), st.integers(1, 65535)), max_size=10))
    def test_split_keeps_everything_in_order(self, addresses) -> None:
        v6, v4 = families.split(addresses)
        self.assertEqual(sorted(v6 + v4), sorted(addresses))
        self.assertEqual(v6, [a for a in addresses if ":" in a[0]])

    def test_family_of_address(self) -> None:
        self.assertEqual(families.family_name("2001:2::1"), "v6")
        self.assertEqual(families.family_name("198.18.1.1"), "v4")


class FamilyRaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.attempts = Attempts()

    def race(self, v6=True, v4=True, head_start=families.FAMILY_HEAD_START, start_delay=0.0):
        factory = families.family_attempt(
            "udp",
            self.attempts.factory("v6") if v6 else None,
            self.attempts.factory("v4") if v4 else None,
            self.clock,
            head_start,
            start_delay,
        )
        return factory

    def test_one_family_is_the_attempt_itself(self) -> None:
        self.assertIsNone(self.race(v6=False, v4=False))
        d = self.race(v6=False)()
        self.assertEqual(list(self.attempts.started), ["v4"])
        self.attempts.started["v4"].callback("conn4")
        self.assertEqual(self.successResultOf(d), "conn4")

    def test_ipv6_first_and_wins(self) -> None:
        """IPv6 starts at once; IPv4 only after the head start; an IPv6 win before it means no IPv4 at all."""
        d = self.race()()
        self.assertEqual(list(self.attempts.started), ["v6"])
        self.clock.advance(families.FAMILY_HEAD_START * 0.9)
        self.attempts.started["v6"].callback("conn6")
        self.assertEqual(self.successResultOf(d), "conn6")
        self.clock.advance(10)
        self.assertEqual(list(self.attempts.started), ["v6"])

    def test_ipv4_after_head_start(self) -> None:
        """IPv6 silent: IPv4 starts after the head start, wins, and the IPv6 attempt is cancelled."""
        d = self.race()()
        self.clock.advance(families.FAMILY_HEAD_START)
        self.assertEqual(list(self.attempts.started), ["v6", "v4"])
        self.attempts.started["v4"].callback("conn4")
        self.assertEqual(self.successResultOf(d), "conn4")
        self.assertEqual(self.attempts.cancelled, ["v6"])

    def test_ipv6_fails_fast(self) -> None:
        """IPv6 failing at once starts IPv4 at once (no waiting out the head start)."""
        d = self.race()()
        self.attempts.started["v6"].errback(OSError("network unreachable"))
        self.assertEqual(list(self.attempts.started), ["v6", "v4"])
        self.attempts.started["v4"].errback(OSError("timed out"))
        failure = self.failureResultOf(d, AllAttemptsFailed)
        self.assertIn("udp/v6: failed", str(failure.value))
        self.assertIn("udp/v4: failed", str(failure.value))

    def test_head_start_counts_from_the_punch_start(self) -> None:
        """
        With a start delay (the mediator's start time), the race begins then:
        IPv6 at the start, IPv4 a head start after it, both with no delay of
        their own; a lone family waits out the start delay itself.
        """
        d = self.race(start_delay=0.06)()
        self.clock.advance(0.05)
        self.assertEqual(self.attempts.started, {})
        self.clock.advance(0.01)
        self.assertEqual(list(self.attempts.started), ["v6"])
        self.clock.advance(families.FAMILY_HEAD_START)
        self.assertEqual(self.attempts.delays, {"v6": 0.0, "v4": 0.0})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        lone = self.race(v6=False, start_delay=0.06)()
        self.assertEqual(self.attempts.delays["v4"], 0.06)
        lone.cancel()
        self.failureResultOf(lone, CancelledError)

    def test_cancel_before_the_start(self) -> None:
        d = self.race(start_delay=0.06)()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(1)
        self.assertEqual(self.attempts.started, {})

    def test_cancel_stops_both(self) -> None:
        d = self.race()()
        self.clock.advance(families.FAMILY_HEAD_START)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(sorted(self.attempts.cancelled), ["v4", "v6"])

    def test_head_start_in_rfc8305_range(self) -> None:
        """RFC 8305 5: a connection attempt delay of at least 100 ms and at most 2 s (250 ms recommended)."""
        self.assertTrue(0.1 <= families.FAMILY_HEAD_START <= 0.25)

"""
Tests for the delay line of the lab's delaying wire.
"""

from __future__ import annotations

import argparse

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import wire
from natbypass.lab.wire import DelayLine


class DelayLineTests(SynchronousTestCase):
    def test_fixed_delay(self) -> None:
        line = DelayLine(0.02, 0.0, lambda a, b: 0.0)
        line.push(1.0, b"a")
        line.push(1.005, b"b")
        self.assertEqual(line.next_due(), 1.02)
        self.assertEqual(line.pop_due(1.0199), [])
        self.assertEqual(line.pop_due(1.02), [b"a"])
        self.assertEqual(line.pop_due(1.03), [b"b"])
        self.assertIsNone(line.next_due())

    def test_jitter_uses_the_draw(self) -> None:
        line = DelayLine(0.02, 0.005, lambda a, b: b)
        line.push(0.0, b"x")
        self.assertAlmostEqual(line.next_due(), 0.025)  # type: ignore[arg-type]

    def test_no_reordering(self) -> None:
        """A frame drawn earlier than its predecessor leaves right after it."""
        draws = iter([0.005, -0.005])
        line = DelayLine(0.02, 0.005, lambda a, b: next(draws))
        line.push(0.0, b"first")
        line.push(0.001, b"second")
        self.assertEqual(line.pop_due(1.0), [b"first", b"second"])

    def test_queue_limit(self) -> None:
        line = DelayLine(1.0, 0.0, lambda a, b: 0.0)
        for _ in range(wire.QUEUE_LIMIT + 3):
            line.push(0.0, b"f")
        self.assertEqual(len(line), wire.QUEUE_LIMIT)
        self.assertEqual(line.dropped, 3)

    def test_bad_parameters(self) -> None:
        self.assertRaises(ValueError, DelayLine, 0.01, 0.02, lambda a, b: 0.0)
        self.assertRaises(ValueError, DelayLine, -1, 0, lambda a, b: 0.0)

    @given(st.lists(st.tuples(st.floats(0, 0.1), st.floats(-1, 1)), max_size=50), st.floats(0, 0.5), st.floats(0, 1))
    @settings(deadline=None)
    def test_bounds_and_order(self, arrivals: list[tuple[float, float]], delay: float, jfrac: float) -> None:
        """Every frame leaves in order, no earlier than delay-jitter after it came."""
        jitter = delay * jfrac
        now, frames, draws = 0.0, [], iter([u for _, u in arrivals])
        line = DelayLine(delay, jitter, lambda a, b: next(draws) * b)
        for i, (gap, _) in enumerate(arrivals):
            now += gap
            line.push(now, str(i).encode())
            frames.append((now, str(i).encode()))
            self.assertGreaterEqual(line.next_due(), frames[0][0] + delay - jitter - 1e-9)  # type: ignore[operator]
        out = line.pop_due(now + delay + jitter + 1)
        self.assertEqual(out, [f for _, f in frames])

    def test_endpoint_argument(self) -> None:
        self.assertEqual(wire._endpoint("ns:wan0"), ("ns", "wan0"))
        for bad in ("ns", ":x", "ns:", "ns:" + "x" * 16):
            self.assertRaises(argparse.ArgumentTypeError, wire._endpoint, bad)

"""Tests for natbypass.punch.race: happy eyeballs over attempt factories."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch.race import AllAttemptsFailed, Outcome, race
from natbypass.punch.session import PunchFailed


class Conn:
    def __init__(self, name):
        self.name = name
        self.closed = False

    def close(self):
        self.closed = True


class RaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pending: dict[str, Deferred] = {}
        self.cancelled: list[str] = []

    def factory(self, name):
        def make():
            d = Deferred(lambda _: self.cancelled.append(name))
            self.pending[name] = d
            return d

        return make

    def test_first_wins_second_never_starts(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25, outcome=outcome)
        self.clock.advance(0.1)
        conn = Conn("udp")
        self.pending["udp"].callback(conn)
        self.assertIs(self.successResultOf(d), conn)
        self.clock.advance(1)
        self.assertNotIn("tcp", self.pending)
        self.assertEqual(outcome.winner, "udp")
        self.assertEqual(
            [(a.protocol, a.result) for a in outcome.attempts], [("udp", "connected"), ("tcp", "not-started")]
        )
        self.assertEqual((outcome.attempts[0].started_ms, outcome.attempts[0].ended_ms), (0, 100))

    def test_head_start_then_second_wins(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25, outcome=outcome)
        self.clock.advance(0.2)
        self.assertNotIn("tcp", self.pending)
        self.clock.advance(0.05)
        self.assertIn("tcp", self.pending)
        self.clock.advance(0.25)
        self.pending["tcp"].callback(Conn("tcp"))
        self.assertEqual(self.successResultOf(d).name, "tcp")
        self.assertEqual(self.cancelled, ["udp"])
        udp, tcp = outcome.attempts
        self.assertEqual((udp.result, udp.reason, udp.ended_ms), ("cancelled", "another attempt won", 500))
        self.assertEqual((tcp.result, tcp.started_ms, tcp.ended_ms), ("connected", 250, 500))

    def test_failure_starts_next_at_once(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25, outcome=outcome)
        self.clock.advance(0.1)
        self.pending["udp"].errback(PunchFailed("udp", "nothing came back"))
        self.assertIn("tcp", self.pending)
        self.assertEqual(outcome.attempts[1].started_ms, 100)
        self.clock.advance(10)  # the cancelled head-start timer does not start anything twice
        self.pending["tcp"].errback(PunchFailed("tcp", "refused"))
        f = self.failureResultOf(d, AllAttemptsFailed)
        self.assertEqual(
            [(a.protocol, a.result, a.reason) for a in f.value.outcome.attempts],
            [("udp", "failed", "nothing came back"), ("tcp", "failed", "refused")],
        )
        self.assertIn("udp: failed after 100 ms (nothing came back)", str(f.value))

    def test_failure_while_other_running_waits_for_it(self) -> None:
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, 0.25)
        self.clock.advance(0.3)
        self.pending["udp"].errback(PunchFailed("udp", "x"))
        self.assertNoResult(d)
        self.pending["tcp"].callback(Conn("tcp"))
        self.assertEqual(self.successResultOf(d).name, "tcp")

    def test_caller_cancels(self) -> None:
        outcome = Outcome()
        d = race([("udp", self.factory("udp")), ("tcp", self.factory("tcp"))], self.clock, outcome=outcome)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.cancelled, ["udp"])
        self.assertEqual(outcome.attempts[0].result, "cancelled")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_factory_raising(self) -> None:
        def broken():
            raise RuntimeError("no socket")

        outcome = Outcome()
        d = race([("udp", broken), ("tcp", lambda: fail(PunchFailed("tcp", "nope")))], self.clock, outcome=outcome)
        f = self.failureResultOf(d, AllAttemptsFailed)
        self.assertEqual(f.value.outcome.attempts[0].reason, "no socket")
        self.assertEqual(outcome.to_json()["attempts"][1]["result"], "failed")
        # a raising factory is a bug: logged with its traceback, not only recorded
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

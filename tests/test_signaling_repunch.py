"""
The mediator's re-punch of an established session (issue 12): the wire
messages, who may ask, how often, and what the other peer is told.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.signaling import wire
from natbypass.signaling.repunch import PathTable, same_host
from natbypass.signaling.wire import (
    Accept,
    Candidate,
    Connect,
    Error,
    Offer,
    Ok,
    Repunch,
    RepunchNotice,
    SessionReply,
    WireError,
)
from natbypass.testing.signaling import Harness, udp_first
from tests.test_signaling_server import DESC_A, DESC_B

#: Field values: the right types, wrong ones, candidates well and badly formed.
VALUES = st.sampled_from(
    [None, True, 0, -1, 1, 2**60, "", "s1", "bad id", "x" * 100, [], {}, 1.5]
    + [
        {"kind": k, "proto": p, "host": h, "port": 9}
        for k in ("srflx", "host")
        for p in ("udp", "tcp")
        for h in ("192.0.2.1", "x")
    ]
)
A_SOURCE, B_SOURCE, C_SOURCE = "203.0.113.1", "198.51.100.2", "192.0.2.9"


class WireTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for m in (Repunch(1, "s1"), Repunch(2, "s-2", Candidate("srflx", "203.0.113.1", 40000))):
            self.assertEqual(wire.decode_from_client(wire.encode(m)), m)
        for n in (RepunchNotice("s1"), RepunchNotice("s1", Candidate("srflx", "2001:db8::1", 9))):
            self.assertEqual(wire.decode_from_server(wire.encode(n)), n)

    def test_only_one_srflx_candidate(self) -> None:
        for bad in (
            b'{"op":"repunch","rid":1,"session":"s","candidate":{"kind":"host","proto":"udp","host":"10.0.0.1","port":1}}',
            b'{"op":"repunch","rid":1,"session":"s","candidate":[]}',
            b'{"op":"repunch","rid":1,"session":"s","candidate":{"kind":"srflx","proto":"udp","host":"x","port":1}}',
            b'{"op":"repunch","rid":1,"session":"bad id"}',
            b'{"op":"repunch","rid":1}',
            b'{"op":"repunch","rid":1,"session":"s","extra":1}',
        ):
            with self.assertRaises(WireError):
                wire.decode_from_client(bad)

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(["rid", "session", "candidate", "x"]), VALUES, max_size=4))
    def test_decoding_fails_only_with_wire_error(self, obj: dict) -> None:
        line = wire._ENCODER.encode({"op": "repunch", **obj}).encode()
        for decode in (wire.decode_from_client, wire.decode_from_server):
            try:
                m = decode(line)
            except WireError:
                continue
            self.assertEqual(decode(wire.encode(m)), m)


class PathTableTests(SynchronousTestCase):
    def test_only_the_two_peers(self) -> None:
        t = PathTable()
        t.add("s", "alice", "bob", 0.0)
        self.assertEqual((t.other("s", "alice", 1), t.other("s", "bob", 1)), ("bob", "alice"))
        self.assertIsNone(t.other("s", "mallory", 1))
        self.assertIsNone(t.other("t", "alice", 1))

    def test_budget_window_and_ttl(self) -> None:
        t = PathTable(ttl=100.0, budget=2, window=10.0)
        t.add("s", "a", "b", 0.0)
        self.assertEqual([t.take("s", 1.0), t.take("s", 2.0), t.take("s", 3.0)], [True, True, False])
        self.assertTrue(t.take("s", 11.5))
        # A re-punch kept it alive past its first ttl.
        t.sweep(105.0)
        self.assertEqual(t.other("s", "a", 105.0), "b")
        t.sweep(112.0)
        self.assertEqual(len(t), 0)

    def test_bounded_oldest_forgotten(self) -> None:
        t = PathTable(limit=3)
        for i in range(5):
            t.add(f"s{i}", "a", "b", float(i))
        self.assertEqual(len(t), 3)
        self.assertIsNone(t.other("s0", "a", 5))
        self.assertEqual(t.other("s4", "a", 5), "b")

    def test_same_host(self) -> None:
        self.assertTrue(same_host("::ffff:192.0.2.1", "192.0.2.1"))
        self.assertTrue(same_host("2001:db8::1", "2001:DB8:0::1"))
        self.assertFalse(same_host("192.0.2.1", "192.0.2.2"))
        self.assertFalse(same_host("junk", "192.0.2.2"))


class ServerRepunchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(choose_order=udp_first)
        self.h.state.paths.ttl = 20.0  # shorter than the idle timeout, for test_expires
        self.a = self.h.peer("alice", source=A_SOURCE)
        self.b = self.h.peer("bob", source=B_SOURCE)
        self.h.send(self.a, Connect(10, "bob", DESC_A))
        [o] = [m for m in self.b[0].take() if isinstance(m, Offer)]
        [sb] = [m for m in self.h.send(self.b, Accept(20, o.offer, DESC_B)) if isinstance(m, SessionReply)]
        self.a[0].take()
        self.sid = sb.session.id

    def test_peer_asks_other_is_told(self) -> None:
        cand = Candidate("srflx", A_SOURCE, 41000)
        self.assertEqual(self.h.send(self.a, Repunch(30, self.sid, cand)), [Ok(30)])
        self.assertEqual(self.b[0].take(), [RepunchNotice(self.sid, cand)])
        # Either side may ask; without a candidate (a NAT whose mapping it cannot learn).
        self.assertEqual(self.h.send(self.b, Repunch(31, self.sid)), [Ok(31)])
        self.assertEqual(self.a[0].take(), [RepunchNotice(self.sid, None)])

    def test_works_after_both_reported(self) -> None:
        """The session's report record is gone once both reported; re-punching still works."""
        for side in (self.a, self.b):
            self.h.send(side, wire.Report(40, self.sid, "connected", "udp"))
        self.assertNotIn(self.sid, self.h.state.sessions)
        self.assertEqual(self.h.send(self.a, Repunch(41, self.sid)), [Ok(41)])

    def test_third_party_learns_nothing(self) -> None:
        """Mallory names alice and bob's session: the same error as for a session that does not exist."""
        m = self.h.peer("mallory", source=C_SOURCE)
        [err] = self.h.send(m, Repunch(5, self.sid, Candidate("srflx", C_SOURCE, 9)))
        [err2] = self.h.send(m, Repunch(6, "nosuchsession"))
        self.assertEqual((err.error, err2.error), ("unknown-session", "unknown-session"))
        self.assertEqual(err.reason.replace(self.sid, "X"), err2.reason.replace("nosuchsession", "X"))
        self.assertEqual((self.a[0].take(), self.b[0].take()), ([], []))

    def test_unregistered_refused(self) -> None:
        c = self.h.hello(source=C_SOURCE)
        [err] = self.h.send(c, Repunch(5, self.sid))
        self.assertIsInstance(err, Error)
        self.assertEqual(self.b[0].take(), [])

    def test_candidate_must_be_at_the_signalling_address(self) -> None:
        """A peer cannot aim the other's probes at a third party."""
        [err] = self.h.send(self.a, Repunch(30, self.sid, Candidate("srflx", C_SOURCE, 53)))
        self.assertEqual(err.error, "bad-request")
        self.assertEqual(self.b[0].take(), [])

    def test_flood_is_bounded(self) -> None:
        """A peer asking again and again: the other hears of at most the budget per window."""
        self.h.state.paths.window = 10.0  # within the test's ttl
        budget = self.h.state.paths.budget
        replies = [self.h.send(self.a, Repunch(100 + i, self.sid))[0] for i in range(20)]
        self.assertEqual(sum(isinstance(r, Ok) for r in replies), budget)
        self.assertEqual(len(self.b[0].take()), budget)
        self.assertEqual(self.h.state.counters["repunch:rate-limited"], 20 - budget)
        self.h.clock.advance(self.h.state.paths.window)
        self.assertEqual(self.h.send(self.a, Repunch(200, self.sid)), [Ok(200)])

    def test_other_peer_gone(self) -> None:
        self.h.send(self.b, wire.Bye(50))
        self.h.state.closed(self.b[1])
        [err] = self.h.send(self.a, Repunch(30, self.sid))
        self.assertEqual(err.error, "unknown-peer")

    def test_expires(self) -> None:
        self.h.clock.advance(self.h.state.paths.ttl + 1)
        self.h.state.sweep()
        self.assertEqual(len(self.h.state.paths), 0)
        [err] = self.h.send(self.a, Repunch(30, self.sid))
        self.assertEqual(err.error, "unknown-session")

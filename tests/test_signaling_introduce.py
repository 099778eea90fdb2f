"""
Introductions in one mediator round trip (docs/protocol.md 5.1): the
mediator's side, driven through fake channels and a Clock, and the codec of
C{publish}, C{introduce} and C{revoke}.
"""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.nat import NatSummary
from natbypass.signaling import wire
from natbypass.signaling.client import SignalingClient
from natbypass.signaling.server import SignalingFactory, SignalingState
from natbypass.signaling.wire import (
    Accept,
    Cancel,
    Candidate,
    Connect,
    Description,
    Error,
    Introduce,
    Offer,
    Ok,
    Ping,
    Publish,
    Reject,
    Revoke,
    Session,
    SessionReply,
    WireError,
)
from natbypass.testing.signaling import Harness, MemoryNetwork, key, udp_first

OFFER = Description(
    (Candidate("host", "10.0.0.1", 4000), Candidate("srflx", "203.0.113.1", 5000)),
    NatSummary("endpoint-independent", "address-dependent", True),
)
PUBLISHED = Description(
    (Candidate("srflx", "198.51.100.2", 6000), Candidate("tcp-srflx", "198.51.100.2", 6001)),
    NatSummary("endpoint-independent", "endpoint-independent", True),
)


def registered(description: Description, name: str) -> Description:
    return dataclasses.replace(description, fingerprint=str(key(name).fingerprint))


class IntroductionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(choose_order=udp_first)
        self.a, self.b = self.h.peer("alice"), self.h.peer("bob", "198.51.100.2")

    def publish(self, c, description: Description = PUBLISHED) -> None:
        rid = self.h.rid()
        self.assertEqual(self.h.send(c, Publish(rid, description)), [Ok(rid)])

    def introduce(self) -> tuple[Session, Introduce]:
        """Both published; alice connects: her session at once, bob's introduction with it."""
        self.publish(self.a, Description())
        self.publish(self.b)
        rid = self.h.rid()
        out = self.h.send(self.a, Connect(rid, "bob", OFFER))
        self.assertEqual(len(out), 1, out)
        self.assertIsInstance(out[0], SessionReply)
        self.assertEqual(out[0].rid, rid)
        (intro,) = self.b[0].take()
        self.assertIsInstance(intro, Introduce)
        return out[0].session, intro

    def test_session_in_one_round_trip(self) -> None:
        mine, intro = self.introduce()
        theirs = intro.session
        self.assertEqual((mine.id, mine.key, mine.order), (theirs.id, theirs.key, theirs.order))
        self.assertEqual(
            (mine.peer, mine.role, theirs.peer, theirs.role), ("bob", "controlling", "alice", "controlled")
        )
        self.assertEqual(mine.description, registered(PUBLISHED, "bob"))
        self.assertEqual(theirs.description, registered(OFFER, "alice"))
        # bob approves: he gets ok, alice nothing more (her session is out already)
        rid = self.h.rid()
        self.assertEqual(self.h.send(self.b, Accept(rid, intro.offer, Description())), [Ok(rid)])
        self.assertEqual(self.a[0].take(), [])
        counters = self.h.state.status()["counters"]
        self.assertEqual((counters["introductions"], counters["introductions:accepted"]), (1, 1))
        self.assertEqual(counters["sessions"], 1)

    def test_refusal_after_the_session_revokes_it(self) -> None:
        mine, intro = self.introduce()
        rid = self.h.rid()
        self.assertEqual(self.h.send(self.b, Reject(rid, intro.offer, "not you")), [Ok(rid)])
        (revoke,) = self.a[0].take()
        self.assertEqual((revoke.session, revoke.error), (mine.id, "rejected"))
        self.assertIn("not you", revoke.reason)
        self.assertNotIn(mine.id, self.h.state.sessions)
        self.assertEqual(self.h.state.status()["counters"]["introductions:rejected"], 1)

    def test_target_silent_or_gone(self) -> None:
        mine, intro = self.introduce()
        self.h.clock.advance(self.h.state.limits.offer_timeout + 1)
        self.h.state.sweep()
        self.assertEqual([type(m) for m in self.a[0].take() if not isinstance(m, Ping)], [Revoke])
        self.assertEqual(self.b[0].take()[-1], Cancel(intro.offer, "expired"))
        mine, intro = self.introduce()
        self.h.state.closed(self.b[1])
        (revoke,) = [m for m in self.a[0].take() if isinstance(m, Revoke)]
        self.assertEqual((revoke.session, revoke.error), (mine.id, "gone"))

    def test_initiator_that_never_published_gets_two_round_trips(self) -> None:
        """An older client (no publish) cannot take a revoke: its offer goes the old way."""
        self.publish(self.b)
        self.assertEqual(self.h.send(self.a, Connect(self.h.rid(), "bob", OFFER)), [])
        self.assertIsInstance(self.b[0].take()[0], Offer)

    def test_target_that_never_published_gets_an_offer(self) -> None:
        self.publish(self.a)
        self.assertEqual(self.h.send(self.a, Connect(self.h.rid(), "bob", OFFER)), [])
        self.assertIsInstance(self.b[0].take()[0], Offer)

    def test_empty_publication_withdraws(self) -> None:
        self.publish(self.a, Description())
        self.publish(self.b)
        self.publish(self.b, Description())
        self.h.send(self.a, Connect(self.h.rid(), "bob", OFFER))
        self.assertIsInstance(self.b[0].take()[0], Offer)

    def test_stale_publication_is_not_used(self) -> None:
        self.publish(self.a, Description())
        self.publish(self.b)
        self.h.clock.advance(self.h.state.limits.publish_ttl + 1)
        out = self.h.send(self.a, Connect(self.h.rid(), "bob", OFFER))
        self.assertFalse([m for m in out if isinstance(m, SessionReply)], out)  # no session before bob answers
        self.assertIsInstance(self.b[0].take()[0], Offer)
        self.assertEqual(self.h.state.status()["counters"]["introductions:stale"], 1)

    def test_republication_replaces(self) -> None:
        moved = Description((Candidate("srflx", "198.51.100.2", 7777),), PUBLISHED.nat)
        self.publish(self.a, Description())
        self.publish(self.b)
        self.h.clock.advance(self.h.state.limits.publish_ttl - 1)
        self.publish(self.b, moved)
        self.h.clock.advance(2)  # past the first one's lifetime, within the second's
        (reply,) = self.h.send(self.a, Connect(self.h.rid(), "bob", OFFER))
        self.assertEqual(reply.session.description.candidates, moved.candidates)

    def test_off_by_limit(self) -> None:
        h = Harness(introductions=False)
        a, b = h.peer("alice"), h.peer("bob", "198.51.100.2")
        for c in (a, b):
            h.send(c, Publish(h.rid(), PUBLISHED))
        h.send(a, Connect(h.rid(), "bob", OFFER))
        self.assertIsInstance(b[0].take()[0], Offer)

    def test_publish_needs_registration(self) -> None:
        c = self.h.hello()
        (err,) = self.h.send(c, Publish(7, PUBLISHED))
        self.assertEqual((err.rid, err.error), (7, "out-of-order"))

    def test_introductions_count_against_the_targets_slots(self) -> None:
        """An introduction is a pending offer until the target answers: the fair share applies."""
        self.publish(self.a, Description())
        self.publish(self.b)
        share = self.h.state.limits.max_offers_per_pair
        for _ in range(share):
            self.assertIsInstance(self.h.send(self.a, Connect(self.h.rid(), "bob", OFFER))[0], SessionReply)
        (err,) = self.h.send(self.a, Connect(self.h.rid(), "bob", OFFER))
        self.assertEqual(err.error, "rate-limited")


def _line(obj: dict) -> bytes:
    return json.dumps(obj).encode()


CAND = st.builds(
    lambda kind, a, b, port: {
        "kind": kind,
        "proto": wire.CANDIDATE_KINDS[kind],
        "host": f"198.51.{a}.{b}",
        "port": port,
    },
    st.sampled_from(sorted(wire.CANDIDATE_KINDS)),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 65535),
)


class PublishCodecTests(SynchronousTestCase):
    def test_hostile_publications_refused(self) -> None:
        srflx = {"kind": "srflx", "proto": "udp", "host": "198.51.100.1", "port": 1}
        cases = {
            "host candidate": {"candidates": [{**srflx, "kind": "host"}]},
            "tcp-host candidate": {"candidates": [{**srflx, "kind": "tcp-host", "proto": "tcp"}]},
            "too many": {"candidates": [{**srflx, "port": p} for p in range(1, wire.MAX_PUBLISHED + 2)]},
            "far too many": {"candidates": [srflx] * 10_000},
            "fingerprint": {"candidates": [srflx], "fingerprint": "nb1-aaaa"},
            "name as host": {"candidates": [{**srflx, "host": "example.com"}]},
            "unknown field": {"candidates": [srflx], "extra": 1},
            "not a list": {"candidates": {"0": srflx}},
        }
        for why, fields in cases.items():
            with self.assertRaises(WireError, msg=why) as e:
                wire.decode_from_client(_line({"op": "publish", "rid": 3, **fields}))
            self.assertEqual((e.exception.error, e.exception.rid), ("bad-request", 3), why)

    @given(st.lists(CAND, max_size=12), st.sampled_from(["auto", "udp", ["tcp", "udp"]]))
    def test_publish_decodes_or_refuses(self, cands: list, wish) -> None:
        line = _line({"op": "publish", "rid": 1, "candidates": cands, "wish": wish})
        allowed = len(cands) <= wire.MAX_PUBLISHED and all(c["kind"] in wire.PUBLISHABLE_KINDS for c in cands)
        try:
            msg = wire.decode_from_client(line)
        except WireError as e:
            self.assertFalse(allowed, e)
            self.assertEqual(e.error, "bad-request")
            return
        self.assertTrue(allowed)
        self.assertEqual(wire.decode_from_client(wire.encode(msg)), msg)
        self.assertLessEqual(len(msg.description.candidates), wire.MAX_PUBLISHED)

    @given(st.binary(max_size=200))
    def test_junk_is_a_wire_error(self, junk: bytes) -> None:
        for prefix in (b'{"op":"publish","rid":1,', b'{"op":"introduce",', b'{"op":"revoke",'):
            try:
                (wire.decode_from_client if b"publish" in prefix else wire.decode_from_server)(prefix + junk)
            except WireError:
                pass

    @given(
        st.integers(0, 600_000),
        st.sampled_from(wire.REVOKE_ERRORS),
        st.text(max_size=100).filter(lambda t: t.isprintable()),
    )
    def test_introduce_and_revoke_round_trip(self, start: int, error: str, reason: str) -> None:
        session = Session(
            "c2Vzc2lvbi1pZC0x", bytes(32), "alice", "controlled", registered(OFFER, "alice"), ("udp",), start
        )
        for msg in (Introduce("Wm9vLWJhci1iYXox", session, 30_000), Revoke("c2Vzc2lvbi1pZC0x", error, reason)):
            self.assertEqual(wire.decode_from_server(wire.encode(msg)), msg)

    def test_revoke_names_a_known_error(self) -> None:
        with self.assertRaises(WireError):
            wire.decode_from_server(_line({"op": "revoke", "session": "abc", "error": "internal-error", "reason": "x"}))
        self.assertIsInstance(Error(None, "rejected", "x"), Error)


class OlderMediator(SignalingState):
    """A mediator from before publications: C{publish} is an unknown op to it."""

    _handlers = {k: v for k, v in SignalingState._handlers.items() if k is not Publish}


class ClientAgainstOlderMediatorTests(SynchronousTestCase):
    def test_stops_publishing_and_still_connects_the_old_way(self) -> None:
        clock = Clock()
        state = OlderMediator(clock)
        network = MemoryNetwork(SignalingFactory(state), clock)
        clients = []
        for name in ("alice", "bob"):
            c = SignalingClient(network.endpoint(), name, clock=clock, identity=key(name))
            c.startService()
            self.addCleanup(c.stopService)
            clients.append(c)
        alice, bob = clients
        bob.setOfferHandler(lambda offer: Description())
        alice.publish(Description())
        bob.publish(PUBLISHED)
        network.flush()
        self.assertFalse(alice.can_publish or bob.can_publish)
        sessions: list[Session] = []
        alice.connect("bob", OFFER).addCallback(sessions.append)
        network.flush()
        self.assertEqual([s.peer for s in sessions], ["bob"])
        self.assertEqual(state.status()["counters"]["errors:unknown-op"], 2)
        bob.publish(PUBLISHED)  # known not to be understood: not sent again
        network.flush()
        self.assertEqual(state.status()["counters"]["errors:unknown-op"], 2)

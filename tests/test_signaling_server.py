"""
Tests of the mediator's signalling state machine (driven through fake
channels and a Clock) and of its LineReceiver (through StringTransport).
"""

from __future__ import annotations

import dataclasses
import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.identity import Fingerprint, Identity, registration_message
from natbypass.nat import NatSummary
from natbypass.selection import choose_order
from natbypass.signaling import wire
from natbypass.signaling.interfaces import IChannel, ISignalingState
from natbypass.signaling.server import (
    BufferedRandom,
    Limits,
    SignalingFactory,
    SignalingState,
    TokenPolicy,
    punch_delays,
)
from natbypass.signaling.wire import (
    Accept,
    Bye,
    Cancel,
    Candidate,
    Connect,
    Description,
    Error,
    Greeting,
    Hello,
    Offer,
    Ok,
    Ping,
    Pong,
    Register,
    Registered,
    Reject,
    Report,
    SessionReply,
    WireError,
)
from natbypass.testing.signaling import FakeChannel, Harness, key, signed_register, udp_first

DESC_A = Description(
    (Candidate("host", "10.0.0.1", 4000), Candidate("srflx", "203.0.113.1", 5000)),
    NatSummary("endpoint-independent", "address-dependent", True),
    (),
    "sha256:aaaa",
)
DESC_B = Description(
    (Candidate("tcp-srflx", "198.51.100.2", 6000),),
    NatSummary("address-and-port-dependent", "address-and-port-dependent", False),
    ("tcp", "udp"),
)


def registered(description: Description, name: str) -> Description:
    """C{description} as the mediator relays it: with the fingerprint C{name} registered."""
    return dataclasses.replace(description, fingerprint=str(key(name).fingerprint))


class StateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()

    def test_interfaces(self) -> None:
        verifyObject(ISignalingState, self.h.state)
        verifyObject(IChannel, FakeChannel())

    def test_greeting(self) -> None:
        ch, _ = self.h.open()
        [greeting] = ch.take()
        self.assertEqual(greeting, Greeting((2,), False, 8192, None, greeting.nonce))
        self.assertEqual(len(greeting.nonce), wire.NONCE_BYTES)

    def test_nonce_per_connection(self) -> None:
        """Every connection gets its own nonce, from the injected random source."""
        nonces = {self.h.open()[0].take()[0].nonce for _ in range(5)}
        self.assertEqual(len(nonces), 5)

    def test_hello_first(self) -> None:
        c = self.h.open()
        c[0].take()
        [err] = self.h.send(c, self.h.register(c, 5, "alice"))
        self.assertEqual((err.rid, err.code, err.error), (5, 412, "out-of-order"))

    def test_version_unsupported(self) -> None:
        c = self.h.open()
        c[0].take()
        [err] = self.h.send(c, Hello(1, 1))
        self.assertEqual((err.code, err.error), (505, "version-unsupported"))
        self.assertIn("[2]", err.reason)

    def test_register(self) -> None:
        c = self.h.hello()
        registered, ping = self.h.send(c, self.h.register(c, 2, "alice"))
        self.assertEqual(registered, Registered(2, "alice", str(key("alice").fingerprint)))
        self.assertIsInstance(ping, Ping)
        self.assertEqual(self.h.state.status()["peers"], 1)
        self.assertEqual(self.h.state.status()["bound_ids"], 1)

    def test_register_twice_on_one_connection(self) -> None:
        c = self.h.peer("alice")
        [err] = self.h.send(c, self.h.register(c, 3, "alice2"))
        self.assertEqual(err.error, "out-of-order")

    def test_duplicate_refused(self) -> None:
        """The same key on a second live connection must ask to replace the first."""
        self.h.peer("alice")
        c2 = self.h.hello()
        [err] = self.h.send(c2, self.h.register(c2, 2, "alice"))
        self.assertEqual((err.code, err.error), (409, "duplicate-id"))
        self.assertIn("replace=true", err.reason)

    def test_same_key_takes_over_stale_connection(self) -> None:
        """A reconnecting owner replaces its half-open old connection: the key is the proof."""
        old = self.h.peer("alice")
        new = self.h.hello("192.0.2.9")
        out = self.h.send(new, self.h.register(new, 2, "alice", replace=True))
        self.assertIsInstance(out[0], Registered)
        [err] = old[0].take()
        self.assertEqual((err.rid, err.error), (None, "duplicate-id"))
        self.assertTrue(old[0].closed)
        self.assertEqual(self.h.state.status()["peers"], 1)
        self.assertEqual(self.h.state.status()["connections"], 1)
        self.assertEqual(self.h.state.status()["counters"]["replaced"], 1)
        # the replaced connection's late close does not unregister the new one, nor hold the id
        self.h.state.closed(old[1])
        self.assertEqual(self.h.state.status()["peers"], 1)
        self.assertEqual(self.h.state.status()["held_ids"], 0)

    def test_replace_when_absent_registers(self) -> None:
        c = self.h.hello()
        out = self.h.send(c, self.h.register(c, 2, "alice", replace=True))
        self.assertIsInstance(out[0], Registered)

    def test_max_peers(self) -> None:
        h = Harness(max_peers=2)
        h.peer("a")
        h.peer("b")
        c = h.hello()
        [err] = h.send(c, h.register(c, 2, "c"))
        self.assertEqual((err.code, err.error), (503, "too-many-peers"))

    def test_max_per_source(self) -> None:
        h = Harness(max_per_source=2)
        h.open("192.0.2.1")
        c2 = h.open("192.0.2.1")
        ch, link = h.open("192.0.2.1")
        self.assertIsNone(link)
        [err] = ch.take()
        self.assertEqual((err.code, err.error), (503, "too-many-connections"))
        self.assertTrue(ch.closed)
        other, link = h.open("192.0.2.2")
        self.assertIsNotNone(link)
        h.state.closed(c2[1])
        self.assertIsNotNone(h.open("192.0.2.1")[1])

    def test_rate_limit(self) -> None:
        h = Harness(rate=5.0, burst=5.0)
        c = h.open()
        c[0].take()
        replies = [h.send(c, Ping(i)) for i in range(6)]
        self.assertEqual(replies[:5], [[Pong(i)] for i in range(5)])
        [err] = replies[5]
        self.assertEqual((err.rid, err.code, err.error), (5, 429, "rate-limited"))
        h.clock.advance(0.2)
        self.assertEqual(h.send(c, Ping(7)), [Pong(7)])

    def test_malformed_rate_limited_too(self) -> None:
        h = Harness(rate=1.0, burst=1.0)
        ch, link = h.open()
        ch.take()
        h.state.malformed(link, WireError("bad-request", "x", 1))
        h.state.malformed(link, WireError("bad-request", "x", 2))
        self.assertEqual([e.error for e in ch.take()], ["bad-request", "rate-limited"])


class OfferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(offer_timeout=10.0, punch_margin=0.05, choose_order=udp_first)
        self.a = self.h.peer("alice")
        self.b = self.h.peer("bob")

    def offer(self) -> Offer:
        self.assertEqual(self.h.send(self.a, Connect(10, "bob", DESC_A)), [])
        out = self.b[0].take()
        offers = [m for m in out if isinstance(m, Offer)]
        self.assertEqual(len(offers), 1, out)
        return offers[0]

    def test_offer_carries_description(self) -> None:
        o = self.offer()
        self.assertEqual((o.peer, o.description, o.expires_in_ms), ("alice", registered(DESC_A, "alice"), 10000))

    def test_accept_gives_both_the_session(self) -> None:
        o = self.offer()
        [sb] = [m for m in self.h.send(self.b, Accept(20, o.offer, DESC_B)) if isinstance(m, SessionReply)]
        [sa] = [m for m in self.a[0].take() if isinstance(m, SessionReply)]
        self.assertEqual((sa.rid, sb.rid), (10, 20))
        sa, sb = sa.session, sb.session
        self.assertEqual(sa.id, sb.id)
        self.assertEqual(sa.key, sb.key)
        self.assertEqual(len(sa.key), 32)
        self.assertEqual((sa.peer, sa.role, sa.description), ("bob", "controlling", registered(DESC_B, "bob")))
        self.assertEqual((sb.peer, sb.role, sb.description), ("alice", "controlled", registered(DESC_A, "alice")))
        # alice's wish is auto, bob's is tcp-then-udp: the default keeps udp first
        self.assertEqual(sa.order, ("udp", "tcp"))
        self.assertEqual(sa.order, sb.order)
        self.assertEqual(self.h.state.status()["open_sessions"], 1)

    def test_fresh_session_keys(self) -> None:
        o = self.offer()
        self.h.send(self.b, Accept(20, o.offer, DESC_B))
        k1 = [m for m in self.a[0].take() if isinstance(m, SessionReply)][0].session
        o = self.offer()
        self.h.send(self.b, Accept(21, o.offer, DESC_B))
        k2 = [m for m in self.a[0].take() if isinstance(m, SessionReply)][0].session
        self.assertNotEqual(k1.key, k2.key)
        self.assertNotEqual(k1.id, k2.id)

    def test_start_times_coincide(self) -> None:
        """With RTTs of 20 ms and 300 ms both sides start at the same instant."""
        h = Harness(punch_margin=0.05)
        a, b = h.hello(), h.hello()
        ping_a = h.send(a, h.register(a, 2, "alice"))[1]
        ping_b = h.send(b, h.register(b, 2, "bob"))[1]
        h.clock.advance(0.02)
        h.send(a, Pong(ping_a.rid))
        h.clock.advance(0.28)
        h.send(b, Pong(ping_b.rid))
        h.send(a, Connect(10, "bob", DESC_A))
        o = [m for m in b[0].take() if isinstance(m, Offer)][0]
        sb = [m for m in h.send(b, Accept(20, o.offer, DESC_B)) if isinstance(m, SessionReply)][0].session
        sa = [m for m in a[0].take() if isinstance(m, SessionReply)][0].session
        self.assertEqual((sa.rtt_ms, sb.rtt_ms), (20, 300))
        # arrival after rtt/2, then the delay: both at 200 ms after sending
        self.assertEqual(sa.rtt_ms / 2 + sa.start_in_ms, sb.rtt_ms / 2 + sb.start_in_ms)
        self.assertEqual(sb.start_in_ms, 50)

    def test_reject(self) -> None:
        o = self.offer()
        self.assertEqual(self.h.send(self.b, Reject(20, o.offer, "busy")), [Ok(20)])
        [err] = self.a[0].take()
        self.assertEqual((err.rid, err.code, err.error), (10, 403, "rejected"))
        self.assertIn("busy", err.reason)

    def test_timeout(self) -> None:
        o = self.offer()
        self.h.clock.advance(9.9)
        self.h.state.sweep()
        self.assertEqual(self.a[0].take(), [])
        self.h.clock.advance(0.1)
        self.h.state.sweep()
        [err] = self.a[0].take()
        self.assertEqual((err.rid, err.code, err.error), (10, 408, "timeout"))
        self.assertEqual(self.b[0].take(), [Cancel(o.offer, "expired")])
        [late] = self.h.send(self.b, Accept(20, o.offer, DESC_B))
        self.assertEqual((late.code, late.error), (404, "unknown-offer"))

    def test_target_leaves(self) -> None:
        self.offer()
        self.h.state.closed(self.b[1])
        [err] = self.a[0].take()
        self.assertEqual((err.rid, err.code, err.error), (10, 410, "gone"))
        self.h.clock.advance(20)  # past the offer timeout: nothing more for alice
        self.h.state.sweep()
        self.assertEqual(self.a[0].take(), [])

    def test_initiator_leaves(self) -> None:
        o = self.offer()
        self.h.state.closed(self.a[1])
        self.assertEqual(self.b[0].take(), [Cancel(o.offer, "peer alice disconnected")])
        self.assertEqual(self.h.state.status()["pending_offers"], 0)

    def test_unknown_peer(self) -> None:
        [err] = self.h.send(self.a, Connect(10, "carol", DESC_A))
        self.assertEqual((err.rid, err.code, err.error), (10, 404, "unknown-peer"))

    def test_connect_to_self(self) -> None:
        [err] = self.h.send(self.a, Connect(10, "alice", DESC_A))
        self.assertEqual(err.error, "bad-request")

    def test_connect_unregistered(self) -> None:
        c = self.h.hello()
        [err] = self.h.send(c, Connect(10, "bob", DESC_A))
        self.assertEqual(err.error, "out-of-order")

    def test_only_target_may_answer(self) -> None:
        o = self.offer()
        [err] = self.h.send(self.a, Accept(30, o.offer, DESC_A))
        self.assertEqual(err.error, "unknown-offer")
        carol = self.h.peer("carol")
        [err] = self.h.send(carol, Reject(31, o.offer))
        self.assertEqual(err.error, "unknown-offer")

    def test_pending_offer_limit(self) -> None:
        h = Harness(max_offers_per_peer=2)
        a, _ = h.peer("a"), h.peer("b")
        h.send(a, Connect(1, "b", DESC_A))
        h.send(a, Connect(2, "b", DESC_A))
        [err] = h.send(a, Connect(3, "b", DESC_A))
        self.assertEqual((err.rid, err.error), (3, "rate-limited"))

    def test_flooded_target_can_still_make_offers(self) -> None:
        """Offers waiting for a peer do not count against its own; a flood of them is capped."""
        h = Harness(max_offers_per_peer=2, max_offers_to_peer=3)
        victim = h.peer("victim")
        h.peer("other")
        attackers = [h.peer(f"x{i}") for i in range(4)]
        for x in attackers[:3]:
            self.assertEqual(h.send(x, Connect(1, "victim", DESC_A)), [])
        [err] = h.send(attackers[3], Connect(1, "victim", DESC_A))
        self.assertEqual(err.error, "rate-limited")
        self.assertIn("victim", err.reason)
        self.assertEqual(len([m for m in victim[0].take() if isinstance(m, Offer)]), 3)
        self.assertEqual(h.send(victim, Connect(9, "other", DESC_B)), [])  # its own offer goes out
        self.assertEqual(h.state.status()["pending_offers"], 4)

    def test_report_counts_outcomes(self) -> None:
        o = self.offer()
        sid = [m for m in self.h.send(self.b, Accept(20, o.offer, DESC_B)) if isinstance(m, SessionReply)][0].session.id
        self.a[0].take()
        self.assertEqual(self.h.send(self.a, Report(40, sid, "connected", "udp")), [Ok(40)])
        self.assertEqual(self.h.send(self.a, Report(41, sid, "connected", "udp")), [Ok(41)])  # counted once
        self.assertEqual(self.h.send(self.b, Report(42, sid, "failed")), [Ok(42)])
        counters = self.h.state.status()["counters"]
        self.assertEqual(counters["outcome:connected/udp"], 1)
        self.assertEqual(counters["outcome:failed"], 1)
        self.assertEqual(self.h.state.status()["open_sessions"], 0)

    def test_report_foreign_session(self) -> None:
        o = self.offer()
        sid = [m for m in self.h.send(self.b, Accept(20, o.offer, DESC_B)) if isinstance(m, SessionReply)][0].session.id
        carol = self.h.peer("carol")
        [err] = self.h.send(carol, Report(40, sid, "failed"))
        self.assertEqual((err.code, err.error), (404, "unknown-session"))

    def test_sessions_expire(self) -> None:
        o = self.offer()
        self.h.send(self.b, Accept(20, o.offer, DESC_B))
        self.h.clock.advance(119)
        self.h.state.sweep()
        self.assertEqual(self.h.state.status()["open_sessions"], 1)
        self.h.clock.advance(2)
        self.h.state.sweep()
        self.assertEqual(self.h.state.status()["open_sessions"], 0)

    def test_bye(self) -> None:
        self.assertEqual(self.h.send(self.a, Bye(9)), [Ok(9)])
        self.assertTrue(self.a[0].closed)


class BufferedRandomTests(SynchronousTestCase):
    def test_blocks(self) -> None:
        calls = []
        counter = itertools.count()

        def source(n: int) -> bytes:
            calls.append(n)
            return bytes(next(counter) % 256 for _ in range(n))

        r = BufferedRandom(block=64, source=source)
        out = r(32) + r(16) + r(32) + r(100)
        self.assertEqual(len(out), 180)
        self.assertEqual(calls, [64, 64, 100])
        # nothing handed out twice: the bytes are the source's, in order, minus the unused tail
        self.assertEqual(out[:48], bytes(range(48)))
        self.assertEqual(out[48:80], bytes(range(64, 96)))

    def test_default_state_uses_it(self) -> None:
        state = SignalingState(Clock())
        self.assertIsInstance(state.random_bytes, BufferedRandom)
        self.assertNotEqual(state.random_bytes(32), state.random_bytes(32))


class ChooseOrderTests(SynchronousTestCase):
    def test_selection_policy_is_the_default(self) -> None:
        """Without an explicit hook the mediator uses natbypass.selection's table."""
        choose = SignalingState(Clock()).choose_order
        self.assertIs(choose, choose_order)
        n = NatSummary()
        self.assertEqual(list(choose(n, n, ("tcp", "udp"), ())), ["tcp", "udp"])
        self.assertEqual(list(choose(n, n, ("udp",), ("tcp",))), [])
        self.assertEqual(sorted(choose(n, n, (), ())), ["tcp", "udp"])

    def test_tcp_mapping_reaches_the_policy(self) -> None:
        """
        A peer whose UDP mapping is random-symmetric but whose TCP mapping
        was measured endpoint-independent, against a port-restricted cone:
        the table expects UDP to fail and TCP to work, so the mediator's
        default policy puts TCP first (it used to drop C{tcp_mapping}).
        """
        h = Harness()
        a, b = h.peer("a"), h.peer("b")
        apd = "address-and-port-dependent"
        offer_nat = NatSummary(apd, apd, False, tcp_mapping="endpoint-independent")
        answer_nat = NatSummary("endpoint-independent", apd, True)
        h.send(a, Connect(1, "b", Description(nat=offer_nat)))
        o = [m for m in b[0].take() if isinstance(m, Offer)][0]
        [reply] = [m for m in h.send(b, Accept(2, o.offer, Description(nat=answer_nat))) if isinstance(m, SessionReply)]
        self.assertEqual(reply.session.order, ("tcp", "udp"))

    def test_hook_is_used(self) -> None:
        calls = []

        def choose(nat_a, nat_b, wish_a, wish_b):
            calls.append((nat_a, nat_b, wish_a, wish_b))
            return ["tcp"]

        h = Harness(choose_order=choose)
        a, b = h.peer("a"), h.peer("b")
        h.send(a, Connect(1, "b", DESC_A))
        o = [m for m in b[0].take() if isinstance(m, Offer)][0]
        [reply] = [m for m in h.send(b, Accept(2, o.offer, DESC_B)) if isinstance(m, SessionReply)]
        self.assertEqual(reply.session.order, ("tcp",))
        self.assertEqual(calls, [(DESC_A.nat, DESC_B.nat, DESC_A.wish, DESC_B.wish)])

    def test_no_common_protocol(self) -> None:
        h = Harness(choose_order=udp_first)
        a, b = h.peer("a"), h.peer("b")
        h.send(a, Connect(1, "b", Description(wish=("udp",))))
        o = [m for m in b[0].take() if isinstance(m, Offer)][0]
        [eb] = h.send(b, Accept(2, o.offer, Description(wish=("tcp",))))
        [ea] = a[0].take()
        self.assertEqual((ea.rid, ea.error, eb.rid, eb.error), (1, "rejected", 2, "rejected"))

    @given(st.floats(0, 10), st.floats(0, 10), st.floats(0, 1))
    def test_punch_delays_meet(self, rtt_a: float, rtt_b: float, margin: float) -> None:
        da, db = punch_delays(rtt_a, rtt_b, margin)
        self.assertGreaterEqual(min(da, db), margin - 1e-9)
        self.assertAlmostEqual(rtt_a / 2 + da, rtt_b / 2 + db, places=9)


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tokens = TokenPolicy.parse(
            "# comment\n"
            "open-token\n"
            "bound-token alice  # only these ids\n"
            "bound-token bob\n"
            f"pinned-token carol {key('carol').fingerprint}\n"
        )
        self.h = Harness(tokens=self.tokens)

    def test_greeting_says_auth(self) -> None:
        ch, _ = self.h.open()
        self.assertTrue(ch.take()[0].auth)

    def test_no_token(self) -> None:
        c = self.h.hello()
        [err] = self.h.send(c, self.h.register(c, 2, "alice"))
        self.assertEqual((err.code, err.error), (401, "unauthorized"))

    def test_wrong_token(self) -> None:
        c = self.h.hello()
        [err] = self.h.send(c, self.h.register(c, 2, "alice", "open-tokeN"))
        self.assertEqual(err.error, "unauthorized")

    def test_open_token(self) -> None:
        self.h.peer("zed", token="open-token")

    def test_bound_token_limits_ids(self) -> None:
        self.h.peer("alice", token="bound-token")
        self.h.peer("bob", token="bound-token")
        c = self.h.hello()
        [err] = self.h.send(c, self.h.register(c, 2, "dave", "bound-token"))
        self.assertEqual(err.error, "unauthorized")

    def test_open_token_cannot_take_a_bound_id(self) -> None:
        """With an open token ids are first come, first served, as without tokens."""
        self.h.peer("zed", token="open-token")
        c = self.h.hello()
        [err] = self.h.send(c, self.h.register(c, 2, "zed", "open-token", True, identity=key("mallory")))
        self.assertEqual((err.code, err.error), (409, "id-bound"))

    def test_owning_token_rebinds_and_replaces(self) -> None:
        """A token bound to the id is the operator's word: it takes the id over, even from another key."""
        squatter = self.h.peer("alice", token="open-token", identity=key("mallory"))
        new = self.h.hello()
        [err] = self.h.send(new, self.h.register(new, 2, "alice", "bound-token"))
        self.assertEqual(err.error, "duplicate-id")  # live: replace must be asked for
        out = self.h.send(new, self.h.register(new, 3, "alice", "bound-token", True))
        self.assertEqual(out[0], Registered(3, "alice", str(key("alice").fingerprint)))
        self.assertTrue(squatter[0].closed)
        self.assertEqual(self.h.state.status()["counters"]["ids:rebound"], 1)

    def test_token_bound_to_fingerprint(self) -> None:
        """C{TOKEN ID FINGERPRINT} admits only that key."""
        self.h.peer("carol", token="pinned-token")
        c = self.h.hello()
        [err] = self.h.send(c, self.h.register(c, 2, "carol", "pinned-token", True, identity=key("mallory")))
        self.assertEqual((err.code, err.error), (401, "unauthorized"))
        self.assertFalse(self.h.state.peers["carol"].channel.closed)

    def test_unauthenticated_learn_nothing(self) -> None:
        """Bound or not, without a token the answer is the same; no connect either."""
        self.h.peer("alice", token="open-token")
        c = self.h.hello()
        [e1] = self.h.send(c, self.h.register(c, 2, "alice", "nope", True, identity=key("mallory")))
        [e2] = self.h.send(c, self.h.register(c, 3, "nobody", "nope"))
        self.assertEqual((e1.code, e1.reason), (e2.code, e2.reason))
        [e3] = self.h.send(c, Connect(4, "alice", DESC_A))
        [e4] = self.h.send(c, Connect(5, "nobody", DESC_A))
        self.assertEqual((e3.code, e3.reason), (e4.code, e4.reason))
        self.assertEqual(e3.code, 401)

    def test_token_checked_before_proof(self) -> None:
        """A bad signature without a valid token gets the token's 401, not a hint about the proof."""
        c = self.h.hello()
        msg = self.h.register(c, 2, "alice", "nope")
        [err] = self.h.send(c, Register(2, "alice", msg.key, bytes(64), "nope"))
        self.assertEqual(err.error, "unauthorized")

    def test_parse_errors(self) -> None:
        self.assertRaises(ValueError, TokenPolicy.parse, "# nothing\n\n")
        with self.assertRaises(ValueError) as cm:
            TokenPolicy.parse("good\ntok b!d\n")
        self.assertIn("line 2", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            TokenPolicy.parse("tok alice bob carol\n")
        self.assertIn("TOKEN [ID [FINGERPRINT]]", str(cm.exception))
        with self.assertRaises(ValueError) as cm:
            TokenPolicy.parse("tok alice bob\n")  # the old multi-id form: the third word must be a fingerprint
        self.assertIn("line 1: the third word must be a key fingerprint", str(cm.exception))

    def test_hash_inside_a_token_is_not_a_comment(self) -> None:
        """Regression: C{TOKEN#x alice} used to become C{TOKEN}, an open token for every id."""
        policy = TokenPolicy.parse("s3cret#x alice\n#whole line\nother #comment\nlast\t# tab comment\n")
        fp = key("alice").fingerprint
        self.assertEqual(policy.check("s3cret#x", "alice", fp), (True, True))
        self.assertEqual(policy.check("s3cret#x", "bob", fp), (False, False))
        self.assertEqual(policy.check("s3cret", "bob", fp), (False, False))
        self.assertEqual(policy.check("other", "bob", fp), (True, False))
        self.assertEqual(policy.check("last", "bob", fp), (True, False))
        self.assertEqual(policy.check("#whole", "bob", fp), (False, False))

    def test_check(self) -> None:
        fp, other = key("carol").fingerprint, key("mallory").fingerprint
        self.assertEqual(self.tokens.check("open-token", "x", fp), (True, False))
        self.assertEqual(self.tokens.check("bound-token", "bob", fp), (True, True))
        self.assertEqual(self.tokens.check("bound-token", "x", fp), (False, False))
        self.assertEqual(self.tokens.check("pinned-token", "carol", fp), (True, True))
        self.assertEqual(self.tokens.check("pinned-token", "carol", other), (False, False))
        self.assertEqual(self.tokens.check("pinned-token", "carol", None), (False, False))
        self.assertEqual(self.tokens.check(None, "x", fp), (False, False))
        self.assertEqual(self.tokens.check("other", "x", fp), (False, False))

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
    def test_parse_any_text(self, text: str) -> None:
        """Any text parses into a policy or a ValueError naming what is wrong."""
        try:
            TokenPolicy.parse(text)
        except ValueError as e:
            self.assertTrue(str(e))


def timed_register(identity: Identity, rid: int, name: str, time_s: float, cnonce: bytes = b"n" * 16) -> Register:
    """A register with a timed proof: signed over our clock (C{time_s}) and C{cnonce}, no greeting needed."""
    time_ms = int(time_s * 1000)
    sig = identity.sign_registration(wire.timed_nonce(time_ms, cnonce), name)
    return Register(rid, name, identity.public_bytes(), sig, None, False, time_ms, cnonce)


class TimedProofTests(SynchronousTestCase):
    """Registration without waiting for the greeting: a signature over the client's clock and a fresh nonce."""

    def setUp(self) -> None:
        self.h = Harness(proof_window=30.0, max_recent_proofs=3)

    def register(self, name: str, time_s: float, cnonce: bytes = b"n" * 16, source: str = "192.0.2.1") -> list:
        c = self.h.hello(source)
        return self.h.send(c, timed_register(key(name), 2, name, time_s, cnonce))

    def test_fresh_proof_registers(self) -> None:
        now = self.h.clock.seconds()
        for i, skew in enumerate((0.0, -29.0, 29.0)):
            out = self.register(f"p{i}", now + skew, bytes([i]) * 16)
            self.assertIsInstance(out[0], Registered, (skew, out))
            self.assertEqual(out[0].fingerprint, str(key(f"p{i}").fingerprint))

    def test_stale_proof_asks_for_the_nonce(self) -> None:
        now = self.h.clock.seconds()
        for when in (now - 31.0, now + 120.0, 0.0):
            [err] = self.register("alice", when)
            self.assertEqual((err.code, err.error), (401, "stale-proof"), when)
            self.assertIn("sign this connection's greeting nonce", err.reason)

    def test_replayed_proof_refused(self) -> None:
        """A register line recorded and replayed on another connection within the window is refused."""
        now = self.h.clock.seconds()
        first = self.register("alice", now)
        self.assertIsInstance(first[0], Registered)
        c = self.h.hello("198.51.100.9")
        [err] = self.h.send(c, timed_register(key("alice"), 2, "alice", now))
        self.assertEqual((err.code, err.error), (401, "bad-proof"))
        self.assertIn("used already", err.reason)
        self.assertEqual(self.h.state.status()["counters"]["proofs:replayed"], 1)

    def test_forged_proof_is_not_remembered(self) -> None:
        """A bad signature is refused and does not use up the owner's nonce."""
        now = self.h.clock.seconds()
        c = self.h.hello()
        good = timed_register(key("alice"), 2, "alice", now)
        forged = dataclasses.replace(good, sig=bytes(64))
        [err] = self.h.send(c, forged)
        self.assertEqual(err.error, "bad-proof")
        self.assertEqual(self.h.state.recent_proofs, {})
        self.assertIsInstance(self.register("alice", now)[0], Registered)

    def test_recent_proofs_bounded_and_expired(self) -> None:
        now = self.h.clock.seconds()
        for i in range(3):
            self.assertIsInstance(self.register(f"p{i}", now, bytes([i]) * 16)[0], Registered)
        [err] = self.register("p9", now, b"9" * 16)
        self.assertEqual(
            (err.error, err.reason), ("stale-proof", "too many recent registrations: sign the greeting nonce instead")
        )
        # twice the window later they are forgotten, and a proof that old would fail the window anyway
        self.h.clock.advance(61)
        self.h.state.sweep()
        self.assertEqual(self.h.state.recent_proofs, {})
        self.assertIsInstance(self.register("p9", self.h.clock.seconds(), b"9" * 16)[0], Registered)

    @given(st.integers(), st.binary(max_size=40))
    def test_hostile_time_and_cnonce_fields(self, time_ms: int, cnonce: bytes) -> None:
        """Any time and cnonce on the wire: a clean decode or a bad-request error, never anything else."""
        line = json.dumps(
            {"op": "register", "rid": 2, "id": "alice", "key": wire.b64url_encode(bytes(32)),
             "sig": wire.b64url_encode(bytes(64)), "time": time_ms, "cnonce": wire.b64url_encode(cnonce)}
        ).encode()  # fmt: skip
        try:
            msg = wire.decode_from_client(line)
        except WireError as e:
            self.assertEqual(e.error, "bad-request")
        else:
            self.assertTrue(0 <= msg.time <= wire.MAX_RID and len(msg.cnonce) == wire.CNONCE_BYTES)


class IdBindingTests(SynchronousTestCase):
    """Ids are bound to the key that registered them; nobody else can squat them."""

    def setUp(self) -> None:
        self.h = Harness(id_hold=3600.0)

    def squat(self, name: str = "alice", replace: bool = True) -> Error:
        c = self.h.hello("203.0.113.66")
        [err] = self.h.send(c, self.h.register(c, 2, name, replace=replace, identity=key("mallory")))
        return err

    def test_squatting_a_connected_id_refused(self) -> None:
        owner = self.h.peer("alice")
        err = self.squat()
        self.assertEqual((err.code, err.error), (409, "id-bound"))
        self.assertIn("another identity key", err.reason)
        self.assertIn("3600 s after it leaves", err.reason)
        self.assertFalse(owner[0].closed)
        self.assertEqual(self.h.state.status()["counters"]["ids:squat-refused"], 1)

    def test_departed_owners_id_is_held(self) -> None:
        """Regression (the review's reproduction): after the owner disconnects, a stranger cannot take its id."""
        owner = self.h.peer("alice")
        self.h.state.closed(owner[1])
        self.assertEqual(self.h.state.status()["held_ids"], 1)
        self.h.clock.advance(3000)
        self.h.state.sweep()
        err = self.squat()
        self.assertEqual((err.code, err.error), (409, "id-bound"))
        self.assertIn("for another 600 s", err.reason)
        back = self.h.peer("alice")  # the owner's key is welcome back, and the hold ends
        self.assertFalse(back[0].closed)
        self.assertEqual(self.h.state.status()["held_ids"], 0)

    def test_hold_restarts_at_each_departure(self) -> None:
        owner = self.h.peer("alice")
        self.h.state.closed(owner[1])
        self.h.clock.advance(3000)
        again = self.h.peer("alice")
        self.h.state.closed(again[1])
        self.h.clock.advance(3000)
        self.h.state.sweep()
        self.assertEqual(self.squat().error, "id-bound")

    def test_hold_expiry_frees_the_id(self) -> None:
        owner = self.h.peer("alice")
        self.h.state.closed(owner[1])
        self.h.clock.advance(3600)
        self.h.state.sweep()
        self.assertEqual(self.h.state.status()["bound_ids"], 0)
        self.h.peer("alice", identity=key("mallory"))

    def test_hold_expiry_without_a_sweep(self) -> None:
        owner = self.h.peer("alice")
        self.h.state.closed(owner[1])
        self.h.clock.advance(3600)
        self.h.peer("alice", identity=key("mallory"))

    def test_hold_zero_binds_only_while_connected(self) -> None:
        h = Harness(id_hold=0.0)
        owner = h.peer("alice")
        c = h.hello()
        [err] = h.send(c, h.register(c, 2, "alice", identity=key("mallory")))
        self.assertEqual(err.error, "id-bound")
        self.assertIn("while it is connected", err.reason)
        h.state.closed(owner[1])
        self.assertEqual(h.state.status()["bound_ids"], 0)
        h.peer("alice", identity=key("mallory"))

    def test_first_key_wins_a_race(self) -> None:
        """
        On an open mediator a free id goes to the first key: the owner, coming
        second, is told so, and whoever connects to the id learns the squatter's
        fingerprint, not the owner's (which pinning catches).
        """
        self.h.peer("alice", identity=key("mallory"))
        c = self.h.hello()
        [err] = self.h.send(c, self.h.register(c, 2, "alice", replace=True))
        self.assertEqual(err.error, "id-bound")
        bob = self.h.peer("bob")
        self.h.send(bob, Connect(3, "alice", DESC_B))
        [offer] = [m for m in self.h.state.peers["alice"].channel.take() if isinstance(m, Offer)]
        self.assertEqual(offer.description.fingerprint, str(key("bob").fingerprint))
        answer = self.h.state.peers["alice"]
        self.h.state.received(answer, Accept(4, offer.offer, DESC_A))
        [session] = [m for m in bob[0].take() if isinstance(m, SessionReply)]
        self.assertEqual(session.session.description.fingerprint, str(key("mallory").fingerprint))

    def test_max_ids(self) -> None:
        """The table is bounded: new ids are refused when it is full, bound ones keep working."""
        h = Harness(max_ids=2, id_hold=60.0)
        a = h.peer("a")
        h.peer("b")
        c = h.hello()
        [err] = h.send(c, h.register(c, 2, "c"))
        self.assertEqual((err.code, err.error), (503, "too-many-ids"))
        self.assertIn("maximum of 2 bound ids", err.reason)
        h.state.closed(a[1])  # held, still counted
        [err] = h.send(c, h.register(c, 3, "c"))
        self.assertEqual(err.error, "too-many-ids")
        a = h.peer("a")  # its owner is not refused
        h.state.closed(a[1])
        h.clock.advance(60)
        h.state.sweep()
        h.peer("c")

    def test_flood_of_fresh_keys_is_bounded(self) -> None:
        """Registrations with fresh keys for ever new ids fill the table and stop there."""
        h = Harness(max_ids=20, max_per_source=0, rate=0)
        owner = h.peer("owner")
        refused = 0
        for i in range(60):
            c = h.hello("203.0.113.66")
            out = h.send(c, h.register(c, 2, f"x{i}", identity=Identity.generate()))
            if isinstance(out[0], Error):
                self.assertEqual(out[0].error, "too-many-ids")
                refused += 1
            h.state.closed(c[1])
        self.assertEqual(h.state.status()["bound_ids"], 20)
        self.assertEqual(refused, 41)
        h.state.closed(owner[1])
        h.peer("owner")  # the owner still gets its own id back
        self.assertEqual(h.state.status()["connections"], 1)


class RegistrationProofTests(SynchronousTestCase):
    """Hostile registrations: every way of not holding the key is refused with 401 bad-proof."""

    def setUp(self) -> None:
        self.h = Harness()

    def refused(self, c, msg: Register) -> Error:
        [err] = self.h.send(c, msg)
        self.assertEqual((err.rid, err.code, err.error), (msg.rid, 401, "bad-proof"))
        self.assertEqual(self.h.state.status()["peers"], 0)
        return err

    def test_signature_by_another_key(self) -> None:
        c = self.h.hello()
        forged = self.h.register(c, 2, "alice", identity=key("mallory"))
        self.refused(c, Register(2, "alice", key("alice").public_bytes(), forged.sig))

    def test_signature_over_another_nonce(self) -> None:
        """A register replayed from another connection fails: the nonce is per connection."""
        first = self.h.hello()
        replayed = self.h.register(first, 2, "alice")
        second = self.h.hello()
        self.refused(second, replayed)
        out = self.h.send(first, replayed)  # on its own connection it is good
        self.assertIsInstance(out[0], Registered)

    def test_replay_after_the_owner_left(self) -> None:
        owner = self.h.hello()
        msg = self.h.register(owner, 2, "alice")
        self.h.send(owner, msg)
        self.h.state.closed(owner[1])
        self.refused(self.h.hello("203.0.113.66"), msg)

    def test_signature_for_another_id(self) -> None:
        c = self.h.hello()
        for_bob = self.h.register(c, 2, "bob", identity=key("alice"))
        self.refused(c, Register(2, "alice", for_bob.key, for_bob.sig))

    def test_signature_without_context(self) -> None:
        """A signature over the bare nonce (another protocol's message) is not a registration proof."""
        c = self.h.hello()
        nonce = self.h.nonces[id(c[1])]
        self.refused(c, Register(2, "alice", key("alice").public_bytes(), key("alice").sign(nonce)))
        self.assertNotEqual(registration_message(nonce, "alice"), nonce)

    def test_small_order_keys(self) -> None:
        """Keys nobody holds (small-order points) are refused even when the signature 'verifies'."""
        c = self.h.hello()
        for raw in (bytes(32), b"\x01" + bytes(31), bytes.fromhex("ec" + "ff" * 30 + "7f")):
            err = self.refused(c, Register(2, "alice", raw, bytes(64)))
            self.assertIn("not a usable Ed25519 public key", err.reason)

    def test_garbage_signature(self) -> None:
        c = self.h.hello()
        self.refused(c, Register(2, "alice", key("alice").public_bytes(), b"\xff" * 64))

    def test_connection_stays_usable(self) -> None:
        c = self.h.hello()
        self.refused(c, Register(2, "alice", key("alice").public_bytes(), bytes(64)))
        out = self.h.send(c, self.h.register(c, 3, "alice"))
        self.assertIsInstance(out[0], Registered)


class FingerprintRelayTests(SynchronousTestCase):
    """The mediator relays each side's registered fingerprint, never a self-declared one."""

    def test_offer_and_sessions_carry_registered_fingerprints(self) -> None:
        h = Harness(choose_order=udp_first)
        a, b = h.peer("alice"), h.peer("bob")
        liar = dataclasses.replace(DESC_A, fingerprint=str(key("carol").fingerprint))
        h.send(a, Connect(10, "bob", liar))
        [offer] = [m for m in b[0].take() if isinstance(m, Offer)]
        self.assertEqual(offer.description.fingerprint, str(key("alice").fingerprint))
        [sb] = [m for m in h.send(b, Accept(20, offer.offer, DESC_B)) if isinstance(m, SessionReply)]
        [sa] = [m for m in a[0].take() if isinstance(m, SessionReply)]
        self.assertEqual(sa.session.description.fingerprint, str(key("bob").fingerprint))
        self.assertEqual(sb.session.description.fingerprint, str(key("alice").fingerprint))
        self.assertEqual(h.state.status()["counters"]["fingerprints:replaced"], 1)

    def test_declared_fingerprint_may_be_left_out(self) -> None:
        h = Harness(choose_order=udp_first)
        a, b = h.peer("alice"), h.peer("bob")
        h.send(a, Connect(10, "bob", Description()))
        [offer] = [m for m in b[0].take() if isinstance(m, Offer)]
        self.assertEqual(offer.description, Description(fingerprint=str(key("alice").fingerprint)))
        self.assertNotIn("fingerprints:replaced", h.state.status()["counters"])


class KeepaliveTests(SynchronousTestCase):
    def test_keepalive_and_idle(self) -> None:
        h = Harness(keepalive=30.0, idle_timeout=90.0)
        a = h.peer("alice")
        quiet = h.hello()
        h.clock.advance(30)
        h.state.sweep()
        [ping] = a[0].take()
        self.assertIsInstance(ping, Ping)
        self.assertEqual(quiet[0].take(), [])  # unregistered: not pinged
        h.send(a, Pong(ping.rid))
        h.clock.advance(61)
        h.state.sweep()
        self.assertTrue(quiet[0].closed)
        self.assertEqual(quiet[0].take()[0].error, "timeout")
        self.assertFalse(a[0].closed)
        self.assertEqual(h.state.status()["connections"], 1)

    def test_dead_peer_dropped(self) -> None:
        h = Harness(keepalive=30.0, idle_timeout=90.0)
        a = h.peer("alice")
        for _ in range(4):
            h.clock.advance(30)
            h.state.sweep()
        self.assertTrue(a[0].closed)
        self.assertEqual(h.state.status()["peers"], 0)

    def test_rtt_smoothed(self) -> None:
        h = Harness(keepalive=30.0)
        a = h.peer("alice")  # 20 ms sample
        h.clock.advance(30)
        h.state.sweep()
        [ping] = a[0].take()
        h.clock.advance(0.1)
        h.send(a, Pong(ping.rid))
        b = h.peer("bob")
        h.send(b, Connect(1, "alice", DESC_B))
        o = [m for m in a[0].take() if isinstance(m, Offer)][0]
        [reply] = [m for m in h.send(a, Accept(2, o.offer, DESC_A)) if isinstance(m, SessionReply)]
        self.assertEqual(reply.session.rtt_ms, 40)  # 0.75 * 20 + 0.25 * 100

    def test_status_line_logged(self) -> None:
        h = Harness()
        h.peer("alice")
        obs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h.state.logStatus()
        [event] = [e for e in obs if e.get("log_format", "").startswith("signalling status")]
        self.assertEqual(event["peers"], 1)
        self.assertEqual(event["counters"]["registrations"], 1)

    def test_registration_logged(self) -> None:
        obs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        Harness().peer("alice", source="192.0.2.77")
        [event] = [e for e in obs if e.get("peer_id") == "alice"]
        self.assertEqual(event["source"], "192.0.2.77")


# -- the protocol, over StringTransport


def connect_protocol(factory: SignalingFactory, host: str = "192.0.2.1"):
    proto = factory.buildProtocol(IPv4Address("TCP", host, 5555))
    tr = StringTransport(peerAddress=IPv4Address("TCP", host, 5555))
    proto.makeConnection(tr)
    return proto, tr


def lines(tr: StringTransport) -> list[dict]:
    out = [json.loads(l) for l in tr.value().splitlines()]
    tr.clear()
    return out


def hello_register(tr: StringTransport, name: str) -> bytes:
    """The hello and signed register lines of a connection whose greeting is in C{tr}."""
    greeting = wire.decode_from_server(tr.value().splitlines()[0])
    return b'{"op":"hello","rid":1,"v":2}\n' + wire.encode(signed_register(greeting, key(name), 2, name)) + b"\n"


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.state = SignalingState(self.clock, Limits(max_line=256, rate=0))
        self.factory = SignalingFactory(self.state)

    def test_interface(self) -> None:
        proto, _ = connect_protocol(self.factory)
        verifyObject(IChannel, proto)

    def test_greeting_and_hello(self) -> None:
        proto, tr = connect_protocol(self.factory)
        data = hello_register(tr, "a").replace(b"}\n", b"}\r\n", 1)
        self.assertEqual(lines(tr)[0]["op"], "hello")
        proto.dataReceived(data)
        out = lines(tr)
        self.assertEqual([o["op"] for o in out], ["ok", "registered", "ping"])

    def test_garbage_gets_error_and_stays_open(self) -> None:
        proto, tr = connect_protocol(self.factory)
        lines(tr)
        proto.dataReceived(b"not json\n")
        [err] = lines(tr)
        self.assertEqual((err["op"], err["code"], err["rid"]), ("error", 400, None))
        self.assertFalse(tr.disconnecting)

    def test_long_line_closes(self) -> None:
        proto, tr = connect_protocol(self.factory)
        lines(tr)
        proto.dataReceived(b"x" * 300)
        [err] = lines(tr)
        self.assertEqual((err["code"], err["error"]), (413, "line-too-long"))
        self.assertTrue(tr.disconnecting)

    def test_line_at_limit_accepted(self) -> None:
        proto, tr = connect_protocol(self.factory)
        lines(tr)
        line = b'{"op":"ping","rid":1}'
        line = line[:-1] + b" " * (256 - len(line)) + b"}"
        self.assertEqual(len(line), 256)
        proto.dataReceived(line + b"\n")
        self.assertEqual(lines(tr), [{"op": "pong", "rid": 1}])

    def test_connection_lost_unregisters(self) -> None:
        proto, tr = connect_protocol(self.factory)
        proto.dataReceived(hello_register(tr, "a"))
        self.assertEqual(self.state.status()["peers"], 1)
        proto.connectionLost()
        self.assertEqual(self.state.status(), {**self.state.status(), "peers": 0, "connections": 0})

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.binary(max_size=80)
            | st.sampled_from(
                [
                    b'{"op":"ping","rid":1}',
                    b'{"op":"register","rid":2,"id":"x"}',
                    b'{"op":"hello","rid":1,"v":2}',
                    b"\xff\n",
                    b"{}",
                    b"y" * 300,
                ]
            ),
            max_size=10,
        )
    )
    def test_one_bad_client_does_not_disturb_another(self, chunks: list[bytes]) -> None:
        """Whatever one connection sends, the mediator stays up and another peer is served."""
        clock = Clock()
        state = SignalingState(clock, Limits(max_line=256, rate=0))
        factory = SignalingFactory(state)
        good, gtr = connect_protocol(factory, "192.0.2.1")
        good.dataReceived(hello_register(gtr, "good"))
        lines(gtr)
        bad, btr = connect_protocol(factory, "192.0.2.2")
        for chunk in chunks:
            bad.dataReceived(chunk + b"\n")
        for line in btr.value().splitlines():
            msg = wire.decode_from_server(line)  # every reply is valid protocol
            if isinstance(msg, Error):
                self.assertIn(msg.code, set(wire.ERROR_CODES.values()))
        bad.connectionLost()
        good.dataReceived(b'{"op":"ping","rid":3}\n')
        self.assertEqual(lines(gtr), [{"op": "pong", "rid": 3}])
        self.assertEqual(state.status()["peers"], 1)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.binary(min_size=1, max_size=40), max_size=8))
    def test_every_line_gets_exactly_one_reply(self, junk: list[bytes]) -> None:
        proto, tr = connect_protocol(self.factory)
        proto.dataReceived(b'{"op":"hello","rid":1,"v":2}\n')
        lines(tr)
        junk = [j.replace(b"\n", b"").replace(b"\r", b"") for j in junk]
        junk = [j for j in junk if j]
        proto.dataReceived(b"".join(j + b"\n" for j in junk))
        self.assertEqual(len(tr.value().splitlines()), len(junk))


# -- random sequences of operations against the state machine

_actions = st.lists(
    st.one_of(
        st.tuples(st.just("hello"), st.integers(0, 3)),
        st.tuples(
            st.just("register"), st.integers(0, 3), st.sampled_from(["a", "b", "c"]), st.booleans(), st.booleans()
        ),
        st.tuples(st.just("connect"), st.integers(0, 3), st.sampled_from(["a", "b", "c", "zz"])),
        st.tuples(st.just("answer"), st.integers(0, 3), st.booleans()),
        st.tuples(st.just("report"), st.integers(0, 3), st.sampled_from(["connected", "failed"])),
        st.tuples(st.just("ping"), st.integers(0, 3)),
        st.tuples(st.just("close"), st.integers(0, 3)),
        st.tuples(st.just("wait"), st.sampled_from([0.01, 1.0, 31.0])),
    ),
    max_size=40,
)


class StateMachinePropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_actions)
    def test_every_request_answered_once(self, actions) -> None:
        """
        Whatever four connections do, in any order: nothing raises, every
        request on a connection that stays open gets exactly one reply once
        offers have timed out, and the tables only point at live connections.
        """
        clock = Clock()
        state = SignalingState(
            clock, Limits(offer_timeout=10.0, keepalive=30.0, idle_timeout=1000.0, rate=0), choose_order=udp_first
        )
        chans = [FakeChannel() for _ in range(4)]
        links = [state.open(c, f"192.0.2.{i}") for i, c in enumerate(chans)]
        open_ = [True] * 4
        sent: list[list[int]] = [[] for _ in range(4)]
        rid = itertools.count(1)
        offers: list[list[str]] = [[] for _ in range(4)]
        sessions: list[list[str]] = [[] for _ in range(4)]
        seen = [0] * 4

        def request(i: int, msg) -> None:
            sent[i].append(msg.rid)
            state.received(links[i], msg)

        def register(i: int, name: str, replace: bool = False, stranger: bool = False) -> Register:
            return signed_register(
                chans[i].sent[0], key("mallory" if stranger else name), next(rid), name, None, replace
            )

        for i, name in enumerate(["a", "b", "c"]):  # three registered peers and a stranger
            request(i, Hello(next(rid), 2))
            request(i, register(i, name))
        for action in actions:
            kind, *args = action
            if kind == "wait":
                clock.advance(args[0])
                state.sweep()
                continue
            for j in range(4):  # what each peer has been told so far
                new, seen[j] = chans[j].sent[seen[j] :], len(chans[j].sent)
                for m in new:
                    if isinstance(m, Offer):
                        offers[j].append(m.offer)
                    elif isinstance(m, SessionReply):
                        sessions[j].append(m.session.id)
                    elif isinstance(m, Ping) and open_[j]:
                        state.received(links[j], Pong(m.rid))
            i = args[0]
            if kind == "answer":  # whoever has an offer waiting, starting at i
                i = next((k % 4 for k in range(i, i + 4) if open_[k % 4] and offers[k % 4]), i)
            if not open_[i]:
                continue
            if kind == "hello":
                request(i, Hello(next(rid), 2))
            elif kind == "register":
                request(i, register(i, args[1], args[2], args[3]))
            elif kind == "connect":
                request(i, Connect(next(rid), args[1], DESC_A))
            elif kind == "answer" and offers[i]:
                o = offers[i].pop(0)
                request(i, Accept(next(rid), o, DESC_B) if args[1] else Reject(next(rid), o))
            elif kind == "report" and sessions[i]:
                outcome = args[1]
                request(i, Report(next(rid), sessions[i][0], outcome, "udp" if outcome == "connected" else None))
            elif kind == "ping":
                request(i, Ping(next(rid)))
            elif kind == "close":
                open_[i] = False
                state.closed(links[i])
            for j in range(4):  # the state may have closed a connection itself (replaced)
                if open_[j] and chans[j].closed:
                    open_[j] = False
                    state.closed(links[j])
            # the tables only point at live connections
            live = {links[j] for j in range(4) if open_[j]}
            self.assertLessEqual(set(state.peers.values()), live)
            # every registered id is bound to its connection's key, and only squatters' attempts fail
            self.assertLessEqual(set(state.peers) | set(state.held), set(state.bindings))
            for name, link in state.peers.items():
                self.assertEqual(link.fingerprint, str(Fingerprint(state.bindings[name])))
            for offer in state.offers.values():
                self.assertIn(offer.initiator, live)
                self.assertIn(offer.target, live)

        clock.advance(11)  # every pending offer has expired by now
        state.sweep()
        for i in range(4):
            if not open_[i] or chans[i].closed:
                continue
            replies = [
                m.rid
                for m in chans[i].sent
                if isinstance(m, (Ok, Registered, SessionReply, Error, Pong)) and m.rid is not None
            ]
            self.assertEqual(sorted(replies), sorted(sent[i]), f"connection {i}: {chans[i].sent}")


class KernelRTTTests(SynchronousTestCase):
    """The mediator reads a connection's RTT from TCP_INFO before any ping has returned."""

    def test_real_socket(self) -> None:
        import socket

        from natbypass.signaling.server import kernel_rtt

        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return client

        rtt = kernel_rtt(Transport())
        self.assertIsNotNone(rtt)
        self.assertGreater(rtt, 0)
        self.assertLess(rtt, 1.0)

    def test_no_socket(self) -> None:
        from twisted.internet.testing import StringTransport

        from natbypass.signaling.server import kernel_rtt

        self.assertIsNone(kernel_rtt(StringTransport()))


class NatPairCountTests(SynchronousTestCase):
    """Outcomes are counted by the pair of NAT kinds too, for the traversal metrics."""

    def test_sessions_and_outcomes_by_nat_pair(self) -> None:
        h = Harness(choose_order=udp_first)
        a, b = h.peer("alice"), h.peer("bob")
        h.send(a, Connect(10, "bob", DESC_A))
        offer = [m for m in b[0].take() if isinstance(m, Offer)][0]
        [reply] = [m for m in h.send(b, Accept(20, offer.offer, DESC_B)) if isinstance(m, SessionReply)]
        a[0].take()
        h.send(a, Report(11, reply.session.id, "connected", "udp"))
        h.send(b, Report(21, reply.session.id, "failed", None, "nothing came back"))
        counters = h.state.status()["counters"]
        pair = "restricted-cone,symmetric-random"  # DESC_A's and DESC_B's NATs, as the selection table names them
        self.assertEqual(counters[f"sessions-by-nat:{pair}"], 1)
        self.assertEqual(counters[f"outcome-by-nat:{pair}:connected/udp"], 1)
        self.assertEqual(counters[f"outcome-by-nat:{pair}:failed"], 1)

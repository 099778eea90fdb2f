"""
Unit tests of the mediator cluster's routing (natbypass.signaling.cluster)
over an in-memory fake of the Redis operations it uses, and of the RESP
codec (natbypass.signaling.resp), with hypothesis round trips.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.signaling.client import FailoverEndpoint
from natbypass.signaling.cluster import IClusterDirectory, RedisDirectory, decode_payload
from natbypass.signaling.resp import (
    ClusterUnavailable,
    ProtocolError,
    RedisError,
    RedisURL,
    RespParser,
    RespProtocol,
    encode_command,
    encode_reply,
)
from natbypass.signaling.server import Limits, SignalingState
from natbypass.signaling.wire import (
    Accept,
    Cancel,
    Connect,
    Description,
    Error,
    Hello,
    Offer,
    Ok,
    Ping,
    Registered,
    Reject,
    SessionReply,
)
from natbypass.testing.cluster import FakeDirectory, FakeRedis
from natbypass.testing.signaling import FakeChannel, counting_random, key, signed_register, udp_first


class Cluster:
    """Two (or more) mediators' signalling states on one clock and one fake Redis."""

    def __init__(self, n: int = 2, **limits: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.redis = FakeRedis(self.clock)
        self.dirs = [FakeDirectory(self.redis, f"node{i}") for i in range(n)]
        self.states = [
            SignalingState(self.clock, Limits(**limits), None, udp_first, random_bytes=counting_random(), cluster=d)
            for d in self.dirs
        ]
        self._rid = itertools.count(100)

    def open(self, m: int, source: str = "192.0.2.1") -> tuple[FakeChannel, Any]:
        ch = FakeChannel()
        link = self.states[m].open(ch, source)
        greeting = ch.take()[0]
        self.states[m].received(link, Hello(1, 2))
        assert ch.take() == [Ok(1)]
        return ch, (link, greeting)

    def register(self, m: int, name: str, identity: Any = None, replace: bool = True) -> tuple[FakeChannel, Any]:
        ch, (link, greeting) = self.open(m)
        self.states[m].received(link, signed_register(greeting, identity or key(name), 2, name, replace=replace))
        return ch, link

    def peer(self, m: int, name: str) -> tuple[FakeChannel, Any]:
        ch, link = self.register(m, name)
        out = ch.take()
        assert isinstance(out[0], Registered), out
        assert isinstance(out[1], Ping)
        return ch, link


class RoutingTests(SynchronousTestCase):
    def test_fake_provides_interface(self) -> None:
        c = Cluster()
        verifyObject(IClusterDirectory, c.dirs[0])

    def test_session_across_mediators(self) -> None:
        """An offer to a peer of the other mediator reaches it; both sides get one session."""
        c = Cluster()
        a, b = c.peer(0, "alice"), c.peer(1, "bob")
        c.states[0].received(a[1], Connect(7, "bob", Description()))
        self.assertEqual(a[0].take(), [])
        c.redis.flush()
        (offer,) = b[0].take()
        self.assertIsInstance(offer, Offer)
        self.assertEqual(offer.peer, "alice")
        self.assertEqual(offer.description.fingerprint, str(key("alice").fingerprint))
        c.states[1].received(b[1], Accept(9, offer.offer, Description()))
        (sb,) = b[0].take()
        c.redis.flush()
        (sa,) = a[0].take()
        self.assertIsInstance(sa, SessionReply)
        self.assertEqual((sa.rid, sb.rid), (7, 9))
        self.assertEqual((sa.session.id, sa.session.key), (sb.session.id, sb.session.key))
        self.assertEqual((sa.session.role, sb.session.role), ("controlling", "controlled"))
        self.assertEqual(sa.session.peer, "bob")
        self.assertEqual(sb.session.peer, "alice")
        self.assertEqual(c.states[0].status()["pending_offers"], 0)
        self.assertEqual(c.states[1].status()["pending_offers"], 0)
        # Both mediators know the session, so each side's report is taken.
        self.assertIn(sa.session.id, c.states[0].sessions)
        self.assertIn(sa.session.id, c.states[1].sessions)

    def test_reject_travels_back(self) -> None:
        c = Cluster()
        a, b = c.peer(0, "alice"), c.peer(1, "bob")
        c.states[0].received(a[1], Connect(7, "bob", Description()))
        c.redis.flush()
        (offer,) = b[0].take()
        c.states[1].received(b[1], Reject(9, offer.offer, "busy"))
        self.assertEqual(b[0].take(), [Ok(9)])
        c.redis.flush()
        (err,) = a[0].take()
        self.assertEqual((err.rid, err.error), (7, "rejected"))
        self.assertIn("busy", err.reason)

    def test_unknown_peer(self) -> None:
        c = Cluster()
        a = c.peer(0, "alice")
        c.states[0].received(a[1], Connect(7, "nobody", Description()))
        (err,) = a[0].take()
        self.assertEqual((err.rid, err.error), (7, "unknown-peer"))
        self.assertEqual(c.states[0].status()["pending_offers"], 0)

    def test_dead_mediator_is_unknown_peer(self) -> None:
        c = Cluster()
        a, _ = c.peer(0, "alice"), c.peer(1, "bob")
        c.dirs[1].available = False  # its channel has no subscriber: PUBLISH reaches nobody
        c.states[0].received(a[1], Connect(7, "bob", Description()))
        (err,) = a[0].take()
        self.assertEqual(err.error, "unknown-peer")
        self.assertIn("does not answer", err.reason)

    def test_timeout_cancels_on_the_other_mediator(self) -> None:
        c = Cluster(offer_timeout=5.0)
        a, b = c.peer(0, "alice"), c.peer(1, "bob")
        c.states[0].received(a[1], Connect(7, "bob", Description()))
        c.redis.flush()
        (offer,) = b[0].take()
        c.clock.advance(5.0)
        c.states[0].sweep()
        (err,) = a[0].take()
        self.assertEqual((err.rid, err.error), (7, "timeout"))
        c.redis.flush()
        self.assertEqual(b[0].take(), [Cancel(offer.offer, "expired")])
        c.states[1].sweep()
        c.redis.flush()
        self.assertEqual(a[0].take(), [])  # no second timeout

    def test_initiator_leaving_withdraws(self) -> None:
        c = Cluster()
        a, b = c.peer(0, "alice"), c.peer(1, "bob")
        c.states[0].received(a[1], Connect(7, "bob", Description()))
        c.redis.flush()
        (offer,) = b[0].take()
        c.states[0].closed(a[1])
        c.redis.flush()
        (cancel,) = b[0].take()
        self.assertEqual(cancel.offer, offer.offer)
        self.assertEqual(c.states[1].status()["pending_offers"], 0)

    def test_target_leaving_is_gone(self) -> None:
        c = Cluster()
        a, b = c.peer(0, "alice"), c.peer(1, "bob")
        c.states[0].received(a[1], Connect(7, "bob", Description()))
        c.redis.flush()
        b[0].take()
        c.states[1].closed(b[1])
        c.redis.flush()
        (err,) = a[0].take()
        self.assertEqual((err.rid, err.error), (7, "gone"))

    def test_fair_share_applies_to_remote_initiators(self) -> None:
        """The target's mediator keeps its per-initiator share for offers from other mediators."""
        c = Cluster(max_offers_per_pair=2, rate=0)
        a, b = c.peer(0, "alice"), c.peer(1, "bob")
        for rid in (7, 8, 9):
            c.states[0].received(a[1], Connect(rid, "bob", Description()))
        c.redis.flush()
        self.assertEqual(len(b[0].take()), 2)
        c.redis.flush()
        (err,) = a[0].take()
        self.assertEqual((err.rid, err.error), (9, "rate-limited"))

    def test_id_bound_across_mediators(self) -> None:
        """An id bound on one mediator cannot be taken with another key on the other."""
        c = Cluster()
        c.peer(0, "alice")
        ch, _ = c.register(1, "alice", identity=key("mallory"))
        (err,) = ch.take()
        self.assertEqual((err.rid, err.error), (2, "id-bound"))
        self.assertEqual(c.states[1].status()["counters"]["ids:squat-refused"], 1)

    def test_binding_outlives_the_peer_for_the_hold(self) -> None:
        c = Cluster(id_hold=100.0)
        a = c.peer(0, "alice")
        c.states[0].closed(a[1])
        ch, _ = c.register(1, "alice", identity=key("mallory"))
        self.assertEqual(ch.take()[0].error, "id-bound")
        c.clock.advance(101)
        ch, _ = c.register(1, "alice", identity=key("mallory"))
        self.assertIsInstance(ch.take()[0], Registered)

    def test_reregistering_elsewhere_replaces(self) -> None:
        """The owner's key moves the id to another mediator; the old session there is closed."""
        c = Cluster()
        a = c.peer(0, "alice")
        c.peer(1, "alice")
        c.redis.flush()
        (err,) = a[0].take()
        self.assertEqual((err.rid, err.error), (None, "duplicate-id"))
        self.assertTrue(a[0].closed)
        self.assertNotIn("alice", c.states[0].peers)
        self.assertEqual(c.redis.get("peer:alice"), "node1")

    def test_max_ids_counts_the_whole_cluster(self) -> None:
        """--max-ids bounds the ids bound in the cluster (Redis), not per mediator; owners still get in."""
        c = Cluster(max_ids=2, id_hold=60.0)
        a = c.peer(0, "a")
        c.peer(1, "b")
        ch, _ = c.register(0, "c")
        (err,) = ch.take()
        self.assertEqual((err.code, err.error), (503, "too-many-ids"))
        self.assertIn("cluster holds its maximum of 2 bound ids", err.reason)
        self.assertEqual(c.states[0].status()["counters"]["errors:too-many-ids"], 1)
        c.states[0].closed(a[1])  # held, still counted
        ch, _ = c.register(1, "c")
        self.assertEqual(ch.take()[0].error, "too-many-ids")
        c.peer(1, "a")  # its owner is not refused, on either mediator

    def test_max_ids_freed_when_a_hold_ends(self) -> None:
        c = Cluster(max_ids=1, id_hold=10.0)
        a = c.peer(0, "a")
        c.states[0].closed(a[1])
        ch, _ = c.register(1, "b")
        self.assertEqual(ch.take()[0].error, "too-many-ids")
        c.clock.advance(11)
        c.peer(1, "b")

    def test_without_replace_duplicate(self) -> None:
        c = Cluster()
        c.peer(0, "alice")
        ch, _ = c.register(1, "alice", replace=False)
        self.assertEqual(ch.take()[0].error, "duplicate-id")

    def test_redis_down_refuses_clearly_and_local_work_goes_on(self) -> None:
        c = Cluster()
        a, b = c.peer(0, "alice"), c.peer(0, "bob")
        c.peer(1, "carol")
        c.dirs[0].available = False
        c.states[0].cluster.cluster_down("lost")
        ch, _ = c.register(0, "dave")
        (err,) = ch.take()
        self.assertEqual((err.code, err.error), (503, "cluster-unavailable"))
        c.states[0].received(a[1], Connect(7, "carol", Description()))
        (err,) = a[0].take()
        self.assertEqual((err.rid, err.error), (7, "cluster-unavailable"))
        # A peer of this mediator is still reachable without Redis.
        c.states[0].received(a[1], Connect(8, "bob", Description()))
        (offer,) = b[0].take()
        self.assertIsInstance(offer, Offer)
        status = c.states[0].status()
        self.assertFalse(status["cluster_available"])
        self.assertEqual(status["counters"]["cluster:refused"], 2)

    def test_recovery_republishes_registrations(self) -> None:
        c = Cluster()
        c.peer(0, "alice")
        c.redis.keys.clear()  # Redis restarted empty
        c.states[0].cluster.cluster_up()
        self.assertEqual(c.redis.get("peer:alice"), "node0")
        self.assertEqual(c.redis.get("bind:alice"), key("alice").fingerprint.digest)

    def test_lines_behind_register_wait_for_the_claim(self) -> None:
        """A connect pipelined behind register is handled after the (asynchronous) claim, in order."""
        c = Cluster()
        b = c.peer(0, "bob")
        real = c.dirs[0].claim
        gate: Deferred[Any] = Deferred()
        c.dirs[0].claim = lambda *a: gate.addCallback(lambda _: real(*a))  # type: ignore[method-assign]
        ch, (link, greeting) = c.open(0)
        c.states[0].received(link, signed_register(greeting, key("alice"), 2, "alice"))
        c.states[0].received(link, Connect(3, "bob", Description()))
        self.assertEqual(ch.take(), [])
        gate.callback(None)
        out = ch.take()
        self.assertIsInstance(out[0], Registered)
        self.assertIsInstance(b[0].take()[0], Offer)

    def test_status_and_refresh(self) -> None:
        c = Cluster()
        c.peer(0, "alice")
        c.redis.keys.pop("peer:alice")
        c.clock.advance(11)
        c.states[0].sweep()
        self.assertEqual(c.redis.get("peer:alice"), "node0")
        self.assertEqual(c.states[0].status()["cluster_node"], "node0")


class RespTests(SynchronousTestCase):
    def test_command(self) -> None:
        self.assertEqual(encode_command("SET", b"k", 5), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n")

    def test_parse_vector(self) -> None:
        p = RespParser()
        data = b"+OK\r\n:-3\r\n$-1\r\n*2\r\n$3\r\nfoo\r\n-ERR no\r\n"
        out = []
        for i in range(len(data)):  # byte by byte: every split point
            out += p.feed(data[i : i + 1])
        self.assertEqual(out[:4], [b"OK", -3, None, [b"foo", out[3][1]]])
        self.assertIsInstance(out[3][1], RedisError)

    @given(
        st.recursive(
            st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=64),
            lambda children: st.lists(children, max_size=5),
            max_leaves=20,
        ),
        st.integers(1, 17),
    )
    def test_round_trip(self, value: Any, chunk: int) -> None:
        data = encode_reply(value) * 2
        p = RespParser()
        out = []
        for i in range(0, len(data), chunk):
            out += p.feed(data[i : i + chunk])
        self.assertEqual(out, [value, value])

    @given(st.binary(max_size=200))
    def test_junk_never_crashes(self, data: bytes) -> None:
        try:
            RespParser().feed(data)
        except ProtocolError:
            pass

    def test_bad_type(self) -> None:
        self.assertRaises(ProtocolError, RespParser().feed, b"?x\r\n")

    def test_url(self) -> None:
        u = RedisURL("rediss://:s%40cret@redis.example:6380/2")
        self.assertEqual((u.tls, u.host, u.port, u.db, u.password), (True, "redis.example", 6380, 2, "s@cret"))
        u = RedisURL("unix:///run/redis.sock?db=3")
        self.assertEqual((u.path, u.db), ("/run/redis.sock", 3))
        for bad in ("http://x", "redis://", "redis://h/notanumber", "unix://"):
            self.assertRaises(ValueError, RedisURL, bad)

    def test_protocol_pipelines_and_pushes(self) -> None:
        messages = []
        p = RespProtocol(password="pw", on_message=lambda ch, d: messages.append((ch, d)))
        t = StringTransport()
        p.makeConnection(t)
        self.assertEqual(t.value(), encode_command("AUTH", "pw"))
        self.assertFalse(p.ready)
        p.dataReceived(b"+OK\r\n")
        self.assertTrue(p.ready)
        d1, d2 = p.execute("PING"), p.execute("GET", "x")
        got = []
        d1.addCallback(got.append)
        d2.addErrback(lambda f: got.append(f.value))
        p.dataReceived(encode_reply([b"message", b"ch", b"hi"]) + b"+PONG\r\n-ERR x\r\n")
        self.assertEqual(messages, [(b"ch", b"hi")])
        self.assertEqual(got[0], b"PONG")
        self.assertIsInstance(got[1], RedisError)
        d3 = p.execute("PING")
        p.connectionLost(None)
        self.failureResultOf(d3, ClusterUnavailable)

    def test_directory_interface(self) -> None:
        d = RedisDirectory(FailoverEndpoint([object()]), Clock(), node="n1")  # type: ignore[list-item]
        verifyObject(IClusterDirectory, d)
        self.assertFalse(d.available)
        self.failureResultOf(d.claim("a", b"d", 1, 1, False, False), ClusterUnavailable)
        self.assertEqual(decode_payload(b'{"t":"x"}'), {"t": "x"})


class FailoverEndpointTests(SynchronousTestCase):
    def test_next_on_failure_and_after_a_connection(self) -> None:
        calls = []

        class EP:
            def __init__(self, name: str, ok: bool) -> None:
                self.name, self.ok = name, ok

            def connect(self, factory: Any) -> Any:
                calls.append(self.name)
                return succeed(self.name) if self.ok else fail(ConnectionRefusedError(self.name))

        a, b, c = EP("a", False), EP("b", True), EP("c", True)
        ep = FailoverEndpoint([a, b, c])
        self.assertEqual(self.successResultOf(ep.connect(None)), "b")
        self.assertEqual(calls, ["a", "b"])
        # A reconnection (the mediator died) goes to the next one.
        self.assertEqual(self.successResultOf(ep.connect(None)), "c")
        b.ok = c.ok = False
        self.failureResultOf(ep.connect(None), ConnectionRefusedError)
        self.assertEqual(calls, ["a", "b", "c", "a", "b", "c"])

    def test_error_names(self) -> None:
        self.assertEqual(Error(None, "cluster-unavailable", "x").code, 503)

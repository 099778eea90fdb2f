"""
Regression tests for the mediator's signalling under abuse and load (issue
"Hardening under abuse and load"): bounded work per client, fair scheduling,
connection caps, offer-slot fairness, escaped logs and graceful shutdown.
All in memory: fake channels, StringTransport and a Clock.
"""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.signaling import server, service
from natbypass.signaling.server import SignalingFactory, SignalingState
from natbypass.signaling.service import makeSignalingService
from natbypass.signaling.wire import (
    Accept,
    Candidate,
    Connect,
    Description,
    Error,
    Offer,
    Ping,
    Pong,
    Reject,
    Report,
    WireError,
)
from natbypass.testing.signaling import Harness, udp_first

#: A description an offer or answer carries (its contents do not matter to these tests).
DESC_A = Description((Candidate("host", "10.0.0.1", 4000), Candidate("srflx", "203.0.113.1", 5000)))


class PushBackTransport(StringTransport):
    """
    A StringTransport that, like a real TCP transport, asks its streaming
    producer to pause when more than C{high} bytes wait to be written (the
    peer does not read) and to resume once C{drain} empties the buffer.
    """

    def __init__(self, high: int = 4096, **kw) -> None:
        super().__init__(**kw)
        self.high = high
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and not self.producer_paused and len(self.value()) > self.high:
            self.producer_paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        out = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return out


def connect(factory: SignalingFactory, host: str = "192.0.2.1", transport: StringTransport | None = None):
    addr = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 5555)
    proto = factory.buildProtocol(addr)
    tr = transport if transport is not None else StringTransport()
    tr.peerAddress = addr
    proto.makeConnection(tr)
    return proto, tr


def replies(tr: StringTransport) -> list[dict]:
    out = [json.loads(l) for l in tr.value().splitlines()]
    tr.clear()
    return out


PING = b'{"op":"ping","rid":1}\n'


class TurnClock(Clock):
    """
    A Clock with reactor turns: C{turn} runs only the calls due when it
    starts, as one reactor iteration does (a C{callLater(0)} made meanwhile
    waits for the next turn; C{Clock.advance(0)} would run it at once).
    """

    def turn(self) -> None:
        due = [c for c in self.getDelayedCalls() if c.getTime() <= self.seconds()]
        for c in due:
            if c.active():
                self.calls.remove(c)
                c.called = 1
                c.func(*c.args, **c.kw)


class BackpressureTests(SynchronousTestCase):
    """Finding 1: a client that never reads its replies stops being read."""

    def test_protocol_is_a_push_producer(self) -> None:
        state = SignalingState(Clock(), server.Limits(rate=0))
        proto, tr = connect(SignalingFactory(state))
        verifyObject(IPushProducer, proto)
        self.assertIs(tr.producer, proto)
        self.assertTrue(tr.streaming)

    def test_never_reading_client_is_no_longer_read(self) -> None:
        clock = Clock()
        state = SignalingState(clock, server.Limits(rate=0))
        factory = SignalingFactory(state)
        proto, tr = connect(factory, transport=PushBackTransport(high=4096))
        tr.clear()
        for _ in range(200):  # 200 x 50 lines = 10,000 pings, about 220 kB, never read
            proto.dataReceived(PING * 50)
            clock.advance(0)
        # The replies stop at about the transport's high-water mark ...
        self.assertLess(len(tr.value()), 4096 + 64 * 40)
        # ... because the mediator stopped reading the socket (the kernel then stops the client).
        self.assertEqual(tr.producerState, "paused")
        self.assertEqual(state.status()["paused_connections"], 1)
        # Once the client reads, the mediator carries on where it stopped.
        answered = 0
        for _ in range(1000):
            got = tr.drain().count(b'"op":"pong"')
            clock.advance(0)
            if not got:
                break
            answered += got
        answered += tr.value().count(b'"op":"pong"')
        self.assertGreater(answered, 100)
        self.assertEqual(state.status()["paused_connections"], 0)
        self.assertEqual(tr.producerState, "producing")

    def test_buffered_input_is_bounded_while_paused(self) -> None:
        """
        Paused, the protocol keeps what was read but reads no more once that
        passes its read-ahead (it goes on reading a little: a TLS handshake
        must complete while the greeting waits for it).
        """
        clock = Clock()
        state = SignalingState(clock, server.Limits(rate=0))
        proto, tr = connect(SignalingFactory(state), transport=PushBackTransport(high=256))
        proto.dataReceived(PING * 20)
        self.assertTrue(proto.paused)
        self.assertEqual(tr.producerState, "producing")
        proto.dataReceived(PING * (proto.read_ahead // len(PING)))
        self.assertEqual(tr.producerState, "paused")

    def test_close_unregisters_the_producer(self) -> None:
        """
        A transport with a paused streaming producer never finishes
        loseConnection (it resumes the producer instead): close unregisters it.
        """
        state = SignalingState(Clock(), server.Limits(rate=0))
        proto, tr = connect(SignalingFactory(state))
        proto.close()
        self.assertIsNone(tr.producer)
        self.assertTrue(tr.disconnecting)


class FairnessTests(SynchronousTestCase):
    """Finding 1: one connection sending flat out cannot take the reactor from the others."""

    def test_lines_per_turn_bounded(self) -> None:
        clock = TurnClock()
        state = SignalingState(clock, server.Limits(rate=0, lines_per_turn=32))
        factory = SignalingFactory(state)
        flood, ftr = connect(factory, "192.0.2.1")
        other, otr = connect(factory, "192.0.2.2")
        ftr.clear()
        otr.clear()
        flood.dataReceived(PING * 10_000)
        # one turn handled at most 32 of the flood's lines; the rest wait, and so does the socket
        self.assertEqual(ftr.value().count(b'"op":"pong"'), 32)
        self.assertEqual(ftr.producerState, "paused")
        # the other client is served at once
        other.dataReceived(b'{"op":"ping","rid":7}\n')
        self.assertEqual(replies(otr), [{"op": "pong", "rid": 7}])
        # later turns continue the flood, 32 lines each
        clock.turn()
        self.assertEqual(ftr.value().count(b'"op":"pong"'), 64)
        other.dataReceived(b'{"op":"ping","rid":8}\n')  # still served between two of the flood's turns
        self.assertEqual(replies(otr), [{"op": "pong", "rid": 8}])
        for _ in range(400):
            clock.turn()
        self.assertEqual(ftr.value().count(b'"op":"pong"'), 10_000)
        self.assertEqual(ftr.producerState, "producing")

    def test_normal_traffic_not_delayed(self) -> None:
        clock = Clock()
        state = SignalingState(clock, server.Limits(rate=0))
        proto, tr = connect(SignalingFactory(state))
        tr.clear()
        proto.dataReceived(PING * 5)
        self.assertEqual(len(replies(tr)), 5)
        self.assertEqual(clock.getDelayedCalls(), [])


class RateLimitAbuseTests(SynchronousTestCase):
    """Finding 1: rate-limited lines are not each answered; a client that keeps going is closed."""

    def test_flood_gets_bounded_replies_then_closed(self) -> None:
        h = Harness(rate=5.0, burst=5.0, rate_limited_replies=3, max_rate_limited=20)
        c = h.open()
        c[0].take()
        out = []
        for i in range(1000):
            out += h.send(c, Ping(i))
            if c[0].closed:
                break
        pongs = [m for m in out if isinstance(m, Pong)]
        errors = [m for m in out if isinstance(m, Error)]
        self.assertEqual(len(pongs), 5)
        self.assertEqual([e.error for e in errors], ["rate-limited"] * 4)
        self.assertIsNone(errors[-1].rid)  # the final notice
        self.assertIn("closing", errors[-1].reason)
        self.assertTrue(c[0].closed)
        counters = h.state.status()["counters"]
        self.assertEqual(counters["closed:abusive"], 1)
        self.assertEqual(counters["rate-limited"], 21)

    def test_occasional_excess_is_forgiven(self) -> None:
        """A window later, the rate-limited count starts again."""
        h = Harness(rate=5.0, burst=5.0, rate_limited_replies=3, max_rate_limited=20, abuse_window=10.0)
        c = h.open()
        c[0].take()
        for _ in range(5):
            for i in range(15):  # 10 over the limit each time
                h.send(c, Ping(i))
            h.clock.advance(11)
        self.assertFalse(c[0].closed)

    def test_malformed_flood_closed_too(self) -> None:
        h = Harness(rate=1.0, burst=1.0, rate_limited_replies=1, max_rate_limited=5)
        ch, link = h.open()
        ch.take()
        for i in range(100):
            h.state.malformed(link, WireError("bad-request", "x", i))
        self.assertTrue(ch.closed)
        self.assertLessEqual(len(ch.take()), 3)


class IdleProgressTests(SynchronousTestCase):
    """Finding 1: only real progress pushes back the idle timeout."""

    def test_garbage_does_not_keep_a_connection_open(self) -> None:
        h = Harness(idle_timeout=90.0, keepalive=30.0, rate=0)
        ch, link = h.open()
        for _ in range(20):
            h.clock.advance(10)
            h.state.malformed(link, WireError("bad-request", "junk", None))
            h.state.sweep()
        self.assertTrue(ch.closed)
        self.assertEqual(h.state.status()["counters"]["idle-timeouts"], 1)

    def test_unregistered_pings_do_not_keep_a_connection_open(self) -> None:
        """A connection that never registers holds its slot for the idle timeout, not for ever."""
        h = Harness(idle_timeout=90.0, keepalive=30.0, rate=0)
        c = h.hello()
        for i in range(20):
            h.clock.advance(10)
            h.send(c, Ping(i))
            h.state.sweep()
        self.assertTrue(c[0].closed)

    def test_refused_requests_do_not_count(self) -> None:
        h = Harness(idle_timeout=90.0, keepalive=30.0, rate=0)
        a = h.peer("alice")
        for i in range(20):
            h.clock.advance(10)
            h.send(a, Connect(i, "nobody", DESC_A))  # 404 each time
            h.state.sweep()  # keepalive pings go unanswered
        self.assertTrue(a[0].closed)

    def test_registered_peer_answering_pings_stays(self) -> None:
        h = Harness(idle_timeout=90.0, keepalive=30.0, rate=0)
        a = h.peer("alice")
        for _ in range(20):
            h.clock.advance(10)
            h.state.sweep()
            for m in a[0].take():
                if isinstance(m, Ping):
                    h.send(a, Pong(m.rid))
        self.assertFalse(a[0].closed)


class ConnectionCapTests(SynchronousTestCase):
    """Finding 3: a global cap, and per-source caps with IPv6 grouped by /64."""

    def test_global_cap(self) -> None:
        h = Harness(max_connections=3, max_per_source=0)
        for i in range(3):
            self.assertIsNotNone(h.open(f"192.0.2.{i}")[1])
        ch, link = h.open("198.51.100.9")
        self.assertIsNone(link)
        [err] = ch.take()
        self.assertEqual((err.code, err.error, err.rid), (503, "too-many-connections", None))
        self.assertTrue(ch.closed)
        status = h.state.status()
        self.assertEqual(status["counters"]["refused:max-connections"], 1)
        self.assertEqual(status["max_connections"], 3)

    def test_ipv6_sources_grouped_by_64(self) -> None:
        h = Harness(max_per_source=2)
        self.assertIsNotNone(h.open("2001:db8:0:1::1")[1])
        self.assertIsNotNone(h.open("2001:db8:0:1::2")[1])
        ch, link = h.open("2001:db8:0:1:dead:beef:1:3")
        self.assertIsNone(link)
        self.assertEqual(ch.take()[0].error, "too-many-connections")
        self.assertIsNotNone(h.open("2001:db8:0:2::1")[1])
        self.assertEqual(h.state.status()["counters"]["refused:per-source"], 1)

    def test_source_group(self) -> None:
        self.assertEqual(server.source_group("192.0.2.7"), "192.0.2.7")
        self.assertEqual(server.source_group("2001:db8:0:1:dead:beef:1:3"), "2001:db8:0:1::/64")
        self.assertEqual(server.source_group("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(server.source_group("?"), "?")

    @given(st.one_of(st.ip_addresses(v=4).map(str), st.text(alphabet="0123456789.", max_size=20), st.text()))
    def test_source_group_of_ipv4_and_junk_is_itself(self, host) -> None:
        """The IPv4 fast path (no parsing) agrees with the parser: a dotted quad parses only to itself."""
        if ":" in host:
            return
        self.assertEqual(server.source_group(host), host)
        try:
            parsed = str(ipaddress.ip_address(host))
        except ValueError:
            return
        self.assertEqual(parsed, host)

    @given(st.ip_addresses(v=6))
    def test_source_group_of_ipv6_is_its_64(self, addr) -> None:
        group = server.source_group(str(addr))
        if addr.ipv4_mapped is not None:
            self.assertEqual(group, str(addr.ipv4_mapped))
        else:
            self.assertEqual(group, str(ipaddress.IPv6Network((addr, 64), strict=False)))

    def test_cap_below_descriptor_limit(self) -> None:
        obs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(service.connection_cap(10_000, 64, getrlimit=lambda which: (1024, 4096)), 1024 - 64)
        [event] = [e for e in obs if "descriptor" in e["log_format"]]
        self.assertIn("1024", formatEvent(event))
        self.assertEqual(service.connection_cap(100, 64, getrlimit=lambda which: (1024, 4096)), 100)
        self.assertEqual(service.connection_cap(0, 64, getrlimit=lambda which: (1024, 4096)), 960)

    def test_service_applies_the_cap(self) -> None:
        svc = makeSignalingService(
            "tcp:7000", MemoryReactorClock(), max_connections=5000, fd_reserve=24, getrlimit=lambda w: (1024, 1024)
        )
        self.assertEqual(svc.state.limits.max_connections, 1000)


def attempt(factory: SignalingFactory, host: str, port: int = 5555):
    """One accepted TCP connection from host: (protocol or None, its transport)."""
    addr = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    proto = factory.buildProtocol(addr)
    tr = StringTransport(peerAddress=addr)
    if proto is not None:
        proto.makeConnection(tr)
    return proto, tr


class AcceptRateTests(SynchronousTestCase):
    """
    Campaign finding 2 (docs/reliability.md, phases C{conns} and
    C{globalcap}): each connection refused at a cap cost an accept, a 503
    line, a log line and a close in Python, 4,800 a second from one address,
    and that took the mediator's core.  Excess connections from one source
    are now closed as they are accepted, with no reply and no state.
    """

    def factory(self, **limits) -> tuple[SignalingFactory, Clock]:
        clock = Clock()
        state = SignalingState(clock, server.Limits(**limits))
        return SignalingFactory(state), clock

    def test_connection_flood_from_one_source_is_dropped_cheaply(self) -> None:
        """1,000 connections at once from one address, as the campaign's attacker opens them."""
        factory, clock = self.factory()
        results = [attempt(factory, "192.0.2.1", 1000 + i) for i in range(1000)]
        built = [p for p, _ in results if p is not None]
        replied = [tr for _, tr in results if tr.value()]
        refusals = [tr for tr in replied if b"too-many-connections" in tr.value()]
        self.assertLessEqual(len(built), 100)  # the accept burst
        self.assertLessEqual(len(refusals), 10)
        self.assertEqual(len(factory.protocols), len(built))
        status = factory.state.status()
        self.assertEqual(status["connections_total"], len(built))
        self.assertGreaterEqual(status["counters"]["refused:accept-rate"], 1000 - len(built))
        self.assertLessEqual(status["connections"], 100)

    def test_other_sources_unaffected(self) -> None:
        factory, clock = self.factory()
        for i in range(500):
            attempt(factory, "192.0.2.1", 1000 + i)
        proto, tr = attempt(factory, "198.51.100.7")
        self.assertIsNotNone(proto)
        self.assertIn(b'"hello"', tr.value())

    def test_budget_refills_at_the_rate(self) -> None:
        factory, clock = self.factory(accept_rate=10, accept_burst=20, max_per_source=0)
        self.assertEqual(sum(attempt(factory, "192.0.2.1", i)[0] is not None for i in range(100)), 20)
        clock.advance(1)
        self.assertEqual(sum(attempt(factory, "192.0.2.1", i)[0] is not None for i in range(100)), 10)

    def test_refusal_at_a_cap_costs_more(self) -> None:
        """At its per-source cap a source gets a few 503s (cost 10 each), then silence."""
        factory, clock = self.factory(max_per_source=2, accept_burst=100)
        results = [attempt(factory, "192.0.2.1", i) for i in range(200)]
        refused = sum(b"too-many-connections" in tr.value() for _, tr in results)
        self.assertEqual(refused, (100 - 2) // 10)
        self.assertEqual(len(factory.state.links), 2)

    def test_peers_behind_one_nat_reconnect_at_once(self) -> None:
        """A full per-source share of peers (100) reconnecting after a restart all get in."""
        factory, clock = self.factory()
        results = [attempt(factory, "192.0.2.1", i) for i in range(100)]
        self.assertTrue(all(p is not None and b'"hello"' in tr.value() for p, tr in results))

    def test_ipv6_grouped_by_64(self) -> None:
        factory, clock = self.factory(accept_burst=5, max_per_source=0)
        self.assertEqual(sum(attempt(factory, f"2001:db8:0:1::{i:x}")[0] is not None for i in range(1, 50)), 5)
        self.assertIsNotNone(attempt(factory, "2001:db8:0:2::1")[0])

    def test_wrapped_transports_get_an_abort(self) -> None:
        """TLS wraps the factory and cannot take None: the refused connection is aborted instead."""
        state = SignalingState(Clock(), server.Limits(accept_burst=1))
        factory = SignalingFactory(state, drop_by_none=False)
        attempt(factory, "192.0.2.1")
        proto, tr = attempt(factory, "192.0.2.1")
        self.assertIsNotNone(proto)
        self.assertTrue(tr.disconnected)
        self.assertEqual(tr.value(), b"")
        self.assertEqual(len(factory.protocols), 1)

    def test_off(self) -> None:
        factory, clock = self.factory(accept_rate=0, max_per_source=0)
        self.assertTrue(all(attempt(factory, "192.0.2.1", i)[0] is not None for i in range(300)))

    def test_service_options(self) -> None:
        svc = makeSignalingService("tcp:7000", MemoryReactorClock(), accept_rate=3, accept_burst=7)
        self.assertEqual((svc.state.limits.accept_rate, svc.state.limits.accept_burst), (3, 7))
        self.assertIsNotNone(svc.factory.accepts)
        self.assertTrue(svc.factory.drop_by_none)
        unix = makeSignalingService("unix:/nonexistent/sock", MemoryReactorClock())
        self.assertFalse(unix.factory.drop_by_none)


class OfferSlotTests(SynchronousTestCase):
    """Finding 7: a few registrations cannot fill a target's offer slots."""

    def test_four_registrations_cannot_fill_a_target(self) -> None:
        h = Harness(offer_timeout=30.0, choose_order=udp_first, rate=0)
        bob = h.peer("bob", source="198.51.100.2")
        flooders = [h.peer(f"m{i}", source="203.0.113.66") for i in range(4)]
        refused = 0
        for f in flooders:
            for i in range(16):
                out = h.send(f, Connect(1000 + i, "bob", DESC_A))
                refused += sum(1 for m in out if isinstance(m, Error) and m.error == "rate-limited")
        self.assertGreater(refused, 0)
        bob[0].take()
        carol = h.peer("carol", source="192.0.2.33")
        out = h.send(carol, Connect(5, "bob", DESC_A))
        self.assertEqual(out, [])  # no 429: the offer is on its way
        [offer] = [m for m in bob[0].take() if isinstance(m, Offer)]
        self.assertEqual(offer.peer, "carol")
        self.assertGreater(h.state.status()["counters"]["offers:refused-fair-share"], 0)

    def test_per_pair_share(self) -> None:
        h = Harness(offer_timeout=30.0, choose_order=udp_first, rate=0, max_offers_per_pair=4)
        h.peer("bob", source="198.51.100.2")
        a = h.peer("alice", source="192.0.2.1")
        outs = [h.send(a, Connect(i, "bob", DESC_A)) for i in range(5)]
        self.assertEqual(outs[:4], [[]] * 4)
        [err] = outs[4]
        self.assertEqual((err.code, err.error), (429, "rate-limited"))
        self.assertIn("bob", err.reason)


class LogEscapingTests(SynchronousTestCase):
    """Finding 9: control characters from peers do not reach the logs raw."""

    def test_report_detail_escaped(self) -> None:
        h = Harness(choose_order=udp_first)
        a, b = h.peer("alice"), h.peer("bob")
        h.send(a, Connect(3, "bob", DESC_A))
        [offer] = [m for m in b[0].take() if isinstance(m, Offer)]
        [session] = [m for m in h.send(b, Accept(4, offer.offer, DESC_A))]
        obs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h.send(a, Report(5, session.session.id, "failed", None, "ok\r\nFAKE: peer x registered\x1b[31m"))
        text = "\n".join(formatEvent(e) for e in obs)
        self.assertIn("reports failed", text)
        self.assertNotIn("\r", text)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\nFAKE", text)
        self.assertIn("\\r\\nFAKE", text)

    def test_reject_reason_not_logged_raw(self) -> None:
        h = Harness(choose_order=udp_first)
        a, b = h.peer("alice"), h.peer("bob")
        h.send(a, Connect(3, "bob", DESC_A))
        [offer] = [m for m in b[0].take() if isinstance(m, Offer)]
        obs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h.send(b, Reject(4, offer.offer, "busy\x1b]0;owned\x07"))
        text = "\n".join(formatEvent(e) for e in obs)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\x07", text)


class ShutdownTests(SynchronousTestCase):
    """Graceful shutdown: stop accepting, tell peers, close, and finish in bounded time."""

    def start(self, **kw):
        reactor = MemoryReactorClock()
        svc = makeSignalingService("tcp:7000", reactor, status_interval=0, shutdown_grace=5.0, **kw)
        svc.startService()
        factory = reactor.tcpServers[0][1]
        return reactor, svc, factory

    def test_lingering_connections_aborted_after_grace(self) -> None:
        reactor, svc, factory = self.start()
        proto, tr = connect(factory)
        d = svc.stopService()
        self.assertIn(b'"error":"shutting-down"', tr.value())
        self.assertTrue(tr.disconnecting)
        self.assertNoResult(d)  # the client has not gone yet (its transport never finishes closing)
        reactor.advance(5.0)
        self.assertTrue(tr.disconnected)  # aborted
        proto.connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(svc.state.status()["counters"]["closed:shutdown-aborted"], 1)

    def test_stop_finishes_when_connections_close(self) -> None:
        reactor, svc, factory = self.start()
        proto, tr = connect(factory)
        d = svc.stopService()
        self.assertNoResult(d)
        proto.connectionLost(None)
        self.successResultOf(d)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_connections_during_shutdown_refused(self) -> None:
        reactor, svc, factory = self.start()
        svc.stopService()
        proto, tr = connect(factory)
        [err] = replies(tr)
        self.assertEqual(err["error"], "shutting-down")
        self.assertTrue(tr.disconnecting)

    def test_shutting_down_message_says_when_to_retry(self) -> None:
        reactor, svc, factory = self.start()
        proto, tr = connect(factory)
        replies(tr)
        svc.stopService()
        [err] = replies(tr)
        self.assertEqual((err["rid"], err["code"], err["error"]), (None, 503, "shutting-down"))
        self.assertIn("reconnect", err["reason"])


class StatusTests(SynchronousTestCase):
    def test_counters_for_metrics(self) -> None:
        h = Harness(max_per_source=1)
        h.open()
        h.open()
        status = h.state.status()
        for k in ("connections", "connections_total", "paused_connections", "max_connections", "counters"):
            self.assertIn(k, status)
        self.assertEqual(status["connections_total"], 2)
        self.assertEqual(status["counters"]["refused:per-source"], 1)
        json.dumps(status)  # plain data

"""
The STUN responder under abuse and load (issue "Hardening under abuse and
load", findings 3, 6 and 8): per-source caps and the idle timeout of STUN
over TCP, the default rate limit, the amplification factor, and a rate
limiter that spoofed sources cannot fill.

Names new with the fix are reached through the module (C{s.X}), so that on
the code before it each regression test fails on its own assertion.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from natbypass.app import mediator_tap as tap
from natbypass.ratelimit import packed_source_key
from natbypass.stun import message as m
from natbypass.stun import server as s

A, B = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
PA, PB = 3478, 3479
CLIENT = ("198.51.100.7", 40000)
CLIENT6 = ("2001:db8:1::7", 40000)


def bare(fingerprint: bool = False) -> bytes:
    return m.Message(m.Method.BINDING, m.MessageClass.REQUEST, os.urandom(12)).encode(fingerprint=fingerprint)


def spoofed(n: int) -> list[str]:
    """C{n} distinct IPv4 source addresses."""
    return [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(n)]


# ---------------------------------------------------------------- finding 8


class SpoofedFloodTests(SynchronousTestCase):
    """The rate limiter cannot be filled by spoofed sources (finding 8)."""

    def test_65536_spoofed_sources_do_not_lock_out_a_new_one(self) -> None:
        """A second's flood from 65,536 spoofed sources: a new genuine source is still answered."""
        clock = Clock()
        limiter = s.RateLimiter(20, clock)
        for host in spoofed(65536):
            limiter.allow(host)
        self.assertTrue(limiter.allow("203.0.113.9"))
        self.assertTrue(limiter.allow("2001:db8:99::1"))

    def test_flood_through_the_responder(self) -> None:
        """The same flood against the service with its defaults: the genuine request is answered."""
        from natbypass.testing.udp import MemoryUDPReactor

        fake = MemoryUDPReactor()
        # The per-source table is what is tested: no global limit (it is tested apart, GlobalLimitTests).
        service = s.STUNService(fake, (A, PA), (B, PB), stats_interval=0, global_rate=0)
        service.startService()
        self.addCleanup(service.stopService)
        proto = service.server.sockets[(A, PA)]
        request = bare()
        for i, host in enumerate(spoofed(65536)):
            proto.datagramReceived(request, (host, 5000))
            if i % 1000 == 0:
                fake.advance(0)  # deliver (to nowhere) what the fake reactor queued
        before = len(fake.udp[(A, PA)].written)
        proto.datagramReceived(bare(), CLIENT)
        self.assertEqual(len(fake.udp[(A, PA)].written), before + 1)
        self.assertEqual(fake.udp[(A, PA)].written[-1][1], CLIENT)

    def test_memory_bounded(self) -> None:
        """Its memory does not grow with the number of sources."""
        clock = Clock()
        limiter = s.RateLimiter(20, clock)
        hosts = spoofed(65536)
        limiter.allow("203.0.113.9")
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        start, _ = tracemalloc.get_traced_memory()
        for host in hosts:
            limiter.allow(host)
        clock.advance(0.5)
        for host in hosts:
            limiter.allow(host)
        grown = tracemalloc.get_traced_memory()[0] - start
        self.assertLess(grown, 64 * 1024)

    def test_flood_does_not_reset_a_victims_budget(self) -> None:
        """Unlike an evicting table, a flood of new sources gives the victim no fresh budget."""
        clock = Clock()
        limiter = s.RateLimiter(10, clock, 10)
        victim = "203.0.113.9"
        self.assertEqual(sum(limiter.allow(victim) for _ in range(50)), 10)
        for host in spoofed(200_000):
            limiter.allow(host)
        self.assertFalse(limiter.allow(victim))

    def test_shared_bucket_only_by_chance(self) -> None:
        """The bucket depends on the secret salt: another salt, other collisions."""
        hosts = spoofed(64)
        first = [s.RateLimiter(1, Clock(), salt=b"one").bucket(h) for h in hosts]
        second = [s.RateLimiter(1, Clock(), salt=b"two").bucket(h) for h in hosts]
        self.assertNotEqual(first, second)
        self.assertEqual(first, [s.RateLimiter(1, Clock(), salt=b"one").bucket(h) for h in hosts])

    def test_ipv6_grouped_by_64(self) -> None:
        """Addresses of one /64 share a budget; the next /64 has its own."""
        clock = Clock()
        limiter = s.RateLimiter(5, clock, 5, salt=b"fixed")
        prefix = "2001:db8:1:2:"
        allowed = sum(limiter.allow(f"{prefix}:{i:x}") for i in range(1, 100))
        self.assertEqual(allowed, 5)
        if limiter.bucket("2001:db8:1:3::1") != limiter.bucket(prefix + ":1"):
            self.assertTrue(limiter.allow("2001:db8:1:3::1"))


class SourceKeyTests(SynchronousTestCase):
    @given(st.ip_addresses(v=6), st.integers(0, 2**64 - 1))
    def test_ipv6_by_64(self, address, host_bits) -> None:
        other = ipaddress.IPv6Address((int(address) >> 64 << 64) | host_bits)
        if address.ipv4_mapped is None:
            self.assertEqual(s.source_key(str(address)), s.source_key(str(other)))

    @given(st.ip_addresses(v=4))
    def test_ipv4_and_mapped(self, address) -> None:
        self.assertEqual(s.source_key(str(address)), str(address))
        self.assertEqual(s.source_key(f"::ffff:{address}"), str(address))

    @given(st.text(max_size=50))
    def test_any_text(self, text) -> None:
        self.assertIsInstance(s.source_key(text), str)

    def test_scoped(self) -> None:
        self.assertEqual(s.source_key("fe80::1%eth0"), s.source_key("fe80::2"))


class PackedSourceKeyTests(SynchronousTestCase):
    """The bytes the limiter hashes (natbypass.ratelimit.packed_source_key), and its entry for read loops."""

    @given(st.ip_addresses(v=4))
    def test_ipv4_and_mapped(self, address) -> None:
        self.assertEqual(packed_source_key(str(address)), address.packed)
        self.assertEqual(packed_source_key(f"::ffff:{address}"), address.packed)

    @given(st.ip_addresses(v=6), st.integers(0, 2**64 - 1))
    def test_ipv6_by_64(self, address, host_bits) -> None:
        if address.ipv4_mapped is None:
            other = ipaddress.IPv6Address((int(address) >> 64 << 64) | host_bits)
            self.assertEqual(packed_source_key(str(address)), address.packed[:8])
            self.assertEqual(packed_source_key(str(other)), address.packed[:8])

    @given(st.text(max_size=50))
    def test_text_never_looks_like_an_address(self, text) -> None:
        """A source that is no IP address gets a key of neither an IPv4 nor an IPv6 key's length."""
        key = packed_source_key(text)
        try:
            ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            self.assertGreater(len(key), 8)

    def test_allow_key_shares_the_bucket_of_allow(self) -> None:
        """A read loop's packed IPv4 source and the host text count against one budget, at the time given."""
        clock = Clock()
        limiter = s.RateLimiter(1, clock, 5)
        host = "198.51.100.7"
        self.assertEqual(sum(limiter.allow(host) for _ in range(3)), 3)
        self.assertEqual(sum(limiter.allow_key(socket.inet_aton(host), clock.seconds()) for _ in range(5)), 2)
        self.assertTrue(limiter.allow_key(socket.inet_aton(host), clock.seconds() + 1.0))  # refilled by then

    def test_token_bucket_at_the_time_given(self) -> None:
        clock = Clock()
        bucket = s.TokenBucket(clock, 1.0, 2.0)
        self.assertTrue(bucket.take(2.0))
        self.assertFalse(bucket.take(1.0, now=0.5))
        self.assertTrue(bucket.take(1.0, now=1.5))


class TokenBucketTests(SynchronousTestCase):
    @given(
        st.floats(0.5, 100),
        st.integers(1, 50),
        st.lists(st.sampled_from([0, 0, 0, 0.001, 0.05, 0.3, 1.0]), max_size=200),
    )
    def test_never_more_than_burst_plus_rate(self, rate, burst, advances) -> None:
        """From one source, any span of T seconds has at most burst + rate x T answers."""
        clock = Clock()
        limiter = s.RateLimiter(rate, clock, burst)
        times = []
        for advance in advances:
            clock.advance(advance)
            if limiter.allow("198.51.100.7"):
                times.append(clock.seconds())
        for i in range(len(times)):
            for j in range(i, len(times)):
                self.assertLessEqual(j - i + 1, burst + rate * (times[j] - times[i]) + 1e-6)

    @given(st.floats(1, 100), st.integers(1, 50), st.integers(1, 100))
    def test_a_polite_source_always_passes(self, rate, burst, count) -> None:
        clock = Clock()
        limiter = s.RateLimiter(rate, clock, burst)
        for _ in range(count):
            self.assertTrue(limiter.allow("198.51.100.7"))
            clock.advance(1.0001 / rate)  # a hair over 1 / rate: float sums round

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, s.RateLimiter, 0, Clock())
        self.assertRaises(ValueError, s.RateLimiter, 1, Clock(), 0.5)
        self.assertRaises(ValueError, s.RateLimiter, 1, Clock(), buckets=3)


# ---------------------------------------------------------------- finding 6


class DefaultRateLimitTests(SynchronousTestCase):
    """A finite per-source rate limit by default (finding 6)."""

    def test_mediator_limits_by_default(self) -> None:
        stun = tap.makeService(_parse(), MemoryReactorClock())
        limiter = stun.getServiceNamed("stun").server.limiter
        self.assertIsNotNone(limiter)
        self.assertGreaterEqual(limiter.rate, 10)  # a NAT with many users behind one IP passes
        self.assertLessEqual(limiter.rate, 100)

    def test_spoofed_victim_gets_at_most_the_burst(self) -> None:
        """1,000 requests spoofed from one victim in an instant: at most the burst is reflected."""
        from natbypass.testing.udp import MemoryUDPReactor

        fake = MemoryUDPReactor()
        service = s.STUNService(fake, (A, PA), (B, PB), stats_interval=0)
        service.startService()
        self.addCleanup(service.stopService)
        proto = service.server.sockets[(A, PA)]
        for _ in range(1000):
            proto.datagramReceived(bare(), CLIENT)
        self.assertLessEqual(len(fake.udp[(A, PA)].written), 200)
        self.assertGreaterEqual(service.counters.rate_limited, 800)

    def test_zero_still_turns_it_off(self) -> None:
        options = _parse("--stun-rate", "0")
        self.assertIsNone(tap.makeService(options, MemoryReactorClock()).getServiceNamed("stun").server.limiter)


def _parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


#: Every responder shape: (primary, alternate, source).
SHAPES = {
    "IPv4 RFC 5780": ((A, PA), (B, PB), CLIENT),
    "IPv4 plain": ((A, PA), None, CLIENT),
    "IPv6 RFC 5780": ((A6, PA), (B6, PB), CLIENT6),
    "IPv6 plain": ((A6, PA), None, CLIENT6),
}


def amplification(primary, alternate, source, software: str, request: bytes) -> float:
    config = s.ResponderConfig(primary, alternate, software)
    reply = s.BindingResponder(config).respond_datagram(request, source, config.primary)
    return len(reply.data) / len(request)


class AmplificationTests(SynchronousTestCase):
    """Response bytes / request bytes for the smallest requests (finding 6)."""

    def test_measured_with_default_software(self) -> None:
        measured = {name: amplification(*shape, s.DEFAULT_SOFTWARE, bare()) for name, shape in SHAPES.items()}
        self.assertEqual(measured, {"IPv4 RFC 5780": 4.8, "IPv4 plain": 3.0, "IPv6 RFC 5780": 7.2, "IPv6 plain": 3.6})

    def test_bounded_with_any_accepted_software(self) -> None:
        """Whatever --software accepts, a bare Binding buys at most 9.6x (RFC 5780 over IPv6)."""
        for name, shape in SHAPES.items():
            for text in ("", s.DEFAULT_SOFTWARE, "x" * s.MAX_SOFTWARE_BYTES, "\u00e9" * (s.MAX_SOFTWARE_BYTES // 2)):
                for request in (bare(), bare(fingerprint=True)):
                    self.assertLessEqual(amplification(*shape, text, request), 9.6, (name, len(text)))

    def test_long_software_refused(self) -> None:
        self.assertRaises(ValueError, s.ResponderConfig, (A, PA), None, "x" * (s.MAX_SOFTWARE_BYTES + 1))
        with self.assertRaises(usage.UsageError) as caught:
            _parse("--software", "x" * 65)
        self.assertIn("--software: at most 64 bytes", str(caught.exception))
        with self.assertRaises(usage.UsageError):
            _parse("--software", "\u00e9" * 33)  # 66 bytes of UTF-8
        self.assertEqual(_parse("--software", "x" * 64)["software"], "x" * 64)

    def test_discovery_attributes_kept(self) -> None:
        """RFC 5780 sections 4.2, 4.6 and 6: a bare Binding's response says what discovery needs."""
        config = s.ResponderConfig((A, PA), (B, PB), "")
        response = m.decode(s.BindingResponder(config).respond_datagram(bare(), CLIENT, (A, PA)).data)
        for kind in (m.XorMappedAddress, m.MappedAddress, m.ResponseOrigin, m.OtherAddress):
            self.assertIsNotNone(response.get(kind), kind)


# ---------------------------------------------------------------- finding 3


def connect(factory, host: str = CLIENT[0], port: int = CLIENT[1], transport_class=StringTransport):
    """One TCP connection from host:port through the factory; the protocol or None."""
    address = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
    proto = factory.buildProtocol(address)
    if proto is None:
        return None
    local = (IPv6Address if ":" in host else IPv4Address)("TCP", A6 if ":" in host else A, PA)
    transport = transport_class(hostAddress=local, peerAddress=address)
    transport.closed_by = proto
    proto.makeConnection(transport)
    return proto


class _Unflushed(StringTransport):
    """A transport whose peer does not read: loseConnection waits for ever; abortConnection closes."""

    def loseConnection(self) -> None:
        self.disconnecting = True  # and nothing more, while responses wait unsent

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.closed_by.connectionLost(None)


class ConnectionSlotTests(SynchronousTestCase):
    """Per-source caps and the idle timeout of STUN over TCP (finding 3)."""

    def factory(self, **kw):
        self.clock = Clock()
        self.server = s.STUNServer(s.BindingResponder(s.ResponderConfig((A, PA), (B, PB), "")))
        # The idle timeout alone (the shorter deadline for the first request: SlotHoldingTests).
        kw.setdefault("first_timeout", 10)
        return s.STUNStreamFactory(self.server, self.clock, idle_timeout=10, **kw)

    def test_one_source_cannot_take_every_slot(self) -> None:
        factory = self.factory()
        accepted = [p for p in (connect(factory, port=1000 + i) for i in range(1000)) if p is not None]
        self.assertLessEqual(len(accepted), 64)
        self.assertIsNotNone(connect(factory, "203.0.113.9"))
        self.assertGreaterEqual(self.server.counters.tcp_refused, 1000 - 64)

    def test_ipv6_grouped_by_64(self) -> None:
        factory = self.factory(per_source=4)
        accepted = [connect(factory, f"2001:db8:5:6::{i:x}") for i in range(1, 10)]
        self.assertEqual(sum(p is not None for p in accepted), 4)
        self.assertIsNotNone(connect(factory, "2001:db8:5:7::1"))

    def test_closing_frees_the_source_slot(self) -> None:
        factory = self.factory(per_source=2)
        first, second = connect(factory), connect(factory)
        self.assertIsNone(connect(factory))
        first.connectionLost(None)
        self.assertIsNotNone(connect(factory))
        self.assertEqual(self.server.counters.tcp_connections, 2)
        second.connectionLost(None)
        self.assertEqual(self.server.counters.tcp_connections, 1)

    def test_idle_connection_with_unsent_responses_is_closed(self) -> None:
        """A client that never reads loses its slot at the idle timeout (graceful close would wait)."""
        factory = self.factory()
        proto = connect(factory, transport_class=_Unflushed)
        proto.dataReceived(bare())
        self.clock.advance(11)
        self.assertEqual(len(factory.connections), 0)

    def test_junk_does_not_keep_a_slot(self) -> None:
        """Only answered requests are activity: a well-framed indication every 9 s does not count."""
        factory = self.factory()
        proto = connect(factory, transport_class=_Unflushed)
        indication = m.Message(m.Method.BINDING, m.MessageClass.INDICATION, os.urandom(12)).encode()
        for _ in range(5):
            self.clock.advance(9)
            proto.dataReceived(indication)
        self.assertEqual(len(factory.connections), 0)
        self.assertEqual(self.server.counters.tcp_idle_closed, 1)

    def test_answered_requests_keep_it_open(self) -> None:
        factory = self.factory()
        proto = connect(factory, transport_class=_Unflushed)
        for _ in range(5):
            self.clock.advance(9)
            proto.dataReceived(bare())
        self.assertEqual(len(factory.connections), 1)

    def test_stops_reading_while_responses_wait(self) -> None:
        factory = self.factory()
        proto = connect(factory)
        self.assertTrue(verifyObject(IPushProducer, proto))
        self.assertIs(proto.transport.producer, proto)
        proto.pauseProducing()
        self.assertEqual(proto.transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(proto.transport.producerState, "producing")

    def test_global_cap_below_descriptor_limit(self) -> None:
        self.assertEqual(s.tcp_connection_limit(1024), 480)
        self.assertEqual(s.tcp_connection_limit(1 << 20), s.MAX_TCP_CONNECTIONS)
        self.assertEqual(s.tcp_connection_limit(-1), s.MAX_TCP_CONNECTIONS)
        self.assertEqual(s.tcp_connection_limit(10), 1)
        for limit in (100, 256, 1024, 4096):
            self.assertLess(s.tcp_connection_limit(limit) + s.FD_RESERVE, limit)
        service = s.STUNService(MemoryReactorClock(), (A, PA), stats_interval=0)
        self.assertEqual(service.tcp_max, s.tcp_connection_limit(s.descriptor_limit()))

    def test_counters_for_metrics(self) -> None:
        factory = self.factory(max_connections=1)
        proto = connect(factory)
        self.assertIsNone(connect(factory, "203.0.113.9"))
        proto.dataReceived(bare() + b"\x00\x01\x00\x04" + bytes(16) + b"\xff" * 4)
        snapshot = self.server.counters.snapshot()
        self.assertEqual(
            {k: snapshot[k] for k in ("received", "answered", "malformed", "tcp_refused", "tcp_connections")},
            {"received": 2, "answered": 1, "malformed": 1, "tcp_refused": 1, "tcp_connections": 1},
        )
        self.assertTrue(all(type(v) is int for v in snapshot.values()))


class SlotHoldingTests(SynchronousTestCase):
    """
    Campaign finding 3 (docs/reliability.md, phase C{stuntcp}): about 63
    addresses holding 16 silent connections each filled the global cap and
    every other client's STUN/TCP was refused.
    """

    def factory(self, **kw):
        self.clock = Clock()
        self.server = s.STUNServer(s.BindingResponder(s.ResponderConfig((A, PA), (B, PB), "")))
        return s.STUNStreamFactory(self.server, self.clock, **kw)

    def test_63_sources_cannot_lock_out_a_newcomer(self) -> None:
        factory = self.factory(max_connections=1000)
        for host in spoofed(63):
            for port in range(20):
                connect(factory, host, 1000 + port)
        proto = connect(factory, "203.0.113.9")
        self.assertIsNotNone(proto)
        proto.dataReceived(bare())
        self.assertEqual(self.server.counters.answered, 1)

    def test_campaign_attack_cannot_lock_out_a_newcomer(self) -> None:
        """200 addresses x 20 silent slots against the default caps, reconnecting as they are cut."""
        factory = self.factory(max_connections=1000)
        hosts = spoofed(200)
        for _ in range(3):
            for host in hosts:
                for port in range(20):
                    connect(factory, host, 1000 + port)
            self.clock.advance(1)
        self.assertEqual(len(factory.connections), 1000)
        for k in range(20):
            proto = connect(factory, "203.0.113.9", 2000 + k)
            self.assertIsNotNone(proto, k)
            proto.dataReceived(bare())
            proto.connectionLost(None)
        self.assertEqual(self.server.counters.answered, 20)

    def test_default_per_source_cap_is_lower(self) -> None:
        self.assertLessEqual(s.DEFAULT_TCP_PER_SOURCE, 8)
        self.assertGreaterEqual(s.DEFAULT_TCP_PER_SOURCE, 2)

    def test_eviction_takes_the_oldest_of_the_biggest_source(self) -> None:
        factory = self.factory(max_connections=6, per_source=8)
        big = [connect(factory, "198.51.100.1", 1000 + i) for i in range(4)]
        small = [connect(factory, "198.51.100.2", 1000 + i) for i in range(2)]
        newcomer = connect(factory, "203.0.113.9")
        self.assertIsNotNone(newcomer)
        self.assertNotIn(big[0], factory.connections)
        self.assertTrue(big[0].transport.disconnecting)
        self.assertTrue(all(p in factory.connections for p in big[1:] + small))
        self.assertEqual(self.server.counters.tcp_evicted, 1)
        self.assertEqual(self.server.counters.tcp_connections, 6)
        big[0].connectionLost(None)  # the transport's report of the abort: counted once
        self.assertEqual(self.server.counters.tcp_connections, 6)
        self.assertEqual(factory.open_from("198.51.100.1"), 3)

    def test_no_eviction_for_a_source_as_big(self) -> None:
        """A source that would then hold as many as the biggest one is refused: filling the table buys nothing."""
        factory = self.factory(max_connections=4, per_source=8)
        for i in range(2):
            connect(factory, "198.51.100.1", 1000 + i)
            connect(factory, "198.51.100.2", 1000 + i)
        self.assertIsNone(connect(factory, "198.51.100.1", 2000))
        self.assertIsNotNone(connect(factory, "203.0.113.9"))  # 0 + 1 < 2: evicts
        self.assertIsNone(connect(factory, "203.0.113.9", 2001))  # 1 + 1 = 2: refused
        self.assertEqual(self.server.counters.tcp_refused, 2)

    def test_silent_connection_cut_after_the_first_request_deadline(self) -> None:
        factory = self.factory(idle_timeout=30)
        connect(factory, transport_class=_Unflushed)
        self.clock.advance(s.FIRST_REQUEST_TIMEOUT + 0.01)
        self.assertEqual(len(factory.connections), 0)
        self.assertEqual(self.server.counters.tcp_silent_closed, 1)
        self.assertLessEqual(s.FIRST_REQUEST_TIMEOUT, 3)

    def test_answered_connection_gets_the_idle_timeout(self) -> None:
        factory = self.factory(idle_timeout=30)
        proto = connect(factory, transport_class=_Unflushed)
        self.clock.advance(1)
        proto.dataReceived(bare())
        self.clock.advance(20)
        self.assertEqual(len(factory.connections), 1)
        self.clock.advance(11)
        self.assertEqual(len(factory.connections), 0)
        self.assertEqual(self.server.counters.tcp_idle_closed, 1)

    def test_junk_first_does_not_buy_time(self) -> None:
        factory = self.factory(idle_timeout=30)
        proto = connect(factory, transport_class=_Unflushed)
        proto.dataReceived(m.Message(m.Method.BINDING, m.MessageClass.INDICATION, os.urandom(12)).encode())
        self.clock.advance(s.FIRST_REQUEST_TIMEOUT + 0.01)
        self.assertEqual(len(factory.connections), 0)

    @given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), max_size=200))
    def test_bookkeeping_matches_the_open_connections(self, steps) -> None:
        """Whatever opens and closes: per-source counts and the gauge match the connections that are open."""
        factory = self.factory(max_connections=5, per_source=3)
        live: list = []
        for host_index, close in steps:
            if close and live:
                live.pop(host_index % len(live)).connectionLost(None)
                continue
            proto = connect(factory, f"198.51.100.{host_index}", 1000 + len(live))
            if proto is not None:
                live.append(proto)
            live = [p for p in live if p in factory.connections]
            self.assertLessEqual(len(factory.connections), 5)
            self.assertEqual(self.server.counters.tcp_connections, len(factory.connections))
            for i in range(6):
                host = f"198.51.100.{i}"
                self.assertEqual(factory.open_from(host), sum(p.peer[0] == host for p in factory.connections))
                self.assertLessEqual(factory.open_from(host), 3)


class GlobalLimitTests(SynchronousTestCase):
    """
    Campaign phase C{stunflood}: 4,000 sources, each under its own limit,
    took the reactor signalling shares (offer p99 63x idle).
    """

    def service(self, **kw):
        from natbypass.testing.udp import MemoryUDPReactor

        self.fake = MemoryUDPReactor()
        service = s.STUNService(self.fake, (A, PA), (B, PB), stats_interval=0, **kw)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def test_flood_from_many_sources_is_bounded(self) -> None:
        service = self.service(global_rate=1000)
        proto = service.server.sockets[(A, PA)]
        hosts = spoofed(4000)
        for _ in range(3):
            for host in hosts:
                proto.datagramReceived(bare(), (host, 5000))
            self.fake.advance(1)
        answered = len(self.fake.udp[(A, PA)].written)
        self.assertLessEqual(answered, 1000 + 3 * 1000)
        self.assertGreaterEqual(answered, 3000)
        counters = service.counters
        self.assertEqual(counters.rate_limited_global, 12000 - answered)
        self.assertEqual(counters.rate_limited, counters.rate_limited_global)

    def test_on_by_default(self) -> None:
        stun = tap.makeService(_parse(), MemoryReactorClock()).getServiceNamed("stun")
        glob = stun.server.global_limiter
        self.assertIsNotNone(glob)
        self.assertEqual(glob.rate, s.DEFAULT_GLOBAL_RATE)
        self.assertGreaterEqual(glob.rate, 1000)  # a thousand clients' detections a second and more
        off = tap.makeService(_parse("--stun-global-rate", "0"), MemoryReactorClock()).getServiceNamed("stun")
        self.assertIsNone(off.server.global_limiter)
        five = tap.makeService(_parse("--stun-global-rate", "500"), MemoryReactorClock()).getServiceNamed("stun")
        self.assertEqual(five.server.global_limiter.rate, 500)
        self.assertRaises(usage.UsageError, _parse, "--stun-global-rate", "-1")

    def test_tcp_counts_too(self) -> None:
        server = s.STUNServer(
            s.BindingResponder(s.ResponderConfig((A, PA), (B, PB), "")),
            global_limiter=s.TokenBucket(Clock(), 5, 5),
        )
        factory = s.STUNStreamFactory(server, Clock())
        proto = connect(factory)
        proto.dataReceived(bare() * 8)
        self.assertEqual(server.counters.answered, 5)
        self.assertEqual(server.counters.rate_limited_global, 3)

    def test_work_per_reactor_turn_bounded(self) -> None:
        """Twisted's UDP port reads up to maxThroughput bytes a turn (256 KiB: 13,000 Bindings)."""
        self.service()
        for port in self.fake.udp.values():
            self.assertEqual(port.maxThroughput, s.UDP_READ_BUDGET)
        self.assertLessEqual(s.UDP_READ_BUDGET, 16384)

    @settings(deadline=None)
    @given(st.floats(1, 1e5), st.floats(1, 1e5), st.lists(st.floats(0, 2), max_size=50))
    def test_bucket_never_more_than_burst_plus_rate(self, rate, burst, advances) -> None:
        clock = Clock()
        bucket = s.TokenBucket(clock, rate, burst)
        allowed = 0
        for dt in advances:
            clock.advance(dt)
            while bucket.take():
                allowed += 1
        self.assertLessEqual(allowed, bucket.burst + rate * clock.seconds() + 1e-6 * rate)


class TapTests(SynchronousTestCase):
    def test_tcp_options(self) -> None:
        options = _parse("--stun-tcp-per-source", "3", "--stun-tcp-max", "50", "--stun-burst", "9")
        stun = tap.makeService(options, MemoryReactorClock()).getServiceNamed("stun")
        self.assertEqual(stun.tcp_max, 50)
        self.assertEqual(stun.server.limiter.burst, 9)
        for argv in (("--stun-burst", "0"), ("--stun-tcp-per-source", "0"), ("--stun-tcp-max", "0")):
            self.assertRaises(usage.UsageError, _parse, *argv)


class IdleLoopbackTests(TestCase):
    """On real sockets: a client that sends requests and never reads loses its connection."""

    @inlineCallbacks
    def test_non_reading_client_is_cut_off(self):
        service = s.STUNService(reactor, ("127.0.0.1", 0), rate=0, idle_timeout=0.5, stats_interval=0)
        service.startService()
        self.addCleanup(service.stopService)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        try:
            client.connect(service.config.primary)
        except BlockingIOError:
            pass
        chunk = bare() * 1000
        sent = 0
        for _ in range(40):  # send for a while without ever reading
            yield deferLater(reactor, 0.01, lambda: None)
            try:
                while sent < 5_000_000:
                    sent += client.send(chunk)
            except (BlockingIOError, ConnectionError):
                pass
        self.assertGreater(sent, 200_000)  # far more responses than the buffers hold
        error = 0
        for _ in range(100):  # the idle cut is 0.5 s; allow for a loaded machine
            yield deferLater(reactor, 0.1, lambda: None)
            error = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                break
        self.assertIn(error, (errno.ECONNRESET, errno.EPIPE))

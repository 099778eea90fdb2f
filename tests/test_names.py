"""
A mediator cluster behind one DNS name (natbypass.names): in memory with a
fake C{IHostnameResolver} and C{MemoryReactorClock}, then on loopback with a
real C{twisted.names} DNS server on 127.0.0.1 naming two mediators
(127.0.0.1 and 127.0.0.2) and a peer's signalling client that moves to the
second when the first stops.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.names import client, common, dns, error, server
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass.identity import Identity
from natbypass.names import (
    MAX_ADDRESSES,
    NameFailoverEndpoint,
    NamesResolver,
    _Collector,
    resolve_address,
    resolve_all,
)
from natbypass.signaling.client import FailoverEndpoint, SignalingClient, client_endpoint
from natbypass.signaling.service import makeSignalingService
from natbypass.signaling.wire import Description


@implementer(IHostnameResolver)
class FakeResolver:
    """Names to address lists, answered at once; counts the lookups."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.lookups = 0

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.lookups += 1
        receiver.resolutionBegan(None)
        for a in self.names.get(hostName, []):
            receiver.addressResolved((IPv6Address if ":" in a else IPv4Address)("TCP", a, portNumber))
        receiver.resolutionComplete()


class HeldResolver(FakeResolver):
    """Answers only when told (to cancel a connect while it resolves)."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.pending = (receiver, hostName, portNumber)


class NameFailoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver({"mediator.example": ["192.0.2.1", "192.0.2.2", "2001:db8::3"]})
        self.ep = NameFailoverEndpoint(self.reactor, "mediator.example", 7000, timeout=5, resolver=self.resolver)
        self.factory = Factory.forProtocol(Protocol)

    def attempt(self) -> tuple[str, Any]:
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((port, timeout), (7000, 5))
        return host, factory

    def succeed_last(self) -> None:
        _, factory = self.attempt()
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())

    def refuse_last(self) -> None:
        _, factory = self.attempt()
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def test_interfaces(self) -> None:
        verifyObject(IStreamClientEndpoint, self.ep)
        verifyObject(IHostnameResolver, NamesResolver(client.Resolver(servers=[("127.0.0.1", 53)])))
        verifyObject(IResolutionReceiver, _Collector("x", defer.Deferred()))

    def walk(self, addresses: list[str]) -> None:
        """One connection: it tries C{addresses} in this order, each refused but the last, which answers."""
        d = self.ep.connect(self.factory)
        for i, address in enumerate(addresses):
            self.assertEqual(self.attempt()[0], address)
            if i < len(addresses) - 1:
                self.refuse_last()
        self.succeed_last()
        self.successResultOf(d)
        self.assertEqual(self.ep.last, addresses[-1])

    def test_in_order_then_after_the_last_used(self) -> None:
        """The first address first; a refused one moves on; the next connection starts after the one used."""
        self.walk(["192.0.2.1", "192.0.2.2"])
        # that mediator died: the reconnection starts at the third address (IPv6), then wraps around
        self.walk(["2001:db8::3", "192.0.2.1"])
        self.assertEqual(self.resolver.lookups, 2, "resolved at every connection")

    def test_all_refused(self) -> None:
        d = self.ep.connect(self.factory)
        for _ in range(3):
            self.refuse_last()
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(len(self.reactor.tcpClients), 3, "each address once")

    def test_record_set_changes(self) -> None:
        """The last address used left the record set: start from the first again."""
        d = self.ep.connect(self.factory)
        self.succeed_last()
        self.successResultOf(d)
        self.resolver.names["mediator.example"] = ["192.0.2.7", "192.0.2.8"]
        self.ep.connect(self.factory)
        self.assertEqual(self.attempt()[0], "192.0.2.7")

    def test_no_address(self) -> None:
        ep = NameFailoverEndpoint(self.reactor, "nowhere.example", 7000, resolver=self.resolver)
        self.failureResultOf(ep.connect(self.factory), DNSLookupError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_cancel_while_resolving(self) -> None:
        held = HeldResolver({"mediator.example": ["192.0.2.1"]})
        ep = NameFailoverEndpoint(self.reactor, "mediator.example", 7000, resolver=held)
        d = ep.connect(self.factory)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        receiver, name, port = held.pending
        receiver.addressResolved(IPv4Address("TCP", "192.0.2.1", port))
        receiver.resolutionComplete()  # the late answer is ignored
        self.assertEqual(self.reactor.tcpClients, [])

    def test_cancel_while_connecting(self) -> None:
        d = self.ep.connect(self.factory)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_addresses_bounded(self) -> None:
        """A DNS answer with hundreds of addresses: the first MAX_ADDRESSES, without repeats."""
        many = [f"192.0.2.{i % 200}" for i in range(400)]
        r = FakeResolver({"big.example": many})
        addresses = self.successResultOf(resolve_all(r, "big.example"))
        self.assertEqual(addresses, [f"192.0.2.{i}" for i in range(MAX_ADDRESSES)])

    def test_ip_literal_not_resolved(self) -> None:
        self.assertEqual(self.successResultOf(resolve_all(self.resolver, "2001:db8::1")), ["2001:db8::1"])
        self.assertEqual(self.resolver.lookups, 0)


class ResolveAddressTests(SynchronousTestCase):
    """A STUN server given by name (the default: port 3478 on the mediator's host) is resolved before use."""

    def test_prefers_ipv4(self) -> None:
        r = MemoryReactorClock()
        r.nameResolver = FakeResolver({"stun.example": ["2001:db8::1", "192.0.2.9"]})
        self.assertEqual(self.successResultOf(resolve_address(r, ("stun.example", 3478))), ("192.0.2.9", 3478))

    def test_literal_unchanged(self) -> None:
        self.assertEqual(self.successResultOf(resolve_address(object(), ("192.0.2.1", 3478))), ("192.0.2.1", 3478))

    def test_unknown_name(self) -> None:
        r = MemoryReactorClock()
        r.nameResolver = FakeResolver({})
        self.failureResultOf(resolve_address(r, ("nowhere.example", 3478)), DNSLookupError)


class MappingProbeNameTests(SynchronousTestCase):
    """The peer's mapping probe starts before its main ports resolved a named STUN server: it resolves it too."""

    def setUp(self) -> None:
        from natbypass.stun import discovery, probe

        self.reactor = MemoryReactorClock()
        self.reactor.nameResolver = FakeResolver({"stun.example": ["127.0.0.1"]})
        self.seen: list[tuple[str, int]] = []

        class Port:
            def getHost(self) -> IPv4Address:
                return IPv4Address("UDP", "127.0.0.1", 40000)

            def stopListening(self) -> None:
                pass

        def probe_mapping(client, server, local, clock, policy=None):
            self.seen.append(server)
            return succeed(discovery.MappingProbe(discovery.Mapping.ENDPOINT_INDEPENDENT, None))

        self.patch(probe, "bind_udp", lambda *a, **kw: Port())
        self.patch(discovery, "probe_mapping", probe_mapping)
        self.probe = probe

    def test_named_server_resolved(self) -> None:
        d = defer.ensureDeferred(
            self.probe.probe_from_fresh_socket(self.reactor, self.reactor, ("stun.example", 3478), None, "", 1.0)
        )
        self.assertIsNotNone(self.successResultOf(d))
        self.assertEqual(self.seen, [("127.0.0.1", 3478)])

    def test_unknown_name_no_probe(self) -> None:
        d = defer.ensureDeferred(
            self.probe.probe_from_fresh_socket(self.reactor, self.reactor, ("nowhere.example", 3478), None, "", 1.0)
        )
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.seen, [])


class ClientEndpointTests(SynchronousTestCase):
    def test_names_get_failover(self) -> None:
        r = MemoryReactorClock()
        for text in ("tcp:mediator.example:7000", "tcp:host=mediator.example:port=7000:timeout=3",
                     "tls:mediator.example:7443"):  # fmt: skip
            self.assertIsInstance(client_endpoint(r, text), NameFailoverEndpoint, text)
        ep = client_endpoint(r, "tcp:mediator.example:7000:timeout=3")
        self.assertEqual((ep.host, ep.port, ep.timeout), ("mediator.example", 7000, 3.0))

    def test_literals_and_lists_unchanged(self) -> None:
        r = MemoryReactorClock()
        for text in ("tcp:127.0.0.1:7000", "tcp:mediator.example:7000:bindAddress=127.0.0.1"):
            self.assertFalse(isinstance(client_endpoint(r, text), NameFailoverEndpoint), text)
        listed = client_endpoint(r, "tcp:a.example:7000,tcp:127.0.0.1:7001")
        self.assertIsInstance(listed, FailoverEndpoint)
        self.assertIsInstance(listed.endpoints[0], NameFailoverEndpoint)


class Zone(common.ResolverBase):
    """A DNS authority in memory: name -> A/AAAA payloads."""

    def __init__(self, records: dict[bytes, list[Any]]) -> None:
        super().__init__()
        self.records = records

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
        rrs = [
            dns.RRHeader(name, p.TYPE, dns.IN, 5, p, auth=True) for p in self.records.get(name, []) if p.TYPE == type
        ]
        if not rrs and name not in self.records:
            return defer.fail(error.DomainError(name))
        return succeed((rrs, [], []))


class NamesResolverTests(SynchronousTestCase):
    """L{NamesResolver} over an in-memory authority."""

    def test_a_and_aaaa(self) -> None:
        """AAAA records resolve too (a name with an IPv6 mediator), after the A ones."""
        zone = Zone({b"dual.test": [dns.Record_A("192.0.2.1"), dns.Record_AAAA("2001:db8::1")]})
        d = resolve_all(NamesResolver(zone), "dual.test")
        self.assertEqual(self.successResultOf(d), ["192.0.2.1", "2001:db8::1"])

    def test_aaaa_only(self) -> None:
        zone = Zone({b"v6.test": [dns.Record_AAAA("2001:db8::2")]})
        self.assertEqual(self.successResultOf(resolve_all(NamesResolver(zone), "v6.test")), ["2001:db8::2"])


class NameLoopbackTests(TestCase):
    """A real DNS server on 127.0.0.1 names two mediators; the peer follows the name's addresses."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        zone = Zone({b"mediator.test": [dns.Record_A("127.0.0.1"), dns.Record_A("127.0.0.2")]})
        dns_port = reactor.listenUDP(0, dns.DNSDatagramProtocol(server.DNSServerFactory(authorities=[zone])),
                                     interface="127.0.0.1")  # fmt: skip
        self.addCleanup(dns_port.stopListening)
        self.resolver = NamesResolver(client.Resolver(servers=[("127.0.0.1", dns_port.getHost().port)]))
        self.mediators = []
        first = makeSignalingService("tcp:0:interface=127.0.0.1", reactor, status_interval=0, shutdown_grace=0.2)
        first.startService()
        self.mediators.append(first)
        port = (yield first.whenListening()).getHost().port
        second = makeSignalingService(f"tcp:{port}:interface=127.0.0.2", reactor, status_interval=0)
        second.startService()
        self.mediators.append(second)
        yield second.whenListening()
        self.port = port
        self.clients: list[SignalingClient] = []

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        for c in self.clients:
            yield c.stopService()
        for m in self.mediators:
            if m.running:
                yield m.stopService()

    def test_names_resolver(self) -> Any:
        d = resolve_all(self.resolver, "mediator.test")
        return d.addCallback(self.assertEqual, ["127.0.0.1", "127.0.0.2"])

    def test_unknown_name(self) -> Any:
        return self.assertFailure(resolve_all(self.resolver, "nothing.test"), DNSLookupError)

    @defer.inlineCallbacks
    def test_peer_moves_to_the_next_address(self) -> Any:
        ep = NameFailoverEndpoint(reactor, "mediator.test", self.port, timeout=2, resolver=self.resolver)
        alice = SignalingClient(ep, "alice", clock=reactor, identity=Identity.generate(), ping_interval=2)
        alice.setOfferHandler(lambda offer: Description())
        alice.startService()
        self.clients.append(alice)
        yield alice.whenRegistered()
        first, second = self.mediators
        self.assertIn("alice", first.state.peers)
        self.assertEqual(ep.last, "127.0.0.1")
        yield first.stopService()  # the first address's mediator goes away
        for _ in range(100):
            if "alice" in second.state.peers:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertIn("alice", second.state.peers)
        self.assertEqual(ep.last, "127.0.0.2")

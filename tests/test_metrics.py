"""
natbypass.metrics in memory: the collectors read the live state at every
scrape, through the real twisted.web resource (an HTTP request parsed by
twisted.web's own channel over a StringTransport); /healthz follows the
listeners; the event-loop lag is measured on a Clock.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from natbypass import __version__, metrics
from natbypass.app import mediator_tap, peer_tap
from natbypass.app.echo import EchoHandler
from natbypass.identity import Identity
from natbypass.nat import NatSummary
from natbypass.peer import Peer, PeerStats
from natbypass.punch.race import AllAttemptsFailed
from natbypass.signaling.client import SignalingClient
from natbypass.signaling.server import Limits, SignalingState
from natbypass.signaling.wire import Candidate, Connect, Description, Greeting, Hello
from natbypass.stun.server import STUNService
from natbypass.testing.mediator import MemoryMediator
from natbypass.testing.signaling import FakeChannel, signed_register

STUN = MemoryMediator.stun_address
STUN_ALTERNATE = MemoryMediator.stun_alternate
NOWHERE = Description((Candidate("host", "127.0.0.9", 9),))


def get(resource: Any, path: bytes, clock: Any = None) -> tuple[int, dict[bytes, bytes], bytes]:
    """GET C{path} from C{resource} through twisted.web's HTTP channel; (status, headers, body)."""
    site = Site(resource, reactor=clock or Clock())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    channel.connectionLost(Failure(Exception("done")))
    return int(status_line.split()[1]), headers, body


def scrape(resource: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    status, headers, body = get(resource, b"/metrics")
    assert status == 200, (status, body)
    assert headers[b"content-type"].startswith(b"text/plain; version="), headers
    samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class _Running(Service):
    """A stand-in for a service whose listener is up (or not): C{whenListening} as SignalingService has it."""

    def __init__(self, listening: Deferred[Any] | None = None) -> None:
        self.listening = listening if listening is not None else succeed(object())
        self.asked = 0

    def whenListening(self) -> Deferred[Any]:
        self.asked += 1
        return self.listening


class _Status:
    """A signalling state as the collector reads it: only C{status()}."""

    def __init__(self, status: dict[str, Any]) -> None:
        self._status = status

    def status(self) -> dict[str, Any]:
        return self._status


class MediatorMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.state = SignalingState(self.clock, Limits())
        self.stun = STUNService(MemoryReactorClock(), ("127.0.0.1", 0), stats_interval=0)
        self.signal = _Running()
        self.signal.state = self.state
        self.service = metrics.mediator_metrics(
            "tcp:0:interface=127.0.0.1", MemoryReactorClock(), self.stun, self.signal
        )
        self.resource = self.service.resource

    def register(self, name: str, source: str = "192.0.2.1") -> tuple[FakeChannel, Any]:
        channel = FakeChannel()
        link = self.state.open(channel, source)
        greeting = next(m for m in channel.take() if isinstance(m, Greeting))
        self.state.received(link, Hello(1, 2))
        self.state.received(link, signed_register(greeting, Identity.generate(), 2, name))
        return channel, link

    def test_names_and_values_move_with_the_state(self) -> None:
        before = scrape(self.resource)
        self.assertEqual(value(before, "natbypass_mediator_peers"), 0)
        self.assertEqual(value(before, "natbypass_mediator_connections_total"), 0)
        self.assertEqual(value(before, "natbypass_stun_requests_total"), 0)
        self.assertEqual(value(before, "natbypass_mediator_offer_outcomes_total", outcome="session"), 0)
        self.assertIn(("natbypass_build_info", (("service", "mediator"), ("version", __version__))), before)

        _, alice = self.register("alice")
        self.register("bob", "192.0.2.2")
        self.state.received(alice, Connect(3, "carol", Description()))
        self.stun.counters.received += 5
        self.stun.counters.answered += 4
        self.stun.counters.rate_limited += 1
        after = scrape(self.resource)
        self.assertEqual(value(after, "natbypass_mediator_peers"), 2)
        self.assertEqual(value(after, "natbypass_mediator_open_connections"), 2)
        self.assertEqual(value(after, "natbypass_mediator_connections_total"), 2)
        self.assertEqual(value(after, "natbypass_mediator_registrations_total"), 2)
        self.assertEqual(value(after, "natbypass_mediator_refusals_total", reason="unknown-peer"), 1)
        self.assertEqual(value(after, "natbypass_mediator_offer_outcomes_total", outcome="unknown-peer"), 1)
        self.assertEqual(value(after, "natbypass_stun_requests_total"), 5)
        self.assertEqual(value(after, "natbypass_stun_answers_total"), 4)
        self.assertEqual(value(after, "natbypass_stun_rate_limited_total"), 1)
        self.assertEqual(value(after, "natbypass_stun_malformed_total"), 0)

        self.state.closed(alice)
        closed = scrape(self.resource)
        self.assertEqual(value(closed, "natbypass_mediator_peers"), 1)
        self.assertEqual(value(closed, "natbypass_mediator_open_connections"), 1)
        self.assertEqual(value(closed, "natbypass_mediator_connections_total"), 2)

    def test_counter_names(self) -> None:
        """Reports, NAT pairs (once the state counts them) and unknown counters all have a place."""
        counters = {
            "outcome:connected/udp": 3,
            "outcome:failed": 1,
            "outcome-by-nat:full-cone,symmetric-random:connected/tcp": 2,
            "sessions-by-nat:full-cone,symmetric-random": 4,
            "offers:timeout": 6,
            "ids:rebound": 7,
        }
        state = _Status({"counters": counters})
        families = {f.name: f for f in metrics.MediatorCollector(state, None).collect()}

        def samples(name: str) -> dict:
            return {tuple(sorted(s.labels.items())): s.value for s in families[name].samples}

        self.assertEqual(
            samples("natbypass_mediator_traversal_reports"),
            {(("outcome", "connected"), ("protocol", "udp")): 3, (("outcome", "failed"), ("protocol", "none")): 1},
        )
        self.assertEqual(
            samples("natbypass_mediator_traversal_reports_by_nat"),
            {
                (
                    ("nat_initiator", "full-cone"),
                    ("nat_target", "symmetric-random"),
                    ("outcome", "connected"),
                    ("protocol", "tcp"),
                ): 2
            },
        )
        self.assertEqual(
            samples("natbypass_mediator_sessions_by_nat"),
            {(("nat_initiator", "full-cone"), ("nat_target", "symmetric-random")): 4},
        )
        self.assertEqual(samples("natbypass_mediator_offer_outcomes")[(("outcome", "timeout"),)], 6)
        self.assertEqual(samples("natbypass_mediator_events"), {(("event", "ids:rebound"),): 7})

    def test_healthz(self) -> None:
        status, _, body = get(self.resource, b"/healthz")
        self.assertEqual((status, body), (503, b"unavailable: the STUN responder is not listening; "
                                               b"the signalling listener is not up\n"))  # fmt: skip
        self.stun.running = True
        self.signal.startService()
        status, headers, body = get(self.resource, b"/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))
        self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
        get(self.resource, b"/healthz")
        self.assertEqual(self.signal.asked, 1)  # watched once per run
        self.signal.stopService()
        self.assertEqual(get(self.resource, b"/healthz")[0], 503)

    def test_healthz_signalling_listener_failed(self) -> None:
        self.stun.running = True
        self.signal.listening = fail(OSError("address in use"))
        self.signal.startService()
        self.assertEqual(
            get(self.resource, b"/healthz")[:3:2], (503, b"unavailable: the signalling listener is not up\n")
        )

    def test_only_get(self) -> None:
        self.assertEqual(get(self.resource, b"/nothing")[0], 404)


class EventLoopLagTests(SynchronousTestCase):
    def test_lag(self) -> None:
        clock = Clock()
        lag = metrics.EventLoopLag(clock, interval=1.0)
        registry = metrics.make_registry([lag])
        lag.start()
        clock.advance(1.0)  # on time
        self.assertEqual(lag.last, 0.0)
        clock.advance(1.3)  # due at 2, runs at 2.3
        self.assertAlmostEqual(lag.last, 0.3)
        clock.advance(3.5)  # due at 3, runs at 5.8: late by several intervals
        self.assertAlmostEqual(lag.last, 2.8)
        samples = scrape(metrics.MetricsResource(registry, lambda: []))
        self.assertEqual(value(samples, "natbypass_event_loop_lag_seconds_count"), 3)
        self.assertAlmostEqual(value(samples, "natbypass_event_loop_lag_seconds_sum"), 3.1)
        self.assertEqual(value(samples, "natbypass_event_loop_lag_seconds_bucket", le="0.001"), 1)
        self.assertEqual(value(samples, "natbypass_event_loop_lag_seconds_bucket", le="0.5"), 2)
        self.assertEqual(value(samples, "natbypass_event_loop_lag_seconds_bucket", le="+Inf"), 3)
        self.assertAlmostEqual(value(samples, "natbypass_event_loop_last_lag_seconds"), 2.8)
        lag.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class MetricsServiceTests(SynchronousTestCase):
    def test_listens_while_running(self) -> None:
        reactor = MemoryReactorClock()
        service = metrics.MetricsService(
            serverFromString(reactor, "tcp:9100:interface=127.0.0.1"),
            metrics.make_registry([]),
            lambda: [],
            metrics.EventLoopLag(reactor, 1.0),
        )
        service.startService()
        port = self.successResultOf(service.whenListening())
        self.assertEqual((reactor.tcpServers[0][0], reactor.tcpServers[0][3]), (9100, "127.0.0.1"))
        self.assertEqual(port.getHost().port, 9100)
        self.assertEqual(len(reactor.getDelayedCalls()), 1)  # the lag probe
        service.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_options(self) -> None:
        o = mediator_tap.Options()
        o.parseOptions(["--metrics", "tcp:9100:interface=127.0.0.1"])
        self.assertEqual(o["metrics"], "tcp:9100:interface=127.0.0.1")
        top = mediator_tap.makeService(o, MemoryReactorClock())
        self.assertIsInstance(top.getServiceNamed("metrics"), metrics.MetricsService)
        o = mediator_tap.Options()
        o.parseOptions([])
        self.assertRaises(KeyError, mediator_tap.makeService(o, MemoryReactorClock()).getServiceNamed, "metrics")
        for tap in (mediator_tap, peer_tap):
            with self.assertRaises(usage.UsageError) as caught:
                tap.Options().parseOptions(
                    ["--mediator", "tcp:m:7000", "--id", "b"] * (tap is peer_tap) + ["--metrics", "tcpp:9100"]
                )
            self.assertIn("--metrics 'tcpp:9100'", str(caught.exception))

    def test_peer_plugin(self) -> None:
        path = self.mktemp()
        o = peer_tap.Options()
        o.parseOptions(
            ["--mediator", "tcp:198.18.0.2:7000", "--id", "bob", "--identity", path, "--metrics", "tcp:9101"]
        )
        peer = peer_tap.makeService(o, MemoryReactorClock())
        self.assertIsInstance(peer, Peer)
        self.assertEqual([type(s) for s in peer if isinstance(s, metrics.MetricsService)], [metrics.MetricsService])


class _FakePeer:
    """What PeerCollector reads of a Peer."""

    def __init__(self) -> None:
        self.running = False
        self.nat = NatSummary()
        self.stats = PeerStats({}, 0, {}, {}, {})


class PeerMetricsTests(SynchronousTestCase):
    def test_collector(self) -> None:
        peer = _FakePeer()
        resource = metrics.MetricsResource(
            metrics.make_registry([metrics.PeerCollector(peer)]), metrics.peer_health(peer)
        )
        before = scrape(resource)
        self.assertEqual(value(before, "natbypass_peer_connections", protocol="udp"), 0)
        self.assertEqual(value(before, "natbypass_peer_traversals_in_progress"), 0)
        self.assertEqual(
            value(before, "natbypass_peer_nat_info", mapping="unknown", filtering="unknown", kind="unknown"), 1
        )
        self.assertEqual(get(resource, b"/healthz")[0], 503)
        peer.running = True
        peer.stats = PeerStats(
            {"udp": 2},
            1,
            {("connected", "udp"): 2, ("failed", ""): 1},
            {("udp", "connected"): 2, ("tcp", "cancelled"): 1, ("tcp", "failed"): 1},
            {"udp": (2, 0.05)},
        )
        after = scrape(resource)
        self.assertEqual(value(after, "natbypass_peer_connections", protocol="udp"), 2)
        self.assertEqual(value(after, "natbypass_peer_connections", protocol="tcp"), 0)
        self.assertEqual(value(after, "natbypass_peer_traversals_in_progress"), 1)
        self.assertEqual(value(after, "natbypass_peer_traversals_total", outcome="connected", protocol="udp"), 2)
        self.assertEqual(value(after, "natbypass_peer_traversals_total", outcome="failed", protocol="none"), 1)
        self.assertEqual(value(after, "natbypass_peer_attempts_total", protocol="tcp", result="cancelled"), 1)
        self.assertEqual(value(after, "natbypass_peer_handshake_seconds_count", protocol="udp"), 2)
        self.assertAlmostEqual(value(after, "natbypass_peer_handshake_seconds_sum", protocol="udp"), 0.05)
        self.assertEqual(get(resource, b"/healthz")[:3:2], (200, b"ok\n"))


class InMemoryNetworkTests(SynchronousTestCase):
    """
    Real peers and a real mediator (STUN and signalling state) on a
    MemoryUDPReactor, as tests/test_peer.py runs them: what both sides'
    metrics say after a path is made and after one fails.
    """

    def setUp(self) -> None:
        self.m = MemoryMediator()
        self.addCleanup(self.m.stop)
        self.reactor, self.stun, self.state, self.mediator = self.m.reactor, self.m.stun, self.m.state, self.m.network
        self.settle = self.m.settle
        collector = metrics.MediatorCollector(self.state, self.stun)
        self.mediator_resource = metrics.MetricsResource(metrics.make_registry([collector]), lambda: [])

    def peer(self, name: str, host: str, protocol: str = "udp") -> tuple[Peer, metrics.MetricsResource]:
        p = self.m.peer(name, host, protocol, discover=False)
        return p, metrics.MetricsResource(metrics.make_registry([metrics.PeerCollector(p)]), metrics.peer_health(p))

    def test_a_path_made(self) -> None:
        b, _ = self.peer("bob", "127.0.0.3")
        b.listen(EchoHandler())
        a, resource = self.peer("alice", "127.0.0.1")
        self.settle(a.whenReady())
        self.settle(b.whenReady())
        self.assertEqual(get(resource, b"/healthz")[0], 200)
        conn = self.settle(a.connect("bob"))
        self.settle(Deferred(), limit=0.5, check=False)  # the reports reach the mediator
        peer = scrape(resource)
        self.assertEqual(value(peer, "natbypass_peer_connections", protocol="udp"), 1)
        self.assertEqual(value(peer, "natbypass_peer_traversals_total", outcome="connected", protocol="udp"), 1)
        self.assertEqual(value(peer, "natbypass_peer_attempts_total", protocol="udp", result="connected"), 1)
        self.assertEqual(value(peer, "natbypass_peer_handshake_seconds_count", protocol="udp"), 1)
        self.assertAlmostEqual(
            value(peer, "natbypass_peer_handshake_seconds_sum", protocol="udp"), conn.handshake_ms / 1000
        )
        mediator = scrape(self.mediator_resource)
        self.assertEqual(value(mediator, "natbypass_mediator_peers"), 2)
        self.assertEqual(value(mediator, "natbypass_mediator_sessions_total"), 1)
        self.assertEqual(value(mediator, "natbypass_mediator_offer_outcomes_total", outcome="session"), 1)
        self.assertEqual(
            value(mediator, "natbypass_mediator_traversal_reports_total", outcome="connected", protocol="udp"), 2
        )
        self.assertGreater(value(mediator, "natbypass_stun_requests_total"), 0)
        conn.close()
        self.settle(Deferred(), limit=0.5, check=False)
        self.assertEqual(value(scrape(resource), "natbypass_peer_connections", protocol="udp"), 0)
        a.stopService()
        self.assertEqual(get(resource, b"/healthz")[2], b"unavailable: the peer is not running\n")

    def test_a_path_that_fails(self) -> None:
        bob = SignalingClient(self.mediator.endpoint("127.0.0.3"), "bob", clock=self.reactor)
        bob.setOfferHandler(lambda offer: NOWHERE)
        bob.startService()
        self.addCleanup(bob.stopService)
        self.settle(bob.whenRegistered())
        a, resource = self.peer("alice", "127.0.0.1")
        self.settle(a.whenReady())
        self.assertRaises(AllAttemptsFailed, self.settle, a.connect("bob"))
        self.settle(Deferred(), limit=0.5, check=False)
        peer = scrape(resource)
        self.assertEqual(value(peer, "natbypass_peer_traversals_total", outcome="failed", protocol="none"), 1)
        self.assertEqual(value(peer, "natbypass_peer_attempts_total", protocol="udp", result="failed"), 1)
        self.assertEqual(value(peer, "natbypass_peer_connections", protocol="udp"), 0)
        mediator = scrape(self.mediator_resource)
        self.assertEqual(
            value(mediator, "natbypass_mediator_traversal_reports_total", outcome="failed", protocol="none"), 1
        )


class ClusterMetricsTests(SynchronousTestCase):
    """The cluster's gauges come from status()'s cluster fields, and only when there are some (--redis)."""

    def scrape_state(self, state: Any) -> dict:
        collector = metrics.MediatorCollector(state, None)
        return scrape(metrics.MetricsResource(metrics.make_registry([collector]), lambda: []))

    def test_alone_no_cluster_metrics(self) -> None:
        samples = self.scrape_state(SignalingState(Clock(), Limits()))
        self.assertEqual([name for name, _ in samples if "cluster" in name], [])

    def test_available_and_rtt_follow_the_directory(self) -> None:
        from natbypass.testing.cluster import FakeDirectory, FakeRedis

        clock = Clock()
        directory = FakeDirectory(FakeRedis(clock), "node0")
        state = SignalingState(clock, Limits(), cluster=directory)
        up = self.scrape_state(state)
        self.assertEqual(value(up, "natbypass_mediator_cluster_available"), 1)
        self.assertEqual(value(up, "natbypass_mediator_cluster_rtt_ms"), 1.0)
        self.assertEqual(value(up, "natbypass_mediator_cluster_reconnects_total"), 0)
        directory.available = False
        down = self.scrape_state(state)
        self.assertEqual(value(down, "natbypass_mediator_cluster_available"), 0)

    def test_rtt_unknown_yet_is_absent(self) -> None:
        samples = self.scrape_state(
            _Status({"cluster_node": "n", "cluster_available": False, "cluster_rtt_ms": None, "cluster_reconnects": 3})
        )
        self.assertEqual(value(samples, "natbypass_mediator_cluster_available"), 0)
        self.assertEqual(value(samples, "natbypass_mediator_cluster_reconnects_total"), 3)
        self.assertNotIn(("natbypass_mediator_cluster_rtt_ms", ()), samples)

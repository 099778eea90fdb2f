"""
Prometheus metrics and a health check for the mediator and the peer.

C{--metrics ENDPOINT} (a Twisted server endpoint string) serves, over
C{twisted.web}, C{/metrics} (the Prometheus text format of a per-service
C{CollectorRegistry}) and C{/healthz} (200 C{ok} when the service's listeners
are up, 503 saying what is down).

The collectors keep no counts of their own: at every scrape they read the
live snapshots the services already keep (C{SignalingState.status()} and its
counters, the STUN responder's C{Counters}, L{natbypass.peer.Peer.stats}).
The one thing measured here is the event loop's lag: a C{LoopingCall} on the
injected clock records how late it fires.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from . import __version__
from .listening import EndpointListener

#: The C{optParameters} row of C{--metrics}, shared by the mediator's and the peer's plugins.
METRICS_OPT_PARAMETER: list[Any] = [
    "metrics",
    None,
    None,
    "Serve Prometheus metrics on /metrics and a health check on /healthz at this Twisted server endpoint "
    "(e.g. tcp:9100:interface=127.0.0.1; no authentication, so keep it on a private address). Default: none.",
]

#: Upper bounds (seconds) of the event-loop lag histogram's buckets.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: A health check: what is down (empty: healthy).
HealthCheck = Callable[[], list[str]]

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


def check_metrics_option(options: usage.Options) -> None:
    """
    Check C{--metrics} (call from C{postOptions}): the endpoint string must
    parse, so a typo is a usage error before anything starts.
    """
    description = options["metrics"]
    if description is None:
        return
    try:
        serverFromString(None, description)  # builds the endpoint only; nothing listens, no reactor is used
    except Exception as e:
        raise usage.UsageError(
            f"--metrics {description!r}: {e}; give a Twisted server endpoint string such as tcp:9100:interface=127.0.0.1"
        ) from None


# ------------------------------------------------------------------ collectors


def _build_info(service: str) -> GaugeMetricFamily:
    info = GaugeMetricFamily(
        "natbypass_build_info", "The NATbypass version running (always 1).", labels=["version", "service"]
    )
    info.add_metric([__version__, service], 1)
    return info


class MediatorCollector:
    """
    The mediator's metrics, read at scrape time from the signalling state's
    C{status()} (gauges and its counters dict) and the STUN responder's
    C{Counters} snapshot.

    Counters map by name: C{errors:REASON} are refusals, C{offers:OUTCOME}
    and C{sessions} offer outcomes, C{outcome:OUTCOME[/PROTOCOL]} the
    traversal outcomes the peers report (C{outcome-by-nat:A,B:OUTCOME[/PROTOCOL]}
    and C{sessions-by-nat:A,B} the same by the two sides' NAT kinds, when the
    signalling state counts them); every other counter is an event
    (C{natbypass_mediator_events_total}), so new ones show up without a change here.
    """

    def __init__(self, state: Any, stun: Any) -> None:
        """
        @param state: the C{SignalingState} (C{status()}), or None.
        @param stun: the C{STUNService} (C{counters.snapshot()}), or None.
        """
        self.state = state
        self.stun = stun

    def collect(self) -> Iterator[Metric]:
        """Metric families of the current state (called by the registry at every scrape)."""
        yield _build_info("mediator")
        if self.state is not None:
            yield from self._signalling(self.state.status())
        if self.stun is not None:
            yield from self._stun(self.stun.counters.snapshot())
            if hasattr(self.stun, "per_worker"):  # --stun-workers: a natbypass.stun.worker.STUNWorkers
                yield from self._stun_workers(self.stun)

    def _signalling(self, status: dict[str, Any]) -> Iterator[Metric]:
        gauges = [
            ("peers", "peers", "Peers registered now."),
            ("bound_ids", "bound_ids", "Peer ids bound to a key now (connected or held)."),
            ("held_ids", "held_ids", "Peer ids held for their absent owner now."),
            ("connections", "open_connections", "Signalling connections open now."),
            ("pending_offers", "pending_offers", "Offers waiting for the target's answer now."),
            ("open_sessions", "open_sessions", "Sessions not yet reported on by both sides."),
        ]
        for key, name, doc in gauges:
            if key in status:
                yield GaugeMetricFamily(f"natbypass_mediator_{name}", doc, value=status[key])
        yield from _cluster(status)
        counters: dict[str, int] = status.get("counters", {})
        yield CounterMetricFamily(
            "natbypass_mediator_connections", "Signalling connections accepted.", value=counters.get("connections", 0)
        )
        yield CounterMetricFamily(
            "natbypass_mediator_registrations", "Successful registrations.", value=counters.get("registrations", 0)
        )
        yield CounterMetricFamily(
            "natbypass_mediator_offers", "Offers forwarded to their target.", value=counters.get("offers", 0)
        )
        yield CounterMetricFamily(
            "natbypass_mediator_sessions", "Sessions made (accepted offers).", value=counters.get("sessions", 0)
        )
        offers = CounterMetricFamily(
            "natbypass_mediator_offer_outcomes",
            "How offers ended: session (accepted), rejected, timeout, gone, no-common-protocol, unknown-peer, ...",
            labels=["outcome"],
        )
        offers.add_metric(["session"], counters.get("sessions", 0))
        refusals = CounterMetricFamily(
            "natbypass_mediator_refusals", "Requests refused, by error (the errors:* counters).", labels=["reason"]
        )
        reports = CounterMetricFamily(
            "natbypass_mediator_traversal_reports",
            "Traversal outcomes the peers reported (each side reports once per session).",
            labels=["outcome", "protocol"],
        )
        by_nat = CounterMetricFamily(
            "natbypass_mediator_traversal_reports_by_nat",
            "Reported traversal outcomes by the NAT kinds of the initiator and the target.",
            labels=["nat_initiator", "nat_target", "outcome", "protocol"],
        )
        sessions_by_nat = CounterMetricFamily(
            "natbypass_mediator_sessions_by_nat",
            "Sessions made, by the NAT kinds of the initiator and the target.",
            labels=["nat_initiator", "nat_target"],
        )
        events = CounterMetricFamily(
            "natbypass_mediator_events", "Other signalling events, by counter name.", labels=["event"]
        )
        plain = {"connections", "registrations", "offers", "sessions"}
        for key, value in counters.items():
            kind, _, rest = key.partition(":")
            if key in plain:
                continue
            if kind == "errors" and rest:
                refusals.add_metric([rest], value)
            elif kind == "offers" and rest:
                offers.add_metric([rest], value)
            elif kind == "outcome" and rest:
                reports.add_metric(_outcome_labels(rest), value)
            elif kind == "outcome-by-nat" and _nat_pair(rest):
                pair, _, outcome = rest.partition(":")
                by_nat.add_metric([*_nat_pair(pair), *_outcome_labels(outcome)], value)
            elif kind == "sessions-by-nat" and _nat_pair(rest):
                sessions_by_nat.add_metric(_nat_pair(rest), value)
            else:
                events.add_metric([key], value)
        yield from (offers, refusals, reports, by_nat, sessions_by_nat, events)

    def _stun(self, snapshot: dict[str, int]) -> Iterator[Metric]:
        names = {"received": "requests", "answered": "answers"}
        for field, value in snapshot.items():
            name = _NOT_NAME.sub("_", names.get(field, field))
            yield CounterMetricFamily(
                f"natbypass_stun_{name}", f"STUN responder: {field.replace('_', ' ')} (Counters.{field}).", value=value
            )

    def _stun_workers(self, stun: Any) -> Iterator[Metric]:
        """Each worker's counters (since that process started), how many answer, how many restarts."""
        names = {"received": "requests", "answered": "answers"}
        per_worker = stun.per_worker()
        families: dict[str, CounterMetricFamily] = {}
        for worker, snapshot in sorted(per_worker.items()):
            for field, value in snapshot.items():
                if field.startswith("tcp_"):
                    continue  # workers serve UDP only
                if field not in families:
                    name = _NOT_NAME.sub("_", names.get(field, field))
                    families[field] = CounterMetricFamily(
                        f"natbypass_stun_worker_{name}",
                        f"STUN responder: {field.replace('_', ' ')}, per worker process (since it started).",
                        labels=["worker"],
                    )
                families[field].add_metric([str(worker)], value)
        yield from families.values()
        yield GaugeMetricFamily(
            "natbypass_stun_workers_ready", "STUN worker processes answering now.", value=stun.workers_ready()
        )
        yield GaugeMetricFamily("natbypass_stun_workers", "STUN worker processes configured.", value=stun.workers)
        yield GaugeMetricFamily(
            "natbypass_stun_udp_answering",
            "1 while STUN over UDP is answered (by the mediator process until the workers are ready, then by at "
            "least one worker); 0: every worker is down, /healthz says why.",
            value=1 if stun.udp_answering() else 0,
        )
        yield CounterMetricFamily(
            "natbypass_stun_worker_restarts",
            "STUN worker processes started again after they ended.",
            value=stun.restarts,
        )


def _cluster(status: dict[str, Any]) -> Iterator[Metric]:
    """
    The cluster's fields of C{status()} (C{--redis} only: a mediator alone
    has none, so it exports none rather than a misleading 0).
    """
    if "cluster_available" not in status:
        return
    yield GaugeMetricFamily(
        "natbypass_mediator_cluster_available",
        "1 while the cluster's shared directory (Redis) is reachable, else 0 (offers across mediators are refused).",
        value=1 if status["cluster_available"] else 0,
    )
    if status.get("cluster_rtt_ms") is not None:
        yield GaugeMetricFamily(
            "natbypass_mediator_cluster_rtt_ms",
            "The last Redis round trip (PING), in milliseconds: about the hop an offer across mediators adds.",
            value=status["cluster_rtt_ms"],
        )
    yield CounterMetricFamily(
        "natbypass_mediator_cluster_reconnects",
        "Times the connection to Redis was made again after it was lost.",
        value=status.get("cluster_reconnects", 0),
    )
    failures = CounterMetricFamily(
        "natbypass_mediator_cluster_connect_failures",
        "Connections to Redis that could not be set up, by reason: auth (user or password refused), "
        "tls (certificate not trusted or not naming the host), closed (the log says more).",
        labels=["reason"],
    )
    for reason, count in sorted(
        {"auth": 0, "tls": 0, "closed": 0, **status.get("cluster_connect_failures", {})}.items()
    ):
        failures.add_metric([reason], count)
    yield failures


def _outcome_labels(text: str) -> list[str]:
    """C{OUTCOME[/PROTOCOL]} -> [outcome, protocol]; protocol C{none} when absent."""
    outcome, _, protocol = text.partition("/")
    return [outcome, protocol or "none"]


def _nat_pair(text: str) -> list[str]:
    """C{A,B[:...]} -> [A, B] (empty when C{text} is not such a pair)."""
    pair = text.partition(":")[0].split(",")
    return pair if len(pair) == 2 and all(pair) else []


class PeerCollector:
    """
    A peer's metrics, read at scrape time from L{natbypass.peer.Peer.stats}
    and its NAT summary: open paths by protocol, traversals and their
    attempts, secure-handshake times (QUIC on udp, TLS 1.3 on tcp).
    """

    def __init__(self, peer: Any) -> None:
        """@param peer: a L{natbypass.peer.Peer}."""
        self.peer = peer

    def collect(self) -> Iterator[Metric]:
        """Metric families of the current state (called by the registry at every scrape)."""
        yield _build_info("peer")
        stats = self.peer.stats
        connections = GaugeMetricFamily(
            "natbypass_peer_connections", "Direct paths open now, by protocol.", labels=["protocol"]
        )
        for protocol, count in sorted({"udp": 0, "tcp": 0, **stats.connections}.items()):
            connections.add_metric([protocol], count)
        yield connections
        yield GaugeMetricFamily(
            "natbypass_peer_traversals_in_progress", "Traversals under way now.", value=stats.traversals
        )
        traversals = CounterMetricFamily(
            "natbypass_peer_traversals",
            "Finished traversals by outcome (as reported to the mediator) and protocol.",
            labels=["outcome", "protocol"],
        )
        for (outcome, protocol), count in sorted(stats.outcomes.items()):
            traversals.add_metric([outcome, protocol or "none"], count)
        yield traversals
        attempts = CounterMetricFamily(
            "natbypass_peer_attempts",
            "Protocol attempts of finished traversals by protocol and result.",
            labels=["protocol", "result"],
        )
        for (protocol, result), count in sorted(stats.attempts.items()):
            attempts.add_metric([protocol, result], count)
        yield attempts
        handshakes = SummaryMetricFamily(
            "natbypass_peer_handshake_seconds",
            "Secure-channel handshakes of the paths made (QUIC on udp, TLS 1.3 on tcp).",
            labels=["protocol"],
        )
        for protocol, (count, total) in sorted(stats.handshakes.items()):
            handshakes.add_metric([protocol], count, total)
        yield handshakes
        nat = self.peer.nat
        info = GaugeMetricFamily(
            "natbypass_peer_nat_info",
            "What this peer knows of its NAT (always 1).",
            labels=["mapping", "filtering", "kind"],
        )
        info.add_metric([str(nat.mapping), str(nat.filtering), str(nat.kind())], 1)
        yield info


class EventLoopLag:
    """
    How late the event loop runs timers: a C{LoopingCall} every C{interval}
    seconds of C{clock}, each call recording how long after its due time it
    ran.  A collector of its own measurements (a histogram and the last one).
    """

    def __init__(self, clock: IReactorTime, interval: float = 1.0) -> None:
        self.clock = clock
        self.interval = interval
        #: The most recent lag, in seconds.
        self.last = 0.0
        self._buckets = [0] * len(LAG_BUCKETS)
        self._count = 0
        self._sum = 0.0
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        """Start measuring (the first call is due one interval from now)."""
        self._loop = LoopingCall.withCount(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop measuring."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self, count: int) -> None:
        # LoopingCall runs at the interval boundaries after its start; C{count}
        # is how many of them passed since the previous run, so this run was
        # due C{count - 1} intervals after the one following the previous run.
        loop = self._loop
        assert loop is not None and loop.starttime is not None
        now = self.clock.seconds()
        boundaries = int((now - loop.starttime) / loop.interval)
        due = loop.starttime + (boundaries - count + 1) * loop.interval
        self.observe(max(0.0, now - due))

    def observe(self, lag: float) -> None:
        """Record one lag, in seconds."""
        self.last = lag
        self._count += 1
        self._sum += lag
        for i, bound in enumerate(LAG_BUCKETS):
            if lag <= bound:
                self._buckets[i] += 1

    def collect(self) -> Iterator[Metric]:
        """The lag histogram and the last lag."""
        buckets = [(str(bound), n) for bound, n in zip(LAG_BUCKETS, self._buckets)] + [("+Inf", self._count)]
        yield HistogramMetricFamily(
            "natbypass_event_loop_lag_seconds",
            "How late a timer due every interval ran (the reactor was busy).",
            buckets=buckets,
            sum_value=self._sum,
        )
        yield GaugeMetricFamily("natbypass_event_loop_last_lag_seconds", "The most recent lag.", value=self.last)


# ------------------------------------------------------------------ health


class MediatorHealth:
    """
    The mediator is healthy when the STUN responder and the signalling
    listener are up (with C{--stun-workers}: and at least one worker answers
    UDP once they took it over).  Called at every probe; it watches the signalling
    service's C{whenListening} once per run of that service.
    """

    def __init__(self, stun: Any, signal: Any) -> None:
        """
        @param stun: the C{STUNService} (running only once its sockets are open), or None.
        @param signal: the C{SignalingService}, or None.
        """
        self.stun = stun
        self.signal = signal
        self._signal_state: str | None = None  # None (not watched), "waiting", "up", "failed"

    def __call__(self) -> list[str]:
        """What is down (empty: all is up)."""
        problems = []
        if self.stun is not None and not self.stun.running:
            problems.append("the STUN responder is not listening")
        elif self.stun is not None and hasattr(self.stun, "workers_down"):
            down = self.stun.workers_down()  # --stun-workers: UDP is theirs once handed over
            if down is not None:
                problems.append(down)
        if self.signal is not None and not self._signal_up():
            problems.append("the signalling listener is not up")
        return problems

    def _signal_up(self) -> bool:
        if not self.signal.running:
            self._signal_state = None  # watch again at the next run
            return False
        if self._signal_state is None:
            self._signal_state = "waiting"

            def up(_: Any) -> None:
                self._signal_state = "up"

            def failed(_: Failure) -> None:
                self._signal_state = "failed"

            self.signal.whenListening().addCallbacks(up, failed)
        return self._signal_state == "up"


def peer_health(peer: Any) -> HealthCheck:
    """
    A peer is healthy while it runs: it only runs once its UDP socket and TCP
    port are bound (registration at the mediator comes and goes with the
    mediator and is retried on its own).
    """
    return lambda: [] if peer.running else ["the peer is not running"]


# ------------------------------------------------------------------ web


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class _HealthPage(Resource):
    isLeaf = True

    def __init__(self, health: HealthCheck) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        problems = self.health()
        if problems:
            request.setResponseCode(503)
            return ("unavailable: " + "; ".join(problems) + "\n").encode("utf-8")
        return b"ok\n"


class MetricsResource(Resource):
    """The web root: C{/metrics} (Prometheus text format) and C{/healthz}."""

    def __init__(self, registry: CollectorRegistry, health: HealthCheck) -> None:
        super().__init__()
        self.putChild(b"metrics", _MetricsPage(registry))
        self.putChild(b"healthz", _HealthPage(health))


class _QuietSite(Site):
    """A scrape every few seconds would fill the service's log with access lines: none."""

    noisy = False

    def log(self, request: Request) -> None:
        pass


class MetricsService(Service):
    """
    Serves a L{MetricsResource} on C{endpoint} while running, and measures
    the event loop's lag.  A listener that cannot be opened is logged; the
    service it watches goes on without it.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        registry: CollectorRegistry,
        health: HealthCheck,
        lag: EventLoopLag | None = None,
    ) -> None:
        self.listener = EndpointListener(endpoint, "metrics (/metrics, /healthz)")
        self.registry = registry
        self.health = health
        self.lag = lag
        self.resource = MetricsResource(registry, health)

    def startService(self) -> None:
        """Listen, and start measuring the lag."""
        super().startService()
        if self.lag is not None:
            self.lag.start()
        self.listener.listen(_QuietSite(self.resource))

    def whenListening(self) -> Deferred[IListeningPort]:
        """The listening port, once bound (C{getHost()} tells the address)."""
        return self.listener.whenListening()

    def stopService(self) -> Deferred[None]:
        """Stop listening and measuring."""
        super().stopService()
        if self.lag is not None:
            self.lag.stop()
        return self.listener.stop()


def make_registry(collectors: Iterable[Any]) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding C{collectors}."""
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


def mediator_metrics(
    endpoint: str, reactor: Any, stun: Any, signal: Any, *, lag_interval: float = 1.0
) -> MetricsService:
    """
    The mediator's metrics service on C{endpoint} (a server endpoint string):
    L{MediatorCollector} over C{signal.state} and C{stun}, L{MediatorHealth},
    the event-loop lag on C{reactor}'s clock.  Nothing listens until it starts.
    """
    lag = EventLoopLag(reactor, lag_interval)
    registry = make_registry([MediatorCollector(signal.state if signal is not None else None, stun), lag])
    return MetricsService(serverFromString(reactor, endpoint), registry, MediatorHealth(stun, signal), lag)


def peer_metrics(endpoint: str, reactor: Any, peer: Any, *, lag_interval: float = 1.0) -> MetricsService:
    """
    A peer's metrics service on C{endpoint}: L{PeerCollector},
    L{peer_health}, the event-loop lag on the peer's clock.
    """
    lag = EventLoopLag(peer.clock, lag_interval)
    registry = make_registry([PeerCollector(peer), lag])
    return MetricsService(serverFromString(reactor, endpoint), registry, peer_health(peer), lag)

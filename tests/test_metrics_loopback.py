"""
The mediator's --metrics on real loopback sockets: twistd's service with
STUN, signalling and metrics on port 0 of 127.0.0.1, /metrics and /healthz
fetched with twisted.web's Agent while a peer registers.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from natbypass.app import mediator_tap
from natbypass.signaling.client import SignalingClient, client_endpoint


class MediatorMetricsLoopbackTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def setUp(self):
        options = mediator_tap.Options()
        options.parseOptions(
            [
                "--stun", "127.0.0.1:3478",
                "--signal", "tcp:0:interface=127.0.0.1",
                "--metrics", "tcp:0:interface=127.0.0.1",
                "--status-interval", "0",
            ]
        )  # fmt: skip
        options["stun-address"] = ("127.0.0.1", 0)  # a free port (the option itself wants a real one)
        self.top = mediator_tap.makeService(options, reactor)
        self.top.startService()
        self.addCleanup(self.top.stopService)
        metrics_port = yield self.top.getServiceNamed("metrics").whenListening()
        signal_port = yield self.top.getServiceNamed("signal").whenListening()
        self.base = f"http://127.0.0.1:{metrics_port.getHost().port}".encode("ascii")
        self.signal = signal_port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        self.addCleanup(pool.closeCachedConnections)

    @inlineCallbacks
    def get(self, path: bytes):
        response = yield self.agent.request(b"GET", self.base + path)
        body = yield readBody(response)
        return response, body

    @inlineCallbacks
    def samples(self):
        response, body = yield self.get(b"/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version="))
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for s in family.samples
        }

    @inlineCallbacks
    def test_metrics_and_health(self):
        response, body = yield self.get(b"/healthz")
        self.assertEqual((response.code, body), (200, b"ok\n"))
        before = yield self.samples()
        self.assertEqual(before[("natbypass_mediator_peers", ())], 0)
        self.assertIn(("natbypass_stun_requests_total", ()), before)
        self.assertIn(("natbypass_event_loop_lag_seconds_count", ()), before)

        client = SignalingClient(client_endpoint(reactor, f"tcp:127.0.0.1:{self.signal}"), "alice", clock=reactor)
        client.startService()
        self.addCleanup(client.stopService)
        yield client.whenRegistered()
        after = yield self.samples()
        self.assertEqual(after[("natbypass_mediator_peers", ())], 1)
        self.assertEqual(after[("natbypass_mediator_registrations_total", ())], 1)

        yield self.top.getServiceNamed("stun").stopService()
        response, body = yield self.get(b"/healthz")
        self.assertEqual((response.code, body), (503, b"unavailable: the STUN responder is not listening\n"))

    @inlineCallbacks
    def test_lag_is_measured(self):
        yield deferLater(reactor, 1.2, lambda: None)
        samples = yield self.samples()
        self.assertGreaterEqual(samples[("natbypass_event_loop_lag_seconds_count", ())], 1)

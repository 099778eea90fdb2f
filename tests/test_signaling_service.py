"""
Tests of the signalling options and service construction (MemoryReactor:
nothing is bound).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.identity import Fingerprint
from natbypass.signaling.server import TokenPolicy
from natbypass.signaling.service import (
    SIGNAL_OPT_PARAMETERS,
    SignalingService,
    check_signaling_options,
    makeSignalingService,
    makeSignalingServiceFromOptions,
)


class Options(usage.Options):
    optParameters: list[list[Any]] = SIGNAL_OPT_PARAMETERS

    def postOptions(self) -> None:
        check_signaling_options(self)


def parse(*argv: str) -> Options:
    o = Options()
    o.parseOptions(list(argv))
    return o


class OptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        o = parse()
        self.assertEqual(o["signal"], "tcp:7000")
        self.assertEqual(o["max-line"], 8192)
        self.assertIsNone(o["token-file"])
        self.assertEqual((o["id-hold"], o["max-ids"]), (86_400.0, 250_000))

    def test_bad_values(self) -> None:
        for argv, words in [
            (("--max-line", "10"), "--max-line"),
            (("--rate", "-1"), "--rate"),
            (("--keepalive", "100", "--idle-timeout", "90"), "shorter"),
            (("--offer-timeout", "0"), "positive"),
            (("--max-peers", "x"), "invalid literal"),
            (("--id-hold", "-1"), "--id-hold"),
            (("--max-ids", "-5"), "--max-ids"),
        ]:
            with self.assertRaises(usage.UsageError) as cm:
                parse(*argv)
            self.assertIn(words, str(cm.exception))

    def test_missing_token_file(self) -> None:
        with self.assertRaises(usage.UsageError) as cm:
            parse("--token-file", "/nonexistent/tokens")
        self.assertIn("/nonexistent/tokens", str(cm.exception))

    def test_empty_token_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# nobody\n")
        with self.assertRaises(usage.UsageError) as cm:
            parse("--token-file", path)
        self.assertIn("no tokens", str(cm.exception))

    def test_token_file_loaded(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("abc alice\n")
        o = parse("--token-file", path)
        self.assertIsInstance(o["signal-tokens"], TokenPolicy)
        svc = makeSignalingServiceFromOptions(o, MemoryReactorClock())
        self.assertEqual(svc.state.tokens.check("abc", "alice", None), (True, True))


class ServiceTests(SynchronousTestCase):
    def test_limits_passed_on(self) -> None:
        o = parse(
            "--signal",
            "tcp:7001:interface=127.0.0.1",
            "--max-peers",
            "5",
            "--max-per-source",
            "3",
            "--rate",
            "7",
            "--max-line",
            "1024",
            "--id-hold",
            "0",
            "--max-ids",
            "9",
        )
        reactor = MemoryReactorClock()
        svc = makeSignalingServiceFromOptions(o, reactor)
        verifyObject(IService, svc)
        self.assertIsInstance(svc, SignalingService)
        lim = svc.state.limits
        self.assertEqual((lim.max_peers, lim.max_per_source, lim.rate, lim.max_line), (5, 3, 7.0, 1024))
        self.assertEqual((lim.id_hold, lim.max_ids), (0.0, 9))
        self.assertEqual(reactor.tcpServers, [])  # nothing bound before start
        svc.startService()
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (7001, "127.0.0.1"))
        self.assertEqual(self.successResultOf(svc.whenListening()).getHost().port, 7001)

    def test_stop_closes_connections(self) -> None:
        reactor = MemoryReactorClock()
        svc = makeSignalingService("tcp:7000", reactor, status_interval=0)
        svc.startService()
        factory = reactor.tcpServers[0][1]
        from twisted.internet.address import IPv4Address

        proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        tr = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        proto.makeConnection(tr)
        self.assertEqual(svc.state.status()["connections"], 1)
        svc.stopService()
        self.assertTrue(tr.disconnecting)
        self.assertIn(b'"error":"shutting-down"', tr.value())
        self.assertEqual(svc.state.status()["connections"], 0)

    def test_sweep_and_status_run(self) -> None:
        reactor = MemoryReactorClock()
        svc = makeSignalingService("tcp:7000", reactor, status_interval=60, idle_timeout=5, keepalive=2)
        svc.startService()
        factory = reactor.tcpServers[0][1]
        from twisted.internet.address import IPv4Address

        proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        tr = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        proto.makeConnection(tr)
        for _ in range(7):
            reactor.advance(1)
        self.assertTrue(tr.disconnecting)  # the sweeper closed the idle connection
        self.addCleanup(svc.stopService)

    def test_example_token_file_in_docs_parses(self) -> None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(here, "docs", "protocol.md"), encoding="utf-8") as f:
            doc = f.read()
        block = doc.split("<!-- token-file -->", 2)[1].split("```")[1]
        policy = TokenPolicy.parse(block)
        self.assertEqual(policy.check("k7Hq2-bob-only", "bob", None), (True, True))
        self.assertEqual(policy.check("lab-2f9c1d7e", "anyone", None), (True, False))
        carol = Fingerprint.parse("nb1-3c6u-zrkw-mm5q-zdmv-7wg6-w2d3-4ci2-cshy")
        self.assertEqual(policy.check("Zq#9carol", "carol", carol), (True, True))
        self.assertEqual(policy.check("Zq#9carol", "carol", None), (False, False))


class HardeningOptionTests(SynchronousTestCase):
    def test_defaults_and_validation(self) -> None:
        o = parse()
        self.assertEqual((o["max-connections"], o["fd-reserve"], o["shutdown-grace"]), (10_000, 64, 5.0))
        for name in ("max-connections", "fd-reserve", "shutdown-grace"):
            with self.assertRaises(usage.UsageError):
                parse(f"--{name}", "-1")

    def test_options_reach_the_service(self) -> None:
        o = parse("--max-connections", "50", "--shutdown-grace", "2")
        svc = makeSignalingServiceFromOptions(o, MemoryReactorClock())
        self.assertEqual(svc.state.limits.max_connections, 50)
        self.assertEqual(svc.grace, 2.0)

    def test_help_names_them(self) -> None:
        text = str(Options())
        for name in ("--max-connections", "--fd-reserve", "--shutdown-grace", "/64"):
            self.assertIn(name, text)


class GCFreezeTests(SynchronousTestCase):
    def test_off_by_default(self) -> None:
        self.assertEqual(parse()["gc-freeze-interval"], 0.0)
        self.assertRaises(usage.UsageError, parse, "--gc-freeze-interval", "-1")

    def test_freezes_after_an_interval_and_unfreezes_on_stop(self) -> None:
        import gc

        self.addCleanup(gc.unfreeze)
        # Some interpreters (3.12.1) report objects that unfreeze() never
        # releases: compare with what this process starts with.
        gc.unfreeze()
        baseline = gc.get_freeze_count()
        reactor = MemoryReactorClock()
        svc = makeSignalingServiceFromOptions(parse("--gc-freeze-interval", "600", "--status-interval", "0"), reactor)
        svc.startService()
        self.assertEqual(gc.get_freeze_count(), baseline)  # not at start: the peers have not come yet
        reactor.advance(600)
        self.assertGreater(gc.get_freeze_count(), baseline)
        svc.stopService()
        self.assertEqual(gc.get_freeze_count(), baseline)

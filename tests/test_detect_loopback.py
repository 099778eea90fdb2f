"""
Whole C{natbypass detect} runs on loopback, with the real reactor, against
our responder (natbypass.stun.server), in this process and as a command.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from natbypass.app import detect
from natbypass.stun.server import STUNService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str):
    return detect.build_parser().parse_args(list(argv))


class Silent(DatagramProtocol):
    """A UDP port that never answers: a server that is down, or UDP blocked."""

    def datagramReceived(self, data, addr) -> None:
        pass


class LoopbackTests(TestCase):
    """Whole detect runs on loopback, in this process, with the real reactor."""

    def responder(self, alternate: bool = True):
        service = STUNService(reactor, ("127.0.0.1", 0), ("127.0.0.2", 0) if alternate else None, stats_interval=0)
        service.startService()
        self.addCleanup(service.stopService)
        return service.config.primary

    def responder6(self):
        """A single-address responder on ::1 (the test skips where there is no IPv6 loopback)."""
        try:
            service = STUNService(reactor, ("::1", 0), None, stats_interval=0)
            service.startService()
        except Exception as e:
            raise self.skipTest(f"no IPv6 loopback here: {e}") from None
        self.addCleanup(service.stopService)
        return service.config.primary

    @defer.inlineCallbacks
    def detect(self, *argv: str):
        out, err = io.StringIO(), io.StringIO()
        code = yield detect.detect(reactor, parse(*argv), out, err)
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_open_on_loopback(self) -> None:
        host, port = self.responder()
        code, out, err = yield self.detect("--stun", f"{host}:{port}", "--json", "--tcp")
        self.assertEqual((code, err), (0, ""))
        result = json.loads(out)
        self.assertEqual(
            {k: result[k] for k in ("nat_type", "mapping", "filtering", "tcp_mapping", "port_preserving")},
            {
                "nat_type": "open",
                "mapping": "none",
                "filtering": "none",
                "tcp_mapping": "none",
                "port_preserving": True,
            },
        )
        self.assertEqual(result["public_address"], result["local_address"])
        self.assertTrue(result["local_address"].startswith("127.0.0.1:"))
        self.assertEqual(result["other_address"], f"127.0.0.2:{result['other_address'].split(':')[1]}")
        self.assertEqual([t["answered"] for t in result["tests"]], [True, True, True])

    @defer.inlineCallbacks
    def test_wildcard_local_runs_every_test(self) -> None:
        """Bound to 0.0.0.0, no-NAT cannot be seen, so the mapping tests run too."""
        host, port = self.responder()
        code, out, _ = yield self.detect("--stun", f"{host}:{port}", "--json", "--local", "0.0.0.0")
        result = json.loads(out)
        self.assertEqual(code, 0)
        self.assertEqual(
            (result["mapping"], result["filtering"], result["nat_type"]),
            ("endpoint-independent", "endpoint-independent", "full-cone"),
        )
        self.assertEqual(len(result["tests"]), 5)

    @defer.inlineCallbacks
    def test_single_address_server(self) -> None:
        host, port = self.responder(alternate=False)
        code, out, _ = yield self.detect("--stun", f"{host}:{port}")
        self.assertEqual(code, 0)
        self.assertIn("Mapping:         none", out)
        self.assertIn("Filtering:       unknown", out)
        self.assertIn("NAT type:        unknown", out)
        self.assertIn("OTHER-ADDRESS", out)

    @defer.inlineCallbacks
    def test_ipv6(self) -> None:
        """Over ::1: a single address, so only what one address can tell."""
        host, port = self.responder6()
        code, out, _ = yield self.detect("--stun", f"[{host}]:{port}", "--json", "--tcp")
        self.assertEqual(code, 0)
        result = json.loads(out)
        self.assertEqual((result["mapping"], result["tcp_mapping"], result["filtering"]), ("none", "none", "unknown"))
        self.assertTrue(result["public_address"].startswith("[::1]:"))
        self.assertEqual(result["public_address"], result["local_address"])

    @defer.inlineCallbacks
    def test_ipv6_reachability(self) -> None:
        """
        --stun6 beside --stun: one Binding over IPv6 says whether IPv6 works
        and whether it is translated (NAT66); the IPv4 detection is unchanged.
        """
        host, port = self.responder()
        port6 = self.responder6()[1]
        code, out, err = yield self.detect("--stun", f"{host}:{port}", "--stun6", f"[::1]:{port6}", "--json")
        self.assertEqual((code, err), (0, ""))
        result = json.loads(out)
        self.assertEqual(result["nat_type"], "open")
        ipv6 = result["ipv6"]
        self.assertEqual(ipv6["server"], f"[::1]:{port6}")
        self.assertTrue(ipv6["reachable"])
        self.assertFalse(ipv6["translated"])
        self.assertTrue(ipv6["public_address"].startswith("[::1]:"))
        self.assertEqual(ipv6["public_address"], ipv6["local_address"])
        code, out, _ = yield self.detect("--stun", f"{host}:{port}", "--stun6", f"[::1]:{port6}")
        self.assertIn("IPv6:            reachable, not translated (no NAT66)", out)

    @defer.inlineCallbacks
    def test_ipv6_unreachable_is_reported_not_fatal(self) -> None:
        """An IPv6 server that does not answer: reported, and the exit status is the IPv4 detection's."""
        host, port = self.responder()
        silent = reactor.listenUDP(0, Silent(), interface="::1")
        self.addCleanup(silent.stopListening)
        code, out, _ = yield self.detect(
            "--stun", f"{host}:{port}", "--stun6", f"[::1]:{silent.getHost().port}", "--json", "--timeout", "0.5"
        )
        self.assertEqual(code, 0)
        ipv6 = json.loads(out)["ipv6"]
        self.assertEqual((ipv6["reachable"], ipv6["public_address"], ipv6["translated"]), (False, None, None))

    @defer.inlineCallbacks
    def test_unreachable(self) -> None:
        silent = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        code, out, err = yield self.detect("--stun", f"127.0.0.1:{port}", "--json", "--timeout", "0.6")
        self.assertEqual(code, 1)
        self.assertIn("did not answer over UDP within 0.6 s", err)
        result = json.loads(out)
        self.assertEqual((result["nat_type"], result["reachable"]), ("udp-blocked", False))
        self.assertGreaterEqual(result["elapsed_ms"], 600)

    @defer.inlineCallbacks
    def test_cannot_bind(self) -> None:
        code, _, err = yield self.detect("--stun", "127.0.0.1:9", "--local", "192.0.2.1:0")
        self.assertEqual(code, 1)
        self.assertIn("cannot bind UDP to 192.0.2.1:0", err)


class CommandTests(TestCase):
    """The real command, as a user runs it."""

    def command(self, *argv: str):
        env = dict(os.environ, PYTHONPATH=ROOT)
        return getProcessOutputAndValue(sys.executable, ["-m", "natbypass", "detect", *argv], env=env, path=ROOT)

    @defer.inlineCallbacks
    def test_exit_statuses(self) -> None:
        silent = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        port = silent.getHost().port
        out, err, code = yield self.command("--stun", f"127.0.0.1:{port}", "--timeout", "0.3")
        self.assertEqual(code, 1, err)
        self.assertIn(b"did not answer", err)
        out, err, code = yield self.command("--stun", "127.0.0.1:70000")
        self.assertEqual(code, 2)
        self.assertIn(b"the port must be a number from 1 to 65535", err)
        service = STUNService(reactor, ("127.0.0.1", 0), ("127.0.0.2", 0), stats_interval=0)
        service.startService()
        self.addCleanup(service.stopService)
        host, port = service.config.primary
        out, err, code = yield self.command("--stun", f"{host}:{port}", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["nat_type"], "open")

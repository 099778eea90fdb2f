"""
Tests for natbypass.app.detect: argument parsing, output, exit statuses, and
whole runs on loopback against our responder (natbypass.stun.server).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from natbypass.app import detect
from natbypass.stun import discovery as dv
from tests.test_discovery import FakeInternet, FakeTCP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    from natbypass.stun.server import STUNService
except ImportError:  # pragma: no cover - the responder is written in parallel
    STUNService = None
NO_RESPONDER = "natbypass/stun/server.py (our STUN responder) does not exist yet"


def parse(*argv: str):
    return detect.build_parser().parse_args(list(argv))


def run_quietly(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = detect.run(argv)
    return code, out.getvalue(), err.getvalue()


hostnames = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}\Z")
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


class HostPortTests(SynchronousTestCase):
    def test_examples(self) -> None:
        p = detect.parse_host_port
        self.assertEqual(p("127.0.0.1:3478"), ("127.0.0.1", 3478))
        self.assertEqual(p("127.0.0.1"), ("127.0.0.1", 3478))
        self.assertEqual(p("[::1]:5000"), ("::1", 5000))
        self.assertEqual(p("[::1]"), ("::1", 3478))
        self.assertEqual(p("::1"), ("::1", 3478))
        self.assertEqual(p("stun.example:19302"), ("stun.example", 19302))
        self.assertEqual(p("0.0.0.0:0", allow_zero=True), ("0.0.0.0", 0))
        for bad in ("", ":3478", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "1.2.3.4:x",
                    "[::1", "[::1]x", "[127.0.0.1]:1", "::g", "a..b", "-a.b", "a b:1",
                    "127.0.0.1:+1", "127.0.0.1:١٢"):
            self.assertRaises(ValueError, p, bad)

    @given(st.one_of(ipv4, hostnames), st.integers(1, 65535))
    def test_round_trip_v4_and_names(self, host: str, port: int) -> None:
        self.assertEqual(detect.parse_host_port(f"{host}:{port}"), (host, port))
        self.assertEqual(detect.parse_host_port(host), (host, detect.DEFAULT_PORT))

    @given(ipv6, st.integers(1, 65535))
    def test_round_trip_v6(self, host: str, port: int) -> None:
        self.assertEqual(detect.parse_host_port(f"[{host}]:{port}"), (host, port))
        self.assertEqual(detect.parse_host_port(host), (host, detect.DEFAULT_PORT))

    @given(st.text(max_size=40))
    def test_anything_else_is_a_value_error(self, text: str) -> None:
        try:
            host, port = detect.parse_host_port(text)
        except ValueError:
            return
        self.assertTrue(1 <= port <= 65535)
        self.assertTrue(host)


class UsageTests(SynchronousTestCase):
    def test_bad_usage_is_2(self) -> None:
        for argv in ([], ["--stun"], ["--stun", "127.0.0.1:0"], ["--stun", "127.0.0.1", "--timeout", "0"],
                     ["--stun", "127.0.0.1", "--bogus"], ["--stun", "127.0.0.1", "--local", "x:y"]):
            code, out, err = run_quietly(argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("usage: natbypass detect", err)

    def test_help_is_0(self) -> None:
        code, out, _ = run_quietly(["--help"])
        self.assertEqual(code, 0)
        self.assertIn("--stun HOST[:PORT]", out)

    def test_defaults(self) -> None:
        args = parse("--stun", "127.0.0.1")
        self.assertEqual(args.stun, ("127.0.0.1", 3478))
        self.assertEqual((args.tcp, args.json, args.timeout, args.local), (False, False, 3.0, None))
        args = parse("--stun", "[::1]:9", "--tcp", "--json", "--local", "127.0.0.1", "--timeout", "1.5")
        self.assertEqual((args.stun, args.tcp, args.json, args.local, args.timeout),
                         (("::1", 9), True, True, ("127.0.0.1", 0), 1.5))


class OutputTests(SynchronousTestCase):
    def behavior(self, **kw) -> dv.NATBehavior:
        return FakeInternet(dv.ENDPOINT_INDEPENDENT, dv.ADDRESS_AND_PORT_DEPENDENT,
                            port_preserving=True).discover(**kw)

    def test_report(self) -> None:
        text = detect.format_report(self.behavior())
        self.assertIn("NAT type:        port-restricted-cone", text)
        self.assertIn("Mapping:         endpoint-independent", text)
        self.assertIn("Filtering:       address-and-port-dependent", text)
        self.assertIn("Public address:  198.51.100.7:40000", text)
        self.assertIn("Local address:   10.0.0.2:40000", text)
        self.assertIn("Port preserving: yes", text)
        self.assertIn("STUN server:     192.0.2.1:3478 (alternate 192.0.2.2:3479)", text)
        self.assertNotIn("TCP", text)

    def test_report_with_tcp_and_notes(self) -> None:
        b = FakeInternet(server_mode="single").discover(tcp_binder=FakeTCP(dv.ENDPOINT_INDEPENDENT, other=None))
        text = detect.format_report(b)
        self.assertIn("TCP mapping:     unknown", text)
        self.assertIn("Note: the server gave no OTHER-ADDRESS", text)
        self.assertEqual(text.count("OTHER-ADDRESS"), 1)  # the same note for TCP is not repeated
        self.assertIn("Port preserving: no", text)

    def test_json(self) -> None:
        b = FakeInternet(dv.ADDRESS_DEPENDENT, dv.ENDPOINT_INDEPENDENT).discover(
            tcp_binder=FakeTCP(dv.ENDPOINT_INDEPENDENT)
        )
        out = json.loads(detect.format_json(b))
        self.assertEqual(
            {k: out[k] for k in ("nat_type", "mapping", "filtering", "port_preserving", "tcp_mapping")},
            {"nat_type": "symmetric", "mapping": "address-dependent", "filtering": "endpoint-independent",
             "port_preserving": False, "tcp_mapping": "endpoint-independent"},
        )
        self.assertEqual(out["local_address"], "10.0.0.2:40000")
        self.assertRegex(out["public_address"], r"^198\.51\.100\.7:\d+$")
        self.assertIsInstance(out["elapsed_ms"], int)


class Silent(DatagramProtocol):
    """A UDP port that never answers: a server that is down, or UDP blocked."""

    def datagramReceived(self, data, addr) -> None:
        pass


class LoopbackTests(TestCase):
    """Whole detect runs on loopback, in this process, with the real reactor."""

    def responder(self, alternate: bool = True):
        if STUNService is None:
            raise self.skipTest(NO_RESPONDER)
        service = STUNService(
            reactor, ("127.0.0.1", 0), ("127.0.0.2", 0) if alternate else None, stats_interval=0
        )
        service.startService()
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
            {"nat_type": "open", "mapping": "none", "filtering": "none", "tcp_mapping": "none",
             "port_preserving": True},
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
        self.assertEqual((result["mapping"], result["filtering"], result["nat_type"]),
                         ("endpoint-independent", "endpoint-independent", "full-cone"))
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
        if STUNService is None:
            raise self.skipTest(NO_RESPONDER)
        try:
            service = STUNService(reactor, ("::1", 0), None, stats_interval=0)
            service.startService()
        except Exception as e:
            raise self.skipTest(f"no IPv6 loopback here: {e}")
        self.addCleanup(service.stopService)
        host, port = service.config.primary
        code, out, _ = yield self.detect("--stun", f"[{host}]:{port}", "--json", "--tcp")
        self.assertEqual(code, 0)
        result = json.loads(out)
        self.assertEqual((result["mapping"], result["tcp_mapping"], result["filtering"]),
                         ("none", "none", "unknown"))
        self.assertTrue(result["public_address"].startswith("[::1]:"))
        self.assertEqual(result["public_address"], result["local_address"])

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
        return getProcessOutputAndValue(sys.executable, ["-m", "natbypass", "detect", *argv],
                                        env=env, path=ROOT)

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
        if STUNService is None:
            raise self.skipTest(NO_RESPONDER)
        service = STUNService(reactor, ("127.0.0.1", 0), ("127.0.0.2", 0), stats_interval=0)
        service.startService()
        self.addCleanup(service.stopService)
        host, port = service.config.primary
        out, err, code = yield self.command("--stun", f"{host}:{port}", "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["nat_type"], "open")

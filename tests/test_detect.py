"""
Tests for natbypass.app.detect: argument parsing and output, in memory.
Whole runs on loopback are in tests/test_detect_loopback.py.
"""

from __future__ import annotations

import contextlib
import io
import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app import detect
from natbypass.nat import Mapping
from natbypass.stun import discovery as dv
from natbypass.testing.stun import FakeTCPBinder, MemoryInternet


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
        for bad in (
            "",
            ":3478",
            "127.0.0.1:",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "1.2.3.4:x",
            "[::1",
            "[::1]x",
            "[127.0.0.1]:1",
            "::g",
            "a..b",
            "-a.b",
            "a b:1",
            "127.0.0.1:+1",
            "127.0.0.1:١٢",
        ):
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
        for argv in (
            [],
            ["--stun"],
            ["--stun", "127.0.0.1:0"],
            ["--stun", "127.0.0.1", "--timeout", "0"],
            ["--stun", "127.0.0.1", "--bogus"],
            ["--stun", "127.0.0.1", "--local", "x:y"],
        ):
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
        self.assertEqual(
            (args.stun, args.tcp, args.json, args.local, args.timeout), (("::1", 9), True, True, ("127.0.0.1", 0), 1.5)
        )


class OutputTests(SynchronousTestCase):
    def behavior(self, **kw) -> dv.NATBehavior:
        return MemoryInternet(
            Mapping.ENDPOINT_INDEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT, port_preserving=True
        ).discover(**kw)

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
        b = MemoryInternet(server_mode="single").discover(
            tcp_binder=FakeTCPBinder(Mapping.ENDPOINT_INDEPENDENT, other=None)
        )
        text = detect.format_report(b)
        self.assertIn("TCP mapping:     unknown", text)
        self.assertIn("Note: the server gave no OTHER-ADDRESS", text)
        self.assertEqual(text.count("OTHER-ADDRESS"), 1)  # the same note for TCP is not repeated
        self.assertIn("Port preserving: no", text)

    def test_json(self) -> None:
        b = MemoryInternet(Mapping.ADDRESS_DEPENDENT, Mapping.ENDPOINT_INDEPENDENT).discover(
            tcp_binder=FakeTCPBinder(Mapping.ENDPOINT_INDEPENDENT)
        )
        out = json.loads(detect.format_json(b))
        self.assertEqual(
            {k: out[k] for k in ("nat_type", "mapping", "filtering", "port_preserving", "tcp_mapping")},
            {
                "nat_type": "symmetric",
                "mapping": "address-dependent",
                "filtering": "endpoint-independent",
                "port_preserving": False,
                "tcp_mapping": "endpoint-independent",
            },
        )
        self.assertEqual(out["local_address"], "10.0.0.2:40000")
        self.assertRegex(out["public_address"], r"^198\.51\.100\.7:\d+$")
        self.assertIsInstance(out["elapsed_ms"], int)


class PortMappingTests(SynchronousTestCase):
    """C{--port-mapping}: options, the probe through an injected PortMapper, the report."""

    def mapper(self, answers: dict):
        from twisted.internet import defer as _defer
        from twisted.internet.task import Clock

        from natbypass.portmap import MappingError, PortMapper, PortMapping

        clock = Clock()

        class Scripted:
            def __init__(self, method: str) -> None:
                self.method = method
                self.unmapped: list = []

            def map(self, protocol, internal_port, lifetime, previous=None):
                external = answers[self.method]
                if external is None:
                    return _defer.fail(MappingError(self.method, "no answer from 10.1.0.1 in 1.5 s"))
                return _defer.succeed(PortMapping(self.method, protocol, internal_port, external, lifetime))

            def unmap(self, mapping):
                self.unmapped.append(mapping)
                return _defer.succeed(None)

        clients = [Scripted(m) for m in answers]
        return PortMapper(clock, "10.1.0.1", clients=clients), clients

    def test_usage(self) -> None:
        args = parse("--port-mapping")
        self.assertEqual((args.stun, args.port_mapping, args.gateway), (None, True, None))
        self.assertEqual(parse("--stun", "127.0.0.1").port_mapping, False)  # off by default
        for argv in (["--port-mapping", "--gateway", "::1"], ["--port-mapping", "--gateway", "gw.example"], ["--json"]):
            code, _, err = run_quietly(argv)
            self.assertEqual(code, 2, argv)
        self.assertIn("--stun (or --port-mapping)", run_quietly(["--json"])[2])

    def test_probe_and_report(self) -> None:
        mapper, clients = self.mapper({"pcp": None, "natpmp": ("198.18.1.1", 40000), "upnp": ("198.18.1.1", 40001)})
        results = []
        detect._port_mapping(None, parse("--port-mapping"), 5000, mapper).addBoth(results.append)
        info = results[0]
        self.assertEqual(info["gateway"], "10.1.0.1")
        self.assertEqual(info["protocols"], ["natpmp", "upnp"])
        self.assertEqual(info["mapped_address"], "198.18.1.1:40000")
        self.assertEqual(info["results"]["pcp"], {"error": "no answer from 10.1.0.1 in 1.5 s"})
        self.assertEqual(info["results"]["upnp"]["external"], "198.18.1.1:40001")
        self.assertEqual([len(c.unmapped) for c in clients], [0, 1, 1])  # every probe mapping deleted
        text = detect.format_port_mapping(info)
        self.assertIn("Port mapping:    natpmp, upnp", text)
        self.assertIn("Mapped address:  198.18.1.1:40000", text)
        self.assertIn("pcp     no: no answer", text)
        self.assertIn("natpmp  udp port 5000 -> 198.18.1.1:40000", text)
        out = json.loads(detect.format_json(None, info))
        self.assertEqual(out["port_mapping"]["protocols"], ["natpmp", "upnp"])

    def test_nothing_answers(self) -> None:
        mapper, _ = self.mapper({"pcp": None, "natpmp": None, "upnp": None})
        results = []
        detect._port_mapping(None, parse("--port-mapping"), 5000, mapper).addBoth(results.append)
        self.assertEqual((results[0]["protocols"], results[0]["mapped_address"]), ([], None))
        self.assertIn("Port mapping:    none", detect.format_port_mapping(results[0]))

"""
Tests for natbypass.app.mediator_tap: option parsing and validation, the service tree
makeService builds (without starting it), and the twistd plugin lookup.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import IService, IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.app import mediator_tap as tap
from natbypass.stun.server import DEFAULT_BURST, DEFAULT_RATE, DEFAULT_SOFTWARE, STUNService


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class ParseHostPortTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(tap.parse_host_port("192.0.2.1:3478"), ("192.0.2.1", 3478))
        self.assertEqual(tap.parse_host_port(" 192.0.2.1:1 "), ("192.0.2.1", 1))
        self.assertEqual(tap.parse_host_port("[::1]:3478"), ("::1", 3478))
        self.assertEqual(tap.parse_host_port("192.0.2.1", 3479), ("192.0.2.1", 3479))
        self.assertEqual(tap.parse_host_port("[2001:db8::1]", 9), ("2001:db8::1", 9))
        self.assertEqual(tap.parse_host_port("2001:db8::1", 9), ("2001:db8::1", 9))

    def test_errors(self) -> None:
        for text in ["localhost:3478", "192.0.2.1:0", "192.0.2.1:65536", "192.0.2.1:x",
                     "192.0.2.1", "[::1", "[::1]x", "300.0.0.1:5", "",
                     "192.0.2.1:\u0663", "1.2.3.4\x00:5", "\ud800:5"]:  # fmt: skip
            with self.assertRaises(ValueError, msg=text):
                tap.parse_host_port(text)

    @given(st.ip_addresses(), st.integers(1, 65535))
    def test_round_trip(self, ip, port) -> None:
        text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        host, parsed_port = tap.parse_host_port(text)
        self.assertEqual((ipaddress.ip_address(host), parsed_port), (ip, port))

    @given(st.text(max_size=30))
    def test_arbitrary_text(self, text) -> None:
        try:
            host, port = tap.parse_host_port(text, 3478)
        except ValueError:
            return
        ipaddress.ip_address(host)
        self.assertTrue(1 <= port <= 65535)


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["stun-address"], ("0.0.0.0", 3478))
        self.assertIsNone(options["stun-alternate-address"])
        self.assertEqual(options["stun-rate"], DEFAULT_RATE)
        self.assertEqual(options["stun-burst"], DEFAULT_BURST)
        self.assertEqual(options["software"], DEFAULT_SOFTWARE)
        self.assertEqual(options["signal"], "tcp:7000")

    def test_all_stun_options(self) -> None:
        options = parse(
            "--stun", "127.0.0.1:3478", "--stun-alternate", "127.0.0.2:3479",
            "--stun-rate", "50", "--software", "mediator",
        )  # fmt: skip
        self.assertEqual(options["stun-address"], ("127.0.0.1", 3478))
        self.assertEqual(options["stun-alternate-address"], ("127.0.0.2", 3479))
        self.assertEqual(options["stun-rate"], 50)
        self.assertEqual(options["software"], "mediator")

    def test_alternate_port_defaults_to_next(self) -> None:
        options = parse("--stun", "127.0.0.1:5000", "--stun-alternate", "127.0.0.2")
        self.assertEqual(options["stun-alternate-address"], ("127.0.0.2", 5001))

    def test_ipv6(self) -> None:
        options = parse("--stun", "[::1]:3478")
        self.assertEqual(options["stun-address"], ("::1", 3478))

    def test_errors(self) -> None:
        cases = {
            ("--stun", "example.org:3478"): "--stun: 'example.org' is not an IP address",
            ("--stun", "127.0.0.1:99999"): "--stun: '127.0.0.1:99999': the port must be",
            ("--stun-alternate", "127.0.0.2:3479"): "needs --stun with a specific IP",
            ("--stun", "127.0.0.1:3478", "--stun-alternate", "127.0.0.1:3479"):
                "the alternate IP must differ",
            ("--stun", "127.0.0.1:3478", "--stun-alternate", "127.0.0.2:3478"):
                "the alternate port must differ",
            ("--stun", "127.0.0.1:65535", "--stun-alternate", "127.0.0.2"): "a port is needed",
            ("--stun", "127.0.0.1:3478", "--stun-alternate", "[::2]:3479"): "same IP family",
            ("--stun-rate", "-1",): "--stun-rate must be 0",
            ("--software", "x" * 200,): "--software: at most 64 bytes of UTF-8, not 200",
        }  # fmt: skip
        for argv, message in cases.items():
            with self.assertRaises(usage.UsageError, msg=argv) as caught:
                parse(*argv)
            self.assertIn(message, str(caught.exception), argv)

    def test_signalling_options_merged_and_checked(self) -> None:
        self.assertEqual(parse("--signal", "tcp:7001")["signal"], "tcp:7001")
        self.assertRaises(usage.UsageError, parse, "--max-line", "10")


class MakeServiceTests(SynchronousTestCase):
    def test_tree(self) -> None:
        reactor = MemoryReactorClock()
        options = parse("--stun", "127.0.0.1:3478", "--stun-alternate", "127.0.0.2",
                        "--stun-rate", "7", "--signal", "tcp:7001")  # fmt: skip
        top = tap.makeService(options, reactor)
        self.assertTrue(verifyObject(IServiceCollection, top))
        stun = top.getServiceNamed("stun")
        signal = top.getServiceNamed("signal")
        self.assertIsInstance(stun, STUNService)
        self.assertTrue(verifyObject(IService, stun))
        self.assertTrue(verifyObject(IService, signal))
        self.assertFalse(stun.running)
        self.assertIsNone(stun.config)  # nothing bound before startService
        self.assertEqual(stun.server.limiter.rate, 7)
        self.assertEqual(reactor.tcpServers, [])

    def test_rate_limit_by_default(self) -> None:
        top = tap.makeService(parse(), MemoryReactorClock())
        limiter = top.getServiceNamed("stun").server.limiter
        self.assertEqual((limiter.rate, limiter.burst), (DEFAULT_RATE, DEFAULT_BURST))

    def test_no_rate_limit_on_request(self) -> None:
        top = tap.makeService(parse("--stun-rate", "0"), MemoryReactorClock())
        self.assertIsNone(top.getServiceNamed("stun").server.limiter)


class WorkersAndAdvertiseOptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = parse()
        self.assertEqual(options["stun-workers"], 1)
        self.assertEqual(options["stun-advertise"], ())

    def test_advertise_repeatable(self) -> None:
        options = parse("--stun", "10.0.0.2:3478", "--stun-alternate", "10.0.0.3",
                        "--stun-advertise", "203.0.113.5=10.0.0.2",
                        "--stun-advertise", " 203.0.113.6 = 10.0.0.3 ")  # fmt: skip
        self.assertEqual(options["stun-advertise"], (("203.0.113.5", "10.0.0.2"), ("203.0.113.6", "10.0.0.3")))

    def test_errors(self) -> None:
        cases = {
            ("--stun-workers", "0"): "--stun-workers must be at least 1",
            ("--stun-workers", "1000"): "--stun-workers: at most",
            ("--stun-advertise", "203.0.113.5"): "expected PUBLIC=LOCAL",
            ("--stun-advertise", "203.0.113.5:3478=10.0.0.2"): "is not an IP address",
            ("--stun-advertise", "example.com=10.0.0.2"): "is not an IP address",
            ("--stun", "10.0.0.2:3478", "--stun-advertise", "203.0.113.5=10.0.0.9"):
                "10.0.0.9 is not an address the responder binds",
        }  # fmt: skip
        for argv, message in cases.items():
            with self.assertRaises(usage.UsageError, msg=argv) as caught:
                parse(*argv)
            self.assertIn(message, str(caught.exception), argv)

    @given(st.ip_addresses(), st.ip_addresses())
    def test_parse_advertise_round_trip(self, public, local) -> None:
        text = f"{public}={local}" if public.version == 4 else f"[{public}]={local}"
        self.assertEqual(tap.parse_advertise(text), (str(public), str(local)))

    @given(st.text(max_size=40))
    def test_parse_advertise_any_text(self, text) -> None:
        """Any text gives two IP addresses or ValueError, never another exception."""
        try:
            public, local = tap.parse_advertise(text)
        except ValueError:
            return
        ipaddress.ip_address(public)
        ipaddress.ip_address(local)

    def test_workers_service(self) -> None:
        from natbypass.stun.worker import STUNWorkers

        reactor = MemoryReactorClock()
        options = parse("--stun", "10.0.0.2:3478", "--stun-workers", "3", "--stun-global-rate", "300",
                        "--stun-advertise", "203.0.113.5=10.0.0.2")  # fmt: skip
        stun = tap.makeService(options, reactor).getServiceNamed("stun")
        self.assertIsInstance(stun, STUNWorkers)
        self.assertTrue(verifyObject(IService, stun))
        self.assertEqual(stun.workers, 3)
        self.assertFalse(stun.running)
        self.assertEqual(reactor.tcpServers, [])
        self.assertIsNone(stun.config)

    def test_one_worker_is_this_process(self) -> None:
        stun = tap.makeService(parse("--stun-workers", "1"), MemoryReactorClock()).getServiceNamed("stun")
        self.assertIsInstance(stun, STUNService)


class PluginTests(SynchronousTestCase):
    def test_plugin_points_here(self) -> None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins

        import twisted.plugins

        makers = {p.tapname: p for p in getPlugins(IServiceMaker, twisted.plugins)}
        mediator = makers["natbypass-mediator"]
        self.assertIsInstance(mediator.options(), tap.Options)


class IPv6ResponderOptionTests(SynchronousTestCase):
    """C{--stun6}/C{--stun6-alternate}: a second responder, on IPv6, beside the IPv4 one (dual stack)."""

    def test_off_by_default(self) -> None:
        options = parse()
        self.assertIsNone(options["stun6-address"])
        self.assertIsNone(options["stun6-alternate-address"])
        self.assertRaises(KeyError, tap.makeService(options, MemoryReactorClock()).getServiceNamed, "stun6")

    def test_dual_stack_rfc5780(self) -> None:
        options = parse(
            "--stun", "198.18.0.2:3478", "--stun-alternate", "198.18.0.3:3479",
            "--stun6", "[2001:2::2]:3478", "--stun6-alternate", "[2001:2::3]",
        )  # fmt: skip
        self.assertEqual(options["stun6-address"], ("2001:2::2", 3478))
        self.assertEqual(options["stun6-alternate-address"], ("2001:2::3", 3479))
        top = tap.makeService(options, MemoryReactorClock())
        stun6 = top.getServiceNamed("stun6")
        self.assertIsInstance(stun6, STUNService)
        self.assertTrue(verifyObject(IService, stun6))
        self.assertIsNot(stun6, top.getServiceNamed("stun"))

    def test_advertise_split_by_family(self) -> None:
        """Each responder gets the C{--stun-advertise} pairs of its own family."""
        options = parse(
            "--stun", "10.0.0.2:3478", "--stun-alternate", "10.0.0.3",
            "--stun6", "[fd00::2]:3478", "--stun6-alternate", "[fd00::3]",
            "--stun-advertise", "203.0.113.5=10.0.0.2", "--stun-advertise", "2001:db8::5=fd00::2",
        )  # fmt: skip
        self.assertEqual(options["stun-advertise"], (("203.0.113.5", "10.0.0.2"),))
        self.assertEqual(options["stun6-advertise"], (("2001:db8::5", "fd00::2"),))

    def test_errors(self) -> None:
        cases = {
            ("--stun6", "127.0.0.1:3478"): "--stun6: needs an IPv6 address",
            ("--stun6", "[::]:3478", "--stun6-alternate", "[::3]"): "needs --stun6 with a specific IP",
            ("--stun6-alternate", "[::3]"): "--stun6-alternate needs --stun6",
            ("--stun6", "[::2]:3478", "--stun6-alternate", "[::2]:3479"): "the alternate IP must differ",
            ("--stun6", "[::2]:3478", "--stun-workers", "2"): "--stun6 with --stun-workers",
        }  # fmt: skip
        for argv, message in cases.items():
            with self.assertRaises(usage.UsageError, msg=argv) as caught:
                parse(*argv)
            self.assertIn(message, str(caught.exception), argv)

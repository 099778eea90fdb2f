"""
Tests for natbypass.app.cli (the dispatcher) and natbypass.app.run
(C{natbypass mediator} / C{natbypass peer}: a twistd plugin's service in the
foreground).  No sockets: the services run on an in-memory reactor.
"""

from __future__ import annotations

import importlib
import io

from twisted.application.service import IServiceMaker, Service
from twisted.internet.error import CannotListenError
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app import cli, mediator_tap, peer_tap
from natbypass.app import run as runner
from natbypass.stun.server import STUNService
from natbypass.testing.udp import MemoryUDPReactor

# Not the mediator's defaults (3478, 7000): nothing here binds, but keep clear of them anyway.
STUN, SIGNAL_PORT = ("127.0.0.1", 23478), 27001
MEDIATOR_ARGS = ["--stun", f"{STUN[0]}:{STUN[1]}", "--signal", f"tcp:{SIGNAL_PORT}:interface=127.0.0.1"]


def fire_shutdown(reactor: MemoryUDPReactor) -> list[object]:
    """Run the reactor's "before shutdown" triggers, as reactor.stop() after a signal does."""
    return [f(*a, **kw) for f, a, kw in reactor.triggers.get("before", {}).get("shutdown", [])]


def run(name: str, *argv: str, reactor: MemoryUDPReactor | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = runner.run(
        name, list(argv), reactor=reactor if reactor is not None else MemoryUDPReactor(), out=out, err=err
    )
    return code, out.getvalue(), err.getvalue()


class DispatchTests(SynchronousTestCase):
    def test_every_subcommand_resolves(self) -> None:
        """Each entry names an importable module and a callable (C{run} unless C{module:function})."""
        for name, (target, help_) in cli.SUBCOMMANDS.items():
            module_name, _, function = target.partition(":")
            self.assertTrue(callable(getattr(importlib.import_module(module_name), function or "run")), name)
            self.assertIn(name, cli.USAGE)
            self.assertIn(help_, cli.USAGE)

    def test_mediator_and_peer_listed(self) -> None:
        self.assertEqual(cli.SUBCOMMANDS["mediator"][0], "natbypass.app.run:mediator")
        self.assertEqual(cli.SUBCOMMANDS["peer"][0], "natbypass.app.run:peer")


class SamePluginTests(SynchronousTestCase):
    def test_the_twistd_plugins_modules(self) -> None:
        """C{natbypass NAME} uses the module the twistd plugin's ServiceMaker names."""
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        for name, (tapname, module_name) in runner.PLUGINS.items():
            self.assertIn(tapname, makers, name)
            self.assertEqual(makers[tapname].module, module_name, name)

    def test_options_are_the_plugins(self) -> None:
        for name, module in (("mediator", mediator_tap), ("peer", peer_tap)):
            options = runner.command_options(name, io.StringIO())
            self.assertIsInstance(options, module.Options)
            self.assertIs(type(options).optParameters, module.Options.optParameters)


class HelpAndUsageTests(SynchronousTestCase):
    def test_mediator_help_shows_the_plugin_options(self) -> None:
        code, out, err = run("mediator", "--help")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Usage: natbypass mediator [options]", out)
        self.assertIn("twistd -n natbypass-mediator", out)
        for long_name, *_ in mediator_tap.Options.optParameters:
            self.assertIn(f"--{long_name}=", out)
        self.assertIn(mediator_tap.Options.longdesc[:40], out)

    def test_short_help_and_peer(self) -> None:
        code, out, _ = run("peer", "-h")
        self.assertEqual(code, 0)
        self.assertIn("Usage: natbypass peer --mediator ENDPOINT --id NAME", out)
        for long_name, *_ in peer_tap.Options.optParameters:
            self.assertIn(f"--{long_name}=", out)

    def test_usage_error(self) -> None:
        reactor = MemoryUDPReactor()
        code, out, err = run("mediator", "--stun", "example.org:3478", reactor=reactor)
        self.assertEqual((code, out), (runner.EXIT_USAGE, ""))
        self.assertIn("natbypass mediator: --stun: 'example.org' is not an IP address", err)
        self.assertIn("natbypass mediator --help", err)
        self.assertFalse(reactor.hasRun)

    def test_peer_needs_mediator(self) -> None:
        code, _, err = run("peer")
        self.assertEqual(code, runner.EXIT_USAGE)
        self.assertIn("--mediator ENDPOINT is required", err)


class ServeTests(SynchronousTestCase):
    def test_mediator_starts_and_stops(self) -> None:
        reactor = MemoryUDPReactor()
        code, out, err = run("mediator", *MEDIATOR_ARGS, reactor=reactor)
        self.assertEqual((code, out, err), (0, "", ""))
        self.assertTrue(reactor.hasRun)
        self.assertTrue(reactor.udp[STUN].listening)
        self.assertTrue(reactor.tcp[STUN].listening)
        self.assertIn(SIGNAL_PORT, [port for port, *_ in reactor.tcpServers])
        fire_shutdown(reactor)  # what SIGINT / SIGTERM lead to
        self.assertEqual(reactor.open_udp_ports(), [])
        self.assertFalse(reactor.tcp[STUN].listening)

    def test_cannot_start(self) -> None:
        """A port in use: the failure is logged, the reactor stops, the status is 1."""
        reactor = MemoryUDPReactor()
        reactor.taken.add(("udp", *STUN))
        code, _, _ = run("mediator", *MEDIATOR_ARGS, reactor=reactor)
        self.assertEqual(code, runner.EXIT_CANNOT_START)
        self.assertTrue(reactor.hasStopped)
        self.assertTrue(self.flushLoggedErrors(CannotListenError))
        self.assertEqual(fire_shutdown(reactor), [None])  # nothing running: nothing to stop

    def test_serve_order(self) -> None:
        events: list[str] = []

        class Recorder(Service):
            def startService(self) -> None:
                events.append("start")
                super().startService()

            def stopService(self) -> None:
                events.append("stop")
                return super().stopService()

        reactor = MemoryUDPReactor()
        service = Recorder()
        self.assertEqual(runner.serve(service, reactor), 0)
        self.assertEqual(events, ["start"])
        fire_shutdown(reactor)
        self.assertEqual(events, ["start", "stop"])
        self.assertFalse(service.running)

    def test_stun_service_is_the_plugins(self) -> None:
        """The service tree is makeService's: STUN as C{stun} and signalling as C{signal}."""
        reactor = MemoryUDPReactor()
        options = runner.parse("mediator", MEDIATOR_ARGS, io.StringIO(), io.StringIO())
        assert not isinstance(options, int)
        top = mediator_tap.makeService(options, reactor)
        self.assertIsInstance(top.getServiceNamed("stun"), STUNService)

"""
Interoperability: C{natbypass detect} against coturn's C{turnserver}
(an RFC 5780 STUN server on two loopback addresses) gives the same answer
as against our own responder (C{twistd natbypass-mediator}) on the same
two addresses.

Both servers run as real processes, started as a user would start them.
Skipped when C{turnserver} is not installed.  Everything stays on
127.0.0.1 and 127.0.0.2.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import sys

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from natbypass.app import detect
from natbypass.stun.client import (
    RetransmitPolicy,
    StunTimeout,
    StunUDPProtocol,
    binding_request,
    tcp_binding,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMARY_IP, ALTERNATE_IP = "127.0.0.1", "127.0.0.2"
TURNSERVER = shutil.which("turnserver")

#: What must agree between the two servers.
COMPARED = ("nat_type", "mapping", "filtering", "port_preserving", "tcp_mapping")


class Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.running = False
        self.ended.callback(None)


class InteropDetectTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def start(self, argv: list[str], port: int):
        """Run C{argv} until it answers STUN on 127.0.0.1:C{port}; False if it never does."""
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        proto = Collect()
        env = dict(os.environ, PYTHONPATH=ROOT)
        transport = reactor.spawnProcess(proto, argv[0], argv, env=env, path=tmp)

        @defer.inlineCallbacks
        def stop():
            if proto.running:
                transport.signalProcess("TERM")
                yield proto.ended

        self.addCleanup(stop)
        probe = StunUDPProtocol(reactor, RetransmitPolicy.within(0.3, rto=0.1))
        listening = reactor.listenUDP(0, probe, interface=PRIMARY_IP)
        try:
            for _ in range(40):
                if not proto.running:
                    break
                try:
                    yield probe.request(binding_request(), (PRIMARY_IP, port))
                    return True
                except StunTimeout:
                    yield deferLater(reactor, 0.1, lambda: None)
        finally:
            yield listening.stopListening()
        yield stop()
        self.log_output = proto.output.decode(errors="replace")[-2000:]
        return False

    @defer.inlineCallbacks
    def start_on_free_ports(self, make_argv):
        """Servers need known port numbers: try a few random pairs."""
        for _ in range(5):
            port = random.randrange(20000, 40000, 2)
            if (yield self.start(make_argv(port), port)):
                return port
        self.fail(f"server did not come up: {make_argv(0)}\n{self.log_output}")

    @defer.inlineCallbacks
    def detect_json(self, port: int, *extra: str):
        out, err = io.StringIO(), io.StringIO()
        args = detect.build_parser().parse_args(["--stun", f"{PRIMARY_IP}:{port}", "--json", "--tcp", *extra])
        code = yield detect.detect(reactor, args, out, err)
        self.assertEqual(code, 0, err.getvalue())
        return json.loads(out.getvalue())

    def summary(self, result: dict) -> dict:
        return {
            **{k: result[k] for k in COMPARED},
            "answered": [(t["name"], t["answered"]) for t in result["tests"]],
            "tcp_answered": [(t["name"], t["answered"]) for t in result["tcp_tests"]],
            "other_ip": result["other_address"].rsplit(":", 1)[0],
        }

    @defer.inlineCallbacks
    def test_same_answer_as_coturn(self) -> None:
        if TURNSERVER is None:
            raise self.skipTest("coturn's turnserver is not installed (apt-get install coturn)")

        def coturn(port: int) -> list[str]:
            return [
                TURNSERVER,
                "--stun-only",
                "-n",
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "-L",
                PRIMARY_IP,
                "-L",
                ALTERNATE_IP,
                "--listening-port",
                str(port),
                "--alt-listening-port",
                str(port + 1),
                "--log-file",
                "stdout",
                "--simple-log",
                "--pidfile",
                "turnserver.pid",
                "--no-software-attribute",
            ]

        def ours(port: int) -> list[str]:
            return [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "--logfile=-",
                "natbypass-mediator",
                "--stun",
                f"{PRIMARY_IP}:{port}",
                "--stun-alternate",
                f"{ALTERNATE_IP}:{port + 1}",
                "--signal",
                f"tcp:0:interface={PRIMARY_IP}",
                "--status-interval",
                "0",
            ]

        coturn_port = yield self.start_on_free_ports(coturn)
        ours_port = yield self.start_on_free_ports(ours)
        results = {}
        for name, port in (("coturn", coturn_port), ("natbypass", ours_port)):
            # As it is: no NAT on loopback.  Bound to the wildcard: "no NAT"
            # cannot be seen, so every test runs, answers from the alternate
            # address included.
            results[name] = (
                (yield self.detect_json(port)),
                (yield self.detect_json(port, "--local", "0.0.0.0")),
            )
            # The TCP mapping tests from one local port to all three addresses
            # (detect skips the last two on loopback, where there is no NAT).
            other = results[name][0]["other_address"].rsplit(":", 1)
            first = yield tcp_binding(reactor, (PRIMARY_IP, port), (PRIMARY_IP, 0))
            for remote in ((other[0], port), (other[0], int(other[1]))):
                more = yield tcp_binding(reactor, remote, first.local)
                self.assertEqual((more.local, more.mapped), (first.local, first.local), name)
        (c_plain, c_all), (o_plain, o_all) = results["coturn"], results["natbypass"]
        self.assertEqual(self.summary(o_plain), self.summary(c_plain))
        self.assertEqual(self.summary(o_all), self.summary(c_all))
        # And the answers are the right ones.
        self.assertEqual((c_plain["nat_type"], c_plain["mapping"], c_plain["filtering"]), ("open", "none", "none"))
        self.assertEqual(
            (c_all["nat_type"], c_all["mapping"], c_all["filtering"]),
            ("full-cone", "endpoint-independent", "endpoint-independent"),
        )
        self.assertEqual(len(c_all["tests"]), 5)
        self.assertTrue(all(t["answered"] for t in c_all["tests"] + o_all["tests"]))

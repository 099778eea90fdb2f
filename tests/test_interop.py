"""
Interoperability: third-party STUN clients against our responder, run
in-process on 127.0.0.1 and 127.0.0.2 (RFC 5780: both IPs x both ports, the
ports chosen by the kernel when the sockets are bound).

The tools come from Debian (coturn's turnutils_stunclient and
turnutils_natdiscovery; stun-client's C{stun}) and PyPI (pystun3); each test
is skipped, saying which package to install, when its tool is missing.  On
loopback there is no NAT, so each tool must report exactly that.  Last,
C{natbypass detect} must say the same through coturn's turnserver as
through our responder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from natbypass.stun import message as m
from natbypass.stun.server import STUNService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Every tool run is bounded, so a client that waits forever cannot hang CI.
TOOL_TIMEOUT = "30"


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SkipTest(f"{tool} not installed (apt-get install {package})")
    return path


def _can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def run(tool: str, *args: str):
    """Run C{tool} (bounded by coreutils timeout); Deferred of (output, code)."""
    d = getProcessOutputAndValue(shutil.which("timeout") or "timeout", (TOOL_TIMEOUT, tool, *args), reactor=reactor)
    return d.addCallback(lambda r: ((r[0] + r[1]).decode("utf-8", "replace"), r[2]))


class _Responder(TestCase):
    """Our responder on 127.0.0.1 (+ 127.0.0.2 when RFC5780 is set)."""

    RFC5780 = True

    def setUp(self) -> None:
        if self.RFC5780 and not _can_bind("127.0.0.2"):
            raise SkipTest("cannot bind 127.0.0.2 (needs a Linux-style 127/8 loopback)")
        alternate = ("127.0.0.2", 0) if self.RFC5780 else None
        self.service = STUNService(reactor, ("127.0.0.1", 0), alternate, stats_interval=0)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.host, self.port = self.service.config.primary
        if self.RFC5780:
            self.alt_host, self.alt_port = self.service.config.alternate


class RFC5780InteropTests(_Responder):
    @inlineCallbacks
    def test_turnutils_stunclient(self):
        tool = _need("turnutils_stunclient", "coturn")
        out, code = yield run(tool, "-p", str(self.port), self.host)
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"UDP reflexive addr: 127\.0\.0\.1:\d+")

    @inlineCallbacks
    def test_turnutils_stunclient_rfc5780(self):
        """-f: three requests, the last two with CHANGE-REQUEST (IP and port)."""
        tool = _need("turnutils_stunclient", "coturn")
        out, code = yield run(tool, "-f", "-p", str(self.port), self.host)
        self.assertEqual(code, 0, out)
        primary = f"{self.host}:{self.port}"
        other = f"{self.alt_host}:{self.alt_port}"
        for n in (1, 2, 3):
            self.assertIn(f"RFC 5780 response {n}", out)
        self.assertIn(f"Response origin: : {primary}", out)
        self.assertIn(f"Response origin: : {other}", out)  # the changed responses
        self.assertIn(f"Other addr: : {other}", out)
        self.assertEqual(self.service.counters.malformed, 0)

    @inlineCallbacks
    def test_turnutils_natdiscovery(self):
        """No NAT on loopback: endpoint-independent mapping and filtering."""
        tool = _need("turnutils_natdiscovery", "coturn")
        out, code = yield run(tool, "-m", "-f", "-p", str(self.port), self.host)
        self.assertEqual(code, 0, out)
        self.assertIn("NAT with Endpoint Independent Mapping!", out)
        self.assertIn("NAT with Endpoint Independent Filtering!", out)
        self.assertIn("No ALG: Mapped == XOR-Mapped", out)

    @inlineCallbacks
    def test_stun_client_rfc3489(self):
        """The RFC 3489 client runs its tests I, II, III and reports an open host."""
        tool = _need("stun", "stun-client")
        out, code = yield run(tool, f"{self.host}:{self.port}", "-v")
        self.assertIn("Primary: Open", out)
        self.assertIn(f"ChangedAddress = {self.alt_host}:{self.alt_port}", out)
        for test in ("test I = 1", "test II = 1", "test III = 1", "test I(2) = 1"):
            self.assertIn(test, out)
        self.assertRegex(out, r"Return value is 0x0+1\b")

    @inlineCallbacks
    def test_pystun3(self):
        """pystun3 (RFC 3489 classic algorithm) says "Open Internet"."""
        if importlib.util.find_spec("stun") is None:
            raise SkipTest("pystun3 (a third-party STUN client) is not installed (pip install pystun3)")
        import stun as pystun3

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2)
        # pystun3 blocks on its socket: run it in a thread so the reactor answers.
        nat_type, result = yield deferToThread(
            pystun3.get_nat_type, sock, "127.0.0.1", sock.getsockname()[1],
            stun_host=self.host, stun_port=self.port,
        )  # fmt: skip
        self.assertEqual(nat_type, pystun3.OpenInternet)
        self.assertEqual(result["ExternalIP"], "127.0.0.1")


class PlainInteropTests(_Responder):
    """Without a second address: plain RFC 8489, and clients can tell."""

    RFC5780 = False

    @inlineCallbacks
    def test_turnutils_stunclient(self):
        tool = _need("turnutils_stunclient", "coturn")
        out, code = yield run(tool, "-p", str(self.port), self.host)
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"UDP reflexive addr: 127\.0\.0\.1:\d+")
        self.assertNotIn("Other addr", out)


def _stun_probe(server: tuple[str, int], timeout: float = 0.3) -> m.Message | None:
    """One blocking Binding request (setup only); the decoded answer or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(m.Message(1, 0, os.urandom(12)).encode(fingerprint=True), server)
            return m.decode(s.recv(2048))
        except (OSError, m.StunDecodeError):
            return None


class DetectAgainstCoturnTests(_Responder):
    """
    C{natbypass detect} reports the same behaviour through coturn's
    turnserver as through ours (on loopback: no NAT at all).
    """

    def _start_coturn(self) -> tuple[str, int]:
        turnserver = _need("turnserver", "coturn")
        rng = random.Random()
        for _ in range(5):
            # Below the ephemeral range, so no client socket holds the port.
            port = rng.randrange(20000, 30000, 2)
            proc = subprocess.Popen(
                [turnserver, "--stun-only", "-L", "127.0.0.1", "-L", "127.0.0.2",
                 "--listening-port", str(port), "--alt-listening-port", str(port + 1),
                 "--no-cli", "--no-tls", "--no-dtls", "-n", "--log-file", "stdout",
                 "--no-stdout-log"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 5
            answer = None
            while answer is None and time.monotonic() < deadline and proc.poll() is None:
                answer = _stun_probe(("127.0.0.1", port))
            other = answer.get(m.OtherAddress) if answer is not None else None
            if other is not None and other.address == ("127.0.0.2", port + 1) and _stun_probe(("127.0.0.2", port + 1)):
                self.addCleanup(self._stop, proc)
                return ("127.0.0.1", port)
            self._stop(proc)
        raise SkipTest("could not start coturn's turnserver on free loopback ports")

    @staticmethod
    def _stop(proc: subprocess.Popen) -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @inlineCallbacks
    def test_same_report(self):
        coturn = self._start_coturn()
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        reports = {}
        for name, (host, port) in (("ours", (self.host, self.port)), ("coturn", coturn)):
            out, err, code = yield getProcessOutputAndValue(
                sys.executable,
                ("-m", "natbypass", "detect", "--stun", f"{host}:{port}", "--json", "--tcp"),
                env=env, reactor=reactor,
            )  # fmt: skip
            self.assertEqual(code, 0, err)
            reports[name] = json.loads(out)
        keys = ("reachable", "nat_type", "mapping", "filtering", "port_preserving", "tcp_mapping")
        summary = {name: {k: r.get(k) for k in keys} for name, r in reports.items()}
        self.assertEqual(summary["ours"], summary["coturn"])
        self.assertEqual(summary["ours"]["nat_type"], "open")
        for name, report in reports.items():
            self.assertEqual(report["public_address"], report["local_address"], name)
            self.assertEqual(
                [(t["name"], t["answered"]) for t in report["tests"]],
                [(t["name"], t["answered"]) for t in reports["coturn"]["tests"]],
            )

"""
The traversal engines across real nftables NATs (the NAT lab), without the
signalling layer: each side learns its mapping by STUN from the lab mediator,
the two swap mappings through a shared directory, and punch at an agreed
time (``natbypass.punch.labpeer``).  Port prediction is switched on exactly
where ``select.feasibility`` asks for it.

Needs root, ``ip`` and ``nft``; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab.netns import missing_requirements
from natbypass.punch.select import APD, EI, NatSummary, feasibility

SKIP = missing_requirements()
STUN = "198.18.0.2:3478"
DELAY_MS = 25

#: lab preset -> what discovery would report (the lab's own tests check that it does).
PRESET_SUMMARY = {
    "full-cone": NatSummary(EI, EI, True),
    "restricted-cone": NatSummary(EI, "address-dependent", True),
    "port-restricted-cone": NatSummary(EI, APD, True),
    "symmetric-predictable": NatSummary(APD, APD, False, port_delta=1),
    "symmetric-random": NatSummary(APD, APD, False),
}
SITES = {
    "fc": "full-cone",
    "rc": "restricted-cone",
    "prc": "port-restricted-cone",
    "prc2": "port-restricted-cone",
    "symp": "symmetric-predictable",
    "symp2": "symmetric-predictable",
    "symr": "symmetric-random",
}


class EngineLabTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def start_lab(self, a: str, b: str):
        """A lab with just the two sites (each test gets fresh NATs: no stale mappings)."""
        from natbypass.lab.interop import start_mediator
        from natbypass.lab.lab import Lab

        spec = {"sites": {name: {"nat": SITES[name], "delay_ms": DELAY_MS} for name in (a, b)}}
        lab = Lab.start(spec)
        self.addCleanup(lab.stop)
        start_mediator(lab)
        return lab

    def pair(self, a: str, b: str, protocol: str, timeout: float = 3.0) -> tuple[dict, dict]:
        """Punch between the first hosts of sites ``a`` (role 0) and ``b`` (role 1)."""
        lab = self.start_lab(a, b)
        sa, sb = PRESET_SUMMARY[SITES[a]], PRESET_SUMMARY[SITES[b]]
        row_a, row_b = feasibility(sa, sb, protocol), feasibility(sb, sa, protocol)
        rendezvous = tempfile.mkdtemp(prefix="natbypass-labpeer-")
        start_at = time.time() + 2.0
        procs = []
        for name, peer, role, row in ((a, b, 0, row_a), (b, a, 1, row_b)):
            argv = [
                sys.executable, "-m", "natbypass.punch.labpeer", "--name", name, "--peer", peer,
                "--role", str(role), "--dir", rendezvous, "--stun", STUN, "--protocol", protocol,
                "--start-at", str(start_at), "--timeout", str(timeout),
            ]
            if row.predict_remote_delta:
                argv += ["--predict-delta", str(row.predict_remote_delta)]
            procs.append(lab.spawn(name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=30 + timeout)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            self.assertTrue(lines, f"no result (exit {p.returncode}): {stderr[-1500:]}")
            out.append(json.loads(lines[-1]))
        return out[0], out[1]

    def assertConnected(self, a: str, b: str, protocol: str) -> None:
        ra, rb = self.pair(a, b, protocol)
        self.assertTrue(ra["ok"] and rb["ok"], (ra, rb))
        self.assertEqual((ra["echo"], rb["echo"]), ("echo?", "echo?"))
        # Each side sees the other's public (NAT) address, not a private one.
        self.assertTrue(ra["remote"][0].startswith("198.18.1."), ra)
        self.assertTrue(rb["remote"][0].startswith("198.18.1."), rb)
        print(f"\n{protocol} {a} x {b}: connected in {ra['connect_ms']} / {rb['connect_ms']} ms after the start")

    def assertFailsClearly(self, a: str, b: str, protocol: str) -> None:
        ra, rb = self.pair(a, b, protocol, timeout=2.0)
        self.assertFalse(ra["ok"] or rb["ok"], (ra, rb))
        for r in (ra, rb):
            self.assertIn("within 2 s", r["reason"])

    # -- UDP

    def test_udp_port_restricted_pair(self) -> None:
        self.assertConnected("prc", "prc2", "udp")

    def test_udp_full_cone_vs_symmetric(self) -> None:
        self.assertConnected("fc", "symr", "udp")

    def test_udp_restricted_vs_symmetric(self) -> None:
        self.assertConnected("rc", "symr", "udp")

    def test_udp_port_restricted_vs_predictable_symmetric(self) -> None:
        """Needs port prediction: the port-restricted side probes mapped+1..+8."""
        self.assertConnected("prc", "symp", "udp")

    def test_udp_predictable_symmetric_pair(self) -> None:
        self.assertConnected("symp", "symp2", "udp")

    def test_udp_port_restricted_vs_random_symmetric_fails(self) -> None:
        self.assertFailsClearly("prc", "symr", "udp")

    # -- TCP

    def test_tcp_port_restricted_pair(self) -> None:
        self.assertConnected("prc", "prc2", "tcp")

    def test_tcp_full_cone_vs_symmetric(self) -> None:
        self.assertConnected("fc", "symr", "tcp")

    def test_tcp_port_restricted_vs_predictable_symmetric(self) -> None:
        self.assertConnected("prc", "symp", "tcp")

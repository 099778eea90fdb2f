"""
The traversal engines across real nftables NATs (the NAT lab), without the
signalling layer: each side learns its mapping by STUN from the lab mediator,
the two swap mappings through a shared directory, and punch at an agreed
time (C{natbypass.lab.enginepeer}).  Port prediction is switched on exactly
where C{select.feasibility} asks for it.  The full 6x6 matrix is
C{python3 -m natbypass.lab.enginematrix}; these are the cases that matter most.

Needs root, C{ip} and C{nft}; skipped with the reason otherwise.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab.enginematrix import run_pair, site_spec
from natbypass.lab.netns import missing_requirements

SKIP = missing_requirements()
DELAY_MS = 25
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

        spec = {"sites": {name: site_spec(SITES[name], DELAY_MS) for name in (a, b)}}
        lab = Lab.start(spec)
        self.addCleanup(lab.stop)
        start_mediator(lab)
        return lab

    def pair(self, a: str, b: str, protocol: str, timeout: float = 3.0) -> tuple[dict, dict]:
        """Punch between the first hosts of sites C{a} (role 0) and C{b} (role 1)."""
        lab = self.start_lab(a, b)
        result = run_pair(lab, SITES[a], SITES[b], a, b, protocol, timeout)
        return result.sides

    def assertConnected(self, a: str, b: str, protocol: str) -> None:
        ra, rb = self.pair(a, b, protocol)
        self.assertTrue(ra["ok"] and rb["ok"], (ra, rb))
        self.assertEqual((ra["echo"], rb["echo"]), ("echo?", "echo?"))
        # Each side sees the other's public (NAT) address, not a private one.
        self.assertTrue(ra["remote"][0].startswith("198.18.1."), ra)
        self.assertTrue(rb["remote"][0].startswith("198.18.1."), rb)

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

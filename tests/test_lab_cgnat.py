"""
CGNAT in the NAT lab: a home NAT behind a carrier NAT (100.64.0.0/10
between them), measured from outside and connected through.

- The lab's plain-socket probes measure the composed behaviour the spec
  promises (L{natbypass.lab.spec.expected_summary}: cone behind cone is a
  cone, anything behind a symmetric NAT is symmetric, the stricter filter
  wins, a counting carrier keeps the port step), and C{natbypass detect}
  (UDP and TCP) agrees.
- A peer behind a cone CGNAT connects to one behind a port-restricted cone
  over UDP and TCP; behind a symmetric CGNAT it fails, in traversal, as the
  selection table says.
- Two subscribers behind one carrier NAT: with hairpinning on the carrier
  they connect through its public address; without, they fail although the
  table (which assumes a public address reaches its owner) expects them to
  connect.

Needs root, ip and nft; skipped with the reason otherwise.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import interop, netns
from natbypass.lab.matrix import TRAVERSAL_FAILURES
from natbypass.lab.spec import parse_site, preset_summary
from natbypass.lab.traversal import Scenario
from natbypass.selection import feasibility

SKIP = netns.missing_requirements()

PROBE_SITES: dict[str, Any] = {
    "cg": "cgnat",  # port-restricted cone behind an EIM port-rewriting carrier
    "cgs": "cgnat-symmetric",  # port-restricted cone behind a random-port carrier
    "cfc": {"nat": "full-cone", "cgnat": "full-cone"},  # cone behind cone, ports kept
    "crc": {"nat": "full-cone", "cgnat": "restricted-cone-rewrite"},  # the carrier's filter wins
    "cseq": {"nat": "full-cone-rewrite", "cgnat": "symmetric-predictable"},  # the carrier counts up
    "cadm": {"nat": "full-cone", "cgnat": {"mapping": "adm", "filtering": "apdf"}},
}


class CarrierNatProbeTests(SynchronousTestCase):
    skip = SKIP

    def test_probes_and_detect_see_the_composed_nat(self) -> None:
        from natbypass.lab.lab import Lab

        lab = Lab.start({"sites": PROBE_SITES})
        self.addCleanup(lab.stop)
        interop.start_mediator(lab)
        interop.start_reflector(lab)
        rows = interop.collect(lab, with_coturn=False, with_probes=True, parallel=2)
        for row in rows:
            e, p, d = row.expected, row.probe, row.detect
            self.assertEqual(p["public_ip"], lab.public_address(row.site), row.site)
            self.assertEqual(
                (p["mapping"], p["tcp_mapping"], p["filtering"], p["tcp_filtering"], p["port_preserving"]),
                (e.mapping, e.mapping, e.filtering, e.filtering, e.port_preserving),
                f"probes of {row.site} ({row.configured})",
            )
            self.assertTrue(row.detect_ok, f"natbypass detect in {row.site} ({row.configured}): {d}, expected {e}")
        for site in PROBE_SITES:  # the carrier has no route out of the lab, and its homes none past it
            for node in (f"{site}.cgn", f"{site}.nat", site):
                got = lab.exec(node, ["ip", "route", "get", "192.0.2.1"])
                if node.endswith(".cgn"):
                    self.assertNotEqual(got.returncode, 0, f"{node} has a route out: {got.stdout}")
                else:
                    self.assertIn(f"via {lab.plan.node(node).gateway}", got.stdout)
        by_site = {r.site: r for r in rows}
        self.assertEqual(by_site["cseq"].probe["port_sequence"], "sequential(+1)")
        self.assertEqual(by_site["cg"].detect["nat_type"], "port-restricted-cone")
        self.assertEqual(by_site["cgs"].detect["nat_type"], "symmetric")
        self.assertEqual(by_site["cfc"].detect["nat_type"], "full-cone")


class CarrierNatTraversalTests(SynchronousTestCase):
    skip = SKIP

    def setUp(self) -> None:
        from natbypass.lab.lab import Lab

        spec = {
            "sites": {  # 20 ms each way on every site link, as in tests/test_lab_traversal.py
                "cg": {"nat": "port-restricted-cone", "cgnat": "port-restricted-cone-rewrite", "delay_ms": 20},
                "cgs": {"nat": "port-restricted-cone", "cgnat": "symmetric-random", "delay_ms": 20},
                "prc": {"nat": "port-restricted-cone", "delay_ms": 20},
                # two subscribers (homes) behind one carrier, with and without hairpinning on it
                "hp": {
                    "nat": "port-restricted-cone",
                    "cgnat": {"preset": "port-restricted-cone-rewrite", "hairpin": True},
                    "homes": 2,
                },
                "nohp": {"nat": "port-restricted-cone", "cgnat": "port-restricted-cone-rewrite", "homes": 2},
            }
        }
        self.lab = Lab.start(spec)
        self.addCleanup(self.lab.stop)
        self.scenario = Scenario(self.lab)
        self.scenario.start_mediator()

    def table(self, a: str, b: str, protocol: str) -> tuple[bool | None, str]:
        row = feasibility(preset_summary(a), preset_summary(b), protocol)
        return row.expected, row.reason

    def test_through_cgnat(self) -> None:
        self.scenario.start_peer("prc", "prc")
        for protocol in ("udp", "tcp"):
            self.assertEqual(self.table("cgnat", "port-restricted-cone", protocol)[0], True)
            result = self.scenario.connect("cg", f"cg-{protocol}", "prc", protocol, timeout=4.0)
            self.assertTrue(result.ok, f"cgnat -> port-restricted-cone over {protocol}: {result.summary()}")
            self.assertEqual(result.connected["protocol"], protocol)
        # Behind a symmetric carrier: a random symmetric NAT for the table, which birthday-punches it
        # against a port-restricted cone (UDP only; TCP is not birthday-punched).
        row = feasibility(preset_summary("cgnat-symmetric"), preset_summary("port-restricted-cone"), "udp")
        self.assertEqual((row.expected, row.birthday), (True, "open"), row.reason)
        result = self.scenario.connect("cgs", "cgs-udp", "prc", "udp", timeout=4.0)
        self.assertTrue(result.ok, f"cgnat-symmetric -> port-restricted-cone over udp: {result.summary()}")
        expected, why = self.table("cgnat-symmetric", "port-restricted-cone", "tcp")
        self.assertEqual(expected, False, why)
        result = self.scenario.connect("cgs", "cgs-tcp", "prc", "tcp", timeout=2.0)
        self.assertFalse(result.ok, result.summary())
        failed = result.event("failed")
        assert failed is not None
        reasons = [a.get("reason") or "" for a in failed["attempts"] if a.get("result") == "failed"]
        self.assertTrue(reasons and all(any(t in r for t in TRAVERSAL_FAILURES) for r in reasons), reasons)

    def test_two_subscribers_behind_one_carrier(self) -> None:
        """Hairpinning on the carrier decides it; the selection table cannot tell."""
        site = parse_site("x", {"nat": "port-restricted-cone", "cgnat": "port-restricted-cone-rewrite"})
        self.assertEqual(
            self.lab.address("hp.2").rsplit(".", 2)[-2], "1", "hp.2 is on the second home's LAN 10.i.1.0/24"
        )
        self.assertEqual(feasibility(*(interop.expected_summary(site),) * 2, "udp").expected, True)
        self.scenario.start_peer("hp.2", "hp2")
        self.scenario.start_peer("nohp.2", "nohp2")
        for protocol in ("udp", "tcp"):
            result = self.scenario.connect("hp.1", f"hp1-{protocol}", "hp2", protocol, timeout=4.0)
            self.assertTrue(result.ok, f"same carrier, hairpinning, over {protocol}: {result.summary()}")
            # Both subscribers share the carrier's public address: the path goes through it.
            self.assertEqual(result.connected["remote_address"].split(":")[0], self.lab.public_address("hp"))
        result = self.scenario.connect("nohp.1", "nohp1-udp", "nohp2", "udp", timeout=2.0)
        self.assertFalse(result.ok, f"same carrier without hairpinning connected: {result.summary()}")

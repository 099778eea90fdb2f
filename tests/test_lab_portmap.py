"""
Port mapping on a real gateway: miniupnpd (UPnP-IGD, NAT-PMP, PCP) on the
NAT of a symmetric-random lab site.

- C{natbypass detect --port-mapping} in that site reports the three
  protocols and the mapped address (the site's public address).
- A peer there with C{--port-mapping} connects to a peer behind a
  port-restricted cone and to one behind another symmetric-random NAT,
  over UDP and TCP: pairs the selection table says fail without a mapping
  (checked once, without), but for port-restricted x symmetric over UDP,
  which birthday punching opens without one.  Its mappings are deleted when it exits.
- A listening peer there with C{--port-mapping} is reached from both.

Needs root, ip, nft and miniupnpd; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import time

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import netns
from natbypass.lab.rules import GATEWAY_TABLE
from natbypass.lab.traversal import NATBYPASS, Scenario, expectation, stun_address
from natbypass.portmap.labgateway import missing_gateway_tools, start_gateway

SKIP = netns.missing_requirements() or missing_gateway_tools()

SPEC = {
    "sites": {  # 20 ms each way on every site link, as in the traversal matrix
        "gw": {"nat": {"preset": "symmetric-random", "portmap": True}, "delay_ms": 20},
        "prc": {"nat": "port-restricted-cone", "delay_ms": 20},
        "sym": {"nat": "symmetric-random", "delay_ms": 20},
    }
}


class LabPortMappingTests(SynchronousTestCase):
    skip = SKIP

    def setUp(self) -> None:
        from natbypass.lab.lab import Lab

        self.lab = Lab.start(SPEC)
        self.addCleanup(self.lab.stop)
        self.scenario = Scenario(self.lab)
        self.scenario.start_mediator()
        start_gateway(self.lab, "gw")

    def mappings_in_gateway(self) -> str:
        out = self.lab.exec("gw.nat", ["nft", "list", "chain", "inet", GATEWAY_TABLE, "prerouting_miniupnpd"])
        return "\n".join(line for line in out.stdout.splitlines() if "dnat" in line)

    def test_detect_and_connect(self) -> None:
        public = self.lab.public_address("gw")
        # detect: the three protocols, the mapped address, each probe mapping deleted again.
        started = time.monotonic()
        done = self.lab.exec("gw", [*NATBYPASS, "detect", "--stun", stun_address(), "--port-mapping", "--json"])
        elapsed = time.monotonic() - started
        self.assertEqual(done.returncode, 0, done.stderr)
        report = json.loads(done.stdout)
        self.assertEqual(report["nat_type"], "symmetric")
        pm = report["port_mapping"]
        self.assertEqual(pm["gateway"], "10.1.0.1")
        self.assertEqual(pm["protocols"], ["pcp", "natpmp", "upnp"])
        self.assertEqual(pm["mapped_address"].split(":")[0], public)
        self.assertEqual(self.mappings_in_gateway(), "")
        self.assertLess(elapsed, 15)

        # The pairs that fail without a mapping connect with one, over UDP and TCP.
        self.scenario.start_peer("prc", "prc")
        self.scenario.start_peer("sym", "sym")
        without = self.scenario.connect("gw", "gw-control", "sym", "udp", timeout=2.0)
        self.assertFalse(without.ok, f"without a mapping: {without.summary()}")
        for target, preset in (("prc", "port-restricted-cone"), ("sym", "symmetric-random")):
            for protocol in ("udp", "tcp"):
                # (port-restricted x random symmetric over UDP works without a mapping too: birthday punching)
                if (preset, protocol) != ("port-restricted-cone", "udp"):
                    self.assertEqual(expectation("symmetric-random", preset, protocol)[0], False)
                result = self.scenario.connect(
                    "gw", f"gw-{target}-{protocol}", target, protocol, timeout=4.0, extra=["--port-mapping"]
                )
                self.assertTrue(result.ok, f"gw -> {target} over {protocol}: {result.summary()}")
                self.assertEqual(result.connected["protocol"], protocol)
                # The peer's mappings went with it.
                self.assertEqual(self.mappings_in_gateway(), "")
        # The other way round: a listening peer behind the gateway, reached from both.
        self.scenario.start_peer("gw", "gwpeer", "--port-mapping")
        self.assertEqual(len(self.mappings_in_gateway().splitlines()), 2)  # its UDP and TCP ports
        for source in ("prc", "sym"):
            for protocol in ("udp", "tcp"):
                result = self.scenario.connect(source, f"{source}-gw-{protocol}", "gwpeer", protocol, timeout=4.0)
                self.assertTrue(result.ok, f"{source} -> gw over {protocol}: {result.summary()}")

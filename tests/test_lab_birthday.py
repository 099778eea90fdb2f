"""
Birthday punching through real kernel NATs (the NAT lab, 20 ms on every site
link): a peer behind a port-restricted cone connects over UDP to a peer
behind a symmetric NAT that draws a random port per flow (nftables C{snat
random}), many times; a pair of random symmetric NATs fails at once, saying
that a port mapping would help.

The connecting side is L{natbypass.lab.birthdaypeer}: a long-running peer
that knows its NAT (a fresh C{natbypass connect} first tries plainly, before
discovery has classified it; the traversal matrix covers that path).  Both
NATs forget their UDP state between attempts, so each is an independent draw
(the earlier guesses' open filter entries would otherwise help later ones).

Needs root, ip and nft; skipped with the reason otherwise.  About a minute.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import netns
from natbypass.lab.birthdaypeer import campaign
from natbypass.lab.traversal import Scenario, mediator_endpoint, stun_address

SKIP = netns.missing_requirements()
SPEC = {
    "sites": {
        "prc": {"nat": "port-restricted-cone", "delay_ms": 20},
        "symr": {"nat": "symmetric-random", "delay_ms": 20},
        "symr2": {"nat": "symmetric-random", "delay_ms": 20},
    }
}
ATTEMPTS = 20


class LabBirthdayTests(SynchronousTestCase):
    skip = SKIP

    def setUp(self) -> None:
        from natbypass.lab.lab import Lab

        self.lab = Lab.start(SPEC)
        self.addCleanup(self.lab.stop)
        self.scenario = Scenario(self.lab)
        self.scenario.start_mediator()
        self.scenario.start_peer("symr", "symr")

    def drive(self, node: str, my_id: str, count: int) -> list[dict[str, Any]]:
        """C{count} independent attempts from C{node} (each NAT's UDP tracking cleared between them)."""
        argv = [
            sys.executable,
            "-m",
            "natbypass.lab.birthdaypeer",
            *("--mediator", mediator_endpoint(), "--stun", stun_address()),
            *("--id", my_id, "--identity", os.path.join(self.scenario.workdir, f"{my_id}.pem")),
            "--peer",
            "symr",
        ]
        return campaign(self.lab, node, argv, count, [f"{node}.nat", "symr.nat"])

    def udp_sockets(self, node: str) -> list[str]:
        out = self.lab.exec(node, ["ss", "-uanH"], check=True).stdout
        return sorted(line.split()[3] for line in out.splitlines() if line.strip())

    def wait_sockets(self, node: str, expected: list[str], timeout: float) -> list[str]:
        """The node's UDP sockets once they are C{expected} again, or after C{timeout} s."""
        deadline = time.monotonic() + timeout
        while (now := self.udp_sockets(node)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        return now

    def test_port_restricted_to_random_symmetric(self) -> None:
        """At least 90% connect (the aim), median time to connect under 3 s, no extra socket left behind."""
        idle = self.udp_sockets("symr")
        events = self.drive("prc", "prc-driver", ATTEMPTS)
        self.assertEqual(events[0], {"event": "discovered", "nat": "port-restricted-cone"})
        results = events[1:]
        self.assertEqual(len(results), ATTEMPTS, results)
        # Each attempt is a fresh draw: the path comes from a guess of that attempt.
        self.assertTrue(all(r["landed_at"] for r in results if r["ok"]), results)
        ok = [r for r in results if r["ok"]]
        context = json.dumps(results, indent=1)
        self.assertGreaterEqual(len(ok), 0.9 * ATTEMPTS, context)
        self.assertLess(statistics.median(r["elapsed_ms"] for r in results), 3000, context)
        for r in ok:
            # The path is to a guessed port of the symmetric side's public address.
            self.assertEqual(r["remote"].split(":")[0], self.lab.public_address("symr"), r)
            self.assertGreater(r["sprayed"], 0, r)
        # The symmetric side closed every extra socket (the last path as its close arrives).
        self.assertEqual(self.wait_sockets("symr", idle, 10.0), idle)

    def test_random_symmetric_pair_fails_fast(self) -> None:
        """Two random symmetric NATs: no punch can work; each attempt fails at once, suggesting a port mapping."""
        events = self.drive("symr2", "symr2-driver", 2)
        self.assertEqual(events[0], {"event": "discovered", "nat": "symmetric-random"})
        for r in events[1:]:
            self.assertFalse(r["ok"], r)
            self.assertIn("--port-mapping", r["reason"])
            self.assertIn("fails at once", r["reason"])
            # One mediator round trip (2 x 2 x 20 ms) and the start delay, no punch timeout (5 s).
            self.assertLess(r["elapsed_ms"], 1500, r)

"""
Traversal through real kernel NATs: the NAT lab (network namespaces +
nftables), a real mediator and real peers, 20 ms of delay on every site link.

Every pair of {open, full-cone, restricted-cone, port-restricted-cone,
symmetric-random, symmetric-predictable} with udp, tcp and auto; two peers
behind one NAT; a path that outlives the mediator; spoofed punch packets.
What each pair should do comes from the selection table (docs/selection.md):
a pair the table expects to connect must connect and echo; a pair it expects
to fail must fail with a reason for every attempt.

Needs root, ip and nft; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import read_identity
from natbypass.lab import netns
from natbypass.lab.traversal import (
    LAN_SITE,
    PROTOCOLS,
    TYPES,
    Scenario,
    expectation,
    matrix_spec,
    pairs,
    spoof,
)

SKIP = netns.missing_requirements()


_shared: dict[str, Any] = {}


def shared_scenario() -> Scenario:
    """
    One lab, mediator and set of listening peers for the whole module (trial
    has no setUpClass): built by the first test that needs it, removed by the
    lab's own atexit handler when the test process ends.
    """
    if "error" in _shared:
        raise RuntimeError(f"the shared lab could not be built: {_shared['error']}")
    if "scenario" not in _shared:
        from natbypass.lab.lab import Lab

        lab = Lab.start(matrix_spec(delay_ms=20))
        try:
            scenario = Scenario(lab)
            scenario.start_mediator()
            for preset in TYPES:
                site = f"{TYPES[preset]}2"
                scenario.start_peer(site, site)
            scenario.start_peer(f"{LAN_SITE}.2", "lanpeer")
        except BaseException as e:
            _shared["error"] = repr(e)
            lab.stop()
            raise
        _shared["scenario"] = scenario
    return _shared["scenario"]


class LabTraversalTests(SynchronousTestCase):
    skip = SKIP

    def setUp(self) -> None:
        self.scenario = shared_scenario()
        self.lab = self.scenario.lab

    def check_pair(self, a: str, b: str, protocol: str) -> None:
        expected, why = expectation(a, b, protocol)
        src, dst = f"{TYPES[a]}1", f"{TYPES[b]}2"
        result = self.scenario.connect(src, f"{src}-{dst}-{protocol}", dst, protocol, timeout=4.0)
        context = f"{a} -> {b} over {protocol} (table: {why}): {result.summary()}"
        if expected is True:
            self.assertTrue(result.ok, context)
            if protocol != "auto":
                self.assertEqual(result.connected["protocol"], protocol, context)
            # secure on either path, with the key dst's process proved
            connected = result.connected
            self.assertTrue(connected["secure"], context)
            self.assertEqual(
                connected["peer_fingerprint"], str(read_identity(self.scenario.identity_path(dst)).fingerprint)
            )
            self.assertTrue(connected["cipher"].startswith("QUICv1" if connected["protocol"] == "udp" else "TLSv1.3"))
        elif expected is False:
            self.assertEqual(result.returncode, 1, context)
            failed = result.event("failed")
            self.assertIsNotNone(failed, context)
            started = [x for x in failed["attempts"] if x["result"] != "not-started"]
            self.assertTrue(started, context)
            for attempt in started:
                self.assertTrue(attempt["reason"], context)
        else:
            self.fail(f"the table has no expectation for {context}")

    def test_two_peers_behind_one_nat(self) -> None:
        """Host candidates: the path stays inside the LAN (remote address is a 10.x LAN address)."""
        for protocol in ("udp", "tcp"):
            result = self.scenario.connect(LAN_SITE, f"lanhost-{protocol}", "lanpeer", protocol)
            self.assertTrue(result.ok, result.summary())
            self.assertTrue(result.connected["remote_address"].startswith("10."), result.summary())

    def test_path_survives_mediator_stop(self) -> None:
        """
        A long echo session (one round trip every 0.5 s for 6 s) keeps
        working while the mediator is stopped one second in.
        """
        src, dst = "fc1", f"{TYPES['port-restricted-cone']}2"
        argv = self.scenario.connect_argv("survivor", dst, "udp", count=12, extra=("--interval", "0.5"))
        proc = self.lab.spawn(src, argv, stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        self.assertEqual(json.loads(first)["event"], "connected", first)
        self.scenario.stop_mediator()
        try:
            out, _ = proc.communicate(timeout=30)
            echo = [json.loads(line) for line in out.splitlines() if line.strip()][-1]
            self.assertEqual(echo["event"], "echo")
            self.assertEqual(echo["received"], 12, echo)
        finally:
            self.scenario.start_mediator()
            self.scenario.wait_registered("lanpeer", *[f"{TYPES[p]}2" for p in TYPES])

    def test_spoofed_punch_packets_ignored(self) -> None:
        """
        A third lab host that knows the session id (it travels in clear) but
        not the key floods the full-cone side with forged probes and acks,
        packets of the old keepalive/data types, forged QUIC and random
        bytes: the path neither moves nor loses an echo.
        """
        src, dst = "rc1", "fc2"
        proc = self.lab.spawn(
            src,
            self.scenario.connect_argv("spoofed", dst, "udp", count=10, extra=("--interval", "0.3")),
            stdout=subprocess.PIPE,
            text=True,
        )
        connected = json.loads(proc.stdout.readline())
        self.assertEqual(connected["event"], "connected", connected)
        sent = spoof(self.lab, "open2", connected["remote_address"], connected["session"])
        self.assertGreater(sent, 0)
        out, _ = proc.communicate(timeout=30)
        echo = json.loads(out.splitlines()[-1])
        self.assertEqual((echo["event"], echo["received"]), ("echo", 10), echo)


def _add_pair_tests() -> None:
    for a, b in pairs(tuple(TYPES)):
        for protocol in PROTOCOLS:

            def test(self: LabTraversalTests, a: str = a, b: str = b, protocol: str = protocol) -> None:
                self.check_pair(a, b, protocol)

            name = f"test_{TYPES[a]}_{TYPES[b]}_{protocol}"
            test.__name__ = name
            test.__doc__ = f"{a} x {b} over {protocol}"
            setattr(LabTraversalTests, name, test)


_add_pair_tests()

"""
An active attacker in the NAT lab that holds the session key -- what a
malicious mediator has -- against the secure channels, on both protocols.

Three sites behind real NATs: alice, bob and mallory.  Mallory knows the
session key and runs the same punch engine (C{natbypass.lab.enginepeer}),
publishing itself under the name of the peer it impersonates, as a
mediator handing out its own candidates would.  The victim pins the real
peer's key.  Mallory completes the session-key part of the punch (it holds
the key) but not the handshake, on either side, and the victim's failure
names the key problem.

A passive capture on alice's host, while alice and bob exchange a marker,
shows that only ciphertext crosses the wire.

Needs root, C{ip} and C{nft}; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import load_or_create
from natbypass.lab.enginematrix import STUN
from natbypass.lab.netns import missing_requirements
from natbypass.lab.traversal import site_spec

SKIP = missing_requirements()
DELAY_MS = 10
MARKER = "attack-at-dawn-7f3a9c"
#: Sent in a plain UDP datagram: proves the capture would see a marker in clear.
CONTROL = "plaintext-control-51e2"

#: Runs in a lab node: captures every frame on every interface of its
#: namespace for a while, then says how many carried UDP or TCP payload to or
#: from the peer's address and whether any held the marker (raw AF_PACKET:
#: no tcpdump needed).
_CAPTURE = r"""
import json, socket, sys, time
peer, marker, control, seconds = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode(), float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.settimeout(0.1)
print("ready", flush=True)
peer_raw = socket.inet_aton(peer)
packets = payload_bytes = 0
seen = control_seen = False
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        frame = s.recv(65535)
    except socket.timeout:
        continue
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    if peer_raw not in (ip[12:16], ip[16:20]) or ip[9] not in (6, 17):
        continue
    ihl = (ip[0] & 15) * 4
    l4 = ip[ihl:]
    body = l4[8:] if ip[9] == 17 else l4[(l4[12] >> 4) * 4:]
    if body:
        packets += 1
        payload_bytes += len(body)
        seen = seen or marker in frame
        control_seen = control_seen or control in frame
print(json.dumps({"packets": packets, "bytes": payload_bytes, "marker_seen": seen, "control_seen": control_seen}))
"""


class AttackerLabTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        from natbypass.lab.interop import start_mediator
        from natbypass.lab.lab import Lab

        spec = {"sites": {name: site_spec("full-cone", DELAY_MS) for name in ("alice", "bob", "mallory")}}
        self.lab = Lab.start(spec)
        self.addCleanup(self.lab.stop)
        start_mediator(self.lab)  # its STUN responder tells each side its mapping
        self.keys = tempfile.mkdtemp(prefix="natbypass-attacker-")
        self.fingerprints = {}
        for name in ("alice", "bob", "mallory"):
            path = os.path.join(self.keys, f"{name}.pem")
            self.fingerprints[name] = str(load_or_create(path).fingerprint)

    def run_peers(self, protocol: str, *peers: tuple[str, str, str, int, str | None], message: str = "echo?") -> list:
        """
        Run one engine peer per C{(node, name, peer, role, pin)} at once, all
        with the same session key, and return their results.
        """
        rendezvous = tempfile.mkdtemp(prefix="natbypass-attacker-")
        start_at = time.time() + 2.0
        procs = []
        for node, name, peer, role, pin in peers:
            argv = [
                sys.executable, "-m", "natbypass.lab.enginepeer", "--name", name, "--peer", peer,
                "--role", str(role), "--dir", rendezvous, "--stun", STUN, "--protocol", protocol,
                "--start-at", str(start_at), "--timeout", "3", "--message", message,
                "--identity", os.path.join(self.keys, f"{node}.pem"),
            ]  # fmt: skip
            if pin:
                argv += ["--pin", pin]
            procs.append(self.lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for p in procs:
            out, err = p.communicate(timeout=40)
            lines = [line for line in out.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else {"ok": False, "reason": f"no result: {err[-800:]}"})
        return results

    def assertImpersonationFails(self, protocol: str, victim: str, impersonated: str, victim_role: int) -> None:
        """Mallory, holding the session key, publishes itself as C{impersonated}; C{victim} pins the real key."""
        pin = self.fingerprints[impersonated]
        victim_result, mallory_result = self.run_peers(
            protocol,
            (victim, victim, impersonated, victim_role, pin),
            ("mallory", impersonated, victim, 1 - victim_role, None),
        )
        context = (protocol, victim_result, mallory_result)
        self.assertFalse(victim_result["ok"], context)
        self.assertFalse(mallory_result["ok"], context)
        # The victim refused mallory's key by name; mallory's own key never passed as the real peer's.
        self.assertIn(self.fingerprints["mallory"], victim_result["reason"], context)
        self.assertIn(pin, victim_result["reason"], context)

    def test_mallory_cannot_be_bob_to_alice_udp(self) -> None:
        self.assertImpersonationFails("udp", "alice", "bob", 0)

    def test_mallory_cannot_be_alice_to_bob_udp(self) -> None:
        self.assertImpersonationFails("udp", "bob", "alice", 1)

    def test_mallory_cannot_be_bob_to_alice_tcp(self) -> None:
        self.assertImpersonationFails("tcp", "alice", "bob", 0)

    def test_mallory_cannot_be_alice_to_bob_tcp(self) -> None:
        self.assertImpersonationFails("tcp", "bob", "alice", 1)

    def assertOnlyCiphertext(self, protocol: str) -> None:
        """alice and bob exchange the marker; a capture on alice's host never sees it."""
        bob_public = self.lab.public_address("bob")
        capture = self.lab.spawn(
            "alice",
            [sys.executable, "-c", _CAPTURE, bob_public, MARKER, CONTROL, "8"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.assertEqual(capture.stdout.readline().strip(), "ready")
        control = (
            f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'{CONTROL}', ('{bob_public}', 9))"
        )
        self.lab.exec("alice", [sys.executable, "-c", control], check=True)
        alice, bob = self.run_peers(
            protocol,
            ("alice", "alice", "bob", 0, self.fingerprints["bob"]),
            ("bob", "bob", "alice", 1, self.fingerprints["alice"]),
            message=MARKER,
        )
        seen = json.loads(capture.communicate(timeout=30)[0].strip().splitlines()[-1])
        self.assertTrue(alice["ok"] and bob["ok"], (alice, bob))
        self.assertEqual((alice["echo"], bob["echo"]), (MARKER, MARKER))
        self.assertEqual(alice["peer_fingerprint"], self.fingerprints["bob"])
        self.assertGreater(seen["packets"], 1, seen)
        self.assertTrue(seen["control_seen"], seen)  # the capture does see plaintext when there is some
        self.assertFalse(seen["marker_seen"], seen)

    def test_only_ciphertext_on_the_wire_udp(self) -> None:
        self.assertOnlyCiphertext("udp")

    def test_only_ciphertext_on_the_wire_tcp(self) -> None:
        self.assertOnlyCiphertext("tcp")

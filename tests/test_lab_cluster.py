"""
The mediator cluster in the NAT lab: two mediator processes on one Redis in
the mediator's namespace, peers behind different NATs registered on
different mediators (docs/cluster.md).

bob (a natbypass-peer behind a port-restricted cone, --mediator A,B)
registers on A; alice (natbypass connect behind a full cone, --mediator
B,A) on B: the offer crosses Redis, the path is made and echoes.  Then A is
killed (SIGKILL, no goodbye): bob re-registers on B by himself and alice
connects to him again.

Needs root, ip, nft and redis-server; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import read_identity
from natbypass.lab import netns
from natbypass.lab.topology import MEDIATOR_ADDRESSES
from natbypass.lab.traversal import NATBYPASS, TWISTD, ConnectResult, site_spec

REDIS = shutil.which("redis-server")
SKIP = netns.missing_requirements() or (
    None if REDIS else "redis-server is not installed (apt-get install redis-server)"
)

IP0, IP1 = MEDIATOR_ADDRESSES
#: Two mediators in one namespace: signalling ports and the STUN ports of each (primary on IP0, alternate on IP1).
MEDIATORS = {"A": (7000, 3478, 3479), "B": (7001, 3480, 3481)}
ALICE_SITE, BOB_SITE = "fc1", "prc2"


def endpoint(name: str) -> str:
    return f"tcp:{IP0}:{MEDIATORS[name][0]}"


class LabClusterTests(SynchronousTestCase):
    skip = SKIP

    def setUp(self) -> None:
        from natbypass.lab.lab import Lab

        self.workdir = tempfile.mkdtemp(prefix="nb-cluster-")  # short: a Unix socket path has at most 107 bytes
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.lab = Lab.start(
            {"sites": {ALICE_SITE: site_spec("full-cone", 10), BOB_SITE: site_spec("port-restricted-cone", 10)}}
        )
        lab_id = self.lab.lab_id
        self.addCleanup(lambda: self.assertEqual(netns.lab_netns(lab_id).get(lab_id, []), [], "namespaces left"))
        self.addCleanup(self.lab.stop)  # runs first (cleanups run last-in first-out)
        self.sock = os.path.join(self.workdir, "redis.sock")
        redis = self.lab.spawn(
            "mediator",
            [REDIS, "--port", "0", "--unixsocket", self.sock, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_socket(self.sock, redis)
        self.mediators = {name: self.start_mediator(name) for name in MEDIATORS}

    def log(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.log")

    def identity(self, peer_id: str) -> str:
        return os.path.join(self.workdir, f"identity-{peer_id}.pem")

    def start_mediator(self, name: str) -> subprocess.Popen[Any]:
        signal_port, stun, alt = MEDIATORS[name]
        proc = self.lab.spawn(
            "mediator",
            [*TWISTD, "-n", "--pidfile=", f"--logfile={self.log(name)}", "natbypass-mediator",
             "--stun", f"{IP0}:{stun}", "--stun-alternate", f"{IP1}:{alt}",
             "--signal", f"tcp:{signal_port}:interface={IP0}", "--redis", f"unix://{self.sock}"],
        )  # fmt: skip
        wait_for(self.log(name), f"starting on {signal_port}", 20, proc)
        wait_for(self.log(name), "cluster: node", 20, proc)
        wait_for(self.log(name), "connected to unix:", 20, proc)
        return proc

    def connect(self, node: str, my_id: str, peer_id: str) -> ConnectResult:
        """natbypass connect from C{node}, B first then A; STUN on B's (the survivor's) responder."""
        argv = [*NATBYPASS, "connect", "--json", "--mediator", f"{endpoint('B')},{endpoint('A')}",
                "--stun", f"{IP0}:{MEDIATORS['B'][1]}", "--id", my_id, "--peer", peer_id, "--count", "3",
                "--timeout", "5", "--identity", self.identity(my_id),
                "--known-peers", os.path.join(self.workdir, f"known_peers-{my_id}")]  # fmt: skip
        done = self.lab.exec(node, argv, timeout=60)
        events = []
        for line in done.stdout.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return ConnectResult(done.returncode, events, done.stderr, 0.0)

    def assertConnected(self, result: ConnectResult) -> None:
        self.assertTrue(result.ok, result.summary())
        self.assertTrue(result.connected["secure"], result.summary())
        self.assertEqual(result.connected["peer_fingerprint"], str(read_identity(self.identity("bob")).fingerprint))

    def test_peers_on_two_mediators_meet_and_survive_one(self) -> None:
        bob_log = os.path.join(self.workdir, "peer-bob.log")
        bob = self.lab.spawn(
            BOB_SITE,
            [*TWISTD, "-n", "--pidfile=", f"--logfile={bob_log}", "natbypass-peer",
             "--mediator", f"{endpoint('A')},{endpoint('B')}", "--stun", f"{IP0}:{MEDIATORS['B'][1]}",
             "--id", "bob", "--identity", self.identity("bob")],
        )  # fmt: skip
        wait_for(self.log("A"), "peer bob registered", 20, bob)
        wait_for(bob_log, "NAT is", 20, bob)

        first = self.connect(ALICE_SITE, "alice", "bob")
        self.assertConnected(first)
        with open(self.log("B")) as f:
            self.assertIn("peer alice registered", f.read())  # alice was on B, bob on A: the offer crossed Redis
        with open(self.log("A")) as f:
            self.assertNotIn("peer alice registered", f.read())

        offset = os.path.getsize(self.log("B"))
        os.killpg(self.mediators["A"].pid, signal.SIGKILL)  # A dies without a word
        self.mediators["A"].wait(10)
        wait_for(self.log("B"), "peer bob registered", 30, bob, offset)

        second = self.connect(ALICE_SITE, "alice", "bob")
        self.assertConnected(second)


def _wait_for_socket(path: str, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"redis-server did not create {path}")


def wait_for(path: str, text: str, timeout: float, proc: subprocess.Popen[Any], offset: int = 0) -> None:
    """Wait until C{text} appears in the log at C{path} past C{offset} (C{proc} must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                f.seek(offset)
                if text in f.read():
                    return
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before logging {text!r}; see {path}")
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} did not appear in {path} within {timeout} s")

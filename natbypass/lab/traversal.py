"""
Traversal scenarios in the NAT lab: a real mediator, real peers, real NATs.

Used by the lab tests, ``bench/traversal_matrix.py`` and
``bench/connect_time.py``.  Each process runs the project's own commands
(``twistd natbypass-mediator``, ``twistd natbypass-peer``, ``natbypass
connect``) inside the lab's namespaces, exactly as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .lab import Lab
from .topology import MEDIATOR_ADDRESSES

STUN_PORT = 3478
STUN_ALT_PORT = 3479
SIGNAL_PORT = 7000

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
NATBYPASS = [sys.executable, "-m", "natbypass"]


def mediator_endpoint() -> str:
    return f"tcp:{MEDIATOR_ADDRESSES[0]}:{SIGNAL_PORT}"


def stun_address() -> str:
    return f"{MEDIATOR_ADDRESSES[0]}:{STUN_PORT}"


def _wait_for(path: str, text: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                if text in f.read():
                    return
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before logging {text!r}; see {path}")
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} did not appear in {path} within {timeout} s")


@dataclass
class Scenario:
    """A lab with a mediator running in it, and the peers started so far."""

    lab: Lab
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="natbypass-scenario-"))
    mediator_log: str = ""
    peers: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)

    def start_mediator(self, *extra: str) -> subprocess.Popen[Any]:
        self.mediator_log = os.path.join(self.workdir, "mediator.log")
        proc = self.lab.spawn(
            "mediator",
            [
                *TWISTD, "-n", "--pidfile=", f"--logfile={self.mediator_log}", "natbypass-mediator",
                "--stun", stun_address(),
                "--stun-alternate", f"{MEDIATOR_ADDRESSES[1]}:{STUN_ALT_PORT}",
                "--signal", f"tcp:{SIGNAL_PORT}:interface={MEDIATOR_ADDRESSES[0]}",
                *extra,
            ],
        )
        _wait_for(self.mediator_log, f"starting on {SIGNAL_PORT}", 20, proc)
        return proc

    def start_peer(self, node: str, peer_id: str, *extra: str) -> subprocess.Popen[Any]:
        """A ``natbypass-peer`` echo service in ``node``, registered as ``peer_id``."""
        log = os.path.join(self.workdir, f"peer-{peer_id}.log")
        proc = self.lab.spawn(
            node,
            [
                *TWISTD, "-n", "--pidfile=", f"--logfile={log}", "natbypass-peer",
                "--mediator", mediator_endpoint(), "--id", peer_id, *extra,
            ],
        )
        self.peers[peer_id] = proc
        _wait_for(self.mediator_log, f"peer {peer_id} registered", 20, proc)
        return proc

    def connect(
        self, node: str, my_id: str, peer_id: str, protocol: str = "auto", count: int = 3,
        timeout: float = 5.0, extra: Sequence[str] = (),
    ) -> "ConnectResult":
        """Run ``natbypass connect --json`` in ``node`` and parse its events."""
        started = time.monotonic()
        done = self.lab.exec(
            node,
            [
                *NATBYPASS, "connect", "--json", "--mediator", mediator_endpoint(), "--id", my_id,
                "--peer", peer_id, "--protocol", protocol, "--count", str(count),
                "--timeout", str(timeout), *extra,
            ],
            timeout=60 + 4 * timeout,
        )
        events = []
        for line in done.stdout.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return ConnectResult(done.returncode, events, done.stderr, time.monotonic() - started)


@dataclass
class ConnectResult:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str
    wall_s: float

    def event(self, name: str) -> dict[str, Any] | None:
        for e in self.events:
            if e.get("event") == name:
                return e
        return None

    @property
    def connected(self) -> dict[str, Any] | None:
        return self.event("connected")

    @property
    def ok(self) -> bool:
        echo = self.event("echo")
        return (
            self.returncode == 0
            and self.connected is not None
            and echo is not None
            and echo["received"] == echo["sent"]
        )

    def summary(self) -> str:
        """One line a person can read when a case fails."""
        c = self.connected
        if c is not None:
            return f"connected over {c['protocol']} in {c['elapsed_ms']} ms, echo {self.event('echo')}"
        f = self.event("failed")
        if f is not None:
            reasons = "; ".join(f"{a.get('protocol')}: {a.get('reason')}" for a in f.get("attempts", []))
            return f"failed after {f['elapsed_ms']} ms: {f.get('reason')} [{reasons}]"
        return f"exit {self.returncode}, no events; stderr: {self.stderr[-2000:]}"

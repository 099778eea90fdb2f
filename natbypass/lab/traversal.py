"""
Traversal scenarios in the NAT lab: a real mediator, real peers, real NATs.

Used by the lab tests, C{bench/traversal_matrix.py} and
C{bench/connect_time.py}.  Each process runs the project's own commands
(C{twistd natbypass-mediator}, C{twistd natbypass-peer}, C{natbypass
connect}) inside the lab's namespaces, exactly as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from natbypass.address import parse_host_port
from natbypass.nat import NatSummary
from natbypass.selection import feasibility

from .lab import Lab
from .spec import preset_summary
from .topology import MEDIATOR_ADDRESSES, MEDIATOR_ADDRESSES6

STUN_PORT = 3478
STUN_ALT_PORT = 3479
SIGNAL_PORT = 7000

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]
NATBYPASS = [sys.executable, "-m", "natbypass"]


def mediator_endpoint() -> str:
    """
    The client endpoint string of the lab mediator's signalling port, as the
    peers and C{natbypass connect} are given it.
    """
    return f"tcp:{MEDIATOR_ADDRESSES[0]}:{SIGNAL_PORT}"


def stun_address() -> str:
    """C{HOST:PORT} of the lab mediator's primary STUN responder."""
    return f"{MEDIATOR_ADDRESSES[0]}:{STUN_PORT}"


def ipv6_mediator_args() -> tuple[str, ...]:
    """
    C{start_mediator}'s extra options in a lab with IPv6: a STUN responder
    on the mediator's two IPv6 addresses (RFC 5780) and signalling on both
    families (an IPv6 wildcard endpoint accepts IPv4 too).
    """
    return (
        "--stun6",
        f"[{MEDIATOR_ADDRESSES6[0]}]:{STUN_PORT}",
        "--stun6-alternate",
        f"[{MEDIATOR_ADDRESSES6[1]}]:{STUN_ALT_PORT}",
        "--signal",
        rf"tcp6:{SIGNAL_PORT}:interface=\:\:",
    )


def ipv6_peer_args() -> tuple[str, ...]:
    """The extra options of a dual-stack peer or C{natbypass connect} in the lab (implies C{--ipv6})."""
    return ("--stun6", f"[{MEDIATOR_ADDRESSES6[0]}]:{STUN_PORT}")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _wait_for(path: str, text: str, timeout: float, proc: subprocess.Popen[Any] | None = None, offset: int = 0) -> None:
    """Wait until C{text} appears in the file at C{path} past C{offset}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, errors="replace") as f:
                f.seek(offset)
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
    mediator: subprocess.Popen[Any] | None = None
    _log_offset: int = 0
    peers: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)

    def start_mediator(self, *extra: str) -> subprocess.Popen[Any]:
        """Start the mediator (again); its log goes on in the same file."""
        self.mediator_log = os.path.join(self.workdir, "mediator.log")
        self._log_offset = _size(self.mediator_log)
        proc = self.mediator = self.lab.spawn(
            "mediator",
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                f"--logfile={self.mediator_log}",
                "natbypass-mediator",
                "--stun",
                stun_address(),
                "--stun-alternate",
                f"{MEDIATOR_ADDRESSES[1]}:{STUN_ALT_PORT}",
                "--signal",
                f"tcp:{SIGNAL_PORT}:interface={MEDIATOR_ADDRESSES[0]}",
                *extra,
            ],
        )
        _wait_for(self.mediator_log, f"starting on {SIGNAL_PORT}", 20, proc, self._log_offset)
        return proc

    def stop_mediator(self) -> None:
        """Stop the mediator (SIGTERM, as an operator would) and wait for it to exit."""
        assert self.mediator is not None
        self.mediator.terminate()
        self.mediator.wait(timeout=20)
        self.mediator = None

    def wait_registered(self, *peer_ids: str, timeout: float = 40) -> None:
        """Wait until each peer has registered with the current mediator (after a restart too)."""
        for peer_id in peer_ids:
            _wait_for(self.mediator_log, f"peer {peer_id} registered", timeout, None, self._log_offset)

    def identity_path(self, peer_id: str) -> str:
        """Each peer id's key, kept for the scenario (the mediator binds the id to it), never the user's own."""
        return os.path.join(self.workdir, f"identity-{peer_id}.pem")

    def start_peer(self, node: str, peer_id: str, *extra: str) -> subprocess.Popen[Any]:
        """A C{natbypass-peer} echo service in C{node}, registered as C{peer_id}."""
        log = os.path.join(self.workdir, f"peer-{peer_id}.log")
        proc = self.lab.spawn(
            node,
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                f"--logfile={log}",
                "natbypass-peer",
                "--mediator",
                mediator_endpoint(),
                "--id",
                peer_id,
                "--identity",
                self.identity_path(peer_id),
                *extra,
            ],
        )
        self.peers[peer_id] = proc
        _wait_for(self.mediator_log, f"peer {peer_id} registered", 20, proc, self._log_offset)
        _wait_for(log, "NAT is", 20, proc)  # background discovery done: what a long-running peer has
        return proc

    def connect_argv(
        self,
        my_id: str,
        peer_id: str,
        protocol: str = "auto",
        count: int = 3,
        timeout: float = 5.0,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """The C{natbypass connect --json} command line of C{my_id} (its own key and known-peers file)."""
        return [
            *NATBYPASS,
            "connect",
            "--json",
            "--mediator",
            mediator_endpoint(),
            "--id",
            my_id,
            "--peer",
            peer_id,
            "--protocol",
            protocol,
            "--count",
            str(count),
            "--timeout",
            str(timeout),
            "--identity",
            self.identity_path(my_id),
            "--known-peers",
            os.path.join(self.workdir, f"known_peers-{my_id}"),
            *extra,
        ]

    def connect(
        self,
        node: str,
        my_id: str,
        peer_id: str,
        protocol: str = "auto",
        count: int = 3,
        timeout: float = 5.0,
        extra: Sequence[str] = (),
    ) -> ConnectResult:
        """Run C{natbypass connect --json} in C{node} and parse its events."""
        started = time.monotonic()
        argv = self.connect_argv(my_id, peer_id, protocol, count, timeout, extra)
        done = self.lab.exec(node, argv, timeout=60 + 4 * timeout)
        events = []
        for line in done.stdout.splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return ConnectResult(done.returncode, events, done.stderr, time.monotonic() - started)


@dataclass
class ConnectResult:
    """
    What one C{natbypass connect --json} run in the lab produced: its exit
    status, its JSON events, stderr and wall time.  L{ok} only when it
    connected and every echo came back.
    """

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


# ------------------------------------------------------------- the matrix

#: The NAT types of the traversal matrix: lab preset -> short site-name stem.
TYPES: dict[str, str] = {
    "open": "open",
    "full-cone": "fc",
    "restricted-cone": "rc",
    "port-restricted-cone": "prc",
    "symmetric-random": "symr",
    "symmetric-predictable": "symp",
}
PROTOCOLS = ("udp", "tcp", "auto")
#: A LAN site with two hosts behind one NAT.
LAN_SITE = "lan"


def site_spec(preset: str, delay_ms: float) -> dict[str, Any]:
    """A site of the lab preset C{preset} with C{delay_ms} on its link ("open" is a site kind, not a NAT)."""
    if preset == "open":
        return {"kind": "open", "delay_ms": delay_ms}
    return {"nat": preset, "delay_ms": delay_ms}


def matrix_spec(delay_ms: float = 20.0, types: Sequence[str] = tuple(TYPES)) -> dict[str, Any]:
    """Two sites of every type (so a type can meet itself) and one two-host LAN."""
    sites: dict[str, Any] = {f"{TYPES[preset]}{n}": site_spec(preset, delay_ms) for preset in types for n in (1, 2)}
    sites[LAN_SITE] = {"nat": "port-restricted-cone", "hosts": 2, "delay_ms": delay_ms}
    return {"sites": sites}


def pairs(types: Sequence[str] = tuple(TYPES)) -> list[tuple[str, str]]:
    """Every unordered pair of types, a type with itself included."""
    return [(a, b) for i, a in enumerate(types) for b in types[i:]]


def expectation(a: str, b: str, protocol: str) -> tuple[bool | None, str]:
    """What the selection table (docs/selection.md) expects for this pair of lab NATs."""
    rows = [feasibility(nat_of(a), nat_of(b), p) for p in (("udp", "tcp") if protocol == "auto" else (protocol,))]
    if any(r.expected for r in rows):
        return True, next(r.reason for r in rows if r.expected)
    if all(r.expected is False for r in rows):
        return False, rows[0].reason
    return None, rows[0].reason


def nat_of(preset: str) -> NatSummary:
    """The selection table's view of a lab preset: what discovery reports for it (L{spec.preset_summary})."""
    return preset_summary(preset)


@dataclass
class MatrixCell:
    """
    One case of the traversal matrix: a pair of lab NAT types and a protocol,
    what happened, and what the selection table expected and why.
    """

    a: str
    b: str
    protocol: str
    result: ConnectResult
    expected: bool | None
    why: str


def run_matrix(
    scenario: Scenario,
    types: Sequence[str] = tuple(TYPES),
    protocols: Sequence[str] = PROTOCOLS,
    timeout: float = 4.0,
    repeat: int = 1,
) -> list[MatrixCell]:
    """
    Start a listening peer in every C{*2} site and connect to it from the
    C{*1} site of every other type, for each protocol.  The mediator must
    be running.
    """
    for preset in types:
        site = f"{TYPES[preset]}2"
        if site not in scenario.peers:
            scenario.start_peer(site, site)
    cells = []
    for a, b in pairs(types):
        for protocol in protocols:
            expected, why = expectation(a, b, protocol)
            for k in range(repeat):
                src, dst = f"{TYPES[a]}1", f"{TYPES[b]}2"
                result = scenario.connect(src, f"{src}-{dst}-{protocol}-{k}", dst, protocol, timeout=timeout)
                cells.append(MatrixCell(a, b, protocol, result, expected, why))
    return cells


#: Run in a lab host: sends forged punch packets (right session id, random
#: keys, both roles, every type the codec has: PROBE and ACK), packets of the
#: old punch types (keepalive, data, close: gone, so undecodable now), forged
#: QUIC (short-header packets and a padded long-header Initial, from an
#: address the punch never verified) and random bytes to HOST:PORT.
_SPOOFER = r"""
import os, socket, sys
from natbypass.punch.packet import PacketType, encode
host, port, sid, count = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = 0
for i in range(count):
    key = os.urandom(32)
    for t in PacketType:
        for role in (0, 1):
            s.sendto(encode(t, role, sid, i + 1, key, echo=i), (host, port))
            sent += 1
    probe = encode(PacketType.PROBE, i % 2, sid, i + 1, key)
    for old in (3, 4, 5, 6):
        s.sendto(probe[:2] + bytes([old]) + probe[3:], (host, port))
        sent += 1
    s.sendto(bytes([0x40 | (i & 0x3F)]) + os.urandom(60), (host, port))
    s.sendto(bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(1194), (host, port))
    s.sendto(os.urandom(64), (host, port))
    sent += 3
print(sent)
"""


def spoof(lab: Lab, node: str, target: str, session_id: str, count: int = 50) -> int:
    """Send forged punch packets from C{node} to C{target} ("ip:port"); returns how many."""
    host, port = parse_host_port(target, ip_only=True)
    done = lab.exec(node, [sys.executable, "-c", _SPOOFER, host, str(port), session_id, str(count)], check=True)
    return int(done.stdout.strip())

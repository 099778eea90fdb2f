"""
The traversal engines across every pair of lab NAT types, without signalling.

For each pair a fresh two-site lab (25 ms per WAN link by default) is built,
the mediator's STUN responder is started in it, and two
C{natbypass.lab.enginepeer} processes punch at an agreed time, with port
prediction switched on where C{natbypass.selection.feasibility} asks for it.  Prints one
line per case and a summary; exit status 1 when any case disagrees with the
table in docs/selection.md.  Needs root, C{ip} and C{nft}::

    python3 -m natbypass.lab.enginematrix [--protocols udp,tcp] [--delay-ms 25]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from natbypass.selection import feasibility

from . import enginepeer
from .traversal import TYPES, nat_of, site_spec

STUN = "198.18.0.2:3478"


@dataclass
class CaseResult:
    """
    One case of the matrix: a pair of lab NAT types over one protocol, each
    side's JSON result line, and what the selection table expected, so a
    disagreement with the table stands out.
    """

    protocol: str
    a: str
    b: str
    expected: bool | None
    sides: tuple[dict[str, Any], dict[str, Any]]

    @property
    def ok(self) -> bool:
        return all(s.get("ok") for s in self.sides)

    @property
    def as_expected(self) -> bool:
        return self.expected is None or self.ok == self.expected

    def line(self) -> str:
        got = "connected" if self.ok else "failed"
        detail = (
            f"{self.sides[0].get('connect_ms')} / {self.sides[1].get('connect_ms')} ms"
            if self.ok
            else (self.sides[0].get("reason") or "")[:160]
        )
        mark = "" if self.as_expected else "  <-- UNEXPECTED"
        return f"{self.protocol} {self.a:22} x {self.b:22} expected {self.expected!s:5} {got:9} {detail}{mark}"


def run_pair(lab, a: str, b: str, name_a: str, name_b: str, protocol: str, timeout: float) -> CaseResult:
    """Punch between the first hosts of sites C{name_a} (role 0) and C{name_b} in C{lab}."""
    sa, sb = nat_of(a), nat_of(b)
    rows = (feasibility(sa, sb, protocol), feasibility(sb, sa, protocol))
    rendezvous = tempfile.mkdtemp(prefix="natbypass-labpeer-")
    start_at = time.time() + 2.0
    procs = []
    for (name, peer, role), row in zip(((name_a, name_b, 0), (name_b, name_a, 1)), rows):
        argv = enginepeer.argv(name, peer, role, rendezvous, STUN, protocol, start_at, "--timeout", str(timeout))
        if row.predict_remote_delta:
            argv += ["--predict-delta", str(row.predict_remote_delta)]
        procs.append(lab.spawn(name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    sides = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=30 + timeout)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        sides.append(json.loads(lines[-1]) if lines else {"ok": False, "reason": f"no result: {stderr[-500:]}"})
    return CaseResult(protocol, a, b, rows[0].expected, (sides[0], sides[1]))


def run(argv: list[str] | None = None) -> int:
    """
    Entry point: a fresh lab for each unordered pair of NAT types (a type
    meets itself too) and a punch over each protocol; returns 1 when any case
    disagrees with the selection table.
    """
    from natbypass.lab.interop import start_mediator
    from natbypass.lab.lab import Lab

    p = argparse.ArgumentParser(prog="python -m natbypass.lab.enginematrix")
    p.add_argument("--protocols", default="udp,tcp")
    p.add_argument("--delay-ms", type=float, default=25.0)
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    protocols = args.protocols.split(",")
    results: list[CaseResult] = []
    for a, b in itertools.combinations_with_replacement(list(TYPES), 2):
        name_a, name_b = TYPES[a] + "1", TYPES[b] + "2"
        lab = Lab.start({"sites": {name_a: site_spec(a, args.delay_ms), name_b: site_spec(b, args.delay_ms)}})
        try:
            start_mediator(lab)
            for protocol in protocols:
                result = run_pair(lab, a, b, name_a, name_b, protocol, args.timeout)
                results.append(result)
                print(result.line(), flush=True)
        finally:
            lab.stop()
    bad = [r for r in results if not r.as_expected]
    connected = sum(r.ok for r in results)
    print(
        f"{len(results)} cases: {connected} connected, {len(results) - connected} failed, "
        f"{len(bad)} not as the table expects"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run())

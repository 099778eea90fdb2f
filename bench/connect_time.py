#!/usr/bin/env python3
"""
Time to connect through real NATs, measured in the NAT lab.

For each pair of NAT types and each protocol, run `natbypass connect`
ROUNDS times and report medians (min-max) of three times from its
`connected` event:

- *secure from start*: `elapsed_ms`, from the command's start (after the
  interpreter has loaded) to the path secured (QUIC / TLS proved the peer's
  pinned key): includes the TCP connect and registration at the mediator;
- *raw from registered*: from the peer registered at the mediator (when it
  asks for the connection: `registered_ms`) to the raw path proven
  (`punched_ms`: UDP, the punch chose the 5-tuple; TCP, the socket
  connected, before TLS): issue 12's introduction time without the
  secure channel;
- *secure from registered*: the same start to the path secured.

The JSON output also has, per cell, `registered` (start to registered) and
`introduced` (registered to the race of attempts started: the mediator's
round trip and our own work around it; the rest of *secure from
registered* is the punch, with its start margin, and the handshake).

Interpreter start-up is reported apart as `wall`.  Every site link gets
DELAY ms each way, so with the default 25 ms the mediator RTT is 50 ms and
the peer-to-peer RTT 100 ms.  The rounds of a pair take turns between the
protocols (udp, tcp, auto, udp, ...), so a burst of load on the shared
machine falls on all of them alike.

    sudo python3 bench/connect_time.py [--delay 25] [--rounds 9] [--pairs all|cones|symmetric|predictable] [--json OUT]

Needs root (network namespaces).  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from natbypass.lab import netns  # noqa: E402
from natbypass.lab.lab import Lab  # noqa: E402
from natbypass.lab.traversal import TYPES, ConnectResult, Scenario, matrix_spec  # noqa: E402

CONE_PAIRS = [
    ("full-cone", "full-cone"),
    ("full-cone", "port-restricted-cone"),
    ("restricted-cone", "restricted-cone"),
    ("restricted-cone", "port-restricted-cone"),
    ("port-restricted-cone", "port-restricted-cone"),
]
SYMMETRIC_PAIRS = [
    ("full-cone", "symmetric-random"),
    ("restricted-cone", "symmetric-random"),
    ("port-restricted-cone", "symmetric-predictable"),
    ("symmetric-predictable", "symmetric-predictable"),
]
#: Every pair with a predictable symmetric NAT (issue 12: the first connect between two succeeds at once).
PREDICTABLE_PAIRS = [
    ("open", "symmetric-predictable"),
    ("full-cone", "symmetric-predictable"),
    ("restricted-cone", "symmetric-predictable"),
    ("port-restricted-cone", "symmetric-predictable"),
    ("symmetric-predictable", "port-restricted-cone"),
    ("symmetric-predictable", "symmetric-predictable"),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay", type=float, default=25.0, help="one-way delay on each site link, ms")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--protocols", default="udp,tcp,auto")
    p.add_argument(
        "--pairs",
        choices=("all", "cones", "symmetric", "predictable"),
        default="all",
        help="which NAT pairs (default: all)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the raw results here")
    args = p.parse_args()
    why = netns.missing_requirements()
    if why:
        print(f"connect_time: {why}", file=sys.stderr)
        return 2
    pairs = {
        "all": CONE_PAIRS + SYMMETRIC_PAIRS,
        "cones": CONE_PAIRS,
        "symmetric": SYMMETRIC_PAIRS,
        "predictable": PREDICTABLE_PAIRS,
    }[args.pairs]
    types = sorted({t for pair in pairs for t in pair}, key=list(TYPES).index)
    rows = []
    with Lab.start(matrix_spec(delay_ms=args.delay, types=types)) as lab:
        sc = Scenario(lab)
        sc.start_mediator()
        for t in types:
            sc.start_peer(f"{TYPES[t]}2", f"{TYPES[t]}2")
        time.sleep(2)  # let the listening peers finish background discovery
        for a, b in pairs:
            protocols = args.protocols.split(",")
            runs: dict[str, list] = {protocol: [] for protocol in protocols}
            for k in range(args.rounds):
                for protocol in protocols:
                    src, dst = f"{TYPES[a]}1", f"{TYPES[b]}2"
                    runs[protocol].append(sc.connect(src, f"{src}-{dst}-{protocol}-{k}", dst, protocol, count=1))
            for protocol in protocols:
                rows.append(summarise(a, b, protocol, runs[protocol]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"\nMachine: {platform.node()} ({os.cpu_count()} cores), {platform.platform()}; "
        f"delay {args.delay:g} ms each way per site link, {args.rounds} rounds per cell.\n"
    )
    print(
        "| pair | protocol | connected | secure from start ms | raw from registered ms "
        "| secure from registered ms | won by | wall median ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['a']} x {r['b']} | {r['protocol']} | {r['connected']}/{r['rounds']} | {_cell(r['secure'])} "
            f"| {_cell(r['raw_from_registered'])} | {_cell(r['secure_from_registered'])} "
            f"| {','.join(r['won']) or '-'} | {r['wall_median_ms']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _stats(times: list[float]) -> dict[str, float] | None:
    """Median, min and max of C{times}, or None without any."""
    if not times:
        return None
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _cell(stats: dict[str, float] | None) -> str:
    return "-" if stats is None else f"{stats['median']:.0f} ({stats['min']:.0f}-{stats['max']:.0f})"


def summarise(a: str, b: str, protocol: str, results: list[ConnectResult]) -> dict[str, Any]:
    """One row: the connects of C{protocol} between C{a} and C{b}, timed three ways (see the module)."""
    secure, raw, secure_reg, registered, introduced, won, failures = [], [], [], [], [], [], []
    for r in results:
        c = r.connected
        if c is None:
            failures.append(r.summary())
            continue
        secure.append(c["elapsed_ms"])
        won.append(c["protocol"])
        if c.get("registered_ms") is not None:
            registered.append(c["registered_ms"])
            secure_reg.append(c["elapsed_ms"] - c["registered_ms"])
            ended = [a["ended_ms"] for a in c.get("attempts", ()) if a.get("result") == "connected"]
            if ended:
                introduced.append(c["elapsed_ms"] - c["registered_ms"] - ended[0])
            if c.get("punched_ms") is not None:
                raw.append(c["punched_ms"] - c["registered_ms"])
    return {
        "a": a,
        "b": b,
        "protocol": protocol,
        "rounds": len(results),
        "connected": len(secure),
        "secure": _stats(secure),
        "raw_from_registered": _stats(raw),
        "secure_from_registered": _stats(secure_reg),
        "registered": _stats(registered),
        "introduced": _stats(introduced),
        "wall_median_ms": round(statistics.median(r.wall_s * 1000 for r in results)),
        "samples": {"secure": secure, "raw_from_registered": raw, "secure_from_registered": secure_reg},
        "won": sorted(set(won)),
        "failures": failures,
    }


if __name__ == "__main__":
    sys.exit(main())

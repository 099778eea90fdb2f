#!/usr/bin/env python3
"""
Time to connect through real NATs, measured in the NAT lab.

For each pair of NAT types and each protocol, run `natbypass connect`
ROUNDS times and report the median of its `elapsed_ms` (from the
command's start to the `connected` event; interpreter start-up before that
is reported apart as `wall`).  Every site link gets DELAY ms each way, so
with the default 25 ms the mediator RTT is 50 ms and the peer-to-peer RTT
100 ms.

    sudo python3 bench/connect_time.py [--delay 25] [--rounds 7] [--pairs all|cones|symmetric|predictable] [--json OUT]

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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from natbypass.lab import netns  # noqa: E402
from natbypass.lab.lab import Lab  # noqa: E402
from natbypass.lab.traversal import TYPES, Scenario, matrix_spec  # noqa: E402

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
    p.add_argument("--rounds", type=int, default=7)
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
            for protocol in args.protocols.split(","):
                times, walls, won, failures = [], [], [], []
                for k in range(args.rounds):
                    src, dst = f"{TYPES[a]}1", f"{TYPES[b]}2"
                    r = sc.connect(src, f"{src}-{dst}-{protocol}-{k}", dst, protocol, count=1)
                    if r.connected is not None:
                        times.append(r.connected["elapsed_ms"])
                        won.append(r.connected["protocol"])
                    else:
                        failures.append(r.summary())
                    walls.append(r.wall_s * 1000)
                rows.append(
                    {
                        "a": a,
                        "b": b,
                        "protocol": protocol,
                        "rounds": args.rounds,
                        "connected": len(times),
                        "median_ms": statistics.median(times) if times else None,
                        "min_ms": min(times) if times else None,
                        "max_ms": max(times) if times else None,
                        "wall_median_ms": round(statistics.median(walls)),
                        "won": sorted(set(won)),
                        "failures": failures,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        f"\nMachine: {platform.node()} ({os.cpu_count()} cores), {platform.platform()}; "
        f"delay {args.delay:g} ms each way per site link, {args.rounds} rounds per cell.\n"
    )
    print("| pair | protocol | connected | median ms | min | max | won by | wall median ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        med = "-" if r["median_ms"] is None else f"{r['median_ms']:.0f}"
        lo = "-" if r["min_ms"] is None else f"{r['min_ms']:.0f}"
        hi = "-" if r["max_ms"] is None else f"{r['max_ms']:.0f}"
        print(
            f"| {r['a']} x {r['b']} | {r['protocol']} | {r['connected']}/{r['rounds']} | {med} | {lo} | {hi} "
            f"| {','.join(r['won']) or '-'} | {r['wall_median_ms']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

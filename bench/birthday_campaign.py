#!/usr/bin/env python3
"""
Birthday punching in the NAT lab: success rate, time to connect, and
success against probes sent compared with the theory.

A lab with a port-restricted-cone site and a symmetric-random site (nftables
C{snat random}, ports 1024-65535), DELAY ms each way on both links; a
C{natbypass-peer} listens behind the symmetric NAT and
L{natbypass.lab.birthdaypeer} (a long-running peer that has finished
discovery) connects to it ATTEMPTS times over UDP, closing each path; between
attempts both NATs' UDP connection tracking is deleted (C{conntrack -D -p
udp}), so each attempt is an independent draw (C{--keep-state} keeps it: the
earlier guesses' open filter entries then help later attempts).

    sudo python3 bench/birthday_campaign.py [--attempts 100] [--delay 20] [--sockets 256]
        [--rate 400] [--probes 2048] [--timeout 5] [--json OUT]

Prints the success rate, the distribution of time to connect (from the
connect call to the secured path, mediator round trip included), and for n
probes the share of attempts whose landing probe was among the first n
against 1 - (1 - sockets/64512)^n.  Needs root.
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
from natbypass.lab.birthdaypeer import campaign  # noqa: E402
from natbypass.lab.lab import Lab  # noqa: E402
from natbypass.lab.traversal import Scenario, mediator_endpoint, stun_address  # noqa: E402
from natbypass.punch.birthday import success_probability  # noqa: E402

CURVE = (50, 100, 174, 250, 500, 1000, 1500, 2048)


def percentile(values: list[float], q: float) -> float:
    """The C{q} quantile (0..1) by linear interpolation between the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attempts", type=int, default=100)
    p.add_argument("--delay", type=float, default=20.0, help="one-way delay on each site link, ms")
    p.add_argument("--sockets", type=int, default=256)
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--probes", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--json", metavar="OUT", help="also write every attempt here")
    p.add_argument(
        "--keep-state",
        action="store_true",
        help="keep the NATs' UDP state between attempts (by default it is deleted: independent draws)",
    )
    args = p.parse_args()
    why = netns.missing_requirements()
    if why:
        print(f"birthday_campaign: {why}", file=sys.stderr)
        return 2
    spec = {
        "sites": {
            "prc": {"nat": "port-restricted-cone", "delay_ms": args.delay},
            "symr": {"nat": "symmetric-random", "delay_ms": args.delay},
        }
    }
    lab = Lab.start(spec)
    try:
        scenario = Scenario(lab)
        scenario.start_mediator()
        scenario.start_peer("symr", "symr", "--birthday-sockets", str(args.sockets))
        argv = [
            sys.executable,
            "-m",
            "natbypass.lab.birthdaypeer",
            *("--mediator", mediator_endpoint(), "--stun", stun_address()),
            *("--id", "driver", "--identity", os.path.join(scenario.workdir, "driver.pem"), "--peer", "symr"),
            *("--timeout", str(args.timeout), "--birthday-rate", str(args.rate), "--birthday-probes", str(args.probes)),
        ]
        started = time.monotonic()
        forget = [] if args.keep_state else ["prc.nat", "symr.nat"]
        events = campaign(lab, "prc", argv, args.attempts, forget, timeout=60 + args.timeout)
        wall = time.monotonic() - started
    finally:
        lab.stop()
    results = [e for e in events if "n" in e]
    if not results:
        print("birthday_campaign: the driver reported nothing", file=sys.stderr)
        return 1
    ok = [r for r in results if r["ok"]]
    times = [r["elapsed_ms"] for r in ok]
    n = len(results)
    print(f"# Birthday punching: {n} attempts, port-restricted-cone -> symmetric-random, {args.delay:g} ms links")
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"sockets {args.sockets}, rate {args.rate:g}/s, probes <= {args.probes}, timeout {args.timeout:g} s, "
        f"NAT state {'kept' if args.keep_state else 'deleted'} between attempts; "
        f"wall {wall:.0f} s"
    )
    print(f"\nconnected: {len(ok)}/{n} ({100 * len(ok) / n:.1f}%)")
    if times:
        print(
            "time to connect, ms (connected attempts): "
            + ", ".join(f"{name} {percentile(times, q):.0f}" for name, q in (("min", 0), ("p25", 0.25)))
            + f", median {statistics.median(times):.0f}, "
            + ", ".join(f"{name} {percentile(times, q):.0f}" for name, q in (("p75", 0.75), ("p90", 0.9), ("max", 1)))
        )
    print("\n| probes n | landed within n (measured) | theory 1-(1-s/64512)^n |")
    print("|---:|---:|---:|")
    for k in CURVE:
        measured = sum(1 for r in ok if r.get("landed_at") is not None and r["landed_at"] <= k) / n
        print(f"| {k} | {100 * measured:.1f}% | {100 * success_probability(args.sockets, k):.1f}% |")
    landed = [r["landed_at"] for r in ok if r.get("landed_at") is not None]
    if landed:
        print(f"\nlanding probe: median {statistics.median(landed):.0f}, max {max(landed)}; sprayed per attempt "
              f"median {statistics.median(r['sprayed'] for r in ok):.0f}")  # fmt: skip
    failed = [r for r in results if not r["ok"]]
    for r in failed[:5]:
        print(f"failed #{r['n']} after {r['elapsed_ms']} ms: {r['reason'][:400]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

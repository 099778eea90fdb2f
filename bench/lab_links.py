#!/usr/bin/env python3
"""
Measure what the lab's links really give: round-trip time and loss from a
site to the mediator, for a few delay / jitter / loss settings, next to what
was asked for.  Delay and jitter are one way, on each direction of the site's
link (so RTT ~ 2 x delay); loss is per direction (round-trip loss
1 - (1 - p)^2).

    sudo python3 bench/lab_links.py [--count 1000] [--interval 0.005]

Prints a markdown table (the one in docs/nat-lab.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

#: Sites measured with a slower request rate (seconds between requests): with requests closer
#: together than the jitter, "no reordering" holds frames back and raises the mean delay.
SLOW = {"d50j10s": 0.05}
BEGIN, END = "<!-- link-table:begin -->", "<!-- link-table:end -->"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from natbypass.lab import interop  # noqa: E402
from natbypass.lab.lab import Lab  # noqa: E402

SETTINGS = {
    "plain": {"kind": "open"},
    "d10": {"kind": "open", "delay_ms": 10},
    "d50": {"kind": "open", "delay_ms": 50},
    "d50j10": {"kind": "open", "delay_ms": 50, "jitter_ms": 10},
    "d50j10s": {"kind": "open", "delay_ms": 50, "jitter_ms": 10},
    "l5": {"kind": "open", "loss_pct": 5},
    "l20": {"kind": "open", "loss_pct": 20},
    "nat": {"nat": "port-restricted-cone", "delay_ms": 25, "jitter_ms": 5, "loss_pct": 2},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--write", action="store_true", help="replace the table in docs/nat-lab.md")
    args = p.parse_args()
    rows = []
    with Lab.start({"sites": SETTINGS}) as lab:
        interop.start_reflector(lab)
        server = f"{lab.mediator_addresses[0]}:{interop.REFLECTOR_PORTS[0]}"
        for site, spec in SETTINGS.items():  # one at a time: the forwarders share 2 CPUs
            interval = SLOW.get(site, args.interval)
            count = args.count if site not in SLOW else max(100, args.count // 5)
            r = lab.exec(
                site,
                [
                    sys.executable,
                    "-m",
                    "natbypass.lab.probe",
                    "rtt",
                    server,
                    "--count",
                    str(count),
                    "--interval",
                    str(interval),
                ],
                timeout=900,
            )
            got = json.loads(r.stdout)
            d, j, l = spec.get("delay_ms", 0), spec.get("jitter_ms", 0), spec.get("loss_pct", 0)
            want_loss = 100 * (1 - (1 - l / 100) ** 2)
            rows.append(
                f"| {site} | {count} x {interval * 1000:g} ms | {d:g} | {j:g} | {l:g} | {2 * d:g} | {got.get('min_ms', 0):.2f} | {got.get('median_ms', 0):.2f} | "
                f"{got.get('mean_ms', 0):.2f} | {got.get('p95_ms', 0):.2f} | {got.get('stdev_ms', 0):.2f} | {want_loss:.1f} | "
                f"{got['loss_pct']:.1f} |"
            )
    table = "\n".join(
        [
            "| site | requests | delay ms (each way) | jitter ms | loss % (each way) | RTT asked ms | RTT min | median | mean "
            "| p95 | stdev | RT loss expected % | RT loss measured % |",
            "|" + "---|" * 13,
            *rows,
            "",
            f"_`python3 bench/lab_links.py --count {args.count} --interval {args.interval}`, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel {os.uname().release}, {os.cpu_count()} CPUs._",
        ]
    )
    print(table)
    if args.write:
        path = os.path.join(ROOT, "docs", "nat-lab.md")
        text = open(path).read()
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(path, "w") as f:
            f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

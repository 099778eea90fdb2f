#!/usr/bin/env python3
"""
Soak of the traversal lab (root): repeated connects across every pair of the
traversal matrix for --minutes, the success rate per cell, and the listening
peers' (and the mediator's) descriptors and memory over time.

    sudo python3 bench/soak_campaign.py --minutes 30 --json /tmp/soak.json

The lab is the traversal matrix's (natbypass.lab.traversal.matrix_spec: two
sites of every NAT type, --delay ms one way on each site link) with its
mediator; a `twistd natbypass-peer` listens in every `*2` site, started once
and kept for the whole soak.  Sweeps run back to back until the time is up:
each sweep runs `natbypass connect --json` from the `*1` site of every type
to the `*2` peer of every type (every unordered pair, as the matrix), over
udp, tcp and auto, one echo each, with --timeout per attempt; every command
has a hard limit (--connect-limit s; "hung" = it hit it).  After each sweep:
every listening peer's and the mediator's open descriptors (/proc/PID/fd)
and RSS, and the mediator's last status line (peers, connections, pending
offers, open sessions).

Printed: success rate per cell (pair x protocol) against what the selection
table expects, hung runs, and the descriptor/RSS series of each process
(first, last, max).  A cell that the table expects to fail should fail every
time, with a reason; one that it expects to connect should connect every
time.  Problem lines (Traceback, Unhandled, CRITICAL) in every log are
counted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import relcommon as rc  # noqa: E402

from natbypass.lab import netns  # noqa: E402
from natbypass.lab.lab import Lab  # noqa: E402
from natbypass.lab.traversal import PROTOCOLS, TYPES, Scenario, expectation, matrix_spec, pairs  # noqa: E402

STATUS = re.compile(r"signalling status: (\d+) peers, .*?(\d+) connections, (\d+) pending offers, (\d+) open sessions")
PROBLEMS = ("Traceback", "Unhandled", "CRITICAL", "internal-error")


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_kib(pid: int) -> int | None:
    try:
        return rc.rss_kib(pid)
    except (OSError, ValueError):
        return None


def last_status(path: str) -> dict | None:
    try:
        with open(path, errors="replace") as f:
            f.seek(max(0, os.path.getsize(path) - 20000))
            found = STATUS.findall(f.read())
    except OSError:
        return None
    if not found:
        return None
    peers, conns, offers, sessions = map(int, found[-1])
    return {"peers": peers, "connections": conns, "pending_offers": offers, "open_sessions": sessions}


def problem_lines(workdir: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in sorted(os.listdir(workdir)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(workdir, name), errors="replace") as f:
            bad = [ln.rstrip() for ln in f if any(p in ln for p in PROBLEMS)]
        if bad:
            out[name] = bad[:10] + ([f"... {len(bad)} in all"] if len(bad) > 10 else [])
    return out


def events_of(text: str) -> list[dict]:
    evs = []
    for line in text.splitlines():
        try:
            evs.append(json.loads(line))
        except ValueError:
            pass
    return evs


def run_connect(sc: Scenario, node: str, my_id: str, peer: str, protocol: str, timeout: float, limit: float) -> dict:
    argv = sc.connect_argv(my_id, peer, protocol, 1, timeout)
    t0 = time.monotonic()
    proc = sc.lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hung = False
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    evs = events_of(out)
    r: dict = {"exit": proc.returncode, "wall_s": round(time.monotonic() - t0, 2), "hung": hung}
    for e in evs:
        if e.get("event") == "connected":
            r["connected"] = {"protocol": e.get("protocol"), "elapsed_ms": e.get("elapsed_ms")}
        elif e.get("event") == "failed":
            r["failed"] = (e.get("reason") or "")[:200]
        elif e.get("event") == "echo":
            r["echo"] = (e.get("sent"), e.get("received"))
    if not evs:
        r["stderr_tail"] = err[-300:]
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--delay", type=float, default=20)
    p.add_argument("--timeout", type=float, default=4.0, help="natbypass connect --timeout (per attempt)")
    p.add_argument("--connect-limit", type=float, default=60)
    p.add_argument("--protocols", default=",".join(PROTOCOLS))
    p.add_argument("--json")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what we started
    why = netns.missing_requirements()
    if why:
        print(f"soak_campaign: {why}", file=sys.stderr)
        return 2
    protocols = a.protocols.split(",")
    res: dict = {
        "machine": rc.machine(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cells": {},
        "samples": [],
        "hung": [],
    }
    t_begin = time.monotonic()
    deadline = t_begin + a.minutes * 60
    try:
        with Lab.start(matrix_spec(delay_ms=a.delay)) as lab:
            sc = Scenario(lab)
            sc.start_mediator("--status-interval", "5")
            for preset in TYPES:
                site = f"{TYPES[preset]}2"
                sc.start_peer(site, site)
            procs = {"mediator": sc.mediator.pid, **{k: v.pid for k, v in sc.peers.items()}}

            def sample(sweep: int) -> None:
                s = {
                    "t_s": round(time.monotonic() - t_begin, 1),
                    "sweep": sweep,
                    "fds": {k: fds(pid) for k, pid in procs.items()},
                    "rss_kib": {k: rss_kib(pid) for k, pid in procs.items()},
                    "status": last_status(sc.mediator_log),
                }
                res["samples"].append(s)
                print("sample", json.dumps(s), flush=True)

            sample(0)
            sweep = 0
            while time.monotonic() < deadline:
                sweep += 1
                for ta, tb in pairs():
                    for protocol in protocols:
                        if time.monotonic() >= deadline:
                            break
                        src, dst = f"{TYPES[ta]}1", f"{TYPES[tb]}2"
                        r = run_connect(sc, src, f"{src}-soak", dst, protocol, a.timeout, a.connect_limit)
                        key = f"{ta} x {tb} {protocol}"
                        cell = res["cells"].setdefault(
                            key,
                            {"expected": expectation(ta, tb, protocol)[0], "runs": 0, "ok": 0, "ms": [], "fail": {}},
                        )
                        cell["runs"] += 1
                        if r.get("connected"):
                            cell["ok"] += 1
                            cell["ms"].append(r["connected"]["elapsed_ms"])
                        else:
                            reason = r.get("failed") or r.get("stderr_tail") or f"exit {r['exit']}"
                            short = reason.split(";")[0][:90]
                            cell["fail"][short] = cell["fail"].get(short, 0) + 1
                        if r["hung"]:
                            res["hung"].append({"cell": key, "sweep": sweep, **r})
                sample(sweep)
            res["sweeps"] = sweep
            # Drain: sessions are forgotten after both reports or 2 minutes.
            drain_end = time.monotonic() + 150
            while time.monotonic() < drain_end:
                st = last_status(sc.mediator_log)
                if st and st["pending_offers"] == 0 and st["open_sessions"] == 0:
                    break
                time.sleep(5)
            res["status_after_drain"] = last_status(sc.mediator_log)
            res["drain_s"] = round(time.monotonic() - (drain_end - 150), 1)
            sample(sweep)
            res["problems"] = problem_lines(sc.workdir)
    finally:
        res["wall_s"] = round(time.monotonic() - t_begin, 1)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
    report(res)
    return 0


def report(res: dict) -> None:
    print(f"\nmachine: {res['machine']}; {res.get('sweeps')} sweeps in {res['wall_s']} s")
    print("| cell | expected | connected / runs | median ms | failures |")
    print("| --- | --- | --- | --- | --- |")
    for key, c in res["cells"].items():
        ms = sorted(c["ms"])
        med = ms[len(ms) // 2] if ms else "-"
        exp = {True: "connects", False: "fails", None: "?"}[c["expected"]]
        fails = "; ".join(f"{n}x {r}" for r, n in c["fail"].items())
        print(f"| {key} | {exp} | {c['ok']}/{c['runs']} | {med} | {fails[:200]} |")
    samples = res["samples"]
    if samples:
        print("\n| process | fds first / last / max | RSS MiB first / last / max |")
        print("| --- | --- | --- |")
        for name in samples[0]["fds"]:
            f = [s["fds"][name] for s in samples if s["fds"].get(name) is not None]
            r = [s["rss_kib"][name] / 1024 for s in samples if s["rss_kib"].get(name) is not None]
            if f and r:
                print(f"| {name} | {f[0]} / {f[-1]} / {max(f)} | {r[0]:.1f} / {r[-1]:.1f} / {max(r):.1f} |")
    print(f"hung: {len(res['hung'])}; status after drain: {res.get('status_after_drain')}")
    print(f"problem lines: {json.dumps(res.get('problems'))[:2000]}")


if __name__ == "__main__":
    sys.exit(main())

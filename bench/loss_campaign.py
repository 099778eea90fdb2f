#!/usr/bin/env python3
"""
Punching under loss in the NAT lab (root): how many connects succeed, how
fast, and (TCP) which errno each connect() try ended with.

    sudo python3 bench/loss_campaign.py --rounds 20 --json /tmp/loss.json

For each pair of NAT types (default: port-restricted x port-restricted and
full-cone x restricted) one two-site lab is built with --loss % loss each
way on each site link (so a packet between the peers crosses two lossy
links: ~19% end to end at 10%) and --delay ms one way per link.  Each round
runs two engine-only peers (natbypass.lab.enginepeer: STUN, mappings swapped
through a shared directory, a punch at an agreed time, one echo), without
the signalling layer, so what is measured is the traversal engine alone.
Time to connect is the later side's, from its start to its path ready
(TLS / QUIC authenticated); "within 2 s" is the issue's aim.  --skew starts
role 1 later, as the mediator's relaying does over a lossy link: then role
0's SYNs reach role 1's listener before role 1 connects, the case of the
EADDRNOTAVAIL storm.

Each peer runs through this script's --peer mode, which wraps the TCP attempt
so its errno counts (TCPPunchAttempt.errors) are printed with the result, and
keeps a log of the side (each connect() try and how it ended, natbypass's log
events at every level, ms from the agreed start; at most MAX_LOG_LINES).  The
--json file keeps both sides' logs and stderr for every round that failed or
took over 2 s ("logs" in its row), so slow rounds can be read afterwards.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PRESETS = {
    "prc": "port-restricted-cone",
    "fc": "full-cone",
    "rc": "restricted-cone",
    "symp": "symmetric-predictable",
}
STUN = "198.18.0.2:3478"
#: Log lines kept per side and round; a round's logs are kept when it failed or took over SLOW_MS.
MAX_LOG_LINES, SLOW_MS = 400, 2000


def peer_mode(argv: list[str]) -> None:
    """
    Run natbypass.lab.enginepeer, recording the TCP attempt to print its errno counts afterwards, and a log of the
    side: each connect() try and how it ended, and natbypass's log events, in ms from the agreed start.
    """
    from twisted.internet import task
    from twisted.logger import formatEvent, globalLogPublisher

    from natbypass.lab import enginepeer
    from natbypass.punch import tcp

    start_at = float(argv[argv.index("--start-at") + 1])
    events: list[str] = []

    def note(when: float, what: str) -> None:
        if len(events) < MAX_LOG_LINES:
            events.append(f"{(when - start_at) * 1000:7.0f} {what}")

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("natbypass"):
            note(event.get("log_time", time.time()), f"[{event['log_level'].name}] {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)

    def tcp_info(sock) -> str:
        """The kernel's view of a TCP socket: state, RTO, RTT, retransmissions (struct tcp_info, Linux)."""
        try:
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            state, _, retransmits, _, backoff = raw[:5]
            rto, _, _, _, unacked = struct.unpack_from("5I", raw, 8)
            total_retrans = struct.unpack_from("I", raw, 100)[0]
            rtt, rttvar = struct.unpack_from("2I", raw, 68)
        except (OSError, struct.error, ValueError, AttributeError):
            return "tcp_info unavailable"
        return (
            f"state {state} rto {rto // 1000} ms rtt {rtt // 1000}/{rttvar // 1000} ms unacked {unacked} "
            f"retransmits {retransmits} backoff {backoff} total_retrans {total_retrans}"
        )

    def transport_info(proto) -> str:
        """L{tcp_info} of a handshake's socket, if it still has one (never raises: the attempt must go on)."""
        try:
            return tcp_info(proto.transport.getHandle())
        except Exception:
            return "no socket"

    class RecordingAttempt(tcp.TCPPunchAttempt):
        def _try(self, target):
            note(time.time(), f"try {target[0]}:{target[1]} (try {self.tries[target] + 1})")
            super()._try(target)

        def _connectDone(self, pending, code):
            if pending in self._pending:
                how = errno.errorcode.get(code, "connected")
                note(time.time(), f"connect to {pending.target[1]}: {how}; {tcp_info(pending.sock)}")
            super()._connectDone(pending, code)

        def _handshakeTimeout(self, proto):
            note(time.time(), f"handshake timeout ({proto.how}); {transport_info(proto)}")
            super()._handshakeTimeout(proto)

        def _handshakeLost(self, proto):
            note(time.time(), f"handshake connection lost ({proto.how}); {transport_info(proto)}")
            super()._handshakeLost(proto)

    attempts: list[tcp.TCPPunchAttempt] = []

    def recording_punch_tcp(reactor, session, local, candidates, **kw):
        attempt = RecordingAttempt(reactor, session, local, candidates, **kw)
        attempts.append(attempt)
        return attempt.deferred

    enginepeer.punch_tcp = recording_punch_tcp

    def main(reactor):
        d = enginepeer.main(reactor, argv)

        def report(result):
            extra = {"tcp_errors": dict(attempts[0].errors), "tcp_tries": attempts[0].tries.total()} if attempts else {}
            extra["log"] = events
            print(json.dumps({"extra": extra}), flush=True)
            return result

        return d.addBoth(report)

    task.react(main)


def run_round(lab, a: str, b: str, protocol: str, timeout: float, predict: int | None, skew: float = 0.0) -> dict:
    rendezvous = tempfile.mkdtemp(prefix="natbypass-loss-")
    start_at = time.time() + 2.5
    procs = []
    for name, peer, role in ((a, b, 0), (b, a, 1)):
        if role == 1:
            start_at += skew
        argv = [sys.executable, os.path.abspath(__file__), "--peer", "--name", name, "--peer-name", peer]
        argv += ["--role", str(role), "--dir", rendezvous, "--stun", STUN, "--protocol", protocol]
        argv += ["--start-at", str(start_at), "--timeout", str(timeout)]
        if predict:
            argv += ["--predict-delta", str(predict)]
        procs.append(lab.spawn(name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    sides = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=40 + timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        result, extra = {"ok": False, "reason": f"no result: {err[-300:]}"}, {}
        for line in out.splitlines():
            if line.startswith("{"):
                obj = json.loads(line)
                if "extra" in obj:
                    extra = obj["extra"]
                else:
                    result = obj
        result.update(extra)
        result["stderr"] = err[-1000:]
        sides.append(result)
    ok = all(s.get("ok") for s in sides)
    row = {"ok": ok, "ms": max(s.get("connect_ms", 0) for s in sides) if ok else None}
    if not ok or row["ms"] > SLOW_MS:
        row["logs"] = [{"role": role, "log": s.get("log", []), "stderr": s["stderr"]} for role, s in enumerate(sides)]
    if not ok:
        row["reasons"] = [s.get("reason", "")[:400] for s in sides if not s.get("ok")]
        # STUN or the rendezvous failing over the lossy link is not the punch failing; a side that printed
        # nothing after the other one punched (its echo lost the path) is.
        row["before_punch"] = not any("targets" in s for s in sides)
    if protocol == "tcp":
        row["errors"] = [s.get("tcp_errors", {}) for s in sides]
        row["tries"] = [s.get("tcp_tries") for s in sides]
    return row


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarise(rows: list[dict]) -> dict:
    times = [r["ms"] for r in rows if r["ok"]]
    punched = [r for r in rows if not r.get("before_punch")]
    errors: dict[str, int] = {}
    for r in rows:
        for side in r.get("errors", []):
            for k, v in side.items():
                errors[k] = errors.get(k, 0) + v
    return {
        "rounds": len(rows),
        "connected": len(times),
        "failed_before_punch": len(rows) - len(punched),
        "within_2s": sum(t <= 2000 for t in times),
        "median_ms": statistics.median(times) if times else None,
        "p90_ms": pct(times, 0.9),
        "max_ms": max(times) if times else None,
        "tcp_errors": errors or None,
        "failures": [r["reasons"] for r in rows if not r["ok"]],
    }


def main() -> int:
    if sys.argv[1:2] == ["--peer"]:
        argv = [x if x != "--peer-name" else "--peer" for x in sys.argv[2:]]
        peer_mode(argv)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--loss", type=float, default=10.0, help="%% loss each way on each site link")
    p.add_argument("--delay", type=float, default=20.0, help="ms one way on each site link")
    p.add_argument("--pairs", default="prc:prc,fc:rc")
    p.add_argument("--protocols", default="udp,tcp")
    p.add_argument("--timeout", type=float, default=5.0, help="the punch window (s)")
    p.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="role 1 starts this many s after role 0 (through the mediator the two starts differ by the "
        "signalling path's latency; the engine peers start at the same instant)",
    )
    p.add_argument("--json")
    a = p.parse_args()
    from natbypass.lab import netns
    from natbypass.lab.interop import start_mediator
    from natbypass.lab.lab import Lab
    from natbypass.lab.traversal import nat_of
    from natbypass.selection import feasibility

    why = netns.missing_requirements()
    if why:
        print(f"loss_campaign: {why}", file=sys.stderr)
        return 2
    res: dict = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": {}}
    try:
        for pair in a.pairs.split(","):
            ka, kb = pair.split(":")
            na, nb = ka + "1", kb + "2"
            site = lambda k: {"nat": PRESETS[k], "delay_ms": a.delay, "loss_pct": a.loss}  # noqa: E731
            with Lab.start({"sites": {na: site(ka), nb: site(kb)}}) as lab:
                start_mediator(lab)
                for protocol in a.protocols.split(","):
                    predict = feasibility(nat_of(PRESETS[ka]), nat_of(PRESETS[kb]), protocol).predict_remote_delta
                    rows = []
                    for i in range(a.rounds):
                        row = run_round(lab, na, nb, protocol, a.timeout, predict, a.skew)
                        rows.append(row)
                        print(
                            f"{pair} {protocol} {i}: {json.dumps({k: v for k, v in row.items() if k != 'logs'})}",
                            flush=True,
                        )
                    key = f"{pair}/{protocol}"
                    res["cells"][key] = {"summary": summarise(rows), "rows": rows}
                    print(key, json.dumps(res["cells"][key]["summary"]), flush=True)
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
    for key, cell in res["cells"].items():
        s = cell["summary"]
        print(
            f"{key:14} {s['connected']}/{s['rounds']} connected ({s['within_2s']} within 2 s, "
            f"{s['failed_before_punch']} failed before punching), median {s['median_ms']} ms, p90 {s['p90_ms']} ms, "
            f"max {s['max_ms']} ms; tcp errors {s['tcp_errors']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

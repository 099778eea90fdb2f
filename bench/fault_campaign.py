#!/usr/bin/env python3
"""
Faults in the NAT lab (root): what `natbypass connect` shows the user, that
nothing hangs, and that the mediator's state drains afterwards.

    sudo python3 bench/fault_campaign.py --json /tmp/faults.json

One lab: sites a, b (port-restricted-cone, 20 ms one way per site link),
la, lb (the same with 10% loss each way on each site link) and ma, mb (20%).
The mediator runs with `--status-interval 1`; `twistd natbypass-peer`s
listen as b, lb, mb.  Every `natbypass connect` runs with a hard limit
(--connect-limit s); "hung" means it hit that limit.

1. baseline: a -> b over udp and tcp.
2. mediator SIGKILLed mid-offer: `connect a -> b` started, the mediator
   killed K ms after the command started (a sweep of K), then restarted once
   the command has ended (--restart-during: at once, while it runs); the
   connect's events and exit, the time until b has registered again, and a
   connect after it.
2b. mediator SIGKILLed at the instant it relays the offer to b (its debug
   log line, polled every 2 ms), --relay-rounds times, then restarted.
3. peer killed mid-punch: `connect a -> b` started, b's natbypass-peer
   SIGKILLed K ms later (a sweep), then restarted.
4. loss: --loss-rounds connects la -> lb and ma -> mb, udp and tcp
   (loss on both site links, so a packet between the peers crosses two lossy
   links: about 19% and 36% end to end).
5. NAT mappings flushed: `connect a -> b --count 30 --interval 0.5`, and
   two seconds after `connected`, `conntrack -F` in a's and b's NAT
   namespaces; over udp and over tcp: the echoes that came back, the exit,
   and when b (whose signalling connection died with the mapping) was
   registered again.
5b. b's signalling path silently dead (nftables drops everything to and
   from the signalling port in b's host) for --blackhole-s: when b notices
   and reconnects, and when it is registered again once the path is back.
6. stale state: the mediator's status line (pending offers, open sessions)
   read until both are 0 (sessions are forgotten after both reports or 2 min).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import relcommon as rc  # noqa: E402

from natbypass.lab import netns  # noqa: E402
from natbypass.lab.lab import Lab  # noqa: E402
from natbypass.lab.traversal import SIGNAL_PORT, Scenario, _wait_for  # noqa: E402

STATUS = re.compile(r"signalling status: (\d+) peers, .*?(\d+) connections, (\d+) pending offers, (\d+) open sessions")


def spec(delay: float) -> dict:
    site = lambda loss: {"nat": "port-restricted-cone", "delay_ms": delay, "loss_pct": loss}  # noqa: E731
    return {"sites": {"a": site(0), "b": site(0), "la": site(10), "lb": site(10), "ma": site(20), "mb": site(20)}}


def last_status(sc: Scenario) -> dict | None:
    try:
        text = open(sc.mediator_log, errors="replace").read()[-20000:]
    except OSError:
        return None
    found = STATUS.findall(text)
    if not found:
        return None
    peers, conns, offers, sessions = map(int, found[-1])
    return {"peers": peers, "connections": conns, "pending_offers": offers, "open_sessions": sessions}


def events_of(out: str) -> list[dict]:
    evs = []
    for line in out.splitlines():
        try:
            evs.append(json.loads(line))
        except ValueError:
            pass
    return evs


def brief(evs: list[dict], rc_: int | None, wall: float, hung: bool) -> dict:
    out: dict = {"exit": rc_, "wall_s": round(wall, 2), "hung": hung}
    for e in evs:
        kind = e.get("event")
        if kind == "connected":
            out["connected"] = {"protocol": e.get("protocol"), "elapsed_ms": e.get("elapsed_ms")}
        elif kind == "failed":
            out["failed"] = {
                "elapsed_ms": e.get("elapsed_ms"),
                "reason": e.get("reason"),
                "attempts": [(a.get("protocol"), a.get("reason")) for a in e.get("attempts", [])],
            }
        elif kind == "echo":
            out["echo"] = {"sent": e.get("sent"), "received": e.get("received")}
        elif kind:
            out.setdefault("other_events", []).append({k: v for k, v in e.items() if k != "attempts"})
    return out


def restart_peer(sc: Scenario, peer_id: str) -> None:
    """Scenario.start_peer, waiting for the *new* registration (the logs already hold the old one's lines)."""
    med_off = rc_size(sc.mediator_log)
    peer_log = os.path.join(sc.workdir, f"peer-{peer_id}.log")
    peer_off = rc_size(peer_log)
    sc.start_peer(peer_id, peer_id)
    _wait_for(sc.mediator_log, f"peer {peer_id} registered", 30, None, med_off)
    _wait_for(peer_log, "NAT is", 30, None, peer_off)


def rc_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def recover(sc: Scenario, run: Runner, listeners: tuple[str, ...], r: dict, restart: bool) -> None:
    """After a mediator kill: (re)start it, time the peers' re-registration into C{r}, and connect once more."""
    t1 = time.monotonic()
    if restart:
        sc.start_mediator("--status-interval", "1")
    try:
        sc.wait_registered(*listeners, timeout=60)
        r["peers_reregistered_s"] = round(time.monotonic() - t1, 2)
    except TimeoutError as e:
        r["peers_reregistered_s"] = f"not within 60 s: {e}"
    r["connect_after"] = run.connect("a", "b", "udp")


class Runner:
    def __init__(self, sc: Scenario, limit: float) -> None:
        self.sc, self.limit = sc, limit
        self.n = 0
        self.hung_sockets = ""

    def spawn_connect(
        self, node: str, peer: str, protocol: str, count: int = 1, interval: float = 0.0, timeout: float = 5.0
    ) -> tuple[subprocess.Popen, float]:
        self.n += 1
        argv = self.sc.connect_argv(node, peer, protocol, count, timeout)  # the node's own id and key
        argv += ["--interval", str(interval)]
        proc = self.sc.lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.node = node
        return proc, time.monotonic()

    def finish(self, proc: subprocess.Popen, t0: float) -> dict:
        hung = False
        try:
            out, err = proc.communicate(timeout=max(1.0, self.limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            hung = True
            node = getattr(proc, "node", None)
            if node:  # what the hung command's sockets were doing, for the report
                self.hung_sockets = self.sc.lab.exec(node, ["ss", "-tanup"], timeout=10).stdout
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        r = brief(events_of(out), proc.returncode, time.monotonic() - t0, hung)
        if not r.get("connected") and not r.get("failed"):
            r["stderr_tail"] = err[-600:]
        if hung:
            r["sockets_when_hung"] = [ln for ln in self.hung_sockets.splitlines() if "python" in ln]
        return r

    def connect(self, node: str, peer: str, protocol: str, **kw) -> dict:
        proc, t0 = self.spawn_connect(node, peer, protocol, **kw)
        return self.finish(proc, t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay", type=float, default=20)
    p.add_argument("--loss-rounds", type=int, default=5)
    p.add_argument("--kill-offsets", default="0.5,0.7,0.9,1.1,1.4", help="seconds after `connect` started")
    p.add_argument("--connect-limit", type=float, default=60)
    p.add_argument("--drain-limit", type=float, default=150)
    p.add_argument(
        "--restart-during",
        action="store_true",
        help="mediator_kill: restart the mediator right after the kill, while the command runs (by default it is "
        "restarted once the command has ended, so the command sees no mediator at all)",
    )
    p.add_argument("--relay-rounds", type=int, default=3)
    p.add_argument("--blackhole-s", type=float, default=60, help="how long b's signalling path drops everything")
    p.add_argument("--only", default="baseline,mediator_kill,relay_kill,peer_kill,loss,conntrack,blackhole,drain")
    p.add_argument("--json")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what we started
    why = netns.missing_requirements()
    if why:
        print(f"fault_campaign: {why}", file=sys.stderr)
        return 2
    only = set(a.only.split(","))
    offsets = [float(x) for x in a.kill_offsets.split(",")]
    res: dict = {"machine": rc.machine(), "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def show(key: str, value) -> None:
        print(key, json.dumps(value, default=str), flush=True)

    try:
        with Lab.start(spec(a.delay)) as lab:
            sc = Scenario(lab)
            sc.start_mediator("--status-interval", "1")
            # The lossy sites' peers only when the loss phase runs (their discovery is slow over 20% loss).
            listeners = ("b", "lb", "mb") if "loss" in only else ("b",)
            for peer_id in listeners:
                sc.start_peer(peer_id, peer_id)
            run = Runner(sc, a.connect_limit)
            if "baseline" in only:
                res["baseline"] = [run.connect("a", "b", proto) for proto in ("udp", "tcp")]
                show("baseline", res["baseline"])

            if "mediator_kill" in only:
                rows = []
                for off in offsets:
                    proc, t0 = run.spawn_connect("a", "b", "udp")
                    time.sleep(max(0.0, off - (time.monotonic() - t0)))
                    sc.mediator.kill()  # SIGKILL: no shutting-down notice
                    sc.mediator.wait(10)
                    killed_at = time.monotonic() - t0
                    if a.restart_during:  # back while the command still runs (else only once it has ended)
                        sc.start_mediator("--status-interval", "1")
                    r = run.finish(proc, t0)
                    r["killed_at_s"] = round(killed_at, 2)
                    recover(sc, run, listeners, r, restart=not a.restart_during)
                    rows.append(r)
                    show("mediator_kill", r)
                res["mediator_kill"] = rows

            if "relay_kill" in only:
                # The mediator SIGKILLed at the instant it relays the offer to b (its debug line "offer X from a
                # to b", polled every 2 ms): the moment between offer and session that the sweep above misses.
                rows = []
                for _ in range(a.relay_rounds):
                    offset = rc_size(sc.mediator_log)
                    proc, t0 = run.spawn_connect("a", "b", "udp")
                    seen = None
                    while time.monotonic() - t0 < 15:
                        with open(sc.mediator_log, errors="replace") as f:
                            f.seek(offset)
                            if re.search(r"offer \S+ from a to b", f.read()):
                                seen = time.monotonic() - t0
                                break
                        time.sleep(0.002)
                    sc.mediator.kill()
                    sc.mediator.wait(10)
                    killed_at = time.monotonic() - t0
                    r = run.finish(proc, t0)
                    r["relay_seen_at_s"] = seen and round(seen, 3)
                    r["killed_at_s"] = round(killed_at, 3)
                    recover(sc, run, listeners, r, restart=True)
                    rows.append(r)
                    show("relay_kill", r)
                res["relay_kill"] = rows

            if "peer_kill" in only:
                rows = []
                for off in offsets:
                    proc, t0 = run.spawn_connect("a", "b", "udp")
                    time.sleep(max(0.0, off - (time.monotonic() - t0)))
                    victim = sc.peers["b"]
                    os.killpg(victim.pid, signal.SIGKILL)
                    victim.wait(10)
                    killed_at = time.monotonic() - t0
                    r = run.finish(proc, t0)
                    r["killed_at_s"] = round(killed_at, 2)
                    restart_peer(sc, "b")
                    r["connect_after"] = run.connect("a", "b", "udp")
                    rows.append(r)
                    show("peer_kill", r)
                res["peer_kill"] = rows

            if "loss" in only:
                table = {}
                for src, dst, pct_ in (("la", "lb", 10), ("ma", "mb", 20)):
                    for proto in ("udp", "tcp"):
                        rs = [run.connect(src, dst, proto) for _ in range(a.loss_rounds)]
                        times = [r["connected"]["elapsed_ms"] for r in rs if r.get("connected")]
                        table[f"{pct_}%/{proto}"] = {
                            "connected": len(times),
                            "rounds": len(rs),
                            "median_ms": sorted(times)[len(times) // 2] if times else None,
                            "max_ms": max(times) if times else None,
                            "hung": sum(r["hung"] for r in rs),
                            "max_wall_s": max(r["wall_s"] for r in rs),
                            "failures": [r.get("failed", r.get("stderr_tail")) for r in rs if not r.get("connected")],
                            "echo_lost": sum(
                                (r.get("echo") or {}).get("sent", 0) - (r.get("echo") or {}).get("received", 0)
                                for r in rs
                            ),
                        }
                        show(f"loss {pct_}% {proto}", table[f"{pct_}%/{proto}"])
                res["loss"] = table

            if "conntrack" in only:
                rows = []
                for proto in ("udp", "tcp"):
                    med_offset = rc_size(sc.mediator_log)
                    proc, t0 = run.spawn_connect("a", "b", proto, count=30, interval=0.5)
                    connected_at = None
                    deadline = time.monotonic() + 30
                    line = ""
                    while time.monotonic() < deadline:
                        if not select.select([proc.stdout], [], [], 1)[0]:
                            continue
                        line = proc.stdout.readline()
                        if not line:
                            break
                        if '"connected"' in line:
                            connected_at = time.monotonic() - t0
                            break
                    flushed = None
                    if connected_at is not None:
                        time.sleep(2)
                        flushed = {
                            n: lab.exec(n, ["conntrack", "-F"], timeout=10).returncode for n in ("a.nat", "b.nat")
                        }
                        flushed["at_s"] = round(time.monotonic() - t0, 2)
                    r = run.finish(proc, t0)
                    r["connected_at_s"] = connected_at
                    r["flush"] = flushed
                    r["protocol"] = proto
                    r["first_line"] = line.strip()[:300]
                    if flushed is not None:
                        # b's signalling connection died with its NAT mapping too (finding 4): when is b
                        # registered again (its own liveness check), from the flush?
                        try:
                            _wait_for(sc.mediator_log, "peer b re", 90, None, med_offset)  # registered or replaced
                            r["b_reregistered_after_flush_s"] = round(time.monotonic() - t0 - flushed["at_s"], 1)
                        except TimeoutError:
                            r["b_reregistered_after_flush_s"] = "not within 90 s"
                    rows.append(r)
                    show("conntrack", r)
                res["conntrack"] = rows

            if "blackhole" in only:
                # Finding 4: b's signalling connection goes dead without a word (a NAT or firewall on the way
                # drops everything: no FIN, no RST), for --blackhole-s seconds.  When does b notice, and when is it
                # registered again once the path is back?
                rules = (
                    "table inet nb_blackhole {\n"
                    f"  chain out {{ type filter hook output priority -10; tcp dport {SIGNAL_PORT} drop; }}\n"
                    f"  chain in {{ type filter hook input priority -10; tcp sport {SIGNAL_PORT} drop; }}\n"
                    "}\n"
                )
                b_log = os.path.join(sc.workdir, "peer-b.log")
                b_off, med_off = rc_size(b_log), rc_size(sc.mediator_log)
                lab.exec("b", ["nft", "-f", "-"], input=rules, check=True)
                t0 = time.monotonic()
                row: dict = {"blackhole_s": a.blackhole_s}
                try:
                    _wait_for(b_log, "signalling connection lost", a.blackhole_s, None, b_off)
                    row["b_noticed_s"] = round(time.monotonic() - t0, 1)
                except TimeoutError:
                    row["b_noticed_s"] = f"not within {a.blackhole_s:g} s"
                time.sleep(max(0.0, a.blackhole_s - (time.monotonic() - t0)))
                lab.exec("b", ["nft", "delete", "table", "inet", "nb_blackhole"], check=True)
                t1 = time.monotonic()
                try:
                    _wait_for(sc.mediator_log, "peer b re", 120, None, med_off)  # registered or replaced its session
                    row["b_reregistered_after_lift_s"] = round(time.monotonic() - t1, 1)
                except TimeoutError:
                    row["b_reregistered_after_lift_s"] = "not within 120 s"
                row["connect_after"] = run.connect("a", "b", "udp")
                res["blackhole"] = row
                show("blackhole", row)

            if "drain" in only:
                t1 = time.monotonic()
                series = []
                while time.monotonic() - t1 < a.drain_limit:
                    st = last_status(sc)
                    series.append((round(time.monotonic() - t1, 1), st))
                    if st and st["pending_offers"] == 0 and st["open_sessions"] == 0:
                        break
                    time.sleep(5)
                res["drain"] = {"seconds": round(time.monotonic() - t1, 1), "last": series[-1], "series": series[::3]}
                show("drain", res["drain"])
            problems = rc.log_problems(sc.mediator_log)
            for peer_id in listeners:
                problems += rc.log_problems(os.path.join(sc.workdir, f"peer-{peer_id}.log"))
            res["problem_lines"] = problems[:30]
            res["workdir"] = sc.workdir
    finally:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

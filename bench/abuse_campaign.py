"""
Abuse while serving: a well-behaved client's latencies on the real
`twistd natbypass-mediator` (every limit at its default) while one attack at
a time runs at full speed, against the same client on the idle mediator.

    python3 bench/abuse_campaign.py --seconds 30 --json /tmp/abuse.json

The well-behaved client (`victim`, a process of its own) holds two idle
peers, A and B (minimal line clients that answer pings; B accepts offers from
A and ignores every other one, like a peer that is slow to answer), and
every 0.25 s takes one sample of each of:

  - register: a fresh connection from 127.0.0.250, greeting -> hello ->
    register (signed nonce) -> `registered` (ms from hello sent);
  - offer: A `connect`s to B -> B gets the offer and accepts -> A gets its
    `session` (ms from connect sent);
  - STUN: a Binding over UDP, and one over a fresh TCP connection.

Phases, each --seconds long, in order: `idle` (no attack), then each attack
(its own process, from one source address unless said otherwise):

  noread     8 connections register then send pings flat out and never read
  flood      one connection sending pings flat out (reads); reconnects when cut
  conns      connections from one IP as fast as it can, held open (per-source cap)
  globalcap  connections from 120 addresses held open up to the global cap
             (--max-connections; by design new clients are then refused)
  offerslots 6 registrations from one IP offering to B flat out (B never answers them)
  stunflood  STUN Binding requests flat out from 4000 addresses 127.6.x.y
  stuntcp    STUN/TCP connections held open silently from 200 addresses, 20 slots each, reconnecting when
             cut (caps: 8 per source, 1000 in all)

Attackers run at nice 10 (--attacker-nice): on a 2-CPU machine the
mediator, the attacker and the measuring client share the cores, and the
client must not be queued behind the attacker (a real attacker is elsewhere).
The mediator's RSS is read every second.  Printed per phase: p50/p99/max and
failures of each sample kind, the ratio of p99 to idle's, RSS at start/end,
and the mediator's refusal counters.  Aim: p99 under attack within 5x idle,
RSS bounded.

The victim also records connect-to-greeting (TCP connect until the greeting:
the wait in the accept queue, which `register` leaves out).  --syn-meter
RATE/BURST (root) installs the operator's nftables SYN meter of
docs/reliability.md in front of the signalling and STUN ports for the run;
--backlog and --mediator-args change the mediator's listen backlog and
options (every limit is at its default otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relcommon as rc  # noqa: E402

ATTACKS = ("noread", "flood", "conns", "globalcap", "offerslots", "stunflood", "stuntcp")
ATTACKER = "127.0.9.1"
VICTIM = "127.0.0.250"


def _stop_flag() -> list[bool]:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    return stop


# ------------------------------------------------------------------------------------------- the victim


def victim_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--signal", type=int, required=True)
    p.add_argument("--stun", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--identity", required=True)
    a = p.parse_args(argv)
    from natbypass.identity import load_or_create

    stop = _stop_flag()
    ident = load_or_create(a.identity)  # the same key in every phase: the ids stay ours
    host = "127.0.0.1"
    samples: list[dict] = []

    def make_peer(name: str) -> rc.LineConn:
        c = rc.LineConn(host, a.signal, VICTIM, timeout=10)
        _, reply = rc.register(c, ident, name)
        assert reply.get("op") == "registered", reply
        return c

    A = make_peer("victim-a")
    B = make_peer("victim-b")
    ready = open(a.out + ".ready", "w")
    ready.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((VICTIM, 0))
    rid = 100
    k = 0
    while not stop[0]:
        t_start = time.time()
        k += 1
        s: dict = {"t": t_start}
        # register on a fresh connection
        conn = None
        try:
            t_conn = time.perf_counter()
            conn = rc.LineConn(host, a.signal, VICTIM, timeout=5)
            reg, reply = rc.register(conn, ident, "victim-reg", timeout=5)
            if reply.get("op") == "registered":
                s["register_ms"] = reg * 1000
                # TCP connect until the greeting: the wait in the accept queue, which `register` leaves out.
                s["greeting_ms"] = (time.perf_counter() - t_conn - reg) * 1000
            else:
                s["register_err"] = f"{reply.get('code')} {reply.get('error')}"
        except (OSError, ValueError, TimeoutError, ConnectionError) as e:
            s["register_err"] = type(e).__name__
        finally:
            if conn is not None:
                conn.close()
        # an offer A -> B
        rid += 1
        t0 = time.perf_counter()
        try:
            A.send({"op": "connect", "rid": rid, "peer": "victim-b", **rc.DESCRIPTION})
            deadline = time.time() + 10
            offer = B.wait_for(lambda m: m.get("op") == "offer" and m.get("peer") == "victim-a", deadline)
            B.send({"op": "accept", "rid": rid + 1_000_000, "offer": offer["offer"], **rc.DESCRIPTION})
            reply = A.wait_for(lambda m, rid=rid: m.get("rid") == rid, deadline)
            if reply.get("op") == "session":
                s["offer_ms"] = (time.perf_counter() - t0) * 1000
            else:
                s["offer_err"] = f"{reply.get('code')} {reply.get('error')}"
            B.wait_for(lambda m, rid=rid: m.get("rid") == rid + 1_000_000, deadline)
        except (OSError, ValueError, TimeoutError, ConnectionError) as e:
            s["offer_err"] = type(e).__name__
            with contextlib.suppress(Exception):  # start again with fresh peers
                A.close()
                B.close()
                A = make_peer("victim-a")
                B = make_peer("victim-b")
        # STUN over UDP and TCP
        tid = os.urandom(12)
        t0 = time.perf_counter()
        try:
            udp.sendto(rc.binding(tid), (host, a.stun))
            deadline = time.time() + 2
            while True:
                udp.settimeout(max(0.001, deadline - time.time()))
                if rc.parse_mapped(udp.recv(2048), tid):
                    s["stun_ms"] = (time.perf_counter() - t0) * 1000
                    break
        except OSError as e:
            s["stun_err"] = type(e).__name__
        tid = os.urandom(12)
        t0 = time.perf_counter()
        try:
            t = socket.create_connection((host, a.stun), timeout=2, source_address=(VICTIM, 0))
            t.sendall(rc.binding(tid))
            data = b""
            while len(data) < 20 or len(data) < 20 + struct.unpack("!H", data[2:4])[0]:
                chunk = t.recv(2048)
                if not chunk:
                    raise ConnectionError("closed")
                data += chunk
            t.close()
            s["stun_tcp_ms" if rc.parse_mapped(data, tid) else "stun_tcp_err"] = (time.perf_counter() - t0) * 1000
        except OSError as e:
            s["stun_tcp_err"] = type(e).__name__
        samples.append(s)
        time.sleep(max(0.0, a.interval - (time.time() - t_start)))
    with open(a.out, "w") as f:
        json.dump(samples, f)


def summarise(samples: list[dict]) -> dict:
    out: dict = {"samples": len(samples)}
    for key in ("register", "offer", "stun", "stun_tcp", "greeting"):
        xs = [s[key + "_ms"] for s in samples if key + "_ms" in s]
        errs = [str(s[key + "_err"]) for s in samples if key + "_err" in s]
        out[key] = {
            "ok": len(xs),
            "failed": len(errs),
            "p50_ms": round(rc.pct(xs, 50), 2),
            "p99_ms": round(rc.pct(xs, 99), 2),
            "max_ms": round(max(xs), 2) if xs else None,
            "errors": sorted({e for e in errs})[:4],
        }
    return out


# ------------------------------------------------------------------------------------------- the attackers


def attack_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=ATTACKS)
    p.add_argument("--signal", type=int, required=True)
    p.add_argument("--stun", type=int, required=True)
    p.add_argument("--stats", required=True)
    a = p.parse_args(argv)
    rc.raise_nofile()
    stop = _stop_flag()
    stats: dict = {"sent": 0, "connections": 0, "refused": 0, "cut": 0}
    host = "127.0.0.1"
    from natbypass.identity import Identity

    ident = Identity.generate()
    try:
        globals()["attack_" + a.name](a, host, stop, stats, ident)
    finally:
        with open(a.stats, "w") as f:
            json.dump(stats, f)


def attack_noread(a, host, stop, stats, ident) -> None:
    conns = []
    for i in range(8):
        c = rc.LineConn(host, a.signal, ATTACKER, timeout=5)
        rc.register(c, ident, f"noread-{i}")
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.s.setblocking(False)
        conns.append(c)
        stats["connections"] += 1
    line = b"\n".join(b'{"op":"ping","rid":%d}' % i for i in range(1, 200)) + b"\n"
    while not stop[0]:
        progressed = False
        for c in conns:
            try:
                c.s.send(line)
                stats["sent"] += 199
                progressed = True
            except BlockingIOError:
                pass
            except OSError:
                stats["cut"] += 1
        if not progressed:
            time.sleep(0.01)


def attack_flood(a, host, stop, stats, ident) -> None:
    line = b"\n".join(b'{"op":"ping","rid":%d}' % i for i in range(1, 100)) + b"\n"
    while not stop[0]:
        try:
            c = rc.LineConn(host, a.signal, ATTACKER, timeout=5)
        except OSError:
            stats["refused"] += 1
            time.sleep(0.01)
            continue
        stats["connections"] += 1
        c.s.setblocking(False)
        try:
            while not stop[0]:
                with contextlib.suppress(BlockingIOError):
                    c.s.send(line)
                    stats["sent"] += 99
                try:
                    if c.s.recv(1 << 16) == b"":
                        stats["cut"] += 1
                        break
                except BlockingIOError:
                    pass
        except OSError:
            stats["cut"] += 1
        finally:
            c.close()


def _hold_many(a, port, sources, per_source, stop, stats, send: bytes | None = None) -> None:
    """Open connections from `sources`, per_source each, hold them; reopen those the server closes."""
    import selectors

    sel = selectors.DefaultSelector()
    slots = [(src, j) for src in sources for j in range(per_source)]
    held: dict = {}
    while not stop[0]:
        for slot in slots:
            if stop[0]:
                break
            if slot in held:
                continue
            try:
                s = socket.socket()
                s.bind((slot[0], 0))
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
                sel.register(s, selectors.EVENT_READ, slot)
                held[slot] = s
                stats["connections"] += 1
            except OSError:
                stats["refused"] += 1
                with contextlib.suppress(Exception):
                    s.close()
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                stats["cut"] += 1
                sel.unregister(s)
                s.close()
                held.pop(key.data, None)
    stats["held_at_end"] = len(held)
    for s in held.values():
        s.close()


def attack_conns(a, host, stop, stats, ident) -> None:
    _hold_many(a, a.signal, [ATTACKER], 400, stop, stats)


def attack_globalcap(a, host, stop, stats, ident) -> None:
    _hold_many(a, a.signal, [f"127.0.10.{i}" for i in range(1, 121)], 100, stop, stats)


def attack_stuntcp(a, host, stop, stats, ident) -> None:
    _hold_many(a, a.stun, [f"127.0.11.{i}" for i in range(1, 201)], 20, stop, stats)


def attack_offerslots(a, host, stop, stats, ident) -> None:
    conns = []
    for i in range(6):
        c = rc.LineConn(host, a.signal, ATTACKER, timeout=5)
        rc.register(c, ident, f"slots-{i}")
        c.s.setblocking(False)
        conns.append(c)
        stats["connections"] += 1
    rid = 10
    desc = json.dumps(rc.DESCRIPTION)[1:-1].encode()
    while not stop[0]:
        for c in conns:
            rid += 1
            with contextlib.suppress(BlockingIOError, OSError):
                c.s.send(b'{"op":"connect","rid":%d,"peer":"victim-b",%s}\n' % (rid, desc))
                stats["sent"] += 1
            with contextlib.suppress(BlockingIOError, OSError):
                data = c.s.recv(1 << 16)
                for line in data.split(b"\n"):
                    if b'"ping"' in line:
                        with contextlib.suppress(Exception):
                            r = json.loads(line)["rid"]
                            c.s.send(b'{"op":"pong","rid":%d}\n' % r)
                    elif b"429" in line:
                        stats["refused"] += 1
        time.sleep(0.002)


def attack_stunflood(a, host, stop, stats, ident) -> None:
    socks = []
    for i in range(4000):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.6.{i >> 8}.{(i & 255) or 1}", 0))
        s.setblocking(False)
        socks.append(s)
    reqs = [rc.binding(os.urandom(12)) for _ in range(64)]
    i = 0
    while not stop[0]:
        for _ in range(1000):
            i += 1
            with contextlib.suppress(BlockingIOError, OSError):
                socks[i % 4000].sendto(reqs[i & 63], ("127.0.0.1", a.stun))
                stats["sent"] += 1
        if i % 50000 < 1000:
            for s in socks:
                with contextlib.suppress(BlockingIOError, OSError):
                    while True:
                        s.recv(2048)


# ------------------------------------------------------------------------------------------- orchestration


def syn_meter_rules(table: str, ports: list[int], rate: int, burst: int) -> str:
    """
    The operator's SYN rate limit of docs/reliability.md (finding 2), for the
    campaign: new TCP connections to PORTS on loopback over RATE/s (bursts of
    BURST) per source address are dropped in the kernel, before the accept
    queue.  Its own table, deleted after the run.
    """
    rules = "".join(
        f"    iifname lo tcp dport {port} tcp flags & (fin|syn|rst|ack) == syn "
        f"meter {table}_{port} {{ ip saddr timeout 60s limit rate over {rate}/second burst {burst} packets }} drop\n"
        for port in ports
    )
    return f"table inet {table} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n{rules}  }}\n}}\n"


@contextlib.contextmanager
def syn_meter(ports: list[int], spec: str | None):
    """Install the SYN meter (RATE/BURST) for the run, or nothing when SPEC is None; always removed."""
    if not spec:
        yield None
        return
    rate, _, burst = spec.partition("/")
    table = f"natbypass_abuse_{os.getpid()}"
    text = syn_meter_rules(table, ports, int(rate), int(burst or rate))
    subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)
    try:
        yield text
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--cooldown", type=float, default=5)
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument(
        "--attacker-nice",
        type=int,
        default=10,
        help="the attacker runs flat out but at this niceness, so that on a 2-CPU machine the measuring "
        "client is not queued behind it (a real attacker is on another machine)",
    )
    p.add_argument(
        "--syn-meter",
        metavar="RATE/BURST",
        help="root: drop new TCP connections to the mediator's signalling and STUN ports over RATE/s per source "
        "(bursts of BURST) in the kernel, with an nftables meter (the operator rule of docs/reliability.md), "
        "for the whole run; the rule is removed at the end",
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=4096,
        help="listen backlog of the signalling endpoint (0: Twisted's default, 50); the campaigns use 4096 so "
        "that thousands of peers can connect at once (docs/reliability.md section 4)",
    )
    p.add_argument(
        "--mediator-args",
        default="",
        help="extra options for the mediator, one string (e.g. '--stun-global-rate 0'): every limit is at its "
        "default otherwise",
    )
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what we started
    rc.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="nb-abuse-")
    result: dict = {
        "machine": rc.machine(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "phases": {},
    }
    med = None
    victim = attacker = None
    rss: list[tuple[float, int]] = []
    t_begin = time.time()

    def sample_rss(seconds: float) -> None:
        end = time.time() + seconds
        while time.time() < end:
            rss.append((round(time.time() - t_begin, 1), rc.rss_kib(med.pid)))
            time.sleep(1)

    meter = contextlib.ExitStack()
    try:
        med = rc.Mediator(tmp, ["--offer-timeout", "10", *a.mediator_args.split()], alternate=False, backlog=a.backlog)
        result["mediator_cmd"] = " ".join(med.cmd)
        result["syn_meter"] = meter.enter_context(syn_meter([med.signal_port, med.stun_port], a.syn_meter))
        for phase in ["idle", *a.attacks.split(",")]:
            out = os.path.join(tmp, f"victim-{phase}.json")
            victim = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "victim",
                    "--signal",
                    str(med.signal_port),
                    "--stun",
                    str(med.stun_port),
                    "--out",
                    out,
                    "--identity",
                    os.path.join(tmp, "victim.pem"),
                ]
            )
            deadline = time.time() + 20
            while not os.path.exists(out + ".ready") and time.time() < deadline and victim.poll() is None:
                time.sleep(0.05)
            if not os.path.exists(out + ".ready"):
                raise RuntimeError(f"the well-behaved client could not start in phase {phase}")
            stats_file = os.path.join(tmp, f"attack-{phase}.json")
            if phase != "idle":
                attacker = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "attack",
                        phase,
                        "--signal",
                        str(med.signal_port),
                        "--stun",
                        str(med.stun_port),
                        "--stats",
                        stats_file,
                    ],
                    preexec_fn=lambda: os.nice(a.attacker_nice),
                )
            rss0 = rc.rss_kib(med.pid)
            before = med.metrics()
            sample_rss(a.seconds)
            after = med.metrics()
            rss1 = rc.rss_kib(med.pid)
            for proc in (attacker, victim):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            attacker_stats = {}
            with contextlib.suppress(OSError, ValueError):
                attacker_stats = json.load(open(stats_file))
            attacker = victim = None
            try:
                samples = json.load(open(out))
            except (OSError, ValueError):
                samples = []
            delta = {
                k: after[k] - before.get(k, 0)
                for k in after
                if (("_total" in k) or k.startswith("natbypass_stun_")) and after[k] != before.get(k, 0)
            }
            ph = {
                "victim": summarise(samples),
                "attacker": attacker_stats,
                "rss_kib_start": rss0,
                "rss_kib_end": rss1,
                "counters_delta": delta,
                "mediator_alive": med.alive(),
                "gauges_end": {
                    k: v
                    for k, v in after.items()
                    if k.startswith("natbypass_mediator_") and "_total" not in k and "{" not in k
                },
            }
            result["phases"][phase] = ph
            print(
                phase, json.dumps({"victim": ph["victim"], "attacker": attacker_stats, "rss": (rss0, rss1)}), flush=True
            )
            sample_rss(a.cooldown)
        result["rss_series"] = rss
        result["final_gauges"] = {
            k: v
            for k, v in med.metrics().items()
            if k.startswith("natbypass_mediator_") and "_total" not in k and "{" not in k
        }
    finally:
        meter.close()
        for proc in (attacker, victim):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if med is not None:
            result["mediator_exit"] = med.stop()
            bad = med.problems()
            result["mediator_problem_lines"] = len(bad)
            result["mediator_problem_sample"] = bad[:20]
        result["tmp"] = tmp
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1, default=str)
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    # the table
    idle = result["phases"].get("idle", {}).get("victim", {})
    print(f"\nmachine: {result['machine']}")
    print(
        "| phase | register p50/p99 ms (fail) | offer p50/p99 ms (fail) | STUN UDP p50/p99 (fail) | STUN TCP p50/p99 (fail) "
        "| connect-to-greeting p50/p99 | p99 / idle (reg, offer, udp, tcp) | RSS start -> end MiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for phase, ph in result["phases"].items():
        v = ph["victim"]
        cells, ratios = [], []
        for key in ("register", "offer", "stun", "stun_tcp"):
            x = v.get(key, {})
            cells.append(
                f"{x.get('p50_ms')} / {x.get('p99_ms')} ({x.get('failed')}/{x.get('ok', 0) + x.get('failed', 0)})"
            )
            base = idle.get(key, {}).get("p99_ms")
            ratios.append(f"{x.get('p99_ms', float('nan')) / base:.1f}" if base else "-")
        g = v.get("greeting", {})
        cells.append(f"{g.get('p50_ms')} / {g.get('p99_ms')}")
        print(
            f"| {phase} | " + " | ".join(cells) + f" | {', '.join(ratios)} | "
            f"{ph['rss_kib_start'] / 1024:.1f} -> {ph['rss_kib_end'] / 1024:.1f} |"
        )
    print(f"mediator problem log lines: {result.get('mediator_problem_lines')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "victim":
        victim_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "attack":
        attack_main(sys.argv[2:])
    else:
        main()

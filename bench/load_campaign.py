"""
Load: --peers registered peers held on the real `twistd natbypass-mediator`,
registration churn at --churn per second and offers at --offers per second
among the held peers, for --seconds; the mediator's RSS, tracked objects
and gauges over time, and whether every offer was answered.

    python3 bench/load_campaign.py --peers 10000 --churn 200 --offers 100 --seconds 600 --json /tmp/load.json

- held peers: bench/signal_load.py generators (--generators of them, each
  from its own 127.0.0.x), which also drive the offers (`GO`): each offer is
  connect -> the target gets the offer -> accepts -> both get `session`;
  "answered" = both sessions arrived (the generator reports what did not).
- churn (a process of this script, `churn`): every 1/--churn s a new TCP
  connection from one of 127.0.1.1..20 registers an id of a pool of
  --churn-ids ids (one key, `replace`), holds it 0-2 s, and disconnects, so
  the mediator keeps creating and dropping peers (ids are reused: the id
  table must stay flat).
- the mediator runs under bench/twistd_gcstats.py (twistd plus a thread
  counting gc-tracked objects every 10 s) with `--max-per-source 0
  --accept-rate 0 --max-connections 30000` (the held peers come from few
  loopback addresses, 2,500 each within seconds);
  every other limit is its default.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relcommon as rc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def churn_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--ids", type=int, default=4000)
    p.add_argument("--stats", required=True)
    a = p.parse_args(argv)
    rc.raise_nofile()
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory
    from twisted.internet.task import LoopingCall
    from twisted.protocols.basic import LineReceiver

    from natbypass.identity import Identity

    ident = Identity.generate()
    pub = rc.b64u(ident.public_bytes())
    stats = {
        "started": 0,
        "registered": 0,
        "errors": {},
        "failed_connect": 0,
        "lost_before_registered": 0,
        "latencies": [],
    }
    rng = random.Random(7)

    class Churner(LineReceiver):
        delimiter = b"\n"

        def __init__(self, peer_id: str) -> None:
            self.peer_id = peer_id
            self.done = False

        def lineReceived(self, line: bytes) -> None:
            msg = json.loads(line)
            op = msg.get("op")
            if op == "hello":
                nonce = rc.base64.urlsafe_b64decode(msg["nonce"] + "=" * (-len(msg["nonce"]) % 4))
                self.t0 = time.perf_counter()
                self.sendLine(b'{"op":"hello","rid":1,"v":2}')
                self.sendLine(
                    json.dumps(
                        {
                            "op": "register",
                            "rid": 2,
                            "id": self.peer_id,
                            "key": pub,
                            "replace": True,
                            "sig": rc.b64u(ident.sign_registration(nonce, self.peer_id)),
                        }
                    ).encode()
                )
            elif op == "registered":
                self.done = True
                stats["registered"] += 1
                if len(stats["latencies"]) < 200000:
                    stats["latencies"].append((time.perf_counter() - self.t0) * 1000)
                reactor.callLater(rng.uniform(0, 2), self.transport.loseConnection)
            elif op == "ping":
                self.sendLine(b'{"op":"pong","rid":%d}' % msg["rid"])
            elif op == "error":
                key = f"{msg.get('code')} {msg.get('error')}"
                stats["errors"][key] = stats["errors"].get(key, 0) + 1

        def connectionLost(self, reason=None) -> None:
            if not self.done:
                stats["lost_before_registered"] += 1

    class F(ClientFactory):
        def buildProtocol(self, addr):
            stats["started"] += 1
            return Churner(f"churn-{stats['started'] % a.ids}")

        def clientConnectionFailed(self, connector, reason) -> None:
            stats["failed_connect"] += 1

    factory = F()
    n = [0]
    t_start = time.perf_counter()

    def tick() -> None:
        due = int((time.perf_counter() - t_start) * a.rate)
        while n[0] < due:
            n[0] += 1
            reactor.connectTCP("127.0.0.1", a.port, factory, timeout=10, bindAddress=(f"127.0.1.{n[0] % 20 + 1}", 0))

    LoopingCall(tick).start(0.01)

    def dump(*_) -> None:
        lat = stats.pop("latencies")
        stats["register_p50_ms"] = round(rc.pct(lat, 50), 2)
        stats["register_p99_ms"] = round(rc.pct(lat, 99), 2)
        stats["seconds"] = round(time.perf_counter() - t_start, 1)
        with open(a.stats, "w") as f:
            json.dump(stats, f)
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, dump)
    reactor.run(installSignalHandlers=False)


def readline_with(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    import select

    deadline = time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 1)
        if r:
            line = proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"generator exited while waiting for {prefix}")
            if line.startswith(prefix):
                return line
    raise TimeoutError(f"no {prefix} within {timeout} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=10000)
    p.add_argument("--generators", type=int, default=4)
    p.add_argument("--churn", type=float, default=200)
    p.add_argument("--churn-ids", type=int, default=4000)
    p.add_argument("--offers", type=float, default=100, help="offers per second in all")
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what we started
    rc.raise_nofile(1 << 17)
    tmp = tempfile.mkdtemp(prefix="nb-load-")
    gcfile = os.path.join(tmp, "gc.txt")
    res: dict = {"machine": rc.machine(), "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    med = churn = None
    gens: list[subprocess.Popen] = []
    try:
        med = rc.Mediator(
            tmp,
            ["--max-per-source", "0", "--accept-rate", "0", "--max-connections", "30000", "--status-interval", "30"],
            alternate=False,
            gc_stats=gcfile,
        )
        res["mediator_cmd"] = " ".join(med.cmd)
        res["rss_kib_empty"] = rc.rss_kib(med.pid)
        per = a.peers // a.generators
        t0 = time.time()
        for g in range(a.generators):
            gens.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.join(HERE, "signal_load.py"),
                        "--port",
                        str(med.signal_port),
                        "--source",
                        f"127.0.0.{11 + g}",
                        "--prefix",
                        f"g{g}",
                        "-n",
                        str(per),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        for g in gens:
            readline_with(g, "REGISTERED", 300)
        res["register_all_s"] = round(time.time() - t0, 1)
        time.sleep(3)
        res["rss_kib_registered"] = rc.rss_kib(med.pid)
        print(
            f"{a.peers} peers registered in {res['register_all_s']} s; RSS {res['rss_kib_registered']} KiB", flush=True
        )
        churn = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "churn",
                "--port",
                str(med.signal_port),
                "--rate",
                str(a.churn),
                "--ids",
                str(a.churn_ids),
                "--stats",
                os.path.join(tmp, "churn.json"),
            ]
        )
        for g in gens:
            g.stdin.write(f"GO {a.offers / a.generators} {a.seconds}\n".encode())
            g.stdin.flush()
        series = []
        t_run = time.time()
        while time.time() - t_run < a.seconds:
            m = med.metrics()
            series.append(
                {
                    "t": round(time.time() - t_run),
                    "rss_kib": rc.rss_kib(med.pid),
                    "peers": m.get("natbypass_mediator_peers"),
                    "connections": m.get("natbypass_mediator_open_connections"),
                    "pending_offers": m.get("natbypass_mediator_pending_offers"),
                    "open_sessions": m.get("natbypass_mediator_open_sessions"),
                    "lag_s": m.get("natbypass_event_loop_lag_seconds"),
                }
            )
            print(json.dumps(series[-1]), flush=True)
            time.sleep(10)
        results = []
        for g in gens:
            line = readline_with(g, "RESULT", 120)
            results.append(json.loads(line.split(" ", 1)[1]))
        churn.send_signal(signal.SIGTERM)
        churn.wait(30)
        res["churn"] = json.load(open(os.path.join(tmp, "churn.json")))
        relay = [x for r in results for x in r["relay"]]
        full = [x for r in results for x in r["full"]]
        res["offers"] = {
            "sent": sum(r["sent"] for r in results),
            "answered": sum(r["completed"] for r in results),
            "unanswered": sum(r["unfinished"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "lost_connections": sum(r["lost"] for r in results),
            "full_p50_ms": round(rc.pct(full, 50) * 1000, 2),
            "full_p99_ms": round(rc.pct(full, 99) * 1000, 2),
            "relay_p50_ms": round(rc.pct(relay, 50) * 1000, 2),
            "relay_p99_ms": round(rc.pct(relay, 99) * 1000, 2),
        }
        res["series"] = series
        try:
            res["gc_tracked"] = [tuple(map(float, line.split())) for line in open(gcfile)]
        except OSError:
            res["gc_tracked"] = []
        res["mediator_cpu_s"] = rc.cpu_seconds(med.pid)
    finally:
        for g in gens:
            if g.poll() is None:
                try:
                    g.stdin.write(b"QUIT\n")
                    g.stdin.flush()
                    g.wait(10)
                except Exception:
                    g.kill()
                    g.wait()
        if churn is not None and churn.poll() is None:
            churn.kill()
            churn.wait()
        if med is not None:
            res["mediator_exit"] = med.stop(timeout=30)
            bad = med.problems()
            res["mediator_problem_lines"] = len(bad)
            res["mediator_problem_sample"] = bad[:20]
        res["tmp"] = tmp
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    s = res.get("series", [])
    print(f"\nmachine: {res['machine']}")
    print(f"offers: {res.get('offers')}")
    print(f"churn: {res.get('churn')}")
    if s:
        print(
            f"RSS KiB: empty {res['rss_kib_empty']}, registered {res['rss_kib_registered']}, "
            f"first sample {s[0]['rss_kib']}, last {s[-1]['rss_kib']}, max {max(x['rss_kib'] for x in s)}"
        )
    g = res.get("gc_tracked", [])
    if g:
        print(f"gc-tracked objects: first {g[0][1]:.0f}, last {g[-1][1]:.0f}, max {max(x[1] for x in g):.0f}")
    print(f"mediator problem log lines: {res.get('mediator_problem_lines')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "churn":
        churn_main(sys.argv[2:])
    else:
        main()

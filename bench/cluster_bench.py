"""
Cluster benchmark: introductions per second and their latency with 1, 2 and
4 mediator processes on one Redis, side by side with one in-memory mediator
(no --redis), in one invocation.

    python3 bench/cluster_bench.py --peers 2000 --seconds 5 --p99-bound 50 --json /tmp/cluster.json

For each configuration (`memory`, `redis-1`, `redis-2`, `redis-4`):

1. a fresh redis-server of our own on a Unix socket in a temporary directory
   (the redis-* runs), and the mediator processes (this script's `mediator`
   subcommand: the signalling half only, limits off, `--redis unix://...`);
2. --generators load processes (this script's `gen` subcommand: the peers of
   bench/signal_load.py, each from its own 127.0.0.x) register --peers peers
   in total, spread round-robin over the mediators;
3. offers at a ladder of rates (--rates, offers/s), --seconds each: each
   offer goes from a peer on mediator i to a peer on mediator i+1 (so with 2
   or 4 mediators every offer crosses Redis; with 1 they stay local), the
   target accepts, both receive the session.  Measured per step: offer ->
   offer-received (relay) and offer -> both sessions (full, the
   "introduction") p50/p99, completed/sent, CPU of the mediators and of the
   generators.  A step holds when its full p99 is under --p99-bound ms and
   99% of its offers completed; the "sustained rate" is the highest step that
   held.  The ladder stops after two failing steps in a row (one alone is
   often other load on a shared machine).

The first step (--probe-rate, low) gives the latency without queueing: the
Redis hop is its full p50 with 2 mediators minus its full p50 in memory.

Everything stays on loopback.  All processes share this machine's CPUs: the
ratios between configurations come from the same run and say more than the
absolute rates (see docs/performance.md, "Cluster").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import relcommon as rc  # noqa: E402  (bench/ is on sys.path when run as a script)
from signal_bench import pct, readline_with  # noqa: E402

REDIS = shutil.which("redis-server")


# ------------------------------------------------------------------ the mediator process


def mediator_main(argv: list[str]) -> None:
    """The signalling half of a mediator, limits off; prints LISTENING <port> once bound (and on Redis)."""
    p = argparse.ArgumentParser(prog="cluster_bench.py mediator")
    p.add_argument("--redis")
    p.add_argument("--offer-timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    rc.raise_nofile()
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner
    from twisted.logger import textFileLogObserver as text

    from natbypass.signaling.service import makeSignalingService

    warn = [LogLevelFilterPredicate(LogLevel.warn)]
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(text(sys.stderr), warn)], redirectStandardIO=False)
    svc = makeSignalingService(
        "tcp:0:interface=127.0.0.1:backlog=4096",
        reactor,
        max_peers=0,
        max_per_source=0,
        max_connections=0,
        rate=0,
        accept_rate=0,
        offer_timeout=a.offer_timeout,
        status_interval=0,
        redis=a.redis,
    )
    svc.startService()
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)

    def listening(port: Any) -> None:
        def ready() -> None:
            if a.redis is None or svc.state.status().get("cluster_available"):
                wait.stop()
                print(f"LISTENING {port.getHost().port}", flush=True)

        wait = LoopingCall(ready)
        wait.start(0.05)

    svc.whenListening().addCallbacks(listening, lambda f: (print(f"FAILED {f.value}", flush=True), reactor.stop()))
    reactor.run()


# ------------------------------------------------------------------ the load generator


def gen_main(argv: list[str]) -> None:
    """bench/signal_load.py's peers, spread over several mediators; offers go to the next mediator's peers."""
    p = argparse.ArgumentParser(prog="cluster_bench.py gen")
    p.add_argument("--ports", required=True, help="comma-separated signalling ports of the mediators")
    p.add_argument("--source", default="127.0.0.2")
    p.add_argument("--prefix", default="g0")
    p.add_argument("-n", type=int, default=1000)
    a = p.parse_args(argv)
    rc.raise_nofile()
    import gc

    import signal_load as sl
    from twisted.internet import reactor, stdio
    from twisted.internet.task import LoopingCall

    ports = [int(x) for x in a.ports.split(",")]

    class MediatorFactory(sl.Factory):
        """The peers of one mediator: each knows which one it registered on."""

        def __init__(self, gen: sl.Generator, index: int, names: list[str]) -> None:
            self.gen = gen
            self.index = index
            self.names = iter(names)

        def buildProtocol(self, addr: Any) -> sl.BenchPeer:
            peer = sl.BenchPeer(self.gen, next(self.names))
            peer.mediator = self.index
            return peer

    class ClusterGenerator(sl.Generator):
        def __init__(self) -> None:
            super().__init__("127.0.0.1", 0, a.source, a.prefix, a.n)
            k = len(ports)
            self.plan = [(j, [nm for i, nm in enumerate(self.names) if i % k == j]) for j in range(k)]

        def start(self) -> None:
            factories = [
                (port, MediatorFactory(self, j, names), len(names)) for (j, names), port in zip(self.plan, ports)
            ]
            todo = [(port, factory) for port, factory, count in factories for _ in range(count)]

            def batch() -> None:
                for port, factory in todo[:200]:
                    reactor.connectTCP("127.0.0.1", port, factory, bindAddress=(self.source, 0))
                del todo[:200]
                if not todo:
                    loop.stop()

            loop = LoopingCall(batch)
            loop.start(0.02)

        def go(self, rate: float, seconds: float, done: Any) -> None:
            self.relay, self.full = [], []
            errors0 = self.errors
            k = len(ports)
            by = [[q for q in self.peers if q.mediator == j] for j in range(k)]
            order = [q for i in range(max(map(len, by))) for lst in by if i < len(lst) for q in [lst[i]]]
            pos = {q.name: i for j in range(k) for i, q in enumerate(by[j])}
            n = len(order)
            start = time.perf_counter()
            state = {"sent": 0, "i": 0, "busy": 0}

            def target(a_: sl.BenchPeer) -> sl.BenchPeer:
                if k == 1:  # one mediator: half-way round its peers, as signal_load.py does
                    return by[0][(pos[a_.name] + n // 2) % n]
                lst = by[(a_.mediator + 1) % k]
                return lst[pos[a_.name] % len(lst)]

            def tick() -> None:
                now = time.perf_counter()
                if now - start >= seconds:
                    loop.stop()
                    reactor.callLater(2.0, finish)
                    return
                due = int((now - start) * rate)
                tries = 0
                while state["sent"] < due and tries < n:
                    tries += 1
                    a_ = order[state["i"] % n]
                    state["i"] += 1
                    if a_.name in self.pending:
                        state["busy"] += 1
                        continue
                    self.pending[a_.name] = [time.perf_counter(), 0.0, 0]
                    a_.connect_to(target(a_).name)
                    state["sent"] += 1

            def finish() -> None:
                done(
                    {
                        "sent": state["sent"],
                        "completed": len(self.full),
                        "unfinished": len(self.pending),
                        "skipped_busy": state["busy"],
                        "errors": self.errors - errors0,
                        "lost": self.lost,
                        "relay": self.relay,
                        "full": self.full,
                    }
                )
                self.pending.clear()

            loop = LoopingCall(tick)
            loop.start(0.002)

    gc.disable()  # a short-lived measuring tool: its own collector pauses would be blamed on the mediators
    gen = ClusterGenerator()
    stdio.StandardIO(sl.Control(gen))
    reactor.callWhenRunning(gen.start)
    reactor.run()


# ------------------------------------------------------------------ the driver


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen(
        [REDIS, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(250):
        if os.path.exists(sock):
            return proc, sock
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_config(name: str, mediators: int, use_redis: bool, a: argparse.Namespace) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="cluster-bench-")
    procs: list[subprocess.Popen] = []
    gens: list[subprocess.Popen] = []
    redis = None
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "mediator"]
        if use_redis:
            redis, sock = start_redis(directory)
            cmd += ["--redis", f"unix://{sock}"]
        meds = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(mediators)]
        procs += meds
        ports = [int(readline_with(m, "LISTENING ", 30)) for m in meds]
        per = a.peers // a.generators
        t0 = time.monotonic()
        for g in range(a.generators):
            gens.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "gen", "--ports", ",".join(map(str, ports)),
                     "--source", f"127.0.0.{g + 2}", "--prefix", f"g{g}", "-n", str(per)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
            )  # fmt: skip
        for gen in gens:
            readline_with(gen, "REGISTERED ", 120)
        register_s = time.monotonic() - t0
        time.sleep(1.0)
        steps = []
        failing = 0
        for rate in [a.probe_rate, *a.rates]:
            m0 = sum(cpu_seconds(m.pid) for m in meds)
            g0 = sum(cpu_seconds(g.pid) for g in gens)
            r0 = cpu_seconds(redis.pid) if redis is not None else 0.0
            for gen in gens:
                gen.stdin.write(f"GO {rate / a.generators} {a.seconds}\n")
                gen.stdin.flush()
            results = [json.loads(readline_with(gen, "RESULT ", a.seconds + 60)) for gen in gens]
            span = a.seconds + 2.0  # the generators wait 2 s for late answers
            full = [x for r in results for x in r["full"]]
            relay = [x for r in results for x in r["relay"]]
            sent = sum(r["sent"] for r in results)
            step = {
                "rate": rate,
                "sent": sent,
                "completed": len(full),
                "completed_rate": round(len(full) / a.seconds, 1),
                "errors": sum(r["errors"] for r in results),
                "skipped_busy": sum(r["skipped_busy"] for r in results),
                "relay_p50_ms": round(pct(relay, 50) * 1000, 2),
                "relay_p99_ms": round(pct(relay, 99) * 1000, 2),
                "full_p50_ms": round(pct(full, 50) * 1000, 2),
                "full_p99_ms": round(pct(full, 99) * 1000, 2),
                "mediators_cpu_percent": round(100 * (sum(cpu_seconds(m.pid) for m in meds) - m0) / span, 1),
                "generators_cpu_percent": round(100 * (sum(cpu_seconds(g.pid) for g in gens) - g0) / span, 1),
                "redis_cpu_percent": round(100 * (cpu_seconds(redis.pid) - r0) / span, 1) if redis else None,
                "loadavg": open("/proc/loadavg").read().split()[0],
            }
            step["held"] = bool(sent and len(full) >= 0.99 * sent and step["full_p99_ms"] <= a.p99_bound)
            steps.append(step)
            print(f"{name}: {json.dumps(step)}", file=sys.stderr, flush=True)
            failing = failing + 1 if rate != a.probe_rate and not step["held"] else 0
            if failing >= 2:  # two steps in a row: one alone may be other load on the machine
                break
            time.sleep(a.settle)
        held = [s for s in steps[1:] if s["held"]]
        best = max(held, key=lambda s: s["rate"]) if held else None
        return {
            "config": name,
            "mediators": mediators,
            "redis": use_redis,
            "register_seconds": round(register_s, 1),
            "probe": steps[0],
            "sustained_rate": best["rate"] if best else 0,
            "sustained_completed_rate": best["completed_rate"] if best else 0,
            "sustained_p99_ms": best["full_p99_ms"] if best else None,
            "steps": steps,
        }
    finally:
        for gen in gens:
            try:
                gen.stdin.write("QUIT\n")
                gen.stdin.flush()
            except (OSError, ValueError):
                pass
        stop(gens)
        stop(procs)
        if redis is not None:
            stop([redis])
        shutil.rmtree(directory, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "mediator":
        mediator_main(sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "gen":
        gen_main(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2000, help="registered peers, all generators together")
    p.add_argument("--generators", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each rate step")
    p.add_argument("--settle", type=float, default=1.0, help="pause between steps")
    p.add_argument("--probe-rate", type=float, default=50.0, help="the first, unloaded step (offers/s)")
    p.add_argument(
        "--rates",
        default="200,300,400,500,600,700,800,1000,1200,1400,1600,2000,2400",
        help="the ladder of offer rates (offers/s, all generators together)",
    )
    p.add_argument("--p99-bound", type=float, default=50.0, help="ms: a step holds while the full p99 is under it")
    p.add_argument("--configs", default="memory,redis-1,redis-2,redis-4")
    p.add_argument("--json", help="also write the results as JSON to this file")
    a = p.parse_args()
    a.rates = [float(x) for x in a.rates.split(",")]
    if REDIS is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    rc.raise_nofile()
    configs = []
    for name in a.configs.split(","):
        kind, _, count = name.partition("-")
        configs.append(run_config(name, int(count or 1), kind == "redis", a))
    by = {c["config"]: c for c in configs}

    def ratio(x: str, y: str) -> float | None:
        if x in by and y in by and by[y]["sustained_rate"]:
            return round(by[x]["sustained_rate"] / by[y]["sustained_rate"], 2)
        return None

    out = {
        "machine": rc.machine(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "p99_bound_ms": a.p99_bound,
        "peers": a.peers,
        "configs": configs,
        "ratio_redis2_over_redis1": ratio("redis-2", "redis-1"),
        "ratio_redis4_over_redis1": ratio("redis-4", "redis-1"),
        "ratio_redis1_over_memory": ratio("redis-1", "memory"),
        "redis_hop_p50_ms": round(by["redis-2"]["probe"]["full_p50_ms"] - by["memory"]["probe"]["full_p50_ms"], 2)
        if "redis-2" in by and "memory" in by
        else None,
    }
    summary = {k: v for k, v in out.items() if k != "configs"}
    summary["table"] = [
        {k: c[k] for k in ("config", "sustained_rate", "sustained_completed_rate", "sustained_p99_ms")}
        | {"probe_full_p50_ms": c["probe"]["full_p50_ms"], "probe_full_p99_ms": c["probe"]["full_p99_ms"]}
        for c in configs
    ]
    print(json.dumps(summary, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Shared pieces of the reliability campaigns (bench/fuzz_campaign.py,
bench/abuse_campaign.py): start the real `twistd natbypass-mediator` and
`natbypass-peer` on loopback, read their RSS and metrics, grep their logs, and
a well-behaved client that samples the mediator every second.

This is a measuring tool, not protocol logic: it uses blocking sockets,
`time.perf_counter` and the project's codec only to build valid requests.

    python3 bench/relcommon.py probe --stun 127.0.0.1:PORT --signal 127.0.0.1:PORT --out FILE

runs the well-behaved client until SIGTERM, then writes its samples (JSON) to FILE.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

COOKIE = 0x2112A442
PROBLEM_PATTERNS = ("Traceback", "Unhandled", "failed on", "internal-error", "CRITICAL")


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} vCPU {cpu}, Linux {platform.release()}, Python {platform.python_version()}"


def raise_nofile(want: int = 1 << 16) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (the hard limit too, when root may); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs))) - 1))]


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _port_free(host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def pick_ports(hosts: tuple[str, ...] = ("127.0.0.1",), n: int = 1) -> int:
    """A base port P with P..P+n-1 free (TCP and UDP) on every host (a bench may race; it then fails loudly)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000)
        if all(_port_free(h, base + i) for h in hosts for i in range(n)):
            return base
    raise RuntimeError("no free ports")


def scrape(port: int, path: str = "/metrics", timeout: float = 5.0) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
    return out


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def log_problems(path: str) -> list[str]:
    """Lines of a twistd log that show a bug: a traceback, an unhandled error, a responder failure, a 500."""
    bad = []
    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
        for line in f:
            if any(p in line for p in PROBLEM_PATTERNS):
                bad.append(line.rstrip())
    return bad


def twistd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Proc:
    """A twistd process with its log file; stop() is idempotent and always reaps it."""

    def __init__(self, name: str, args: list[str], log: str, cwd: str, gc_stats: str | None = None) -> None:
        self.name, self.log = name, log
        full = ["twistd", "-n", "--pidfile=", "-l", log, *args]
        self.cmd = full
        env = twistd_env()
        if gc_stats:  # the same twistd, with a thread counting tracked objects (bench/twistd_gcstats.py)
            full = [sys.executable, os.path.join(HERE, "twistd_gcstats.py"), *full[1:]]
            env["NB_GCSTATS"] = gc_stats
        self.p = subprocess.Popen(full, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=open(log + ".stderr", "w"))
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        return self.p.returncode

    def problems(self) -> list[str]:
        return log_problems(self.log) + log_problems(self.log + ".stderr")


class Mediator(Proc):
    def __init__(
        self,
        tmp: str,
        extra: list[str] = (),
        alternate: bool = True,
        tag: str = "mediator",
        gc_stats: str | None = None,
        backlog: int = 4096,
    ) -> None:
        hosts = ("127.0.0.1", "127.0.0.2") if alternate else ("127.0.0.1",)
        base = pick_ports(hosts, 4)
        self.stun_port, self.signal_port, self.metrics_port = base, base + 2, base + 3
        self.stun_addrs = [(h, p) for h in hosts for p in ((base, base + 1) if alternate else (base,))]
        args = [
            "natbypass-mediator",
            "--stun",
            f"127.0.0.1:{base}",
            "--signal",
            f"tcp:{self.signal_port}:interface=127.0.0.1" + (f":backlog={backlog}" if backlog else ""),
            "--metrics",
            f"tcp:{self.metrics_port}:interface=127.0.0.1",
            "--status-interval",
            "10",
            *extra,
        ]
        if alternate:
            args[3:3] = ["--stun-alternate", f"127.0.0.2:{base + 1}"]
        super().__init__(tag, args, os.path.join(tmp, f"{tag}.log"), tmp, gc_stats)
        deadline = time.time() + 30
        while not healthy(self.metrics_port):
            if not self.alive() or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mediator did not start: see {self.log} / .stderr")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)


class Peer(Proc):
    """`twistd natbypass-peer` registered at the mediator, its UDP socket within --port-range."""

    def __init__(self, tmp: str, med: Mediator, peer_id: str, extra: list[str] = ()) -> None:
        low = pick_ports(("127.0.0.1",), 8)
        self.port_range = (low, low + 7)
        args = [
            "natbypass-peer",
            "--mediator",
            f"tcp:127.0.0.1:{med.signal_port}",
            "--stun",
            f"127.0.0.1:{med.stun_port}",
            "--id",
            peer_id,
            "--identity",
            os.path.join(tmp, f"{peer_id}.pem"),
            "--port-range",
            f"{low}-{low + 7}",
            *extra,
        ]
        super().__init__(peer_id, args, os.path.join(tmp, f"{peer_id}.log"), tmp)
        self.udp_ports: list[int] = []
        deadline = time.time() + 30
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError(f"peer died: {self.log}")
            self.udp_ports = udp_ports_of(self.pid)
            if self.udp_ports and "registered" in open(self.log, errors="replace").read():
                return
            time.sleep(0.2)
        raise RuntimeError(f"peer did not register: {self.log}")


def udp_ports_of(pid: int) -> list[int]:
    out = subprocess.run(["ss", "-Hulnp"], capture_output=True, text=True).stdout
    ports = []
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]
            ports.append(int(local.rsplit(":", 1)[1]))
    return sorted(set(ports))


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped at sockets bound to PORT (receive buffer full), from /proc/net/udp."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                total += int(fields[-1])
    return total


# -- STUN bits ---------------------------------------------------------------------------------------------


def binding(tid: bytes, attrs: bytes = b"") -> bytes:
    return struct.pack("!HHI12s", 0x0001, len(attrs), COOKIE, tid) + attrs


def parse_mapped(data: bytes, tid: bytes) -> bool:
    """A success response to tid (type 0x0101, our transaction id)?"""
    return len(data) >= 20 and data[:2] == b"\x01\x01" and data[8:20] == tid


# -- signalling bits ---------------------------------------------------------------------------------------


class LineConn:
    """A blocking line client (for the well-behaved client and the abuse scripts' victims)."""

    def __init__(self, host: str, port: int, source: str | None = None, timeout: float = 5.0) -> None:
        self.s = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, obj_or_line) -> None:
        line = (
            obj_or_line if isinstance(obj_or_line, bytes) else json.dumps(obj_or_line, separators=(",", ":")).encode()
        )
        self.s.sendall(line + b"\n")

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the mediator")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def wait_for(self, pred, deadline: float) -> dict:
        while True:
            self.s.settimeout(max(0.01, deadline - time.time()))
            msg = self.recv()
            if msg.get("op") == "ping" and msg.get("rid") is not None:
                self.send({"op": "pong", "rid": msg["rid"]})
                continue
            if pred(msg):
                return msg
            if time.time() > deadline:
                raise TimeoutError("no reply")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.s.close()


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def register(conn: LineConn, identity, peer_id: str, timeout: float = 10.0) -> tuple[float, dict]:
    """Greeting -> hello -> register (signing the greeting's nonce); returns (seconds from hello sent, reply)."""
    deadline = time.time() + timeout
    greeting = conn.wait_for(lambda m: m.get("op") == "hello", deadline)
    nonce = base64.urlsafe_b64decode(greeting["nonce"] + "=" * (-len(greeting["nonce"]) % 4))
    t0 = time.perf_counter()
    conn.send({"op": "hello", "rid": 1, "v": 2})
    conn.send(
        {
            "op": "register",
            "rid": 2,
            "id": peer_id,
            "key": b64u(identity.public_bytes()),
            "sig": b64u(identity.sign_registration(nonce, peer_id)),
            "replace": True,
        }
    )
    reply = conn.wait_for(lambda m: m.get("rid") == 2, deadline)
    return time.perf_counter() - t0, reply


DESCRIPTION = {
    "candidates": [{"kind": "srflx", "proto": "udp", "host": "198.51.100.4", "port": 50500}],
    "nat": {"mapping": "endpoint-independent", "filtering": "endpoint-independent", "port_preserving": True},
    "wish": "auto",
}


# -- the well-behaved client -------------------------------------------------------------------------------


def probe_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stun", required=True)
    p.add_argument("--signal", required=True)
    p.add_argument("--source", default="127.0.0.254")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--out", required=True)
    p.add_argument("--stun-tcp", action="store_true", help="also a STUN Binding over a fresh TCP connection")
    a = p.parse_args(argv)
    from natbypass.identity import Identity

    identity = Identity.generate()
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    stun_host, stun_port = a.stun.rsplit(":", 1)
    sig_host, sig_port = a.signal.rsplit(":", 1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((a.source, 0))
    samples: list[dict] = []
    n = 0
    while not stop[0]:
        n += 1
        t_start = time.time()
        sample: dict = {"t": t_start}
        # STUN Binding over UDP, 2 s to answer
        tid = os.urandom(12)
        t0 = time.perf_counter()
        try:
            udp.sendto(binding(tid), (stun_host, int(stun_port)))
            deadline = time.time() + 2
            while True:
                udp.settimeout(max(0.001, deadline - time.time()))
                data = udp.recv(2048)
                if parse_mapped(data, tid):
                    sample["stun_ms"] = (time.perf_counter() - t0) * 1000
                    break
        except OSError as e:
            sample["stun_err"] = type(e).__name__
        if a.stun_tcp:
            tid = os.urandom(12)
            t0 = time.perf_counter()
            try:
                s = socket.create_connection((stun_host, int(stun_port)), timeout=2, source_address=(a.source, 0))
                s.sendall(binding(tid))
                data = b""
                while len(data) < 20 or len(data) < 20 + struct.unpack("!H", data[2:4])[0]:
                    chunk = s.recv(2048)
                    if not chunk:
                        raise ConnectionError("closed")
                    data += chunk
                s.close()
                if parse_mapped(data, tid):
                    sample["stun_tcp_ms"] = (time.perf_counter() - t0) * 1000
                else:
                    sample["stun_tcp_err"] = "bad-response"
            except OSError as e:
                sample["stun_tcp_err"] = type(e).__name__
        # signalling: connect, hello, register, ping; 5 s in all
        conn = None
        t0 = time.perf_counter()
        try:
            conn = LineConn(sig_host, int(sig_port), a.source, timeout=5)
            reg_s, reply = register(conn, identity, "wellbehaved", timeout=5)
            if reply.get("op") != "registered":
                sample["signal_err"] = f"{reply.get('code')} {reply.get('error')}"
            else:
                sample["register_ms"] = reg_s * 1000
                t1 = time.perf_counter()
                conn.send({"op": "ping", "rid": 77})
                conn.wait_for(lambda m: m.get("rid") == 77 and m.get("op") == "pong", time.time() + 5)
                sample["ping_ms"] = (time.perf_counter() - t1) * 1000
                sample["signal_ms"] = (time.perf_counter() - t0) * 1000
        except (OSError, ValueError, TimeoutError, ConnectionError) as e:
            sample["signal_err"] = type(e).__name__ + ": " + str(e)[:80]
        finally:
            if conn is not None:
                conn.close()
        samples.append(sample)
        time.sleep(max(0.0, a.interval - (time.time() - t_start)))
    with open(a.out, "w") as f:
        json.dump(samples, f)


class Probe:
    """Runs probe_main in a process of its own (its latencies must not wait for the fuzzer's GIL)."""

    def __init__(self, tmp: str, med: Mediator, stun_tcp: bool = False, source: str = "127.0.0.254") -> None:
        self.out = os.path.join(tmp, f"probe-{time.time():.0f}-{random.randrange(1 << 30)}.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "probe",
            "--stun",
            f"127.0.0.1:{med.stun_port}",
            "--signal",
            f"127.0.0.1:{med.signal_port}",
            "--source",
            source,
            "--out",
            self.out,
        ] + (["--stun-tcp"] if stun_tcp else [])
        self.p = subprocess.Popen(cmd)

    def finish(self) -> dict:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        try:
            with open(self.out) as f:
                samples = json.load(f)
        except (OSError, ValueError):
            samples = []
        return summarise(samples)


def summarise(samples: list[dict]) -> dict:
    out: dict = {"samples": len(samples)}
    for key in ("stun", "stun_tcp", "register", "ping", "signal"):
        xs = [s[key + "_ms"] for s in samples if key + "_ms" in s]
        errs = [s[key + "_err"] for s in samples if key + "_err" in s]
        if key in ("register", "ping"):
            errs = []
        if not xs and not errs:
            continue
        out[key] = {
            "ok": len(xs),
            "failed": len(errs),
            "p50_ms": round(pct(xs, 50), 2),
            "p99_ms": round(pct(xs, 99), 2),
            "max_ms": round(max(xs), 2) if xs else None,
            "errors": sorted(set(errs))[:5],
        }
    return out


def fmt_probe(s: dict) -> str:
    parts = [f"{s.get('samples', 0)} samples"]
    for key in ("stun", "stun_tcp", "register", "signal"):
        if key in s:
            v = s[key]
            parts.append(f"{key}: p50 {v['p50_ms']} ms p99 {v['p99_ms']} ms max {v['max_ms']} ms, {v['failed']} failed")
    return "; ".join(parts)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        probe_main(sys.argv[2:])
    else:
        sys.exit(__doc__)

"""
Signalling benchmark: memory per idle registered peer and offer-relay latency.

    python3 bench/signal_bench.py --peers 10000 --rate 1000 --seconds 20

1. starts one mediator process (bench/signal_mediator.py, signalling only,
   limits off) on 127.0.0.1;
2. reads its RSS (/proc/PID/status VmRSS), then lets --generators load
   processes (bench/signal_load.py, each from its own source address 127.0.0.x
   so ephemeral ports never run out) register --peers peers in total, waits
   for the mediator to settle and reads the RSS again: (after - before) / peers
   is the memory per idle peer;
3. drives --rate offers/s for --seconds (each offer: connect -> the target
   receives the offer -> accepts -> both receive the session) and reports
   p50/p99 of the relay latency (connect sent -> offer received) and of the
   full introduction (connect sent -> both sessions received).

Everything stays on loopback.  Run as root or with a high enough hard
RLIMIT_NOFILE (each side needs one descriptor per peer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from relcommon import raise_nofile  # noqa: E402  (bench/ is on sys.path when run as a script)
from stun_bench import prioritise  # noqa: E402  (one way to take the CPUs: a session of our own)

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs) or [float("nan")]
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs))) - 1))]


def readline_with(proc: subprocess.Popen, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process {proc.args} ended before printing {prefix}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"timed out waiting for {prefix}")


def throwaway_certificate(directory: str) -> tuple[str, str]:
    """A self-signed EC certificate for 127.0.0.1/localhost, for the TLS runs."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=10_000)
    p.add_argument("--generators", type=int, default=2)
    p.add_argument("--rate", type=float, default=1000.0, help="offers per second, all generators together")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--log-file", help="let the mediator write its full info-level log here")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--profile", help="profile the mediator (cProfile output file)")
    p.add_argument(
        "--malloc-trim",
        action="store_true",
        help="also report the RSS after glibc malloc_trim(0) "
        "(memory the heap holds but no object uses, e.g. left over from TLS handshakes)",
    )
    p.add_argument("--tls", action="store_true", help="signalling over TLS (a throwaway self-signed certificate)")
    p.add_argument("--gc-stats", action="store_true", help="let the mediator print its garbage-collector pauses")
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="experiment: once the peers are registered, the mediator "
        "runs gc.collect(); gc.freeze() so full collections no longer walk the 10,000 idle connections",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the mediator and generators, in a session "
        "of their own (negative needs root; keeps other load on a shared machine out of the figures)",
    )
    a = p.parse_args()

    raise_nofile()

    med_cmd = [sys.executable, os.path.join(HERE, "signal_mediator.py")]
    tls_dir = None
    if a.tls:
        tls_dir = tempfile.mkdtemp(prefix="signal-bench-")
        key, cert = throwaway_certificate(tls_dir)
        med_cmd += ["--signal", f"ssl:0:interface=127.0.0.1:backlog=4096:privateKey={key}:certKey={cert}"]
    if a.log_file:
        med_cmd += ["--log-file", a.log_file]
    if a.profile:
        med_cmd += ["--profile", a.profile]
    if a.gc_stats:
        med_cmd += ["--gc-stats"]
    if a.nice:
        prioritise(a.nice)  # inherited by the mediator and the generators
    med = subprocess.Popen(med_cmd, stdout=subprocess.PIPE, text=True)
    gens: list[subprocess.Popen] = []
    try:
        port = int(readline_with(med, "LISTENING ", 30))
        time.sleep(1.0)
        rss_before = rss_kib(med.pid)
        per = a.peers // a.generators
        t = time.monotonic()
        for g in range(a.generators):
            gens.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.join(HERE, "signal_load.py"),
                        "--port",
                        str(port),
                        "--source",
                        f"127.0.0.{g + 2}",
                        "--prefix",
                        f"g{g}",
                        "-n",
                        str(per),
                    ]
                    + (["--tls"] if a.tls else []),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for gen in gens:
            readline_with(gen, "REGISTERED ", 300)
        print(
            f"registered {a.peers} peers in {time.monotonic() - t:.1f} s (at {time.monotonic():.1f})",
            file=sys.stderr,
            flush=True,
        )
        register_s = time.monotonic() - t
        time.sleep(3.0)
        frozen = None
        if a.gc_freeze:
            med.send_signal(signal.SIGUSR1)
            frozen = readline_with(med, "FROZEN ", 60)
            print(f"mediator froze {frozen}", file=sys.stderr, flush=True)
            time.sleep(1.0)
        rss_after = rss_kib(med.pid)
        rss_trimmed = None
        if a.malloc_trim:
            med.send_signal(signal.SIGUSR2)
            readline_with(med, "TRIMMED", 60)
            time.sleep(0.5)
            rss_trimmed = rss_kib(med.pid)
        peers = per * a.generators
        per_peer = (rss_after - rss_before) * 1024 / peers

        cpu0 = cpu_seconds(med.pid)
        gen_cpu0 = [cpu_seconds(g.pid) for g in gens]
        for gen in gens:
            gen.stdin.write(f"GO {a.rate / a.generators} {a.seconds}\n")
            gen.stdin.flush()
        print(
            f"driving {a.rate:g} offers/s for {a.seconds:g} s from {time.monotonic():.1f}", file=sys.stderr, flush=True
        )
        results = [json.loads(readline_with(gen, "RESULT ", a.seconds + 60)) for gen in gens]
        cpu = cpu_seconds(med.pid) - cpu0
        gen_cpu = [cpu_seconds(g.pid) - c0 for g, c0 in zip(gens, gen_cpu0)]
        rss_end = rss_kib(med.pid)
        relay = [x for r in results for x in r["relay"]]
        full = [x for r in results for x in r["full"]]
        sent = sum(r["sent"] for r in results)
        out = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
            "peers": peers,
            "register_seconds": round(register_s, 1),
            "rss_before_kib": rss_before,
            "rss_registered_kib": rss_after,
            "bytes_per_idle_peer": round(per_peer),
            "bytes_per_idle_peer_after_malloc_trim": None
            if rss_trimmed is None
            else round((rss_trimmed - rss_before) * 1024 / peers),
            "offers_sent": sent,
            "offers_completed": len(full),
            "offer_rate": round(sent / a.seconds, 1),
            "errors": sum(r["errors"] for r in results),
            "relay_p50_ms": round(pct(relay, 50) * 1000, 2),
            "relay_p99_ms": round(pct(relay, 99) * 1000, 2),
            "full_p50_ms": round(pct(full, 50) * 1000, 2),
            "full_p99_ms": round(pct(full, 99) * 1000, 2),
            "full_max_ms": round(max(full, default=float("nan")) * 1000, 2),
            "mediator_cpu_percent": round(100 * cpu / a.seconds, 1),
            "generator_cpu_percent": [round(100 * c / a.seconds, 1) for c in gen_cpu],
            "rss_end_kib": rss_end,
            "nice": a.nice,
            "gc_freeze": frozen,
            "tls": a.tls,
            "loadavg_after": open("/proc/loadavg").read().split()[0],
        }
        print(json.dumps(out, indent=2))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)
        return 0
    finally:
        for gen in gens:
            try:
                gen.stdin.write("QUIT\n")
                gen.stdin.flush()
            except OSError:
                pass
        for gen in gens:
            try:
                gen.wait(10)
            except subprocess.TimeoutExpired:
                gen.kill()
        med.terminate()
        try:
            med.wait(10)
        except subprocess.TimeoutExpired:
            med.kill()


if __name__ == "__main__":
    sys.exit(main())

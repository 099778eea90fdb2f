#!/usr/bin/env python3
"""
STUN responder benchmark: valid Binding responses per second on one core.

Each server under test runs alone, in its own process pinned to one core
(`taskset -c SERVER_CPU`); the load generator runs in this process, pinned
to another core.  Loopback only (127.0.0.1, and 127.0.0.2 for RFC 5780).

Servers:
  natbypass        our STUNService with RFC 5780 (4 UDP + 4 TCP sockets):
                   XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, RESPONSE-ORIGIN,
                   OTHER-ADDRESS, SOFTWARE, FINGERPRINT in every response
  natbypass-plain  our STUNService without a second address
  twisted-bare     a bare Twisted DatagramProtocol answering with a header and
                   XOR-MAPPED-ADDRESS only (the floor Twisted itself sets)
  coturn           coturn's turnserver --stun-only with two addresses (the
                   same six attributes), when installed
  natbypass-twistedread  natbypass with Twisted's own udp.Port.doRead instead
                   of STUNPort's read loop (the A/B of that loop)
  natbypass-nobatch  natbypass with STUNPort's loop one datagram per system
                   call (batch_io=False: the A/B of recvmmsg/sendmmsg)
  natbypass-1w     natbypass with --stun-workers 1 and 2: STUNWorkers, the UDP
  natbypass-2w     side in worker processes on SO_REUSEPORT sockets (RFC 5780)

The one-process servers are pinned to --server-cpu and the generator to
--client-cpu: a per-core figure.  The worker servers and the generator all
share --multi-cpus (default both cores of a 2-core machine; there is no third
core for the generator), so 2 workers / 1 worker is what this machine allows,
not the scaling with the generator elsewhere; the server CPU per response
(summed over the workers) says how the work itself scales.

The generator keeps a fixed window of requests outstanding on several
sockets (closed loop, so the server's socket buffer never overflows and
nothing is lost), checks every response cheaply (type, length) and fully
decodes one in SAMPLE with natbypass.stun.message (transaction id,
XOR-MAPPED-ADDRESS equal to the generator socket's address, FINGERPRINT,
the RFC 5780 attributes).  It reports its own CPU use so one can see it was
not the bottleneck.

    python3 bench/stun_bench.py                       # all servers, 5 s each
    python3 bench/stun_bench.py --servers natbypass --duration 10
    python3 bench/stun_bench.py --profile /tmp/stun.pstats --servers natbypass
    python3 bench/stun_bench.py --servers natbypass,coturn,natbypass-1w,natbypass-2w --rounds 5
    python3 bench/stun_bench.py readloop              # STUNPort's read loop against Twisted's

Internal: `stun_bench.py serve KIND --port P` runs one server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from natbypass.stun import message as m  # noqa: E402

SERVERS = ("natbypass", "natbypass-plain", "twisted-bare", "coturn", "natbypass-1w", "natbypass-2w",
           "natbypass-twistedread", "natbypass-nobatch")  # fmt: skip
#: Servers with RFC 5780 (two addresses): the six attributes in every response.
RFC5780 = ("natbypass", "natbypass-twistedread", "natbypass-nobatch", "coturn")
#: Servers that run the responder in worker processes (--stun-workers N): how many.
WORKERS = {"natbypass-1w": 1, "natbypass-2w": 2}
PRIMARY, ALTERNATE = "127.0.0.1", "127.0.0.2"
SAMPLE = 512


# -------------------------------------------------------------------- servers


def serve(kind: str, port: int, profile: str | None) -> None:
    """Run one Python server in this process until SIGTERM/SIGINT."""
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    if kind == "twisted-bare":
        from twisted.internet.protocol import DatagramProtocol

        head = struct.Struct("!HH16sHHBBHI")

        class Bare(DatagramProtocol):
            noisy = False

            def datagramReceived(self, data: bytes, addr) -> None:
                if data[:2] == b"\x00\x01" and len(data) >= 20:
                    host, port = addr
                    self.transport.write(
                        head.pack(0x0101, 12, data[4:20], 0x0020, 8, 0, 1, port ^ 0x2112,
                                  int.from_bytes(socket.inet_aton(host), "big") ^ m.MAGIC_COOKIE),
                        addr,
                    )  # fmt: skip

        reactor.listenUDP(port, Bare(), interface=PRIMARY, maxPacketSize=65535)
    elif kind in WORKERS:
        from twisted.internet.task import LoopingCall

        from natbypass.stun.worker import STUNWorkers

        # As `natbypass mediator --stun-workers N --stun-rate 0 --stun-global-rate 0`.
        pool = STUNWorkers(reactor, (PRIMARY, port), (ALTERNATE, port + 1), WORKERS[kind], rate=0, global_rate=0,
                           stats_interval=0)  # fmt: skip
        pool.startService()

        def ready() -> None:  # tell the bench once every worker answers (it reads our stdout)
            if pool.workers_ready() == pool.workers:
                os.write(1, b"ready\n")
                announce.stop()

        announce = LoopingCall(ready)
        announce.start(0.05)
        reactor.addSystemEventTrigger("before", "shutdown", pool.stopService)
    else:
        from natbypass.stun.server import STUNPort, STUNService

        if kind == "natbypass-twistedread":
            # The A/B of STUNPort's read loop: Twisted's own, one datagramReceived call per datagram.
            from twisted.internet import udp

            STUNPort.doRead = udp.Port.doRead
        alternate = (ALTERNATE, port + 1) if kind in RFC5780 else None
        # rate=0, global_rate=0: the load comes from one IP at a high rate, which the default limits would throttle.
        service = STUNService(reactor, (PRIMARY, port), alternate, stats_interval=0, rate=0, global_rate=0,
                              batch_io=kind != "natbypass-nobatch")  # fmt: skip
        service.startService()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)


def server_command(kind: str, port: int, cpu: int | str, profile: str | None) -> list[str]:
    pin = ["taskset", "-c", str(cpu)]
    if kind == "coturn":
        return pin + [
            "turnserver", "--stun-only", "-L", PRIMARY, "-L", ALTERNATE,
            "--listening-port", str(port), "--alt-listening-port", str(port + 1),
            "--no-cli", "--no-tls", "--no-dtls", "-n", "--log-file", "stdout", "--simple-log",
            "--no-stdout-log",
        ]  # fmt: skip
    command = pin + [sys.executable, os.path.abspath(__file__), "serve", kind, "--port", str(port)]
    if profile:
        command += ["--profile", profile]
    return command


def wait_ready(port: int, timeout: float = 10.0) -> bool:
    """True once the server answers a Binding request on PRIMARY:port."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.settimeout(0.2)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            probe.sendto(m.Message(1, 0, os.urandom(12)).encode(fingerprint=True), (PRIMARY, port))
            try:
                probe.recv(2048)
                return True
            except OSError:
                continue
        return False
    finally:
        probe.close()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its threads, and of its live child processes, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for one in [pid, *children(pid)]:
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
    return user, system


def children(pid: int) -> list[int]:
    """The live child processes of C{pid} (the STUN workers of a natbypass-Nw server)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def wait_line(stream, text: bytes, timeout: float) -> bool:
    """True once C{stream} (a pipe) gives a line equal to C{text} within C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            return False
        buffer += chunk
        if text in buffer.split(b"\n"):
            return True
    return False


# ------------------------------------------------------------------ generator


def check_response(data: bytes, txids: set[bytes] | None, local: tuple[str, int], rfc5780: bool) -> str | None:
    """None when C{data} is a full, correct Binding success response; else why not."""
    try:
        response = m.decode(data)
    except m.StunDecodeError as e:
        return f"undecodable: {e}"
    if response.cls != m.MessageClass.SUCCESS or (txids is not None and response.transaction_id not in txids):
        return "not a success response to one of our requests"
    xor = response.get(m.XorMappedAddress)
    if xor is None or xor.address != local:
        return f"XOR-MAPPED-ADDRESS {xor} is not {local}"
    if rfc5780:
        for kind in (m.MappedAddress, m.ResponseOrigin, m.OtherAddress, m.Fingerprint):
            if response.get(kind) is None:
                return f"no {kind.__name__}"
    return None


def generate(port: int, duration: float, warmup: float, sockets: int, window: int,
             full: bool) -> dict:  # fmt: skip
    """Closed-loop load on PRIMARY:port; returns counts and rates."""
    target = (PRIMARY, port)
    socks, requests, txid_sets, locals_ = [], [], [], []
    for _ in range(sockets):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((PRIMARY, 0))
        s.connect(target)
        s.setblocking(False)
        reqs = [m.Message(1, 0, os.urandom(12)).encode(fingerprint=True) for _ in range(64)]
        socks.append(s)
        requests.append(reqs)
        txid_sets.append({r[8:20] for r in reqs})
        locals_.append(s.getsockname())
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    poller = select.epoll()
    for s in socks:
        poller.register(s.fileno(), select.EPOLLIN)
    next_req = [0] * sockets
    outstanding = [0] * sockets

    def send(i: int, n: int) -> None:
        s, reqs, k = socks[i], requests[i], next_req[i]
        for _ in range(n):
            try:
                s.send(reqs[k & 63])
            except (BlockingIOError, ConnectionRefusedError):
                break
            k += 1
            outstanding[i] += 1
        next_req[i] = k

    for i in range(sockets):
        send(i, window)
    received = valid = invalid = refills = 0
    expected_len = None
    errors: list[str] = []
    start = time.perf_counter()
    measure_from = start + warmup
    end = measure_from + duration
    counted_at_start = None
    last_progress = start
    usage0 = None
    while True:
        now = time.perf_counter()
        if counted_at_start is None and now >= measure_from:
            counted_at_start = (valid, invalid, now)
            usage0 = resource.getrusage(resource.RUSAGE_SELF)
        if now >= end:
            break
        events = poller.poll(0.05)
        if not events:
            if now - last_progress > 0.2:  # lost something: top the windows up again
                for i in range(sockets):
                    outstanding[i] = 0
                    send(i, window)
                refills += 1
                last_progress = now
            continue
        last_progress = now
        for fd, _ in events:
            i = by_fd[fd]
            s = socks[i]
            got = 0
            while True:
                try:
                    data = s.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                got += 1
                received += 1
                if expected_len is None or received % SAMPLE == 0:
                    problem = check_response(data, txid_sets[i], locals_[i], full)
                    if problem is None:
                        expected_len = expected_len or len(data)
                        valid += 1
                    else:
                        invalid += 1
                        if len(errors) < 5:
                            errors.append(problem)
                elif len(data) == expected_len and data[:2] == b"\x01\x01":
                    valid += 1
                else:
                    invalid += 1
            outstanding[i] -= got
            send(i, window - outstanding[i])
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    valid0, invalid0, t0 = counted_at_start
    elapsed = time.perf_counter() - t0
    for s in socks:
        s.close()
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    return {
        "valid_per_s": (valid - valid0) / elapsed,
        "invalid": invalid - invalid0,
        "response_bytes": expected_len,
        "generator_cpu": cpu / elapsed,
        "refills": refills,
        "errors": errors,
        "seconds": elapsed,
    }


#: The generator's poll; the sleeping build waits in epoll_wait instead of spinning.
_BUSY_POLL = "epoll_wait(ep, events, MAXSOCK, 0)"


def build_blaster(sleeping: bool = False) -> str | None:
    """
    Compile bench/stun_blaster.c (once) when a C compiler is there.  With
    C{sleeping}, a build that blocks in C{epoll_wait} (1 ms at most) instead
    of busy-polling: for runs where the generator shares its cores with the
    server (the worker runs), where a spinning generator would take a core's
    share from the server for nothing.
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stun_blaster.c")
    out_dir = os.path.join(tempfile.gettempdir(), "natbypass-bench")
    os.makedirs(out_dir, exist_ok=True)
    binary = os.path.join(out_dir, "stun_blaster-sleeping" if sleeping else "stun_blaster")
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
        with open(source) as f:
            text = f.read()
        if sleeping:
            if _BUSY_POLL not in text:
                print("the C generator's poll changed: no sleeping build", file=sys.stderr)
                return None
            text = text.replace(_BUSY_POLL, _BUSY_POLL.replace(", 0)", ", 1)"))
        done = subprocess.run([compiler, "-O2", "-o", binary, "-x", "c", "-"], input=text.encode(), capture_output=True)
        if done.returncode != 0:
            print(f"could not build the C generator:\n{done.stderr.decode()}", file=sys.stderr)
            return None
    return binary


def generate_c(blaster: str, port: int, duration: float, warmup: float, sockets: int,
               window: int, full: bool, cpu: int | str) -> dict:  # fmt: skip
    """The C generator's run, its sampled responses decoded with our codec."""
    done = subprocess.run(
        ["taskset", "-c", str(cpu), blaster, PRIMARY, str(port), str(sockets), str(window),
         str(warmup), str(duration)],
        capture_output=True, check=True,
    )  # fmt: skip
    raw = json.loads(done.stdout)
    errors = []
    for local_port, hexdata in raw["samples"]:
        problem = check_response(bytes.fromhex(hexdata), None, (PRIMARY, local_port), full)
        if problem is not None:
            errors.append(problem)
    return {
        "valid_per_s": raw["valid"] / raw["seconds"],
        "invalid": raw["invalid"] + len(errors),
        "decoded_samples": len(raw["samples"]),
        "response_bytes": raw["response_bytes"],
        # The C generator busy-polls (its CPU is always ~100%): what tells
        # how loaded it was is the share of time it had work to do.
        "generator_cpu": raw["busy"] / raw["seconds"],
        "refills": raw["refills"],
        "errors": errors[:5],
        "seconds": raw["seconds"],
    }


# ---------------------------------------------------------------------- main


def run_one(kind: str, args) -> dict | None:
    if kind == "coturn" and shutil.which("turnserver") is None:
        print("coturn: turnserver not installed, skipped", file=sys.stderr)
        return None
    profile = args.profile if kind == "natbypass" else None
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    errors = tempfile.TemporaryFile()
    # One-process servers: the server on its core, the generator on the other (a per-core figure).
    # Worker servers, and the single process they are compared with (natbypass-1w): all of them and the
    # generator share --multi-cpus (this machine has no third core for the generator).
    server_cpu = args.multi_cpus if kind in WORKERS else args.server_cpu
    client_cpu = args.multi_cpus if kind in WORKERS else args.client_cpu
    proc = subprocess.Popen(
        server_command(kind, args.port, server_cpu, profile),
        stdout=subprocess.PIPE if kind in WORKERS else subprocess.DEVNULL, stderr=errors, env=env,
    )  # fmt: skip
    try:
        ready = wait_ready(args.port)
        if ready and kind in WORKERS:
            ready = wait_line(proc.stdout, b"ready", 20)
        if not ready:
            errors.seek(0)
            tail = errors.read().decode("utf-8", "replace")[-800:]
            print(f"{kind}: did not answer on {PRIMARY}:{args.port}\n{tail}", file=sys.stderr)
            return None
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        full = kind in RFC5780 or kind in WORKERS
        blaster = args.sleeping_blaster if kind in WORKERS and args.sleeping_blaster else args.blaster
        if blaster:
            result = generate_c(blaster, args.port, args.duration, args.warmup,
                                args.sockets, args.window, full, client_cpu)  # fmt: skip
            result["generator"] = "sleeping" if blaster == args.sleeping_blaster else "busy-polling"
        else:
            result = generate(args.port, args.duration, args.warmup, args.sockets, args.window,
                              full)  # fmt: skip
        (user1, system1), elapsed = cpu_seconds(proc.pid), time.perf_counter() - t0
        result["server_cpu"] = (user1 - cpu0[0] + system1 - cpu0[1]) / elapsed
        result["server_system_share"] = (system1 - cpu0[1]) / max(1e-9, user1 - cpu0[0] + system1 - cpu0[1])
        return result
    finally:
        proc.send_signal(signal.SIGINT if kind != "coturn" else signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errors.close()


def readloop(count: int, rounds: int, limits: bool = False) -> None:
    """
    The A/B of STUNPort's read loops, Python side only: the kernel is left
    out, so what is timed (this thread's CPU time) is the loop, the limiter
    checks, the fast path and the counters.

      - batched: STUNPort's recvmmsg/sendmmsg loop, its vectors' C{receive}
        standing in for recvmmsg (it reports full batches of the requests
        written once into the receive slots, from 32 source ports) and
        C{send} for sendmmsg (it sends nothing);
      - one by one: STUNPort's loop with C{batch_io=False}, its socket
        replaced by a stand-in whose C{recvfrom} returns Binding requests
        (from 1024 source ports) and whose C{sendto} discards;
      - Twisted's C{udp.Port.doRead} on the same stand-in.

    C{count} datagrams per loop (rounded up to whole batches), the loops
    alternate; medians over C{rounds}.  With C{limits}, the per-source and
    global rate limits are on (at rates that let everything through), so
    their cost per datagram is in the figures.
    """
    import errno

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor, udp

    from natbypass.stun.batch import SLOTS
    from natbypass.stun.server import STUNPort, STUNService

    count += -count % SLOTS

    def port_of(batch_io: bool) -> tuple[STUNService, STUNPort]:
        rate = 1e12 if limits else 0
        service = STUNService(reactor, (PRIMARY, 0), (ALTERNATE, 0), stats_interval=0, rate=rate, burst=rate,
                              global_rate=rate, tcp=False, udp_read_budget=1 << 30, batch_io=batch_io)  # fmt: skip
        service.startService()
        target = service.config.primary
        port = next(p for p in reactor.getReaders() if isinstance(p, STUNPort) and p.getHost().port == target[1]
                    and p.getHost().host == PRIMARY)  # fmt: skip
        return service, port

    request = m.Message(1, 0, os.urandom(12)).encode(fingerprint=True)

    class Socket:
        def __init__(self) -> None:
            self.n = 0

        def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
            if self.n >= count:
                raise BlockingIOError(errno.EAGAIN, "empty")
            self.n += 1
            return request, ("198.51.100.7", 40000 + (self.n & 1023))

        def sendto(self, data: bytes, address: tuple[str, int]) -> int:
            return len(data)

    batched_service, batched = port_of(True)
    vectors = batched.vectors
    if vectors is None:
        raise RuntimeError("recvmmsg/sendmmsg are not available here: no batched loop to time")
    for i in range(SLOTS):
        at = vectors.data_offsets[i]
        vectors.memory[at : at + len(request)] = request
        vectors.lengths[vectors.length_index[i]] = len(request)
        at = vectors.name_offsets[i]
        vectors.memory[at : at + 8] = (struct.pack("=H", socket.AF_INET) + (40000 + i).to_bytes(2, "big")
                                       + socket.inet_aton("198.51.100.7"))  # fmt: skip
    batches = [0]

    def receive() -> int:
        if batches[0] * SLOTS >= count:
            return 0
        batches[0] += 1
        return SLOTS

    vectors.receive = receive
    vectors.send = lambda n: 0
    single_service, single = port_of(False)
    real = single.socket

    def run_batched() -> STUNService:
        batches[0] = 0
        batched.doRead()
        return batched_service

    def run_single(loop) -> STUNService:
        stand_in = Socket()
        single.socket = stand_in
        single.protocol._sendto = stand_in.sendto
        loop(single)
        return single_service

    loops = {"STUNPort batched": run_batched, "STUNPort one by one": lambda: run_single(STUNPort.doRead),
             "udp.Port.doRead": lambda: run_single(udp.Port.doRead)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            answered0 = batched_service.counters.answered + single_service.counters.answered
            t0 = time.thread_time()
            loop()
            times[name].append(1e6 * (time.thread_time() - t0) / count)
            answered = batched_service.counters.answered + single_service.counters.answered - answered0
            if answered != count:
                raise RuntimeError(f"{name}: {answered} of {count} requests answered")
    single.socket = real
    for name, values in times.items():
        print(f"{name:20} {statistics.median(values):5.2f} us of Python per datagram (median of {rounds}; "
              f"{min(values):.2f}-{max(values):.2f})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["readloop"]:
        p = argparse.ArgumentParser(prog="stun_bench.py readloop")
        p.add_argument("--count", type=int, default=200000)
        p.add_argument("--rounds", type=int, default=9)
        p.add_argument("--limits", action="store_true", help="rate limits on (letting everything through)")
        a = p.parse_args(argv[1:])
        readloop(a.count, a.rounds, a.limits)
        return 0
    if argv[:1] == ["serve"]:
        p = argparse.ArgumentParser(prog="stun_bench.py serve")
        p.add_argument("kind", choices=[k for k in SERVERS if k != "coturn"])
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--profile")
        a = p.parse_args(argv[1:])
        serve(a.kind, a.port, a.profile)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5,
                   help="run the list this many times, interleaved; ratios are per round")  # fmt: skip
    p.add_argument("--port", type=int, default=23478,
                   help="primary port (alternate: +1); keep it out of the ephemeral port range, "
                        "or the generator's own sockets may take it")  # fmt: skip
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--multi-cpus", default="0,1",
                   help="cores shared by the worker servers (natbypass-1w, natbypass-2w) and the generator "
                        "during their runs (taskset list)")  # fmt: skip
    p.add_argument("--sockets", type=int, default=8)
    p.add_argument("--window", type=int, default=32, help="requests outstanding per socket")
    p.add_argument("--profile", help="cProfile the natbypass server into this file")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--nice", type=int, default=-20,
                   help="niceness of generator and servers (inherited), so that other work on a "
                        "shared machine does not decide the figures; needs root for < 0")  # fmt: skip
    p.add_argument("--generator", choices=("auto", "c", "python"), default="auto",
                   help="auto: the C generator (bench/stun_blaster.c) when it compiles")  # fmt: skip
    args = p.parse_args(argv)
    args.blaster = build_blaster() if args.generator != "python" else None
    args.sleeping_blaster = build_blaster(sleeping=True) if args.blaster else None
    if args.generator == "c" and args.blaster is None:
        p.error("no C compiler: use --generator python")
    print(f"generator: {'C (recvmmsg/sendmmsg)' if args.blaster else 'Python'}", flush=True)
    os.sched_setaffinity(0, {args.client_cpu})
    prioritise(args.nice)
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for kind in kinds:
            r = run_one(kind, args)
            if r is not None:
                results.setdefault(kind, []).append(r)
                print(f"{kind:16} {r['valid_per_s']:10.0f} valid responses/s  "
                      f"({r['response_bytes']} B, server CPU {r['server_cpu']:.0%} "
                      f"[{r['server_system_share']:.0%} kernel], "
                      f"generator load {r['generator_cpu']:.0%}, invalid {r['invalid']}, "
                      f"refills {r['refills']})", flush=True)  # fmt: skip
                for e in r["errors"]:
                    print(f"    invalid response: {e}")
    best = {k: max(r["valid_per_s"] for r in rs) for k, rs in results.items()}
    median = {k: statistics.median(r["valid_per_s"] for r in rs) for k, rs in results.items()}
    ratios: dict[str, list[float]] = {}
    if "coturn" in results:
        # Per round: the servers ran back to back, so they saw similar conditions.
        for kind, runs in results.items():
            if kind == "coturn":
                continue
            ratios[kind] = [r["valid_per_s"] / c["valid_per_s"] for r, c in zip(runs, results["coturn"])]
        print(f"\nrelative to coturn, per round (median [min-max]) over {len(results['coturn'])} rounds:")
        for kind, values in ratios.items():
            print(f"  {kind:16} {statistics.median(values):5.0%}  [{min(values):.0%}-{max(values):.0%}]")
    scaling: list[float] = []
    if "natbypass-1w" in results and "natbypass-2w" in results:
        # Same placement (--multi-cpus for servers and generator), one worker against two, per round.
        scaling = [two["valid_per_s"] / one["valid_per_s"]
                   for one, two in zip(results["natbypass-1w"], results["natbypass-2w"])]  # fmt: skip
        print(f"\n2 workers / 1 worker, per round (median [min-max]): {statistics.median(scaling):.2f}x "
              f"[{min(scaling):.2f}-{max(scaling):.2f}]")  # fmt: skip
    cpu_us = {k: statistics.median(1e6 * r["server_cpu"] / r["valid_per_s"] for r in rs) for k, rs in results.items()}
    print("\nmedian server CPU per response: " + ", ".join(f"{k} {v:.1f} us" for k, v in cpu_us.items()))
    print("median valid responses/s: " + ", ".join(f"{k} {v:.0f}" for k, v in median.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": _cpu_model(), "cores": os.cpu_count(),
                                   "kernel": platform.release(), "python": platform.python_version()},
                       "args": vars(args), "results": results, "best": best, "median": median,
                       "ratios_to_coturn": ratios, "workers_2_over_1": scaling,
                       "server_cpu_us_per_response": cpu_us}, f, indent=2)  # fmt: skip
    return 0


def prioritise(nice: int) -> None:
    """
    Give this process and the servers it starts (they inherit) priority
    C{nice} over other work on the machine.  With autogroup scheduling nice
    only ranks processes within one session, so take a session of our own
    and set its autogroup's nice too.
    """
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader (e.g. started by setsid)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        if os.path.exists("/proc/self/autogroup"):
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice))
    except OSError as e:
        print(f"cannot set niceness {nice} ({e}); figures may include other load", file=sys.stderr)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())

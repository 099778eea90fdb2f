#!/usr/bin/env python3
"""
QUIC engine benchmark for natbypass.secure.quic: aioquic against qh3.

Two QuicChannels (client and server, both authenticated with identity keys)
in one process, joined by an in-memory, lossless, zero-delay link; the
channels' clock follows the real monotonic clock.  Measures, per engine:

  handshake  wall time from start() until both sides' .ready fired
             (QUIC/TLS handshake + the key proofs), median of N runs
  bulk       one stream, SIZE bytes client -> server, MB/s (1 MB = 10**6 B),
             median of N runs (one core does both ends, so this is the CPU
             cost of the engine, both ends together)

    python3 bench/quic_bench.py                        # both engines, 3 runs
    python3 bench/quic_bench.py --engines qh3 --size 50 --runs 5
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import Clock  # noqa: E402

from natbypass.identity import Identity  # noqa: E402
from natbypass.secure.quic import QuicChannel, get_engine  # noqa: E402

A, B = ("10.0.0.1", 1), ("10.0.0.2", 2)


class Net:
    """Zero-delay in-memory link: a FIFO of datagrams, drained by run()."""

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()
        self.hosts: dict = {}
        self.clock = Clock()
        self.t0 = time.monotonic()

    def sender(self, src):
        return lambda data, dst: self.queue.append((src, tuple(dst), data))

    def tick(self) -> None:
        now = time.monotonic() - self.t0
        if now > self.clock.seconds():
            self.clock.advance(now - self.clock.seconds())

    def run(self, until, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        while not until():
            if time.monotonic() > deadline:
                raise RuntimeError("benchmark stalled")
            self.tick()
            while self.queue:
                src, dst, data = self.queue.popleft()
                self.hosts[dst].datagramReceived(data, src)
                if until():
                    return


class Sink:
    def __init__(self) -> None:
        self.received = 0
        self.fin = False

    def streamReceived(self, stream_id, data, fin):
        self.received += len(data)
        self.fin = self.fin or fin

    def datagramFrameReceived(self, data):
        pass

    def streamReset(self, stream_id, code):
        pass

    def pumped(self):
        pass

    def connectionLost(self, reason):
        pass


def pair(engine: str, a_id: Identity, b_id: Identity):
    net = Net()
    a = QuicChannel(a_id, b_id.fingerprint, 0, B, net.sender(A), net.clock, engine=engine)
    b = QuicChannel(b_id, a_id.fingerprint, 1, A, net.sender(B), net.clock, engine=engine)
    net.hosts = {A: a, B: b}
    return net, a, b


def handshake(engine: str, a_id: Identity, b_id: Identity) -> float:
    net, a, b = pair(engine, a_id, b_id)
    start = time.perf_counter()
    a.start()
    net.run(lambda: a.ready.called and b.ready.called)
    took = time.perf_counter() - start
    a.close()
    return took


def bulk(engine: str, a_id: Identity, b_id: Identity, size: int) -> float:
    net, a, b = pair(engine, a_id, b_id)
    a.start()
    net.run(lambda: a.ready.called and b.ready.called)
    sink = Sink()
    b.setReceiver(sink)
    sid = a.openStream()
    chunk = b"x" * 65536
    start = time.perf_counter()
    sent = 0
    while sent < size:
        # Keep the engine's send buffer a few MB deep: write, then let packets flow.
        n = min(len(chunk), size - sent)
        sent += n
        a.sendStream(sid, chunk[:n], fin=sent >= size)
        if sent - sink.received > 4 * 1024 * 1024:
            target = sent - 1024 * 1024
            net.run(lambda target=target: sink.received >= target)
    net.run(lambda: sink.fin)
    took = time.perf_counter() - start
    a.close()
    return size / took / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="aioquic,qh3")
    parser.add_argument("--size", type=float, default=20, help="MB per bulk run (default 20)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    a_id, b_id = Identity.generate(), Identity.generate()
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
        f"{platform.processor() or platform.platform()}"
    )
    for engine in args.engines.split(","):
        try:
            mod = get_engine(engine)
        except ImportError as e:
            print(f"{engine}: not installed ({e})")
            continue
        version = __import__(engine).__version__
        hs = [handshake(mod, a_id, b_id) * 1000 for _ in range(max(args.runs, 5))]
        mbs = [bulk(mod, a_id, b_id, int(args.size * 1e6)) for _ in range(args.runs)]
        print(
            f"{engine} {version}: handshake median {statistics.median(hs):.1f} ms "
            f"(min {min(hs):.1f}), bulk median {statistics.median(mbs):.1f} MB/s "
            f"(runs: {', '.join(f'{m:.1f}' for m in mbs)})"
        )


if __name__ == "__main__":
    main()

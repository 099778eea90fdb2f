#!/usr/bin/env python3
"""
One end of a stream benchmark, run by C{bench/stream_bench.py} inside a lab namespace.

Each mode prints JSON lines on stdout (one C{result} line at the end):

    serve     a natbypass Peer serving the stream services C{sink} (hash what
              arrives; at the writer's FIN answer one JSON line: bytes,
              sha256, seconds, CPU) and C{idle} (hold the stream, do nothing)
    send      open C{--streams} streams to a peer's C{sink}, write C{--bytes}
              each (or for C{--seconds}), check every answer's sha256
    idle      open C{--streams} idle streams; report our RSS before and after
    watch     open one idle stream, report when and why it ends
    tcp-sink  plain kernel TCP: the same C{sink}, a thread per connection
    tcp-send  plain kernel TCP: the same C{send}, C{--streams} connections at
              once (also the client of C{natbypass forward} and C{ssh -L})

CPU is this process's user + system time (C{os.times}) over the transfer, so
it includes everything the process does for the bytes: QUIC or TLS, framing,
Twisted, hashing.  The payload is a random 1 MiB block repeated: hashing it
costs the same at both ends and no compression anywhere can shrink it.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from twisted.internet import defer  # noqa: E402
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.task import LoopingCall, deferLater, react  # noqa: E402
from zope.interface import implementer  # noqa: E402

from natbypass.identity import load_or_create  # noqa: E402
from natbypass.peer import Peer, PeerConfig  # noqa: E402
from natbypass.signaling.client import client_endpoint  # noqa: E402

BLOCK = os.urandom(1 << 20)
CHUNK = 64 * 1024


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def rss_kb(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def payload(offset: int, n: int) -> bytes:
    """C{n} bytes of the repeated block from C{offset} (n <= CHUNK)."""
    start = offset % len(BLOCK)
    chunk = BLOCK[start : start + n]
    return chunk if len(chunk) == n else chunk + BLOCK[: n - len(chunk)]


# ------------------------------------------------------------------ receiving


class SinkCounter:
    """What a sink saw: bytes, sha256, first byte to FIN in wall and CPU time."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.bytes = 0
        self.t0 = self.c0 = 0.0

    def feed(self, data: bytes) -> None:
        if not self.bytes:
            self.t0, self.c0 = time.monotonic(), cpu()
        self.bytes += len(data)
        self.hash.update(data)

    def summary(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "sha256": self.hash.hexdigest(),
            "seconds": round(time.monotonic() - self.t0, 4) if self.bytes else 0.0,
            "cpu_s": round(cpu() - self.c0, 4) if self.bytes else 0.0,
        }


@implementer(IHalfCloseableProtocol)
class Sink(Protocol):
    """Hash what arrives; at the peer's FIN answer a JSON line and close."""

    def connectionMade(self) -> None:
        self.counter = SinkCounter()

    def dataReceived(self, data: bytes) -> None:
        self.counter.feed(data)

    def readConnectionLost(self) -> None:
        self.transport.write(json.dumps(self.counter.summary()).encode() + b"\n")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class Idle(Protocol):
    """Hold the stream open and do nothing."""


# ------------------------------------------------------------------ sending


@implementer(IPushProducer)
class Sender(Protocol):
    """
    Write C{total} bytes (or until C{deadline}) as a push producer, so the
    stream's backpressure paces us; then FIN and wait for the sink's answer.
    """

    def __init__(self, total: int | None, deadline: float | None) -> None:
        self.total, self.deadline = total, deadline
        self.sent = 0
        self.hash = hashlib.sha256()
        self.paused = False
        self.paused_s = 0.0
        self._paused_at: float | None = None
        self.done = False
        self.answer = b""
        self.finished: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.lost_reason: str | None = None

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        if self._paused_at is not None:
            self.paused_s += time.monotonic() - self._paused_at
            self._paused_at = None
        self.paused = False
        while not self.paused and not self.done:
            n = CHUNK if self.total is None else min(CHUNK, self.total - self.sent)
            if n <= 0 or (self.deadline is not None and time.monotonic() >= self.deadline):
                self.done = True
                self.transport.unregisterProducer()
                self.transport.loseWriteConnection()
                return
            data = payload(self.sent, n)
            self.hash.update(data)
            self.sent += n
            self.transport.write(data)

    def pauseProducing(self) -> None:
        self.paused = True
        self._paused_at = time.monotonic()

    def stopProducing(self) -> None:
        self.done = True

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if self.answer.endswith(b"\n") and not self.finished.called:
            # The answer is one line: done, whether or not the stream's end has arrived yet.
            self.finished.callback(json.loads(self.answer.decode()))
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.finished.called:
            return
        try:
            answer = json.loads(self.answer.decode())
        except ValueError:
            self.finished.errback(reason)
            return
        self.finished.callback(answer)


async def started_peer(reactor: Any, args: argparse.Namespace) -> Peer:
    peer = Peer(
        reactor,
        args.id,
        client_endpoint(reactor, args.mediator, None),
        (args.stun_host, args.stun_port),
        identity=load_or_create(args.identity),
        protocol=args.protocol,
        config=PeerConfig(keepalive_interval=args.keepalive),
    )
    peer.startService()
    await peer.whenReady().addTimeout(20, reactor)
    await peer.whenDiscovered().addTimeout(20, reactor)
    return peer


async def serve(reactor: Any, args: argparse.Namespace) -> None:
    peer = await started_peer(reactor, args)
    peer.serve("sink", Factory.forProtocol(Sink))
    peer.serve("idle", Factory.forProtocol(Idle))
    emit("ready", id=args.id, pid=os.getpid())
    await defer.Deferred()  # until killed


class QuicStats:
    """
    Debug only (C{--quic-stats}): samples the QUIC engine's own recovery
    state -- congestion window, bytes in flight, smoothed RTT, packets lost,
    PTOs -- and counts the datagrams we hand the socket.  It reaches into
    private attributes (C{QuicChannel._conn._core}, C{._send}) because qh3
    exposes them nowhere else; nothing but this diagnostic may do so.
    """

    def __init__(self, reactor: Any, interval: float) -> None:
        from natbypass.secure.quic import QuicChannel

        channels = [o for o in gc.get_objects() if isinstance(o, QuicChannel)]
        self.channel = channels[-1] if channels else None
        self.samples: list[dict[str, Any]] = []
        self.sent = 0
        self.t0 = time.monotonic()
        if self.channel is None:
            return
        send = self.channel._send

        def counting(data: bytes, addr: Any) -> object:
            self.sent += 1
            return send(data, addr)

        self.channel._send = counting
        self.loop = LoopingCall(self.sample)
        self.loop.clock = reactor
        self.loop.start(interval)

    def sample(self) -> None:
        core = self.channel._conn._core if self.channel is not None and self.channel._conn is not None else None
        if core is None:
            return
        self.samples.append(
            {
                "t": round(time.monotonic() - self.t0, 2),
                "cwnd": core.congestion_window,
                "in_flight": core.bytes_in_flight,
                "srtt_ms": round((core.smoothed_rtt or 0) * 1000, 1),
                "lost": core.loss_total,
                "pto": core.pto_total,
                "sent": self.sent,
            }
        )

    def summary(self) -> dict[str, Any]:
        if self.channel is None:
            return {"error": "no QUIC channel (tcp path?)"}
        self.sample()
        if self.loop.running:
            self.loop.stop()
        s = self.samples
        busy = [x for x in s[1:]]
        return {
            "datagrams_sent": self.sent,
            "lost": s[-1]["lost"],
            "loss_rate": round(s[-1]["lost"] / max(1, self.sent), 4),
            "pto": s[-1]["pto"],
            "cwnd_median": statistics.median(x["cwnd"] for x in busy) if busy else None,
            "in_flight_median": statistics.median(x["in_flight"] for x in busy) if busy else None,
            "cwnd_limited_share": round(
                sum(x["in_flight"] >= x["cwnd"] - 2 * 1500 for x in busy) / max(1, len(busy)), 3
            ),
            "srtt_ms_median": statistics.median(x["srtt_ms"] for x in busy) if busy else None,
            "samples": s,
        }


async def send(reactor: Any, args: argparse.Namespace) -> None:
    peer = await started_peer(reactor, args)
    t_connect = time.monotonic()
    conn = await peer.connect(args.peer).addTimeout(30, reactor)
    connect_s = time.monotonic() - t_connect
    stats = QuicStats(reactor, args.quic_stats) if args.quic_stats else None
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    total = None if args.seconds is not None else args.bytes
    # Each stream starts sending as soon as it is open: on the UDP path at most 98 are open at once (QUIC's
    # stream limit), the rest open as earlier ones end, so waiting for all before sending would never end.
    gc.collect()
    t0, c0 = time.monotonic(), cpu()
    if deadline is not None:
        deadline = time.monotonic() + args.seconds

    def start(s: Any) -> Any:
        s.deadline = deadline
        s.start()
        return s

    opened = await defer.gatherResults(
        [
            peer.openStream(args.peer, "sink", Factory.forProtocol(lambda: Sender(total, deadline))).addCallback(start)
            for _ in range(args.streams)
        ]
    ).addTimeout(args.timeout, reactor)
    try:
        answers = await defer.gatherResults([s.finished for s in opened], consumeErrors=True).addTimeout(
            args.timeout, reactor
        )
    except defer.FirstError:
        for s in opened[:3]:
            print(
                f"stalled: sent {s.sent} done {s.done} paused {s.paused} answer {s.answer[:200]!r} {s.transport!r}",
                file=sys.stderr,
            )
        raise
    seconds, cpu_s = time.monotonic() - t0, cpu() - c0
    intact = sum(a["sha256"] == s.hash.hexdigest() and a["bytes"] == s.sent for s, a in zip(opened, answers))
    received = sum(a["bytes"] for a in answers)
    emit(
        "result",
        path=conn.protocol if conn is not None else None,
        streams=len(opened),
        bytes=received,
        seconds=round(seconds, 4),
        mb_s=round(received / seconds / 1e6, 3),
        cpu_s=round(cpu_s, 4),
        peer_cpu_s=round(max(a["cpu_s"] for a in answers), 4),
        intact=intact,
        sha256=answers[0]["sha256"] if len(answers) == 1 else None,
        connect_s=round(connect_s, 3),
        paused_s=round(max(s.paused_s for s in opened), 3),
        **({"quic": stats.summary()} if stats is not None else {}),
    )
    await defer.maybeDeferred(peer.stopService)


async def idle(reactor: Any, args: argparse.Namespace) -> None:
    peer = await started_peer(reactor, args)
    keep = [await peer.openStream(args.peer, "idle", Factory.forProtocol(Idle)).addTimeout(30, reactor)]
    await deferLater(reactor, 1.0)
    gc.collect()
    before = rss_kb()
    emit("baseline", rss_kb=before)
    await deferLater(reactor, args.hold)
    error = None
    for start in range(0, args.streams, 50):
        # An open that waits 10 s is at a limit (on the UDP path QUIC's 98 streams at once: opens wait, not fail).
        batch = [
            peer.openStream(args.peer, "idle", Factory.forProtocol(Idle)).addTimeout(10, reactor)
            for _ in range(min(50, args.streams - start))
        ]
        results = await defer.DeferredList(batch, consumeErrors=True)
        keep += [r for ok, r in results if ok]
        failed = [r for ok, r in results if not ok]
        if failed:  # a limit: measure what could be opened
            error = f"{failed[0].type.__name__}: {failed[0].value}"
            break
    await deferLater(reactor, 1.0)
    gc.collect()
    after = rss_kb()
    alive = sum(1 for p in keep if p.transport is not None and not getattr(p.transport, "disconnecting", False))
    emit(
        "opened",
        error=error,
        streams=len(keep) - 1,
        alive=alive,
        rss_kb=after,
        per_stream_bytes=round((after - before) * 1024 / max(1, len(keep) - 1)),
    )
    await deferLater(reactor, args.hold)
    emit("result", streams=len(keep) - 1, rss_before_kb=before, rss_after_kb=after)
    await defer.maybeDeferred(peer.stopService)


async def watch(reactor: Any, args: argparse.Namespace) -> None:
    peer = await started_peer(reactor, args)
    lost: defer.Deferred[Any] = defer.Deferred()

    class Watch(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            lost.callback((reason,))

    await peer.openStream(args.peer, "idle", Factory.forProtocol(Watch)).addTimeout(30, reactor)
    conn = peer.connectionTo(args.peer)
    emit("open", path=conn.protocol if conn is not None else None, t=time.time())
    (reason,) = await lost.addTimeout(args.timeout, reactor)
    emit("result", lost_at=time.time(), reason=f"{reason.type.__name__}: {reason.value}")
    await defer.maybeDeferred(peer.stopService)


# ------------------------------------------------------------------ kernel TCP


def _sink_one(conn: socket.socket) -> None:
    """Hash one connection to its FIN, answer the JSON line."""
    buf = bytearray(CHUNK * 4)
    counter = SinkCounter()
    with conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            counter.feed(memoryview(buf)[:n])
        conn.sendall(json.dumps(counter.summary()).encode() + b"\n")


def tcp_sink(args: argparse.Namespace) -> None:
    """Plain TCP sink: a thread per connection, so forwarded connections can arrive at once."""
    host, _, port = args.listen.rpartition(":")
    srv = socket.create_server((host, int(port)), reuse_port=True, backlog=256)
    emit("ready", pid=os.getpid())
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_sink_one, args=(conn,), daemon=True).start()


def _send_one(args: argparse.Namespace, total: int | None, deadline: float | None) -> dict[str, Any]:
    """One connection: write C{total} bytes (or until C{deadline}), FIN, read the sink's answer."""
    host, _, port = args.connect.rpartition(":")
    digest, sent = hashlib.sha256(), 0
    try:
        sock = socket.create_connection((host, int(port)), timeout=args.timeout)
        if args.cc:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
        with sock:
            while True:
                n = CHUNK if total is None else min(CHUNK, total - sent)
                if n <= 0 or (deadline is not None and time.monotonic() >= deadline):
                    break
                data = payload(sent, n)
                digest.update(data)
                sock.sendall(data)
                sent += n
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while not answer.endswith(b"\n"):
                more = sock.recv(4096)
                if not more:
                    break
                answer += more
        a = json.loads(answer)
    except (OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}", "sent": sent}
    return {**a, "intact": int(a["sha256"] == digest.hexdigest() and a["bytes"] == sent)}


def tcp_send(args: argparse.Namespace) -> None:
    """Plain TCP sender: C{--streams} connections at once (threads), each C{--bytes} or C{--seconds}."""
    t0, c0 = time.monotonic(), cpu()
    deadline = None if args.seconds is None else t0 + args.seconds
    total = None if args.seconds is not None else args.bytes
    answers: list[dict[str, Any]] = [{} for _ in range(args.streams)]

    def one(i: int) -> None:
        answers[i] = _send_one(args, total, deadline)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu_s = time.monotonic() - t0, cpu() - c0
    ok = [a for a in answers if "bytes" in a]
    received = sum(a["bytes"] for a in ok)
    errors = [a["error"] for a in answers if "error" in a]
    emit(
        "result",
        path="kernel-tcp",
        streams=args.streams,
        bytes=received,
        seconds=round(seconds, 4),
        mb_s=round(received / seconds / 1e6, 3),
        cpu_s=round(cpu_s, 4),
        peer_cpu_s=max((a["cpu_s"] for a in ok), default=0.0),
        intact=sum(a["intact"] for a in ok),
        sha256=ok[0]["sha256"] if args.streams == 1 and ok else None,
        errors=len(errors),
        first_error=errors[0] if errors else None,
    )


# ------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["serve", "send", "idle", "watch", "tcp-sink", "tcp-send"])
    p.add_argument("--mediator", help="signalling endpoint, e.g. tcp:198.18.0.2:7000")
    p.add_argument("--stun", default=None, help="STUN HOST:PORT (default: the mediator's host, 3478)")
    p.add_argument("--id")
    p.add_argument("--identity")
    p.add_argument("--peer")
    p.add_argument("--protocol", default="auto")
    p.add_argument("--keepalive", type=float, default=15.0, help="keepalive interval; liveness bound is 3x")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--bytes", type=int, default=100_000_000)
    p.add_argument("--seconds", type=float, default=None, help="send for this long instead of --bytes")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--hold", type=float, default=2.0, help="idle: seconds to hold before and after opening")
    p.add_argument("--listen", help="tcp-sink: HOST:PORT")
    p.add_argument("--connect", help="tcp-send: HOST:PORT")
    p.add_argument("--cc", help="tcp-send: this congestion control (cubic, reno, bbr), not the namespace's default")
    p.add_argument("--profile", help="write a cProfile of the run here")
    p.add_argument("--quic-stats", type=float, default=0.0, help="send, debug: sample qh3's recovery state every S s")
    args = p.parse_args()
    if args.mode == "tcp-sink":
        tcp_sink(args)
        return 0
    if args.mode == "tcp-send":
        tcp_send(args)
        return 0
    if args.stun:
        host, _, port = args.stun.rpartition(":")
        args.stun_host, args.stun_port = host, int(port)
    else:
        args.stun_host, args.stun_port = args.mediator.split(":")[1], 3478
    run = {"serve": serve, "send": send, "idle": idle, "watch": watch}[args.mode]
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        react(lambda reactor: defer.ensureDeferred(run(reactor, args)))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

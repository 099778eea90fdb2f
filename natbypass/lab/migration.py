"""
Path migration in the NAT lab: a running stream between two engine peers
(C{natbypass.lab.enginepeer}: STUN, a punch at an agreed time, pinned
keys), and one NAT that forgets everything under it, as a router that
flushed its connection tracking or restarted does.

L{flush_nat} empties the NAT's conntrack table (C{conntrack -F}) and the
lab's dynamic nftables state that stands in for its mapping table
(C{natmap}, C{contacted}; a real router loses that with its conntrack).
Behind a symmetric NAT the next packet out then gets a new public port: the
peer's NAT rebinds.  L{run_flush} runs one case and returns what both sides
saw.  The peer program (one process per side)::

    python -m natbypass.lab.migration --name a --peer b --role 0 --dir DIR \\
        --stun 198.18.0.2:3478 --protocol udp --start-at EPOCH --send --seconds 8

prints JSON lines: C{connected}, then C{sent} (the writer: bytes, sha256)
or C{received} (the reader: bytes, sha256, the longest gap between two
arrivals and when it began, wall clock), C{lost} (when and why the path
ended) and C{path} (UDP: every move of the path, and the PathWatch's counts).
Wall-clock times, so the harness can relate them to the flush.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from natbypass.lab import enginepeer
from natbypass.lab.lab import Lab
from natbypass.lab.rules import TABLE
from natbypass.streams import StreamRefused

STUN = "198.18.0.2:3478"
SERVICE = "sink"
#: What the writer sends every tick (50 ms): 40 kB/s.
CHUNK = 2000
TICK = 0.05
#: Seconds from the start of the processes to the agreed punch time.
START_LEAD = 5.0


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "wall": time.time(), **fields}), flush=True)


def payload(index: int) -> bytes:
    """The writer's chunk C{index}: fixed, so the reader's sha256 can be checked against the writer's."""
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (CHUNK // len(seed) + 1))[:CHUNK]


class _Reader(Protocol):
    """Hash what arrives and keep the longest silence between two arrivals (wall clock)."""

    def __init__(self, done: defer.Deferred) -> None:
        self._done = done
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._last: float | None = None
        self._gap = (0.0, 0.0)

    def dataReceived(self, data: bytes) -> None:
        now = time.time()
        if self._last is not None and now - self._last > self._gap[1] - self._gap[0]:
            self._gap = (self._last, now)
        self._last = now
        self._bytes += len(data)
        self._hash.update(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        _emit(
            "received",
            bytes=self._bytes,
            sha256=self._hash.hexdigest(),
            max_gap=round(self._gap[1] - self._gap[0], 3),
            gap_from=self._gap[0],
            gap_to=self._gap[1],
            clean=reason is None or reason.check(ConnectionDone) is not None,
        )
        if not self._done.called:
            self._done.callback(None)


class _Sink:
    """The stream handler of the reading side: one L{_Reader} for C{sink}."""

    def __init__(self, done: defer.Deferred) -> None:
        self._done = done

    def streamRequested(self, connection: Any, address: Any) -> Protocol:
        if address.service != SERVICE:
            raise StreamRefused(f"no service {address.service!r}")
        return _Reader(self._done)


def _path_report(conn: Any) -> None:
    path = getattr(conn, "path", None)
    if path is None:
        return
    watch = path.watch
    _emit(
        "path",
        moves=[[m.old, m.new] for m in path.moves],
        suspects=watch.suspects,
        recoveries=watch.recoveries,
        last_stall=watch.last_stall,
        throttled=path.throttled,
        refused=path.refused,
        remote=[conn.remote_address.host, conn.remote_address.port],
    )


@defer.inlineCallbacks
def main(reactor: Any, argv: list[str]) -> Any:
    """One side: connect (as C{enginepeer}), then write or read the stream, printing the JSON lines."""
    p = enginepeer.parser()
    p.prog = "python -m natbypass.lab.migration"
    p.add_argument("--send", action="store_true", help="this side writes the stream (the other reads)")
    p.add_argument("--seconds", type=float, default=8.0, help="how long the writer writes")
    p.add_argument("--keepalive", type=float, default=15.0, help="the path's keepalive interval")
    args = p.parse_args(argv)
    conn, result = yield enginepeer.connect(reactor, args, keepalive_interval=args.keepalive)
    if conn is None:
        _emit("failed", reason=result.get("reason"))
        return
    _emit("connected", remote=result["remote"], connect_ms=result["connect_ms"])
    yield run_stream(reactor, conn, args.send, args.seconds)


@defer.inlineCallbacks
def run_stream(reactor: Any, conn: Any, send: bool, seconds: float, report: Any = None) -> Any:
    """
    Write (C{send}) or read the sink stream on C{conn}, printing the JSON
    lines; then C{report(conn)} (default: the path's moves and counts) and close.
    """
    lost: defer.Deferred = conn.whenLost()
    lost.addCallback(lambda reason: _emit("lost", reason=str(reason), kind=type(reason).__name__) or reason)
    done: defer.Deferred = defer.Deferred()
    if send:
        hasher = hashlib.sha256()
        writer = yield conn.openStream(SERVICE, Factory.forProtocol(Protocol))
        sent = 0
        end = reactor.seconds() + seconds
        index = 0
        while reactor.seconds() < end and not lost.called:
            chunk = payload(index)
            index += 1
            writer.transport.write(chunk)
            hasher.update(chunk)
            sent += len(chunk)
            yield task.deferLater(reactor, TICK, lambda: None)
        _emit("sent", bytes=sent, sha256=hasher.hexdigest())
        writer.transport.loseConnection()
        # Let the reader get the end (or the loss reach us).
        yield defer.DeferredList([lost, task.deferLater(reactor, 5.0, lambda: None)], fireOnOneCallback=True)
    else:
        conn.setStreamHandler(_Sink(done))
        yield defer.DeferredList([lost, done], fireOnOneCallback=True)
        if not lost.called:
            yield task.deferLater(reactor, 1.0, lambda: None)
    (report or _path_report)(conn)
    conn.close()
    yield task.deferLater(reactor, 0.5, lambda: None)


def flush_nat(lab: Lab, site: str) -> float:
    """
    Make C{site}'s NAT forget every flow and mapping, as a router that
    restarted would: its conntrack table and the lab's dynamic mapping
    state.  Returns the wall-clock time just before the flush.
    """
    node = f"{site}.nat"
    at = time.time()
    lab.exec(node, ["conntrack", "-F"], check=True)
    lab.exec(node, ["nft", f"flush map ip {TABLE} natmap"], check=True)
    lab.exec(node, ["nft", f"flush set ip {TABLE} contacted"], check=True)
    return at


@dataclass
class FlushResult:
    """Both sides' JSON lines of one case, and when the flush happened."""

    flushed_at: float
    writer: list[dict[str, Any]]
    reader: list[dict[str, Any]]

    @staticmethod
    def _event(lines: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
        return next((e for e in lines if e.get("event") == name), None)

    def writer_event(self, name: str) -> dict[str, Any] | None:
        return self._event(self.writer, name)

    def reader_event(self, name: str) -> dict[str, Any] | None:
        return self._event(self.reader, name)


def run_flush(
    lab: Lab,
    writer: str,
    reader: str,
    flushed: str,
    protocol: str,
    *,
    flush_after: float = 3.0,
    seconds: float = 10.0,
    keepalive: float = 15.0,
) -> FlushResult:
    """
    A stream from site C{writer} to site C{reader} (role 0 writes), and
    C{flushed}'s NAT flushed C{flush_after} seconds after both connected.
    """
    rendezvous = tempfile.mkdtemp(prefix="natbypass-migration-")
    # Time for both processes to start, learn their mappings and swap them on a busy machine.
    start_at = time.time() + START_LEAD
    procs = []
    for name, peer, role, send in ((writer, reader, 0, True), (reader, writer, 1, False)):
        argv = enginepeer.argv(
            name,
            peer,
            role,
            rendezvous,
            STUN,
            protocol,
            start_at,
            "--seconds",
            str(seconds),
            "--keepalive",
            str(keepalive),
            "--timeout",
            "5",
            module="natbypass.lab.migration",
        )
        if send:
            argv.append("--send")
        procs.append(lab.spawn(name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    lines: list[list[dict[str, Any]]] = [[], []]
    # Wait for both "connected" lines, then flush.
    for i, proc in enumerate(procs):
        assert proc.stdout is not None
        for raw in proc.stdout:
            if raw.startswith("{"):
                event = json.loads(raw)
                lines[i].append(event)
                if event["event"] in ("connected", "failed"):
                    break
    connected = all(any(e["event"] == "connected" for e in side) for side in lines)
    flushed_at = 0.0
    if connected:
        time.sleep(flush_after)
        flushed_at = flush_nat(lab, flushed)
    for i, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=60 + seconds)
        lines[i] += [json.loads(raw) for raw in stdout.splitlines() if raw.startswith("{")]
        if not any(e["event"] in ("path", "failed") for e in lines[i]) and protocol == "udp":
            lines[i].append({"event": "stderr", "text": stderr[-2000:]})
    return FlushResult(flushed_at, lines[0], lines[1])


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))

"""
A long-running connecting peer for birthday-punching runs in the NAT lab
(C{tests/test_lab_birthday.py}, C{bench/birthday_campaign.py}).

C{natbypass connect} is a fresh process: its first offer goes out before
discovery has classified its own NAT, so the pair's row is "unknown" and a
birthday punch only starts on the retry after discovery.  A peer that runs
for a while (a daemon, C{natbypass-peer}) knows its NAT; this one waits for
discovery once, then connects C{--count} times over UDP to the same peer,
sends a line through its echo (so the listener's side is up too), closes the
path, and prints one JSON line per attempt (C{ok}: connected and echoed;
C{elapsed_ms}: to the secured path)::

    {"n": 0, "ok": true, "echo": true, "elapsed_ms": 812, "remote": "198.18.1.2:40123",
     "sprayed": 301, "landed_at": 262, "probes_sent": 305}
    {"n": 1, "ok": false, "elapsed_ms": 5003, "reason": "..."}

Run inside a lab host::

    python -m natbypass.lab.birthdaypeer --mediator tcp:198.18.0.2:7000 --stun 198.18.0.2:3478 \\
        --id prc-driver --identity /tmp/x.pem --peer symr --count 20 [--timeout 5] [--birthday-sockets 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
from twisted.internet.threads import deferToThread

from natbypass.address import format_address, parse_host_port
from natbypass.identity import load_or_create
from natbypass.peer import Peer, PeerConfig
from natbypass.punch.birthday import BIRTHDAY_PROBES, BIRTHDAY_RATE, BIRTHDAY_SOCKETS


def parser() -> argparse.ArgumentParser:
    """The driver's command line; the birthday bounds default to the peer's."""
    p = argparse.ArgumentParser(prog="python -m natbypass.lab.birthdaypeer")
    p.add_argument("--mediator", required=True)
    p.add_argument("--stun", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--pause", type=float, default=0.3, help="seconds between attempts")
    p.add_argument("--step", action="store_true", help="before each attempt after the first, wait for a line on stdin")
    p.add_argument("--birthday-sockets", type=int, default=BIRTHDAY_SOCKETS)
    p.add_argument("--birthday-rate", type=float, default=BIRTHDAY_RATE)
    p.add_argument("--birthday-probes", type=int, default=BIRTHDAY_PROBES)
    return p


def emit(event: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (the harness reads it as it comes)."""
    print(json.dumps(event), flush=True)


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """Start the peer, wait for discovery, connect C{args.count} times; every outcome is printed."""
    config = PeerConfig(
        punch_timeout=args.timeout,
        birthday_sockets=args.birthday_sockets,
        birthday_rate=args.birthday_rate,
        birthday_probes=args.birthday_probes,
    )
    peer = Peer(
        reactor,
        args.id,
        clientFromString(reactor, args.mediator),
        parse_host_port(args.stun, 3478),
        identity=load_or_create(args.identity),
        protocol="udp",
        config=config,
    )
    peer.startService()
    try:
        await peer.whenReady()
        await peer.whenDiscovered()
        emit({"event": "discovered", "nat": peer.nat.kind("udp").value})
        for n in range(args.count):
            if args.step and n:
                await deferToThread(sys.stdin.readline)
            started = reactor.seconds()
            try:
                conn = await peer.connect(args.peer, "udp")
            except Exception as e:  # every failure is a data point
                emit({"n": n, "ok": False, "elapsed_ms": round((reactor.seconds() - started) * 1000), "reason": str(e)})
            else:
                elapsed = round((reactor.seconds() - started) * 1000)
                stats = getattr(conn, "punch_stats", None)
                remote = conn.remote_address
                echoed = await echo(reactor, conn)
                emit(
                    {
                        "n": n,
                        "ok": echoed,
                        "echo": echoed,
                        "elapsed_ms": elapsed,
                        "remote": format_address((remote.host, remote.port)),
                        "sprayed": stats.sprayed if stats is not None else None,
                        "landed_at": stats.landed_at if stats is not None else None,
                        "probes_sent": stats.probes_sent if stats is not None else None,
                    }
                )
                conn.close()
            await task.deferLater(reactor, args.pause)
    finally:
        await peer.stopService()


def campaign(
    lab: Any, node: str, argv: list[str], count: int, forget: list[str], timeout: float = 60.0, settle: float = 0.5
) -> list[dict[str, Any]]:
    """
    Run the driver (C{argv}, with C{--step}) in C{node} for C{count}
    attempts and return its events.  Before each attempt after the first, the
    UDP connection tracking of the NAT nodes C{forget} is deleted: the
    previous attempts' guesses left filter entries open in the cone's NAT
    (for its UDP timeout) that a new attempt's random ports could hit, so
    without it later attempts would not be independent draws.
    """
    import subprocess
    import time

    proc = lab.spawn(node, [*argv, "--count", str(count), "--step"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)  # fmt: skip
    events: list[dict[str, Any]] = []
    try:
        while len([e for e in events if "n" in e]) < count:
            line = proc.stdout.readline()
            if not line:
                break
            if not line.startswith("{"):
                continue
            events.append(json.loads(line))
            if "n" in events[-1] and len([e for e in events if "n" in e]) < count:
                # Let the closing path's last packets (the QUIC close) through the NATs first.
                time.sleep(settle)
                for nat in forget:
                    lab.exec(nat, ["conntrack", "-D", "-p", "udp"], timeout=timeout)
                proc.stdin.write("\n")
                proc.stdin.flush()
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return events


class _Echoes:
    """The connection's receiver: fires C{got} at the first line back."""

    def __init__(self) -> None:
        self.got: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.got.called:
            self.got.callback(None)

    def connectionLost(self, reason: Any) -> None:
        pass


async def echo(reactor: Any, conn: Any, tries: int = 3, wait: float = 1.0) -> bool:
    """
    One line through the listener's echo (a datagram, resent up to C{tries}
    times): the path works both ways and the listener's side of the secure
    channel is ready too, not only ours.
    """
    receiver = _Echoes()
    conn.setReceiver(receiver)
    for _ in range(tries):
        conn.send(b"birthday?\n")
        pause = task.deferLater(reactor, wait)
        pause.addErrback(lambda _: None)  # cancelled below when the echo came first
        await defer.DeferredList([receiver.got, pause], fireOnOneCallback=True)
        pause.cancel()
        if receiver.got.called:
            return True
    return False


def main(argv: list[str] | None = None) -> None:
    """Run L{run} on the global reactor."""
    args = parser().parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])

"""
The re-punch in the NAT lab (issue 12): two full peers (C{natbypass.peer.Peer},
through the lab mediator's signalling and STUN) keep a stream running, and
the NAT of one of them rebinds to a I{different} port, as a router that
restarted with a new port allocation would: L{rebind_nat} flushes its
conntrack and mapping state and gives its endpoint-independent, rewriting
mapping (C{jhash} of the internal address and port) a new hash seed.  The
other side is a port-restricted cone, so its NAT drops the new port's
packets until it sends there: QUIC migration alone cannot follow; the
re-punch through the mediator does (C{natbypass.punch.repunch}).

One side per process (C{--listen} takes the stream's writer in and reads;
the other connects and writes)::

    python -m natbypass.lab.repunch --id b --mediator tcp:198.18.0.2:7000 --stun 198.18.0.2:3478 --listen
    python -m natbypass.lab.repunch --id a --mediator ... --stun ... --peer b --seconds 10

prints the JSON lines of C{natbypass.lab.migration} (C{connected}, C{sent} or
C{received}, C{lost}, C{path}) and C{repunch} (what the re-puncher did).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString

from natbypass.address import parse_host_port
from natbypass.lab import migration
from natbypass.lab.lab import Lab
from natbypass.lab.rules import HASH_PORT_COUNT, TABLE
from natbypass.peer import Peer, PeerConfig

SEND_AFTER_CONNECT = 0.5


def _report(r: Any) -> Any:
    """The path's line and the re-puncher's (C{r}, taken when the path was new: it leaves the registry with it)."""

    def report(conn: Any) -> None:
        migration._path_report(conn)
        if r is not None:
            migration._emit(
                "repunch",
                asked=r.plan.asked,
                honoured=r.plan.honoured,
                probes_sent=r.probes_sent,
                failures=r.failures,
                last_failure=r.last_failure,
            )

    return report


async def _main(reactor: Any, args: argparse.Namespace) -> None:
    cfg = PeerConfig(keepalive_interval=args.keepalive, discover=False, repunch=not args.no_repunch)
    peer = Peer(reactor, args.id, clientFromString(reactor, args.mediator), args.stun, protocol="udp", config=cfg)
    peer.startService()
    await peer.whenReady()
    if args.listen:
        arrived: defer.Deferred = defer.Deferred()

        class Handler:
            def connectionArrived(self, conn: Any) -> None:
                if not arrived.called:
                    arrived.callback(conn)

        peer.listen(Handler())  # type: ignore[arg-type]
        migration._emit("ready")
        conn = await arrived
    else:
        started = reactor.seconds()
        conn = await peer.connect(args.peer, "udp")
        connect_ms = round((reactor.seconds() - started) * 1000)
    remote = [conn.remote_address.host, conn.remote_address.port]
    migration._emit("connected", remote=remote, connect_ms=None if args.listen else connect_ms)
    if not args.listen:
        await task.deferLater(reactor, SEND_AFTER_CONNECT, lambda: None)
    await migration.run_stream(
        reactor, conn, not args.listen, args.seconds, _report(peer.repunchers.get(conn.session_id))
    )
    await peer.stopService()


def main(argv: list[str]) -> None:
    """One side of L{run_rebind}: run a peer, connect or take the connection in, write or read."""
    p = argparse.ArgumentParser(prog="python -m natbypass.lab.repunch")
    p.add_argument("--id", required=True)
    p.add_argument("--mediator", required=True, help="the mediator's client endpoint string")
    p.add_argument("--stun", type=parse_host_port, required=True)
    p.add_argument("--listen", action="store_true", help="take the connection in and read the stream")
    p.add_argument("--peer", help="whom to connect to (and write to)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the writer writes")
    p.add_argument("--keepalive", type=float, default=15.0)
    p.add_argument("--no-repunch", action="store_true", help="the control: no re-punch (PeerConfig.repunch off)")
    args = p.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor, args)))


def rebind_nat(lab: Lab, site: str, seed: int) -> float:
    """
    Make C{site}'s NAT (an endpoint-independent, port-rewriting one) forget
    every flow and mapping and hand out different ports from now on: a new
    seed for the hash that picks its ports.  Returns the wall-clock time
    just before.
    """
    node = f"{site}.nat"
    listing = lab.exec(node, ["nft", "-a", "list", "chain", "ip", TABLE, "postrouting"], check=True).stdout
    rule = next(line.strip() for line in listing.splitlines() if "jhash" in line and "snat" in line)
    handle = re.search(r"# handle (\d+)\s*$", rule)
    assert handle is not None, rule
    text = re.sub(r"\s*# handle \d+\s*$", "", rule)
    text, n = re.subn(rf"mod {HASH_PORT_COUNT}( seed 0x[0-9a-f]+)?", f"mod {HASH_PORT_COUNT} seed {seed:#x}", text)
    assert n == 1, rule
    at = time.time()
    lab.exec(node, ["nft", f"replace rule ip {TABLE} postrouting handle {handle.group(1)} {text}"], check=True)
    migration.flush_nat(lab, site)
    return at


def run_rebind(
    lab: Lab,
    writer: str,
    reader: str,
    rebinding: str,
    *,
    mediator: str,
    stun: str,
    rebind_after: float = 3.0,
    seconds: float = 10.0,
    seed: int | None = None,
    repunch: bool = True,
) -> migration.FlushResult:
    """
    A stream from peer C{writer} (its site's host) to C{reader}, through the
    lab mediator; C{rebinding}'s NAT rebinds C{rebind_after} seconds after
    both connected (C{repunch} False: the peers do not re-punch, the control), with hash seed C{seed} (None: a random one, so each run
    of a shared lab changes the ports; the same port comes out again with a
    chance of 1 in 8192).
    """
    base = [sys.executable, "-m", "natbypass.lab.repunch", "--mediator", mediator, "--stun", stun]
    if not repunch:
        base.append("--no-repunch")
    # Fresh ids: each process makes an ephemeral key, and the mediator holds an id for the key it first saw.
    suffix = os.urandom(3).hex()
    writer_id, reader_id = f"{writer}-{suffix}", f"{reader}-{suffix}"
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [lab.spawn(reader, [*base, "--id", reader_id, "--listen"], **pipes)]
    lines: list[list[dict[str, Any]]] = [[], []]

    def until(i: int, events: tuple[str, ...]) -> bool:
        out = procs[i].stdout
        assert out is not None
        for raw in out:
            if raw.startswith("{"):
                event = json.loads(raw)
                lines[i].append(event)
                if event["event"] in events:
                    return event["event"] == events[0]
        return False

    ok = until(0, ("ready",))
    if ok:
        argv = [*base, "--id", writer_id, "--peer", reader_id, "--seconds", str(seconds)]
        procs.insert(0, lab.spawn(writer, argv, **pipes))
        lines.reverse()
        ok = until(0, ("connected", "failed")) and until(1, ("connected",))
    rebound_at = 0.0
    if ok:
        time.sleep(rebind_after)
        rebound_at = rebind_nat(lab, rebinding, seed if seed is not None else int.from_bytes(os.urandom(4), "big"))
    for i, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=90 + seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        lines[i] += [json.loads(raw) for raw in stdout.splitlines() if raw.startswith("{")]
        if not any(e["event"] == "repunch" for e in lines[i]):
            lines[i].append({"event": "stderr", "text": stderr[-3000:]})
    if len(lines) == 1:
        lines.insert(0, [])
    return migration.FlushResult(rebound_at, lines[0], lines[1])


if __name__ == "__main__":
    main(sys.argv[1:])

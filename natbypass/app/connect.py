"""
``natbypass connect``: open a direct path to a peer, exchange echoes, exit.

Exit status 0 when the path was made and the echoes came back, 1 when no
path could be made (or the echoes did not return), 2 on bad usage.  With
``--json`` it prints one JSON object a line (see ``docs/traversal.md``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater, react
from twisted.logger import Logger

from natbypass.app.echo import EchoClient
from natbypass.peer import Peer, PeerConfig, parse_wish
from natbypass.app.peer_options import stun_server
from natbypass.punch.candidates import PortRange
from natbypass.signaling.client import client_endpoint
from natbypass.stun.client import route_source_address

log = Logger()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="natbypass connect",
        description="Open a direct UDP or TCP path to a peer through its NAT, then exchange echo round trips.",
    )
    p.add_argument("--mediator", required=True, metavar="ENDPOINT",
                   help="the mediator's signalling endpoint, e.g. tcp:HOST:7000 or tls:HOST:7443")
    p.add_argument("--id", required=True, help="our peer id at the mediator")
    p.add_argument("--peer", required=True, help="the id of the peer to connect to")
    p.add_argument("--stun", metavar="HOST[:PORT]", help="STUN server (default: port 3478 on the mediator's host)")
    p.add_argument("--token", help="token for a mediator that requires one")
    p.add_argument("--ca", metavar="PEM", help="CA certificate to verify a tls: mediator with")
    p.add_argument("--protocol", default="auto",
                   help="auto, udp, tcp, or an ordered list like tcp,udp (default auto)")
    p.add_argument("--count", type=int, default=3, help="echo round trips after connecting (default 3)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between echo round trips (default 0)")
    p.add_argument("--port-range", metavar="LOW-HIGH", help="local ports to use (for firewall rules)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds each protocol may try (default 5)")
    p.add_argument("--no-discovery", action="store_true",
                   help="skip RFC 5780 NAT behaviour discovery (only learn the mapped address)")
    p.add_argument("--json", action="store_true", help="print JSON events, one a line")
    return p


def _attempts(outcome: Any) -> list[dict[str, Any]]:
    return [a.to_json() for a in outcome.attempts] if outcome is not None else []


async def _main(reactor: Any, args: argparse.Namespace, out: Any) -> int:
    started = reactor.seconds()
    peer = Peer(
        reactor,
        args.id,
        client_endpoint(reactor, args.mediator, args.ca),
        stun_server(args.stun, args.mediator),
        token=args.token,
        protocol=args.protocol,
        config=PeerConfig(
            port_range=PortRange.parse(args.port_range) if args.port_range else None,
            punch_timeout=args.timeout,
            discover=not args.no_discovery,
        ),
    )
    peer.startService()

    def emit(event: dict[str, Any], text: str) -> None:
        print(json.dumps(event) if args.json else text, file=out, flush=True)

    try:
        try:
            conn = await peer.connect(args.peer)
        except Exception as e:
            elapsed = round((reactor.seconds() - started) * 1000)
            outcome = getattr(e, "outcome", None)
            emit(
                {"event": "failed", "peer": args.peer, "elapsed_ms": elapsed, "reason": str(e),
                 "attempts": _attempts(outcome)},
                f"could not connect to {args.peer}: {e}",
            )
            return EXIT_FAILED
        elapsed = round((reactor.seconds() - started) * 1000)
        local, remote = conn.local_address, conn.remote_address
        # A wildcard-bound socket: name the interface the path actually leaves from.
        local_host = local.host if local.host not in ("0.0.0.0", "::") else route_source_address((remote.host, remote.port))
        emit(
            {
                "event": "connected",
                "peer": args.peer,
                "session": conn.session_id,
                "protocol": conn.protocol,
                "local_address": f"{local_host}:{local.port}",
                "remote_address": f"{remote.host}:{remote.port}",
                "elapsed_ms": elapsed,
                "attempts": _attempts(conn.outcome),
            },
            f"connected to {args.peer} over {conn.protocol}: {local_host}:{local.port} -> "
            f"{remote.host}:{remote.port} in {elapsed} ms",
        )
        echo = EchoClient(conn, reactor)
        rtts: list[float] = []
        for n in range(args.count):
            try:
                rtt = await echo.ping(n).addTimeout(max(2.0, args.timeout), reactor)
            except Exception:
                break
            rtts.append(rtt * 1000)
            if args.interval and n + 1 < args.count:
                await deferLater(reactor, args.interval)
        summary: dict[str, Any] = {"event": "echo", "sent": args.count, "received": len(rtts)}
        if rtts:
            summary["rtt_ms"] = {
                "min": round(min(rtts), 3),
                "median": round(statistics.median(rtts), 3),
                "max": round(max(rtts), 3),
            }
        emit(
            summary,
            f"echo: {len(rtts)}/{args.count} came back"
            + (f", rtt min/median/max {min(rtts):.1f}/{statistics.median(rtts):.1f}/{max(rtts):.1f} ms" if rtts else ""),
        )
        conn.close()
        return EXIT_OK if len(rtts) == args.count else EXIT_FAILED
    finally:
        await defer.maybeDeferred(peer.stopService)


def run(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        parse_wish(args.protocol)
        if args.port_range:
            PortRange.parse(args.port_range)
        stun_server(args.stun, args.mediator)
        if args.count < 0 or args.interval < 0:
            raise ValueError("--count and --interval must be 0 or more")
    except ValueError as e:
        print(f"natbypass connect: {e}", file=sys.stderr)
        return EXIT_USAGE
    result: list[int] = []

    async def main(reactor: Any) -> None:
        result.append(await _main(reactor, args, sys.stdout))

    try:
        react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_FAILED
    return result[0] if result else EXIT_FAILED

"""
C{natbypass connect}: open a direct path to a peer, exchange echoes over a
stream to its C{echo} service, exit.

Exit status 0 when the path was made and the echoes came back, 1 when no
path could be made (or the echoes did not return), 2 on bad usage.  With
C{--json} it prints one JSON object a line (see C{docs/traversal.md}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger

from natbypass.address import format_address, is_wildcard
from natbypass.app.echo import ECHO_SERVICE, EchoStreamClient
from natbypass.app.peer_options import (
    PEER_OPTIONS,
    TARGET_OPTIONS,
    OptionSpec,
    add_arguments,
    check_peer_options,
    check_target_options,
    make_peer,
    namespace_options,
)
from natbypass.app.run import react_command
from natbypass.interfaces import IPeer
from natbypass.net import route_source_address
from natbypass.punch.candidates import CandidateError
from natbypass.punch.race import AllAttemptsFailed
from natbypass.signaling.client import SignalingError
from natbypass.trust import TrustFileError

log = Logger()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: natbypass connect's own options, besides the shared ones (the peer's, L{TARGET_OPTIONS}, among them).
CONNECT_OPTIONS: tuple[OptionSpec, ...] = TARGET_OPTIONS + (
    OptionSpec("count", "echo round trips after connecting", default=3, coerce=int),
    OptionSpec("interval", "seconds between echo round trips", default=0.0, coerce=float),
    OptionSpec("json", "print JSON events, one a line", flag=True),
)


class MediatorUnreachable(Exception):
    """The mediator did not register us in time: not running, not reachable, or refusing us silently."""


#: How long C{natbypass connect} waits to be registered at the mediator before it gives up and says so.
MEDIATOR_TIMEOUT = 10.0


#: Why a connect can fail without a bug: every attempt failed, the mediator
#: said no or could not be reached, no local port was free.
CONNECT_FAILURES: tuple[type[BaseException], ...] = (
    MediatorUnreachable,
    AllAttemptsFailed,
    SignalingError,
    CandidateError,
    defer.TimeoutError,
    ConnectError,
    ConnectionClosed,
    OSError,
)

#: Why an echo does not come back: it took too long, or the path closed.
ECHO_FAILURES: tuple[type[BaseException], ...] = (defer.TimeoutError, ConnectionClosed)


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of C{natbypass connect}: the shared peer options
    (L{PEER_OPTIONS}) and its own (L{CONNECT_OPTIONS}).
    """
    p = argparse.ArgumentParser(
        prog="natbypass connect",
        description="Open a direct UDP or TCP path to a peer through its NAT, then exchange echo round trips.",
    )
    add_arguments(p, PEER_OPTIONS + CONNECT_OPTIONS)
    return p


def _ms_since(started: float, at: float | None) -> int | None:
    return None if at is None else round((at - started) * 1000)


def _attempts(outcome: Any) -> list[dict[str, Any]]:
    return [a.to_json() for a in outcome.attempts] if outcome is not None else []


async def _main(
    reactor: Any,
    options: dict[str, Any],
    out: Any,
    make: Callable[..., IPeer] = make_peer,
) -> int:
    """
    Connect, echo, report; C{options} are checked (L{check_peer_options}).
    What goes wrong on the way is reported and gives exit status 1; a bug
    is raised.
    """
    started = reactor.seconds()
    registered_at: float | None = None
    peer = make(reactor, options, known_peers=options["known-peers"])
    peer.startService()
    target = options["peer"]

    def emit(event: dict[str, Any], text: str) -> None:
        print(json.dumps(event) if options["json"] else text, file=out, flush=True)

    try:
        try:
            await registered(peer, options["mediator"], reactor)
            registered_at = reactor.seconds()
            conn = await peer.connect(target, fingerprint=options["peer-fingerprint"])
        except CONNECT_FAILURES as e:
            elapsed = round((reactor.seconds() - started) * 1000)
            outcome = getattr(e, "outcome", None)
            emit(
                {
                    "event": "failed",
                    "peer": target,
                    "elapsed_ms": elapsed,
                    "registered_ms": _ms_since(started, registered_at),
                    "reason": str(e),
                    "attempts": _attempts(outcome),
                },
                f"could not connect to {target}: {e}",
            )
            return EXIT_FAILED
        elapsed = round((reactor.seconds() - started) * 1000)
        local, remote = conn.local_address, conn.remote_address
        # A wildcard-bound socket: name the interface the path actually leaves from.
        local_host = local.host if not is_wildcard(local.host) else route_source_address((remote.host, remote.port))
        local_text, remote_text = format_address((local_host, local.port)), format_address(remote)
        emit(
            {
                "event": "connected",
                "peer": target,
                "session": conn.session_id,
                "protocol": conn.protocol,
                "local_address": local_text,
                "remote_address": remote_text,
                "elapsed_ms": elapsed,
                # From the start too: registered at the mediator (the connect asked then), raw path proven.
                "registered_ms": _ms_since(started, registered_at),
                "punched_ms": _ms_since(started, conn.punched_at),
                "secure": conn.secure,
                "peer_fingerprint": str(conn.peer_fingerprint),
                "cipher": conn.cipher,
                "handshake_ms": round(conn.handshake_ms, 1),
                "attempts": _attempts(conn.outcome),
            },
            f"connected to {target} over {conn.protocol}: {local_text} -> {remote_text} in {elapsed} ms\n"
            f"  {target} proved key {conn.peer_fingerprint}; {conn.cipher}, handshake {conn.handshake_ms:.0f} ms",
        )
        count = options["count"]
        rtts: list[float] = []
        error: str | None = None
        echo: EchoStreamClient | None = None
        if count:
            try:
                echo = await conn.openStream(ECHO_SERVICE, _EchoFactory(reactor)).addTimeout(
                    max(2.0, options["timeout"]), reactor
                )
            except ECHO_FAILURES as e:
                error = f"no echo stream: {e}"
        for n in range(count if echo is not None else 0):
            try:
                rtt = await echo.ping(n).addTimeout(max(2.0, options["timeout"]), reactor)
            except ECHO_FAILURES:
                break
            rtts.append(rtt * 1000)
            if options["interval"] and n + 1 < count:
                await deferLater(reactor, options["interval"])
        summary: dict[str, Any] = {"event": "echo", "sent": count, "received": len(rtts)}
        if rtts:
            summary["rtt_ms"] = {
                "min": round(min(rtts), 3),
                "median": round(statistics.median(rtts), 3),
                "max": round(max(rtts), 3),
            }
        if error is not None:
            summary["error"] = error
        emit(
            summary,
            f"echo: {len(rtts)}/{count} came back"
            + (f", rtt min/median/max {min(rtts):.1f}/{statistics.median(rtts):.1f}/{max(rtts):.1f} ms" if rtts else "")
            + (f" ({error})" if error is not None else ""),
        )
        if echo is not None and echo.transport is not None:
            echo.transport.loseConnection()
        conn.close()
        return EXIT_OK if len(rtts) == count else EXIT_FAILED
    finally:
        await defer.maybeDeferred(peer.stopService)


class _EchoFactory(Factory):
    """Makes the stream side of the echo round trips, timed on C{clock}."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock

    def buildProtocol(self, addr: Any) -> EchoStreamClient:
        return EchoStreamClient(self.clock)


async def registered(peer: IPeer, mediator: str, reactor: Any) -> None:
    """
    Wait until the peer is registered at the mediator, at most
    L{MEDIATOR_TIMEOUT}: the signalling client retries a mediator it cannot
    reach for ever, which a one-shot command must not do silently.
    """
    try:
        await peer.whenReady().addTimeout(MEDIATOR_TIMEOUT, reactor)
    except defer.TimeoutError:
        raise MediatorUnreachable(
            f"not registered at the mediator {mediator} within {MEDIATOR_TIMEOUT:g} s: is it running, and is "
            "its signalling port reachable from here?"
        ) from None


def parse_options(argv: list[str]) -> dict[str, Any]:
    """
    The checked options of C{argv}.  Raises SystemExit as C{argparse} does
    (status 2 on bad usage, 0 after C{--help}); a bad value is reported on
    stderr and exits with status 2 too.
    """
    args = build_parser().parse_args(argv)
    options = namespace_options(args, PEER_OPTIONS + CONNECT_OPTIONS)
    try:
        check_peer_options(options)
        if options["count"] < 0 or options["interval"] < 0:
            raise ValueError("--count and --interval must be 0 or more")
        check_target_options(options)
    except (ValueError, TrustFileError) as e:
        print(f"natbypass connect: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return options


def run(argv: list[str]) -> int:
    """
    Entry point of C{natbypass connect} for L{natbypass.app.cli}: the exit
    status (L{EXIT_OK}, L{EXIT_FAILED}, L{EXIT_USAGE}) is returned, not exited
    with, so the dispatcher decides.
    """
    return react_command(argv, parse_options, lambda reactor, options: _main(reactor, options, sys.stdout))

"""
C{natbypass pipe}: stdin to a peer and the peer's data to stdout, like
C{nc}, over one stream to its C{pipe} service.

C{natbypass pipe --peer bob < backup.tar} sends the file; C{natbypass pipe
--listen > backup.tar} on bob's side serves one C{pipe} stream (from a peer
C{--allow} permits) and writes what arrives.  Both directions flow at once
and end separately: end of stdin half-closes the stream, the peer's end of
data closes stdout.  Stdin and stdout are Twisted's C{StandardIO}, each the
stream's producer or consumer (L{natbypass.app.relay.join}), so a big file
is never held in memory.

C{--progress} (on by default when stderr is a terminal) draws bytes, rate and
elapsed time each way on stderr with tqdm.  Exit status 0 when the stream
ended cleanly, 1 with a message on stderr when it did not, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

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
from natbypass.app.relay import Relay, join
from natbypass.app.run import react_command
from natbypass.streams import StreamRefused
from natbypass.trust import AllowList, TrustFileError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: The stream service C{natbypass pipe --listen} serves.
PIPE_SERVICE = "pipe"

#: Seconds stdout may take to drain after the stream ended before we exit anyway.
DRAIN_TIMEOUT = 30.0


class Progress:
    """Bytes each way, drawn on stderr by tqdm (imported only when asked for)."""

    def __init__(self, peer_id: str, out: Any) -> None:
        from tqdm import tqdm

        common = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "file": out, "leave": True}
        self.sent = tqdm(desc=f"to {peer_id}", position=0, **common)
        self.received = tqdm(desc=f"from {peer_id}", position=1, **common)

    def update(self, sent: int, received: int) -> None:
        if sent:
            self.sent.update(sent)
        if received:
            self.received.update(received)

    def close(self) -> None:
        self.sent.close()
        self.received.close()


class _Counting(Relay):
    """A relay side that reports what it reads to a progress display."""

    def __init__(self, report: Callable[[int], None], on_lost: Any = None) -> None:
        super().__init__(on_lost)
        self._report = report

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self._report(len(data))


class Pipe:
    """
    One piped stream: the stdio side and the stream side, joined once the
    stream is open; C{done} fires with the stream's end reason (an
    exception: C{ConnectionDone} when clean) once stdout has drained, or at
    once when the stream failed.
    """

    def __init__(self, make_stdio: Callable[[Protocol], Any], progress: Any = None) -> None:
        self._make_stdio = make_stdio
        self.progress = progress
        self.done: Deferred[BaseException] = Deferred()
        self.stdio = _Counting(self._sent, self._stdioLost)
        self.stream = _Counting(self._received, self._streamLost)
        self.stream.whenMade().addCallback(self._start)
        self._drained: Deferred[None] = Deferred()
        self.stdio.writeConnectionLost = self._stdoutClosed  # type: ignore[method-assign]

    def _sent(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(n, 0)

    def _received(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(0, n)

    def _start(self, _: Any) -> None:
        self._make_stdio(self.stdio)
        join(self.stdio, self.stream)

    def _stdoutClosed(self) -> None:
        Relay.writeConnectionLost(self.stdio)
        if not self._drained.called:
            self._drained.callback(None)

    def _stdioLost(self, side: Relay, reason: Failure) -> None:
        # A stdio closed whole (after the stream ended) says so here, not in writeConnectionLost.
        if not self._drained.called:
            self._drained.callback(None)

    def _streamLost(self, side: Relay, reason: Failure) -> None:
        if reason.check(ConnectionDone) and self.stdio.transport is not None:
            # (a Failure returned from a callback would be an error: pass it by closure)
            self._drained.addCallback(lambda _: self._finish(reason))
        else:
            self._finish(reason)

    def _finish(self, reason: Failure) -> None:
        if self.stdio.transport is not None:
            self.stdio.transport.loseConnection()
        if self.progress is not None:
            self.progress.close()
        if not self.done.called:
            self.done.callback(reason.value)


class _ListenFactory(Factory):
    """Serves one C{pipe} stream (from C{only}, when given); refuses the rest while it runs."""

    def __init__(self, pipe: Pipe, only: str | None) -> None:
        self.pipe = pipe
        self.only = only
        self.taken: str | None = None

    def buildProtocol(self, addr: Any) -> Protocol:
        if self.only is not None and addr.peer_id != self.only:
            raise StreamRefused(f"this pipe is waiting for {self.only}, not {addr.peer_id}")
        if self.taken is not None:
            raise StreamRefused(f"busy: already piping with {self.taken}")
        self.taken = addr.peer_id
        return self.pipe.stream


#: natbypass pipe's own options, besides the shared ones.
PIPE_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("listen", "wait for one peer to pipe to us (instead of --peer)", flag=True),
    OptionSpec("allow", "with --listen: only peers listed in FILE (fingerprints, optionally with ids)",
               metavar="FILE"),
    OptionSpec("progress", "draw bytes, rate and elapsed time on stderr (default: when stderr is a terminal)",
               flag=True),
    OptionSpec("no-progress", "never draw progress", flag=True),
)  # fmt: skip

#: --peer is optional here: --listen takes its place.
_TARGET = tuple(
    OptionSpec(s.name, s.help + " (with --listen: only this peer)", s.default, s.coerce, s.metavar)
    if s.name == "peer"
    else s
    for s in TARGET_OPTIONS
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of C{natbypass pipe}."""
    p = argparse.ArgumentParser(
        prog="natbypass pipe",
        description="Pipe stdin to a peer and its data to stdout (like nc), over one secure stream.",
    )
    add_arguments(p, PEER_OPTIONS + _TARGET + PIPE_OPTIONS)
    return p


def parse_options(argv: list[str], stderr_is_tty: bool | None = None) -> dict[str, Any]:
    """The checked options of C{argv}; bad usage exits with status 2."""
    args = build_parser().parse_args(argv)
    options = namespace_options(args, PEER_OPTIONS + _TARGET + PIPE_OPTIONS)
    try:
        if options["listen"] == bool(options["peer"]) and not options["listen"]:
            raise ValueError("give --peer NAME (send to it) or --listen (wait for a peer)")
        if options["allow"] and not options["listen"]:
            raise ValueError("--allow is for --listen")
        if options["progress"] and options["no-progress"]:
            raise ValueError("give --progress or --no-progress, not both")
        check_peer_options(options)
        check_target_options(options)
        options["allow"] = AllowList.load(options["allow"]) if options["allow"] else None
    except (ValueError, TrustFileError) as e:
        print(f"natbypass pipe: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    if stderr_is_tty is None:
        stderr_is_tty = sys.stderr.isatty()
    options["progress"] = options["progress"] or (stderr_is_tty and not options["no-progress"])
    return options


async def _main(
    reactor: Any,
    options: dict[str, Any],
    err: Any,
    make_stdio: Callable[[Protocol], Any],
    make: Callable[..., Any] = make_peer,
) -> int:
    """Pipe one stream; returns the exit status."""
    from natbypass.app.connect import CONNECT_FAILURES, registered

    allow = options["allow"] if options["listen"] else None
    peer = make(reactor, options, known_peers=options["known-peers"], allow=allow)
    peer.startService()
    progress = Progress(options["peer"] or "peer", err) if options["progress"] else None
    pipe = Pipe(make_stdio, progress)
    try:
        try:
            await registered(peer, options["mediator"], reactor)
            if options["listen"]:
                peer.serve(PIPE_SERVICE, _ListenFactory(pipe, options["peer"]))
                print(f"natbypass pipe: {options['id']} waiting for a peer", file=err, flush=True)
            else:
                await peer.openStream(
                    options["peer"],
                    PIPE_SERVICE,
                    _OneStream(pipe.stream),
                    options["protocol"],
                    options["peer-fingerprint"],
                )
        except (*CONNECT_FAILURES, StreamRefused) as e:
            if progress is not None:
                progress.close()
            print(f"natbypass pipe: could not reach {options['peer']}: {e}", file=err, flush=True)
            return EXIT_FAILED
        reason = await pipe.done
        if not isinstance(reason, ConnectionDone):
            print(f"natbypass pipe: the stream failed: {reason}", file=err, flush=True)
            return EXIT_FAILED
        return EXIT_OK
    finally:
        await defer.maybeDeferred(peer.stopService)


class _OneStream(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


def run(argv: list[str]) -> int:
    """Entry point of C{natbypass pipe} for L{natbypass.app.cli}: returns the exit status."""

    def main(reactor: Any, options: Any) -> Any:
        from twisted.internet.stdio import StandardIO

        def stdio(protocol: Protocol) -> Any:
            return StandardIO(protocol, reactor=reactor)

        return _main(reactor, options, sys.stderr, stdio)

    return react_command(argv, parse_options, main)

"""
C{natbypass forward}: forward local TCP ports to what a peer exposes, like
C{ssh -L}, over streams of one secure connection.

Each C{-L [BIND:]PORT:HOST:HOSTPORT} (or C{-L [BIND:]PORT:NAME}) listens
locally; every TCP connection accepted there becomes a stream to the peer's
service C{forward:HOST:HOSTPORT} (C{forward:NAME}), and the peer connects it
to HOST:HOSTPORT on its side -- only if it exposes that target
(C{twistd natbypass-peer --expose [NAME=]HOST:PORT}, L{serve_exposed}).

Relaying is L{join}: each side is registered as the other's producer, as
C{twisted.protocols.portforward} does, so a slow reader stops its writer
instead of growing a buffer; half-close travels both ways.  Every forwarded
connection is its own stream: one failing never touches the others.

Exit status 0 after Ctrl-C, 1 when the peer could not be set up (mediator,
listening port), 2 on bad usage.  C{--json} prints one JSON object a line:
C{listening}, C{opened}, C{closed} (bytes each way, duration), C{error}.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import react
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.address import format_address
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
from natbypass.streams import StreamRefused
from natbypass.trust import TrustFileError

log = Logger()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Where forward services start: C{forward:HOST:PORT} or C{forward:NAME}.
SERVICE_PREFIX = "forward:"

#: The address -L listens on when it names none (like ssh: this machine only).
DEFAULT_BIND = "127.0.0.1"


# ----------------------------------------------------------------- the grammar


@dataclass(frozen=True)
class Target:
    """
    What a forwarded connection reaches on the serving side: C{host:port},
    or an exposed C{name} (then C{host} is None).
    """

    host: str | None
    port: int | None
    name: str | None = None

    @property
    def service(self) -> str:
        """The stream service that reaches it: C{forward:HOST:PORT} or C{forward:NAME}."""
        if self.name is not None:
            return SERVICE_PREFIX + self.name
        assert self.host is not None and self.port is not None
        return SERVICE_PREFIX + format_address((self.host, self.port))

    def __str__(self) -> str:
        return self.name if self.name is not None else format_address((self.host or "", self.port or 0))


@dataclass(frozen=True)
class ForwardSpec:
    """One C{-L}: listen on C{bind:port}, forward to C{target}."""

    bind: str
    port: int
    target: Target


@dataclass(frozen=True)
class Exposure:
    """One C{--expose [NAME=]HOST:PORT}: what the serving side connects streams to."""

    name: str | None
    host: str
    port: int

    @property
    def services(self) -> tuple[str, ...]:
        """The services that reach it: by address always, by name too when it has one."""
        by_address = Target(self.host, self.port).service
        return (SERVICE_PREFIX + self.name, by_address) if self.name else (by_address,)


def _split(text: str) -> list[str]:
    """C{text} split on the colons outside C{[...]} (IPv6 literals keep theirs, brackets dropped)."""
    parts, current, depth = [], "", 0
    for c in text:
        if c == "[":
            if depth:
                raise ValueError(f"{text!r}: nested '['")
            depth = 1
        elif c == "]":
            if not depth:
                raise ValueError(f"{text!r}: ']' without '['")
            depth = 0
        elif c == ":" and not depth:
            parts.append(current)
            current = ""
        else:
            current += c
    if depth:
        raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
    parts.append(current)
    return parts


def _port(text: str, what: str, allow_zero: bool = False) -> int:
    if not text.isascii() or not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        low = 0 if allow_zero else 1
        raise ValueError(f"{what} must be a number {low}-65535, not {text!r}")
    return int(text)


def _host(text: str, what: str) -> str:
    """A host as services name it: an IP literal in its canonical form, a name lower-cased."""
    if not text:
        raise ValueError(f"{what} is empty")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or not all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() for label in labels
    ):
        raise ValueError(f"{what} {text!r} is neither an IP address nor a host name")
    return name


def _name(text: str) -> str:
    """An exposed service's name: letters, digits, '.', '_', '-' (so it never looks like HOST:PORT)."""
    if not text or len(text) > 64 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in text):
        raise ValueError(f"a forward name is 1-64 of A-Z a-z 0-9 . _ -, not {text!r}")
    if text.isdigit():
        raise ValueError(f"a forward name cannot be all digits (it would read as a port): {text!r}")
    return text


def parse_forward(text: str) -> ForwardSpec:
    """
    C{-L}'s value: C{[BIND:]PORT:HOST:HOSTPORT} or C{[BIND:]PORT:NAME}
    (IPv6 addresses in brackets).  BIND defaults to L{DEFAULT_BIND}; PORT 0
    lets the system choose.  Raises ValueError with a message a person can act on.
    """
    parts = _split(text.strip())
    # The target ends with a port (HOST:HOSTPORT) or is a name; what precedes it is [BIND:]PORT.
    if len(parts) >= 3 and parts[-1].isdigit():
        target = Target(_host(parts[-2], "the target host"), _port(parts[-1], "the target port"))
        head = parts[:-2]
    elif len(parts) >= 2:
        target = Target(None, None, _name(parts[-1]))
        head = parts[:-1]
    else:
        head, target = [], None
    if target is None or len(head) not in (1, 2):
        raise ValueError(f"-L {text!r}: expected [BIND:]PORT:HOST:HOSTPORT or [BIND:]PORT:NAME")
    bind = DEFAULT_BIND if len(head) == 1 else _bind(head[0])
    return ForwardSpec(bind, _port(head[-1], "the local port", allow_zero=True), target)


def _bind(text: str) -> str:
    if text in ("", "*"):
        return "0.0.0.0"
    if text == "localhost":
        return DEFAULT_BIND
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"the address to listen on must be an IP address, not {text!r}") from None


def parse_expose(text: str) -> Exposure:
    """C{--expose}'s value: C{NAME=HOST:PORT} or C{HOST:PORT}."""
    name, sep, rest = text.strip().rpartition("=")
    parts = _split(rest)
    if len(parts) != 2:
        raise ValueError(f"--expose {text!r}: expected [NAME=]HOST:PORT (IPv6 addresses in brackets)")
    return Exposure(_name(name) if sep else None, _host(parts[0], "the exposed host"), _port(parts[1], "the port"))


# ----------------------------------------------------------------- relaying


@implementer(IPushProducer)
class _Pausing:
    """
    A transport as the producer of the other side: pause and resume pass
    through, stop does not (the relay decides how each side ends, so an
    abort is not turned into a clean close).
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The relay ends the sides (L{Relay.connectionLost})."""


@implementer(IHalfCloseableProtocol)
class Relay(Protocol):
    """
    One side of a relayed pair (a TCP connection, a stream, stdio): what it
    reads is written to the other side.  It is paused from C{connectionMade}
    until L{join} pairs it, so nothing is read that could not be passed on.

    @ivar bytes: what this side read (and handed to the other).
    @ivar lost: the reason it ended, once it did.
    """

    def __init__(self, on_lost: Callable[[Relay, Failure], None] | None = None) -> None:
        self.other: Relay | None = None
        self.bytes = 0
        self.read_done = False
        self.write_done = False
        self.lost: Failure | None = None
        self._on_lost = on_lost
        self._made: Deferred[Relay] = Deferred()

    def whenMade(self) -> Deferred[Relay]:
        """Fires with this side once its C{connectionMade} ran."""
        return self._made

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self._made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.other is not None and self.other.lost is None:
            self.other.transport.write(data)

    def readConnectionLost(self) -> None:
        """Our side sent all it will: end the other side's writing (after what is queued)."""
        self.read_done = True
        other = self.other
        if other is not None and other.lost is None:
            other.transport.unregisterProducer()
            other.transport.loseWriteConnection()
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self.write_done = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self.read_done and self.write_done:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        if not isinstance(reason, Failure):
            reason = Failure(reason)
        self.lost = reason
        other = self.other
        if other is not None and other.lost is None:
            other.transport.unregisterProducer()
            if reason.check(ConnectionDone):
                other.transport.loseConnection()
            else:
                getattr(other.transport, "abortConnection", other.transport.loseConnection)()
        if self._on_lost is not None:
            self._on_lost(self, reason)


def join(a: Relay, b: Relay) -> None:
    """Relay C{a} and C{b} both ways, each the other's producer, then let data flow."""
    a.other, b.other = b, a
    a.transport.registerProducer(_Pausing(b.transport), True)
    b.transport.registerProducer(_Pausing(a.transport), True)
    for side in (a, b):
        side.transport.resumeProducing()


class _OneProtocol(Factory):
    """A factory that hands out one protocol made in advance (a stream's side of a relay)."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


# ----------------------------------------------------------------- serving: --expose


class _TargetFactory(Factory):
    """
    Serves the streams to one exposed target: each becomes a TCP connection
    to it, relayed both ways.  The stream's data waits (paused: its sender
    stalls on credit) until the target accepts; a target that refuses resets
    the stream.
    """

    log = Logger()

    def __init__(self, reactor: Any, exposure: Exposure) -> None:
        self.reactor = reactor
        self.exposure = exposure

    def buildProtocol(self, addr: Any) -> Protocol:
        stream = Relay(self._ended)
        stream.whenMade().addCallback(self._connect, addr)
        return stream

    def _connect(self, stream: Relay, addr: Any) -> None:
        target = Relay()
        endpoint = HostnameEndpoint(self.reactor, self.exposure.host, self.exposure.port)
        connecting = endpoint.connect(_OneProtocol(target))
        stream.connecting = connecting  # type: ignore[attr-defined]

        def connected(_: Any) -> None:
            if stream.lost is None:
                self.log.info(
                    "forwarding {peer} to {target} (stream {stream_id})",
                    peer=addr.peer_id,
                    target=str(Target(self.exposure.host, self.exposure.port)),
                    stream_id=addr.stream_id,
                )
                join(stream, target)
            else:
                target.transport.loseConnection()

        def failed(reason: Failure) -> None:
            if not reason.check(CancelledError):
                self.log.warn(
                    "forward from {peer} to {target} failed: {reason}",
                    peer=addr.peer_id,
                    target=f"{self.exposure.host}:{self.exposure.port}",
                    reason=reason.getErrorMessage(),
                )
                stream.transport.abortConnection()

        connecting.addCallbacks(connected, failed)

    def _ended(self, stream: Relay, reason: Failure) -> None:
        connecting = getattr(stream, "connecting", None)
        if connecting is not None and not connecting.called:
            connecting.cancel()


def serve_exposed(peer: Any, exposures: list[Exposure], reactor: Any) -> list[Any]:
    """
    Serve the C{forward:} services of C{exposures} on C{peer} (a
    L{natbypass.peer.Peer}); returns their ports.  A stream to any other
    C{forward:} service is refused by the peer (no such service).
    """
    ports, served = [], set()
    for exposure in exposures:
        factory = _TargetFactory(reactor, exposure)
        for service in exposure.services:
            if service not in served:
                served.add(service)
                ports.append(peer.serve(service, factory))
    return ports


# ----------------------------------------------------------------- connecting: -L


class Events:
    """Where forward's events go: JSON lines or a person's text, one a line."""

    def __init__(self, out: Any, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.connections = 0

    def number(self) -> int:
        """The next forwarded connection's number (one sequence over every -L)."""
        self.connections += 1
        return self.connections

    def emit(self, event: dict[str, Any], text: str) -> None:
        print(json.dumps(event) if self.as_json else text, file=self.out, flush=True)


class Forwarded:
    """
    One forwarded connection: the local TCP side and, once the peer accepted,
    its stream; says C{opened}, C{closed} or C{error} once each.
    """

    def __init__(self, forwarder: Forwarder, number: int, spec: ForwardSpec) -> None:
        self.forwarder = forwarder
        self.number = number
        self.spec = spec
        self.started = forwarder.clock.seconds()
        self.local = Relay(self._lost)
        self.stream = Relay(self._lost)
        self.opening: Deferred[Any] | None = None
        self.opened = False
        self._reported = False
        self.local.whenMade().addCallback(self._open)

    def _open(self, _: Any) -> None:
        f = self.forwarder
        self.source = format_address(self.local.transport.getPeer())
        self.opening = f.peer.openStream(
            f.peer_id, self.spec.target.service, _OneProtocol(self.stream), f.protocol, f.fingerprint
        )
        self.opening.addCallbacks(self._opened, self._failed)

    def _opened(self, _: Any) -> None:
        self.opening = None
        if self.local.lost is not None:
            self.stream.transport.loseConnection()
            return
        self.opened = True
        address = self.stream.transport.getPeer()
        self.forwarder.events.emit(
            {
                "event": "opened",
                "connection": self.number,
                "from": self.source,
                "service": self.spec.target.service,
                "path": address.path,
                "stream_id": address.stream_id,
            },
            f"#{self.number} {self.source} -> {self.forwarder.peer_id} {self.spec.target} "
            f"(stream {address.stream_id} over {address.path})",
        )
        join(self.local, self.stream)

    def _failed(self, reason: Failure) -> None:
        self.opening = None
        if reason.check(CancelledError):
            return
        f = self.forwarder
        why = reason.getErrorMessage()
        if reason.check(StreamRefused):
            why = (
                f"{f.peer_id} refused {self.spec.target}: {reason.value.reason} "  # type: ignore[union-attr]
                f"(a peer forwards only to what it exposes: twistd natbypass-peer --expose [NAME=]HOST:PORT)"
            )
        self.error(why)
        if self.local.lost is None:
            self.local.transport.loseConnection()

    def error(self, why: str) -> None:
        self._reported = True
        self.forwarder.errors += 1
        self.forwarder.events.emit(
            {"event": "error", "connection": self.number, "service": self.spec.target.service, "reason": why},
            f"#{self.number} error: {why}",
        )

    def _lost(self, side: Relay, reason: Failure) -> None:
        if side is self.local and self.opening is not None:
            self.opening.cancel()
        if not self.opened or self._reported:
            if self.local.lost is not None and not self.opened:
                self.forwarder.done(self)
            return
        if self.local.lost is None or self.stream.lost is None:
            return
        self._reported = True
        ends = [r for r in (self.local.lost, self.stream.lost) if not r.check(ConnectionDone)]
        duration = round((self.forwarder.clock.seconds() - self.started) * 1000)
        event: dict[str, Any] = {
            "event": "closed",
            "connection": self.number,
            "service": self.spec.target.service,
            "bytes_sent": self.local.bytes,
            "bytes_received": self.stream.bytes,
            "duration_ms": duration,
        }
        if ends:
            event["reason"] = ends[0].getErrorMessage()
        self.forwarder.events.emit(
            event,
            f"#{self.number} closed: {self.local.bytes} bytes sent, {self.stream.bytes} received in {duration} ms"
            + (f" ({event['reason']})" if ends else ""),
        )
        self.forwarder.done(self)


class Forwarder(Factory):
    """
    The listening side of one C{-L}: each accepted TCP connection becomes a
    L{Forwarded} stream to the peer.
    """

    def __init__(
        self,
        peer: Any,
        peer_id: str,
        spec: ForwardSpec,
        events: Events,
        clock: Any,
        protocol: Any = None,
        fingerprint: Any = None,
    ) -> None:
        self.peer, self.peer_id, self.spec, self.events, self.clock = peer, peer_id, spec, events, clock
        self.protocol, self.fingerprint = protocol, fingerprint
        self.active: set[Forwarded] = set()
        self.count = 0
        self.errors = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.count += 1
        forwarded = Forwarded(self, self.events.number(), self.spec)
        self.active.add(forwarded)
        return forwarded.local

    def done(self, forwarded: Forwarded) -> None:
        self.active.discard(forwarded)


def listen_endpoint(reactor: Any, spec: ForwardSpec) -> Any:
    """The server endpoint a C{-L} listens on."""
    if ":" in spec.bind:
        return TCP6ServerEndpoint(reactor, spec.port, interface=spec.bind)
    return TCP4ServerEndpoint(reactor, spec.port, interface=spec.bind)


# ----------------------------------------------------------------- the command

#: natbypass forward's own options, besides the shared ones (-L is added by build_parser: it repeats).
FORWARD_OPTIONS: tuple[OptionSpec, ...] = (OptionSpec("json", "print JSON events, one a line", flag=True),)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of C{natbypass forward}."""
    p = argparse.ArgumentParser(
        prog="natbypass forward",
        description="Forward local TCP ports to targets a peer exposes (like ssh -L), over one secure connection.",
    )
    add_arguments(p, PEER_OPTIONS + TARGET_OPTIONS + FORWARD_OPTIONS)
    p.add_argument(
        "-L",
        dest="local",
        action="append",
        default=[],
        type=_argument(parse_forward),
        metavar="[BIND:]PORT:HOST:HOSTPORT",
        help="listen on BIND:PORT (default bind 127.0.0.1) and forward each connection to HOST:HOSTPORT on the "
        "peer's side (or -L [BIND:]PORT:NAME to a target it exposes by name); repeatable",
    )
    p.add_argument(
        "-R",
        dest="remote",
        action="append",
        default=[],
        metavar="[BIND:]PORT:HOST:HOSTPORT",
        help="not implemented yet: ask the peer to listen and forward back to us",
    )
    return p


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def parse_options(argv: list[str]) -> dict[str, Any]:
    """The checked options of C{argv}; bad usage exits with status 2, as C{argparse} does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = namespace_options(args, PEER_OPTIONS + TARGET_OPTIONS + FORWARD_OPTIONS)
    options["local"], options["remote"] = args.local, args.remote
    try:
        if options["remote"]:
            raise ValueError("-R (remote forwarding) is not implemented yet; use -L on the other side")
        if not options["local"]:
            raise ValueError("give at least one -L [BIND:]PORT:HOST:HOSTPORT")
        check_peer_options(options)
        check_target_options(options)
    except (ValueError, TrustFileError) as e:
        print(f"natbypass forward: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return options


async def start(reactor: Any, options: dict[str, Any], events: Events, peer: Any) -> list[Any]:
    """
    Listen on every C{-L} (the peer is connected to on the first forwarded
    connection, and again after a lost path); returns the listening ports.
    """
    from natbypass.app.connect import registered

    await registered(peer, options["mediator"], reactor)
    ports = []
    for spec in options["local"]:
        factory = Forwarder(
            peer, options["peer"], spec, events, reactor, options["protocol"], options["peer-fingerprint"]
        )
        port = await listen_endpoint(reactor, spec).listen(factory)
        ports.append(port)
        host = port.getHost()
        events.emit(
            {
                "event": "listening",
                "address": format_address((host.host, host.port)),
                "peer": options["peer"],
                "target": str(spec.target),
                "service": spec.target.service,
            },
            f"listening on {format_address((host.host, host.port))} -> {options['peer']} {spec.target}",
        )
    return ports


async def _main(reactor: Any, options: dict[str, Any], out: Any, make: Callable[..., Any] = make_peer) -> int:
    """Run until the reactor stops (Ctrl-C); 1 when it could not start."""
    from natbypass.app.connect import CONNECT_FAILURES

    events = Events(out, options["json"])
    peer = make(reactor, options, known_peers=options["known-peers"])
    peer.startService()
    stopping: list[Any] = []

    def stop() -> Deferred[Any]:
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in stopping] + [defer.maybeDeferred(peer.stopService)]
        )

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    try:
        stopping.extend(await start(reactor, options, events, peer))
    except (*CONNECT_FAILURES, CannotListenError) as e:
        events.emit({"event": "failed", "reason": str(e)}, f"natbypass forward: {e}")
        return EXIT_FAILED
    await Deferred()  # until Ctrl-C stops the reactor
    return EXIT_OK  # pragma: no cover


def run(argv: list[str]) -> int:
    """Entry point of C{natbypass forward} for L{natbypass.app.cli}."""
    try:
        options = parse_options(argv)
    except SystemExit as e:
        return int(e.code or 0)
    result: list[int] = []

    async def main(reactor: Any) -> None:
        code = await _main(reactor, options, sys.stdout)
        result.append(code)

    try:
        react(lambda reactor: defer.ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return EXIT_FAILED
    return result[0] if result else EXIT_OK

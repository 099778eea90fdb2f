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

Each C{-R [BIND:]PORT:HOST:HOSTPORT} (like C{ssh -R}, L{natbypass.app.remote_forward}) opens a control stream
to the peer's C{forward-listen:BIND:PORT}; a peer that allows it
(C{natbypass peer --allow-remote-listen [BIND:]PORT}, L{serve_remote_listen})
listens there while that stream is open, and opens a stream back to our
C{forward-back:HOST:HOSTPORT} for every connection it accepts, which we
connect to HOST:HOSTPORT (L{serve_back}: only our own -R targets, only from
the peer and key listening for us).

Exit status 0 after Ctrl-C, 1 when the peer could not be set up (mediator,
listening port, a refused -R), 2 on bad usage.  C{--json} prints one JSON
object a line: C{listening} (C{"remote": true} for -R), C{opened}, C{closed}
(bytes each way, duration), C{error}.
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
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

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
from natbypass.app.relay import OneProtocol, Relay, join
from natbypass.app.run import react_command
from natbypass.streams import StreamRefused
from natbypass.trust import TrustFileError

log = Logger()

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: Where forward services start: C{forward:HOST:PORT} or C{forward:NAME}.
SERVICE_PREFIX = "forward:"

#: The address -L listens on when it names none (like ssh: this machine only).
DEFAULT_BIND = "127.0.0.1"

#: The control service of -R: C{forward-listen:BIND:PORT} asks a peer to listen there.
LISTEN_PREFIX = "forward-listen:"

#: Where -R's streams come back: C{forward-back:HOST:PORT}, served by the requester for its own -R targets only.
BACK_PREFIX = "forward-back:"


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


def split_fields(text: str) -> list[str]:
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


def parse_port(text: str, what: str, allow_zero: bool = False) -> int:
    """A port number of the grammar (0 only where a system-chosen port makes sense)."""
    if not text.isascii() or not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        low = 0 if allow_zero else 1
        raise ValueError(f"{what} must be a number {low}-65535, not {text!r}")
    return int(text)


def parse_host(text: str, what: str) -> str:
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


def parse_forward(text: str, option: str = "-L") -> ForwardSpec:
    """
    C{-L}'s value: C{[BIND:]PORT:HOST:HOSTPORT} or C{[BIND:]PORT:NAME}
    (IPv6 addresses in brackets).  BIND defaults to L{DEFAULT_BIND}; PORT 0
    lets the system choose.  Raises ValueError with a message a person can act on
    (naming C{option}).
    """
    parts = split_fields(text.strip())
    # The target ends with a port (HOST:HOSTPORT) or is a name; what precedes it is [BIND:]PORT.
    if len(parts) >= 3 and parts[-1].isdigit():
        target = Target(parse_host(parts[-2], "the target host"), parse_port(parts[-1], "the target port"))
        head = parts[:-2]
    elif len(parts) >= 2:
        target = Target(None, None, _name(parts[-1]))
        head = parts[:-1]
    else:
        head, target = [], None
    if target is None or len(head) not in (1, 2):
        raise ValueError(f"{option} {text!r}: expected [BIND:]PORT:HOST:HOSTPORT or [BIND:]PORT:NAME")
    bind = DEFAULT_BIND if len(head) == 1 else _bind(head[0])
    what = "the local port" if option == "-L" else "the port to listen on"
    return ForwardSpec(bind, parse_port(head[-1], what, allow_zero=True), target)


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
    parts = split_fields(rest)
    if len(parts) != 2:
        raise ValueError(f"--expose {text!r}: expected [NAME=]HOST:PORT (IPv6 addresses in brackets)")
    return Exposure(
        _name(name) if sep else None, parse_host(parts[0], "the exposed host"), parse_port(parts[1], "the port")
    )


def parse_remote(text: str) -> ForwardSpec:
    """
    C{-R}'s value: C{[BIND:]PORT:HOST:HOSTPORT}.  The peer listens on
    BIND:PORT (BIND defaults to L{DEFAULT_BIND}, on the peer; PORT 0 lets the
    peer's system choose) and we connect what it accepts to HOST:HOSTPORT on
    our side, which is named by address (names are the serving side's).
    """
    spec = parse_forward(text, "-R")
    if spec.target.name is not None:
        raise ValueError(f"-R {text!r}: expected [BIND:]PORT:HOST:HOSTPORT (the target on this side, by address)")
    return spec


def listen_service(bind: str, port: int) -> str:
    """The control service that asks a peer to listen on C{bind:port}: C{forward-listen:BIND:PORT}."""
    return LISTEN_PREFIX + format_address((bind, port))


def back_service(target: Target) -> str:
    """The service a -R requester serves for its target, which the listening peer opens streams to."""
    return BACK_PREFIX + format_address((target.host or "", target.port or 0))


@dataclass(frozen=True)
class ListenAllowance:
    """One C{--allow-remote-listen [BIND:]PORT} (or C{[BIND:]LOW-HIGH}): where peers may make us listen."""

    bind: str
    low: int
    high: int

    @property
    def services(self) -> tuple[str, ...]:
        """The control services it takes: one per port (a peer names exactly where it wants us to listen)."""
        return tuple(listen_service(self.bind, port) for port in range(self.low, self.high + 1))


#: The most ports one --allow-remote-listen range may allow (each is a served control service).
MAX_ALLOWED_PORTS = 1024


def parse_allow_listen(text: str) -> ListenAllowance:
    """
    C{--allow-remote-listen}'s value: C{[BIND:]PORT} or C{[BIND:]LOW-HIGH}
    (BIND defaults to L{DEFAULT_BIND}; a lone port 0 lets requesters have the
    system choose a port).  Raises ValueError with a message a person can act on.
    """
    parts = split_fields(text.strip())
    if len(parts) not in (1, 2) or not parts[-1]:
        raise ValueError(f"--allow-remote-listen {text!r}: expected [BIND:]PORT or [BIND:]LOW-HIGH")
    bind = DEFAULT_BIND if len(parts) == 1 else _bind(parts[0])
    low_text, dash, high_text = parts[-1].partition("-")
    low = parse_port(low_text, "the port", allow_zero=not dash)
    high = parse_port(high_text, "the range's last port") if dash else low
    if high < low:
        raise ValueError(f"--allow-remote-listen {text!r}: the range {low}-{high} is empty (LOW-HIGH, LOW <= HIGH)")
    if high - low + 1 > MAX_ALLOWED_PORTS:
        raise ValueError(f"--allow-remote-listen {text!r}: at most {MAX_ALLOWED_PORTS} ports a range")
    return ListenAllowance(bind, low, high)


# ----------------------------------------------------------------- serving: --expose


class TargetFactory(Factory):
    """
    Serves the streams to one target: each becomes a TCP connection to it,
    relayed both ways (L{_Reaching}).  The stream's data waits (paused: its
    sender stalls on credit) until the target accepts; a target that refuses
    resets the stream.  C{gate}, when given, says which streams may be served
    (the others are refused); C{events}, when given, hears of each one.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        exposure: Exposure,
        events: Events | None = None,
        gate: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.exposure = exposure
        self.events = events
        self.gate = gate

    def buildProtocol(self, addr: Any) -> Protocol:
        if self.gate is not None:
            refusal = self.gate(addr)
            if refusal is not None:
                raise StreamRefused(refusal)
        return _Reaching(self, addr).stream


class _Reaching:
    """One stream served by a L{TargetFactory}: it and its TCP connection to the target, and what is said of them."""

    def __init__(self, factory: TargetFactory, addr: Any) -> None:
        self.factory, self.addr = factory, addr
        self.target_text = str(Target(factory.exposure.host, factory.exposure.port))
        self.stream = Relay(self._lost)
        self.target = Relay(self._lost)
        self.connecting: Deferred[Any] | None = None
        self.opened = False
        self.number = 0
        self.started = factory.reactor.seconds()
        self.stream.whenMade().addCallback(self._connect)

    def _connect(self, _: Any) -> None:
        f = self.factory
        endpoint = HostnameEndpoint(f.reactor, f.exposure.host, f.exposure.port)
        self.connecting = endpoint.connect(OneProtocol(self.target))
        self.connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, _: Any) -> None:
        self.connecting = None
        if self.stream.lost is not None:
            self.target.transport.loseConnection()
            return
        self.opened = True
        f, addr = self.factory, self.addr
        f.log.info(
            "forwarding {peer} to {target} (stream {stream_id})",
            peer=addr.peer_id,
            target=self.target_text,
            stream_id=addr.stream_id,
        )
        if f.events is not None:
            self.number = f.events.number()
            f.events.emit(
                {
                    "event": "opened",
                    "connection": self.number,
                    "remote": True,
                    "from": addr.peer_id,
                    "service": addr.service,
                    "target": self.target_text,
                    "path": addr.path,
                    "stream_id": addr.stream_id,
                },
                f"#{self.number} {addr.peer_id} -> {self.target_text} (stream {addr.stream_id} over {addr.path})",
            )
        join(self.stream, self.target)

    def _failed(self, reason: Failure) -> None:
        self.connecting = None
        if reason.check(CancelledError):
            return
        f = self.factory
        why = f"forward from {self.addr.peer_id} to {self.target_text} failed: {reason.getErrorMessage()}"
        f.log.warn("{why}", why=why)
        if f.events is not None:
            number = f.events.number()
            f.events.emit(
                {"event": "error", "connection": number, "service": self.addr.service, "reason": why},
                f"#{number} error: {why}",
            )
        self.stream.transport.abortConnection()

    def _lost(self, side: Relay, reason: Failure) -> None:
        if side is self.stream and self.connecting is not None:
            self.connecting.cancel()
        events = self.factory.events
        if not self.opened or events is None or self.stream.lost is None or self.target.lost is None:
            return
        self.opened = False  # said once
        _closed(events, self.number, self.addr.service, self.target, self.stream, self.factory.reactor, self.started)


def _closed(events: Events, number: int, service: str, ours: Relay, theirs: Relay, clock: Any, started: float) -> None:
    """Say that a forwarded connection ended: bytes each way (C{ours}: read on our side, sent), duration, why."""
    ends = [r for r in (ours.lost, theirs.lost) if r is not None and not r.check(ConnectionDone)]
    duration = round((clock.seconds() - started) * 1000)
    event: dict[str, Any] = {
        "event": "closed",
        "connection": number,
        "service": service,
        "bytes_sent": ours.bytes,
        "bytes_received": theirs.bytes,
        "duration_ms": duration,
    }
    if ends:
        event["reason"] = ends[0].getErrorMessage()
    events.emit(
        event,
        f"#{number} closed: {ours.bytes} bytes sent, {theirs.bytes} received in {duration} ms"
        + (f" ({event['reason']})" if ends else ""),
    )


def serve_exposed(peer: Any, exposures: list[Exposure], reactor: Any) -> list[Any]:
    """
    Serve the C{forward:} services of C{exposures} on C{peer} (a
    L{natbypass.peer.Peer}); returns their ports.  A stream to any other
    C{forward:} service is refused by the peer (no such service).
    """
    ports, served = [], set()
    for exposure in exposures:
        factory = TargetFactory(reactor, exposure)
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
        self.opening = f.peer.openStream(f.peer_id, f.service, OneProtocol(self.stream), f.protocol, f.fingerprint)
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
                "service": self.forwarder.service,
                "path": address.path,
                "stream_id": address.stream_id,
            },
            f"#{self.number} {self.source} -> {self.forwarder.peer_id} {self.forwarder.label} "
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
            why = f"{f.peer_id} refused {f.label}: {reason.value.reason} {f.hint}"  # type: ignore[union-attr]
        self.error(why)
        if self.local.lost is None:
            self.local.transport.loseConnection()

    def error(self, why: str) -> None:
        self._reported = True
        self.forwarder.errors += 1
        self.forwarder.events.emit(
            {"event": "error", "connection": self.number, "service": self.forwarder.service, "reason": why},
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
        f = self.forwarder
        _closed(f.events, self.number, f.service, self.local, self.stream, f.clock, self.started)
        self.forwarder.done(self)


class Forwarder(Factory):
    """
    The listening side of one C{-L}: each accepted TCP connection becomes a
    L{Forwarded} stream to the peer's C{service} (by default the target's).
    """

    #: What a refusal's message adds: how the peer would allow it.
    hint = "(a peer forwards only to what it exposes: twistd natbypass-peer --expose [NAME=]HOST:PORT)"

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
        self.service = spec.target.service
        self.label = str(spec.target)
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


class RemoteForwardFailed(Exception):
    """A -R could not be set up (refused, unreachable, cannot listen); the error event said why."""


# ----------------------------------------------------------------- the command

#: natbypass forward's own options, besides the shared ones (-L is added by build_parser: it repeats).
FORWARD_OPTIONS: tuple[OptionSpec, ...] = (OptionSpec("json", "print JSON events, one a line", flag=True),)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of C{natbypass forward}."""
    p = argparse.ArgumentParser(
        prog="natbypass forward",
        description="Forward local TCP ports to targets a peer exposes (-L, like ssh -L), and ports a peer allows "
        "to targets on this side (-R, like ssh -R), over one secure connection.",
        epilog="Exit status: 0 after Ctrl-C; 1 when the peer could not be set up (mediator, a local port, a -R "
        "the peer refused or could not listen on); 2 on bad usage.",
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
        type=_argument(parse_remote),
        metavar="[BIND:]PORT:HOST:HOSTPORT",
        help="ask the peer to listen on BIND:PORT on its side (default bind 127.0.0.1; PORT 0: the peer chooses) "
        "and forward each connection back to HOST:HOSTPORT on this side, while this command runs; the peer must "
        "allow it (natbypass peer --allow-remote-listen [BIND:]PORT); repeatable",
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
        if not options["local"] and not options["remote"]:
            raise ValueError("give at least one -L [BIND:]PORT:HOST:HOSTPORT or -R [BIND:]PORT:HOST:HOSTPORT")
        check_peer_options(options)
        check_target_options(options)
    except (ValueError, TrustFileError) as e:
        print(f"natbypass forward: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return options


async def start(reactor: Any, options: dict[str, Any], events: Events, peer: Any, ports: list[Any]) -> None:
    """
    Listen on every C{-L} (the peer is connected to on the first forwarded
    connection, and again after a lost path), then ask the peer to listen for
    every C{-R}; what listens is added to C{ports} as it starts.

    @raise RemoteForwardFailed: when a C{-R} was refused (the error event said why).
    """
    from natbypass.app.connect import registered
    from natbypass.app.remote_forward import RemoteForward, serve_back

    await registered(peer, options["mediator"], reactor)
    remotes = [
        RemoteForward(peer, options["peer"], spec, events, reactor, options["protocol"], options["peer-fingerprint"])
        for spec in options["remote"]
    ]
    ports.extend(serve_back(peer, remotes, reactor, events))
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
    for remote in remotes:
        ports.append(remote)
        await remote.start()


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
        await start(reactor, options, events, peer, stopping)
    except RemoteForwardFailed:
        return EXIT_FAILED  # the error event said why
    except (*CONNECT_FAILURES, CannotListenError) as e:
        events.emit({"event": "failed", "reason": str(e)}, f"natbypass forward: {e}")
        return EXIT_FAILED
    await Deferred()  # until Ctrl-C stops the reactor
    return EXIT_OK  # pragma: no cover


def run(argv: list[str]) -> int:
    """Entry point of C{natbypass forward} for L{natbypass.app.cli}: runs until stopped (then status 0)."""
    return react_command(argv, parse_options, lambda reactor, options: _main(reactor, options, sys.stdout), EXIT_OK)

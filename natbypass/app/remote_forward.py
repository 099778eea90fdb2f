"""
C{natbypass forward -R} (like C{ssh -R}): the peer listens for us and streams
each connection back.

Each C{-R [BIND:]PORT:HOST:HOSTPORT} opens a control stream to the peer's
C{forward-listen:BIND:PORT}; a peer that allows it (C{natbypass peer
--allow-remote-listen [BIND:]PORT}, L{serve_remote_listen}) listens there
while that stream is open, and opens a stream back to our
C{forward-back:HOST:HOSTPORT} for every connection it accepts, which we
connect to HOST:HOSTPORT (L{serve_back}: only our own -R targets, only from
the peer and key listening for us).  The control stream carries one request
line and one status line (L{encode_request}, L{parse_status}).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from natbypass.address import format_address
from natbypass.app.forward import (
    Events,
    Exposure,
    Forwarder,
    ForwardSpec,
    ListenAllowance,
    RemoteForwardFailed,
    Target,
    TargetFactory,
    back_service,
    listen_endpoint,
    listen_service,
    parse_host,
    parse_port,
    split_fields,
)
from natbypass.app.relay import OneProtocol
from natbypass.logsafe import escape
from natbypass.streams import StreamRefused

log = Logger()

# ----------------------------------------------------------------- the -R control stream's lines
#
# The requester opens a stream to C{forward-listen:BIND:PORT} and sends one
# line naming its target (C{HOST:PORT}: the listening peer opens every
# accepted connection's stream to C{forward-back:HOST:PORT}); the peer answers
# one line, C{listening HOST:PORT} or C{error REASON}, and listens while the
# stream stays open.

#: The longest control line either side accepts (a target is at most 253 + 8 bytes).
MAX_CONTROL_LINE = 512


def encode_request(target: Target) -> bytes:
    """The requester's line (without the newline): the target the streams are for."""
    assert target.host is not None and target.port is not None
    return format_address((target.host, target.port)).encode("ascii")


def parse_request(line: bytes) -> Target:
    """The target a requester named.  Raises ValueError when it is no C{HOST:PORT}."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("the forward request is not ASCII") from None
    parts = split_fields(text)
    if len(parts) != 2:
        raise ValueError(f"the forward request {text!r} is no HOST:PORT")
    return Target(parse_host(parts[0], "the target host"), parse_port(parts[1], "the target port"))


@dataclass(frozen=True)
class ListenStatus:
    """The listening peer's answer: where it listens (C{address}), or why it cannot (C{error})."""

    address: str | None = None
    error: str | None = None

    def encode(self) -> bytes:
        """The answer line (without the newline); an error is cut to one line of at most 400 characters."""
        if self.error is not None:
            return b"error " + " ".join(self.error.split())[:400].encode("utf-8", "replace")
        assert self.address is not None
        return b"listening " + self.address.encode("ascii")


def parse_status(line: bytes) -> ListenStatus:
    """The peer's answer line.  Raises ValueError when it is neither C{listening ADDRESS} nor C{error REASON}."""
    word, _, rest = line.partition(b" ")
    if word == b"error":
        return ListenStatus(error=escape(rest.decode("utf-8", "replace")) or "no reason given")
    if word == b"listening":
        text = rest.decode("ascii", "replace")
        parts = split_fields(text)
        if len(parts) == 2:
            return ListenStatus(
                address=format_address((parse_host(parts[0], "the address"), parse_port(parts[1], "the port")))
            )
    raise ValueError(f"not a forward-listen answer: {escape(line.decode('utf-8', 'replace'), 80)!r}")


# ----------------------------------------------------------------- -R, serving: --allow-remote-listen


class LogEvents:
    """L{Events} for the serving side (a twistd service): each goes to the log."""

    log = Logger()

    def __init__(self) -> None:
        self.connections = 0

    def number(self) -> int:
        self.connections += 1
        return self.connections

    def emit(self, event: dict[str, Any], text: str) -> None:
        self.log.info("remote forward: {text}", text=text, forward_event=event)


class _BackForwarder(Forwarder):
    """The peer's listener for one -R: each accepted connection becomes a stream back to the requester."""

    hint = "(the requester serves only the targets of its own -R)"

    def __init__(self, peer: Any, requester: Any, bind: str, port: int, target: Target, clock: Any) -> None:
        # Pinned to the key that asked: a stream back never reaches anyone else under that id.
        super().__init__(
            peer, requester.peer_id, ForwardSpec(bind, port, target), LogEvents(), clock, None, requester.fingerprint
        )
        self.service = back_service(target)
        self.label = f"{target} (its -R)"


class _ListenControl(LineReceiver):
    """
    The serving peer's end of one -R control stream: listens where the
    requester asked (an allowed BIND:PORT) once it named its target, answers
    one line, and stops listening when the stream ends, whoever ends it.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE
    log = Logger()

    def __init__(self, peer: Any, reactor: Any, bind: str, port: int, requester: Any) -> None:
        self.peer, self.reactor, self.requester = peer, reactor, requester
        self.bind, self.port_number = bind, port
        self.requested = False
        self.gone = False
        self.port: Any = None

    def lineReceived(self, line: bytes) -> None:
        if self.requested:
            return  # one request a stream; the requester has nothing more to say
        self.requested = True
        where = format_address((self.bind, self.port_number))
        try:
            target = parse_request(line.rstrip(b"\r"))
        except ValueError as e:
            self._refuse(str(e))
            return
        factory = self.forwarder = _BackForwarder(
            self.peer, self.requester, self.bind, self.port_number, target, self.reactor
        )
        listening = listen_endpoint(self.reactor, ForwardSpec(self.bind, self.port_number, target)).listen(factory)
        listening.addCallbacks(
            self._listening, lambda f: self._refuse(f"cannot listen on {where}: {f.getErrorMessage()}")
        )

    def _listening(self, port: Any) -> None:
        if self.gone:
            port.stopListening()
            return
        self.port = port
        host = port.getHost()
        address = format_address((host.host, host.port))
        self.log.info(
            "listening on {address} for {peer} (key {fingerprint}), forwarding back to its {service}",
            address=address,
            peer=self.requester.peer_id,
            fingerprint=str(self.requester.fingerprint),
            service=self.forwarder.service,
        )
        self.sendLine(ListenStatus(address=address).encode())

    def _refuse(self, why: str) -> None:
        self.log.warn("remote forward for {peer} refused: {why}", peer=self.requester.peer_id, why=why)
        if not self.gone:
            self.sendLine(ListenStatus(error=why).encode())
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        self.gone = True
        if self.port is not None:
            port, self.port = self.port, None
            self.log.info(
                "stopped listening on {address} for {peer}: its control stream ended",
                address=format_address((port.getHost().host, port.getHost().port)),
                peer=self.requester.peer_id,
            )
            port.stopListening()


class _ListenFactory(Factory):
    """The control services of every --allow-remote-listen: each stream is a L{_ListenControl} for its BIND:PORT."""

    def __init__(self, peer: Any, reactor: Any, where: dict[str, tuple[str, int]]) -> None:
        self.peer, self.reactor, self.where = peer, reactor, where

    def buildProtocol(self, addr: Any) -> Protocol:
        bind, port = self.where[addr.service]
        return _ListenControl(self.peer, self.reactor, bind, port, addr)


def serve_remote_listen(peer: Any, allowances: list[ListenAllowance], reactor: Any) -> list[Any]:
    """
    Serve the C{forward-listen:} control services of C{allowances} on C{peer}
    (which decides who may open streams at all: its allow list); returns
    their ports.  A request for any other address is refused by the peer (no
    such service), so nothing listens that was not allowed.
    """
    where: dict[str, tuple[str, int]] = {}
    for allowance in allowances:
        for port in range(allowance.low, allowance.high + 1):
            where[listen_service(allowance.bind, port)] = (allowance.bind, port)
    factory = _ListenFactory(peer, reactor, where)
    return [peer.serve(service, factory) for service in where]


# ----------------------------------------------------------------- -R, requesting

#: Seconds before a lost remote listener is asked for again, doubling up to the second figure.
RETRY_FIRST, RETRY_MOST = 1.0, 60.0


class _RemoteControl(LineReceiver):
    """Our end of a -R's control stream: names the target, reads the answer, and keeps the listener open."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE

    def __init__(self, remote: RemoteForward) -> None:
        self.remote = remote
        self.answered = False

    def connectionMade(self) -> None:
        self.sendLine(encode_request(self.remote.spec.target))

    def lineReceived(self, line: bytes) -> None:
        if self.answered:
            return
        self.answered = True
        try:
            status = parse_status(line.rstrip(b"\r"))
        except ValueError as e:
            status = ListenStatus(error=str(e))
        if status.error is not None:
            self.transport.loseConnection()
        self.remote.answered(self, status)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        self.remote.lost(self, reason)


class RemoteForward:
    """
    One C{-R} at the requester: a control stream asking the peer to listen,
    kept open while we run (the peer listens exactly as long), asked for again
    after a loss (1 s, doubling to a minute).  L{refusal} is the gate of our
    C{forward-back:} service: only the peer and key now listening for us may
    open streams to it.
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
        self.service = listen_service(spec.bind, spec.port)
        self.where = format_address((spec.bind, spec.port))
        #: Where the peer listens for us, and the key it proved, while it does.
        self.address: str | None = None
        self.key: Any = None
        self.control: _RemoteControl | None = None
        self.stopped = False
        self._opening: Deferred[Any] | None = None
        self._pending: _RemoteControl | None = None
        self._first: Deferred[str] | None = None
        self._retry: Any = None
        self._delay = RETRY_FIRST

    def start(self) -> Deferred[str]:
        """Ask the peer to listen: fires with where it does, or fails with L{RemoteForwardFailed}."""
        first = self._first = Deferred()
        self._request()
        return first

    def _request(self) -> None:
        self._retry = None
        self._pending = _RemoteControl(self)
        self._opening = self.peer.openStream(
            self.peer_id, self.service, OneProtocol(self._pending), self.protocol, self.fingerprint
        )
        self._opening.addCallbacks(self._opened, self._failed)

    def _opened(self, _: Any) -> None:
        self._opening = None

    def _failed(self, reason: Failure) -> None:
        self._opening = None
        if reason.check(CancelledError):
            return
        why = reason.getErrorMessage()
        if reason.check(StreamRefused):
            why = (
                f"{self.peer_id} refused to listen on {self.where}: {reason.value.reason} "  # type: ignore[union-attr]
                f"(a peer listens only where it allows it, for peers it allows: natbypass peer "
                f"--allow-remote-listen [BIND:]PORT with --allow FILE)"
            )
        self._error(why)

    def _error(self, why: str) -> None:
        self.events.emit(
            {"event": "error", "remote": self.where, "service": self.service, "reason": why},
            f"-R {self.where}: error: {why}",
        )
        if self._first is not None:
            first, self._first = self._first, None
            first.errback(RemoteForwardFailed(why))
        elif not self.stopped:
            self._retry = self.clock.callLater(self._delay, self._request)
            self._delay = min(self._delay * 2, RETRY_MOST)

    def answered(self, control: _RemoteControl, status: ListenStatus) -> None:
        """The peer's answer on C{control}: it listens at C{status.address}, or it cannot."""
        self._pending = None
        if self.stopped:
            control.transport.loseConnection()
            return
        if status.error is not None:
            self._error(f"{self.peer_id} cannot listen on {self.where}: {status.error}")
            return
        self.control, self.address, self._delay = control, status.address, RETRY_FIRST
        self.key = control.transport.getPeer().fingerprint
        target = self.spec.target
        self.events.emit(
            {
                "event": "listening",
                "remote": True,
                "address": status.address,
                "peer": self.peer_id,
                "target": str(target),
                "service": back_service(target),
            },
            f"{self.peer_id} listening on {status.address} -> {target}",
        )
        if self._first is not None:
            first, self._first = self._first, None
            first.callback(status.address)

    def lost(self, control: _RemoteControl, reason: Failure) -> None:
        """C{control} ended: the peer no longer listens for it."""
        if control is not self.control:
            if not control.answered and not self.stopped:
                self._error(f"{self.peer_id} ended the -R control stream before answering: {reason.getErrorMessage()}")
            return
        self.control, self.address, self.key = None, None, None
        if not self.stopped:
            self._error(f"{self.peer_id} stopped listening on {self.where}: {reason.getErrorMessage()}; asking again")

    def refusal(self, addr: Any) -> str | None:
        """Why a stream to our C{forward-back:} service may not be served, or None when it may."""
        if self.control is not None and addr.peer_id == self.peer_id and addr.fingerprint == self.key:
            return None
        return f"{addr.service} takes streams only from the peer listening for this forward's -R"

    def stopListening(self) -> Deferred[None]:
        """Stop: the peer stops listening as the control stream closes."""
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._opening is not None:
            self._opening.cancel()
        for control in (self.control, self._pending):
            if control is not None and control.transport is not None:
                control.transport.loseConnection()
        return defer.succeed(None)


def serve_back(peer: Any, remotes: list[RemoteForward], reactor: Any, events: Events) -> list[Any]:
    """
    Serve the C{forward-back:} service of each -R target (once per target):
    a stream to it is connected to that target, only when one of C{remotes}
    for it has the stream's peer and key listening for us.
    """
    ports = []
    for target in dict.fromkeys(r.spec.target for r in remotes):
        mine = [r for r in remotes if r.spec.target == target]

        def gate(addr: Any, mine: list[RemoteForward] = mine) -> str | None:
            refusals = [r.refusal(addr) for r in mine]
            return None if None in refusals else refusals[0]

        factory = TargetFactory(reactor, Exposure(None, target.host or "", target.port or 0), events, gate)
        ports.append(peer.serve(back_service(target), factory))
    return ports

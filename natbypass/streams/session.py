"""
The stream layer of one secure connection, the same over both paths.

A L{StreamSession} sits between a I{carrier} (QUIC streams on the UDP path,
the multiplexer inside TLS on the TCP path: see L{Carrier}) and the
application's protocols.  It owns what both paths share:

  - opening: the opener sends an open request naming the service; the
    acceptor's L{natbypass.interfaces.IStreamHandler} picks the protocol or
    refuses, and answers before any application data flows;
  - flow control by credit: each side may have at most the window the
    receiver granted in flight on a stream; the receiver grants more as its
    application consumes (not while it is paused), so memory per stream is
    bounded by its window, a paused stream stalls only itself, and a peer
    that sends past its credit gets the stream reset;
  - windows start at L{INITIAL_WINDOW} and double, up to L{MAX_WINDOW}, when
    a half-window is consumed within L{AUTOTUNE_INTERVAL} (a fast path needs
    more in flight), within a per-connection budget L{MAX_SESSION_WINDOW};
  - bounds on the streams a peer may hold open (L{MAX_STREAMS}).

Stream ids follow QUIC's numbering on both paths: the streams role C{r}
opens are C{8 + r + 4k} (0/1 carry QUIC's authentication, 4/5 the control
streams).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from natbypass.identity import Fingerprint
from natbypass.logsafe import escape
from natbypass.streams import frames
from natbypass.streams.address import PeerAddress
from natbypass.streams.errors import StreamError, StreamRefused, StreamReset, plain

#: Credit each direction of a new stream starts with.
INITIAL_WINDOW = 256 * 1024
#: The most a stream's window grows to.
MAX_WINDOW = 16 * 1024 * 1024
#: A half-window consumed faster than this doubles the window.
AUTOTUNE_INTERVAL = 0.1
#: The sum of the windows of one connection's streams stays under this (beyond it windows stop growing).
MAX_SESSION_WINDOW = 64 * 1024 * 1024
#: Streams the peer may have open on one connection at once (and we on it).
MAX_STREAMS = 256
#: Bytes handed to the carrier in one piece (round-robin between streams).
CHUNK = 32 * 1024
#: A writer's producer is paused above this many unsent bytes and resumed below L{LOW_WATER}.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: Streams whose application protocol or handler id starts here (below: authentication and control).
FIRST_STREAM = 8


class Carrier(Protocol):
    """What a path offers the stream layer (implemented in L{natbypass.streams.mux} and L{natbypass.streams.quic})."""

    path: str

    def openStream(self) -> int: ...

    def writeStream(self, stream_id: int, data: bytes, fin: bool) -> None: ...

    def resetStream(self, stream_id: int, code: int) -> None: ...

    def writeControl(self, frame: bytes) -> None: ...

    def writable(self, stream_id: int) -> bool: ...

    def canOpen(self) -> bool: ...


class Ends(Protocol):
    """
    Who is at both ends of a connection, for the L{PeerAddress}es of its
    streams (the connection itself provides it: read when asked, so an id
    set after the connection was made counts).
    """

    local_id: str
    local_fingerprint: Fingerprint | None
    local_address: object
    peer_id: str
    peer_fingerprint: Fingerprint | None
    remote_address: object


class StreamSession:
    """
    Streams of one connection.

    @param carrier: the path's carrier.
    @param role: 0 or 1, as the connection's (decides the stream ids we open).
    @param ends: the two ends, for addresses (usually the connection).
    @param connection: the C{IPeerConnection} the handler is told about.
    """

    log = Logger()

    def __init__(self, carrier: Carrier, role: int, clock: IReactorTime, ends: Ends, connection: object = None) -> None:
        self.carrier = carrier
        self.role = role
        self.clock = clock
        self.ends = ends
        self.connection = connection
        self._handler: Any = None
        #: False until the connection's owner said who serves streams (None included):
        #: streams the peer opens before then wait, instead of being refused.
        self.handler_known = False
        self._streams: dict[int, Any] = {}
        #: Opens waiting for the path to allow another stream (QUIC's stream limit).
        self._waiting: deque[_WaitingOpen] = deque()
        self._highest_peer_stream = -1
        self._lost: Failure | None = None
        self._going_away = False
        self.window_total = 0
        #: Counters: opened/accepted/refused/reset streams, resets for flow-control violations.
        self.stats = {"opened": 0, "accepted": 0, "refused": 0, "resets": 0, "flow_violations": 0}

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def handler(self) -> Any:
        """The L{natbypass.interfaces.IStreamHandler} deciding the streams the peer opens."""
        return self._handler

    @handler.setter
    def handler(self, handler: Any) -> None:
        self._handler = handler
        self.handler_known = True
        for transport in [t for t in self._streams.values() if t.state == "deciding"]:
            transport._process()

    # --- opening --------------------------------------------------------------------

    def open(self, service: str, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open a stream to the peer's C{service} (see C{IPeerConnection.openStream})."""
        request = frames.open_request(service)  # ValueError for a bad name, before anything is sent
        if self._lost is not None:
            return _failed(self._lost)
        if self._going_away:
            return _failed(Failure(StreamError("the connection is closing: no new streams")))
        mine = sum(1 for s in self._streams.values() if s.outgoing) + len(self._waiting)
        if mine >= MAX_STREAMS:
            return _failed(Failure(StreamError(f"{mine} streams are already open to this peer (the limit)")))
        if self._waiting or not self.carrier.canOpen():
            # The path allows no more streams at once (QUIC's limit, raised as streams end): wait in order.
            waiting = _WaitingOpen(self, service, factory)
            self._waiting.append(waiting)
            return waiting.deferred
        return self._open(service, factory, request)

    def _open(self, service: str, factory: IProtocolFactory, request: bytes) -> Deferred[IProtocol]:
        from natbypass.streams.transport import StreamTransport

        stream_id = self.carrier.openStream()
        transport = StreamTransport(self, stream_id, service, outgoing=True)
        self._streams[stream_id] = transport

        def cancel(d: Deferred[IProtocol]) -> None:
            transport._abort(Failure(CancelledError()))

        transport.opened = Deferred(cancel)
        transport.factory = factory
        self.stats["opened"] += 1
        transport.write(request)
        return transport.opened

    def address(self, stream_id: int, service: str, local: bool) -> PeerAddress:
        e = self.ends
        if local:
            return PeerAddress(e.local_id, e.local_fingerprint, service, self.carrier.path, e.local_address, stream_id)
        return PeerAddress(e.peer_id, e.peer_fingerprint, service, self.carrier.path, e.remote_address, stream_id)

    def _incoming(self, stream_id: int) -> Any:
        """A new stream the peer opened, or None when it may not."""
        from natbypass.streams.transport import StreamTransport

        if stream_id % 4 != 1 - self.role or stream_id < FIRST_STREAM or stream_id <= self._highest_peer_stream:
            return None  # not the peer's to open, or a stream already finished: late data
        self._highest_peer_stream = stream_id
        theirs = sum(1 for s in self._streams.values() if not s.outgoing)
        if theirs >= MAX_STREAMS or self._going_away:
            self.stats["refused"] += 1
            self.carrier.resetStream(stream_id, frames.REFUSED)
            return None
        transport = StreamTransport(self, stream_id, None, outgoing=False)
        self._streams[stream_id] = transport
        return transport

    def decide(self, transport: Any, service: str) -> IProtocol | None:
        """Ask the handler what serves C{service}; None after answering a refusal."""
        address = self.address(transport.stream_id, service, local=False)
        reason: str | None = None
        protocol = None
        if self.handler is None:
            reason = f"{self.ends.local_id} accepts no streams"
        else:
            try:
                protocol = self.handler.streamRequested(self.connection, address)
            except StreamRefused as e:
                reason = e.reason
            except Exception:
                self.log.failure("the stream handler failed on {service!r}", service=escape(service))
                reason = f"the service {service!r} failed"
            else:
                if protocol is None:
                    reason = f"no service {service!r} here"
        if reason is not None:
            self.stats["refused"] += 1
            self.log.info(
                "refused a stream from {peer} to {service!r}: {reason}",
                peer=self.ends.peer_id,
                service=escape(service),
                reason=reason,
            )
            transport.refuse(reason)
            return None
        self.stats["accepted"] += 1
        return protocol

    # --- what the carrier hands us --------------------------------------------------

    def streamData(self, stream_id: int, data: bytes, fin: bool) -> None:
        transport = self._streams.get(stream_id)
        if transport is None:
            transport = self._incoming(stream_id)
            if transport is None:
                return
        transport.received(data, fin)

    def streamReset(self, stream_id: int, code: int) -> None:
        transport = self._streams.get(stream_id)
        if transport is not None:
            self.stats["resets"] += 1
            transport.resetByPeer(code)

    def control(self, frame: frames.Frame) -> None:
        """A window update or GO_AWAY from the peer."""
        if frame.type == frames.WINDOW_UPDATE:
            transport = self._streams.get(frame.stream_id)
            if transport is not None:
                transport.credit(frame.length)
        elif frame.type == frames.GO_AWAY:
            self._going_away = True

    def writable(self) -> None:
        """The carrier has room again (or allows more streams): open and send what waits, round-robin."""
        while self._waiting and self._lost is None and self.carrier.canOpen():
            self._waiting.popleft().start()
        for transport in list(self._streams.values()):
            transport.flush()

    def lost(self, reason: Failure) -> None:
        """The connection is gone: every stream ends with C{reason}."""
        if self._lost is not None:
            return
        self._lost = reason
        waiting, self._waiting = self._waiting, deque()
        for each in waiting:
            each.deferred.errback(reason)
        why = plain(reason.value)
        for transport in list(self._streams.values()):
            transport.connectionGone(Failure(StreamError(f"the path to {self.ends.peer_id} was lost: {why}")))
        self._streams.clear()

    # --- bookkeeping for the transports ---------------------------------------------

    def forget(self, stream_id: int) -> None:
        transport = self._streams.pop(stream_id, None)
        if transport is not None:
            self.window_total -= transport.window

    def violation(self, transport: Any, why: str) -> None:
        self.stats["flow_violations"] += 1
        self.log.warn("peer {peer} broke stream flow control: {why}", peer=self.ends.peer_id, why=why)


class _WaitingOpen:
    """An open that waits for the path to allow another stream; cancelling it cancels whichever stage it is in."""

    def __init__(self, session: StreamSession, service: str, factory: IProtocolFactory) -> None:
        self.session = session
        self.service = service
        self.factory = factory
        self.started: Deferred[IProtocol] | None = None
        self.deferred: Deferred[IProtocol] = Deferred(self._cancel)

    def start(self) -> None:
        self.started = self.session._open(self.service, self.factory, frames.open_request(self.service))
        self.started.addBoth(self._done)

    def _done(self, result: Any) -> None:
        if not self.deferred.called:
            (self.deferred.errback if isinstance(result, Failure) else self.deferred.callback)(result)

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        if self.started is not None:
            self.started.cancel()
        elif self in self.session._waiting:
            self.session._waiting.remove(self)


def _failed(reason: Failure) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(reason)
    return d


def describe_reset(code: int, by_peer: bool) -> StreamReset:
    """The error a reset stream ends with."""
    who = "the peer" if by_peer else "we"
    return StreamReset(f"{who} reset the stream ({frames.code_name(code)})", code)

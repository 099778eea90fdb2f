"""
What every punched path shares, whatever carries it: the receiver the
application sets (with what arrived before it did), and the one-time loss
that reaches the receiver and every C{whenLost} Deferred.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from natbypass.interfaces import IPeerReceiver
from natbypass.punch.session import PunchSession


class PathConnection:
    """
    Base of C{UDPPeerConnection} and C{TCPPeerConnection}.  Subclasses set
    C{protocol} and keep what arrives before a receiver is set, handing it
    over in C{_take_pending}; they call C{_notify_lost} once the path is gone.
    """

    log = Logger()
    protocol: str

    def __init__(self, session: PunchSession) -> None:
        self.peer_id = session.peer_id
        self.session_id = session.session_id
        self.role = session.role
        #: The race that chose this path (C{natbypass.punch.race.Outcome}:
        #: every attempt, with its result and reason), set by whoever ran it.
        self.outcome: Any = None
        #: When the raw path was proven, on the attempt's clock (seconds), before the secure
        #: handshake on it finished: UDP, the path chosen (our probe ACKed or, role 1, the peer's
        #: QUIC Initial taken; else the first packet that proved the session key); TCP, the
        #: connected socket.  None if not known.
        self.punched_at: float | None = None
        self._receiver: IPeerReceiver | None = None
        self._lost: Failure | None = None
        self._waiters: list[Deferred] = []
        #: Streams (L{natbypass.streams.session.StreamSession}), once the path is secured.
        self.stream_session: Any = None
        self._stream_handler: Any = None
        self._stream_handler_set = False
        #: Our own id and key, for the C{getHost} of streams (set by the C{Peer}).
        self.local_id = ""
        self.local_fingerprint: Any = None

    # -- streams

    def _startStreams(self, carrier: Any, clock: Any) -> None:
        """The path is secured: streams run over C{carrier} from now on."""
        from natbypass.streams.session import StreamSession

        self.stream_session = StreamSession(carrier, self.role, clock, self, connection=self)
        if self._stream_handler_set:
            self.stream_session.handler = self._stream_handler
        carrier.session = self.stream_session

    def openStream(self, service: str, factory: Any) -> Deferred:
        if self.stream_session is None:
            return fail(RuntimeError("the path is not secured yet: no streams"))
        return self.stream_session.open(service, factory)

    def setStreamHandler(self, handler: Any) -> None:
        self._stream_handler = handler
        self._stream_handler_set = True
        if self.stream_session is not None:
            self.stream_session.handler = handler

    @property
    def streams(self) -> int:
        return 0 if self.stream_session is None else len(self.stream_session)

    def _take_pending(self) -> list[bytes]:
        """What arrived before the receiver was set, in order (and forget it)."""
        raise NotImplementedError

    def setReceiver(self, receiver: IPeerReceiver) -> None:
        self._receiver = receiver
        for data in self._take_pending():
            receiver.dataReceived(data)
        if self._lost is not None:
            receiver.connectionLost(self._lost)

    def whenLost(self) -> Deferred:
        if self._lost is not None:
            return succeed(self._lost.value)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def _notify_lost(self, reason: Failure) -> bool:
        """Record the loss and tell everyone; False when it was already lost."""
        if self._lost is not None:
            return False
        self._lost = reason
        if self.stream_session is not None:
            self.stream_session.lost(reason)
        self.log.info(
            "{protocol} path to {peer_id} lost: {reason}",
            protocol=self.protocol.upper(),
            peer_id=self.peer_id,
            reason=reason.getErrorMessage(),
        )
        if self._receiver is not None:
            self._receiver.connectionLost(reason)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(reason.value)
        return True

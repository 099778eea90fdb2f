"""
The TCP path's carrier: streams, credit, datagrams and keepalive as frames
(L{natbypass.streams.frames}) inside the TLS connection.

Why our own multiplexer rather than HTTP/2 (C{h2}) or a yamux library: the
stream layer already owns opening, credit and half-close the same way on both
paths (QUIC brings its own streams), so what the TCP path needs is only the
framing: about a hundred lines, with no second flow-control scheme to keep in
step (see C{docs/architecture.md}).

Writes go into TLS at once (one TLS write per frame); the TLS transport's
producer calls (its socket buffer is full / has drained) pause and resume
every stream.  A PING every C{keepalive_interval} seconds proves the peer is
alive: when nothing at all comes back within C{pong_timeout} seconds of a
PING (neither its PONG nor any other frame), and our own bytes are not
draining to the peer either, the path is dead and the connection ends with
that reason; nothing heard for C{dead_after} seconds ends it too.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from natbypass.streams import frames
from natbypass.streams.session import FIRST_STREAM, StreamSession

#: How long a keepalive PING may go unanswered before the path is declared dead.
PONG_TIMEOUT = 5.0
#: The longest interval between PINGs on a TCP path (its keepalive interval if
#: shorter): a dead path is noticed within this plus L{PONG_TIMEOUT} seconds.
MAX_PING_INTERVAL = 10.0


def socket_send_queue(transport: object) -> Callable[[], int | None]:
    """
    What C{send_queue} of L{MuxCarrier} wants for a TCP transport: the bytes
    its socket holds unsent or unacknowledged (Linux C{TIOCOUTQ}), or None
    where that cannot be read (another system, no socket).
    """

    def queued() -> int | None:
        try:
            fd = transport.getHandle().fileno()  # type: ignore[attr-defined]
            return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except (AttributeError, OSError, ValueError):
            return None

    return queued


@implementer(IPushProducer)
class MuxCarrier:
    """
    Frames over a byte stream (TLS).

    @param write: writes bytes into TLS.
    @param role: the connection's role (decides the stream ids we open).
    @param on_datagram: called with each DATAGRAM frame's payload.
    @param on_dead: called with a reason when the connection must end (the
        peer broke the framing, did not answer a PING within C{pong_timeout},
        or went silent past C{dead_after}).
    @param send_queue: how many bytes the socket holds unsent or unacknowledged
        (None: unknown), so a PING stuck behind our own data does not
        count as unanswered while that data drains.
    """

    log = Logger()
    path = "tcp"

    def __init__(
        self,
        write: Callable[[bytes], object],
        role: int,
        clock: IReactorTime,
        on_datagram: Callable[[bytes], None],
        on_dead: Callable[[str], None],
        keepalive_interval: float | None = 15.0,
        dead_after: float | None = 45.0,
        pong_timeout: float | None = PONG_TIMEOUT,
        send_queue: Callable[[], int | None] | None = None,
    ) -> None:
        self._write = write
        self._clock = clock
        self._on_datagram = on_datagram
        self._on_dead = on_dead
        self._decoder = frames.FrameDecoder()
        self._next = FIRST_STREAM + role
        self._paused = False
        self._ended = False
        self._interval = keepalive_interval
        self._dead_after = dead_after
        self._last_heard = clock.seconds()
        self._pings = 0
        self._ping_sent: dict[int, float] = {}
        self._timer: IDelayedCall | None = None
        self._pong_timeout = pong_timeout
        self._send_queue = send_queue
        self._deadline: IDelayedCall | None = None
        #: The last keepalive round trip, in seconds (None before the first).
        self.rtt: float | None = None
        self.session: StreamSession | None = None
        if keepalive_interval is not None:
            self._timer = clock.callLater(keepalive_interval, self._keepalive)

    # --- Carrier --------------------------------------------------------------------

    def openStream(self) -> int:
        stream_id, self._next = self._next, self._next + 4
        return stream_id

    def writeStream(self, stream_id: int, data: bytes, fin: bool) -> None:
        self._send(frames.data(stream_id, data, fin))

    def resetStream(self, stream_id: int, code: int) -> None:
        self._send(frames.reset(stream_id, code))

    def writeControl(self, frame: bytes) -> None:
        self._send(frame)

    def writable(self, stream_id: int) -> bool:
        return not self._paused and not self._ended

    def canOpen(self) -> bool:
        return not self._ended

    def sendDatagram(self, payload: bytes) -> None:
        self._send(frames.datagram(payload))

    def _send(self, data: bytes) -> None:
        if not self._ended:
            self._write(data)

    # --- IPushProducer: the TLS transport's buffer ----------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self.session is not None and not self._ended:
            self.session.writable()

    def stopProducing(self) -> None:
        self._paused = True

    # --- receiving ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Bytes out of TLS."""
        if self._ended:
            return
        self._last_heard = self._clock.seconds()
        try:
            decoded = self._decoder.feed(data)
        except frames.FrameError as e:
            self._die(f"the peer broke the stream framing: {e}")
            return
        for frame in decoded:
            if self._ended:
                return
            if frame.type == frames.DATAGRAM:
                self._on_datagram(frame.payload)
            elif frame.type == frames.PING:
                self._pinged(frame)
            elif self.session is None:
                continue  # no stream layer (yet): nothing to give stream frames to
            elif frame.type == frames.DATA:
                if frame.flags & frames.RST:
                    self.session.streamReset(frame.stream_id, frame.length)
                else:
                    self.session.streamData(frame.stream_id, frame.payload, bool(frame.flags & frames.FIN))
            else:
                self.session.control(frame)

    def _pinged(self, frame: frames.Frame) -> None:
        if frame.flags & frames.SYN:
            self._send(frames.ping(frame.length, answer=True))
        elif frame.flags & frames.ACK:
            sent = self._ping_sent.pop(frame.length, None)
            if sent is not None:
                self.rtt = self._clock.seconds() - sent

    # --- liveness -------------------------------------------------------------------

    def _keepalive(self) -> None:
        self._timer = None
        if self._ended:
            return
        now = self._clock.seconds()
        if self._dead_after is not None and now - self._last_heard > self._dead_after:
            self._die(f"nothing heard from the peer for {self._dead_after:g} s (keepalive): the path is dead")
            return
        self._pings += 1
        self._ping_sent = {self._pings: now}  # only the latest is timed
        self._send(frames.ping(self._pings))
        if self._pong_timeout is not None and self._deadline is None:
            self._deadline = self._clock.callLater(self._pong_timeout, self._pongDue, now, self._queued())
        assert self._interval is not None
        self._timer = self._clock.callLater(self._interval, self._keepalive)

    def _queued(self) -> int | None:
        return None if self._send_queue is None else self._send_queue()

    def _pongDue(self, sent_at: float, queued: int | None) -> None:
        """A PING's answer time is up: dead unless anything came since, or our bytes are still draining."""
        self._deadline = None
        if self._ended or self._last_heard >= sent_at:
            return
        now_queued = self._queued()
        if queued is not None and now_queued is not None and now_queued < queued:
            # The peer acknowledges our data (TCP): the PING waits behind it.
            assert self._pong_timeout is not None
            self._deadline = self._clock.callLater(self._pong_timeout, self._pongDue, sent_at, now_queued)
            return
        silent = self._clock.seconds() - self._last_heard
        self._die(
            f"no answer to a keepalive PING within {self._clock.seconds() - sent_at:.1f} s "
            f"(nothing heard from the peer for {silent:.1f} s): the path is dead"
        )

    def _die(self, why: str) -> None:
        if self._ended:
            return
        self.log.warn("TCP path: {why}", why=why)
        self.stop()
        self._on_dead(why)

    def stop(self) -> None:
        """The connection ended: no more writes or timers."""
        self._ended = True
        for timer in (self._timer, self._deadline):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._deadline = None

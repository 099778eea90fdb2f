"""
One stream, as the Twisted transport its protocol writes to.

The semantics are TCP's, as Twisted programs expect them:

  - C{write} queues; what fits in the peer's credit (and the carrier's room)
    leaves at once, the rest waits; a registered producer is paused above
    L{HIGH_WATER} unsent bytes and resumed below L{LOW_WATER};
  - C{pauseProducing} stops delivering (and so stops granting credit: the
    peer stalls on this stream only); C{resumeProducing} delivers what waited;
  - C{loseWriteConnection} sends FIN after what is queued; the peer's FIN
    reaches an C{IHalfCloseableProtocol} as C{readConnectionLost}, any other
    protocol loses the connection (as Twisted's TCP does);
  - C{loseConnection} sends what is queued and FIN, then C{connectionLost}
    with C{ConnectionDone}; what the peer still sends is discarded (its
    credit is given back so it is not stuck) until its FIN, or L{LINGER}
    seconds, then the stream is reset;
  - C{abortConnection} resets the stream at once (C{ConnectionAborted}); a
    reset from the peer ends it with L{StreamReset}; the connection's end ends
    it with C{ConnectionLost} naming the cause.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.streams import frames
from natbypass.streams.address import PeerAddress
from natbypass.streams.errors import StreamError, StreamRefused, StreamReset
from natbypass.streams.session import (
    AUTOTUNE_INTERVAL,
    CHUNK,
    HIGH_WATER,
    INITIAL_WINDOW,
    LOW_WATER,
    MAX_SESSION_WINDOW,
    MAX_WINDOW,
    StreamSession,
    describe_reset,
)

#: Seconds a closed stream waits for the peer's FIN before resetting it.
LINGER = 30.0
#: Largest credit a peer may grant in total (more is a protocol error).
MAX_CREDIT = 1 << 32

OPENING = "opening"  # ours, waiting for the peer's answer
DECIDING = "deciding"  # theirs, waiting for the whole open request
OPEN = "open"
REFUSED = "refused"  # theirs, refused: the answer and FIN are on their way
LINGERING = "lingering"  # closed by our application, waiting for the peer's FIN
CLOSED = "closed"


@implementer(ITransport, IConsumer, IPushProducer)
class StreamTransport:
    """
    A stream's transport (see the module docstring for its semantics).

    @ivar stream_id: its number on the connection.
    @ivar service: the service it was opened to.
    @ivar outgoing: True when we opened it.
    @ivar bytes_sent: application bytes written and handed to the path.
    @ivar bytes_received: application bytes delivered to the protocol.
    @ivar opened_at: when it was made, on the session's clock.
    """

    log = Logger()

    def __init__(self, session: StreamSession, stream_id: int, service: str | None, outgoing: bool) -> None:
        self.session = session
        self.stream_id = stream_id
        self.service = service
        self.outgoing = outgoing
        self.state = OPENING if outgoing else DECIDING
        self.protocol: IProtocol | None = None
        self.factory: IProtocolFactory | None = None
        self.opened: Deferred[IProtocol] | None = None
        self.connected = 1
        self.disconnecting = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened_at = session.clock.seconds()
        self.window = INITIAL_WINDOW
        session.window_total += INITIAL_WINDOW
        self._recv_credit = INITIAL_WINDOW
        self._send_credit = INITIAL_WINDOW
        self._consumed = 0
        self._last_grant = self.opened_at
        self._rx = bytearray()
        self._rx_fin = False
        self._eof_delivered = False
        self._paused = False
        #: What the application wrote and the path has not taken yet (views: taking a chunk copies only it).
        self._tx: deque[memoryview] = deque()
        self._tx_size = 0
        self._write_closing = False
        self._fin_sent = False
        self._close_wanted = False
        self._app_closed = False
        self._linger: IDelayedCall | None = None
        self._producer: Any = None
        self._streaming = True
        self._producer_paused = False
        self._pull: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<StreamTransport {self.stream_id} {self.service!r} {self.state} to {self.session.ends.peer_id!r}>"

    # --- ITransport -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.state in (CLOSED, LINGERING) or self._write_closing or not data:
            return
        self._tx.append(memoryview(bytes(data)))
        self._tx_size += len(data)
        if self.state == OPEN:
            self.bytes_sent += len(data)
        self.flush()
        self._checkHigh()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.state in (CLOSED, LINGERING) or self._close_wanted:
            return
        if self.state != OPEN:
            self._abort(Failure(ConnectionDone("closed before the stream was open")))
            return
        self.disconnecting = True
        self._close_wanted = True
        self._write_closing = True
        if self._fin_sent:  # half-closed earlier: nothing more to send, close now
            self._afterFin()
        else:
            self.flush()

    def loseWriteConnection(self) -> None:
        """Half-close: FIN after what is queued; we can still read."""
        if self.state != OPEN or self._write_closing:
            return
        self._write_closing = True
        self.flush()

    def abortConnection(self) -> None:
        """Reset the stream now: queued data is dropped."""
        self._abort(Failure(ConnectionAborted("the stream was aborted")))

    def getPeer(self) -> PeerAddress:
        return self.session.address(self.stream_id, self.service or "", local=False)

    def getHost(self) -> PeerAddress:
        return self.session.address(self.stream_id, self.service or "", local=True)

    # --- IConsumer ------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"{self!r} already has a producer, {self._producer!r}")
        if self.state in (CLOSED, LINGERING):
            producer.stopProducing()
            return
        self._producer = producer
        self._streaming = bool(streaming)
        self._producer_paused = False
        if not streaming:
            self._schedulePull()
        else:
            self._checkHigh()

    def unregisterProducer(self) -> None:
        self._producer = None
        if self._pull is not None and self._pull.active():
            self._pull.cancel()
        self._pull = None

    # --- IPushProducer (reading) ----------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._process()

    def stopProducing(self) -> None:
        self.loseConnection()

    # --- sending --------------------------------------------------------------------

    def flush(self) -> None:
        """Hand the carrier what credit and room allow (and FIN when the writing side is done)."""
        if self.state in (CLOSED,) or self._fin_sent:
            return
        carrier = self.session.carrier
        while self._tx_size and self._send_credit > 0 and carrier.writable(self.stream_id):
            chunk = self._take(min(self._send_credit, CHUNK))
            self._send_credit -= len(chunk)
            fin = self._write_closing and not self._tx_size
            carrier.writeStream(self.stream_id, chunk, fin)
            if fin:
                self._fin_sent = True
        if self._write_closing and not self._tx_size and not self._fin_sent:
            carrier.writeStream(self.stream_id, b"", True)
            self._fin_sent = True
        if self._fin_sent:
            self._afterFin()
            return
        self._checkLow()

    def _take(self, n: int) -> bytes:
        """Up to C{n} bytes from the front of the queue."""
        pieces = []
        while n and self._tx:
            head = self._tx[0]
            if len(head) <= n:
                pieces.append(head)
                self._tx.popleft()
                n -= len(head)
            else:
                pieces.append(head[:n])
                self._tx[0] = head[n:]
                n = 0
        chunk = b"".join(pieces)
        self._tx_size -= len(chunk)
        return chunk

    def _checkHigh(self) -> None:
        if self._producer is not None and self._streaming and not self._producer_paused:
            if self._tx_size > HIGH_WATER:
                self._producer_paused = True
                self._producer.pauseProducing()

    def _checkLow(self) -> None:
        if self._producer is None or self._tx_size >= LOW_WATER:
            return
        if self._streaming:
            if self._producer_paused:
                self._producer_paused = False
                self._producer.resumeProducing()
        else:
            self._schedulePull()

    def _schedulePull(self) -> None:
        if self._pull is None or not self._pull.active():
            self._pull = self.session.clock.callLater(0, self._pullMore)

    def _pullMore(self) -> None:
        self._pull = None
        if self._producer is not None and not self._streaming and self._tx_size < LOW_WATER:
            self._producer.resumeProducing()
            # More is pulled when the queue drains below the low water mark again (see _checkLow).
            if self._tx_size < LOW_WATER and self._producer is not None:
                self._schedulePull()

    def credit(self, delta: int) -> None:
        """The peer granted C{delta} more bytes."""
        self._send_credit += delta
        if self._send_credit > MAX_CREDIT:
            self._protocolError("the peer granted more credit than a stream can use")
            return
        self.flush()

    def _afterFin(self) -> None:
        if self.state == REFUSED:
            self._forget()
            return
        if IHalfCloseableProtocol.providedBy(self.protocol) and not self._close_wanted and not self._app_closed:
            self._notify("writeConnectionLost")
        if self._close_wanted:
            self._appClosed(Failure(ConnectionDone("the stream was closed")))
            if self._rx_fin:
                self._forget()
            else:
                self.state = LINGERING
                self._giveBack(len(self._rx))
                self._rx.clear()
                self._linger = self.session.clock.callLater(LINGER, self._lingerExpired)
        elif self._eof_delivered:
            self._finish()

    # --- receiving ------------------------------------------------------------------

    def received(self, data: bytes, fin: bool) -> None:
        """Bytes of this stream from the peer (C{fin}: its last)."""
        if self.state == CLOSED:
            return
        if len(data) > self._recv_credit:
            self.session.violation(self, f"{len(data)} bytes on stream {self.stream_id} past {self._recv_credit}")
            self._protocolError("the peer sent past its flow-control credit", frames.FLOW_CONTROL_ERROR)
            return
        self._recv_credit -= len(data)
        if self.state in (LINGERING, REFUSED):
            self._giveBack(len(data))
            if fin and self.state == LINGERING:
                self._forget()
            return
        self._rx += data
        self._rx_fin = self._rx_fin or fin
        self._process()

    def _process(self) -> None:
        if self.state == DECIDING:
            self._decide()
        elif self.state == OPENING:
            self._answered()
        if self.state == OPEN:
            self._deliver()

    def _decide(self) -> None:
        try:
            parsed = frames.parse_open(self._rx)
        except frames.OpenError as e:
            self._protocolError(f"bad open request: {e}")
            return
        if parsed is not None and len(self._rx) > parsed[1]:
            # The opener waits for our answer before it sends data: an unanswered stream holds 257 bytes at most.
            self._protocolError("the opener sent data before the stream was accepted")
            return
        if parsed is None:
            if self._rx_fin:
                self._end(Failure(StreamError("the peer closed the stream before naming a service")), reset=False)
            return
        if not self.session.handler_known:
            return  # the connection's owner has not set a handler yet: decide when it does
        service, used = parsed
        del self._rx[:used]
        self._consume(used)
        self.service = service
        protocol = self.session.decide(self, service)
        if protocol is None:
            return
        self.state = OPEN
        self.protocol = protocol
        self._tx.appendleft(memoryview(frames.answer()))
        self._tx_size += len(frames.answer())
        self.flush()
        protocol.makeConnection(self)

    def refuse(self, reason: str) -> None:
        """Answer the open request with a refusal and FIN (called by the session)."""
        self.state = REFUSED
        refusal = frames.answer(reason)
        self._tx.append(memoryview(refusal))
        self._tx_size += len(refusal)
        self._write_closing = True
        self._giveBack(len(self._rx))
        self._rx.clear()
        self.flush()

    def _answered(self) -> None:
        try:
            parsed = frames.parse_answer(self._rx)
        except frames.OpenError as e:
            self._protocolError(f"bad stream answer: {e}")
            return
        if parsed is None:
            if self._rx_fin:
                self._end(Failure(StreamError("the peer closed the stream without answering")), reset=False)
            return
        refusal, used = parsed
        del self._rx[:used]
        self._consume(used)
        if refusal is not None:
            self._end(Failure(StreamRefused(refusal)), reset=False, fin=True)
            return
        assert self.factory is not None and self.opened is not None
        protocol = self.factory.buildProtocol(self.getPeer())
        if protocol is None:
            self._abort(Failure(StreamError("the protocol factory refused the stream")))
            return
        self.state = OPEN
        self.protocol = protocol
        protocol.makeConnection(self)
        opened, self.opened = self.opened, None
        opened.callback(protocol)

    def _deliver(self) -> None:
        while self._rx and not self._paused and self.state == OPEN and not self._app_closed:
            data = bytes(self._rx)
            self._rx.clear()
            self.bytes_received += len(data)
            self._notify("dataReceived", data)
            self._consume(len(data))
        if (
            not self._rx
            and self._rx_fin
            and not self._paused
            and not self._eof_delivered
            and self.state == OPEN
            and not self._app_closed
        ):
            self._eof_delivered = True
            if IHalfCloseableProtocol.providedBy(self.protocol):
                self._notify("readConnectionLost")
                if self._fin_sent and self.state == OPEN:
                    self._finish()
            else:
                self.loseConnection()

    def _consume(self, n: int) -> None:
        """C{n} bytes left our buffer: grant them back once half a window is consumed."""
        self._consumed += n
        if self._consumed >= self.window // 2 and self.state not in (CLOSED,) and not self._rx_fin:
            self._grant()

    def _grant(self) -> None:
        session = self.session
        now = session.clock.seconds()
        delta = self._consumed
        fast = now - self._last_grant < AUTOTUNE_INTERVAL
        if fast and self.window < MAX_WINDOW and session.window_total + self.window <= MAX_SESSION_WINDOW:
            session.window_total += self.window
            delta += self.window
            self.window *= 2
        self._consumed = 0
        self._last_grant = now
        self._giveBack(delta)

    def _giveBack(self, n: int) -> None:
        """Grant the peer C{n} more bytes of credit."""
        if n <= 0:
            return
        self._recv_credit += n
        self.session.carrier.writeControl(frames.window_update(self.stream_id, n))

    # --- ends -----------------------------------------------------------------------

    def _notify(self, method: str, *args: Any) -> None:
        """Call the protocol; an exception there aborts this stream only."""
        try:
            getattr(self.protocol, method)(*args)
        except Exception:
            self.log.failure("stream protocol {protocol!r} failed in {method}", protocol=self.protocol, method=method)
            self._abort(Failure(StreamError(f"the stream's protocol failed in {method}")))

    def _appClosed(self, reason: Failure) -> None:
        """Tell the application (once): C{connectionLost}, and stop its producer."""
        if self._app_closed:
            return
        self._app_closed = True
        self.connected = 0
        self.disconnecting = True
        producer, self._producer = self._producer, None
        if self._pull is not None and self._pull.active():
            self._pull.cancel()
        if producer is not None:
            producer.stopProducing()
        if self.opened is not None:
            opened, self.opened = self.opened, None
            if not opened.called:
                opened.errback(reason)
            return
        if self.protocol is not None:
            try:
                self.protocol.connectionLost(reason)
            except Exception:
                self.log.failure("stream protocol {protocol!r} failed in connectionLost", protocol=self.protocol)

    def _finish(self) -> None:
        """Both directions ended cleanly."""
        self._forget()
        self._appClosed(Failure(ConnectionDone("the stream ended")))

    def _forget(self) -> None:
        self.state = CLOSED
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        self.session.forget(self.stream_id)

    def _lingerExpired(self) -> None:
        self._linger = None
        if self.state == LINGERING:
            self.session.carrier.resetStream(self.stream_id, frames.CANCELLED)
            self._forget()

    def _abort(self, reason: Failure) -> None:
        if self.state == CLOSED:
            return
        self._end(reason, reset=True)

    def _protocolError(self, why: str, code: int = frames.PROTOCOL_ERROR) -> None:
        self._end(Failure(StreamReset(why, code)), reset=True, code=code)

    def _end(self, reason: Failure, reset: bool, code: int = frames.CANCELLED, fin: bool = False) -> None:
        """End abnormally: optionally reset (or FIN) the stream, then tell the application."""
        if self.state == CLOSED:
            return
        was = self.state
        self._tx.clear()
        self._tx_size = 0
        if reset and was != LINGERING:
            self.session.carrier.resetStream(self.stream_id, code)
        elif fin and not self._fin_sent:
            self.session.carrier.writeStream(self.stream_id, b"", True)
            self._fin_sent = True
        self._forget()
        if isinstance(reason.value, CancelledError) and self.opened is not None:
            self.opened = None  # Deferred.cancel errbacks it
        self._appClosed(reason)

    def resetByPeer(self, code: int) -> None:
        if code == frames.REFUSED and self.state == OPENING:
            reason: Failure = Failure(StreamRefused("the peer has too many streams open"))
        else:
            reason = Failure(describe_reset(code, by_peer=True))
        self._end(reason, reset=False)

    def connectionGone(self, reason: Failure) -> None:
        """The connection under the stream ended (no more carrier writes)."""
        self._end(reason, reset=False)

"""
TCP simultaneous open, TLS on every connection it makes, and the one both pick.

Both peers bind the local port whose NAT mapping STUN-over-TCP learned
(C{SO_REUSEADDR} + C{SO_REUSEPORT}, so several sockets share it) and call
C{connect()} to each other's candidates at the synchronised time.  Each SYN
opens the sender's NAT for the other's SYN, and the two SYNs cross: TCP's
simultaneous open (RFC 9293 section 3.5) yields one connection.  A failed
try (RST, ICMP, timeout) is retried from a fresh socket on the same port until
the window closes: after a timeout (a SYN or SYN-ACK lost) at once, so a loss
costs C{connect_timeout} rather than the kernel's 1 s / 3 s SYN backoff, and
the peer's SYNs find a socket of ours to cross; after a refusal backing off.
Tries time out on a grid of C{connect_timeout}s from the start, which both
sides share: a try begun off it (after a refusal or a lost connection) ends on
it, so the two sides' tries start together again (L{connect_timeout_at}).  A connect() refused with C{EADDRNOTAVAIL} means a
connection for that 4-tuple is already forming in the kernel (the peer's SYN
reached our listener: a SYN_RECV entry, or the accept queue) or is ours in
its TLS handshake: the kernel and the listener finish it, so the attempt
waits a connect timeout before it looks again, without counting a try, and
makes no connect() to an address whose accepted connection is in its
handshake.  When a listening socket on that port is given, inbound
connections are taken too (an open host or full-cone NAT needs no crossing).

Every connected socket, whichever way it connected, is adopted into the
reactor and runs TLS 1.3 at once (L{natbypass.secure.tls}; role 0 is the
client), each side proving its identity key and checking the other's with
C{security.verify}.  TLS is what authenticates the path: a connection to
anyone else (someone else's machine at a host candidate, a replayer, a party
holding only the session key) fails its handshake and is closed and counted,
without disturbing the others.  Both sides then agree on one connection::

    role 0 -> role 1   ClientHello                                    at once, on every connection
    role 1 -> role 0   ServerHello ... Certificate, CertificateVerify, Finished
                       role 0 takes the first connection whose handshake authenticated role 1:
    role 0 -> role 1   Certificate, CertificateVerify, Finished, SELECT   role 0 ready; closes the others
                       role 1 adopts the connection on which a valid SELECT arrives: ready; closes the others

SELECT is role 0's first application record, sent in the same flight as its
Finished (L{select_record})::

    "NBT3" | HMAC-SHA256(session key, "natbypass-tcp select v3" | len(sid) | sid | exporter)

with C{exporter} the connection's TLS exporter value (RFC 8446 section 7.5)
for L{EXPORTER_LABEL}.  Inside TLS only role 0 can send it on this
connection, and it is good on no other (the exporter differs); the MAC ties
the mediator's session (its id and key) to this TLS channel, at no cost in
round trips.  Role 1 delivers nothing before a valid SELECT, which it can
only read once it has checked role 0's key.

From the connected socket: role 0 is ready after 1 RTT, role 1 after 1.5
RTT.  As in TLS 1.3 itself, role 0 is ready before role 1 has checked role
0's key: a role 1 that refuses it answers with an alert, delivers nothing
role 0 sent, and role 0's connection is lost with a
L{natbypass.secure.tls.PeerRefusedUs} reason naming its key (see
C{docs/security.md}, "TCP path").

A connection that fails (a refused key, not TLS, no SELECT within
C{handshake_timeout} of connecting or of the last bytes it brought; for role
1 after it answered a hello, L{ROLE1_PATIENCE} times that) never
fails the attempt while anything else is under way, or a stranger at a
candidate could end it: the attempt fails when its
window closes, or earlier once a key was refused and no connect, retry or
handshake is left, and the reason names every key problem seen.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import math
import os
import socket
import struct
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorTime, IReadDescriptor, ITCPTransport, ITransport, IWriteDescriptor
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.address import format_address
from natbypass.identity import Fingerprint
from natbypass.interfaces import IPeerConnection
from natbypass.net import reusable_socket
from natbypass.punch.candidates import SYN_BYTES, TokenBucket
from natbypass.punch.connection import PathConnection
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.secure import ChannelSecurity
from natbypass.secure.tls import PeerRefusedUs, SecureTLS, start_tls
from natbypass.streams import frames
from natbypass.streams.mux import MAX_PING_INTERVAL, MuxCarrier, socket_send_queue
from natbypass.trust import PeerRejected

Address = tuple[str, int]

#: SELECT: magic and the MAC; role 0's first application bytes inside TLS.
SELECT = struct.Struct("!4s32s")
SELECT_MAGIC = b"NBT3"
SELECT_LABEL = b"natbypass-tcp select v3"
#: The TLS exporter label whose value SELECT's MAC covers.
EXPORTER_LABEL = b"EXPORTER-natbypass-tcp-select"

#: errno values after which a retry from a fresh socket makes sense.
RETRYABLE = {
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EADDRNOTAVAIL,  # 4-tuple still held by a socket of ours (accepted on the listener)
    errno.EADDRINUSE,
}
#: errno values that say a connection for the 4-tuple is forming or formed
#: in the kernel (our listener holds the peer's SYN, or one of our sockets
#: has the tuple): no SYN left, so not a try; wait, don't hammer.
FORMING = {errno.EADDRNOTAVAIL}
#: errno values after which the wait was the connect timeout itself: retry at once.
TIMED_OUT = {errno.ETIMEDOUT}

#: connect() tries per candidate in one attempt.  After a refusal (RST, ICMP):
#: every C{retry_interval} at first, then backing off by L{RETRY_BACKOFF} up to
#: L{MAX_RETRY_INTERVAL}, so the tries cover a 5 s window without a SYN every
#: 75 ms to a closed port; after a timeout, C{retry_interval} (the timeout paced it).
MAX_TRIES_PER_CANDIDATE = 12
#: connect() tries in all, in one attempt.
MAX_TRIES = 48
#: Role 1 waits this many handshake timeouts (from the last bytes) for role 0's last TLS flight once it has
#: answered role 0's hello: role 0 may already have chosen the connection (issue 12, under loss).
ROLE1_PATIENCE = 2
#: Tries at C{retry_interval} before backing off, the backoff factor, and its cap (s).
FAST_TRIES, RETRY_BACKOFF, MAX_RETRY_INTERVAL = 4, 1.5, 1.0
#: A try that starts off the grid of connect timeouts counted from the start (after a lost connection, a
#: refusal) ends on the grid, at the first line at least this many connect timeouts away: both sides' tries
#: then start together again, as they did at the agreed start (issue 12: each SYN then meets the other's
#: socket early in its timeout; out of phase, it lands late in it, and the timeout resets a forming connection).
MIN_TRY_FRACTION = 0.5


def connect_timeout_at(now: float, origin: float, base: float) -> float:
    """The timeout of a connect() made at C{now}: to the first line of the C{base} grid from C{origin} at least
    L{MIN_TRY_FRACTION} of C{base} away (C{base} for a try on the grid)."""
    lines = math.ceil((now - origin + MIN_TRY_FRACTION * base) / base - 1e-9)
    return origin + lines * base - now


class SelectError(ValueError):
    """A SELECT record is malformed or does not verify (the one error type)."""


def _select_mac(session: PunchSession, exporter: bytes) -> bytes:
    sid = session.sid
    return hmac.new(session.key, SELECT_LABEL + bytes([len(sid)]) + sid + exporter, hashlib.sha256).digest()


def select_record(session: PunchSession, exporter: bytes) -> bytes:
    """
    The SELECT role 0 sends inside TLS on the one connection it picks.

    @param exporter: that connection's TLS exporter value for
        L{EXPORTER_LABEL} (L{SecureTLS.exporter}).
    """
    return SELECT.pack(SELECT_MAGIC, _select_mac(session, exporter))


def check_select(session: PunchSession, exporter: bytes, data: bytes) -> None:
    """
    Check that C{data} is exactly the SELECT of C{session} for the TLS
    channel whose exporter value is C{exporter}; raise L{SelectError} if not.
    """
    if len(data) != SELECT.size:
        raise SelectError(f"a SELECT is {SELECT.size} bytes, not {len(data)}")
    magic, mac = SELECT.unpack(data)
    if magic != SELECT_MAGIC:
        raise SelectError(f"bad SELECT magic {magic!r}: not a NATbypass peer of this version")
    if not hmac.compare_digest(mac, _select_mac(session, exporter)):
        raise SelectError("the SELECT does not verify with this session's id and key (another session?)")


#: SO_LINGER on, 0 s: close() resets the connection and frees the socket at once.
ABORT_LINGER = struct.pack("ii", 1, 0)


def _abort(sock: socket.socket) -> None:
    """
    Close a connect() socket we give up on so that it frees its 4-tuple now.

    A plain close() of a socket that the peer's crossing SYN has moved to
    SYN_RECV (simultaneous open, our SYN-ACK lost) leaves an orphan in
    FIN_WAIT1 holding the 4-tuple for many seconds: every later connect()
    from the port to the peer fails with EADDRNOTAVAIL (the storm of issue
    12).  With SO_LINGER 0 the kernel sends a RST instead, which also clears
    the peer's half of it; a socket still in SYN_SENT goes silently.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORT_LINGER)
    except OSError:
        pass  # already reset or closed by the kernel: nothing to linger
    sock.close()


def _address_of(address: object) -> Address | None:
    """C{(host, port)} of a transport's address, None if it has none."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return (host, port) if isinstance(host, str) and isinstance(port, int) else None


def _describe(address: object) -> str:
    """C{HOST:PORT} of a transport's address, for reasons a person reads."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return format_address((host, port)) if isinstance(host, str) and isinstance(port, int) else str(address)


@implementer(IWriteDescriptor)
class _PendingConnect:
    """Watches one non-blocking connect() for the reactor."""

    def __init__(self, attempt: TCPPunchAttempt, sock: socket.socket, target: Address) -> None:
        self.attempt = attempt
        self.sock = sock
        self.target = target
        self.timer = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def doWrite(self) -> None:
        self.attempt._connectDone(self, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error/hangup on the socket (a refused connect).
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if self.sock.fileno() >= 0 else 0
        self.attempt._connectDone(self, code or errno.ECONNABORTED)

    def logPrefix(self) -> str:
        return "TCPPunchConnect"


@implementer(IReadDescriptor)
class _Acceptor:
    """Takes inbound connections on the listening socket of the punch port."""

    def __init__(self, attempt: TCPPunchAttempt, sock: socket.socket) -> None:
        self.attempt = attempt
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.attempt.log.warn("accept failed: {error}", error=e)
                return
            self.attempt._adopt(conn, "accepted")

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "TCPPunchAccept"


class _TLSApp(Protocol):
    """What TLS connects on one adopted socket once it authenticated the peer."""

    def __init__(self, proto: _HandshakeProtocol) -> None:
        self._proto = proto

    def dataReceived(self, data: bytes) -> None:
        self._proto._appData(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._proto._appLost(reason)


class _HandshakeProtocol(Protocol):
    """
    The protocol of an adopted socket: runs TLS over it at once (role 1
    then waits for SELECT) and, once this socket is the path, feeds its
    L{TCPPeerConnection}.
    """

    def __init__(self, attempt: TCPPunchAttempt, how: str) -> None:
        self.attempt = attempt
        self.how = how
        #: TLS over this socket, from the moment it connected.
        self.tls: SecureTLS | None = None
        self.timer = None
        #: When the socket was connected (the attempt's clock).
        self.started = 0.0
        #: Already refused and counted (closing).
        self.refused = False
        #: Refused for what it said about keys (the peer's key, or ours refused).
        self.key_problem = False
        #: Role 1: the first application bytes, until they make a SELECT.
        self.select = b""
        #: The path, once this socket is it.
        self.connection: TCPPeerConnection | None = None

    def connectionMade(self) -> None:
        self.started = self.attempt.reactor.seconds()
        self.tls = self.attempt._handshakeStarted(self)

    def dataReceived(self, data: bytes) -> None:
        if self.connection is None:
            self.attempt._handshakeProgress(self)
        if self.tls is not None:
            self.tls.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.tls is not None:
            self.tls.protocol.connectionLost(reason)
        if self.connection is None:
            self.attempt._handshakeLost(self)

    def _appData(self, data: bytes) -> None:
        if self.connection is not None:
            self.connection._dataReceived(data)
        elif self.attempt.session.role == 1 and not self.refused:
            self.select += data
            if len(self.select) >= SELECT.size:
                record, rest, self.select = self.select[: SELECT.size], self.select[SELECT.size :], b""
                self.attempt._selectReceived(self, record, rest)
        # Role 0 picks a connection as its handshake completes, before any data: the rest are closing.

    def _appLost(self, reason: Failure) -> None:
        if self.connection is not None:
            self.connection._connectionLost(reason)


class TCPPunchAttempt:
    """
    Drives a simultaneous open with a real reactor (C{IReactorFDSet},
    C{IReactorSocket}, C{IReactorTime}).  Use L{punch_tcp}.
    """

    log = Logger()
    #: Listening sockets an attempt is accepting on right now.
    _listeners_in_use: ClassVar[weakref.WeakSet[socket.socket]] = weakref.WeakSet()

    def __init__(
        self,
        reactor,
        session: PunchSession,
        local: Address,
        candidates: Iterable[Address],
        start_delay: float = 0.0,
        window: float = 5.0,
        retry_interval: float = 0.075,
        connect_timeout: float = 0.5,
        handshake_timeout: float = 2.0,
        listener: socket.socket | None = None,
        keepalive_interval: float | None = 15.0,
        *,
        security: ChannelSecurity,
        max_tries_per_candidate: int = MAX_TRIES_PER_CANDIDATE,
        max_tries: int = MAX_TRIES,
        pace: TokenBucket | None = None,
        make_socket: Callable[[Address], socket.socket] = reusable_socket,
    ) -> None:
        self.reactor = reactor
        self._make_socket = make_socket
        self._max_tries_per_candidate = max_tries_per_candidate
        self._max_tries = max_tries
        self._pace = pace
        #: Tries not made: the per-candidate or total bound was reached.
        self.capped = 0
        #: Tries put off because the peer-wide pace had no room.
        self.paced = 0
        #: Tries put off because a connection for the 4-tuple was forming
        #: (EADDRNOTAVAIL, or our accepted connection from it in its handshake).
        self.forming = 0
        #: Refusals (RST, ICMP) per candidate: what the retry backs off on.
        self._refused: Counter[Address] = Counter()
        self.session = session
        self.security = security
        self.local = local
        self.candidates = list(dict.fromkeys(candidates))
        self._window = window
        self._retry = retry_interval
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._keepalive = keepalive_interval
        self._pending: set[_PendingConnect] = set()
        self._retries: dict[Address, object] = {}
        #: Adopted sockets whose TLS (or, on role 1, SELECT) is under way.
        self._handshakes: set[_HandshakeProtocol] = set()
        #: Our certificate, made once for every connection of the attempt.
        self._certificate = security.identity.certificate(reactor)
        #: What refused connections said about keys, for the failure reason.
        self.refusals: list[str] = []
        self._acceptor = None
        if listener is not None:
            if listener in self._listeners_in_use:
                # Accepted sockets cannot be told apart by session before
                # SELECT, so one attempt at a time takes them.  Without the
                # listener the crossing connects still work.
                self.log.warn(
                    "port {port} is already accepting for another attempt; this one only connects out",
                    port=local[1],
                )
            else:
                self._listeners_in_use.add(listener)
                self._acceptor = _Acceptor(self, listener)
        self._done = False
        self.errors: Counter[str] = Counter()
        self.tries: Counter[Address] = Counter()
        self.invalid = 0
        self.deferred: Deferred = Deferred(lambda d: self._finish())
        self._deadline = reactor.seconds() + start_delay + window
        self._timeout = reactor.callLater(start_delay + window, self._expire)
        if self._acceptor is not None:
            reactor.addReader(self._acceptor)
        self._start_call = reactor.callLater(start_delay, self._start)

    # -- connecting

    def _start(self) -> None:
        self._start_call = None
        self._origin = self.reactor.seconds()
        for target in self.candidates:
            self._try(target)

    def _try(self, target: Address) -> None:
        self._retries.pop(target, None)
        if self._done:
            return
        if self._handshaking(target):
            # Our accepted connection from the peer holds this 4-tuple: its TLS decides, a connect() cannot.
            self.forming += 1
            self._schedule_retry(target, self._connect_timeout)
            return
        if self.tries[target] >= self._max_tries_per_candidate or self.tries.total() >= self._max_tries:
            self.capped += 1
            self._settle()
            return
        if self._pace is not None and not self._pace.take(SYN_BYTES):
            self.paced += 1
            self._schedule_retry(target, self._backoff(target))
            return
        sock = None
        try:
            sock = self._make_socket(self.local)
            code = sock.connect_ex(target)
        except OSError as e:
            if sock is not None:
                sock.close()
            code = e.errno or 0
        if code not in FORMING:
            self.tries[target] += 1  # a SYN went out, or could have
        if sock is None:
            self._failedTry(target, code)
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._failedTry(target, code)
            return
        pending = _PendingConnect(self, sock, target)
        timeout = connect_timeout_at(self.reactor.seconds(), self._origin, self._connect_timeout)
        pending.timer = self.reactor.callLater(timeout, self._connectDone, pending, errno.ETIMEDOUT)
        self._pending.add(pending)
        self.reactor.addWriter(pending)

    def _connectDone(self, pending: _PendingConnect, code: int) -> None:
        if pending not in self._pending:
            return
        self._pending.discard(pending)
        self.reactor.removeWriter(pending)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        if code == 0:
            self._adopt(pending.sock, f"connected to {format_address(pending.target)}")
            return
        _abort(pending.sock)
        self._failedTry(pending.target, code)

    def _failedTry(self, target: Address, code: int) -> None:
        name = errno.errorcode.get(code, str(code))
        self.errors[name] += 1
        self.log.debug("connect to {target} failed: {error}", target=format_address(target), error=name)
        if self._done or target in self._retries:
            return
        if code not in RETRYABLE:
            self.log.warn("not retrying {target}: {error}", target=format_address(target), error=os.strerror(code))
            self._settle()
            return
        if code in FORMING:
            # The kernel is forming a connection for this 4-tuple (the peer's SYN reached our listener), or
            # one of our sockets has it: the listener path completes it (the peer's next SYN makes our
            # kernel resend its SYN-ACK).  Look again a connect timeout later; no SYN went out.
            self.forming += 1
            delay = self._connect_timeout
        elif code in TIMED_OUT:
            # The SYN or SYN-ACK was lost and the timeout was the wait: a new SYN at once.  A gap with no
            # socket of ours on the tuple would let the peer's next SYN land on our listener instead of
            # crossing ours: a SYN_RECV entry there whose SYN-ACK the peer's NAT drops as out of window
            # once the peer has moved to a fresh socket, holding the tuple (EADDRNOTAVAIL) for many seconds.
            delay = 0.0
        else:
            self._refused[target] += 1
            delay = self._backoff(target)
        self._schedule_retry(target, delay)

    def _backoff(self, target: Address) -> float:
        """The wait before the next try after a refusal: C{retry_interval}, backing off after L{FAST_TRIES}."""
        slow = max(0, self._refused[target] - FAST_TRIES)
        return min(self._retry * RETRY_BACKOFF**slow, max(self._retry, MAX_RETRY_INTERVAL))

    def _handshaking(self, target: Address) -> bool:
        """Whether an adopted connection with C{target} as its peer is in its handshake."""
        return any(_address_of(proto.transport.getPeer()) == target for proto in self._handshakes)

    def _schedule_retry(self, target: Address, delay: float) -> None:
        """Try C{target} again C{delay} seconds from now, within the window."""
        if self.reactor.seconds() + delay < self._deadline:
            self._retries[target] = self.reactor.callLater(delay, self._try, target)
        else:
            self._settle()

    def _adopt(self, sock: socket.socket, how: str) -> None:
        try:
            if self._done:
                return
            sock.setblocking(False)
            factory = Factory.forProtocol(lambda: _HandshakeProtocol(self, how))
            try:
                self.reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
            except OSError as e:  # reset before we got to it (getpeername: ENOTCONN)
                self.log.debug("{how} connection gone before it was adopted: {error}", how=how, error=e)
        finally:
            sock.close()  # the reactor holds its own duplicate

    # -- TLS on every connection

    def _handshakeStarted(self, proto: _HandshakeProtocol) -> SecureTLS | None:
        """C{proto} connected: start TLS on it at once (role 0 sends its ClientHello)."""
        if self._done:
            proto.refused = True
            proto.transport.abortConnection()
            return None
        self._handshakes.add(proto)
        proto.timer = self.reactor.callLater(self._handshake_timeout, self._handshakeTimeout, proto)
        sec = self.security
        tls = start_tls(
            proto.transport,
            _TLSApp(proto),
            sec.identity,
            sec.verify,
            self.session.role,
            self.reactor,
            certificate=self._certificate,
        )
        tls.handshake.addCallbacks(self._authenticated, self._tlsFailed, callbackArgs=(proto,), errbackArgs=(proto,))
        return tls

    def _authenticated(self, fingerprint: Fingerprint, proto: _HandshakeProtocol) -> None:
        """TLS on C{proto} proved the peer's key (on role 1: and the peer's SELECT comes next)."""
        if self._done or proto.refused:
            proto.transport.abortConnection()
            return
        if self.session.role == 1:
            self.log.debug(
                "{peer} ({how}) proved {fingerprint}; waiting for SELECT",
                peer=proto.transport.getPeer(),
                how=proto.how,
                fingerprint=str(fingerprint),
            )
            # SELECT comes in the same flight as the Finished just read: no more patience than the timeout.
            if proto.timer is not None and proto.timer.active():
                proto.timer.reset(self._handshake_timeout)
            return
        # Role 0: the first connection that authenticated role 1 is the path.
        assert proto.tls is not None
        proto.tls.send_now(select_record(self.session, proto.tls.exporter(EXPORTER_LABEL)))
        self._choose(proto, b"")

    def _selectReceived(self, proto: _HandshakeProtocol, record: bytes, rest: bytes) -> None:
        """Role 1: the first application bytes on C{proto}, after TLS proved role 0's key."""
        assert proto.tls is not None
        try:
            check_select(self.session, proto.tls.exporter(EXPORTER_LABEL), record)
        except SelectError as e:
            self._refuse(proto, str(e))
            return
        if self._done:
            proto.transport.abortConnection()
            return
        self._choose(proto, rest)

    def _choose(self, proto: _HandshakeProtocol, rest: bytes) -> None:
        """C{proto} is the path: close every other connection and hand it over."""
        self._handshakes.discard(proto)
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()
        proto.timer = None
        self._stopTrying()
        assert proto.tls is not None
        conn = TCPPeerConnection(self.session, proto.transport, keepalive_interval=self._keepalive)
        conn._secured(proto.tls, (self.reactor.seconds() - proto.started) * 1000, self.reactor)
        conn.punched_at = proto.started
        proto.connection = conn
        if rest:
            conn._dataReceived(rest)
        self.log.info(
            "TCP path to {peer_id} via {remote} ({how}): {cipher}, peer key {fingerprint}, {ms:.1f} ms",
            peer_id=self.session.peer_id,
            remote=proto.transport.getPeer(),
            how=proto.how,
            cipher=conn.cipher,
            fingerprint=str(conn.peer_fingerprint),
            ms=conn.handshake_ms,
        )
        self.deferred.callback(conn)

    def _refuse(self, proto: _HandshakeProtocol, reason: str, key_problem: bool = False) -> None:
        """Count C{proto} as failed, remember a key problem, close it; the attempt goes on."""
        proto.refused = True
        proto.key_problem = key_problem
        self.invalid += 1
        described = f"{_describe(proto.transport.getPeer())} ({proto.how}): {reason}"
        if key_problem and described not in self.refusals:
            self.refusals.append(described)
        self.log.info("dropping {what}", what=described)
        proto.transport.abortConnection()

    def _tlsFailed(self, failure: Failure, proto: _HandshakeProtocol) -> None:
        """TLS on C{proto} failed (it is lost): count it, and keep what it says about keys."""
        if self._done or proto.refused:
            return
        if failure.check(PeerRejected):
            self._refuse(proto, f"its identity key was refused: {failure.value}", key_problem=True)
        elif failure.check(PeerRefusedUs):
            self._refuse(proto, str(failure.value), key_problem=True)
        else:
            self._refuse(proto, f"TLS failed: {failure.getErrorMessage()}")

    def _handshakeProgress(self, proto: _HandshakeProtocol) -> None:
        """
        Bytes came on C{proto} before it was chosen: its handshake is moving,
        if slowly (a lost segment costs TCP a retransmission timeout, 1 s
        before it has a round-trip sample), so its timeout counts from now.
        Bounded by the window; a silent connection still goes after
        C{handshake_timeout}.
        """
        if proto.timer is not None and proto.timer.active():
            timeout = self._handshake_timeout
            if self.session.role == 1 and not (proto.tls is not None and proto.tls.handshake.called):
                # We answered role 0's hello: role 0 is ready, and may have taken this connection as its
                # path, as soon as our flight arrives; its last flight may be TCP retransmissions away.
                # Dropping the connection then would lose role 0's path, so wait longer (the window bounds it).
                timeout *= ROLE1_PATIENCE
            proto.timer.reset(timeout)

    def _handshakeTimeout(self, proto: _HandshakeProtocol) -> None:
        proto.timer = None
        waiting = "SELECT" if proto.tls is not None and proto.tls.handshake.called else "TLS handshake"
        self._refuse(proto, f"no {waiting} within {self._handshake_timeout:g} s")

    def _handshakeLost(self, proto: _HandshakeProtocol) -> None:
        self._handshakes.discard(proto)
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()
        proto.timer = None
        target = _address_of(proto.transport.getPeer()) if proto.transport is not None else None
        if (
            not self._done
            and not proto.key_problem
            and target in self.candidates
            and target not in self._retries
            and not any(p.target == target for p in self._pending)
        ):
            # Lost before TLS finished (reset, timed out on a lossy path), not for its key: try it again.
            assert target is not None
            self._schedule_retry(target, self._retry)
        self._settle()

    # -- ending

    def _expire(self) -> None:
        self._timeout = None
        if not self._done:
            self._fail(f"no authenticated TCP connection within {self._window:g} s from local port {self.local[1]}")

    def _settle(self) -> None:
        """
        Fail before the window closes when a key was refused and nothing else
        is under way: connects started, none pending or due for a retry, no
        connection in its handshake.  While anything is, a refusal (which a
        stranger at a candidate can cause) ends nothing.
        """
        if self._done or not self.refusals or self._start_call is not None:
            return
        if self._pending or self._retries or self._handshakes:
            return
        self._fail(f"no authenticated TCP connection from local port {self.local[1]}, and nothing left to try")

    def _fail(self, headline: str) -> None:
        self._finish()
        tried = ", ".join(f"{format_address(t)} x{self.tries[t]}" for t in self.candidates) or "none"
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(self.errors.items())) or "none"
        keys = "".join(f"{r}; " for r in self.refusals)
        self.deferred.errback(
            PunchFailed(
                "tcp",
                f"{headline}: {keys}connect tries {tried}; errors {errors}; "
                f"{self.invalid} connections failed the handshake",
            )
        )

    def _stopTrying(self) -> None:
        """Stop connecting and accepting, and close every connection not chosen."""
        if self._done:
            return
        self._done = True
        for call in (self._timeout, self._start_call, *self._retries.values()):
            if call is not None and call.active():
                call.cancel()
        self._retries.clear()
        for pending in list(self._pending):
            self._pending.discard(pending)
            self.reactor.removeWriter(pending)
            if pending.timer is not None and pending.timer.active():
                pending.timer.cancel()
            _abort(pending.sock)
        for proto in list(self._handshakes):
            self._handshakeLost(proto)
            proto.transport.abortConnection()
        if self._acceptor is not None:
            self.reactor.removeReader(self._acceptor)
            self._listeners_in_use.discard(self._acceptor.sock)

    def _finish(self) -> None:
        """Stop everything still running (cancel, expiry)."""
        self._stopTrying()


def punch_tcp(
    reactor,
    session: PunchSession,
    local: Address,
    candidates: Iterable[Address],
    start_delay: float = 0.0,
    window: float = 5.0,
    retry_interval: float = 0.075,
    connect_timeout: float = 0.5,
    handshake_timeout: float = 2.0,
    listener: socket.socket | None = None,
    keepalive_interval: float | None = 15.0,
    *,
    security: ChannelSecurity,
    max_tries_per_candidate: int = MAX_TRIES_PER_CANDIDATE,
    max_tries: int = MAX_TRIES,
    pace: TokenBucket | None = None,
) -> Deferred:
    """
    Open a TLS 1.3 path to the peer from local address C{local}, both sides
    authenticated by their identity keys.

    C{start_delay} seconds from now, connect() to every candidate, retrying
    every C{retry_interval} until C{window} seconds after the start; take
    inbound connections on C{listener} (a listening socket on the same port,
    see C{candidates.reserve_tcp_port}; the caller keeps ownership) meanwhile.
    One attempt at a time accepts on a given listener; a concurrent attempt
    on the same one only connects out (enough unless the peer's SYNs come
    before ours, e.g. on loopback).

    TLS 1.3 runs on every connection (role 0 is the client), proving
    C{security.identity} and checking the peer's key with
    C{security.verify}; a connection must authenticate the peer (on role 1:
    and bring role 0's SELECT) within C{handshake_timeout} seconds of
    connecting, or it is closed.  Role 0 takes the first connection whose
    handshake authenticated role 1 and selects it; role 1 the one selected.

    Fires with a L{TCPPeerConnection} once TLS authenticated the peer on the
    chosen connection (on role 0 before role 1 has checked our key: if it
    refuses it, the connection is then lost with a
    L{natbypass.secure.tls.PeerRefusedUs} reason); or fails with
    L{PunchFailed} when the window closes, its reason naming every refused
    key (the L{natbypass.trust.PeerRejected} message, or that the peer
    refused ours); earlier once a key was refused and nothing else is under
    way.  Cancelling it closes every socket it opened.

    At most C{max_tries_per_candidate} connects go to one candidate and
    C{max_tries} in all (L{MAX_TRIES_PER_CANDIDATE}, L{MAX_TRIES}); each
    takes L{natbypass.punch.candidates.SYN_BYTES} from the peer-wide C{pace}
    when one is given, and waits for a retry when it has no room.
    """
    return TCPPunchAttempt(
        reactor,
        session,
        local,
        candidates,
        start_delay=start_delay,
        window=window,
        retry_interval=retry_interval,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        listener=listener,
        keepalive_interval=keepalive_interval,
        security=security,
        max_tries_per_candidate=max_tries_per_candidate,
        max_tries=max_tries,
        pace=pace,
    ).deferred


@implementer(IPeerConnection)
class TCPPeerConnection(PathConnection):
    """
    A TCP path secured by TLS 1.3, carrying streams and messages in frames
    (L{natbypass.streams.mux}), encrypted and authenticated end to end by
    both sides' identity keys.

    Made by L{punch_tcp} once TLS authenticated the peer on the chosen
    socket; everything is written into TLS.  C{send} carries one message in a
    DATAGRAM frame (reliable and ordered on this path).  A frame PING every
    C{keepalive_interval} seconds (at most L{MAX_PING_INTERVAL}) proves the
    peer alive: one unanswered within L{natbypass.streams.mux.PONG_TIMEOUT}
    seconds ends the path, with that reason (so a dead path is reported
    within 15 s by default), and the kernel's TCP keepalive holds the NAT
    mapping.

    @ivar peer_fingerprint: the key the peer proved it holds.
    @ivar cipher: e.g. C{"TLSv1.3 TLS_AES_256_GCM_SHA384"}.
    @ivar handshake_ms: from the connected socket to this side ready (TLS
        authenticated the peer and, on role 1, SELECT arrived), on the
        attempt's clock.
    """

    log = Logger()
    protocol = "tcp"
    delivery = "datagram"
    secure = True
    max_datagram_size = frames.MAX_DATAGRAM

    def __init__(
        self,
        session: PunchSession,
        transport: ITCPTransport,
        keepalive_interval: float | None = 15.0,
        max_pending: int = 1 << 20,
    ) -> None:
        super().__init__(session)
        #: The socket's transport: only for keepalive and read flow control.
        self._raw = transport
        #: The TLS transport, once secured; the only thing anything writes to.
        self._tls: ITransport | None = None
        self._mux: MuxCarrier | None = None
        self._interval = keepalive_interval
        self.local_address = transport.getHost()
        self.remote_address = transport.getPeer()
        self.peer_fingerprint: Fingerprint | None = None
        self.cipher = ""
        self.handshake_ms: float | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._max_pending = max_pending
        self._dead: str | None = None
        if keepalive_interval is not None:
            self._setKeepalive(keepalive_interval)

    def __repr__(self) -> str:
        return f"<TCPPeerConnection {self.peer_id!r} {self.remote_address} {self.peer_fingerprint}>"

    def _secured(self, tls: SecureTLS, handshake_ms: float, clock: IReactorTime) -> None:
        """TLS proved the peer and this socket is the path: from now on it carries frames."""
        self._tls = tls.protocol
        self.peer_fingerprint = tls.peer_fingerprint
        self.cipher = tls.cipher
        self.handshake_ms = handshake_ms
        interval = None if self._interval is None else min(self._interval, MAX_PING_INTERVAL)
        self._mux = MuxCarrier(
            self._tls.write,
            self.role,
            clock,
            self._messageReceived,
            self._muxDead,
            keepalive_interval=interval,
            dead_after=None if interval is None else 3 * interval,
            send_queue=socket_send_queue(self._raw),
        )
        self._tls.registerProducer(self._mux, True)
        self._startStreams(self._mux, clock)

    def _setKeepalive(self, interval: float) -> None:
        self._raw.setTcpKeepAlive(True)
        handle = getattr(self._raw, "getHandle", lambda: None)()
        secs = max(1, int(interval))
        for opt, value in (("TCP_KEEPIDLE", secs), ("TCP_KEEPINTVL", secs), ("TCP_KEEPCNT", 3)):
            if handle is not None and hasattr(socket, opt):
                handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)

    def _take_pending(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        if self._pending_size > self._max_pending:
            self._raw.resumeProducing()
        self._pending_size = 0
        return pending

    def send(self, data: bytes) -> None:
        if self._mux is None:
            raise RuntimeError("the TCP path is not secured yet; nothing may be sent")
        if len(data) > self.max_datagram_size:
            raise ValueError(f"a message holds at most {self.max_datagram_size} bytes, not {len(data)}")
        if self._lost is None:
            self._mux.sendDatagram(data)

    def close(self) -> None:
        if self._lost is not None:
            return
        if self._tls is not None:
            # A registered producer would hold the close until it unregisters.
            self._tls.unregisterProducer()
            self._tls.loseConnection()  # TLS close_notify, then the socket
        else:
            self._raw.abortConnection()

    def _dataReceived(self, data: bytes) -> None:
        """Bytes out of TLS: frames."""
        if self._mux is not None:
            self._mux.dataReceived(data)

    def _messageReceived(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.dataReceived(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._max_pending:
            # Nobody reads: stop the peer rather than buffer without bound.
            self._raw.pauseProducing()

    def _muxDead(self, why: str) -> None:
        self._dead = why
        self._raw.abortConnection()

    def _connectionLost(self, reason: Failure) -> None:
        if self._mux is not None:
            self._mux.stop()
        if self._dead is not None:
            reason = Failure(ConnectionLost(f"the TCP path to {self.peer_id!r}: {self._dead}"))
        self._notify_lost(reason)

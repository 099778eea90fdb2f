"""
TCP simultaneous open, its authentication handshake, and the connection it makes.

Both peers bind the local port whose NAT mapping STUN-over-TCP learned
(C{SO_REUSEADDR} + C{SO_REUSEPORT}, so several sockets share it) and call
C{connect()} to each other's candidates at the synchronised time.  Each SYN
opens the sender's NAT for the other's SYN, and the two SYNs cross: TCP's
simultaneous open (RFC 9293 section 3.5) yields one connection.  A failed
try (RST, ICMP, timeout) is retried from a fresh socket on the same port until
the window closes.  When a listening socket on that port is given, inbound
connections are taken too (an open host or full-cone NAT needs no crossing).

Every connected socket is adopted into the reactor and must pass the
handshake below before it is handed over; the first that does wins, the rest
are closed.  Anything that fails is closed and counted, so a third host that
connects or injects cannot take the path.

Handshake (54-byte frames C{"NBT1" | type | role | nonce[16] | mac[32]})::

    role 1 -> role 0   HELLO   mac = HMAC(key, "natbypass-tcp" | sid | HELLO | 1 | nonce1)
    role 0 -> role 1   ACCEPT  mac = HMAC(key, "natbypass-tcp" | sid | ACCEPT | 0 | nonce0 | nonce1)

Role 0 only answers HELLO on the one connection it picks, so when several
connections come up (two candidates, connect and accept) both sides agree on
the same one without another round trip: role 1 takes the connection on which
ACCEPT arrives.  ACCEPT covers role 1's fresh nonce, so it cannot be replayed.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import hmac
import os
import socket
import struct
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.address import format_address
from natbypass.interfaces import IPeerConnection
from natbypass.net import reusable_socket
from natbypass.punch.connection import PathConnection
from natbypass.punch.session import PunchFailed, PunchSession

Address = tuple[str, int]

FRAME = struct.Struct("!4sBB16s32s")
TCP_MAGIC = b"NBT1"
HELLO = 1
ACCEPT = 2
LABEL = b"natbypass-tcp"

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


class TCPAuthError(ValueError):
    """A handshake frame is malformed or fails verification (the one error type)."""


@dataclass(frozen=True)
class AuthFrame:
    type: int
    role: int
    nonce: bytes
    mac: bytes


def _mac(session: PunchSession, type_: int, role: int, nonce: bytes, peer_nonce: bytes = b"") -> bytes:
    sid = session.sid
    msg = LABEL + bytes([len(sid)]) + sid + bytes([type_, role]) + nonce + peer_nonce
    return hmac.new(session.key, msg, hashlib.sha256).digest()


def hello_frame(session: PunchSession, nonce: bytes) -> bytes:
    """The frame role 1 sends on every connection it gets."""
    return FRAME.pack(TCP_MAGIC, HELLO, 1, nonce, _mac(session, HELLO, 1, nonce))


def accept_frame(session: PunchSession, nonce: bytes, peer_nonce: bytes) -> bytes:
    """The frame role 0 sends on the one connection it picks."""
    return FRAME.pack(TCP_MAGIC, ACCEPT, 0, nonce, _mac(session, ACCEPT, 0, nonce, peer_nonce))


def parse_frame(data: bytes) -> AuthFrame:
    """Decode exactly one frame; raise L{TCPAuthError} for anything else."""
    if len(data) != FRAME.size:
        raise TCPAuthError(f"a handshake frame is {FRAME.size} bytes, not {len(data)}")
    magic, type_, role, nonce, mac = FRAME.unpack(data)
    if magic != TCP_MAGIC:
        raise TCPAuthError(f"bad magic {magic!r}: not a NATbypass peer")
    if type_ not in (HELLO, ACCEPT) or role != {HELLO: 1, ACCEPT: 0}[type_]:
        raise TCPAuthError(f"bad frame type {type_} / role {role}")
    return AuthFrame(type_, role, nonce, mac)


class HandshakeState(enum.StrEnum):
    """Where a L{TCPHandshake} is."""

    WAITING = "waiting"
    VERIFIED = "verified"
    DONE = "done"
    FAILED = "failed"


class TCPHandshake:
    """
    The handshake of one connection, pure: feed it bytes, get bytes to send
    and a L{HandshakeState}: C{WAITING} -> C{VERIFIED} (role 0 saw a valid
    HELLO and may L{accept}) -> C{DONE}; or C{FAILED}.
    """

    def __init__(self, session: PunchSession, nonce: bytes) -> None:
        self._session = session
        self._nonce = nonce
        self._buffer = b""
        self._peer_nonce = b""
        self.state = HandshakeState.WAITING
        self.error = ""

    def start(self) -> bytes:
        """What to send as soon as the connection is up."""
        return hello_frame(self._session, self._nonce) if self._session.role == 1 else b""

    def dataReceived(self, data: bytes) -> bytes:
        """
        Consume handshake bytes; return what follows the handshake (the first
        application bytes) once it is over, else C{b""}.
        """
        if self.state is not HandshakeState.WAITING:
            raise RuntimeError(f"handshake is {self.state}")
        self._buffer += data
        if len(self._buffer) < FRAME.size:
            return b""
        raw, rest = self._buffer[: FRAME.size], self._buffer[FRAME.size :]
        self._buffer = b""
        s = self._session
        try:
            frame = parse_frame(raw)
            if frame.role != s.peer_role:
                raise TCPAuthError("the frame carries our own role: a reflection")
            if frame.type == HELLO:
                expected = _mac(s, HELLO, 1, frame.nonce)
            else:
                expected = _mac(s, ACCEPT, 0, frame.nonce, self._nonce)
            if not hmac.compare_digest(expected, frame.mac):
                raise TCPAuthError("MAC does not verify with the session key")
        except TCPAuthError as e:
            self.state, self.error = HandshakeState.FAILED, str(e)
            return b""
        self._peer_nonce = frame.nonce
        self.state = HandshakeState.VERIFIED if s.role == 0 else HandshakeState.DONE
        return rest

    def accept(self) -> bytes:
        """Role 0: pick this connection; returns the ACCEPT frame to send."""
        if self.state is not HandshakeState.VERIFIED:
            raise RuntimeError(f"cannot accept a handshake that is {self.state}")
        self.state = HandshakeState.DONE
        return accept_frame(self._session, self._nonce, self._peer_nonce)


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


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


class _HandshakeProtocol(Protocol):
    """The protocol of an adopted socket: runs the handshake, then relays to the connection."""

    def __init__(self, attempt: TCPPunchAttempt, how: str) -> None:
        self.attempt = attempt
        self.how = how
        self.handshake = TCPHandshake(attempt.session, attempt.nonce_source())
        self.connection: TCPPeerConnection | None = None
        self.timer = None

    def connectionMade(self) -> None:
        self.attempt._handshakeStarted(self)
        first = self.handshake.start()
        if first:
            self.transport.write(first)

    def dataReceived(self, data: bytes) -> None:
        if self.connection is not None:
            self.connection._dataReceived(data)
            return
        if self.handshake.state is not HandshakeState.WAITING:
            return  # role 0 holding a verified connection it has not picked: ignore
        rest = self.handshake.dataReceived(data)
        self.attempt._handshakeProgress(self, rest)

    def connectionLost(self, reason: Failure) -> None:
        if self.connection is not None:
            self.connection._connectionLost(reason)
        else:
            self.attempt._handshakeLost(self, reason)


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
        nonce_source: Callable[[], bytes] = lambda: os.urandom(16),
    ) -> None:
        self.reactor = reactor
        self.session = session
        self.local = local
        self.candidates = list(dict.fromkeys(candidates))
        self.nonce_source = nonce_source
        self._window = window
        self._retry = retry_interval
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._keepalive = keepalive_interval
        self._pending: set[_PendingConnect] = set()
        self._retries: dict[Address, object] = {}
        self._handshakes: set[_HandshakeProtocol] = set()
        self._acceptor = None
        if listener is not None:
            if listener in self._listeners_in_use:
                # Accepted sockets cannot be told apart by session before the
                # handshake, so one attempt at a time takes them.  Without the
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
        for target in self.candidates:
            self._try(target)

    def _try(self, target: Address) -> None:
        self._retries.pop(target, None)
        if self._done:
            return
        self.tries[target] += 1
        sock = None
        try:
            sock = reusable_socket(self.local)
            code = sock.connect_ex(target)
        except OSError as e:
            if sock is not None:
                sock.close()
            self._failedTry(target, e.errno or 0)
            return
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._failedTry(target, code)
            return
        pending = _PendingConnect(self, sock, target)
        pending.timer = self.reactor.callLater(self._connect_timeout, self._connectDone, pending, errno.ETIMEDOUT)
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
        pending.sock.close()
        self._failedTry(pending.target, code)

    def _failedTry(self, target: Address, code: int) -> None:
        name = errno.errorcode.get(code, str(code))
        self.errors[name] += 1
        self.log.debug("connect to {target} failed: {error}", target=format_address(target), error=name)
        if self._done or target in self._retries:
            return
        if code not in RETRYABLE:
            self.log.warn("not retrying {target}: {error}", target=format_address(target), error=os.strerror(code))
            return
        if self.reactor.seconds() + self._retry < self._deadline:
            self._retries[target] = self.reactor.callLater(self._retry, self._try, target)

    def _adopt(self, sock: socket.socket, how: str) -> None:
        try:
            if self._done:
                return
            sock.setblocking(False)
            factory = Factory.forProtocol(lambda: _HandshakeProtocol(self, how))
            self.reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)
        finally:
            sock.close()  # the reactor holds its own duplicate

    # -- handshakes

    def _handshakeStarted(self, proto: _HandshakeProtocol) -> None:
        self._handshakes.add(proto)
        proto.timer = self.reactor.callLater(self._handshake_timeout, self._handshakeTimeout, proto)

    def _handshakeTimeout(self, proto: _HandshakeProtocol) -> None:
        proto.timer = None
        self.invalid += 1
        self.log.info("no handshake from {peer} ({how}); closing it", peer=proto.transport.getPeer(), how=proto.how)
        proto.transport.abortConnection()

    def _handshakeProgress(self, proto: _HandshakeProtocol, rest: bytes) -> None:
        hs = proto.handshake
        if hs.state is HandshakeState.FAILED:
            self.invalid += 1
            self.log.info(
                "rejecting {peer} ({how}): {error}", peer=proto.transport.getPeer(), how=proto.how, error=hs.error
            )
            proto.transport.abortConnection()
            return
        if hs.state is HandshakeState.VERIFIED:  # role 0: the first verified connection is the path
            proto.transport.write(hs.accept())
        if hs.state is HandshakeState.DONE:
            self._win(proto, rest)

    def _handshakeLost(self, proto: _HandshakeProtocol, reason: Failure) -> None:
        self._handshakes.discard(proto)
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()

    def _win(self, proto: _HandshakeProtocol, rest: bytes) -> None:
        self._handshakes.discard(proto)
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()
        self._finish()
        conn = TCPPeerConnection(proto, self.session, keepalive_interval=self._keepalive)
        self.log.info(
            "TCP path to {peer_id} via {remote} ({how})",
            peer_id=self.session.peer_id,
            remote=proto.transport.getPeer(),
            how=proto.how,
        )
        self.deferred.callback(conn)
        if rest:
            conn._dataReceived(rest)

    # -- ending

    def _expire(self) -> None:
        self._timeout = None
        if self._done:
            return
        self._finish()
        tried = ", ".join(f"{format_address(t)} x{self.tries[t]}" for t in self.candidates) or "none"
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(self.errors.items())) or "none"
        self.deferred.errback(
            PunchFailed(
                "tcp",
                f"no authenticated TCP connection within {self._window:g} s from local port "
                f"{self.local[1]}: connect tries {tried}; errors {errors}; "
                f"{self.invalid} connections failed the handshake",
            )
        )

    def _finish(self) -> None:
        """Stop everything still running; the winner (if any) was removed first."""
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
            pending.sock.close()
        for proto in list(self._handshakes):
            proto.transport.abortConnection()
        if self._acceptor is not None:
            self.reactor.removeReader(self._acceptor)
            self._listeners_in_use.discard(self._acceptor.sock)


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
) -> Deferred:
    """
    Open an authenticated TCP path to the peer from local address C{local}.

    C{start_delay} seconds from now, connect() to every candidate, retrying
    every C{retry_interval} until C{window} seconds after the start; take
    inbound connections on C{listener} (a listening socket on the same port,
    see C{candidates.reserve_tcp_port}; the caller keeps ownership) meanwhile.
    One attempt at a time accepts on a given listener; a concurrent attempt
    on the same one only connects out (enough unless the peer's SYNs come
    before ours, e.g. on loopback).
    Fires with a L{TCPPeerConnection} or fails with L{PunchFailed};
    cancelling it closes every socket it opened.
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
    ).deferred


@implementer(IPeerConnection)
class TCPPeerConnection(PathConnection):
    """
    An authenticated TCP path: an ordered byte stream.

    The kernel's TCP keepalive (every C{keepalive_interval} seconds, 3 probes)
    holds the NAT mapping and notices a dead path.
    """

    log = Logger()
    protocol = "tcp"
    delivery = "stream"
    secure = False
    max_datagram_size = None

    def __init__(
        self,
        proto: _HandshakeProtocol,
        session: PunchSession,
        keepalive_interval: float | None = 15.0,
        max_pending: int = 1 << 20,
    ) -> None:
        super().__init__(session)
        self._proto = proto
        self._transport = proto.transport
        proto.connection = self
        self.local_address = self._transport.getHost()
        self.remote_address = self._transport.getPeer()
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._max_pending = max_pending
        if keepalive_interval is not None:
            self._setKeepalive(keepalive_interval)

    def __repr__(self) -> str:
        return f"<TCPPeerConnection {self.peer_id!r} {self.remote_address}>"

    def _setKeepalive(self, interval: float) -> None:
        self._transport.setTcpKeepAlive(True)
        handle = getattr(self._transport, "getHandle", lambda: None)()
        secs = max(1, int(interval))
        for opt, value in (("TCP_KEEPIDLE", secs), ("TCP_KEEPINTVL", secs), ("TCP_KEEPCNT", 3)):
            if handle is not None and hasattr(socket, opt):
                handle.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)

    def _take_pending(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        if self._pending_size > self._max_pending:
            self._transport.resumeProducing()
        self._pending_size = 0
        return pending

    def send(self, data: bytes) -> None:
        if self._lost is None:
            self._transport.write(data)

    def close(self) -> None:
        if self._lost is None:
            self._transport.loseConnection()

    def _dataReceived(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.dataReceived(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._max_pending:
            # Nobody reads: stop the peer rather than buffer without bound.
            self._transport.pauseProducing()

    def _connectionLost(self, reason: Failure) -> None:
        self._notify_lost(reason)

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
session handshake below; the first that does is the path, the rest are
closed.  Anything that fails is closed and counted, so a third host that
connects or injects cannot take the path.  TLS 1.3 then runs over the chosen
socket (L{natbypass.secure.tls}), each side proving its identity key against
the other's pin, and only then is the connection handed over: no application
byte ever crosses this path in plaintext.

Session handshake (54-byte frames C{"NBT2" | type | role | nonce[16] | mac[32]},
C{mac = HMAC-SHA256(key, "natbypass-tcp v2" | len(sid) | sid | type | role | nonce | peer nonce)})::

    role 0 -> role 1   CHALLENGE  nonce0, mac over nonce0           at once, on every connection
    role 1 -> role 0   HELLO      nonce1, mac over nonce1 | nonce0  as soon as a valid CHALLENGE arrives
    role 0 -> role 1   ACCEPT     nonce0, mac over nonce0 | nonce1  on the one connection role 0 picks
    role 0 -> role 1   TLS ClientHello, in the same flight as ACCEPT

Each side's nonce is fresh for each connection, and each side only accepts a
HELLO or ACCEPT whose MAC covers its own, so one recorded on one connection is
refused on every other (the replay the first version allowed: its HELLO
covered no nonce of role 0's).  A replayed CHALLENGE gains nothing: the HELLO
it draws is good only on the connection that issued that challenge.  The role byte, fixed per type and covered by the MAC, refuses a
frame reflected back to its sender.  Role 0 only answers HELLO on the one
connection it picks, so when several come up (two candidates, connect and
accept) both sides agree on one without another round trip: role 1 takes the
connection on which ACCEPT arrives.

Cost: role 0 knows the connection is fresh after one round trip (its
challenge out, HELLO back) instead of half of one, so TLS starts half a round
trip later than it would with a HELLO sent blind.  Half a round trip is the
least any challenge of role 0's can cost; ACCEPT then travels with the
ClientHello, so it adds nothing.  From the connected socket to both sides
proven: 1 RTT (session handshake) + 1.5 RTT (TLS 1.3 with client
certificates) + 0.5 RTT (the server's confirmation, see
L{natbypass.secure.tls.CONFIRM}) = 3 RTT for role 0 and 2.5 RTT for role 1.

The session key proves only that the other end was introduced by the
mediator; the mediator knows it too.  The identity keys (TLS) are what
authenticate the peer, so a connection that passed the session handshake but
fails TLS fails the attempt with the reason (see C{docs/security.md}).
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
from twisted.internet.interfaces import IReadDescriptor, ITCPTransport, ITransport, IWriteDescriptor
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.address import format_address
from natbypass.identity import Fingerprint
from natbypass.interfaces import IPeerConnection
from natbypass.net import reusable_socket
from natbypass.punch.connection import PathConnection
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.secure import ChannelSecurity
from natbypass.secure.tls import PeerRefusedUs, SecureTLS, start_tls
from natbypass.trust import PeerRejected

Address = tuple[str, int]

FRAME = struct.Struct("!4sBB16s32s")
TCP_MAGIC = b"NBT2"
CHALLENGE = 1
HELLO = 2
ACCEPT = 3
#: The role that sends each frame type (covered by the MAC).
SENDER = {CHALLENGE: 0, HELLO: 1, ACCEPT: 0}
LABEL = b"natbypass-tcp v2"
NONCE_SIZE = 16

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
    """One decoded handshake frame."""

    type: int
    role: int
    nonce: bytes
    mac: bytes


def _mac(session: PunchSession, type_: int, nonce: bytes, peer_nonce: bytes = b"") -> bytes:
    sid = session.sid
    msg = LABEL + bytes([len(sid)]) + sid + bytes([type_, SENDER[type_]]) + nonce + peer_nonce
    return hmac.new(session.key, msg, hashlib.sha256).digest()


def _frame(session: PunchSession, type_: int, nonce: bytes, peer_nonce: bytes = b"") -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
    return FRAME.pack(TCP_MAGIC, type_, SENDER[type_], nonce, _mac(session, type_, nonce, peer_nonce))


def challenge_frame(session: PunchSession, nonce0: bytes) -> bytes:
    """The frame role 0 sends on every connection as soon as it is up."""
    return _frame(session, CHALLENGE, nonce0)


def hello_frame(session: PunchSession, nonce1: bytes, nonce0: bytes) -> bytes:
    """Role 1's answer to the CHALLENGE carrying C{nonce0}."""
    return _frame(session, HELLO, nonce1, nonce0)


def accept_frame(session: PunchSession, nonce0: bytes, nonce1: bytes) -> bytes:
    """The frame role 0 sends on the one connection it picks, answering the HELLO carrying C{nonce1}."""
    return _frame(session, ACCEPT, nonce0, nonce1)


def parse_frame(data: bytes) -> AuthFrame:
    """Decode exactly one frame; raise L{TCPAuthError} for anything else."""
    if len(data) != FRAME.size:
        raise TCPAuthError(f"a handshake frame is {FRAME.size} bytes, not {len(data)}")
    magic, type_, role, nonce, mac = FRAME.unpack(data)
    if magic != TCP_MAGIC:
        raise TCPAuthError(f"bad magic {magic!r}: not a NATbypass peer (or a version without TLS)")
    if type_ not in SENDER or role != SENDER[type_]:
        raise TCPAuthError(f"bad frame type {type_} / role {role}")
    return AuthFrame(type_, role, nonce, mac)


class HandshakeState(enum.StrEnum):
    """Where a L{TCPHandshake} is."""

    #: Nothing verified yet (role 0 has sent its CHALLENGE; role 1 waits for it).
    WAITING = "waiting"
    #: Role 1: a valid CHALLENGE arrived and was answered with HELLO; waiting for ACCEPT.
    ANSWERED = "answered"
    #: Role 0: a HELLO over our nonce arrived; L{TCPHandshake.accept} picks this connection.
    VERIFIED = "verified"
    #: This connection is the path; TLS comes next.
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class HandshakeOutput:
    """What one L{TCPHandshake.dataReceived} produced."""

    #: Frames to write to the connection now.
    send: bytes = b""
    #: Bytes that followed the handshake (the start of TLS), once it is C{DONE}.
    rest: bytes = b""


class TCPHandshake:
    """
    The session handshake of one connection, pure: feed it bytes, get bytes
    to send and a L{HandshakeState}.

    Role 0: C{WAITING} -> C{VERIFIED} (a HELLO over our nonce arrived; we may
    L{accept}) -> C{DONE}.  Role 1: C{WAITING} -> C{ANSWERED} (HELLO sent)
    -> C{DONE} (ACCEPT over our nonce arrived).  Either may end C{FAILED},
    with L{error} saying why.

    @param nonce: this connection's fresh random nonce (16 bytes); never
        reuse one across connections.
    """

    def __init__(self, session: PunchSession, nonce: bytes) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes, not {len(nonce)}")
        self._session = session
        self._nonce = nonce
        self._buffer = b""
        self._peer_nonce = b""
        self.state = HandshakeState.WAITING
        self.error = ""

    def start(self) -> bytes:
        """What to send as soon as the connection is up: role 0's CHALLENGE."""
        return challenge_frame(self._session, self._nonce) if self._session.role == 0 else b""

    def dataReceived(self, data: bytes) -> HandshakeOutput:
        """Consume handshake bytes (any slicing); see L{HandshakeOutput}."""
        if self.state not in (HandshakeState.WAITING, HandshakeState.ANSWERED):
            raise RuntimeError(f"handshake is {self.state}")
        self._buffer += data
        send = b""
        while self.state in (HandshakeState.WAITING, HandshakeState.ANSWERED) and len(self._buffer) >= FRAME.size:
            raw, self._buffer = self._buffer[: FRAME.size], self._buffer[FRAME.size :]
            try:
                send += self._frameReceived(parse_frame(raw))
            except TCPAuthError as e:
                self.state, self.error, self._buffer = HandshakeState.FAILED, str(e), b""
                return HandshakeOutput()
        if self.state is HandshakeState.VERIFIED and self._buffer:
            # Role 1 sends nothing after HELLO until it has our ACCEPT.
            self.state, self.error, self._buffer = HandshakeState.FAILED, "data after HELLO, before ACCEPT", b""
            return HandshakeOutput()
        rest = b""
        if self.state is HandshakeState.DONE:
            rest, self._buffer = self._buffer, b""
        return HandshakeOutput(send, rest)

    def _frameReceived(self, frame: AuthFrame) -> bytes:
        s = self._session
        if frame.role != s.peer_role:
            raise TCPAuthError("the frame carries our own role: a reflection")
        expected_type = {
            (0, HandshakeState.WAITING): HELLO,
            (1, HandshakeState.WAITING): CHALLENGE,
            (1, HandshakeState.ANSWERED): ACCEPT,
        }[s.role, self.state]
        if frame.type != expected_type:
            raise TCPAuthError(f"unexpected frame type {frame.type} (expected {expected_type})")
        if frame.type == ACCEPT and not hmac.compare_digest(frame.nonce, self._peer_nonce):
            raise TCPAuthError("ACCEPT names another CHALLENGE than this connection's")
        mine = b"" if frame.type == CHALLENGE else self._nonce
        if not hmac.compare_digest(_mac(s, frame.type, frame.nonce, mine), frame.mac):
            what = "" if frame.type == CHALLENGE else " over our nonce (a replay, or another session key)"
            raise TCPAuthError(f"MAC does not verify with the session key{what}")
        if frame.type == CHALLENGE:
            self._peer_nonce = frame.nonce
            self.state = HandshakeState.ANSWERED
            return hello_frame(s, self._nonce, frame.nonce)
        if frame.type == HELLO:
            self._peer_nonce = frame.nonce
            self.state = HandshakeState.VERIFIED
        else:
            self.state = HandshakeState.DONE
        return b""

    def accept(self) -> bytes:
        """Role 0: pick this connection; returns the ACCEPT frame to send."""
        if self.state is not HandshakeState.VERIFIED:
            raise RuntimeError(f"cannot accept a handshake that is {self.state}")
        self.state = HandshakeState.DONE
        return accept_frame(self._session, self._nonce, self._peer_nonce)


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


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


class _HandshakeProtocol(Protocol):
    """
    The protocol of an adopted socket: runs the session handshake, then (on
    the chosen connection) hands every byte to TLS.
    """

    def __init__(self, attempt: TCPPunchAttempt, how: str) -> None:
        self.attempt = attempt
        self.how = how
        self.handshake = TCPHandshake(attempt.session, attempt.nonce_source())
        #: TLS over this connection, once the handshake chose it.
        self.tls: SecureTLS | None = None
        self.timer = None
        #: When the socket was connected (the attempt's clock).
        self.started = 0.0

    def connectionMade(self) -> None:
        self.started = self.attempt.reactor.seconds()
        self.attempt._handshakeStarted(self)
        first = self.handshake.start()
        if first:
            self.transport.write(first)

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.protocol.dataReceived(data)
            return
        if self.handshake.state not in (HandshakeState.WAITING, HandshakeState.ANSWERED):
            return  # failed and being closed
        out = self.handshake.dataReceived(data)
        if out.send:
            self.transport.write(out.send)
        self.attempt._handshakeProgress(self, out.rest)

    def connectionLost(self, reason: Failure) -> None:
        if self.tls is not None:
            self.tls.protocol.connectionLost(reason)
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
        nonce_source: Callable[[], bytes] = lambda: os.urandom(NONCE_SIZE),
        *,
        security: ChannelSecurity,
    ) -> None:
        self.reactor = reactor
        self.session = session
        self.security = security
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
        #: The connection the session handshake chose, while TLS runs on it.
        self._chosen: _HandshakeProtocol | None = None
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
            self._choose(proto, rest)

    def _handshakeLost(self, proto: _HandshakeProtocol, reason: Failure) -> None:
        self._handshakes.discard(proto)
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()

    # -- TLS on the chosen connection

    def _choose(self, proto: _HandshakeProtocol, rest: bytes) -> None:
        """The session handshake chose C{proto}: close the others, start TLS on it."""
        self._handshakes.discard(proto)
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()
        self._stopTrying()
        self._chosen = proto
        self.log.debug(
            "session handshake chose {peer} ({how}); starting TLS", peer=proto.transport.getPeer(), how=proto.how
        )
        conn = TCPPeerConnection(self.session, proto.transport, keepalive_interval=self._keepalive)
        proto.timer = self.reactor.callLater(self._handshake_timeout, self._tlsTimeout, proto)
        sec = self.security
        proto.tls = start_tls(proto.transport, conn._app, sec.identity, sec.verify, self.session.role, self.reactor)
        proto.tls.handshake.addCallbacks(
            self._secured, self._tlsFailed, callbackArgs=(proto, conn), errbackArgs=(proto,)
        )
        if rest:
            proto.tls.protocol.dataReceived(rest)

    def _secured(self, fingerprint: Fingerprint, proto: _HandshakeProtocol, conn: TCPPeerConnection) -> None:
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()
        self._chosen = None
        if self.deferred.called:  # cancelled meanwhile
            proto.transport.abortConnection()
            return
        assert proto.tls is not None
        conn._secured(proto.tls, (self.reactor.seconds() - proto.started) * 1000)
        self.log.info(
            "TCP path to {peer_id} via {remote} ({how}): {cipher}, peer key {fingerprint}, {ms:.1f} ms",
            peer_id=self.session.peer_id,
            remote=proto.transport.getPeer(),
            how=proto.how,
            cipher=conn.cipher,
            fingerprint=str(fingerprint),
            ms=conn.handshake_ms,
        )
        self.deferred.callback(conn)

    def _tlsFailed(self, failure: Failure, proto: _HandshakeProtocol) -> None:
        if proto.timer is not None and proto.timer.active():
            proto.timer.cancel()
        self._chosen = None
        proto.transport.abortConnection()
        if self.deferred.called:
            return
        peer = _describe(proto.transport.getPeer())
        if failure.check(PeerRejected):
            reason = f"{peer} passed the session handshake, but its identity key was refused: {failure.value}"
        elif failure.check(PeerRefusedUs):
            reason = f"{peer} passed the session handshake, but {failure.value}"
        else:
            reason = f"TLS with {peer} failed after the session handshake: {failure.getErrorMessage()}"
        self.log.warn("TCP path to {peer_id} refused: {reason}", peer_id=self.session.peer_id, reason=reason)
        self.deferred.errback(PunchFailed("tcp", reason))

    def _tlsTimeout(self, proto: _HandshakeProtocol) -> None:
        proto.timer = None
        self._chosen = None
        if not self.deferred.called:
            self.deferred.errback(
                PunchFailed(
                    "tcp",
                    f"{_describe(proto.transport.getPeer())} passed the session handshake, "
                    f"but TLS did not complete within {self._handshake_timeout:g} s",
                )
            )
        proto.transport.abortConnection()

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
            pending.sock.close()
        for proto in list(self._handshakes):
            proto.transport.abortConnection()
        if self._acceptor is not None:
            self.reactor.removeReader(self._acceptor)
            self._listeners_in_use.discard(self._acceptor.sock)

    def _finish(self) -> None:
        """Stop everything still running, including TLS on a chosen connection (cancel, expiry)."""
        self._stopTrying()
        proto, self._chosen = self._chosen, None
        if proto is not None:
            if proto.timer is not None and proto.timer.active():
                proto.timer.cancel()
            proto.transport.abortConnection()


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

    The first connection to pass the session handshake is the path; TLS 1.3
    then runs over it (role 0 is the client), proving C{security.identity}
    and checking the peer's key with C{security.verify}, within
    C{handshake_timeout} seconds.

    Fires with a L{TCPPeerConnection} once both sides are authenticated, or
    fails with L{PunchFailed} (a refused key: its reason is the
    L{natbypass.trust.PeerRejected} message, or says the peer refused ours);
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
        security=security,
    ).deferred


class _StreamApp(Protocol):
    """The application protocol TLS connects once both sides are proven: feeds the connection."""

    def __init__(self, connection: TCPPeerConnection) -> None:
        self._connection = connection

    def dataReceived(self, data: bytes) -> None:
        self._connection._dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connection._connectionLost(reason)


@implementer(IPeerConnection)
class TCPPeerConnection(PathConnection):
    """
    A TCP path secured by TLS 1.3: an ordered byte stream, encrypted and
    authenticated end to end by both sides' identity keys.

    Made by L{punch_tcp} when TLS starts and handed over only once both
    sides are proven; C{send} writes only into TLS.  The kernel's TCP
    keepalive (every C{keepalive_interval} seconds, 3 probes) holds the NAT
    mapping and notices a dead path.

    @ivar peer_fingerprint: the key the peer proved it holds.
    @ivar cipher: e.g. C{"TLSv1.3 TLS_AES_256_GCM_SHA384"}.
    @ivar handshake_ms: from the connected socket to both sides proven
        (session handshake and TLS), on the attempt's clock.
    """

    log = Logger()
    protocol = "tcp"
    delivery = "stream"
    secure = True
    max_datagram_size = None

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
        #: The TLS transport, once secured; the only thing C{send} writes to.
        self._tls: ITransport | None = None
        self._app = _StreamApp(self)
        self.local_address = transport.getHost()
        self.remote_address = transport.getPeer()
        self.peer_fingerprint: Fingerprint | None = None
        self.cipher = ""
        self.handshake_ms: float | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._max_pending = max_pending
        if keepalive_interval is not None:
            self._setKeepalive(keepalive_interval)

    def __repr__(self) -> str:
        return f"<TCPPeerConnection {self.peer_id!r} {self.remote_address} {self.peer_fingerprint}>"

    def _secured(self, tls: SecureTLS, handshake_ms: float) -> None:
        """TLS proved both sides: from now on the connection carries data."""
        self._tls = tls.protocol
        self.peer_fingerprint = tls.peer_fingerprint
        self.cipher = tls.cipher
        self.handshake_ms = handshake_ms

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
        if self._tls is None:
            raise RuntimeError("the TCP path is not secured yet; nothing may be sent")
        if self._lost is None:
            self._tls.write(data)

    def close(self) -> None:
        if self._lost is not None:
            return
        if self._tls is not None:
            self._tls.loseConnection()  # TLS close_notify, then the socket
        else:
            self._raw.abortConnection()

    def _dataReceived(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.dataReceived(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self._max_pending:
            # Nobody reads: stop the peer rather than buffer without bound.
            self._raw.pauseProducing()

    def _connectionLost(self, reason: Failure) -> None:
        self._notify_lost(reason)

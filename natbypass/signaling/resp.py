"""
A small Redis client for the mediator cluster: the RESP2 codec (pure) and
one Twisted protocol that pipelines commands and receives pub/sub messages.

Why our own and not C{txredisapi}: txredisapi 1.6 runs on Python 3.11 and
Twisted 26, but it connects through the global reactor (no injected clock,
no C{MemoryReactor} in tests), its C{rediss} uses an old-style context
factory that checks no certificate, and its reconnection is its own rather
than C{ClientService}.  The mediator needs six commands (EVAL, PUBLISH,
SUBSCRIBE, PING, AUTH, SELECT); RESP2 is about a hundred lines, and with
endpoints and C{ClientService} it behaves like every other connection of
the project.  See docs/cluster.md for the measurement.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

#: A decoded reply: bulk strings as bytes, integers, None (nil), arrays, or a L{RedisError}.
Reply = Any

#: Longest bulk string and array accepted from the server (Redis' own proto-max-bulk-len is 512 MB).
MAX_BULK = 64 * 1024 * 1024
MAX_ARRAY = 1 << 20
#: Deepest nesting of arrays accepted.
MAX_DEPTH = 8


class RedisError(Exception):
    """An error reply (C{-ERR ...}) from Redis."""


class ProtocolError(Exception):
    """The server sent something that is not RESP2; the connection cannot be trusted any more."""


class ClusterUnavailable(Exception):
    """Redis is not reachable now: what needs it is refused until it returns."""


def encode_command(*args: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode("utf-8")
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def encode_reply(value: Reply) -> bytes:
    """A reply as a server would send it (for tests and fakes): the inverse of L{RespParser}."""
    if isinstance(value, RedisError):
        return b"-" + str(value).encode("utf-8") + b"\r\n"
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bool):
        raise TypeError("RESP2 has no booleans")
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, (list, tuple)):
        return b"*%d\r\n" % len(value) + b"".join(encode_reply(v) for v in value)
    raise TypeError(f"cannot encode {type(value).__name__}")


class _Incomplete(Exception):
    """More bytes are needed."""


class RespParser:
    """
    Incremental RESP2 decoder: C{feed} bytes, get the complete replies.
    Strict: anything else raises L{ProtocolError}.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        out: list[Reply] = []
        while self._buf:
            try:
                value, pos = self._parse(0, 0)
            except _Incomplete:
                break
            out.append(value)
            self._buf = self._buf[pos:]
        return out

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            if len(self._buf) - pos > 64 * 1024:
                raise ProtocolError("a RESP line longer than 64 KiB")
            raise _Incomplete
        return self._buf[pos:end], end + 2

    @staticmethod
    def _int(text: bytes) -> int:
        if not text or not (text.isdigit() or (text[:1] == b"-" and text[1:].isdigit())):
            raise ProtocolError(f"not a RESP integer: {text[:40]!r}")
        return int(text)

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        if pos >= len(self._buf):
            raise _Incomplete
        kind = self._buf[pos : pos + 1]
        line, pos = self._line(pos + 1)
        if kind == b"+":
            return line, pos
        if kind == b"-":
            return RedisError(line.decode("utf-8", "replace")), pos
        if kind == b":":
            return self._int(line), pos
        if kind == b"$":
            n = self._int(line)
            if n == -1:
                return None, pos
            if not 0 <= n <= MAX_BULK:
                raise ProtocolError(f"bulk length {n} out of range")
            if len(self._buf) < pos + n + 2:
                raise _Incomplete
            if self._buf[pos + n : pos + n + 2] != b"\r\n":
                raise ProtocolError("bulk string not ended by CRLF")
            return self._buf[pos : pos + n], pos + n + 2
        if kind == b"*":
            n = self._int(line)
            if n == -1:
                return None, pos
            if not 0 <= n <= MAX_ARRAY or depth >= MAX_DEPTH:
                raise ProtocolError(f"array of {n} out of range or nested too deep")
            items = []
            for _ in range(n):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise ProtocolError(f"unknown RESP type byte {kind!r}")


class RedisURL:
    """
    C{redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]}, C{rediss://} (TLS) or
    C{unix:///PATH[?db=N]}; the password may instead come from a file.
    """

    def __init__(self, text: str) -> None:
        try:
            u = urlsplit(text)
            port = u.port
        except ValueError as e:
            raise ValueError(f"{text!r} is not a Redis URL: {e}") from None
        if u.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{text!r}: use redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///PATH")
        self.tls = u.scheme == "rediss"
        self.username = unquote(u.username) if u.username else None
        self.password = unquote(u.password) if u.password is not None else None
        if u.scheme == "unix":
            if not u.path:
                raise ValueError(f"{text!r}: unix:///PATH names the socket")
            self.host, self.port, self.path = None, None, u.path
            db = dict(p.split("=", 1) for p in u.query.split("&") if "=" in p).get("db", "0")
        else:
            if not u.hostname:
                raise ValueError(f"{text!r}: no host")
            self.host, self.port, self.path = u.hostname, port or 6379, None
            db = u.path.strip("/") or "0"
        if not db.isdigit() or int(db) > 1 << 16:
            raise ValueError(f"{text!r}: the database is a number, e.g. redis://HOST:6379/0")
        self.db = int(db)

    def endpoint_string(self) -> str:
        """For logs: where it connects (never the password)."""
        if self.path is not None:
            return f"unix:{self.path}"
        return f"{'tls' if self.tls else 'tcp'}:{self.host}:{self.port}"


def setup_failure(reason: Failure | None) -> tuple[str, str]:
    """
    Why a connection ended before it was usable, as (kind, text for a
    person): C{tls} (the handshake failed: an unknown CA, a certificate that
    does not name the host, a server that does not speak TLS) or C{closed}.
    """
    if reason is not None:
        try:
            from OpenSSL.SSL import Error as TLSError
        except ImportError:  # pragma: no cover - pyOpenSSL comes with Twisted's TLS
            TLSError = None
        if TLSError is not None and reason.check(TLSError):
            details = [e[-1] for e in reason.value.args[0] if isinstance(e, tuple) and e] if reason.value.args else []
            what = ", ".join(str(d) for d in details if d) or str(reason.value)
            return "tls", f"the TLS handshake failed ({what})"
        from service_identity import CertificateError, VerificationError

        if reason.check(VerificationError, CertificateError):
            return "tls", f"the TLS handshake failed (the certificate does not name the host: {reason.value})"
    text = "" if reason is None else reason.getErrorMessage()
    return "closed", f"the connection closed before Redis accepted it ({text})"


class RespProtocol(Protocol):
    """
    One Redis connection: commands are pipelined (each C{execute} returns a
    Deferred of its reply, replies come in order); in subscriber mode pushed
    messages go to C{on_message(channel, data)}.  C{on_ready} is called once
    AUTH and SELECT went through; C{on_failed(kind, text)} once when the
    connection could not be set up (C{auth}: Redis refused AUTH or SELECT;
    C{tls}, C{closed}: see L{setup_failure}) or its TLS failed later.
    """

    log = Logger()

    def __init__(
        self,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
        on_ready: Callable[[RespProtocol], None] | None = None,
        on_message: Callable[[bytes, bytes], None] | None = None,
        on_lost: Callable[[RespProtocol], None] | None = None,
        on_failed: Callable[[str, str], None] | None = None,
    ) -> None:
        self._parser = RespParser()
        self._pending: deque[Deferred[Reply]] = deque()
        self.password, self.username, self.db = password, username, db
        self.on_ready, self.on_message, self.on_lost = on_ready, on_message, on_lost
        self.on_failed = on_failed
        self.ready = False
        self._failure_reported = False

    def connectionMade(self) -> None:
        setup: list[Deferred[Reply]] = []
        if self.password is not None:
            args = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            setup.append(self.execute(*args))
        if self.db:
            setup.append(self.execute("SELECT", self.db))
        if not setup:
            self._ready(None)
            return
        setup[-1].addCallbacks(self._ready, self._setup_failed)
        for d in setup[:-1]:
            d.addErrback(lambda f: None)  # the last one reports; a refused AUTH fails SELECT too

    def _ready(self, _: Any) -> None:
        self.ready = True
        if self.on_ready is not None:
            self.on_ready(self)

    def _setup_failed(self, f: Failure) -> None:
        if not f.check(RedisError):  # lost during set-up: connectionLost says why
            return
        self._report("auth", f"Redis refused the connection's set-up (AUTH/SELECT): {f.value}")
        self.transport.loseConnection()

    def _report(self, kind: str, text: str) -> None:
        if self._failure_reported:
            return
        self._failure_reported = True
        if self.on_failed is not None:
            self.on_failed(kind, text)
        else:
            self.log.error("Redis connection: {text}", text=text)

    def execute(self, *args: bytes | str | int) -> Deferred[Reply]:
        """Send one command; the Deferred fires with its reply or fails with L{RedisError}."""
        d: Deferred[Reply] = Deferred()
        self._pending.append(d)
        self.transport.write(encode_command(*args))
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except ProtocolError as e:
            self.log.error("Redis sent something that is not RESP2 ({err}); reconnecting", err=e)
            self.transport.abortConnection()
            return
        for r in replies:
            if (
                self.on_message is not None
                and isinstance(r, list)
                and len(r) == 3
                and r[0] == b"message"
                and isinstance(r[2], bytes)
            ):
                self.on_message(r[1], r[2])
            elif self._pending:
                d = self._pending.popleft()
                if isinstance(r, RedisError):
                    d.errback(r)
                else:
                    d.callback(r)

    def connectionLost(self, reason: Failure | None = None) -> None:
        kind, text = setup_failure(reason)
        if not self.ready or kind == "tls":
            self._report(kind, text)
        self.ready = False
        pending, self._pending = self._pending, deque()
        for d in pending:
            d.errback(ClusterUnavailable("the connection to Redis was lost"))
        if self.on_lost is not None:
            self.on_lost(self)


def flatten(args: Sequence[Any]) -> list[bytes | str | int]:
    """Command arguments with nested sequences spread out (EVAL's keys and values)."""
    out: list[bytes | str | int] = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out

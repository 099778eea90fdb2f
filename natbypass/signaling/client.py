"""
The peer side of signalling.

C{SignalingClientProtocol} speaks the line protocol over one connection: the
handshake (greeting, hello, register), request/reply matching by C{rid},
answering the mediator's pings, and handing offers to its owner.
C{SignalingClient} is the long-lived service: a C{ClientService} reconnects with
backoff and every new connection re-registers, proving possession of the
peer's identity key by signing the greeting's nonce (the same key takes over a
stale session of ours), and callers get Deferreds and events.  See
docs/protocol.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import __version__
from .._deprecate import deprecated_alias
from ..identity import Identity
from ..logsafe import escape
from . import wire
from .interfaces import ISignalingClient
from .server import _no_delay
from .wire import (
    Accept,
    Cancel,
    Candidate,
    Connect,
    Description,
    Error,
    Greeting,
    Hello,
    Introduce,
    Message,
    Offer,
    Ok,
    Ping,
    Pong,
    Publish,
    Register,
    Registered,
    Reject,
    Report,
    Repunch,
    RepunchNotice,
    Revoke,
    Session,
    SessionReply,
    WireError,
)

AGENT = f"natbypass/{__version__}"
#: How long a session we got before its target approved may still be revoked (the mediator's offer
#: timeout, 30 s by default, and a margin); after that its watch is forgotten.
REVOKE_WATCH = 45.0
#: Seconds between republications of an unchanged publication (the mediator uses one for 300 s).
PUBLISH_REFRESH = 120.0


class SignalingError(Exception):
    """The mediator answered a request with an error (or the link broke)."""

    def __init__(self, error: str, reason: str, code: int | None = None) -> None:
        super().__init__(f"{error}: {reason}")
        self.error = error
        self.reason = reason
        self.code = code if code is not None else wire.ERROR_CODES.get(error, 0)


class OfferRejected(SignalingError):
    """The peer said no (or the two sides' protocol wishes do not meet)."""


class UnknownPeer(SignalingError):
    """No peer of that id is registered at the mediator."""


class OfferTimeout(SignalingError):
    """The peer did not answer the offer in time."""


class PeerGone(SignalingError):
    """The peer disconnected before answering."""


class Unauthorized(SignalingError):
    """The mediator wants a (different) token."""


class DuplicateId(SignalingError):
    """Another live session holds our id and we may not replace it."""


class IdBound(SignalingError):
    """
    The mediator binds our id to another identity key (its owner is
    connected, or left less than the hold time ago): use another id or the
    owner's key.  The reason says how long the id is held.
    """


class StaleProof(SignalingError):
    """The mediator did not take a timed registration proof (clocks apart, or busy): sign its nonce instead."""


class BadProof(SignalingError):
    """The mediator could not verify our registration signature."""


class Disconnected(SignalingError):
    """The connection to the mediator broke before the reply came."""

    def __init__(self, reason: str = "connection to the mediator lost") -> None:
        super().__init__("disconnected", reason, 0)


class MediatorShuttingDown(SignalingError):
    """
    The mediator is stopping (C{503 shutting-down}, rid null): requests
    pending on that connection fail with this at once, and the client
    reconnects straight away (to another mediator where the endpoint leads
    to several), without counting it as a failure.
    """


class Decline(Exception):
    """Raise from an offer handler to reject with a reason."""


_ERRORS: dict[str, type[SignalingError]] = {
    "rejected": OfferRejected,
    "unknown-peer": UnknownPeer,
    "timeout": OfferTimeout,
    "gone": PeerGone,
    "unauthorized": Unauthorized,
    "duplicate-id": DuplicateId,
    "id-bound": IdBound,
    "bad-proof": BadProof,
    "stale-proof": StaleProof,
    "shutting-down": MediatorShuttingDown,
}


def error_from_reply(e: Error) -> SignalingError:
    """
    The L{SignalingError} subclass for an C{error} reply (the base class for
    an error name we do not know), so callers can catch the failures they
    handle.
    """
    return _ERRORS.get(e.error, SignalingError)(e.error, e.reason, e.code)


class IncomingOffer:
    """
    An offer delivered to us; C{cancelled} fires if the mediator withdraws
    it.  An introduction (we published) comes with its C{session}: the
    initiator has it already, and our answer decides whether we punch.
    """

    def __init__(self, offer: Offer | Introduce) -> None:
        self.id = offer.offer
        self.session: Session | None = None
        if isinstance(offer, Introduce):
            self.session = offer.session
            self.peer = offer.session.peer
            self.description: Description = offer.session.description
        else:
            self.peer = offer.peer
            self.description = offer.description
        self.expires_in_ms = offer.expires_in_ms
        self.cancelled: Deferred[str] = Deferred()

    def __repr__(self) -> str:
        return f"<IncomingOffer {self.id} from {self.peer}>"


class SignalingClientProtocol(LineReceiver):
    """
    One connection to the mediator.  It tells its owner when it is
    registered (C{_ready}) or refused (C{_refused}, then it closes, and the
    owner's ClientService reconnects after a growing delay).
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(self, owner: SignalingClient) -> None:
        self.owner = owner
        self.clock = owner.clock
        self.MAX_LENGTH = owner.max_line
        self._pending: dict[int, Deferred[Message]] = {}
        self._offers: dict[str, IncomingOffer] = {}
        self._watchdog: Any = None
        #: The liveness ping is out, unanswered.
        self._pinged = False
        self._handshaking = True
        #: Requests failed with the handshake's refusal; their late replies are dropped quietly.
        self._abandoned: set[int] = set()
        #: This connection's greeting nonce, once the greeting came.
        self._nonce: bytes | None = None
        #: While a timed Register is unanswered: the requests sent behind it, to resend if it is refused.
        self._behind: dict[int, Message] | None = None
        #: Requests resent after a refused timed Register: their first (error) reply is dropped.
        self._resent: set[int] = set()
        #: A refused timed Register waits for the greeting's nonce to register again.
        self._nonce_wanted = False
        self._resend: list[Message] = []

    # -- connection events

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        self._watchdog = self.clock.callLater(self.owner.request_timeout, self._handshake_timeout)
        self._handshake()

    def _handshake_timeout(self) -> None:
        self._watchdog = None
        self._fail_ready(SignalingError("timeout", "the mediator did not complete the handshake in time"))

    def _alive(self) -> None:
        """
        Something arrived: push back the watchdog.  After C{ping_interval}
        seconds of silence we ping the mediator; if nothing arrives within
        C{pong_timeout} more the connection is taken for dead (a NAT that
        lost its mapping drops everything silently: no FIN, no RST) and
        aborted, so the client service reconnects.  Without C{ping_interval},
        C{idle_timeout} seconds of silence (the mediator pings every 30 s).
        """
        if self._handshaking:
            return
        self._pinged = False
        owner = self.owner
        delay = owner.ping_interval or owner.idle_timeout
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(delay)
        else:
            self._watchdog = self.clock.callLater(delay, self._quiet)

    def _quiet(self) -> None:
        self._watchdog = None
        owner = self.owner
        if owner.ping_interval and not self._pinged:
            self._pinged = True
            self.send(Ping(owner._rid()))  # its pong, or any other line, proves the path (see _alive)
            self._watchdog = self.clock.callLater(owner.pong_timeout, self._quiet)
            return
        silent = owner.ping_interval + owner.pong_timeout if owner.ping_interval else owner.idle_timeout
        self.log.warn(
            "nothing heard from the mediator for {t:g} s (a ping unanswered); the connection is dead, reconnecting",
            t=silent,
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._fail_ready(Disconnected("connection to the mediator closed during the handshake"))
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(Disconnected())
        offers, self._offers = self._offers, {}
        for o in offers.values():
            o.cancelled.callback("connection to the mediator lost")
        self.owner._lost(self)

    def _fail_ready(self, err: Any) -> None:
        if not self._handshaking:
            return
        self._handshaking = False
        if isinstance(err, Failure):
            err = err.value
        # Requests pipelined behind the registration fail with its refusal (the mediator answers them 412).
        pending, self._pending = self._pending, {}
        self._abandoned.update(pending)
        for d in pending.values():
            d.errback(err)
        self.owner._refused(self, err)
        if self.transport is not None and self.connected:
            self.transport.loseConnection()

    # -- lines

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            msg = wire.decode_from_server(line)
        except WireError as e:
            self.log.warn("dropping a bad line from the mediator: {reason}", reason=escape(e.reason))
            return
        self._alive()
        if isinstance(msg, Greeting):
            self._greeted(msg)
        elif isinstance(msg, (Ok, Registered, SessionReply, Pong)):
            d = self._pending.pop(msg.rid, None)
            if d is not None:
                d.callback(msg)
            elif msg.rid not in self._abandoned:
                self.owner._orphan(self, msg)
        elif isinstance(msg, Error):
            if msg.rid in self._resent:
                # A request that was behind a refused timed Register: resent, its answer comes later.
                self._resent.discard(msg.rid)
                return
            d = self._pending.pop(msg.rid, None) if msg.rid is not None else None
            if d is not None:
                d.errback(error_from_reply(msg))
            elif msg.rid is not None and msg.rid in self._abandoned:
                pass
            elif msg.error == "shutting-down":
                self._going_away(msg)
            else:
                self.log.warn(
                    "mediator says {code} {error}: {reason}", code=msg.code, error=msg.error, reason=escape(msg.reason)
                )
                if msg.error == "duplicate-id":
                    # A newer registration took our id over: do not take it back on reconnect.
                    self.owner._replaced = True
        elif isinstance(msg, Ping):
            self.send(Pong(msg.rid))
        elif isinstance(msg, (Offer, Introduce)):
            offer = IncomingOffer(msg)
            self._offers[offer.id] = offer
            self.owner._offered(self, offer)
        elif isinstance(msg, Revoke):
            self.owner._revoked(msg)
        elif isinstance(msg, RepunchNotice):
            handler = self.owner._repunch_handler
            if handler is not None:
                handler(msg)
        elif isinstance(msg, Cancel):
            offer = self._offers.pop(msg.offer, None)
            if offer is not None:
                offer.cancelled.callback(msg.reason)

    def _going_away(self, msg: Error) -> None:
        """The mediator is stopping: fail what waits on it now, and hang up so the client reconnects."""
        self.log.info("the mediator is shutting down ({reason}); reconnecting", reason=escape(msg.reason))
        err = error_from_reply(msg)
        self._fail_ready(err)
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(err)
        if self.transport is not None and self.connected:
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.log.warn("the mediator sent a line over {n} bytes; reconnecting", n=self.MAX_LENGTH)
        self.transport.loseConnection()

    def send(self, msg: Message) -> None:
        self.sendLine(wire.encode(msg))

    def request(self, msg: Message) -> Deferred[Message]:
        """Send a request and return a Deferred of its reply (errback on an error reply)."""
        rid = msg.rid  # type: ignore[attr-defined]

        def cancel(d: Deferred[Message]) -> None:
            self._pending.pop(rid, None)

        d: Deferred[Message] = Deferred(cancel)
        self._pending[rid] = d
        if self._behind is not None:
            self._behind[rid] = msg
        self.send(msg)
        return d

    def forget_offer(self, offer_id: str) -> IncomingOffer | None:
        return self._offers.pop(offer_id, None)

    # -- handshake

    def _handshake(self) -> None:
        """
        Send Hello at once, without waiting for the greeting, and Register
        with a timed proof (our clock and a fresh random nonce, signed), so
        registration costs no round trip of its own.  If the mediator does not
        take it (clocks too far apart), Register again signing the greeting's
        nonce.  Requests made meanwhile pipeline right behind Register: the
        mediator handles lines in order, so they wait for no further round
        trip (and are resent if the timed Register was refused).  Any other
        error reply to Hello or Register fails the handshake.
        """
        hello = self.request(Hello(self.owner._rid(), max(wire.VERSIONS), AGENT))
        hello.addErrback(self._handshake_failed)
        if not self.owner.timed_proofs:
            return
        owner, identity = self.owner, self.owner.identity
        time_ms, cnonce = int(self.clock.seconds() * 1000), os.urandom(wire.CNONCE_BYTES)
        register = self.request(
            Register(
                owner._rid(),
                owner.peer_id,
                identity.public_bytes(),
                identity.sign_registration(wire.timed_nonce(time_ms, cnonce), owner.peer_id),
                owner.token,
                owner.take_over or not owner._replaced,
                time_ms,
                cnonce,
            )
        )
        self._behind = {}
        register.addCallbacks(self._registered, self._timed_refused)
        owner._handshake_sent(self)

    def _timed_refused(self, f: Failure) -> None:
        behind, self._behind = self._behind or {}, None
        if not f.check(StaleProof) or not self._handshaking:
            self._handshake_failed(f)
            return
        self.log.info(
            "the mediator did not take a timed proof ({reason}); signing its nonce", reason=escape(f.value.reason)
        )
        self._resent.update(rid for rid in behind if rid in self._pending)
        self._nonce_wanted = True
        self._resend = [msg for rid, msg in behind.items() if rid in self._pending]
        if self._nonce is not None:
            self._register_with_nonce()

    def _register_with_nonce(self) -> None:
        """Register signing this connection's greeting nonce, then resend what was behind a refused timed proof."""
        self._nonce_wanted = False
        owner = self.owner
        assert self._nonce is not None
        register = self.request(
            Register(
                owner._rid(),
                owner.peer_id,
                owner.identity.public_bytes(),
                owner.identity.sign_registration(self._nonce, owner.peer_id),
                owner.token,
                owner.take_over or not owner._replaced,
            )
        )
        register.addCallbacks(self._registered, self._handshake_failed)
        for msg in self._resend:
            self.send(msg)
        self._resend = []
        owner._handshake_sent(self)

    def _handshake_failed(self, f: Failure) -> None:
        self._fail_ready(f.value)

    def _greeted(self, greeting: Greeting) -> None:
        """Check that we can talk, then register: sign this connection's nonce."""
        if not self._handshaking:
            return
        if not any(v in greeting.versions for v in wire.VERSIONS):
            self._fail_ready(
                SignalingError(
                    "version-unsupported", f"mediator speaks {list(greeting.versions)}, we speak {list(wire.VERSIONS)}"
                )
            )
            return
        if greeting.nonce is None:
            self._fail_ready(SignalingError("bad-request", "the mediator's greeting carries no nonce to sign"))
            return
        if greeting.auth and self.owner.token is None:
            self.log.warn("the mediator requires a token and none is configured")
        self._nonce = greeting.nonce
        if not self.owner.timed_proofs or self._nonce_wanted:
            self._register_with_nonce()

    def _registered(self, reply: Registered) -> None:
        self._behind = None
        if not self._handshaking:
            return
        self._handshaking = False
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._alive()
        if reply.fingerprint != str(self.owner.identity.fingerprint):
            self.log.warn(
                "the mediator says it registered key {theirs}, ours is {ours}",
                theirs=reply.fingerprint,
                ours=str(self.owner.identity.fingerprint),
            )
        self.owner._replaced = False
        self.owner._ready(self)


class _ClientFactory(Factory):
    def __init__(self, owner: SignalingClient) -> None:
        self.owner = owner

    def buildProtocol(self, addr: Any) -> SignalingClientProtocol:
        p = SignalingClientProtocol(self.owner)
        p.factory = self
        return p


#: What to tell someone whose mediator string would not check the mediator's certificate.
_USE_TLS = (
    "give the mediator as tls:HOST:PORT (its certificate is then checked against the system's roots, "
    "or against a private CA with --ca ca.pem, and must name HOST in its subjectAltName)"
)


def _endpoint_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """
    The positional and keyword fields of a Twisted endpoint string after its
    type: fields are separated by C{:}, the first unescaped C{=} makes a
    keyword, and a backslash escapes the next character (C{tls:\\:\\:1:7443}).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    fields: list[list[tuple[str, bool]]] = [[]]  # (character, escaped)
    escaped = False
    for char in description.partition(":")[2]:
        if escaped or char not in "\\:":
            fields[-1].append((char, escaped))
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            fields.append([])
    for field in fields:
        split = next((i for i, (char, esc) in enumerate(field) if char == "=" and not esc), None)
        if split is None:
            args.append("".join(char for char, _ in field))
        else:
            kwargs["".join(c for c, _ in field[:split])] = "".join(c for c, _ in field[split + 1 :])
    return args, kwargs


def _tls_address(description: str) -> tuple[str, int, float]:
    """
    Host, port and connect timeout of a C{tls:HOST:PORT[:timeout=SECONDS]}
    mediator string (host and port may be keywords too); ValueError otherwise.
    """
    args, kwargs = _endpoint_fields(description)
    host = kwargs.pop("host", None) or (args.pop(0) if args else None)
    port = kwargs.pop("port", None) or (args.pop(0) if args else None)
    timeout = kwargs.pop("timeout", "30")
    if not host or not port:
        raise ValueError(f"{description!r} names no host and port: {_USE_TLS}")
    if args or kwargs:
        extra = ", ".join(args + sorted(kwargs))
        raise ValueError(
            f"{description!r}: a tls: mediator takes a host, a port and optionally timeout=SECONDS, not {extra} "
            "(a private CA is given with --ca ca.pem)"
        )
    try:
        return host, int(port), float(timeout)
    except ValueError:
        raise ValueError(f"{description!r}: the port and timeout must be numbers") from None


def check_mediator_endpoint(description: str, ca: str | None = None) -> None:
    """
    Refuse a mediator client string whose certificate would not be checked,
    with a message that says what to give instead (for option parsers: this
    is what L{client_endpoint} refuses, without building anything).

    @raise ValueError: C{ssl:} strings (Twisted's C{ssl:} client endpoint
        checks neither the chain nor the name), C{tls:} strings with options
        other than host, port and timeout, and C{--ca} with anything but
        C{tls:}.
    """
    if "," in description:
        parts = [p.strip() for p in description.split(",")]
        if not all(parts):
            raise ValueError(f"{description!r}: an empty mediator endpoint in the comma-separated list")
        for part in parts:
            check_mediator_endpoint(part, ca)
        return
    kind = description.partition(":")[0]
    if kind == "ssl":
        raise ValueError(f"{description!r} would not check the mediator's certificate at all: {_USE_TLS}")
    if kind == "tls":
        _tls_address(description)
    elif ca is not None:
        raise ValueError(f"--ca checks a TLS mediator, and {description!r} is not one: {_USE_TLS}")


@implementer(IOpenSSLClientConnectionCreator)
class VerifiedTLS:
    """
    Twisted's C{optionsForClientTLS} (system roots or C{trust_root}, SNI),
    with a certificate check that fails closed: Twisted's own verify callback
    only fails the handshake on service-identity's C{VerificationError} and
    merely logs anything else, so a certificate without subjectAltName
    (a C{CertificateError}) passed for any host.  C{check_name} False checks
    the chain only (for a private per-server CA, never the system's roots).
    """

    def __init__(self, host: str, trust_root: Any, check_name: bool = True) -> None:
        self._host = host
        self._check_name = check_name
        self._is_ip = isIPAddress(host) or isIPv6Address(host)
        self._options = optionsForClientTLS(host, trustRoot=trust_root)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """Twisted's connection, its verify callback replaced by L{_verifier}'s."""
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tlsProtocol))
        return connection

    def _verifier(self, tls_protocol: Any) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
        holder = [tls_protocol]  # dropped after the leaf: no cycle connection -> callback -> protocol

        def verify(connection: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
            if depth != 0 or not ok or not self._check_name:
                return bool(ok)  # the chain: OpenSSL's verdict
            protocol = holder.pop() if holder else None
            try:
                leaf = cert.to_cryptography()
                if self._is_ip:
                    verify_certificate_ip_address(leaf, self._host)
                else:
                    verify_certificate_hostname(leaf, self._host)
            except Exception:  # VerificationError, CertificateError (no subjectAltName), anything: refuse
                if protocol is not None:
                    try:
                        protocol.failVerification(Failure())
                    except Exception:
                        pass  # the handshake fails anyway; an exception must not escape into OpenSSL
                return False
            return True

        return verify


def client_endpoint(reactor: Any, description: str, ca: str | None = None) -> IStreamClientEndpoint:
    """
    A client endpoint for the mediator.  C{description} is a Twisted client
    endpoint string: C{tcp:HOST:7000}, or C{tls:HOST:7443} (optionally
    C{:timeout=SECONDS}), whose certificate is checked against the system's
    roots or, with C{ca} (a PEM file of a private CA), against that CA, and
    must name HOST in its subjectAltName (service-identity); any failure
    fails the connection.

    @raise ValueError: see L{check_mediator_endpoint} (C{ssl:} is refused: it
        checks nothing).
    """
    from natbypass.names import NameFailoverEndpoint, is_address

    check_mediator_endpoint(description, ca)
    if "," in description:
        return FailoverEndpoint([client_endpoint(reactor, p.strip(), ca) for p in description.split(",")])
    if not description.startswith("tls:"):
        named = _tcp_name(description)
        if named is None:
            return clientFromString(reactor, description)
        return NameFailoverEndpoint(reactor, named[0], named[1], timeout=named[2])
    host, port, timeout = _tls_address(description)
    root = None
    if ca is not None:
        with open(ca, "rb") as f:
            root = Certificate.loadPEM(f.read())
    if is_address(host):
        return wrapClientTLS(
            VerifiedTLS(host, root), HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
        )
    # A name with several addresses (one mediator each): each checked against the name.
    return NameFailoverEndpoint(
        reactor, host, port, timeout=timeout, wrap=lambda ep: wrapClientTLS(VerifiedTLS(host, root), ep)
    )


def _tcp_name(description: str) -> tuple[str, int, float] | None:
    """
    Host name, port and timeout of a C{tcp:NAME:PORT[:timeout=SECONDS]} string
    whose host is a name (not an IP literal) and that has no other options;
    None for anything else (Twisted's own C{tcp:} endpoint handles those).
    """
    from natbypass.names import is_address

    if not description.startswith("tcp:"):
        return None
    try:
        args, kwargs = _endpoint_fields(description)
    except ValueError:
        return None
    host = kwargs.pop("host", None) or (args.pop(0) if args else None)
    port = kwargs.pop("port", None) or (args.pop(0) if args else None)
    timeout = kwargs.pop("timeout", "30")
    if not host or not port or args or kwargs or is_address(host):
        return None
    try:
        return host, int(port), float(timeout)
    except ValueError:
        return None


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """
    Several mediators of one cluster (C{--mediator EP1,EP2,...}).  Each
    connection attempt starts with the mediator after the one the last
    connection went to, and tries every one once before it fails: a peer
    whose mediator died (or shut down) re-registers at the next one, and
    one that cannot be reached costs only its connect error.  Established
    peer connections never pass through here, so they are unaffected.
    """

    log = Logger()

    def __init__(self, endpoints: list[IStreamClientEndpoint]) -> None:
        if not endpoints:
            raise ValueError("no mediator endpoints")
        self.endpoints = list(endpoints)
        #: The index the last connection went to (-1: none yet, so the first attempt starts at 0).
        self.current = -1

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        n = len(self.endpoints)
        order = [(self.current + 1 + i) % n for i in range(n)]
        inner: list[Deferred[Any]] = []
        result: Deferred[Any] = Deferred(lambda _: inner[-1].cancel() if inner and not inner[-1].called else None)

        def attempt(i: int, why: Failure | None) -> None:
            if result.called:
                return
            if i == n:
                result.errback(why)
                return
            index = order[i]
            d = self.endpoints[index].connect(protocolFactory)
            inner.append(d)

            def ok(proto: Any) -> None:
                self.current = index
                if not result.called:
                    result.callback(proto)

            def failed(f: Failure) -> None:
                if f.check(CancelledError) and result.called:
                    return
                if n > 1:
                    self.log.info(
                        "mediator {index} of {n} unreachable ({err}); trying the next",
                        index=index + 1,
                        n=n,
                        err=f.value,
                    )
                attempt(i + 1, f)

            d.addCallbacks(ok, failed)

        attempt(0, None)
        return result


@implementer(ISignalingClient)
class SignalingClient(Service):
    """
    A peer's registration at the mediator, kept alive across reconnections.

    C{endpoint} is an C{IStreamClientEndpoint} (see C{client_endpoint}).

    A connection that has gone dead without a word (a NAT or firewall on
    the way dropped its mapping) is noticed within C{ping_interval} +
    C{pong_timeout} seconds (30 by default): after C{ping_interval} seconds
    with nothing from the mediator we ping it, and abort and reconnect when
    nothing comes back within C{pong_timeout}.
    Incoming offers go to the offer handler (none set: all are rejected).

    It registers with C{identity}'s key (None: a fresh key for this process
    only, which the mediator then binds the id to until the hold time after
    we leave; pass a stored L{natbypass.identity.Identity} to keep the id).
    It takes the id over from a stale connection of the same key (after a
    reconnection), but not back from a newer registration that replaced it;
    C{take_over} asks to replace whoever holds the id even then (with a token
    that owns the id, even another key).
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        peer_id: str,
        *,
        clock: IReactorTime,
        token: str | None = None,
        request_timeout: float = 60.0,
        idle_timeout: float = 90.0,
        ping_interval: float = 20.0,
        pong_timeout: float = 10.0,
        max_line: int = wire.DEFAULT_MAX_LINE,
        retry_policy: Callable[[int], float] | None = None,
        take_over: bool = False,
        identity: Identity | None = None,
        timed_proofs: bool = True,
    ) -> None:
        if not wire.PEER_ID.match(peer_id):
            raise ValueError(
                f"{peer_id!r} is not a valid peer id (1-64 of A-Z a-z 0-9 . _ @ : + -, starting alphanumeric)"
            )
        self.peer_id = peer_id
        self.clock = clock
        self.token = token
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        #: Seconds of silence from the mediator after which we ping it (0: only C{idle_timeout} applies) ...
        self.ping_interval = ping_interval
        #: ... and seconds its answer may take before the connection is taken for dead and replaced.
        self.pong_timeout = pong_timeout
        self.max_line = max_line
        if identity is None:
            identity = Identity.generate()
            self.log.info(
                "no identity key given: {peer_id} registers with an ephemeral key {fingerprint}",
                peer_id=peer_id,
                fingerprint=str(identity.fingerprint),
            )
        #: The identity key this peer registers with.
        self.identity = identity
        self.take_over = take_over
        #: Register at once with a timed proof (no round trip for the greeting's nonce); False: always sign the nonce.
        self.timed_proofs = timed_proofs
        #: A newer registration replaced ours: do not take the id back until we hold it again.
        self._replaced = False
        self.rtt: float | None = None
        self._next_rid = 0
        #: A connection whose Hello and Register are on their way (requests pipeline behind them).
        self._pending_handshake: SignalingClientProtocol | None = None
        self._offer_handler: Callable[[IncomingOffer], Any] | None = None
        #: What we publish (L{publish}), sent again on every new connection; and the connection it went on.
        self._publication: Description | None = None
        self._published_on: SignalingClientProtocol | None = None
        self._republish: Any = None
        #: False once the mediator refused C{publish} as unknown (it predates introductions in one round trip).
        self.can_publish = True
        #: Sessions that may still be revoked (their target had not approved): a Deferred and its expiry.
        self._revocations: dict[str, tuple[Deferred[SignalingError], Any]] = {}
        self._session_handler: Callable[[Session], Any] | None = None
        self._repunch_handler: Callable[[RepunchNotice], Any] | None = None
        self._policy = retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self._failures = 0  # handshakes refused in a row; ClientService only counts failed connects
        self._proto: SignalingClientProtocol | None = None
        self._waiters: list[Deferred[SignalingClientProtocol]] = []
        #: Callers waiting for a connection to pipeline a request on.
        self._link_waiters: list[Deferred[SignalingClientProtocol]] = []
        # No prepareConnection: a failed prepare leaves ClientService unable to
        # see that connection close (NoTransition); we track readiness ourselves.
        self._service = ClientService(
            endpoint,
            _ClientFactory(self),
            retryPolicy=lambda attempt: self._policy(attempt + self._failures),
            clock=clock,
        )

    def _rid(self) -> int:
        self._next_rid += 1
        return self._next_rid

    # -- service

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._republish is not None and self._republish.active():
            self._republish.cancel()
        for _, expiry in self._revocations.values():
            if expiry.active():
                expiry.cancel()
        self._revocations.clear()
        waiters, self._waiters = self._waiters + self._link_waiters, []
        self._link_waiters = []
        for w in waiters:
            w.errback(CancelledError("the signalling client was stopped"))
        return self._service.stopService()

    # -- ISignalingClient

    def whenRegistered(self) -> Deferred[str]:
        return self._registered_protocol().addCallback(lambda proto: self.peer_id)

    @staticmethod
    def _wait(waiters: list[Deferred[SignalingClientProtocol]]) -> Deferred[SignalingClientProtocol]:
        d: Deferred[SignalingClientProtocol] = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(d)
        return d

    def _registered_protocol(self) -> Deferred[SignalingClientProtocol]:
        if self._proto is not None:
            return succeed(self._proto)
        return self._wait(self._waiters)

    def _request_protocol(self) -> Deferred[SignalingClientProtocol]:
        """
        The connection to send a request on: the registered one, or one whose
        Hello and Register are on their way (now or at the next connect).  The
        mediator answers lines in order, so a request behind them waits for no
        round trip, and fails like them if registration is refused.
        """
        if self._proto is not None:
            return succeed(self._proto)
        pending = self._pending_handshake
        if pending is not None and pending.connected:
            return succeed(pending)
        return self._wait(self._link_waiters)

    def _handshake_sent(self, proto: SignalingClientProtocol) -> None:
        self._pending_handshake = proto
        waiters, self._link_waiters = self._link_waiters, []
        for w in waiters:
            w.callback(proto)

    def _call(self, make: Callable[[], Message], timeout: float | None = None) -> Deferred[Message]:
        d = self._request_protocol()
        d.addCallback(self._send_call, make)
        d.addTimeout(timeout or self.request_timeout, self.clock)
        return d

    def _send_call(self, proto: SignalingClientProtocol, make: Callable[[], Message]) -> Deferred[Message]:
        msg = make()
        if isinstance(msg, Publish):
            self._published_on = proto
        elif self._publication is not None and self.can_publish and self._published_on is not proto:
            # A new connection: our publication goes first, so this request (a connect) finds it there.
            self._published_on = proto
            proto.request(self._send_publication()).addErrback(self._publish_failed)
        return proto.request(msg)

    def connect(self, peer_id: str, description: Description = Description()) -> Deferred[Session]:
        d = self._call(lambda: Connect(self._rid(), peer_id, description))
        return d.addCallback(lambda reply: self._watch(reply.session))

    def _watch(self, session: Session) -> Session:
        """Keep a session revocable for a while: its target may still say no (see L{whenRevoked})."""
        expiry = self.clock.callLater(REVOKE_WATCH, self._revocations.pop, session.id, None)
        self._revocations[session.id] = (Deferred(), expiry)
        return session

    def whenRevoked(self, session_id: str) -> Deferred[SignalingError]:
        """
        Fires with the reason (an L{OfferRejected}, L{OfferTimeout} or
        L{PeerGone}) if the mediator revokes the session of one of our
        connects: it was handed out before its target approved us (an
        introduction in one round trip), and the target said no, never
        answered or left.  Never fires otherwise; cancel it when done.
        """
        out: Deferred[SignalingError] = Deferred()
        entry = self._revocations.get(session_id)
        if entry is not None:
            entry[0].addCallback(lambda err: (out.called or out.callback(err), err)[1])
        return out

    def _revoked(self, msg: Revoke) -> None:
        entry = self._revocations.pop(msg.session, None)
        if entry is None:
            return  # long finished, or never ours
        self.log.info("session {session} revoked: {reason}", session=msg.session, reason=escape(msg.reason))
        if entry[1].active():
            entry[1].cancel()
        entry[0].callback(error_from_reply(Error(None, msg.error, msg.reason)))

    def publish(self, description: Description) -> None:
        """
        Publish our mapped candidates, NAT summary and wish at the mediator
        (mapped kinds only, at most L{wire.MAX_PUBLISHED}; an empty list
        publishes nothing but still tells the mediator we take
        introductions and revocations), so a connect to us is answered in
        one round trip.  Kept, and sent again on every new connection and
        every L{PUBLISH_REFRESH} seconds; call again when it changes.
        """
        Publish(0, description)  # validate now, in the caller's stack
        self._publication = description
        if self.can_publish:
            self._call(lambda: self._send_publication()).addErrback(self._publish_failed)

    def _send_publication(self) -> Message:
        assert self._publication is not None
        if self._republish is not None and self._republish.active():
            self._republish.cancel()
        self._republish = self.clock.callLater(PUBLISH_REFRESH, self._refresh_publication)
        return Publish(self._rid(), self._publication)

    def _refresh_publication(self) -> None:
        self._republish = None
        if self._publication is not None and self.can_publish and self._proto is not None:
            self.publish(self._publication)

    def _publish_failed(self, f: Failure) -> None:
        if f.check(SignalingError) and f.value.error == "unknown-op":
            self.can_publish = False
            self.log.info("the mediator does not take publications: introductions take two round trips")
        elif not f.check(CancelledError, Disconnected, MediatorShuttingDown):
            self.log.warn("publishing our candidates failed: {error}", error=escape(f.getErrorMessage()))

    def setOfferHandler(self, handler: Callable[[IncomingOffer], Any] | None) -> None:
        """Who answers offers: returns a L{Description}, a L{Decline} or a Deferred of one."""
        self._offer_handler = handler

    def setSessionHandler(self, handler: Callable[[Session], Any] | None) -> None:
        """Who is told of sessions this peer answered (the target's side)."""
        self._session_handler = handler

    set_offer_handler = deprecated_alias(setOfferHandler, "set_offer_handler")
    set_session_handler = deprecated_alias(setSessionHandler, "set_session_handler")

    def report(
        self, session_id: str, outcome: str, protocol: str | None = None, detail: str | None = None
    ) -> Deferred[None]:
        msg = lambda: Report(self._rid(), session_id, outcome, protocol, detail)  # noqa: E731
        msg()  # validate now, in the caller's stack
        return self._call(msg).addCallback(lambda _: None)

    def repunch(self, session_id: str, mapped: tuple[str, int] | None = None) -> Deferred[None]:
        """
        Ask the mediator to re-punch session C{session_id} (an established
        UDP path gone silent; docs/protocol.md 5.2), naming our current
        mapped address when we know the peer sees it.
        """
        cand = None if mapped is None else Candidate("srflx", mapped[0], mapped[1])
        msg = lambda: Repunch(self._rid(), session_id, cand)  # noqa: E731
        msg()  # validate now, in the caller's stack
        return self._call(msg).addCallback(lambda _: None)

    def setRepunchHandler(self, handler: Callable[[RepunchNotice], Any] | None) -> None:
        """Who is told when the other peer of a session asks to re-punch it (L{RepunchNotice})."""
        self._repunch_handler = handler

    def ping(self) -> Deferred[float]:
        def sent(_: Any) -> float:
            self.rtt = self.clock.seconds() - start
            return self.rtt

        start = self.clock.seconds()
        return self._call(lambda: Ping(self._rid())).addCallback(sent)

    # -- protocol callbacks

    def _ready(self, proto: SignalingClientProtocol) -> None:
        self._forget_handshake(proto)
        self._failures = 0
        self._proto = proto
        self.log.info("registered at the mediator as {peer_id}", peer_id=self.peer_id)
        if self._publication is not None and self.can_publish and self._published_on is not proto:
            self.publish(self._publication)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(proto)

    def _refused(self, proto: SignalingClientProtocol, err: Exception) -> None:
        self._forget_handshake(proto)
        if not isinstance(err, MediatorShuttingDown):  # not our fault: reconnect without a longer wait
            self._failures += 1
        self.log.warn("registration as {peer_id} failed: {err}; retrying later", peer_id=self.peer_id, err=escape(err))
        if isinstance(err, IdBound):
            # Retrying will not help for a long while: tell whoever waits (the Peer) now.
            self.log.error(
                "the mediator binds {peer_id} to another key (ours is {fingerprint}): {reason}",
                peer_id=self.peer_id,
                fingerprint=str(self.identity.fingerprint),
                reason=escape(err.reason),
            )
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.errback(err)

    def _forget_handshake(self, proto: SignalingClientProtocol) -> None:
        if self._pending_handshake is proto:
            self._pending_handshake = None

    def _lost(self, proto: SignalingClientProtocol) -> None:
        self._forget_handshake(proto)
        if self._proto is proto:
            self._proto = None
            self.log.info("signalling connection lost; the client service reconnects")

    def _orphan(self, proto: SignalingClientProtocol, msg: Message) -> None:
        """A reply to a request we gave up on; a session we no longer want is reported as cancelled."""
        if isinstance(msg, SessionReply):
            proto.send(
                Report(self._rid(), msg.session.id, "cancelled", None, "caller cancelled before the session arrived")
            )

    def _offered(self, proto: SignalingClientProtocol, offer: IncomingOffer) -> None:
        handler = self._offer_handler
        if handler is None:
            d: Deferred[Any] = fail(Decline("this peer accepts no offers"))
        else:
            d = maybeDeferred(handler, offer)

        def withdrawn(reason: str) -> str:
            d.cancel()
            return reason

        offer.cancelled.addCallback(withdrawn)

        def answered(result: Any) -> Any:
            if proto.forget_offer(offer.id) is None:
                return None  # withdrawn or connection gone meanwhile
            if result is None:
                result = Decline("declined")
            if isinstance(result, Description) and offer.session is not None:
                # An introduction: the session is ours already (the handler started on it); say yes.
                r = proto.request(Accept(self._rid(), offer.id, result))
                r.addErrback(lambda f: self.log.warn("approving {offer} failed: {f.value}", offer=offer.id, f=f))
                return r
            if isinstance(result, Description):
                r = proto.request(Accept(self._rid(), offer.id, result))
                r.addCallback(lambda reply: self._session(reply.session))
                r.addErrback(lambda f: self.log.warn("accepting offer {offer} failed: {f.value}", offer=offer.id, f=f))
                return r
            reason = str(result) if isinstance(result, Decline) else "declined"
            return proto.request(Reject(self._rid(), offer.id, reason[: wire.MAX_TEXT] or None))

        def failed(f: Failure) -> Any:
            if f.check(CancelledError):
                return None
            if not f.check(Decline):
                self.log.failure("offer handler failed on {offer}", f, offer=offer.id)
            return answered(f.value if f.check(Decline) else Decline("the peer failed to handle the offer"))

        d.addCallbacks(answered, failed)
        d.addErrback(
            lambda f: None if f.check(SignalingError, CancelledError) else self.log.failure("answering offer failed", f)
        )

    def _session(self, session: Session) -> Session:
        if self._session_handler is not None:
            try:
                self._session_handler(session)
            except Exception:
                # The handler is the application's (Peer's) code: whatever it
                # raises is its bug, logged with the traceback; the accept
                # itself succeeded and is not to be reported as failed.
                self.log.failure("session handler failed on {session}", session=session.id)
        return session

"""
The mediator side of signalling.

C{SignalingState} is the whole state machine (registrations, pending offers,
sessions, limits, counters), driven by decoded messages and an injected clock;
C{SignalingServerProtocol} is a thin C{LineReceiver} that decodes lines and
delegates; C{SignalingFactory} ties them together.  The mediator only
introduces peers: it relays descriptions and hands out a session id, a fresh
key and a common start time, never application data.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from natbypass import selection
from natbypass.identity import BadSignature, Fingerprint, FingerprintError, load_public_key, verify_registration
from natbypass.logsafe import escape
from natbypass.nat import NatSummary
from natbypass.ratelimit import RateLimiter

from . import wire
from .interfaces import IChannel, ISignalingState
from .repunch import PathTable, same_host
from .wire import (
    Accept,
    Bye,
    Cancel,
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

#: The mediator's protocol-order policy: both sides' NAT summaries and
#: wishes in, the order out (C{[]}: no common protocol).
ChooseOrder = Callable[[NatSummary, NatSummary, tuple[str, ...], tuple[str, ...]], Sequence[str]]


def source_group(host: str) -> str:
    """
    The group a connection's source address counts against for the
    per-source limits: an IPv4 address itself, an IPv6 address its /64 (one
    subscriber usually holds a whole /64), an IPv4-mapped IPv6 address its
    IPv4 address.  Anything else (a Unix socket's C{"?"}) is its own group.
    """
    if ":" not in host:  # IPv4 (or not an address): strict dotted quads parse only to themselves
        return host
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def punch_delays(rtt_a: float, rtt_b: float, margin: float) -> tuple[float, float]:
    """
    How long each side waits after receiving its session so both start at
    the same moment.  Both messages leave the mediator together and arrive
    after rtt/2; with T = max(rtt)/2 + margin, side i waits T - rtt_i/2 and
    starts at send + T.  (libp2p's DCUtR does the same with one side's RTT.)
    """
    t = max(rtt_a, rtt_b) / 2 + margin
    return t - rtt_a / 2, t - rtt_b / 2


class BufferedRandom:
    """
    C{os.urandom} read in blocks: a system call per offer is measurable at
    thousands of offers per second.  The bytes are just as unpredictable;
    they only wait in this process's memory until used.
    """

    def __init__(self, block: int = 4096, source: Callable[[int], bytes] = os.urandom) -> None:
        self._block = block
        self._source = source
        self._buf = b""
        self._pos = 0

    def __call__(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf = self._source(max(self._block, n))
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


#: Encodings of the Ed25519 points of small order (libsodium's list; the sign bit is ignored).  A "public key"
#: among them has no private key behind it, and signatures with it verify for many messages: refused.
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


def small_order_key(raw: bytes) -> bool:
    """Is C{raw} (32 bytes) the encoding of a small-order point, a key nobody holds?"""
    return raw[:31] + bytes([raw[31] & 0x7F]) in _SMALL_ORDER


#: A comment starts with C{#} at the start of a line or after whitespace (so C{TOKEN#x} stays one word).
_COMMENT = re.compile(r"(?:^|(?<=\s))#.*")


class TokenPolicy:
    """
    Tokens from a token file, one entry a line: C{TOKEN [ID [FINGERPRINT]]}.

      - C{TOKEN} alone may register any id (ids are then bound to keys first
        come, first served, like without tokens);
      - C{TOKEN ID} may register only C{ID}, with any key, and I{owns} it: it
        may take the id over from another key (rebinding it) and replace a
        live session of it;
      - C{TOKEN ID FINGERPRINT} the same, but only with the key of that
        fingerprint.

    The same token may appear on several lines (one per id).  C{#} starts a
    comment at the start of a line or after whitespace.  Tokens are compared
    as SHA-256 digests with C{hmac.compare_digest}, against every entry, so
    timing reveals neither length nor position.
    """

    def __init__(self, entries: Iterable[tuple[str, str | None, Fingerprint | None]]) -> None:
        self._entries = [
            (hashlib.sha256(t.encode()).digest(), peer_id, None if fp is None else fp.digest)
            for t, peer_id, fp in entries
        ]

    @classmethod
    def parse(cls, text: str) -> TokenPolicy:
        """
        Parse token-file text.

        @raise ValueError: naming the bad line and what is wrong with it.
        """
        entries: list[tuple[str, str | None, Fingerprint | None]] = []
        for n, line in enumerate(text.splitlines(), 1):
            words = _COMMENT.sub("", line).split()
            if not words:
                continue
            if len(words) > 3:
                raise ValueError(
                    f"line {n}: a line is TOKEN [ID [FINGERPRINT]]; for several ids repeat the token on one line each"
                )
            token, peer_id, fp_text = (words + [None, None])[:3]
            if not wire.TOKEN.match(token):
                raise ValueError(f"line {n}: a token is 1-256 printable ASCII characters without spaces")
            if peer_id is not None and not wire.PEER_ID.match(peer_id):
                raise ValueError(f"line {n}: {peer_id[:80]!r} is not a valid peer id")
            fp = None
            if fp_text is not None:
                try:
                    fp = Fingerprint.parse(fp_text)
                except FingerprintError as e:
                    raise ValueError(f"line {n}: the third word must be a key fingerprint (nb1-...): {e}") from None
            entries.append((token, peer_id, fp))
        if not entries:
            raise ValueError("the token file holds no tokens; authentication would refuse everybody")
        return cls(entries)

    @classmethod
    def from_file(cls, path: str) -> TokenPolicy:
        with open(path, encoding="utf-8") as f:
            return cls.parse(f.read())

    def check(self, token: str | None, peer_id: str, fingerprint: Fingerprint | None) -> tuple[bool, bool]:
        """
        (may register C{peer_id} with the key of C{fingerprint}, owns the id:
        may take it over from another key or live session).
        """
        if token is None:
            return False, False
        digest = hashlib.sha256(token.encode()).digest()
        fp = fingerprint.digest if fingerprint is not None else b""
        allowed = owns = False
        for d, ids, key in self._entries:
            if hmac.compare_digest(d, digest):
                if ids is None:
                    allowed = True
                elif ids == peer_id and (key is None or hmac.compare_digest(key, fp)):
                    allowed = owns = True
        return allowed, owns


@dataclass
class Limits:
    """Operator-set limits; 0 means unlimited for the counts."""

    max_peers: int = 100_000
    #: Connections from one source group (an IPv4 address, an IPv6 /64; see C{source_group}).
    max_per_source: int = 100
    #: Signalling connections at once, all sources (0: no limit); the service keeps it below the descriptor limit.
    max_connections: int = 10_000
    rate: float = 20.0
    burst: float = 40.0
    max_line: int = wire.DEFAULT_MAX_LINE
    idle_timeout: float = 90.0
    keepalive: float = 30.0
    offer_timeout: float = 30.0
    session_ttl: float = 120.0
    max_offers_per_peer: int = 16  # offers a peer has made that still wait for their answer
    max_offers_to_peer: int = 64  # offers waiting for one target's answer (a flood of them is refused)
    #: Of those, at most this many from one initiator ...
    max_offers_per_pair: int = 4
    #: ... and from initiators of one source group, so a few registrations cannot fill a target's slots.
    max_offers_per_source_to_peer: int = 8
    #: Lines handled per connection in one reactor turn; the rest wait for the next turn (fairness).
    lines_per_turn: int = 32
    #: Rate-limited lines within C{abuse_window} seconds that get a 429 reply each; later ones none.
    rate_limited_replies: int = 5
    #: Rate-limited lines within C{abuse_window} seconds after which the connection is closed (0: never).
    max_rate_limited: int = 100
    abuse_window: float = 10.0
    #: Seconds a closing connection may take to flush its last lines before it is aborted.
    close_linger: float = 10.0
    punch_margin: float = 0.015
    unknown_rtt: float = 0.2
    rtt_refresh: float = 45.0
    #: How long an id stays bound to its key after its last connection left (0: only while connected).
    id_hold: float = 86_400.0
    #: Most ids bound at once, connected or held (0: no limit); beyond it new ids get 503 too-many-ids.
    max_ids: int = 250_000
    #: How far a timed registration proof's clock may be from ours, in seconds (0: timed proofs refused).
    proof_window: float = 30.0
    #: Timed proofs remembered (for twice the window) so none is used twice; beyond it they get stale-proof.
    max_recent_proofs: int = 100_000
    #: Seconds a peer's C{publish} is used to introduce it in one round trip; older, two round trips
    #: (the client republishes on every change and every C{publish_refresh} seconds).
    publish_ttl: float = 300.0
    #: Introductions in one round trip (C{publish}); False: every connect takes two (publish is still accepted).
    introductions: bool = True
    #: New connections per second per source group (0: no limit), bursts of C{accept_burst}; over it a
    #: connection is closed as it is accepted, with no reply and no state (see C{SignalingFactory}).
    accept_rate: float = 10.0
    #: Enough for a full per-source share (C{max_per_source}) of peers reconnecting at once.
    accept_burst: float = 100.0
    #: A connection refused at a cap (with its 503 line) costs the source this many accepts' worth.
    refusal_cost: float = 10.0


class _Link:
    """Per-connection state, kept small: 10,000 idle peers must fit in little memory."""

    __slots__ = (
        "channel",
        "source",
        "group",
        "version",
        "peer_id",
        "fingerprint",
        "nonce",
        "rtt",
        "last_seen",
        "ping_rid",
        "ping_sent",
        "tokens",
        "bucket_at",
        "offers",
        "open",
        "limited",
        "limited_since",
        "errors",
        "paused",
        "queued",
        "published",
        "published_at",
    )

    def __init__(self, channel: IChannel, source: str, now: float, burst: float, nonce: bytes) -> None:
        self.channel = channel
        self.source = source
        self.group = source_group(source)
        self.version: int | None = None
        self.peer_id: str | None = None
        #: The registered key's fingerprint, as the wire shows it.
        self.fingerprint: str | None = None
        #: This connection's greeting nonce, until registration uses it.
        self.nonce: bytes | None = nonce
        self.rtt: float | None = None
        self.last_seen = now
        self.ping_rid: int | None = None
        self.ping_sent = now
        self.tokens = burst
        self.bucket_at = now
        self.offers: set[str] | None = None
        self.open = True
        #: Rate-limited lines since C{limited_since} (the abuse window's start).
        self.limited = 0
        self.limited_since = now
        #: Errors sent to this connection (a request that got one made no progress).
        self.errors = 0
        #: Reading is paused because replies pile up unread.
        self.paused = False
        #: While the cluster's directory answers this connection's registration: its next lines, in order.
        self.queued: list[Message | WireError] | None = None
        #: What the peer published (mapped candidates, NAT, wish), or None; C{published_at} is None
        #: until it published at all (it then understands C{introduce} and C{revoke}).
        self.published: Description | None = None
        self.published_at: float | None = None


class _PendingOffer:
    """An offer waiting for its answer; expired by C{SignalingState.sweep} (no timer per offer)."""

    __slots__ = ("id", "initiator", "rid", "target", "description", "expires", "session")

    def __init__(
        self,
        id: str,
        initiator: _Link,
        rid: int,
        target: _Link,
        description: Description,
        expires: float,
        session: str | None = None,
    ) -> None:
        self.id = id
        self.initiator = initiator
        self.rid = rid
        self.target = target
        self.description = description
        self.expires = expires
        #: An introduction in one round trip: the session the initiator has already (revoked on a no).
        self.session = session


#: The reason of the C{shutting-down} notice.
_SHUTDOWN_REASON = "the mediator is shutting down; reconnect now (to another mediator if you know one)"

#: An open session awaiting reports: (expires, initiator id, target id, who reported: bit 1 initiator, bit 2
#: target).  A tuple of strings and numbers, so the garbage collector stops tracking it: at 1,000 offers/s
#: the table holds many thousands, and tracked objects would make full collections ever longer.
#: (expiry, initiator id, target id, which sides reported (bits), the two NATs' kinds "initiator,target")
_OpenSession = tuple[float, str, str, int, str]


@implementer(ISignalingState)
class SignalingState:
    """
    Registrations, offers and sessions of one mediator.  All time comes from
    C{clock}; all randomness from C{random_bytes} (tests inject both).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        limits: Limits | None = None,
        tokens: TokenPolicy | None = None,
        choose_order: ChooseOrder | None = None,
        random_bytes: Callable[[int], bytes] | None = None,
        server_name: str | None = None,
        cluster: Any = None,
    ) -> None:
        self.clock = clock
        self.limits = limits or Limits()
        self.tokens = tokens
        self.choose_order = choose_order or selection.choose_order
        self.random_bytes = random_bytes or BufferedRandom()
        self.server_name = server_name
        self.links: set[_Link] = set()
        self.peers: dict[str, _Link] = {}
        #: Every bound id (connected or held) -> the SHA-256-based digest of its key's fingerprint.
        self.bindings: dict[str, bytes] = {}
        #: Bound ids whose owner is not connected -> when the binding expires.  One hold time for all, so
        #: insertion order is expiry order and the sweep only looks at the front.
        self.held: dict[str, float] = {}
        #: Timed registration proofs seen (key + cnonce), until they could no longer pass the window.
        self.recent_proofs: dict[bytes, float] = {}
        self.offers: dict[str, _PendingOffer] = {}
        self.sessions: dict[str, _OpenSession] = {}  # in creation order, so expiry only looks at the front
        #: Sessions their two peers may re-punch (issue 12; docs/protocol.md, "Re-punch").
        self.paths = PathTable()
        #: Connections per source group (C{source_group}).
        self.sources: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self._next_rid = 0
        #: Connections whose reading is paused because their replies pile up unread.
        self.paused = 0
        #: C{shutdown} was called: new connections are refused.
        self.shutting_down = False
        #: The cluster's directory (an C{IClusterDirectory}), or None: this mediator alone, in memory.
        self.cluster = None
        if cluster is not None:
            from .cluster import ClusterRouting

            self.cluster = ClusterRouting(self, cluster)

    # -- bookkeeping helpers

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def count(self, name: str, n: int = 1) -> None:
        """Add C{n} to the counter C{name} (for the service's own events, e.g. connections cut at shutdown)."""
        self._count(name, n)

    def _id(self) -> str:
        return base64.urlsafe_b64encode(self.random_bytes(12)).decode("ascii")

    def _error(self, link: _Link, rid: int | None, error: str, reason: str) -> None:
        self._count("errors:" + error)
        link.errors += 1
        link.channel.send(Error(rid, error, reason))

    def _close(self, link: _Link) -> None:
        if link.open:
            link.open = False
            link.channel.close()

    def _ping(self, link: _Link, now: float) -> None:
        self._next_rid += 1
        link.ping_rid = self._next_rid
        link.ping_sent = now
        link.channel.send(Ping(self._next_rid))

    # -- ISignalingState

    def admits(self, source: str) -> bool:
        """
        Would a connection from C{source} be taken now (not refused at a cap
        or while shutting down)?  Cheap: the factory asks before it builds
        anything, to charge refusals more of the source's accept budget.
        """
        total = self.limits.max_connections
        limit = self.limits.max_per_source
        return not (
            self.shutting_down
            or (total and len(self.links) >= total)
            or (limit and self.sources.get(source_group(source), 0) >= limit)
        )

    def open(self, channel: IChannel, source: str) -> _Link | None:
        now = self.clock.seconds()
        link = _Link(channel, source, now, self.limits.burst, self.random_bytes(wire.NONCE_BYTES))
        self._count("connections")
        group = link.group
        limit = self.limits.max_per_source
        total = self.limits.max_connections
        if self.shutting_down:
            return self._refuse(link, "shutting-down", "shutting-down", _SHUTDOWN_REASON)
        if total and len(self.links) >= total:
            self.log.warn("refused connection from {source}: already {limit} connections", source=source, limit=total)
            return self._refuse(
                link,
                "max-connections",
                "too-many-connections",
                f"the mediator holds its maximum of {total} connections; retry later or use another mediator",
            )
        if limit and self.sources.get(group, 0) >= limit:
            self.log.warn(
                "refused connection from {source}: already {limit} connections from {group}",
                source=source,
                limit=limit,
                group=group,
            )
            return self._refuse(
                link,
                "per-source",
                "too-many-connections",
                f"at most {limit} connections per address (per /64 for IPv6); close some and retry",
            )
        self.sources[group] = self.sources.get(group, 0) + 1
        self.links.add(link)
        channel.send(
            Greeting(wire.VERSIONS, self.tokens is not None, self.limits.max_line, self.server_name, link.nonce)
        )
        return link

    def _refuse(self, link: _Link, why: str, error: str, reason: str) -> None:
        self._count("refused:" + why)
        self._error(link, None, error, reason)
        link.open = False
        link.channel.close()
        return None

    def flow(self, link: _Link | None, paused: bool) -> None:
        """
        The connection's protocol stopped (C{paused}) or resumed reading
        because its replies pile up unread; counted for the operator.
        """
        if link is None or link.paused == paused or link not in self.links:
            return
        link.paused = paused
        self.paused += 1 if paused else -1
        if paused:
            self._count("paused")

    def closed(self, link: _Link | None) -> None:
        if link is None or link not in self.links:
            return
        link.open = False
        self.flow(link, False)
        self.links.discard(link)
        n = self.sources.get(link.group, 1) - 1
        if n:
            self.sources[link.group] = n
        else:
            self.sources.pop(link.group, None)
        if link.peer_id is not None and self.peers.get(link.peer_id) is link:
            del self.peers[link.peer_id]
            self._hold(link.peer_id)
            if self.cluster is not None:
                self.cluster.leave(link.peer_id)
            self.log.info("peer {peer_id} left", peer_id=link.peer_id)
        for offer_id in list(link.offers or ()):
            offer = self.offers.pop(offer_id, None)
            if offer is None:
                continue
            self._drop_offer(offer)
            if self.shutting_down:  # the other side was told already
                continue
            if offer.initiator is link and offer.target.open:
                offer.target.channel.send(Cancel(offer.id, f"peer {link.peer_id} disconnected"))
            elif offer.target is link and offer.initiator.open:
                self._count("offers:gone")
                self._fail_initiator(offer, "gone", f"peer {link.peer_id} disconnected before answering")
        link.offers = None

    def malformed(self, link: _Link, error: WireError) -> None:
        if error.error == "line-too-long":  # the stream can't be trusted to resync: say so and close
            self._error(link, None, error.error, error.reason)
            self._close(link)
            return
        if not self._admit(link, error.rid):
            return
        if link.queued is not None:
            self._queue(link, error)
            return
        self._error(link, error.rid, error.error, error.reason)

    def _queue(self, link: _Link, item: Message | WireError) -> None:
        """A line that arrived while the cluster checks this connection's registration: handled after it."""
        assert link.queued is not None
        if len(link.queued) >= self.limits.lines_per_turn:
            self._error(link, getattr(item, "rid", None), "rate-limited", "too many lines while registering")
            return
        link.queued.append(item)

    def release(self, link: _Link) -> None:
        """The registration's answer came: handle the lines that waited for it, in order."""
        queued, link.queued = link.queued, None
        for item in queued or ():
            if not link.open:
                return
            if link.queued is not None:  # a queued register started another wait
                link.queued.append(item)
            elif isinstance(item, WireError):
                self._error(link, item.rid, item.error, item.reason)
            else:
                self._dispatch(link, item)

    def received(self, link: _Link, message: Message) -> None:
        if not self._admit(link, getattr(message, "rid", None)):
            return
        if link.queued is not None:
            self._queue(link, message)
            return
        self._dispatch(link, message)

    def _dispatch(self, link: _Link, message: Message) -> None:
        handler = self._handlers.get(type(message))
        if handler is None:  # pragma: no cover - every client message has one
            self._error(link, getattr(message, "rid", None), "unknown-op", f"op {message.op!r} is not handled")
            return
        if link.version is None and not isinstance(message, (Hello, Ping, Pong, Bye)):
            self._error(link, message.rid, "out-of-order", "send hello first (see the greeting for versions)")  # type: ignore[attr-defined]
            return
        errors, version, peer_id = link.errors, link.version, link.peer_id
        try:
            handler(self, link, message)
        except Exception:
            self.log.failure("signalling handler failed on {op}", op=message.op)
            self._error(link, getattr(message, "rid", None), "internal-error", "the mediator failed on this request")
        # Only progress keeps a connection alive: a request handled without an error, and before registration
        # only a step towards it (hello, register); not junk, not refused requests, not pings of a stranger.
        if link.errors == errors and (peer_id is not None or link.version != version or link.peer_id is not None):
            link.last_seen = self.clock.seconds()

    def _admit(self, link: _Link, rid: int | None) -> bool:
        """
        The per-connection token bucket.  Over the rate, the first few lines
        in an abuse window get a 429 each, later ones none; too many and the
        connection is closed with a last notice.
        """
        if not link.open:
            return False
        rate = self.limits.rate
        if rate <= 0:
            return True
        now = self.clock.seconds()
        link.tokens = min(self.limits.burst, link.tokens + (now - link.bucket_at) * rate)
        link.bucket_at = now
        if link.tokens >= 1:
            link.tokens -= 1
            return True
        lim = self.limits
        self._count("rate-limited")
        if now - link.limited_since > lim.abuse_window:
            link.limited, link.limited_since = 0, now
        link.limited += 1
        if lim.max_rate_limited and link.limited > lim.max_rate_limited:
            self._count("closed:abusive")
            self.log.warn(
                "closing connection {peer_id} from {source}: {n} lines over the rate limit in {window:g} s",
                peer_id=link.peer_id or "-",
                source=link.source,
                n=link.limited,
                window=lim.abuse_window,
            )
            self._error(
                link,
                None,
                "rate-limited",
                f"more than {lim.max_rate_limited} lines over the rate limit of {rate:g}/s; closing",
            )
            self._close(link)
            self.closed(link)
        elif link.limited <= lim.rate_limited_replies:
            self._error(link, rid, "rate-limited", f"more than {rate:g} messages per second; slow down")
        return False

    # -- handlers

    def _hello(self, link: _Link, msg: Hello) -> None:
        if msg.v not in wire.VERSIONS:
            self._error(
                link,
                msg.rid,
                "version-unsupported",
                f"version {msg.v} is not spoken here; versions: {list(wire.VERSIONS)}",
            )
            return
        link.version = msg.v
        link.channel.send(Ok(msg.rid))

    def _register(self, link: _Link, msg: Register) -> None:
        """
        Checks, in order: one registration per connection; the token (so a
        connection without a valid one learns nothing about ids); the proof
        of possession of the key; the id's binding to a key; a live session
        of the id; capacity.
        """
        if link.peer_id is not None or link.nonce is None:
            self._error(link, msg.rid, "out-of-order", f"this connection is already registered as {link.peer_id}")
            return
        try:
            if small_order_key(msg.key):
                raise ValueError("a small-order point")
            public_key = load_public_key(msg.key)
            fp: Fingerprint | None = Fingerprint.of_public_key(public_key)
        except ValueError:
            public_key, fp = None, None
        owns = False
        if self.tokens is not None:
            allowed, owns = self.tokens.check(msg.token, msg.id, fp)
            if not allowed:
                self.log.warn(
                    "refused registration of {peer_id} from {source}: bad token", peer_id=msg.id, source=link.source
                )
                self._error(
                    link,
                    msg.rid,
                    "unauthorized",
                    "a valid token for this id (and key) is required (register with token=...)",
                )
                return
        if msg.time is not None and not self._timed_proof_usable(link, msg):
            return
        try:
            if public_key is None or fp is None:
                raise BadSignature("not an Ed25519 public key")
            verify_registration(public_key, msg.sig, msg.proof_nonce(link.nonce), msg.id)
        except BadSignature:
            self.log.warn(
                "refused registration of {peer_id} from {source}: bad proof", peer_id=msg.id, source=link.source
            )
            self._error(
                link,
                msg.rid,
                "bad-proof",
                "the signature does not verify for this key, this id and this connection's greeting nonce "
                "(or the register's time and cnonce)"
                if public_key is not None
                else "the key is not a usable Ed25519 public key",
            )
            return
        now = self.clock.seconds()
        if msg.time is not None:
            # Remembered only once it verified: nobody can spend someone else's proof in advance.
            self.recent_proofs[msg.key + (msg.cnonce or b"")] = now + 2 * self.limits.proof_window
        if self.cluster is not None:  # the binding is the cluster's: ask Redis, then go on
            self.cluster.claim(link, msg, fp, owns)
            return
        self._register_checked(link, msg, fp, owns, now)

    def _register_checked(
        self, link: _Link, msg: Register, fp: Fingerprint, owns: bool, now: float, claimed: bool = False
    ) -> bool:
        """
        The rest of C{register} once the proof is good: the binding (here,
        or C{claimed} already by the cluster), a live session of the id,
        capacity.  Whether the id is now registered on C{link}.
        """
        self._expire_binding(msg.id, now)
        bound = self.bindings.get(msg.id)
        if claimed:
            bound = None  # the cluster's directory decided; ours is only a cache
        same_key = bound is not None and hmac.compare_digest(bound, fp.digest)
        old = self.peers.get(msg.id)
        if bound is not None and not same_key and not owns:
            self._count("ids:squat-refused")
            self.log.warn(
                "refused registration of {peer_id} from {source}: the id is bound to another key",
                peer_id=msg.id,
                source=link.source,
            )
            self._error(link, msg.rid, "id-bound", self._bound_reason(msg.id, old is not None, now))
            return False
        if old is not None:
            if not msg.replace:
                self._error(
                    link,
                    msg.rid,
                    "duplicate-id",
                    f"peer id {msg.id} is registered by another live connection with "
                    + ("your key" if same_key else "another key (your token owns the id)")
                    + "; send replace=true to take it over",
                )
                return False
            self._count("replaced")
            self.log.info("peer {peer_id} replaced its session from {source}", peer_id=msg.id, source=link.source)
            self._error(old, None, "duplicate-id", "replaced by a newer registration of this id")
            self._close(old)
            self.closed(old)
        else:
            limit = self.limits.max_ids
            if bound is None and not claimed and limit and len(self.bindings) >= limit:
                self.log.warn("refused registration of {peer_id}: {n} ids bound", peer_id=msg.id, n=len(self.bindings))
                self._error(
                    link,
                    msg.rid,
                    "too-many-ids",
                    f"the mediator holds its maximum of {limit} bound ids (connected or held for departed peers); "
                    "ids already bound to your key still work; try a new id later",
                )
                return False
            if self.limits.max_peers and len(self.peers) >= self.limits.max_peers:
                self.log.warn(
                    "refused registration of {peer_id}: {n} peers registered", peer_id=msg.id, n=len(self.peers)
                )
                self._error(
                    link,
                    msg.rid,
                    "too-many-peers",
                    f"the mediator holds its maximum of {self.limits.max_peers} peers; try later",
                )
                return False
        if bound is not None and not same_key:
            self._count("ids:rebound")
            self.log.info("peer id {peer_id} rebound to a new key by its token", peer_id=msg.id)
        self.held.pop(msg.id, None)
        self.bindings[msg.id] = fp.digest
        link.peer_id = msg.id
        link.fingerprint = str(fp)
        link.nonce = None
        self.peers[msg.id] = link
        self._count("registrations")
        self.log.info(
            "peer {peer_id} registered from {source} with key {fingerprint}",
            peer_id=msg.id,
            source=link.source,
            fingerprint=link.fingerprint,
        )
        link.channel.send(Registered(msg.rid, msg.id, link.fingerprint))
        self._ping(link, now)
        return True

    def _bound_reason(self, peer_id: str, live: bool, now: float) -> str:
        hold = self.limits.id_hold
        if live:
            after = f"and for {hold:.0f} s after it leaves" if hold > 0 else "while it is connected"
            held = f"its owner is connected; the mediator holds the id for that key {after}"
        else:
            held = (
                f"its owner left; the mediator holds the id for that key for another {self.held[peer_id] - now:.0f} s"
            )
        return f"peer id {peer_id} belongs to another identity key: {held}. Use another id, or the owner's key"

    def _hold(self, peer_id: str) -> None:
        """The id's last connection left: keep the binding for the hold time, or drop it."""
        if self.limits.id_hold > 0:
            self.held.pop(peer_id, None)
            self.held[peer_id] = self.clock.seconds() + self.limits.id_hold
        else:
            self.bindings.pop(peer_id, None)

    def _expire_binding(self, peer_id: str, now: float) -> None:
        expires = self.held.get(peer_id)
        if expires is not None and expires <= now:
            del self.held[peer_id]
            self.bindings.pop(peer_id, None)

    def _need_registration(self, link: _Link, rid: int) -> bool:
        if link.peer_id is None:
            if self.tokens is not None:
                self._error(link, rid, "unauthorized", "register with a valid token first")
            else:
                self._error(link, rid, "out-of-order", "register first")
            return True
        return False

    def _connect(self, link: _Link, msg: Connect) -> None:
        if self._need_registration(link, msg.rid):
            return
        if msg.peer == link.peer_id:
            self._error(link, msg.rid, "bad-request", "cannot connect to yourself")
            return
        target = self.peers.get(msg.peer)
        if target is None and self.cluster is None:
            self._count("offers:unknown-peer")
            self._error(link, msg.rid, "unknown-peer", f"no peer {msg.peer} is registered")
            return
        limit = self.limits.max_offers_per_peer
        if limit and self._pending_counts(link)[0] >= limit:
            self._error(
                link, msg.rid, "rate-limited", f"at most {limit} of your offers may wait for answers; wait for them"
            )
            return
        description = self._registered_fingerprint(link, msg.description)
        if self.cluster is not None:
            self.cluster.published(link, description)
            if target is None:  # registered on another mediator, or nowhere: the cluster finds out
                self.cluster.offer(link, msg.rid, msg.peer, description)
                return
        assert target is not None
        published = self._publication(link, target)
        self._offer_to(link, msg.rid, target, description, published=published)

    def _publication(self, link: _Link, target: _Link) -> Description | None:
        """
        What C{target} published, when C{link}'s connect to it can be
        answered at once: both sides published (so both know C{introduce}
        and C{revoke}), the target's publication is fresh and names a
        candidate.  Otherwise None: the offer goes the two-round-trip way.
        """
        if not self.limits.introductions or link.published_at is None:
            return None
        pub, at = target.published, target.published_at
        if pub is None or at is None or not pub.candidates:
            return None
        if self.clock.seconds() - at > self.limits.publish_ttl:
            self._count("introductions:stale")
            return None
        return dataclasses.replace(pub, fingerprint=target.fingerprint)

    def _publish(self, link: _Link, msg: Publish) -> None:
        if self._need_registration(link, msg.rid):
            return
        link.published = msg.description if msg.description.candidates else None
        link.published_at = self.clock.seconds()
        self._count("publications")
        link.channel.send(Ok(msg.rid))

    def _offer_to(
        self,
        link: _Link,
        rid: int,
        target: _Link,
        description: Description,
        offer_id: str | None = None,
        timeout: float | None = None,
        published: Description | None = None,
    ) -> None:
        """
        Offer C{link}'s C{description} to C{target} within the target's
        limits (its slots, each initiator's and each source's share).
        C{link} is a local connection, or the stand-in of an initiator on
        another mediator (its errors and session travel back there).  With
        C{published} (the target's publication) the initiator gets its
        session at once and the target an C{introduce}: one round trip.
        """
        waiting = self._pending_counts(target)
        limit = self.limits.max_offers_to_peer
        if limit and waiting[1] >= limit:
            self._count("offers:refused-full")
            self._error(
                link, rid, "rate-limited", f"peer {target.peer_id} has {limit} offers waiting for its answer; try later"
            )
            return
        refusal = self._fair_share(link, target)
        if refusal is not None:
            self._count("offers:refused-fair-share")
            self._error(link, rid, "rate-limited", refusal)
            return
        now = self.clock.seconds()
        timeout = self.limits.offer_timeout if timeout is None else timeout
        if published is not None:
            sessions = self._session(link, description, rid, target, published, None)
            if sessions is None:
                return
            offer = self.add_offer(offer_id or self._id(), link, rid, target, description, now + timeout)
            offer.session = sessions[0].session.id
            self._count("introductions")
            self._log_session(offer.id, sessions[0].session, sessions[1])
            link.channel.send(sessions[0])
            target.channel.send(Introduce(offer.id, sessions[1], int(timeout * 1000)))
            return
        offer = self.add_offer(offer_id or self._id(), link, rid, target, description, now + timeout)
        self.log.debug(
            "offer {offer} from {initiator} to {target}", offer=offer.id, initiator=link.peer_id, target=target.peer_id
        )
        target.channel.send(Offer(offer.id, link.peer_id, description, int(timeout * 1000)))
        # Keepalive pings keep the RTTs fresh; probe again only if a sample is stale.
        for side in (link, target):
            if side.ping_rid is None and now - side.ping_sent > self.limits.rtt_refresh:
                self._ping(side, now)

    def add_offer(
        self, offer_id: str, link: _Link, rid: int, target: _Link, description: Description, expires: float
    ) -> _PendingOffer:
        """Record a pending offer between C{link} and C{target} (either may be a remote stand-in)."""
        offer = _PendingOffer(offer_id, link, rid, target, description, expires)
        self.offers[offer.id] = offer
        for side in (link, target):
            if side.offers is None:
                side.offers = set()
            side.offers.add(offer.id)
        self._count("offers")
        return offer

    def _timed_proof_usable(self, link: _Link, msg: Register) -> bool:
        """
        A timed proof (signed without the greeting's nonce, to save a round
        trip) is fresh when its time is within the proof window of our clock
        and it was not used before; otherwise the client is told to sign the
        greeting's nonce (stale-proof), or that it replays one (bad-proof).
        """
        lim = self.limits
        skew = (msg.time or 0) / 1000.0 - self.clock.seconds()
        if not lim.proof_window or abs(skew) > lim.proof_window:
            self._count("proofs:stale")
            self._error(
                link,
                msg.rid,
                "stale-proof",
                f"the proof's time is {skew:+.0f} s from the mediator's clock (window {lim.proof_window:g} s): "
                "sign this connection's greeting nonce instead",
            )
            return False
        if msg.key + (msg.cnonce or b"") in self.recent_proofs:
            self._count("proofs:replayed")
            self._error(link, msg.rid, "bad-proof", "this registration proof was used already")
            return False
        if lim.max_recent_proofs and len(self.recent_proofs) >= lim.max_recent_proofs:
            self._count("proofs:busy")
            self._error(link, msg.rid, "stale-proof", "too many recent registrations: sign the greeting nonce instead")
            return False
        return True

    def _registered_fingerprint(self, link: _Link, description: Description) -> Description:
        """
        C{description} with the fingerprint C{link} registered: what a peer
        declares itself is never passed on.
        """
        if description.fingerprint == link.fingerprint:
            return description
        if description.fingerprint is not None:
            self._count("fingerprints:replaced")
            self.log.debug(
                "peer {peer_id} declared fingerprint {declared}; relaying its registered {fingerprint}",
                peer_id=link.peer_id,
                declared=description.fingerprint,
                fingerprint=link.fingerprint,
            )
        return dataclasses.replace(description, fingerprint=link.fingerprint)

    def _pending_counts(self, link: _Link) -> tuple[int, int]:
        """(offers C{link} made, offers waiting for C{link}'s answer) still pending; both are small."""
        made = sum(1 for o in link.offers or () if getattr(self.offers.get(o), "initiator", None) is link)
        return made, len(link.offers or ()) - made

    def _fair_share(self, link: _Link, target: _Link) -> str | None:
        """
        Why C{link} may not add an offer to C{target}'s pending ones (its
        share is used up), or None.  Each initiator, and all initiators of
        one source group together, get a small share of a target's slots, so
        a few registrations cannot fill them and keep genuine offers out.
        """
        lim = self.limits
        pair, share = lim.max_offers_per_pair, lim.max_offers_per_source_to_peer
        if not (pair or share) or not target.offers:
            return None
        mine = ours = 0
        for offer_id in target.offers:  # at most max_offers_to_peer + max_offers_per_peer
            o = self.offers.get(offer_id)
            if o is None or o.target is not target:
                continue
            if o.initiator is link or o.initiator.peer_id == link.peer_id:  # a remote initiator has stand-ins
                mine += 1
            if o.initiator.group == link.group:
                ours += 1
        if pair and mine >= pair:
            return f"at most {pair} of your offers may wait for peer {target.peer_id}'s answer; wait for them"
        if share and ours >= share:
            return f"at most {share} offers from your network may wait for peer {target.peer_id}'s answer; try later"
        return None

    def _take_offer(self, link: _Link, rid: int, offer_id: str) -> _PendingOffer | None:
        offer = self.offers.get(offer_id)
        if offer is None or offer.target is not link:
            self._error(link, rid, "unknown-offer", f"no pending offer {offer_id} for you (expired or withdrawn?)")
            return None
        del self.offers[offer_id]
        self._drop_offer(offer)
        return offer

    def _drop_offer(self, offer: _PendingOffer) -> None:
        for side in (offer.initiator, offer.target):
            if side.offers is not None:
                side.offers.discard(offer.id)
                if not side.offers:
                    side.offers = None

    def _accept(self, link: _Link, msg: Accept) -> None:
        if self._need_registration(link, msg.rid):
            return
        offer = self._take_offer(link, msg.rid, msg.offer)
        if offer is None:
            return
        if offer.session is not None:  # an introduction: the sessions are out; the target approved
            self._count("introductions:accepted")
            self.log.info(
                "introduction {offer}: {target} approved {initiator}",
                offer=offer.id,
                target=link.peer_id,
                initiator=offer.initiator.peer_id,
            )
            link.channel.send(Ok(msg.rid))
            return
        a, b = offer.initiator, link
        answer = self._registered_fingerprint(b, msg.description)
        if self.cluster is not None:
            self.cluster.published(b, answer)
            rtt_hop = self.cluster.hop() if getattr(a.channel, "remote", False) else 0.0
        else:
            rtt_hop = 0.0
        sessions = self._session(a, offer.description, offer.rid, b, answer, msg.rid, rtt_hop)
        if sessions is None:
            return
        a.channel.send(sessions[0])
        b.channel.send(sessions[1])
        self._log_session(offer.id, sessions[0].session, sessions[1])

    def _session(
        self,
        a: _Link,
        offer: Description,
        rid_a: int,
        b: _Link,
        answer: Description,
        rid_b: int | None,
        rtt_hop: float = 0.0,
    ) -> tuple[SessionReply, Session] | None:
        """
        The session between initiator C{a} and target C{b}: the initiator's
        reply and the target's side (its reply to C{rid_b}, or the session
        of an introduction), recorded for reports; None when the wishes do
        not meet (both told).
        """
        nats, wishes = (offer.nat, answer.nat), (offer.wish, answer.wish)
        order = list(dict.fromkeys(p for p in self.choose_order(*nats, *wishes) if p in wire.PROTOCOLS))
        if not order:
            reason = "the two peers' protocol wishes have nothing in common"
            self._count("offers:no-common-protocol")
            self._error(a, rid_a, "rejected", reason)
            if rid_b is not None:
                self._error(b, rid_b, "rejected", reason)
            return None
        unknown = self.limits.unknown_rtt
        rtt_a = (a.rtt if a.rtt is not None else (a.channel.kernel_rtt() or unknown)) + rtt_hop
        rtt_b = b.rtt if b.rtt is not None else (b.channel.kernel_rtt() or unknown)
        delay_a, delay_b = punch_delays(rtt_a, rtt_b, self.limits.punch_margin)
        sid = self._id()
        key = self.random_bytes(wire.SESSION_KEY_BYTES)
        ms = lambda s: max(0, min(600_000, round(s * 1000)))  # noqa: E731
        mine = Session(sid, key, b.peer_id, "controlling", answer, tuple(order), ms(delay_a), ms(rtt_a))  # type: ignore[arg-type]
        theirs = Session(sid, key, a.peer_id, "controlled", offer, tuple(order), ms(delay_b), ms(rtt_b))  # type: ignore[arg-type]
        # The NAT pair (selection-table rows) labels the outcomes peers report, for the metrics.
        pair = sys.intern(f"{nats[0].kind()},{nats[1].kind()}")
        self.sessions[sid] = (self.clock.seconds() + self.limits.session_ttl, a.peer_id, b.peer_id, 0, pair)  # type: ignore[assignment]
        self.paths.add(sid, a.peer_id, b.peer_id, self.clock.seconds())  # type: ignore[arg-type]
        self._count("sessions")
        self._count("sessions-by-nat:" + pair)
        return SessionReply(rid_a, mine), (SessionReply(rid_b, theirs) if rid_b is not None else theirs)  # type: ignore[return-value]

    def _log_session(self, offer_id: str, mine: Session, theirs: Any) -> None:
        other = theirs.session if isinstance(theirs, SessionReply) else theirs
        self.log.info(
            "offer {offer}: session {session} between {initiator} and {target}: order {order}, start in {delay_a}/{delay_b} ms",
            offer=offer_id,
            session=mine.id,
            initiator=other.peer,
            target=mine.peer,
            order=list(mine.order),
            delay_a=mine.start_in_ms,
            delay_b=other.start_in_ms,
        )

    def _fail_initiator(self, offer: _PendingOffer, error: str, reason: str) -> None:
        """The offer will not become a path: an error reply to its connect, or the revoke of its session."""
        if offer.session is None:
            self._error(offer.initiator, offer.rid, error, reason)
            return
        self._count("introductions:" + error)
        offer.initiator.channel.send(Revoke(offer.session, error, reason))
        self.sessions.pop(offer.session, None)

    def _reject(self, link: _Link, msg: Reject) -> None:
        if self._need_registration(link, msg.rid):
            return
        offer = self._take_offer(link, msg.rid, msg.offer)
        if offer is None:
            return
        self._count("offers:rejected")
        self.log.info("offer {offer} rejected by {target}", offer=offer.id, target=link.peer_id)
        why = f": {msg.reason}" if msg.reason else ""
        self._fail_initiator(offer, "rejected", f"peer {link.peer_id} rejected the offer{why}")
        link.channel.send(Ok(msg.rid))

    def _expire(self, offer: _PendingOffer) -> None:
        if self.offers.pop(offer.id, None) is None:
            return
        self._drop_offer(offer)
        self._count("offers:timeout")
        self.log.info("offer {offer} to {target} expired", offer=offer.id, target=offer.target.peer_id)
        self._fail_initiator(
            offer, "timeout", f"peer {offer.target.peer_id} did not answer within {self.limits.offer_timeout:g} s"
        )
        if offer.target.open:
            offer.target.channel.send(Cancel(offer.id, "expired"))

    def _ping_request(self, link: _Link, msg: Ping) -> None:
        link.channel.send(Pong(msg.rid))

    def _pong(self, link: _Link, msg: Pong) -> None:
        if msg.rid == link.ping_rid:
            sample = max(0.0, self.clock.seconds() - link.ping_sent)
            link.rtt = sample if link.rtt is None else 0.75 * link.rtt + 0.25 * sample
            link.ping_rid = None

    def _report(self, link: _Link, msg: Report) -> None:
        if self._need_registration(link, msg.rid):
            return
        s = self.sessions.get(msg.session)
        bit = 0 if s is None else 1 if link.peer_id == s[1] else 2 if link.peer_id == s[2] else 0
        if s is None or not bit:
            self._error(link, msg.rid, "unknown-session", f"no open session {msg.session} of yours")
            return
        if not s[3] & bit:
            reported = s[3] | bit
            name = msg.outcome + (f"/{msg.protocol}" if msg.protocol else "")
            self._count("outcome:" + name)
            self._count(f"outcome-by-nat:{s[4]}:{name}")
            self.log.info(
                "session {session}: {peer_id} reports {outcome} {detail}",
                session=msg.session,
                peer_id=link.peer_id,
                outcome=name,
                detail=escape(msg.detail),
            )
            if reported == 3:
                del self.sessions[msg.session]
            else:
                self.sessions[msg.session] = (s[0], s[1], s[2], reported, s[4])
        link.channel.send(Ok(msg.rid))

    def _repunch(self, link: _Link, msg: Repunch) -> None:
        """
        One peer of an established session asks to re-punch it: tell the
        other.  Only the two peers of the session may (anyone else learns
        nothing, not even that it exists), a few times a minute, and the
        address they name must be the one they signal from, so the other
        peer's probes cannot be aimed at a third party.
        """
        if self._need_registration(link, msg.rid):
            return
        now = self.clock.seconds()
        other = self.paths.other(msg.session, link.peer_id, now)  # type: ignore[arg-type]
        if other is None:
            self._count("repunch:unknown-session")
            self._error(link, msg.rid, "unknown-session", f"no session {msg.session} of yours to re-punch")
            return
        if msg.candidate is not None and not same_host(msg.candidate.host, link.source):
            self._count("repunch:foreign-address")
            self._error(
                link, msg.rid, "bad-request", "a re-punch names a mapped address at the address you signal from"
            )
            return
        target = self.peers.get(other)
        if target is None:
            self._count("repunch:gone")
            self._error(link, msg.rid, "unknown-peer", f"peer {other} is not connected here")
            return
        if not self.paths.take(msg.session, now):
            self._count("repunch:rate-limited")
            self._error(
                link,
                msg.rid,
                "rate-limited",
                f"at most {self.paths.budget} re-punches of a session in {self.paths.window:g} s",
            )
            return
        self._count("repunch")
        self.log.info("session {session}: {peer_id} asks to re-punch", session=msg.session, peer_id=link.peer_id)
        target.channel.send(RepunchNotice(msg.session, msg.candidate))
        link.channel.send(Ok(msg.rid))

    def _bye(self, link: _Link, msg: Bye) -> None:
        link.channel.send(Ok(msg.rid))
        self._close(link)

    _handlers: dict[type, Callable[..., None]] = {
        Hello: _hello,
        Register: _register,
        Publish: _publish,
        Connect: _connect,
        Accept: _accept,
        Reject: _reject,
        Ping: _ping_request,
        Pong: _pong,
        Report: _report,
        Repunch: _repunch,
        Bye: _bye,
    }

    # -- periodic work

    def sweep(self) -> None:
        now = self.clock.seconds()
        lim = self.limits
        if self.cluster is not None:
            self.cluster.tick(now)
        for link in list(self.links):
            if now - link.last_seen > lim.idle_timeout:
                self._count("idle-timeouts")
                self.log.info(
                    "closing idle connection {peer_id} from {source}", peer_id=link.peer_id or "-", source=link.source
                )
                self._error(link, None, "timeout", f"nothing heard for {lim.idle_timeout:g} s")
                self._close(link)
                self.closed(link)
            elif link.peer_id is not None and now - link.ping_sent >= lim.keepalive:
                self._ping(link, now)
        # Offers and sessions all live equally long and the dicts keep creation
        # order, so only the front needs looking at: no timer per offer, no full scan.
        while self.offers:
            offer = next(iter(self.offers.values()))
            if offer.expires > now:
                break
            self._expire(offer)
        expired = []
        for sid, s in self.sessions.items():  # oldest first; a report's update keeps the position
            if s[0] > now:
                break
            expired.append(sid)
        for sid in expired:
            del self.sessions[sid]
        self.paths.sweep(now)
        held = self.held
        while held:
            peer_id, expires = next(iter(held.items()))
            if expires > now:
                break
            del held[peer_id]
            self.bindings.pop(peer_id, None)
        proofs = self.recent_proofs
        while proofs:
            expires = next(iter(proofs.values()))
            if expires > now:
                break
            del proofs[next(iter(proofs))]

    def shutdown(self) -> None:
        """
        The mediator is stopping: refuse new connections, tell every
        connection to reconnect (elsewhere) and close it.
        """
        self.shutting_down = True
        links = list(self.links)
        for link in links:  # everybody hears it before any pending offer fails as "gone"
            self._count("closed:shutdown")
            self._error(link, None, "shutting-down", _SHUTDOWN_REASON)
        for link in links:
            self._close(link)
            self.closed(link)

    def status(self) -> dict[str, Any]:
        """
        Gauges and counters, a plain dict for the status line and the
        metrics layer: C{connections} (now), C{connections_total},
        C{paused_connections} (not read because their replies pile up),
        C{max_connections} (the cap in force, 0: none), C{shutting_down},
        and C{counters} (refusals by reason C{refused:*}, C{rate-limited},
        C{closed:abusive}, C{closed:shutdown}, errors by name, ...).
        """
        return {
            "peers": len(self.peers),
            "bound_ids": len(self.bindings),
            "held_ids": len(self.held),
            "connections": len(self.links),
            "connections_total": self.counters.get("connections", 0),
            "paused_connections": self.paused,
            "max_connections": self.limits.max_connections,
            "shutting_down": self.shutting_down,
            "pending_offers": len(self.offers),
            "open_sessions": len(self.sessions),
            "counters": dict(sorted(self.counters.items())),
            **({} if self.cluster is None else self.cluster.status()),
        }

    def logStatus(self) -> None:
        """One status line for the operator (called at an interval)."""
        s = self.status()
        self.log.info(
            "signalling status: {peers} peers, {bound_ids} bound ids ({held_ids} held), {connections} connections, "
            "{pending_offers} pending offers, "
            "{open_sessions} open sessions; totals {counters}",
            **s,
        )


def _no_delay(transport: Any) -> None:
    """Small latency-critical lines: no Nagle (a TLS transport may not offer it)."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:  # pragma: no cover - not a TCP socket after all
            pass


#: struct tcp_info (linux/tcp.h): 8 one-byte fields, then u32s; tcpi_rtt (microseconds) is the 16th.
_TCP_INFO = struct.Struct("8x60xI")


def kernel_rtt(transport: Any) -> float | None:
    """The smoothed RTT Linux keeps for a TCP connection (TLS too: the socket under it), or None."""
    for t in (transport, getattr(transport, "transport", None)):
        handle = getattr(t, "getHandle", lambda: None)()
        if hasattr(handle, "getsockopt") and hasattr(socket, "TCP_INFO"):
            try:
                info = handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            except OSError:
                return None
            if len(info) >= _TCP_INFO.size:
                return _TCP_INFO.unpack_from(info)[0] / 1e6 or None
    return None


@implementer(IChannel, IPushProducer)
class SignalingServerProtocol(LineReceiver):
    """
    One client connection: decode each line and hand it to the state.

    It does bounded work per client: it is the transport's streaming
    producer, so when its replies pile up unread (the transport's write
    buffer is full and Twisted calls C{pauseProducing}) it stops reading the
    socket until they drain; and it handles at most C{lines_per_turn} lines
    per reactor turn, pausing the transport and going on in the next turn
    (C{callLater(0)}), so one busy client cannot keep the reactor from the
    others.
    """

    delimiter = b"\n"

    def __init__(self, state: SignalingState, max_line: int, lines_per_turn: int | None = None) -> None:
        self.state = state
        self.clock = state.clock
        self.MAX_LENGTH = max_line
        self.lines_per_turn = state.limits.lines_per_turn if lines_per_turn is None else lines_per_turn
        self._link: _Link | None = None
        #: Why reading is paused: "writes" (replies pile up), "turn" (this turn's lines are used up).
        self._holds: set[str] = set()
        self._turn_lines = 0
        self._next_turn: IDelayedCall | None = None
        self._linger: IDelayedCall | None = None
        self._registered = False
        #: This protocol paused the transport's reading.
        self._reading_paused = False
        #: Unhandled bytes kept before reading stops (while paused).
        self.read_ahead = max(max_line, 16_384)

    def connectionMade(self) -> None:
        _no_delay(self.transport)
        self.transport.registerProducer(self, True)
        self._registered = True
        self._link = self.state.open(self, getattr(self.transport.getPeer(), "host", "?"))

    def kernel_rtt(self) -> float | None:
        return kernel_rtt(self.transport)

    # -- flow control

    def _hold(self, why: str) -> None:
        self._holds.add(why)
        self.paused = True  # LineReceiver leaves the remaining lines in its buffer
        self._stop_reading()

    def _stop_reading(self) -> None:
        """
        Stop reading the socket once more than C{read_ahead} bytes wait
        unhandled (not at once: TLS must go on reading its handshake while
        the greeting waits for it).
        """
        t = self.transport
        if self._reading_paused or t is None or t.disconnecting or len(self._buffer) <= self.read_ahead:
            return
        self._reading_paused = True
        t.pauseProducing()

    def _release(self, why: str) -> None:
        self._holds.discard(why)
        if self._holds or not self.paused:
            return
        self.paused = False
        self._turn_lines = 0
        if self.transport is None or self.transport.disconnecting:
            return
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        self.dataReceived(b"")  # the lines that waited in the buffer

    def _new_turn(self) -> None:
        self._next_turn = None
        self._release("turn")

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: the client does not read its replies."""
        self.state.flow(self._link, True)
        self._hold("writes")

    def resumeProducing(self) -> None:
        """The client read its replies: read it again."""
        self.state.flow(self._link, False)
        self._release("writes")

    def stopProducing(self) -> None:
        """The transport is going away; nothing to do (C{connectionLost} tidies up)."""

    def dataReceived(self, data: bytes) -> None:
        if data and not self.paused:
            self._turn_lines = 0
        super().dataReceived(data)
        if self.paused:
            self._stop_reading()

    def lineReceived(self, line: bytes) -> None:
        link = self._link
        if link is None:
            return
        self._turn_lines += 1
        if self.lines_per_turn and self._turn_lines >= self.lines_per_turn and self._next_turn is None:
            # This line is the turn's last: the rest wait for the next reactor turn, the socket unread.
            self._hold("turn")
            self._next_turn = self.clock.callLater(0, self._new_turn)
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            msg = wire.decode_from_client(line)
        except WireError as e:
            self.state.malformed(link, e)
        else:
            self.state.received(link, msg)

    def lineLengthExceeded(self, line: bytes) -> None:
        link, reason = self._link, f"lines are limited to {self.MAX_LENGTH} bytes; closing"
        if link is not None:
            self.state.malformed(link, WireError("line-too-long", reason))
        self.close()

    def connectionLost(self, reason: Any = None) -> None:
        link, self._link = self._link, None
        for call in (self._next_turn, self._linger):
            if call is not None and call.active():
                call.cancel()
        self._next_turn = self._linger = None
        self.state.closed(link)
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.gone(self)

    # IChannel

    def send(self, message: Message) -> None:
        if self.transport is not None and not self.transport.disconnecting:
            self.sendLine(wire.encode(message))

    def close(self) -> None:
        """
        Close after the pending lines are written, but within C{close_linger}
        seconds: a client that does not read them is then cut off.
        """
        t = self.transport
        if t is None or t.disconnecting:
            return
        # A registered producer keeps loseConnection from completing (TLS waits for it to go; TCP, once it
        # was paused, resumes it instead of closing).
        if self._registered:
            self._registered = False
            t.unregisterProducer()
        t.loseConnection()
        linger = self.state.limits.close_linger
        if linger > 0 and self._linger is None:
            self._linger = self.clock.callLater(linger, self.abort)

    def abort(self) -> None:
        """Drop the connection now, whatever is still unwritten."""
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()


class _Drop(Protocol):
    """
    A connection refused before anything is made for it: aborted at once.
    For transports that wrap the factory (TLS), which cannot take a None
    from C{buildProtocol}; one instance serves every such connection.
    """

    def makeConnection(self, transport: Any) -> None:
        transport.abortConnection()


_DROP = _Drop()


class SignalingFactory(Factory):
    """
    Builds a C{SignalingServerProtocol} per connection, all sharing one
    state; it knows the live ones so a stopping service can wait for them
    (C{whenIdle}) or cut them off (C{abortAll}).

    Accepting costs the reactor: a refused connection's C{503} line, close
    and log line cost about what a served one does, so refusing at the caps
    alone does not bound CPU (docs/reliability.md, finding 2).  So each
    source group (IPv6: /64) has an accept budget, a token bucket of
    C{accept_rate} connections a second and C{accept_burst} at once in a
    fixed-size hashed table (L{natbypass.stun.server.RateLimiter}); a
    connection that would be refused at a cap costs C{refusal_cost} tokens.
    A connection over the budget is closed as it is accepted: no reply, no
    protocol, no log line (C{buildProtocol} returns None, or an abort for
    wrapping transports: C{drop_by_none=False}); counted as
    C{refused:accept-rate}.
    """

    def __init__(self, state: SignalingState, *, drop_by_none: bool = True, salt: bytes | None = None) -> None:
        self.state = state
        self.protocols: set[SignalingServerProtocol] = set()
        self._idle_waiters: list[Deferred[None]] = []
        lim = state.limits
        self.accepts = (
            RateLimiter(lim.accept_rate, state.clock, max(1.0, lim.accept_burst), salt=salt)
            if lim.accept_rate > 0
            else None
        )
        #: Refuse by returning None from C{buildProtocol} (plain TCP ports), else by an aborting protocol.
        self.drop_by_none = drop_by_none

    def buildProtocol(self, addr: Any) -> SignalingServerProtocol | Protocol | None:
        accepts = self.accepts
        if accepts is not None:
            host = getattr(addr, "host", "?")
            state = self.state
            # One token now (a flood is dropped here, at the least cost); a refusal at a cap takes the rest of its cost.
            if not accepts.allow(host) or (
                not state.admits(host) and not accepts.allow(host, state.limits.refusal_cost - 1)
            ):
                state.count("refused:accept-rate")
                return None if self.drop_by_none else _DROP
        p = SignalingServerProtocol(self.state, self.state.limits.max_line)
        p.factory = self
        self.protocols.add(p)
        return p

    def gone(self, protocol: SignalingServerProtocol) -> None:
        """C{protocol}'s connection is closed."""
        self.protocols.discard(protocol)
        if not self.protocols:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def whenIdle(self) -> Deferred[None]:
        """A Deferred that fires once no connection is left."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def abortAll(self) -> int:
        """Abort every connection still open; how many there were."""
        lingering = list(self.protocols)
        for p in lingering:
            p.abort()
        return len(lingering)

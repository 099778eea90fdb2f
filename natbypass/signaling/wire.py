"""
Line codec of the signalling protocol: one JSON object per line, no I/O.

Every message is a frozen dataclass with a wire name (C{op}).  Decoding is
strict (duplicate keys, unknown keys, wrong types, NaN, out-of-range numbers
are all refused) and fails in exactly one way, C{WireError}, which carries the
error code and reason the server sends back; so a protocol can turn any bad
line into a reply without a C{try} around anything else.  The direction
matters: the same C{op} may mean different things from client and server
(C{hello}), so there is one registry per direction.  See docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from natbypass.nat import NatSummary

PROTOCOL_NAME = "natbypass-signal"
#: Version 2 (issue 9): the greeting carries a nonce, C{register} proves possession of an identity key, ids are
#: bound to keys, and offers and sessions carry the registered fingerprint.  Version 1 is no longer spoken.
VERSIONS: tuple[int, ...] = (2,)
DEFAULT_MAX_LINE = 8192
MAX_RID = 2**53 - 1
MAX_CANDIDATES = 32
MAX_TEXT = 512
SESSION_KEY_BYTES = 32
#: Bytes of the greeting's per-connection nonce (base64url: 32 characters).
NONCE_BYTES = 24
#: Bytes of the client's random part of a timed registration proof (L{timed_nonce}).
CNONCE_BYTES = 16
#: Accepted nonce lengths when decoding a greeting (bytes).
NONCE_RANGE = (16, 64)
#: A raw Ed25519 public key (base64url: 43 characters) and signature (86 characters).
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

#: Error names and their numeric codes (HTTP-like, so people can guess them).
ERROR_CODES: Mapping[str, int] = {
    "bad-request": 400,
    "unknown-op": 400,
    "unauthorized": 401,
    "bad-proof": 401,
    "stale-proof": 401,
    "rejected": 403,
    "unknown-peer": 404,
    "unknown-offer": 404,
    "unknown-session": 404,
    "timeout": 408,
    "duplicate-id": 409,
    "id-bound": 409,
    "gone": 410,
    "out-of-order": 412,
    "line-too-long": 413,
    "rate-limited": 429,
    "internal-error": 500,
    "too-many-peers": 503,
    "too-many-ids": 503,
    "too-many-connections": 503,
    "shutting-down": 503,
    "cluster-unavailable": 503,
    "version-unsupported": 505,
}

#: At most this many candidates in a C{publish} (a peer's mapped addresses: one or two a protocol).
MAX_PUBLISHED = 8
#: What a C{publish} may carry: mapped addresses only.  Host candidates reveal a peer's LAN to whoever
#: connects; they go only to peers the application approved (docs/security.md, "Candidates").
PUBLISHABLE_KINDS = frozenset(("srflx", "portmap", "tcp-srflx", "tcp-portmap"))
#: Errors a C{revoke} may name (why an introduced session will not form).
REVOKE_ERRORS = ("rejected", "timeout", "gone")

CANDIDATE_KINDS: Mapping[str, str] = {
    "host": "udp",
    "srflx": "udp",
    "tcp-host": "tcp",
    "tcp-srflx": "tcp",
    # A port mapping the peer's gateway made (PCP, NAT-PMP, UPnP-IGD): docs/portmap.md.
    "portmap": "udp",
    "tcp-portmap": "tcp",
}
PROTOCOLS = ("udp", "tcp")
ROLES = ("controlling", "controlled")
OUTCOMES = ("connected", "failed", "timeout", "cancelled")

PEER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}\Z")
SERVER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
TOKEN = re.compile(r"[!-~]{1,256}\Z")  # printable ASCII, no spaces
FINGERPRINT = re.compile(r"[A-Za-z0-9:+/=_.-]{1,256}\Z")
#: Unpadded base64url (RFC 4648 section 5), as nonces, keys and signatures travel.
B64URL = re.compile(r"[A-Za-z0-9_-]{1,172}\Z")


class WireError(Exception):
    """
    A line or value that breaks the protocol.  C{error} is a key of
    C{ERROR_CODES}; C{rid} is the request id when it could be read, so the
    error reply still matches its request.
    """

    def __init__(self, error: str, reason: str, rid: int | None = None) -> None:
        super().__init__(f"{error}: {reason}")
        self.error = error
        self.code = ERROR_CODES[error]
        self.reason = reason
        self.rid = rid


def _check(ok: bool, reason: str) -> None:
    if not ok:
        raise ValueError(reason)


def b64url_encode(data: bytes) -> str:
    """C{data} as unpadded base64url text (how nonces, keys and signatures travel)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, name: str, low: int, high: int | None = None) -> bytes:
    """
    Strictly decode unpadded base64url: only the alphabet, no padding, and
    the canonical form (the unused low bits of the last character are zero,
    so one value has exactly one spelling); C{low}..C{high} bytes.

    @raise ValueError: naming C{name} and what is wrong.
    """
    high = low if high is None else high
    if not (isinstance(text, str) and B64URL.match(text)):
        raise ValueError(f"{name!r} must be unpadded base64url (A-Z a-z 0-9 - _)")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(f"{name!r} is not valid base64url") from None
    if b64url_encode(data) != text:
        raise ValueError(f"{name!r} is not canonical base64url")
    if not low <= len(data) <= high:
        size = f"{low}" if low == high else f"{low}..{high}"
        raise ValueError(f"{name!r} must encode {size} bytes, not {len(data)}")
    return data


# -- values ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """
    One address a peer might be reached at.  C{kind} fixes the transport:
    host/srflx are UDP (local, STUN-mapped), tcp-host/tcp-srflx are TCP.
    """

    kind: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if self.kind not in CANDIDATE_KINDS:
            raise ValueError(f"unknown candidate kind {self.kind!r}")
        _check(isinstance(self.host, str), "candidate host must be a string")
        object.__setattr__(self, "host", _normal_ip(self.host))
        if not (_is_int(self.port) and 0 < self.port < 65536):
            raise ValueError(f"candidate port {self.port!r} is not in 1..65535")

    @property
    def protocol(self) -> str:
        """C{udp} or C{tcp}, implied by the kind."""
        return CANDIDATE_KINDS[self.kind]

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "proto": self.protocol, "host": self.host, "port": self.port}

    @classmethod
    def from_wire(cls, obj: Any) -> Candidate:
        # The hot path of an offer (several candidates each way): plain checks, no _Fields.
        _check(
            type(obj) is dict and obj.keys() == _CANDIDATE_FIELDS, "a candidate is exactly {kind, proto, host, port}"
        )
        kind, proto = obj["kind"], obj["proto"]
        c = cls(kind, obj["host"], obj["port"])
        if proto != c.protocol:
            raise ValueError(f"candidate kind {kind!r} is {c.protocol}, not {proto!r}")
        return c


_CANDIDATE_FIELDS = frozenset(("kind", "proto", "host", "port"))


def _normal_ip(host: str) -> str:
    """An IPv4 or IPv6 literal in its canonical text form (no names, no zone ids)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, host))
    except (OSError, ValueError):  # ValueError: embedded NUL
        raise ValueError(f"candidate host {host[:64]!r} is not an IP address") from None


def nat_to_wire(nat: NatSummary) -> dict[str, Any]:
    """The C{nat} object of a description (C{udp_blocked} stays local)."""
    out: dict[str, Any] = {
        "mapping": nat.mapping.value,
        "filtering": nat.filtering.value,
        "port_preserving": nat.port_preserving,
    }
    if nat.port_delta is not None:
        out["port_delta"] = nat.port_delta
    if nat.tcp_mapping is not None:
        out["tcp_mapping"] = nat.tcp_mapping.value
    return out


def nat_from_wire(obj: Any) -> NatSummary:
    """Read a C{nat} object into the shared vocabulary (L{natbypass.nat})."""
    f = _Fields(obj, "nat")
    delta = f.get("port_delta")
    _check(delta is None or _is_int(delta), "port_delta must be an integer")
    n = NatSummary(
        f.text("mapping") or "unknown",
        f.text("filtering") or "unknown",
        f.boolean("port_preserving"),
        delta,
        f.text("tcp_mapping"),
    )
    f.done()
    return n


def wish_to_wire(wish: tuple[str, ...]) -> str | list[str]:
    """C{()} means "auto"; one protocol is sent as a plain string."""
    if not wish:
        return "auto"
    if len(wish) == 1:
        return wish[0]
    return list(wish)


_VALID_WISHES = frozenset({("udp",), ("tcp",), ("udp", "tcp"), ("tcp", "udp")})


def wish_from_wire(value: Any) -> tuple[str, ...]:
    """
    The inverse of L{wish_to_wire}: C{()} for C{"auto"}.  Raises C{ValueError}
    for anything but a valid wish (an unknown or repeated protocol, an empty
    or too long list).
    """
    if value == "auto":
        return ()
    if isinstance(value, str):
        value = [value]
    _check(
        isinstance(value, list) and 0 < len(value) <= len(PROTOCOLS),
        "wish must be 'auto', 'udp', 'tcp' or a list of them",
    )
    if not all(isinstance(p, str) and p in PROTOCOLS for p in value):
        raise ValueError(f"wish {value!r} names an unknown protocol")
    _check(len(set(value)) == len(value), "wish lists a protocol twice")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class Description:
    """
    What one side tells the other through the mediator: candidates, NAT
    behaviour, protocol wish (C{()} = auto) and a public-key fingerprint.

    In an C{Offer} and a C{Session}, C{fingerprint} is the B{registered}
    fingerprint of the other side's identity key, written by the mediator (in
    C{connect} and C{accept} a peer may leave it out; whatever it sends there
    is replaced, never passed on).  It is the mediator's claim: the secure
    channel's handshake checks it (see docs/security.md).
    """

    candidates: tuple[Candidate, ...] = ()
    nat: NatSummary = NatSummary()
    wish: tuple[str, ...] = ()
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if len(self.candidates) > MAX_CANDIDATES:
            raise ValueError(f"more than {MAX_CANDIDATES} candidates")
        _check(all(isinstance(c, Candidate) for c in self.candidates), "candidates must be Candidate objects")
        wish = self.wish
        if type(wish) is not tuple or (wish and wish not in _VALID_WISHES):
            object.__setattr__(self, "wish", wish_from_wire(wish_to_wire(tuple(wish))))
        _check(
            self.fingerprint is None
            or (isinstance(self.fingerprint, str) and bool(FINGERPRINT.match(self.fingerprint))),
            "fingerprint must be 1-256 characters of [A-Za-z0-9:+/=_.-]",
        )

    def fields(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_wire() for c in self.candidates],
            "nat": nat_to_wire(self.nat),
            "wish": wish_to_wire(self.wish),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def read(cls, f: _Fields) -> Description:
        cands = f.get("candidates", [])
        _check(isinstance(cands, list), "candidates must be a list")
        if len(cands) > MAX_CANDIDATES:
            raise ValueError(f"more than {MAX_CANDIDATES} candidates")
        nat = f.get("nat")
        return cls(
            tuple(Candidate.from_wire(c) for c in cands),
            NatSummary() if nat is None else nat_from_wire(nat),
            wish_from_wire(f.get("wish", "auto")),
            f.text("fingerprint", pattern=FINGERPRINT),
        )


@dataclass(frozen=True, slots=True)
class Session:
    """
    The mediator's introduction, as one side sees it: who the peer is, how to
    reach it, the key that authenticates punch packets, the protocol order,
    and when to start: C{start_in_ms} after this message arrived.
    """

    id: str
    key: bytes
    peer: str
    role: str
    description: Description
    order: tuple[str, ...]
    start_in_ms: int
    rtt_ms: int | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.id, str) and bool(SERVER_ID.match(self.id)), "bad session id")
        if not (isinstance(self.key, bytes) and len(self.key) == SESSION_KEY_BYTES):
            raise ValueError(f"session key must be {SESSION_KEY_BYTES} bytes")
        _check(isinstance(self.peer, str) and bool(PEER_ID.match(self.peer)), "bad peer id")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        object.__setattr__(self, "order", tuple(self.order))
        _check(
            all(p in PROTOCOLS for p in self.order) and len(set(self.order)) == len(self.order), "bad protocol order"
        )
        _check(_is_int(self.start_in_ms) and 0 <= self.start_in_ms <= 600_000, "start_in_ms must be 0..600000")
        _check(
            self.rtt_ms is None or (_is_int(self.rtt_ms) and 0 <= self.rtt_ms <= 600_000), "rtt_ms must be 0..600000"
        )

    @property
    def controlling(self) -> bool:
        return self.role == "controlling"

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": base64.b64encode(self.key).decode("ascii"),
            "peer": self.peer,
            "role": self.role,
            **self.description.fields(),
            "order": list(self.order),
            "start_in_ms": self.start_in_ms,
            "rtt_ms": self.rtt_ms,
        }

    @classmethod
    def read(cls, f: _Fields) -> Session:
        """Read the session fields from C{f} (the caller checks for leftovers)."""
        key_text = f.text("key", required=True)
        try:
            key = base64.b64decode(key_text, validate=True)
        except binascii.Error:
            raise ValueError("session key is not base64") from None
        order = f.get("order", [])
        _check(isinstance(order, list) and all(isinstance(p, str) for p in order), "order must be a list of protocols")
        return cls(
            f.text("id", required=True),
            key,
            f.text("peer", required=True),
            f.text("role", required=True),
            Description.read(f),
            tuple(order),
            f.integer("start_in_ms", required=True),
            f.integer("rtt_ms"),
        )


# -- field reading -------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Reads typed fields out of a decoded JSON object and notices leftovers."""

    __slots__ = ("_obj", "_seen", "_what")

    def __init__(self, obj: Any, what: str) -> None:
        if not isinstance(obj, dict):
            raise ValueError(f"{what} must be a JSON object")
        self._obj: dict[str, Any] = obj
        self._seen = set()
        self._what = what

    def get(self, name: str, default: Any = None) -> Any:
        self._seen.add(name)
        return self._obj.get(name, default)

    def text(
        self, name: str, required: bool = False, pattern: re.Pattern[str] | None = None, limit: int = MAX_TEXT
    ) -> Any:
        v = self.get(name)
        if v is None:
            if required:
                raise ValueError(f"{self._what} needs {name!r}")
            return None
        if not isinstance(v, str):
            raise ValueError(f"{name!r} must be a string")
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{name!r} holds a lone surrogate (not valid Unicode)") from None
        if len(v) > limit:
            raise ValueError(f"{name!r} is longer than {limit} characters")
        if pattern is not None and not pattern.match(v):
            raise ValueError(f"{name!r} has a bad format")
        return v

    def integer(self, name: str, required: bool = False, low: int = 0, high: int = MAX_RID) -> Any:
        v = self.get(name)
        if v is None:
            if required:
                raise ValueError(f"{self._what} needs {name!r}")
            return None
        if not (_is_int(v) and low <= v <= high):
            raise ValueError(f"{name!r} must be an integer in {low}..{high}")
        return v

    def boolean(self, name: str) -> bool | None:
        v = self.get(name)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{name!r} must be true, false or null")
        return v

    def done(self) -> None:
        extra = self._obj.keys() - self._seen
        if extra:
            raise ValueError(f"unknown field(s) in {self._what}: {', '.join(sorted(extra))[:200]}")


# -- messages -------------------------------------------------------------------

M = TypeVar("M", bound="Message")


class Message:
    """Base of all messages; C{op} is the wire name."""

    op: ClassVar[str]
    __slots__ = ()

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, **self.body()}

    @classmethod
    def read(cls: type[M], f: _Fields) -> M:
        raise NotImplementedError


class Request(Message):
    """A message that expects a reply with the same C{rid}."""

    __slots__ = ()
    rid: int


@dataclass(frozen=True, slots=True)
class Hello(Request):
    """Client's answer to the greeting: the version it will speak."""

    op: ClassVar[str] = "hello"
    rid: int
    v: int
    agent: str | None = None

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, "v": self.v, "agent": self.agent}

    @classmethod
    def read(cls, f: _Fields) -> Hello:
        return cls(
            f.integer("rid", required=True), f.integer("v", required=True, high=1000), f.text("agent", limit=128)
        )


@dataclass(frozen=True, slots=True)
class Register(Request):
    """
    Claim a peer id with an identity key.

    C{key} is the raw 32-byte Ed25519 public key; C{sig} its signature over
    L{natbypass.identity.registration_message}C{(nonce, id)}, the nonce being
    this connection's greeting's -- or, to register without waiting for the
    greeting, L{timed_nonce}C{(time, cnonce)}: the client's clock in ms and 16
    fresh random bytes, which the mediator accepts within its proof window
    and once (L{proof_nonce}).  C{replace} takes the id over from another
    live connection registered with the same key (a stale one of ours), or,
    with a token bound to the id, with any key.
    """

    op: ClassVar[str] = "register"
    rid: int
    id: str
    key: bytes
    sig: bytes
    token: str | None = None
    replace: bool = False
    #: The client's clock (ms since the epoch) of a timed proof, with its C{cnonce}.
    time: int | None = None
    cnonce: bytes | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.key, bytes) and len(self.key) == PUBLIC_KEY_BYTES, "key must be 32 bytes")
        _check(isinstance(self.sig, bytes) and len(self.sig) == SIGNATURE_BYTES, "sig must be 64 bytes")
        _check((self.time is None) == (self.cnonce is None), "time and cnonce go together")
        _check(self.time is None or (_is_int(self.time) and 0 <= self.time <= MAX_RID), "time must be ms since 1970")
        _check(
            self.cnonce is None or (isinstance(self.cnonce, bytes) and len(self.cnonce) == CNONCE_BYTES),
            f"cnonce must be {CNONCE_BYTES} bytes",
        )

    def body(self) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "id": self.id,
            "key": b64url_encode(self.key),
            "sig": b64url_encode(self.sig),
            "token": self.token,
            "replace": self.replace or None,
            "time": self.time,
            "cnonce": None if self.cnonce is None else b64url_encode(self.cnonce),
        }

    @classmethod
    def read(cls, f: _Fields) -> Register:
        cnonce = f.text("cnonce", limit=32)
        return cls(
            f.integer("rid", required=True),
            f.text("id", required=True, pattern=PEER_ID),
            b64url_decode(f.text("key", required=True, limit=64), "key", PUBLIC_KEY_BYTES),
            b64url_decode(f.text("sig", required=True, limit=128), "sig", SIGNATURE_BYTES),
            f.text("token", pattern=TOKEN),
            bool(f.boolean("replace")),
            f.integer("time"),
            None if cnonce is None else b64url_decode(cnonce, "cnonce", CNONCE_BYTES),
        )

    def proof_nonce(self, greeting_nonce: bytes) -> bytes:
        """What C{sig} signs: the timed nonce when C{time} is given, else the greeting's."""
        return greeting_nonce if self.time is None else timed_nonce(self.time, self.cnonce or b"")


def timed_nonce(time_ms: int, cnonce: bytes) -> bytes:
    """
    The nonce a timed registration proof signs: C{T}, the time (8 bytes, ms),
    the client's random C{cnonce}.  Never the length of a greeting nonce, so
    the two kinds of proof cannot stand in for each other.
    """
    return b"T" + struct.pack("!Q", time_ms) + cnonce


@dataclass(frozen=True, slots=True)
class Connect(Request):
    """Ask the mediator to introduce us to C{peer}; the reply is a C{SessionReply} or an error."""

    op: ClassVar[str] = "connect"
    rid: int
    peer: str
    description: Description

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, "peer": self.peer, **self.description.fields()}

    @classmethod
    def read(cls, f: _Fields) -> Connect:
        return cls(f.integer("rid", required=True), f.text("peer", required=True, pattern=PEER_ID), Description.read(f))


@dataclass(frozen=True, slots=True)
class Accept(Request):
    """The target's yes to an C{Offer}, with its own description; the reply is a C{SessionReply}."""

    op: ClassVar[str] = "accept"
    rid: int
    offer: str
    description: Description

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, "offer": self.offer, **self.description.fields()}

    @classmethod
    def read(cls, f: _Fields) -> Accept:
        return cls(
            f.integer("rid", required=True), f.text("offer", required=True, pattern=SERVER_ID), Description.read(f)
        )


@dataclass(frozen=True, slots=True)
class Reject(Request):
    """The target's no to an C{Offer}."""

    op: ClassVar[str] = "reject"
    rid: int
    offer: str
    reason: str | None = None

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, "offer": self.offer, "reason": self.reason}

    @classmethod
    def read(cls, f: _Fields) -> Reject:
        return cls(f.integer("rid", required=True), f.text("offer", required=True, pattern=SERVER_ID), f.text("reason"))


@dataclass(frozen=True, slots=True)
class Publish(Request):
    """
    A registered peer's mapped candidates, NAT summary and wish, kept at the
    mediator for this connection, so a C{connect} to it is answered at once
    (an introduction in one round trip; docs/protocol.md 5.1).  At most
    L{MAX_PUBLISHED} candidates, mapped kinds only; no fingerprint (the
    mediator adds the registered one).  No candidates: nothing to offer
    early (the peer still takes introductions, and C{revoke}s).
    """

    op: ClassVar[str] = "publish"
    rid: int
    description: Description

    def __post_init__(self) -> None:
        d = self.description
        _check(isinstance(d, Description), "publish carries a Description")
        if len(d.candidates) > MAX_PUBLISHED:
            raise ValueError(f"more than {MAX_PUBLISHED} published candidates")
        hosts = sorted({c.kind for c in d.candidates} - PUBLISHABLE_KINDS)
        _check(not hosts, f"only mapped candidates are published, not {', '.join(hosts)}")
        _check(d.fingerprint is None, "publish carries no fingerprint (the registered one is used)")

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, **self.description.fields()}

    @classmethod
    def read(cls, f: _Fields) -> Publish:
        cands = f.get("candidates", [])
        _check(not isinstance(cands, list) or len(cands) <= MAX_PUBLISHED, f"more than {MAX_PUBLISHED} candidates")
        return cls(f.integer("rid", required=True), Description.read(f))


@dataclass(frozen=True, slots=True)
class Ping(Request):
    """Keepalive and RTT probe, sent by either side; answered by C{Pong}."""

    op: ClassVar[str] = "ping"
    rid: int

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid}

    @classmethod
    def read(cls, f: _Fields) -> Ping:
        return cls(f.integer("rid", required=True))


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Reply to C{Ping}."""

    op: ClassVar[str] = "pong"
    rid: int

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid}

    @classmethod
    def read(cls, f: _Fields) -> Pong:
        return cls(f.integer("rid", required=True))


@dataclass(frozen=True, slots=True)
class Report(Request):
    """How a punch attempt ended, for the mediator's statistics."""

    op: ClassVar[str] = "report"
    rid: int
    session: str
    outcome: str
    protocol: str | None = None
    detail: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
        _check(self.protocol is None or self.protocol in PROTOCOLS, "protocol must be udp, tcp or null")
        _check(
            (self.outcome == "connected") == (self.protocol is not None),
            "protocol is given exactly when the outcome is 'connected'",
        )

    def body(self) -> dict[str, Any]:
        return {
            "rid": self.rid,
            "session": self.session,
            "outcome": self.outcome,
            "protocol": self.protocol,
            "detail": self.detail,
        }

    @classmethod
    def read(cls, f: _Fields) -> Report:
        return cls(
            f.integer("rid", required=True),
            f.text("session", required=True, pattern=SERVER_ID),
            f.text("outcome", required=True),
            f.text("protocol"),
            f.text("detail"),
        )


def _check_repunch(session: Any, candidate: Any) -> None:
    """The fields both C{repunch} messages share: a session id, at most one srflx candidate."""
    _check(isinstance(session, str) and bool(SERVER_ID.match(session)), "bad session id")
    _check(
        candidate is None or (isinstance(candidate, Candidate) and candidate.kind == "srflx"),
        "a repunch names at most one srflx candidate",
    )


def _repunch_fields(session: str, candidate: Candidate | None) -> dict[str, Any]:
    return {"session": session, "candidate": None if candidate is None else candidate.to_wire()}


@dataclass(frozen=True, slots=True)
class Repunch(Request):
    """
    Re-punch an established UDP path whose peer went silent (its NAT may
    have rebound; docs/protocol.md, "Re-punch"): names the session the path
    was made in and, when the sender could learn it by STUN from the path's
    own socket, its current mapped address (one C{srflx} candidate; none
    from a NAT whose mapping depends on the destination).  Replied with
    C{ok}; the other peer of the session gets a L{RepunchNotice}.
    """

    op: ClassVar[str] = "repunch"
    rid: int
    session: str
    candidate: Candidate | None = None

    def __post_init__(self) -> None:
        _check_repunch(self.session, self.candidate)

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, **_repunch_fields(self.session, self.candidate)}

    @classmethod
    def read(cls, f: _Fields) -> Repunch:
        c = f.get("candidate")
        return cls(
            f.integer("rid", required=True),
            f.text("session", required=True, pattern=SERVER_ID),
            None if c is None else Candidate.from_wire(c),
        )


@dataclass(frozen=True, slots=True)
class Bye(Request):
    """Polite goodbye: the mediator replies and closes."""

    op: ClassVar[str] = "bye"
    rid: int

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid}

    @classmethod
    def read(cls, f: _Fields) -> Bye:
        return cls(f.integer("rid", required=True))


# server -> client


@dataclass(frozen=True, slots=True)
class Greeting(Message):
    """
    First line from the mediator: protocol name, the versions it speaks, and
    (version 2) this connection's fresh C{nonce}, which C{register} signs.
    The nonce is optional when decoding, so a client can still read an older
    mediator's greeting and say which versions do not meet.
    """

    op: ClassVar[str] = "hello"
    versions: tuple[int, ...] = VERSIONS
    auth: bool = False
    max_line: int = DEFAULT_MAX_LINE
    server: str | None = None
    nonce: bytes | None = None

    def __post_init__(self) -> None:
        _check(
            self.nonce is None
            or (isinstance(self.nonce, bytes) and NONCE_RANGE[0] <= len(self.nonce) <= NONCE_RANGE[1]),
            f"nonce must be {NONCE_RANGE[0]}..{NONCE_RANGE[1]} bytes",
        )

    def body(self) -> dict[str, Any]:
        return {
            "proto": PROTOCOL_NAME,
            "versions": list(self.versions),
            "auth": self.auth,
            "max_line": self.max_line,
            "server": self.server,
            "nonce": None if self.nonce is None else b64url_encode(self.nonce),
        }

    @classmethod
    def read(cls, f: _Fields) -> Greeting:
        if f.get("proto") != PROTOCOL_NAME:
            raise ValueError(f"not a {PROTOCOL_NAME} server")
        versions = f.get("versions")
        _check(
            isinstance(versions, list) and 0 < len(versions) <= 64 and all(_is_int(v) for v in versions),
            "versions must be a list of integers",
        )
        return cls(
            tuple(versions),
            bool(f.boolean("auth")),
            f.integer("max_line", required=True, low=256, high=2**24),
            f.text("server", limit=128),
            None if (nonce := f.text("nonce", limit=128)) is None else b64url_decode(nonce, "nonce", *NONCE_RANGE),
        )


@dataclass(frozen=True, slots=True)
class Ok(Message):
    """Success reply carrying nothing else."""

    op: ClassVar[str] = "ok"
    rid: int

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid}

    @classmethod
    def read(cls, f: _Fields) -> Ok:
        return cls(f.integer("rid", required=True))


@dataclass(frozen=True, slots=True)
class Registered(Message):
    """Success reply to C{Register}: the id is now bound to the key whose C{fingerprint} is given."""

    op: ClassVar[str] = "registered"
    rid: int
    id: str
    fingerprint: str

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, "id": self.id, "fingerprint": self.fingerprint}

    @classmethod
    def read(cls, f: _Fields) -> Registered:
        return cls(
            f.integer("rid", required=True),
            f.text("id", required=True, pattern=PEER_ID),
            f.text("fingerprint", required=True, pattern=FINGERPRINT),
        )


@dataclass(frozen=True, slots=True)
class SessionReply(Message):
    """Success reply to C{Connect} (initiator) and C{Accept} (target)."""

    op: ClassVar[str] = "session"
    rid: int
    session: Session

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, **self.session.to_wire()}

    @classmethod
    def read(cls, f: _Fields) -> SessionReply:
        return cls(f.integer("rid", required=True), Session.read(f))


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Failure reply; C{rid} is null when the line could not be matched to a request."""

    op: ClassVar[str] = "error"
    rid: int | None
    error: str
    reason: str
    code: int = 0

    def __post_init__(self) -> None:
        if self.error not in ERROR_CODES:
            raise ValueError(f"unknown error name {self.error!r}")
        if self.code == 0:
            object.__setattr__(self, "code", ERROR_CODES[self.error])
        _check(self.code == ERROR_CODES[self.error], "error code does not match its name")

    def body(self) -> dict[str, Any]:
        return {"rid": self.rid, "code": self.code, "error": self.error, "reason": self.reason}

    @classmethod
    def read(cls, f: _Fields) -> Error:
        return cls(
            f.integer("rid"),
            f.text("error", required=True),
            f.text("reason", required=True) or "",
            f.integer("code", required=True, low=100, high=999),
        )

    @classmethod
    def from_exception(cls, e: WireError) -> Error:
        return cls(e.rid, e.error, e.reason[:MAX_TEXT])


@dataclass(frozen=True, slots=True)
class Offer(Message):
    """An introduction request delivered to its target, answered with C{Accept} or C{Reject}."""

    op: ClassVar[str] = "offer"
    offer: str
    peer: str
    description: Description
    expires_in_ms: int

    def body(self) -> dict[str, Any]:
        return {
            "offer": self.offer,
            "peer": self.peer,
            **self.description.fields(),
            "expires_in_ms": self.expires_in_ms,
        }

    @classmethod
    def read(cls, f: _Fields) -> Offer:
        return cls(
            f.text("offer", required=True, pattern=SERVER_ID),
            f.text("peer", required=True, pattern=PEER_ID),
            Description.read(f),
            f.integer("expires_in_ms", required=True, high=3_600_000),
        )


@dataclass(frozen=True, slots=True)
class Introduce(Message):
    """
    An introduction in one round trip, delivered to a target that published:
    the offer (C{offer}, the initiator's description) and the session the
    initiator already has.  The target punches only after its application
    approved the initiator, then answers C{accept} (the reply is C{ok}); or
    it answers C{reject}, and the initiator's session is revoked.
    """

    op: ClassVar[str] = "introduce"
    offer: str
    session: Session
    expires_in_ms: int

    def __post_init__(self) -> None:
        _check(isinstance(self.session, Session), "introduce carries a Session")

    def body(self) -> dict[str, Any]:
        return {"offer": self.offer, **self.session.to_wire(), "expires_in_ms": self.expires_in_ms}

    @classmethod
    def read(cls, f: _Fields) -> Introduce:
        return cls(
            f.text("offer", required=True, pattern=SERVER_ID),
            Session.read(f),
            f.integer("expires_in_ms", required=True, high=3_600_000),
        )


@dataclass(frozen=True, slots=True)
class Revoke(Message):
    """
    A session handed out before the target approved will not form: the
    target rejected it, did not answer in time, or left.  Sent only to
    initiators that published (they know the event).
    """

    op: ClassVar[str] = "revoke"
    session: str
    error: str
    reason: str

    def __post_init__(self) -> None:
        if self.error not in REVOKE_ERRORS:
            raise ValueError(f"a revoke's error is one of {', '.join(REVOKE_ERRORS)}")

    def body(self) -> dict[str, Any]:
        return {"session": self.session, "error": self.error, "reason": self.reason}

    @classmethod
    def read(cls, f: _Fields) -> Revoke:
        return cls(
            f.text("session", required=True, pattern=SERVER_ID),
            f.text("error", required=True),
            f.text("reason", required=True) or "",
        )


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """An earlier C{Offer} is void (initiator left, or it expired); forget it."""

    op: ClassVar[str] = "cancel"
    offer: str
    reason: str

    def body(self) -> dict[str, Any]:
        return {"offer": self.offer, "reason": self.reason}

    @classmethod
    def read(cls, f: _Fields) -> Cancel:
        return cls(f.text("offer", required=True, pattern=SERVER_ID), f.text("reason", required=True) or "")


@dataclass(frozen=True, slots=True)
class RepunchNotice(Message):
    """
    The other peer of session C{session} asks to re-punch the path: probe
    C{candidate} (its current mapped address, checked by the mediator to be
    at the address it signals from) from the path's socket, or, without a
    candidate, the path's own remote address.
    """

    op: ClassVar[str] = "repunch"
    session: str
    candidate: Candidate | None = None

    def __post_init__(self) -> None:
        _check_repunch(self.session, self.candidate)

    def body(self) -> dict[str, Any]:
        return _repunch_fields(self.session, self.candidate)

    @classmethod
    def read(cls, f: _Fields) -> RepunchNotice:
        c = f.get("candidate")
        return cls(f.text("session", required=True, pattern=SERVER_ID), None if c is None else Candidate.from_wire(c))


CLIENT_MESSAGES: Mapping[str, type[Message]] = {
    m.op: m for m in (Hello, Register, Publish, Connect, Accept, Reject, Ping, Pong, Report, Repunch, Bye)
}
SERVER_MESSAGES: Mapping[str, type[Message]] = {
    m.op: m
    for m in (
        Greeting,
        Ok,
        Registered,
        SessionReply,
        Error,
        Offer,
        Introduce,
        Revoke,
        Cancel,
        RepunchNotice,
        Ping,
        Pong,
    )
}


# -- line codec ----------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return d


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# Built once: json.loads/json.dumps with options build a new decoder/encoder per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decode(line: bytes, registry: Mapping[str, type[Message]]) -> Message:
    """
    Parse one line (without its delimiter) into a message of C{registry}.
    Raises C{WireError} and nothing else.
    """
    rid: int | None = None
    try:
        text = line.decode("utf-8")
        obj = _DECODER.decode(text)
        _check(isinstance(obj, dict), "a message is one JSON object")
        r = obj.get("rid")
        if _is_int(r) and 0 <= r <= MAX_RID:
            rid = r
        op = obj.get("op")
        _check(isinstance(op, str), "message needs an 'op' string")
        cls = registry.get(op)
        if cls is None:
            raise WireError("unknown-op", f"unknown op {op[:64]!r}", rid)
        f = _Fields(obj, op)
        f.get("op")
        msg = cls.read(f)
        f.done()
        return msg
    except WireError:
        raise
    except UnicodeDecodeError:
        raise WireError("bad-request", "line is not UTF-8", rid) from None
    except (ValueError, RecursionError, TypeError) as e:
        raise WireError("bad-request", str(e)[:MAX_TEXT] or "malformed message", rid) from None


def decode_from_client(line: bytes) -> Message:
    """
    Decode a line a peer sent to the mediator: only L{CLIENT_MESSAGES} are
    accepted, so a peer cannot send the mediator's own replies.
    """
    return decode(line, CLIENT_MESSAGES)


def decode_from_server(line: bytes) -> Message:
    """Decode a line the mediator sent to a peer: only L{SERVER_MESSAGES} are accepted."""
    return decode(line, SERVER_MESSAGES)


def encode(msg: Message) -> bytes:
    """One message as one line, without the delimiter; None-valued optional fields are left out."""
    obj = {k: v for k, v in msg.to_wire().items() if v is not None or k == "rid"}
    return _ENCODER.encode(obj).encode("utf-8")

"""
Which protocol to try first, and racing the attempts (happy eyeballs).

:func:`decide` turns both peers' NAT behaviour, both applications' wishes and
what is known of the network into a :class:`Plan`: the protocol order, and for
each protocol whether it is expected to work, why (one row of the table in
``docs/selection.md``), and whether the peer's ports must be predicted.  It is
pure, and both peers reach the same order from the same facts.

:class:`HappyEyeballs` runs attempt factories in that order: the first at
once, each next one after a head start or as soon as everything running has
failed; the first connection wins, the rest are cancelled, and every attempt
is recorded in an :class:`Outcome`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

# The behaviour names natbypass.stun.discovery reports (RFC 4787 / RFC 5780 terms).
EI = "endpoint-independent"
AD = "address-dependent"
APD = "address-and-port-dependent"
NONE = "none"
UNKNOWN = "unknown"
BEHAVIOURS = (EI, AD, APD, NONE, UNKNOWN)

PROTOCOLS = ("udp", "tcp")
#: How long the first protocol runs alone before the next one starts.
DEFAULT_HEAD_START = 0.25
#: How many ports past the mapped one to probe on a predictable symmetric NAT.
DEFAULT_PREDICTION_SPAN = 8


class Kind(enum.StrEnum):
    """The NAT classes the table is written in (RFC 3489 names, refined)."""

    OPEN = "open"
    FULL_CONE = "full-cone"
    RESTRICTED = "restricted-cone"
    PORT_RESTRICTED = "port-restricted-cone"
    SYMMETRIC_PREDICTABLE = "symmetric-predictable"
    SYMMETRIC_RANDOM = "symmetric-random"
    UNKNOWN = "unknown"


def predictable_delta(ports: Sequence[int], max_delta: int = 16, min_flows: int = 3) -> int | None:
    """
    The step between successive mappings of a symmetric NAT, if there is one.

    ``ports`` are the public ports of successive new flows (in the order they
    were made); a constant, small, non-zero step means the next flow will get
    the last port plus that step.  Fewer than ``min_flows`` flows are too few
    to tell (two only for flows known to be made back to back).
    """
    distinct = list(dict.fromkeys(ports))
    if len(distinct) < max(2, min_flows):
        return None
    steps = {b - a for a, b in zip(distinct, distinct[1:])}
    if len(steps) != 1:
        return None
    (step,) = steps
    return step if 0 < abs(step) <= max_delta else None


@dataclass(frozen=True)
class NatSummary:
    """What selection needs to know of one side's NAT."""

    mapping: str = UNKNOWN
    filtering: str = UNKNOWN
    port_preserving: bool | None = None
    #: For a symmetric NAT that hands out ports in sequence: the step.
    port_delta: int | None = None
    #: The TCP mapping behaviour when measured apart from UDP's.
    tcp_mapping: str | None = None
    udp_blocked: bool = False

    def __post_init__(self) -> None:
        for name in ("mapping", "filtering"):
            if getattr(self, name) not in BEHAVIOURS:
                raise ValueError(f"{name} must be one of {BEHAVIOURS}, not {getattr(self, name)!r}")
        if self.tcp_mapping is not None and self.tcp_mapping not in BEHAVIOURS:
            raise ValueError(f"tcp_mapping must be one of {BEHAVIOURS}")

    @classmethod
    def from_behavior(cls, behavior: Any) -> NatSummary:
        """
        Summarise a ``natbypass.stun.discovery.NATBehavior`` (duck-typed: its public
        ``mapping``, ``filtering``, ``port_preserving``, ``reachable``,
        ``tcp_mapping`` and the mapped ports of its ``tests``).
        """
        ports = [
            t.mapped[1]
            for t in getattr(behavior, "tests", ())
            if getattr(t, "mapped", None) is not None
        ]
        delta = None
        if behavior.mapping in (AD, APD):
            # Other flows (the TCP tests, other programs) may take ports between
            # the first Binding and the two mapping tests; those two are sent
            # back to back, so their step alone is the NAT's when the whole
            # sequence is not regular.
            delta = predictable_delta(ports) or predictable_delta(ports[-2:], min_flows=2)
        return cls(
            mapping=behavior.mapping,
            filtering=behavior.filtering,
            port_preserving=behavior.port_preserving,
            port_delta=delta,
            tcp_mapping=getattr(behavior, "tcp_mapping", None),
            udp_blocked=not behavior.reachable,
        )

    def kind(self, protocol: str = "udp") -> Kind:
        """Which row of the table this NAT is, for ``protocol``."""
        mapping = self.tcp_mapping if protocol == "tcp" and self.tcp_mapping is not None else self.mapping
        if mapping == UNKNOWN:
            return Kind.UNKNOWN
        if mapping in (AD, APD):
            return Kind.SYMMETRIC_PREDICTABLE if self.port_delta else Kind.SYMMETRIC_RANDOM
        # Endpoint-independent mapping or no NAT: the filter decides.
        return {
            NONE: Kind.OPEN if mapping == NONE else Kind.FULL_CONE,
            EI: Kind.OPEN if mapping == NONE else Kind.FULL_CONE,
            AD: Kind.RESTRICTED,
            APD: Kind.PORT_RESTRICTED,
        }.get(self.filtering, Kind.UNKNOWN)


@dataclass(frozen=True)
class NetworkFacts:
    """What is known of the path apart from the NATs (from config or past attempts)."""

    udp_blocked: bool = False
    tcp_blocked: bool = False


@dataclass(frozen=True)
class Row:
    """One protocol's line of a plan: will it work, and why."""

    protocol: str
    local: Kind
    remote: Kind
    #: True: expected to work; False: expected to fail; None: unknown.
    expected: bool | None
    reason: str
    #: Probe the peer's mapped port + k*delta (k = 1..span) too; None: no need.
    predict_remote_delta: int | None = None


@dataclass(frozen=True)
class Plan:
    order: tuple[str, ...]
    rows: dict[str, Row]
    why: str
    head_start: float = DEFAULT_HEAD_START


_OPENISH = (Kind.OPEN, Kind.FULL_CONE)
_SYMMETRIC = (Kind.SYMMETRIC_PREDICTABLE, Kind.SYMMETRIC_RANDOM)

#: The table, for unordered pairs of kinds: (expected, reason).  The rows are
#: rendered, with these reasons, in docs/selection.md.
TABLE: dict[frozenset[Kind], tuple[bool | None, str]] = {}


def _row(a: Kind, b: Kind, expected: bool | None, reason: str) -> None:
    TABLE[frozenset((a, b))] = (expected, reason)


for _k in Kind:
    if _k is not Kind.UNKNOWN:
        _row(Kind.UNKNOWN, _k, None, "one side's NAT behaviour is unknown: try it and see")
_row(Kind.UNKNOWN, Kind.UNKNOWN, None, "neither NAT's behaviour is known: try it and see")
for _a in _OPENISH:
    for _b in Kind:
        if _b is not Kind.UNKNOWN:
            _row(
                _a,
                _b,
                True,
                "an open host / full-cone NAT accepts packets from anyone on its public port: "
                "the other side's first probe gets in, and the answer returns through the "
                "mapping that probe opened",
            )
for _b in (Kind.RESTRICTED, Kind.PORT_RESTRICTED, *_SYMMETRIC):
    _row(
        Kind.RESTRICTED,
        _b,
        True,
        "a restricted cone only checks the sender's IP: once it has probed the peer's IP, the "
        "peer's probes get in from whatever port the peer's NAT picked, and the answers "
        "return through the peer's own mapping",
    )
_row(
    Kind.PORT_RESTRICTED,
    Kind.PORT_RESTRICTED,
    True,
    "both keep one public port per socket (endpoint-independent mapping): each side's probe "
    "to the other's STUN-mapped address opens its own filter for the other's probes",
)
_row(
    Kind.PORT_RESTRICTED,
    Kind.SYMMETRIC_PREDICTABLE,
    True,
    "the symmetric NAT gives the flow to the peer a new port, but in sequence: the "
    "port-restricted side probes the predicted ports mapped+delta..mapped+k*delta",
)
_row(
    Kind.PORT_RESTRICTED,
    Kind.SYMMETRIC_RANDOM,
    False,
    "needs port prediction: the port-restricted side only accepts the exact address:port it "
    "sent to, and the symmetric NAT picks a random port for the flow to it",
)
_row(
    Kind.SYMMETRIC_PREDICTABLE,
    Kind.SYMMETRIC_PREDICTABLE,
    True,
    "both NATs give each new flow the next port in sequence: each side probes the other's "
    "predicted ports in the same order, so the i-th flows of both meet (fragile: any other "
    "traffic through either NAT shifts the sequence)",
)
_row(
    Kind.SYMMETRIC_PREDICTABLE,
    Kind.SYMMETRIC_RANDOM,
    False,
    "needs port prediction on both sides, and one NAT picks random ports",
)
_row(
    Kind.SYMMETRIC_RANDOM,
    Kind.SYMMETRIC_RANDOM,
    False,
    "needs port prediction: both NATs pick a random port for each new flow, so neither side "
    "knows where to send",
)
del _a, _b, _k
assert len(TABLE) == 28, len(TABLE)  # every unordered pair of the 7 kinds


def feasibility(local: NatSummary, remote: NatSummary, protocol: str) -> Row:
    """Look up ``protocol``'s row of the table for this pair of NATs."""
    kl, kr = local.kind(protocol), remote.kind(protocol)
    expected, reason = TABLE[frozenset((kl, kr))]
    delta = None
    if kr is Kind.SYMMETRIC_PREDICTABLE and kl in (Kind.PORT_RESTRICTED, *_SYMMETRIC):
        delta = remote.port_delta
    if protocol == "tcp" and expected:
        reason += "; over TCP the probes are crossing SYNs (simultaneous open)"
    return Row(protocol, kl, kr, expected, reason, delta)


Wish = str | Sequence[str]


def parse_wish(wish: Wish) -> tuple[str, ...] | None:
    """``"auto"`` -> None; ``"udp"`` -> ("udp",); a sequence -> that order."""
    items: Sequence[str] = (wish,) if isinstance(wish, str) else wish
    if isinstance(wish, str) and "," in wish:
        items = [w.strip() for w in wish.split(",")]
    if list(items) == ["auto"]:
        return None
    bad = [w for w in items if w not in PROTOCOLS]
    if bad or not items or len(set(items)) != len(items):
        raise ValueError(f"protocol wish must be 'auto', 'udp', 'tcp' or an ordered list of them, not {wish!r}")
    return tuple(items)


class NoCommonProtocol(ValueError):
    """The two peers' wishes share no protocol."""


def decide(
    local: NatSummary,
    remote: NatSummary,
    local_wish: Wish = "auto",
    remote_wish: Wish = "auto",
    local_role: int = 0,
    facts: NetworkFacts = NetworkFacts(),
    head_start: float = DEFAULT_HEAD_START,
) -> Plan:
    """
    The protocol order for this session (see docs/selection.md).

    Both peers get the same order: when both wishes name protocols, role 0's
    order is kept, restricted to what role 1 accepts.
    """
    rows = {p: feasibility(local, remote, p) for p in PROTOCOLS}
    blocked = {
        "udp": facts.udp_blocked or local.udp_blocked or remote.udp_blocked,
        "tcp": facts.tcp_blocked,
    }
    for p, is_blocked in blocked.items():
        if is_blocked:
            rows[p] = Row(p, rows[p].local, rows[p].remote, False, f"{p.upper()} is blocked on this path")
    wishes = (parse_wish(local_wish), parse_wish(remote_wish))
    first, second = wishes if local_role == 0 else wishes[::-1]
    if first is not None and second is not None:
        wanted = tuple(p for p in first if p in second)
        if not wanted:
            raise NoCommonProtocol(
                f"the peers want disjoint protocols ({','.join(first)} vs {','.join(second)}): "
                "ask for 'auto' or a common protocol"
            )
        return Plan(wanted, rows, "both peers asked for these protocols, in role 0's order", head_start)
    if first is not None or second is not None:
        wanted = first if first is not None else second
        return Plan(wanted, rows, "one peer asked for these protocols; the other left it to us", head_start)
    usable = [p for p in PROTOCOLS if not blocked[p]] or list(PROTOCOLS)
    if rows["udp"].expected is False and rows["tcp"].expected is True and "tcp" in usable:
        usable.sort(key=lambda p: p != "tcp")
        why = "auto: TCP first, the table expects UDP to fail on this pair of NATs"
    else:
        why = "auto: UDP first (one round trip to open, no SYN timers), TCP after a head start"
    if len(usable) == 1:
        why = f"auto: only {usable[0].upper()}, the other is blocked"
    return Plan(tuple(usable), rows, why, head_start)


# ------------------------------------------------------------ the race


@dataclass
class AttemptRecord:
    """One attempt of a race: times in ms since the race started."""

    protocol: str
    result: str = "not-started"  # connected | failed | cancelled | not-started
    started_ms: float | None = None
    ended_ms: float | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Outcome:
    """Every attempt of one connect, in the order they were planned."""

    attempts: list[AttemptRecord] = field(default_factory=list)
    winner: str | None = None

    def describe(self) -> str:
        return "; ".join(
            f"{a.protocol}: {a.result}"
            + (f" after {a.ended_ms - a.started_ms:.0f} ms" if a.ended_ms is not None and a.started_ms is not None else "")
            + (f" ({a.reason})" if a.reason else "")
            for a in self.attempts
        )

    def to_json(self) -> dict[str, Any]:
        return {"winner": self.winner, "attempts": [a.to_json() for a in self.attempts]}


class AllAttemptsFailed(Exception):
    """No attempt connected; ``outcome`` has each one's reason."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"every attempt failed: {outcome.describe()}")
        self.outcome = outcome


AttemptFactory = Callable[[], Deferred]


class HappyEyeballs:
    """
    Race attempt factories (callables returning a Deferred that fires with a
    connection): the first starts at once, each next one ``head_start``
    seconds after the previous or at once when nothing else is running.
    The first connection wins and running attempts are cancelled (attempt
    Deferreds must stop their work when cancelled, as punch_udp/punch_tcp do).
    """

    log = Logger()

    def __init__(
        self,
        attempts: Sequence[tuple[str, AttemptFactory]],
        clock: IReactorTime,
        head_start: float = DEFAULT_HEAD_START,
        outcome: Outcome | None = None,
    ) -> None:
        if not attempts:
            raise ValueError("nothing to attempt")
        self._factories = [f for _, f in attempts]
        self._clock = clock
        self._head_start = head_start
        self.outcome = outcome if outcome is not None else Outcome()
        self.outcome.attempts[:] = [AttemptRecord(p) for p, _ in attempts]
        self.outcome.winner = None
        self._running: dict[int, Deferred] = {}
        self._next = 0
        self._timer = None
        self._t0 = 0.0
        self._done = False
        self.deferred: Deferred = Deferred(lambda d: self._cancel())

    def start(self) -> Deferred:
        """Begin the race; returns :attr:`deferred`."""
        self._t0 = self._clock.seconds()
        self._launch()
        return self.deferred

    def _ms(self) -> float:
        return (self._clock.seconds() - self._t0) * 1000

    def _launch(self) -> None:
        self._timer = None
        if self._done or self._next >= len(self._factories):
            return
        i = self._next
        self._next += 1
        record = self.outcome.attempts[i]
        record.result, record.started_ms = "running", self._ms()
        try:
            d = self._factories[i]()
        except Exception as e:
            d = Deferred()
            d.errback(Failure(e))
        self._running[i] = d
        if self._next < len(self._factories):
            self._timer = self._clock.callLater(self._head_start, self._launch)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(i,), errbackArgs=(i,))

    def _succeeded(self, connection: Any, i: int) -> None:
        self._running.pop(i, None)
        record = self.outcome.attempts[i]
        record.ended_ms = self._ms()
        record.result = "connected"
        self.outcome.winner = record.protocol
        self._stop("another attempt won")
        self.deferred.callback(connection)

    def _failed(self, failure: Failure, i: int) -> None:
        self._running.pop(i, None)
        record = self.outcome.attempts[i]
        if record.result == "cancelled":
            return
        record.ended_ms = self._ms()
        record.result = "failed"
        record.reason = getattr(failure.value, "reason", None) or failure.getErrorMessage()
        if self._done:
            return
        if not self._running:
            if self._next < len(self._factories):
                if self._timer is not None and self._timer.active():
                    self._timer.cancel()
                self._launch()
                return
            self._done = True
            self.deferred.errback(AllAttemptsFailed(self.outcome))

    def _stop(self, why: str) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for i, d in list(self._running.items()):
            record = self.outcome.attempts[i]
            record.result, record.ended_ms, record.reason = "cancelled", self._ms(), why
            d.addErrback(lambda f: f.trap(CancelledError))
            d.cancel()
        self._running.clear()

    def _cancel(self) -> None:
        self._stop("cancelled by the caller")


def race(
    attempts: Sequence[tuple[str, AttemptFactory]],
    clock: IReactorTime,
    head_start: float = DEFAULT_HEAD_START,
    outcome: Outcome | None = None,
) -> Deferred:
    """
    Start a :class:`HappyEyeballs` race; returns its Deferred (the winning
    connection, or :class:`AllAttemptsFailed`).  Pass ``outcome`` to watch
    the attempts being recorded; it is filled in place.
    """
    return HappyEyeballs(attempts, clock, head_start, outcome).start()


def choose_order(
    offer_nat: Any, answer_nat: Any, wish_a: Sequence[str], wish_b: Sequence[str]
) -> list[str]:
    """
    The mediator's hook (``natbypass.signaling.server``): the order for a
    session from both descriptions' NAT summaries (anything with
    ``mapping``, ``filtering``, ``port_preserving``) and wishes (``()`` is
    auto).  The offering peer plays role 0.  ``[]`` when the wishes share
    no protocol.
    """

    def summary(nat: Any) -> NatSummary:
        return NatSummary(
            nat.mapping if nat.mapping in BEHAVIOURS else UNKNOWN,
            nat.filtering if nat.filtering in BEHAVIOURS else UNKNOWN,
            nat.port_preserving,
            port_delta=getattr(nat, "port_delta", None),
        )

    try:
        plan = decide(summary(offer_nat), summary(answer_nat), tuple(wish_a) or "auto", tuple(wish_b) or "auto")
    except NoCommonProtocol:
        return []
    return list(plan.order)

"""
Which protocol to try first: the pure selection policy shared by the
mediator and the peers.

L{decide} turns both peers' NAT behaviour (L{natbypass.nat.NatSummary}),
both applications' wishes and what is known of the network into a L{Plan}:
the protocol order, and for each protocol whether it is expected to work,
why (one row of the table in C{docs/selection.md}), and whether the peer's
ports must be predicted.  Both peers, and the mediator (L{choose_order}),
reach the same order from the same facts.  Racing the attempts is
L{natbypass.punch.race}'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from natbypass.nat import Mapping, NatKind, NatSummary

PROTOCOLS = ("udp", "tcp")
#: How long the first protocol runs alone before the next one starts.
DEFAULT_HEAD_START = 0.25


@dataclass(frozen=True)
class NetworkFacts:
    """What is known of the path apart from the NATs (from config or past attempts)."""

    udp_blocked: bool = False
    tcp_blocked: bool = False


@dataclass(frozen=True)
class Row:
    """One protocol's line of a plan: will it work, and why."""

    protocol: str
    local: NatKind
    remote: NatKind
    #: True: expected to work; False: expected to fail; None: unknown.
    expected: bool | None
    reason: str
    #: Probe the peer's mapped port + k*delta (k = 1..span) too; None: no need.
    predict_remote_delta: int | None = None
    #: Birthday punching (L{natbypass.punch.birthday}), UDP only: C{"probe"}
    #: when we are the endpoint-independent side that probes random ports of
    #: the peer's IP, C{"open"} when we are the random symmetric side that opens
    #: many sockets; None: a plain punch.
    birthday: str | None = None
    #: Expected to fail whatever is tried: the attempt fails at once with the
    #: reason instead of punching for its whole timeout.
    fail_fast: bool = False


@dataclass(frozen=True)
class Plan:
    """
    What L{decide} returns: the protocols in the order to try them, each one's
    L{Row}, why this order, and how long each attempt runs alone before the
    next one starts (C{head_start}).
    """

    order: tuple[str, ...]
    rows: dict[str, Row]
    why: str
    head_start: float = DEFAULT_HEAD_START


_OPENISH = (NatKind.OPEN, NatKind.FULL_CONE)
_SYMMETRIC = (NatKind.SYMMETRIC_PREDICTABLE, NatKind.SYMMETRIC_RANDOM)

#: The table, for unordered pairs of kinds: (expected, reason).  The rows are
#: rendered, with these reasons, in docs/selection.md.
TABLE: dict[frozenset[NatKind], tuple[bool | None, str]] = {}


def _row(a: NatKind, b: NatKind, expected: bool | None, reason: str) -> None:
    TABLE[frozenset((a, b))] = (expected, reason)


for _k in NatKind:
    if _k is not NatKind.UNKNOWN:
        _row(NatKind.UNKNOWN, _k, None, "one side's NAT behaviour is unknown: try it and see")
_row(NatKind.UNKNOWN, NatKind.UNKNOWN, None, "neither NAT's behaviour is known: try it and see")
for _a in _OPENISH:
    for _b in NatKind:
        if _b is not NatKind.UNKNOWN:
            _row(
                _a,
                _b,
                True,
                "an open host / full-cone NAT accepts packets from anyone on its public port: "
                "the other side's first probe gets in, and the answer returns through the "
                "mapping that probe opened",
            )
for _b in (NatKind.RESTRICTED, NatKind.PORT_RESTRICTED, *_SYMMETRIC):
    _row(
        NatKind.RESTRICTED,
        _b,
        True,
        "a restricted cone only checks the sender's IP: once it has probed the peer's IP, the "
        "peer's probes get in from whatever port the peer's NAT picked, and the answers "
        "return through the peer's own mapping",
    )
_row(
    NatKind.PORT_RESTRICTED,
    NatKind.PORT_RESTRICTED,
    True,
    "both keep one public port per socket (endpoint-independent mapping): each side's probe "
    "to the other's STUN-mapped address opens its own filter for the other's probes",
)
_row(
    NatKind.PORT_RESTRICTED,
    NatKind.SYMMETRIC_PREDICTABLE,
    True,
    "the symmetric NAT gives the flow to the peer a new port, but in sequence: the "
    "port-restricted side probes the predicted ports mapped+delta..mapped+k*delta",
)
_row(
    NatKind.PORT_RESTRICTED,
    NatKind.SYMMETRIC_RANDOM,
    True,
    "birthday punching: the symmetric side opens many sockets (256 by default) and sends from each to "
    "the port-restricted side's mapped address, so its NAT opens that many random public ports that "
    "accept it; the port-restricted side probes random ports of the symmetric side's IP, never one twice, "
    "until one lands (half the time within 174 probes, 99.9% within 2,048)",
)
_row(
    NatKind.SYMMETRIC_PREDICTABLE,
    NatKind.SYMMETRIC_PREDICTABLE,
    True,
    "both NATs give each new flow the next port in sequence: each side probes the other's "
    "predicted ports in the same order, so the i-th flows of both meet (fragile: any other "
    "traffic through either NAT shifts the sequence)",
)
#: What the hopeless rows add: they fail at once (L{Row.fail_fast}).
NO_PORT_MAPPING = (
    "; birthday punching needs one side with endpoint-independent mapping, and there is no port mapping "
    "on either side: fails at once (a port mapping, --port-mapping, on either side would make it work)"
)
_row(
    NatKind.SYMMETRIC_PREDICTABLE,
    NatKind.SYMMETRIC_RANDOM,
    False,
    "needs port prediction on both sides, and one NAT picks random ports" + NO_PORT_MAPPING,
)
_row(
    NatKind.SYMMETRIC_RANDOM,
    NatKind.SYMMETRIC_RANDOM,
    False,
    "needs port prediction: both NATs pick a random port for each new flow, so neither side knows where to send"
    + NO_PORT_MAPPING,
)
#: The TCP row of the birthday pair: TCP is not birthday-punched.
TCP_NO_BIRTHDAY = (
    "TCP is not birthday-punched: every guess is a connect() with its own SYN retransmission timers (hundreds of "
    "half-open connections in both NATs' tables), and the symmetric side's SYNs reach the other NAT unsolicited: one "
    "that rejects them answers with a RST that closes the socket and its mapping, so the open ports do not stay "
    "open; the pair is left to UDP"
)
_HOPELESS = (
    frozenset((NatKind.SYMMETRIC_PREDICTABLE, NatKind.SYMMETRIC_RANDOM)),
    frozenset((NatKind.SYMMETRIC_RANDOM,)),
)
_BIRTHDAY = frozenset((NatKind.PORT_RESTRICTED, NatKind.SYMMETRIC_RANDOM))
del _a, _b, _k
assert len(TABLE) == 28, len(TABLE)  # every unordered pair of the 7 kinds


def _unfiltered_guess(local: NatSummary, remote: NatSummary, kl: NatKind, kr: NatKind) -> bool:
    """
    Whether a random symmetric NAT meets one that keeps a port per socket
    (or no NAT) whose filtering is not known yet: a fresh peer's first offer,
    made after the mapping probe but before the filtering tests.  Its filter
    may be port-restricted, so the pair is birthday-punched (the plain
    candidates are probed alongside, so a lenient filter costs nothing but
    the extra sockets), rather than failing and retrying after discovery.
    """
    for kind, other, summary in ((kl, kr, local), (kr, kl, remote)):
        if kind is NatKind.UNKNOWN and other is NatKind.SYMMETRIC_RANDOM:
            return summary.mapping in (Mapping.ENDPOINT_INDEPENDENT, Mapping.NONE)
    return False


def feasibility(local: NatSummary, remote: NatSummary, protocol: str) -> Row:
    """Look up C{protocol}'s row of the table for this pair of NATs."""
    kl, kr = local.kind(protocol), remote.kind(protocol)
    expected, reason = TABLE[frozenset((kl, kr))]
    delta = None
    if kr is NatKind.SYMMETRIC_PREDICTABLE and kl in (NatKind.PORT_RESTRICTED, *_SYMMETRIC):
        delta = remote.port_delta
    pair = frozenset((kl, kr))
    birthday = None
    if pair == _BIRTHDAY:
        if protocol == "tcp":
            return Row(protocol, kl, kr, False, TCP_NO_BIRTHDAY)
        birthday = "open" if kl is NatKind.SYMMETRIC_RANDOM else "probe"
    elif protocol == "udp" and _unfiltered_guess(local, remote, kl, kr):
        birthday = "open" if kl is NatKind.SYMMETRIC_RANDOM else "probe"
    if protocol == "tcp" and expected:
        reason += "; over TCP the probes are crossing SYNs (simultaneous open)"
    return Row(protocol, kl, kr, expected, reason, delta, birthday, pair in _HOPELESS)


Wish = str | Sequence[str]


def parse_wish(wish: Wish) -> tuple[str, ...] | None:
    """C{"auto"} -> None; C{"udp"} -> ("udp",); a sequence -> that order."""
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
    elif rows["udp"].birthday and rows["tcp"].expected is True and "tcp" in usable:
        usable.sort(key=lambda p: p != "tcp")
        why = "auto: TCP first, UDP would need birthday punching (hundreds of sockets and probes) on this pair"
    else:
        why = "auto: UDP first (one round trip to open, no SYN timers), TCP after a head start"
    if len(usable) == 1:
        why = f"auto: only {usable[0].upper()}, the other is blocked"
    return Plan(tuple(usable), rows, why, head_start)


def choose_order(
    offer_nat: NatSummary, answer_nat: NatSummary, wish_a: Sequence[str], wish_b: Sequence[str]
) -> list[str]:
    """
    The mediator's order for a session, from both descriptions' NAT
    summaries and wishes (C{()} is auto).  The offering peer plays role 0.
    C{[]} when the wishes share no protocol.
    """
    try:
        plan = decide(offer_nat, answer_nat, tuple(wish_a) or "auto", tuple(wish_b) or "auto")
    except NoCommonProtocol:
        return []
    return list(plan.order)

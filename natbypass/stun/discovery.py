"""
NAT behaviour discovery (RFC 5780 sections 4.3 and 4.4) -> L{NATBehavior}.

Two layers.  The classification (L{classify_mapping}, L{classify_filtering},
L{natbypass.nat.classic_name}) is pure: test outcomes in, names out.  The test drivers
(L{discover_udp}, L{discover_tcp}, L{discover}) only sequence requests through
an L{natbypass.stun.client.IStunClient} (UDP) or a connect-and-bind callable
(TCP), so tests run them against an in-memory NAT and server on a Clock.

Order matters on UDP.  All tests use one socket, and the filtering tests run
right after the first Binding and before the mapping tests: a mapping test
sends to the server's alternate address, which would open an
address-dependent filter to the very packets the filtering tests expect it
to drop.  The two filtering tests run at once (neither sends to a new
destination), as do the two mapping tests, so detection costs one
filtering timeout plus a few round trips.

Values: mapping and filtering are L{natbypass.nat.Mapping} and
L{natbypass.nat.Filtering} members (the one NAT vocabulary).
Mapping is "none" when the mapped address is our own (no NAT); filtering is
"none" when, in addition, unsolicited packets from anywhere come through (no
NAT and no firewall: "open").  Behind no NAT but a filtering firewall the
filtering is reported as measured ("symmetric-firewall").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from natbypass.address import is_wildcard
from natbypass.nat import ClassicName, Filtering, Mapping, NatSummary, classic_name, predictable_delta
from natbypass.stun.client import (
    NETWORK_ERRORS,
    Address,
    IStunClient,
    RetransmitPolicy,
    StunErrorResponse,
    StunTimeout,
    TCPBinding,
    binding_request,
    format_address,
    mapped_address,
    other_address,
)
from natbypass.stun.message import ChangeRequest

log = Logger()

#: Default timers: the first Binding may need retransmissions over a lossy
#: path; the filtering tests expect silence and give up sooner.
DEFAULT_TIMEOUT = 3.0


# ----------------------------------------------------------- pure logic


def classify_mapping(
    local: Address | None,
    primary: Address | None,
    alt_ip: Address | None,
    alt_ip_port: Address | None,
) -> Mapping:
    """
    RFC 5780 4.3 from the mapped addresses of test I (to the primary
    address), test II (alternate IP, primary port) and test III (alternate
    IP and port); None where a test got no answer.
    """
    if primary is None:
        return Mapping.UNKNOWN
    if local is not None and primary == local:
        return Mapping.NONE
    if alt_ip is not None:
        if alt_ip == primary:
            return Mapping.ENDPOINT_INDEPENDENT
        if alt_ip_port is None:
            return Mapping.UNKNOWN
        return Mapping.ADDRESS_DEPENDENT if alt_ip_port == alt_ip else Mapping.ADDRESS_AND_PORT_DEPENDENT
    if alt_ip_port is not None and alt_ip_port == primary:
        # Another IP and port got the same mapping: nothing depends on the
        # destination.  A different one could be either dependency.
        return Mapping.ENDPOINT_INDEPENDENT
    return Mapping.UNKNOWN


def classify_filtering(change_ip_port: bool | None, change_port: bool | None) -> Filtering:
    """
    RFC 5780 4.4 from whether the answer to CHANGE-REQUEST(ip+port) and
    CHANGE-REQUEST(port) arrived: True answered, False silence, None the test
    could not be run or the server did not honour it.
    """
    if change_ip_port is True:
        return Filtering.ENDPOINT_INDEPENDENT
    if change_port is True:
        # The IP-changing answer did not come (or was not tested) while the
        # same-IP one did.
        return Filtering.ADDRESS_DEPENDENT if change_ip_port is False else Filtering.UNKNOWN
    if change_port is False:
        return Filtering.ADDRESS_AND_PORT_DEPENDENT
    return Filtering.UNKNOWN


def usable_other_address(server: Address, other: Address | None) -> tuple[Address | None, str | None]:
    """
    The server's alternate address if RFC 5780 tests can use it, else None
    and the reason (single-address servers, bogus answers).
    """
    if other is None:
        return None, (
            "the server gave no OTHER-ADDRESS (it has a single address or does not "
            "support RFC 5780): mapping beyond no-NAT and filtering cannot be determined"
        )
    if other[0] == server[0] or other[1] == server[1]:
        return None, (
            f"the server's OTHER-ADDRESS {format_address(other)} does not differ from "
            f"{format_address(server)} in both IP and port: RFC 5780 tests skipped"
        )
    return other, None


# ------------------------------------------------------------- results


@dataclass(frozen=True)
class TestResult:
    """One Binding transaction of the discovery and what came of it."""

    name: str
    destination: Address
    answered: bool
    mapped: Address | None = None
    source: Address | None = None
    other: Address | None = None
    elapsed_ms: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.elapsed_ms is not None:
            out["elapsed_ms"] = round(self.elapsed_ms, 1)
        for key in ("destination", "mapped", "source", "other"):
            if out[key] is not None:
                out[key] = format_address(out[key])
        return out


def port_step(mapping: Mapping, tests: Sequence[TestResult]) -> int | None:
    """
    The port step of a symmetric NAT from its mapping tests (in the order
    they were sent), or None when it has none or the tests do not show one.
    """
    if mapping not in (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT):
        return None
    ports = [t.mapped[1] for t in tests if t.mapped is not None]
    # Other flows (the TCP tests, other programs) may take ports between
    # the first Binding and the two mapping tests; those two are sent
    # back to back, so their step alone is the NAT's when the whole
    # sequence is not regular.
    return predictable_delta(ports) or predictable_delta(ports[-2:], min_flows=2)


@dataclass(frozen=True)
class MappingProbe:
    """
    What L{probe_mapping} found: the mapping behaviour and port step of the
    NAT, known before the filtering tests end (filtering is not measured).
    """

    mapping: Mapping
    port_delta: int | None
    tests: tuple[TestResult, ...] = ()

    def summary(self) -> NatSummary:
        """The summary an offer carries until full discovery ends: filtering unknown."""
        return NatSummary(self.mapping, port_delta=self.port_delta)


@dataclass(frozen=True)
class TCPBehavior:
    """The TCP mapping behaviour, measured from one local port."""

    mapping: Mapping
    public_address: Address | None
    local_address: Address | None
    tests: tuple[TestResult, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class NATBehavior:
    """What discovery found; C{notes} says what it could not determine and why."""

    server: Address
    reachable: bool
    mapping: Mapping
    filtering: Filtering
    nat_type: ClassicName
    public_address: Address | None
    local_address: Address | None
    port_preserving: bool | None
    other_address: Address | None = None
    tcp: TCPBehavior | None = None
    notes: tuple[str, ...] = ()
    tests: tuple[TestResult, ...] = ()
    elapsed_ms: float | None = None

    @property
    def tcp_mapping(self) -> Mapping | None:
        return self.tcp.mapping if self.tcp is not None else None

    def summary(self) -> NatSummary:
        """What protocol selection needs of this result (L{natbypass.nat.NatSummary})."""
        return NatSummary(
            self.mapping,
            self.filtering,
            self.port_preserving,
            port_delta=port_step(self.mapping, self.tests),
            tcp_mapping=self.tcp_mapping,
            udp_blocked=not self.reachable,
        )

    @property
    def tcp_reachable(self) -> bool:
        return self.tcp is not None and any(t.answered for t in self.tcp.tests)

    def to_json(self) -> dict[str, Any]:
        """The object C{natbypass detect --json} prints."""

        def addr(a: Address | None) -> str | None:
            return format_address(a) if a is not None else None

        out: dict[str, Any] = {
            "nat_type": self.nat_type,
            "mapping": self.mapping,
            "filtering": self.filtering,
            "public_address": addr(self.public_address),
            "local_address": addr(self.local_address),
            "port_preserving": self.port_preserving,
            "elapsed_ms": round(self.elapsed_ms) if self.elapsed_ms is not None else None,
            "server": addr(self.server),
            "other_address": addr(self.other_address),
            "reachable": self.reachable,
            "notes": list(self.notes),
            "tests": [t.to_json() for t in self.tests],
        }
        if self.tcp is not None:
            out["tcp_mapping"] = self.tcp.mapping
            out["tcp_public_address"] = addr(self.tcp.public_address)
            out["tcp_local_address"] = addr(self.tcp.local_address)
            out["tcp_notes"] = list(self.tcp.notes)
            out["tcp_tests"] = [t.to_json() for t in self.tcp.tests]
        return out


# ------------------------------------------------------------ UDP tests


def _all(deferreds: list[defer.Deferred]) -> defer.Deferred:
    """
    gatherResults that fails with the first failure itself, not FirstError
    (so cancelling discovery fails it with CancelledError), and cancels
    the rest when it is cancelled.
    """

    def unwrap(f):
        return f.value.subFailure if f.check(defer.FirstError) else f

    return defer.gatherResults(deferreds, consumeErrors=True).addErrback(unwrap)


def _describe(failure_value: BaseException) -> str:
    if isinstance(failure_value, StunTimeout):
        return "no answer"
    if isinstance(failure_value, StunErrorResponse):
        return f"error response {failure_value.code} {failure_value.reason}".strip()
    return f"{type(failure_value).__name__}: {failure_value}"


@defer.inlineCallbacks
def _udp_test(
    client: IStunClient,
    clock: IReactorTime,
    name: str,
    destination: Address,
    policy: RetransmitPolicy,
    change: ChangeRequest | None = None,
):
    """
    Run one Binding test; returns a L{TestResult} whatever the network does
    (L{NETWORK_ERRORS} are "no answer").  Fails only on a bug or when cancelled.
    """
    started = clock.seconds()
    attrs = (change,) if change is not None else ()
    try:
        response, source = yield client.request(binding_request(attrs), destination, policy)
    except NETWORK_ERRORS as e:  # no answer; anything else is a bug and fails discovery
        result = TestResult(
            name,
            destination,
            False,
            elapsed_ms=(clock.seconds() - started) * 1000,
            error=_describe(e),
        )
    else:
        result = TestResult(
            name,
            destination,
            True,
            mapped_address(response),
            source,
            other_address(response),
            (clock.seconds() - started) * 1000,
        )
    log.info(
        "{test} to {destination}: {outcome}",
        test=name,
        destination=destination,
        outcome=f"mapped {result.mapped}" if result.answered else result.error,
    )
    return result


def _changed_answer(result: TestResult, server: Address, change_ip: bool) -> tuple[bool | None, str | None]:
    """
    Whether a CHANGE-REQUEST test counts as answered: an answer from the
    address we did not ask the server to use would mean the server ignored
    the request, which says nothing about our filtering.
    """
    if not result.answered:
        if result.error and result.error.startswith("error response"):
            return None, f"the server refused CHANGE-REQUEST ({result.error}): filtering unknown"
        return False, None
    src = result.source
    if src is None:
        return True, None
    ok = src[1] != server[1] and ((src[0] != server[0]) if change_ip else (src[0] == server[0]))
    if ok:
        return True, None
    return None, (
        f"the server answered {result.name} from {format_address(src)}, not from a "
        f"changed {'IP and port' if change_ip else 'port'}: filtering unknown"
    )


@defer.inlineCallbacks
def discover_udp(
    client: IStunClient,
    server: Address,
    local: Address | None,
    clock: IReactorTime,
    *,
    policy: RetransmitPolicy | None = None,
    filtering_policy: RetransmitPolicy | None = None,
):
    """
    Run the RFC 5780 UDP tests from the socket behind C{client}, whose local
    address is C{local} (a concrete IP, not a wildcard, so that "no NAT" can
    be recognised).  Fires with a L{NATBehavior}; never fails because of
    the network (an unreachable server gives C{nat_type="udp-blocked"}).
    """
    policy = policy or RetransmitPolicy.within(DEFAULT_TIMEOUT, rto=0.25)
    filtering_policy = filtering_policy or RetransmitPolicy.within(DEFAULT_TIMEOUT / 2, rto=0.25)
    started = clock.seconds()
    notes: list[str] = []
    own = local  # what "no NAT" is recognised by
    if local is not None and is_wildcard(local[0]):
        notes.append("the local address is a wildcard: no-NAT cannot be recognised")
        own = None

    first = yield _udp_test(client, clock, "binding", server, policy)
    tests = [first]
    if not first.answered:
        notes.append(
            f"{first.error} from {format_address(server)} over UDP: the server is unreachable or UDP is blocked"
        )
        return NATBehavior(
            server,
            False,
            Mapping.UNKNOWN,
            Filtering.UNKNOWN,
            ClassicName.UDP_BLOCKED,
            None,
            local,
            None,
            notes=tuple(notes),
            tests=tuple(tests),
            elapsed_ms=(clock.seconds() - started) * 1000,
        )

    mapped = first.mapped
    if mapped is None:
        notes.append("the server's answer carried no mapped address")
    other, why = usable_other_address(server, first.other)
    if why:
        notes.append(why)

    change_ip_port: bool | None = None
    change_port: bool | None = None
    alt_ip = alt_ip_port = None
    if other is not None:
        both, port_only = yield _all(
            [
                _udp_test(
                    client,
                    clock,
                    "filtering-change-ip-port",
                    server,
                    filtering_policy,
                    ChangeRequest(change_ip=True, change_port=True),
                ),
                _udp_test(
                    client,
                    clock,
                    "filtering-change-port",
                    server,
                    filtering_policy,
                    ChangeRequest(change_ip=False, change_port=True),
                ),
            ]
        )
        tests += [both, port_only]
        change_ip_port, why = _changed_answer(both, server, True)
        if why:
            notes.append(why)
        change_port, why = _changed_answer(port_only, server, False)
        if why:
            notes.append(why)
        if own is None or mapped != own:  # with no NAT there is no mapping to test
            ii, iii = yield _all(
                [
                    _udp_test(client, clock, "mapping-alternate-ip", (other[0], server[1]), policy),
                    _udp_test(client, clock, "mapping-alternate-ip-port", other, policy),
                ]
            )
            tests += [ii, iii]
            alt_ip, alt_ip_port = ii.mapped, iii.mapped
            for t in (ii, iii):
                if not t.answered:
                    notes.append(f"{t.name} to {format_address(t.destination)}: {t.error}")

    mapping = classify_mapping(own, mapped, alt_ip, alt_ip_port)
    filtering = classify_filtering(change_ip_port, change_port)
    if mapping == Mapping.NONE and filtering == Filtering.ENDPOINT_INDEPENDENT:
        filtering = Filtering.NONE
    behavior = NATBehavior(
        server,
        True,
        mapping,
        filtering,
        classic_name(True, mapping, filtering),
        mapped,
        local,
        (mapped[1] == local[1]) if (mapped is not None and local is not None) else None,
        other,
        notes=tuple(notes),
        tests=tuple(tests),
        elapsed_ms=(clock.seconds() - started) * 1000,
    )
    log.info(
        "NAT behaviour: {nat_type} (mapping {mapping}, filtering {filtering})",
        nat_type=behavior.nat_type,
        mapping=mapping,
        filtering=filtering,
    )
    return behavior


@defer.inlineCallbacks
def probe_mapping(
    client: IStunClient,
    server: Address,
    local: Address | None,
    clock: IReactorTime,
    *,
    policy: RetransmitPolicy | None = None,
):
    """
    The mapping tests alone (RFC 5780 4.3: test I, then II and III back to
    back), from a socket of their own: two round trips, where L{discover_udp}
    must first wait out the filtering tests.  A peer's first offer carries
    what this finds, so a symmetric NAT's port step is known at once.  The
    socket behind C{client} must be used for nothing else: the tests open
    its filter to the alternate address.  Fires with a L{MappingProbe};
    never fails because of the network (unknown mapping then).
    """
    policy = policy or RetransmitPolicy.within(DEFAULT_TIMEOUT, rto=0.25)
    own = None if local is None or is_wildcard(local[0]) else local
    first = yield _udp_test(client, clock, "probe-binding", server, policy)
    tests = [first]
    other, _ = usable_other_address(server, first.other)
    alt_ip = alt_ip_port = None
    if first.mapped is not None and other is not None and first.mapped != own:
        ii, iii = yield _all(
            [
                _udp_test(client, clock, "probe-alternate-ip", (other[0], server[1]), policy),
                _udp_test(client, clock, "probe-alternate-ip-port", other, policy),
            ]
        )
        tests += [ii, iii]
        alt_ip, alt_ip_port = ii.mapped, iii.mapped
    mapping = classify_mapping(own, first.mapped, alt_ip, alt_ip_port)
    return MappingProbe(mapping, port_step(mapping, tests), tuple(tests))


# ------------------------------------------------------------ TCP tests

#: C{binder(remote, local)} -> Deferred[TCPBinding]: connect from C{local}
#: (port 0: any) with port reuse, do one Binding, close.  In production
#: C{functools.partial(natbypass.stun.client.tcp_binding, reactor)}.
TCPBinder = Callable[[Address, Address | None], defer.Deferred]


@defer.inlineCallbacks
def _tcp_test(binder: TCPBinder, clock: IReactorTime, name: str, destination: Address, local: Address | None):
    started = clock.seconds()
    try:
        result: TCPBinding = yield binder(destination, local)
    except NETWORK_ERRORS as e:  # refused, timed out, error response, closed: no answer
        out = TestResult(
            name,
            destination,
            False,
            elapsed_ms=(clock.seconds() - started) * 1000,
            error=_describe(e),
        )
        return out, None
    out = TestResult(
        name,
        destination,
        True,
        result.mapped,
        result.origin,
        result.other,
        (clock.seconds() - started) * 1000,
    )
    return out, result.local


@defer.inlineCallbacks
def discover_tcp(
    binder: TCPBinder,
    server: Address,
    clock: IReactorTime,
    *,
    local: Address | None = None,
    other: Address | None = None,
):
    """
    TCP mapping behaviour: three connections from one local port (the
    first one picks it) to the primary address, the alternate IP and the
    alternate IP and port, compared like the UDP mapping tests.  C{other}
    is the alternate address if UDP already learned it.  Fires with a
    L{TCPBehavior}; never fails because of the network.
    """
    notes: list[str] = []
    first, bound = yield _tcp_test(binder, clock, "tcp-binding", server, local)
    tests = [first]
    if not first.answered:
        notes.append(f"no answer from {format_address(server)} over TCP: {first.error}")
        return TCPBehavior(Mapping.UNKNOWN, None, None, tuple(tests), tuple(notes))
    if bound is not None and is_wildcard(bound[0]):
        bound = None
    other, why = usable_other_address(server, first.other or other)
    if why:
        notes.append(why)
    alt_ip = alt_ip_port = None
    if other is not None and not (bound is not None and first.mapped == bound):
        results = yield _all(
            [
                _tcp_test(binder, clock, "tcp-mapping-alternate-ip", (other[0], server[1]), bound),
                _tcp_test(binder, clock, "tcp-mapping-alternate-ip-port", other, bound),
            ]
        )
        for t, _ in results:
            tests.append(t)
            if not t.answered:
                notes.append(f"{t.name} to {format_address(t.destination)}: {t.error}")
        alt_ip, alt_ip_port = results[0][0].mapped, results[1][0].mapped
    mapping = classify_mapping(bound, first.mapped, alt_ip, alt_ip_port)
    return TCPBehavior(mapping, first.mapped, bound, tuple(tests), tuple(notes))


@defer.inlineCallbacks
def discover(
    client: IStunClient,
    server: Address,
    local: Address | None,
    clock: IReactorTime,
    *,
    tcp_binder: TCPBinder | None = None,
    tcp_server: Address | None = None,
    policy: RetransmitPolicy | None = None,
    filtering_policy: RetransmitPolicy | None = None,
):
    """
    UDP discovery and, with C{tcp_binder}, the TCP mapping test at the same
    time (they use different sockets and cannot disturb each other).
    """
    started = clock.seconds()
    udp = discover_udp(client, server, local, clock, policy=policy, filtering_policy=filtering_policy)
    if tcp_binder is None:
        behavior = yield udp
    else:
        tcp = discover_tcp(tcp_binder, tcp_server or server, clock, local=(local[0], 0) if local is not None else None)
        behavior, tcp_behavior = yield _all([udp, tcp])
        behavior = replace(behavior, tcp=tcp_behavior)
    return replace(behavior, elapsed_ms=(clock.seconds() - started) * 1000)

"""
The NAT vocabulary: one definition of what a NAT does, shared by discovery,
selection, signalling and the lab.

Mapping and filtering behaviour use the terms of RFC 4787 and RFC 5780,
plus C{none} (no NAT: the mapped address is our own) and C{unknown} (not
measured or not measurable).  L{NatSummary} carries everything protocol
selection needs about one side; L{classic_name} derives the RFC 3489 name
people know; L{NatSummary.kind} derives the row of the selection table
(L{natbypass.selection}).

The values are C{StrEnum}s, so they compare equal to, and serialise as,
their wire spellings; the signalling codec converts at its edge only.
The lab's probe (L{natbypass.lab.probe}) keeps a classifier of its own on
purpose: it checks this product from outside.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

#: The largest port step between successive mappings taken as a sequence.
MAX_PORT_DELTA = 64


class Mapping(enum.StrEnum):
    """How a NAT maps an internal endpoint to a public one (RFC 4787 section 4.1)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    NONE = "none"
    UNKNOWN = "unknown"


class Filtering(enum.StrEnum):
    """Which inbound packets a NAT lets through to a mapping (RFC 4787 section 5)."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    NONE = "none"
    UNKNOWN = "unknown"


class ClassicName(enum.StrEnum):
    """The RFC 3489 names, as C{natbypass detect} reports them."""

    OPEN = "open"
    FULL_CONE = "full-cone"
    RESTRICTED_CONE = "restricted-cone"
    PORT_RESTRICTED_CONE = "port-restricted-cone"
    SYMMETRIC = "symmetric"
    SYMMETRIC_FIREWALL = "symmetric-firewall"
    UDP_BLOCKED = "udp-blocked"
    UNKNOWN = "unknown"


class NatKind(enum.StrEnum):
    """The classes the selection table is written in (RFC 3489 names, refined by port prediction)."""

    OPEN = "open"
    FULL_CONE = "full-cone"
    RESTRICTED = "restricted-cone"
    PORT_RESTRICTED = "port-restricted-cone"
    SYMMETRIC_PREDICTABLE = "symmetric-predictable"
    SYMMETRIC_RANDOM = "symmetric-random"
    UNKNOWN = "unknown"


_DEPENDENT = (Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT)


def classic_name(reachable: bool, mapping: str, filtering: str) -> ClassicName:
    """
    The RFC 3489 name of a NAT from its measured behaviour.

    @param reachable: whether the STUN server answered at all over UDP.
    """
    if not reachable:
        return ClassicName.UDP_BLOCKED
    if mapping == Mapping.NONE:
        if filtering in (Filtering.NONE, Filtering.ENDPOINT_INDEPENDENT):
            return ClassicName.OPEN
        if filtering in (Filtering.ADDRESS_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT):
            return ClassicName.SYMMETRIC_FIREWALL
        return ClassicName.UNKNOWN
    if mapping in _DEPENDENT:
        return ClassicName.SYMMETRIC
    if mapping == Mapping.ENDPOINT_INDEPENDENT:
        return {
            Filtering.ENDPOINT_INDEPENDENT: ClassicName.FULL_CONE,
            Filtering.ADDRESS_DEPENDENT: ClassicName.RESTRICTED_CONE,
            Filtering.ADDRESS_AND_PORT_DEPENDENT: ClassicName.PORT_RESTRICTED_CONE,
        }.get(Filtering(filtering), ClassicName.UNKNOWN)
    return ClassicName.UNKNOWN


def predictable_delta(ports: Sequence[int], max_delta: int = 16, min_flows: int = 3) -> int | None:
    """
    The step between successive mappings of a symmetric NAT, if there is one.

    C{ports} are the public ports of successive new flows (in the order they
    were made); a constant, small, non-zero step means the next flow will get
    the last port plus that step.  Fewer than C{min_flows} flows are too few
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


@dataclass(frozen=True, slots=True)
class NatSummary:
    """
    What protocol selection needs to know of one side's NAT.

    Strings are accepted for the behaviours and turned into the enums, so a
    value that is not part of the vocabulary fails here, with a C{ValueError}.
    """

    mapping: Mapping = Mapping.UNKNOWN
    filtering: Filtering = Filtering.UNKNOWN
    port_preserving: bool | None = None
    #: For a symmetric NAT that hands out ports in sequence: the step.
    port_delta: int | None = None
    #: The TCP mapping behaviour when it was measured apart from UDP's.
    tcp_mapping: Mapping | None = None
    #: The STUN server never answered over UDP.
    udp_blocked: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mapping", _member(Mapping, self.mapping, "mapping"))
        object.__setattr__(self, "filtering", _member(Filtering, self.filtering, "filtering"))
        if self.tcp_mapping is not None:
            object.__setattr__(self, "tcp_mapping", _member(Mapping, self.tcp_mapping, "tcp_mapping"))
        if self.port_preserving not in (True, False, None):
            raise ValueError("port_preserving must be true, false or None")
        delta = self.port_delta
        if delta is not None and (
            not isinstance(delta, int) or isinstance(delta, bool) or not 0 < abs(delta) <= MAX_PORT_DELTA
        ):
            raise ValueError(f"port_delta must be a non-zero integer within +-{MAX_PORT_DELTA}, or None")

    @property
    def classic(self) -> ClassicName:
        """The RFC 3489 name of this NAT (UDP)."""
        return classic_name(not self.udp_blocked, self.mapping, self.filtering)

    def kind(self, protocol: str = "udp") -> NatKind:
        """Which row of the selection table this NAT is, for C{protocol}."""
        mapping = self.tcp_mapping if protocol == "tcp" and self.tcp_mapping is not None else self.mapping
        if mapping == Mapping.UNKNOWN:
            return NatKind.UNKNOWN
        if mapping in _DEPENDENT:
            return NatKind.SYMMETRIC_PREDICTABLE if self.port_delta else NatKind.SYMMETRIC_RANDOM
        # Endpoint-independent mapping or no NAT: the filter decides.
        if self.filtering in (Filtering.NONE, Filtering.ENDPOINT_INDEPENDENT):
            return NatKind.OPEN if mapping == Mapping.NONE else NatKind.FULL_CONE
        return {
            Filtering.ADDRESS_DEPENDENT: NatKind.RESTRICTED,
            Filtering.ADDRESS_AND_PORT_DEPENDENT: NatKind.PORT_RESTRICTED,
        }.get(self.filtering, NatKind.UNKNOWN)


def _member(enum_type: type[enum.StrEnum], value: object, name: str) -> enum.StrEnum:
    try:
        return enum_type(value)
    except ValueError:
        known = ", ".join(m.value for m in enum_type)
        raise ValueError(f"{name} must be one of {known}, not {value!r}") from None

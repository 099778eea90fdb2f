"""
What a NAT lab should look like: a small, strict, JSON-shaped spec.

Pure data and parsing, no I/O: the lab builder, the command line and the
tests all share these types, and C{parse_spec(spec_to_json(s)) == s} holds
for every spec (checked with hypothesis).

A spec is a mapping C{{"sites": {NAME: SITE, ...}}}. A SITE is either a
preset name (C{"open"}, C{"firewall"}, C{"full-cone"}, ...; see
L{PRESETS}) or an object::

    {"nat": PRESET-NAME | {"mapping": ..., "filtering": ..., "inbound": ...,
                           "hairpin": bool, "udp_timeout": seconds,
                           "portmap": bool},  # a UPnP/NAT-PMP/PCP gateway
     "cgnat": PRESET-NAME | {...},    # a carrier NAT in series (CGNAT), same fields
     "homes": 2,                      # home NATs behind the carrier NAT (CGNAT sites only)
     "hosts": 2,                      # hosts on the LAN behind the (each home) NAT
     "delay_ms": 20, "jitter_ms": 2,  # one way, each direction of the WAN link
     "loss_pct": 1,                   # each direction of the WAN link
     "ip": "v4" | "dual"}             # dual: the NAT also routes IPv6, behind a stateful firewall

or C{{"kind": "open" | "firewall", "inbound": "drop" | "reject",
"ip": "v4" | "v6" | "dual", ...link}}, or a site preset (L{SITE_PRESETS}:
C{"cgnat"}, C{"cgnat-symmetric"}).  C{"ip"} (default C{"v4"}) picks the
site's address families; IPv6 comes from the benchmarking prefix
C{2001:2::/48} (RFC 5180) and is never NATed (see L{IpVersion}).

A CGNAT site is two NATs in series: each home NAT (C{"nat"}) sits on the
carrier NAT's (C{"cgnat"}) LAN in the shared address space 100.64.0.0/10,
and only the carrier NAT holds a public address.  CGNAT sites are IPv4
only (C{"ip": "v4"}): the lab does not route IPv6 through a carrier.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from natbypass.nat import Filtering, Mapping, NatSummary


class LabSpecError(ValueError):
    """The spec is malformed; the message says which field and why."""


class MappingRule(enum.StrEnum):
    """How the NAT picks the public port of an internal endpoint (RFC 4787 section 4.1)."""

    EIM_PP = "eim-pp"  # endpoint-independent, keeps the internal port when free
    EIM = "eim"  # endpoint-independent, rewrites the port (deterministic per endpoint)
    ADM = "adm"  # address-dependent
    APDM_RANDOM = "apdm-random"  # address-and-port-dependent, random port per flow
    APDM_SEQUENTIAL = "apdm-sequential"  # address-and-port-dependent, next port per flow


class FilteringRule(enum.StrEnum):
    """Which inbound packets the NAT lets through to a mapping (RFC 4787 section 5)."""

    EIF = "eif"  # anyone (full cone)
    ADF = "adf"  # only addresses the internal endpoint has sent to (restricted cone)
    APDF = "apdf"  # only address:port pairs it has sent to (port-restricted cone)


class Inbound(enum.StrEnum):
    """What happens to unsolicited inbound packets."""

    DROP = "drop"  # silently dropped, like most home routers
    REJECT = "reject"  # ICMP port unreachable / TCP RST


class IpVersion(enum.StrEnum):
    """
    The address families of a site.  IPv6 is never translated: an IPv6
    host has a public address behind, at most, a stateful firewall (as home
    routers do), so a NAT site's C{dual} means IPv4 NAT plus IPv6 firewall.
    """

    V4 = "v4"
    V6 = "v6"  # open and firewall sites only: a NAT site always has IPv4
    DUAL = "dual"

    @property
    def has_v4(self) -> bool:
        return self is not IpVersion.V6

    @property
    def has_v6(self) -> bool:
        return self is not IpVersion.V4


class SiteKind(enum.StrEnum):
    """
    What stands between a site's hosts and the public segment: nothing (open),
    a stateful firewall without NAT, or a NAT.
    """

    OPEN = "open"  # a host directly on the public segment
    FIREWALL = "firewall"  # a public host behind a stateful firewall, no NAT
    NAT = "nat"  # one or more hosts behind their own NAT


@dataclass(frozen=True)
class NatRules:
    """
    Everything that can be chosen about one NAT the lab builds (its nftables
    rules).  What a client should measure of it, in the shared vocabulary of
    L{natbypass.nat}, is L{expected_summary}.
    """

    mapping: MappingRule = MappingRule.EIM_PP
    filtering: FilteringRule = FilteringRule.APDF
    inbound: Inbound = Inbound.DROP
    hairpin: bool = False
    #: UDP mapping lifetime in seconds (conntrack timeout in the NAT); None keeps the kernel's.
    udp_timeout: int | None = 30
    #: The NAT is a port-mapping gateway (miniupnpd: UPnP-IGD, NAT-PMP, PCP; see natbypass.portmap.labgateway).
    portmap: bool = False


@dataclass(frozen=True)
class Link:
    """Impairments of a site's link to the public segment, per direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0

    @property
    def needs_wire(self) -> bool:
        """Delay and jitter need the userspace wire; loss alone is done by nftables."""
        return self.delay_ms > 0 or self.jitter_ms > 0


@dataclass(frozen=True)
class SiteSpec:
    """
    One site of the lab, as checked by L{parse_site}: its kind, its NAT rules
    (NAT sites only), its LAN hosts, its link impairments and, for firewalls,
    what happens to unsolicited packets.
    """

    name: str
    kind: SiteKind
    nat: NatRules | None = None
    hosts: int = 1
    link: Link = field(default_factory=Link)
    #: For firewall sites: what happens to unsolicited inbound packets.
    inbound: Inbound = Inbound.DROP
    #: Address families (IPv6 sites are firewalled, never NATed).
    ip: IpVersion = IpVersion.V4
    #: For CGNAT sites: the carrier NAT between the home NAT(s) and the public segment.
    cgnat: NatRules | None = None
    #: For CGNAT sites: how many home NATs (subscribers), each with C{hosts} hosts, share the carrier NAT.
    homes: int = 1


@dataclass(frozen=True)
class LabSpec:
    """A whole lab: its sites, in the order given.  What L{parse_spec} returns and L{spec_to_json} writes back."""

    sites: tuple[SiteSpec, ...]

    @property
    def ipv6(self) -> bool:
        """Whether any site has IPv6 (the public segment and the mediator then have it too)."""
        return any(s.ip.has_v6 for s in self.sites)

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


#: Classic NAT types by name; "open" and "firewall" are site kinds without NAT.
PRESETS: dict[str, NatRules | SiteKind] = {
    "open": SiteKind.OPEN,
    "firewall": SiteKind.FIREWALL,
    "full-cone": NatRules(MappingRule.EIM_PP, FilteringRule.EIF),
    "restricted-cone": NatRules(MappingRule.EIM_PP, FilteringRule.ADF),
    "port-restricted-cone": NatRules(MappingRule.EIM_PP, FilteringRule.APDF),
    "symmetric-random": NatRules(MappingRule.APDM_RANDOM, FilteringRule.APDF),
    "symmetric-predictable": NatRules(MappingRule.APDM_SEQUENTIAL, FilteringRule.APDF),
    # The same cones with a NAT that rewrites ports (no port preservation).
    "full-cone-rewrite": NatRules(MappingRule.EIM, FilteringRule.EIF),
    "restricted-cone-rewrite": NatRules(MappingRule.EIM, FilteringRule.ADF),
    "port-restricted-cone-rewrite": NatRules(MappingRule.EIM, FilteringRule.APDF),
}

#: Whole sites by name: a home NAT behind a carrier-grade NAT.  "cgnat" is the
#: common case (RFC 6888 asks carriers for endpoint-independent mapping; with
#: many subscribers per address the ports are rewritten), "cgnat-symmetric" a
#: carrier NAT that picks a random port per flow.
SITE_PRESETS: dict[str, dict[str, Any]] = {
    "cgnat": {"nat": "port-restricted-cone", "cgnat": "port-restricted-cone-rewrite"},
    "cgnat-symmetric": {"nat": "port-restricted-cone", "cgnat": "symmetric-random"},
}

#: Names that are not allowed as site names: they name other lab nodes.
RESERVED = frozenset({"mediator", "public", "med", "pub", "all"})
SITE_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
MAX_HOSTS = 8
MAX_HOMES = 8
MAX_SITES = 200


def _enum(cls: type[enum.StrEnum], value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise LabSpecError(f"{where}: {value!r} is not one of {choices}") from None


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise LabSpecError(f"{where}: expected a number from {low} to {high}, got {value!r}")
    return float(value)


def _check_keys(obj: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise LabSpecError(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


def parse_nat(obj: Any, where: str) -> NatRules:
    """A NAT behaviour from a preset name or an object of fields."""
    if isinstance(obj, str):
        preset = PRESETS.get(obj)
        if not isinstance(preset, NatRules):
            names = ", ".join(k for k, v in PRESETS.items() if isinstance(v, NatRules))
            raise LabSpecError(f"{where}: unknown NAT preset {obj!r}; known: {names}")
        return preset
    if not isinstance(obj, dict):
        raise LabSpecError(f"{where}: expected a preset name or an object")
    _check_keys(obj, {"preset", "mapping", "filtering", "inbound", "hairpin", "udp_timeout", "portmap"}, where)
    base = parse_nat(obj["preset"], f"{where}.preset") if "preset" in obj else NatRules()
    changes: dict[str, Any] = {}
    if "mapping" in obj:
        changes["mapping"] = _enum(MappingRule, obj["mapping"], f"{where}.mapping")
    if "filtering" in obj:
        changes["filtering"] = _enum(FilteringRule, obj["filtering"], f"{where}.filtering")
    if "inbound" in obj:
        changes["inbound"] = _enum(Inbound, obj["inbound"], f"{where}.inbound")
    if "hairpin" in obj:
        if not isinstance(obj["hairpin"], bool):
            raise LabSpecError(f"{where}.hairpin: expected true or false")
        changes["hairpin"] = obj["hairpin"]
    if "portmap" in obj:
        if not isinstance(obj["portmap"], bool):
            raise LabSpecError(f"{where}.portmap: expected true or false")
        changes["portmap"] = obj["portmap"]
    if "udp_timeout" in obj:
        t = obj["udp_timeout"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 86400):
            raise LabSpecError(f"{where}.udp_timeout: expected whole seconds from 1 to 86400, or null")
        changes["udp_timeout"] = t
    return replace(base, **changes)


def parse_site(name: str, obj: Any) -> SiteSpec:
    """One site from its preset name or object."""
    where = f"sites.{name}"
    if not isinstance(name, str) or not SITE_NAME.match(name) or name in RESERVED:
        raise LabSpecError(
            f"{where}: site names are 1-10 lowercase letters/digits starting with a letter, "
            f"not one of {', '.join(sorted(RESERVED))}"
        )
    if isinstance(obj, str) and obj in SITE_PRESETS:
        return parse_site(name, SITE_PRESETS[obj])
    if isinstance(obj, str):
        preset = PRESETS.get(obj)
        if preset is None:
            known = ", ".join([*PRESETS, *SITE_PRESETS])
            raise LabSpecError(f"{where}: unknown preset {obj!r}; known: {known}")
        if isinstance(preset, SiteKind):
            return SiteSpec(name, preset)
        return SiteSpec(name, SiteKind.NAT, nat=preset)
    if not isinstance(obj, dict):
        raise LabSpecError(f"{where}: expected a preset name or an object")
    _check_keys(
        obj, {"kind", "nat", "cgnat", "homes", "hosts", "delay_ms", "jitter_ms", "loss_pct", "inbound", "ip"}, where
    )
    ip = _enum(IpVersion, obj.get("ip", "v4"), f"{where}.ip")
    link = Link(
        delay_ms=_number(obj.get("delay_ms", 0), f"{where}.delay_ms", 0, 5000),
        jitter_ms=_number(obj.get("jitter_ms", 0), f"{where}.jitter_ms", 0, 5000),
        loss_pct=_number(obj.get("loss_pct", 0), f"{where}.loss_pct", 0, 100),
    )
    if link.jitter_ms > link.delay_ms:
        raise LabSpecError(f"{where}.jitter_ms: must not exceed delay_ms (delays never go negative)")
    if "nat" in obj:
        if obj.get("kind", "nat") != "nat":
            raise LabSpecError(f"{where}: 'nat' given but kind is {obj['kind']!r}")
        if "inbound" in obj:
            raise LabSpecError(f"{where}.inbound: set it inside 'nat' for NAT sites")
        hosts = obj.get("hosts", 1)
        if isinstance(hosts, bool) or not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise LabSpecError(f"{where}.hosts: expected a whole number from 1 to {MAX_HOSTS}")
        if not ip.has_v4:
            raise LabSpecError(f"{where}.ip: a NAT site has IPv4 ('v4' or 'dual'); IPv6 is not NATed")
        nat = parse_nat(obj["nat"], f"{where}.nat")
        cgnat, homes = _parse_carrier(obj, nat, where)
        if cgnat is not None and ip is not IpVersion.V4:
            raise LabSpecError(
                f"{where}.ip: CGNAT sites are IPv4 only ('v4'): the lab routes no IPv6 through a carrier NAT; "
                "for a dual-stack home use a NAT site without 'cgnat'"
            )
        return SiteSpec(name, SiteKind.NAT, nat=nat, hosts=hosts, link=link, ip=ip, cgnat=cgnat, homes=homes)
    if "cgnat" in obj or "homes" in obj:
        raise LabSpecError(f"{where}: 'cgnat' and 'homes' need a home NAT ('nat') in front of the carrier NAT")
    kind = _enum(SiteKind, obj.get("kind", "open"), f"{where}.kind")
    if kind is SiteKind.NAT:
        raise LabSpecError(f"{where}: kind 'nat' needs a 'nat' field")
    if "hosts" in obj and obj["hosts"] != 1:
        raise LabSpecError(f"{where}.hosts: only NAT sites have more than one host")
    inbound = _enum(Inbound, obj.get("inbound", "drop"), f"{where}.inbound")
    if kind is SiteKind.OPEN and "inbound" in obj:
        raise LabSpecError(f"{where}.inbound: open hosts accept everything; use kind 'firewall'")
    return SiteSpec(name, kind, hosts=1, link=link, inbound=inbound, ip=ip)


def _parse_carrier(obj: dict[str, Any], home: NatRules, where: str) -> tuple[NatRules | None, int]:
    """The carrier NAT and home count of a NAT site (None, 1 without C{"cgnat"})."""
    if "cgnat" not in obj:
        if "homes" in obj:
            raise LabSpecError(f"{where}.homes: only CGNAT sites (with 'cgnat') have several home NATs")
        return None, 1
    cgnat = parse_nat(obj["cgnat"], f"{where}.cgnat")
    if cgnat.portmap or home.portmap:
        raise LabSpecError(f"{where}: port-mapping gateways behind or as a carrier NAT are not built by the lab")
    homes = obj.get("homes", 1)
    if isinstance(homes, bool) or not isinstance(homes, int) or not 1 <= homes <= MAX_HOMES:
        raise LabSpecError(f"{where}.homes: expected a whole number from 1 to {MAX_HOMES}")
    return cgnat, homes


def parse_spec(obj: Any) -> LabSpec:
    """A LabSpec from decoded JSON; raises LabSpecError on anything unexpected."""
    if not isinstance(obj, dict):
        raise LabSpecError("spec: expected an object with a 'sites' field")
    _check_keys(obj, {"sites"}, "spec")
    sites = obj.get("sites")
    if not isinstance(sites, dict) or not sites:
        raise LabSpecError("spec.sites: expected a non-empty object of NAME: SITE")
    if len(sites) > MAX_SITES:
        raise LabSpecError(f"spec.sites: at most {MAX_SITES} sites")
    return LabSpec(tuple(parse_site(name, value) for name, value in sites.items()))


def loads(text: str) -> LabSpec:
    """A LabSpec from JSON text, or from a bare preset list like C{a=full-cone,b=open}."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            return parse_spec(json.loads(stripped))
        except json.JSONDecodeError as e:
            raise LabSpecError(f"spec: not valid JSON: {e}") from None
    sites: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in stripped.split(","))):
        name, sep, preset = item.partition("=")
        if not sep:
            raise LabSpecError(f"spec: {item!r}: expected NAME=PRESET (or a JSON object)")
        if name.strip() in sites:
            raise LabSpecError(f"spec: site {name.strip()!r} given twice")
        sites[name.strip()] = preset.strip()
    return parse_spec({"sites": sites})


def nat_to_json(nat: NatRules) -> dict[str, Any]:
    """
    One NAT's rules as JSON with every field spelled out (presets expanded),
    the form L{spec_to_json} writes and L{parse_nat} reads back.
    """
    out: dict[str, Any] = {
        "mapping": nat.mapping.value,
        "filtering": nat.filtering.value,
        "inbound": nat.inbound.value,
        "hairpin": nat.hairpin,
        "udp_timeout": nat.udp_timeout,
    }
    if nat.portmap:  # only when set, so specs without a gateway keep their canonical form
        out["portmap"] = True
    return out


def spec_to_json(spec: LabSpec) -> dict[str, Any]:
    """The canonical JSON form of a spec (every field spelled out)."""
    sites: dict[str, Any] = {}
    for s in spec.sites:
        link = {"delay_ms": s.link.delay_ms, "jitter_ms": s.link.jitter_ms, "loss_pct": s.link.loss_pct}
        if s.kind is SiteKind.NAT:
            assert s.nat is not None
            sites[s.name] = {"nat": nat_to_json(s.nat), "hosts": s.hosts, **link}
            if s.cgnat is not None:
                sites[s.name].update(cgnat=nat_to_json(s.cgnat), homes=s.homes)
        else:
            sites[s.name] = {"kind": s.kind.value, "inbound": s.inbound.value, **link}
            if s.kind is SiteKind.OPEN:
                del sites[s.name]["inbound"]
        if s.ip is not IpVersion.V4:  # only when set, so IPv4 specs keep their canonical form
            sites[s.name]["ip"] = s.ip.value
    return {"sites": sites}


def describe(nat: NatRules | None, kind: SiteKind = SiteKind.NAT, cgnat: NatRules | None = None) -> str:
    """A short human label, e.g. C{eim-pp/adf drop hairpin} or C{eim-pp/apdf drop + cgnat eim/apdf drop}."""
    if kind is not SiteKind.NAT or nat is None:
        return kind.value
    extra = (" hairpin" if nat.hairpin else "") + (" portmap" if nat.portmap else "")
    label = f"{nat.mapping.value}/{nat.filtering.value} {nat.inbound.value}{extra}"
    return label if cgnat is None else f"{label} + cgnat {describe(cgnat)}"


def describe_site(site: SiteSpec) -> str:
    """L{describe} of a whole site, its carrier NAT included."""
    return describe(site.nat, site.kind, site.cgnat)


_MAPPING_MEASURED = {
    MappingRule.EIM_PP: Mapping.ENDPOINT_INDEPENDENT,
    MappingRule.EIM: Mapping.ENDPOINT_INDEPENDENT,
    MappingRule.ADM: Mapping.ADDRESS_DEPENDENT,
    MappingRule.APDM_RANDOM: Mapping.ADDRESS_AND_PORT_DEPENDENT,
    MappingRule.APDM_SEQUENTIAL: Mapping.ADDRESS_AND_PORT_DEPENDENT,
}
_FILTERING_MEASURED = {
    FilteringRule.EIF: Filtering.ENDPOINT_INDEPENDENT,
    FilteringRule.ADF: Filtering.ADDRESS_DEPENDENT,
    FilteringRule.APDF: Filtering.ADDRESS_AND_PORT_DEPENDENT,
}


def expected_summary(site: SiteSpec) -> NatSummary:
    """
    The lab's ground truth for a site, in the shared NAT vocabulary: what a
    correct RFC 5780 client reports (UDP and TCP alike), and so the row of
    the selection table the site belongs to.
    """
    if site.kind is SiteKind.OPEN:
        return NatSummary(Mapping.NONE, Filtering.NONE, True)
    if site.kind is SiteKind.FIREWALL:
        return NatSummary(Mapping.NONE, Filtering.ADDRESS_AND_PORT_DEPENDENT, True)
    assert site.nat is not None
    nat = site.nat
    if site.cgnat is not None:
        return _in_series(nat, site.cgnat)
    return NatSummary(
        _MAPPING_MEASURED[nat.mapping],
        _FILTERING_MEASURED[nat.filtering],
        nat.mapping is MappingRule.EIM_PP,
        # The sequential NAT hands each new flow the next port.
        port_delta=1 if nat.mapping is MappingRule.APDM_SEQUENTIAL else None,
    )


#: Mapping and filtering from least to most restrictive.
_MAPPING_ORDER = (Mapping.ENDPOINT_INDEPENDENT, Mapping.ADDRESS_DEPENDENT, Mapping.ADDRESS_AND_PORT_DEPENDENT)
_FILTERING_ORDER = (Filtering.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT)


def _in_series(home: NatRules, carrier: NatRules) -> NatSummary:
    """
    What a client behind C{home} behind C{carrier} measures: the more
    dependent mapping of the two (a new port at either NAT is a new port
    outside), the stricter filter of the two (a packet must pass both),
    ports kept only when both keep them, and a port step of 1 when the last
    NAT to pick a port counts up: the carrier itself, or a sequential home
    NAT whose ports the carrier keeps.
    """
    mapping = max(_MAPPING_MEASURED[home.mapping], _MAPPING_MEASURED[carrier.mapping], key=_MAPPING_ORDER.index)
    filtering = max(
        _FILTERING_MEASURED[home.filtering], _FILTERING_MEASURED[carrier.filtering], key=_FILTERING_ORDER.index
    )
    sequential = carrier.mapping is MappingRule.APDM_SEQUENTIAL or (
        home.mapping is MappingRule.APDM_SEQUENTIAL and carrier.mapping is MappingRule.EIM_PP
    )
    preserving = home.mapping is MappingRule.EIM_PP and carrier.mapping is MappingRule.EIM_PP
    return NatSummary(mapping, filtering, preserving, port_delta=1 if sequential else None)


def preset_summary(preset: str | dict[str, Any]) -> NatSummary:
    """L{expected_summary} of a site built from the preset (or site object) C{preset}."""
    return expected_summary(parse_site("x", preset))

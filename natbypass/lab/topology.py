"""
The lab's layout computed from a spec: namespaces, links and addresses.

Pure (no I/O): L{plan} turns a L{LabSpec} and a lab id into the
list of nodes and links that L{natbypass.lab.netns} then creates.

Layout::

    public  ns  <lab>-pub       bridge br0, the "internet" 198.18.0.0/15 (no route out)
    mediator ns <lab>-med       198.18.0.2 and 198.18.0.3 (two addresses for RFC 5780)
    site i, open/firewall       <lab>-<site>      198.18.1.i on wan0
    site i, NAT                 <lab>-<site>-nat  198.18.1.i on wan0, 10.i.0.1/24 on bridge lan0
                                <lab>-<site>-hK   10.i.0.(K+1)/24 on eth0, default via 10.i.0.1
    site i, CGNAT               <lab>-<site>-cgn  198.18.1.i on wan0, 100.64.i.1/24 on bridge lan0
      home H (1..homes)         <lab>-<site>-nat[H]  100.64.i.(H+1)/24 on wan0, default via 100.64.i.1,
                                                  10.i.(H-1).1/24 on bridge lan0
                                <lab>-<site>-hK   10.i.(H-1).(k+1)/24, K = (H-1) * hosts + k

With IPv6 (a site with C{"ip": "v6"} or C{"dual"}; the benchmarking prefix
2001:2::/48 of RFC 5180, never routable)::

    public segment              2001:2::/64
    mediator                    2001:2::2 and 2001:2::3 (RFC 5780 over IPv6)
    site i, open/firewall       2001:2::1:i (i in hex) on wan0
    site i, NAT (dual)          2001:2::1:i on wan0, 2001:2:0:i::1/64 on lan0 (routed, not NATed)
                                host K: 2001:2:0:i::(K+1)/64, default via 2001:2:0:i::1

Every other node of the public segment routes 2001:2:0:i::/64 via 2001:2::1:i
(L{LabPlan.routes6}).  An IPv6-only site has no IPv4 address (C{public_ip}
None).

All interfaces are created directly inside lab namespaces, so names only
have to be unique per namespace and two labs never clash.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from .spec import LabSpec, Link, SiteKind, SiteSpec

#: Every namespace of every lab starts with this, followed by 6 hex digits.
PREFIX = "nbl"
LAB_ID = re.compile(rf"^{PREFIX}[0-9a-f]{{6}}$")
PUBLIC_NET = "198.18.0.0/15"
PUBLIC_PREFIXLEN = 15
MEDIATOR_ADDRESSES = ("198.18.0.2", "198.18.0.3")
PUBLIC_NET6 = "2001:2::/64"
PUBLIC_PREFIXLEN6 = 64
MEDIATOR_ADDRESSES6 = ("2001:2::2", "2001:2::3")


def site_ip6(index: int) -> str:
    """The public IPv6 address of site C{index} (its host, or its NAT's WAN side)."""
    return f"2001:2::1:{index:x}"


def lan_net6(index: int) -> str:
    """The routed IPv6 prefix of the LAN behind NAT site C{index}."""
    return f"2001:2:0:{index:x}::/64"


#: RFC 6598 shared address space: between home NATs and their carrier NAT.
SHARED_NET = "100.64.0.0/10"


def new_lab_id() -> str:
    """A fresh lab id such as C{nbl3fa2c1}."""
    return PREFIX + secrets.token_hex(3)


def lab_id_of_netns(name: str) -> str | None:
    """The lab id a namespace name belongs to, or None if it is not a lab's."""
    head = name.split("-", 1)[0]
    return head if LAB_ID.match(head) and name.startswith(head + "-") else None


@dataclass(frozen=True)
class Node:
    """One network namespace of the lab."""

    name: str  # how users address it: "mediator", "public", "a", "a.2", "a.nat"
    netns: str
    role: str  # "public", "mediator", "host", "nat"
    site: str | None = None
    #: "ADDR/LEN" on the interface C{iface}.
    addresses: tuple[str, ...] = ()
    iface: str = ""
    gateway: str | None = None
    gateway6: str | None = None

    @property
    def addresses6(self) -> tuple[str, ...]:
        """The IPv6 addresses among C{addresses} (without their prefix length)."""
        return tuple(a.split("/")[0] for a in self.addresses if ":" in a)


@dataclass(frozen=True)
class WanLink:
    """A site's (or the mediator's) link to the public bridge."""

    node: str  # node name of the inside end
    netns: str
    iface: str  # name inside C{netns}
    bridge_port: str  # name inside the public namespace
    link: Link


@dataclass(frozen=True)
class LanLink:
    """A host's link to the bridge of its NAT."""

    host_netns: str
    nat_netns: str
    bridge_port: str  # name inside the NAT namespace


@dataclass(frozen=True)
class Home:
    """A home NAT behind a carrier NAT: its node (address on the carrier's LAN), its LAN and its hosts."""

    nat: Node
    hosts: tuple[Node, ...]
    lan_net: str
    lan_gateway: str
    port: str  # its port on the carrier's bridge


@dataclass(frozen=True)
class SitePlan:
    """
    Where one site lives: its public IP, the border node that holds it (its
    NAT, the carrier NAT of a CGNAT site, or the host itself), its hosts and,
    for NAT sites, the LAN behind the border NAT (for CGNAT sites the
    carrier's LAN, on which the L{homes} sit).
    """

    spec: SiteSpec
    index: int
    public_ip: str | None  # None: an IPv6-only site
    border: Node  # the namespace holding the public address (the NAT, or the host itself)
    hosts: tuple[Node, ...]
    lan_net: str | None = None
    lan_gateway: str | None = None
    #: The site's public IPv6 address, and for a dual-stack NAT site its routed LAN prefix and gateway.
    public_ip6: str | None = None
    lan_net6: str | None = None
    lan_gateway6: str | None = None
    homes: tuple[Home, ...] = ()


@dataclass(frozen=True)
class LabPlan:
    """
    The whole layout of one lab as L{plan} computes it: the nodes and links
    L{natbypass.lab.netns} creates, and the lookups by name that the lab
    commands use.
    """

    lab_id: str
    public: Node
    mediator: Node
    sites: tuple[SitePlan, ...]
    wan_links: tuple[WanLink, ...]
    lan_links: tuple[LanLink, ...]

    @property
    def nodes(self) -> tuple[Node, ...]:
        out = [self.public, self.mediator]
        for s in self.sites:
            if s.spec.kind is SiteKind.NAT:
                out.append(s.border)
            out.extend(h.nat for h in s.homes)
            out.extend(s.hosts)
        return tuple(out)

    def node(self, name: str) -> Node:
        """The node called C{name}; a bare site name means its first host."""
        for n in self.nodes:
            if n.name == name:
                return n
        for s in self.sites:
            if s.spec.name == name:
                return s.hosts[0]
        known = ", ".join(n.name for n in self.nodes)
        raise KeyError(f"no lab node {name!r}; known: {known}")

    def routes6(self) -> tuple[tuple[str, str, str], ...]:
        """
        (namespace, prefix, via) of every IPv6 route the public segment
        needs: each node on it with IPv6 reaches each dual-stack NAT site's
        LAN through that site's NAT.
        """
        routed = [(s.lan_net6, s.public_ip6, s.border.netns) for s in self.sites if s.lan_net6 and s.public_ip6]
        on_segment = [self.mediator] + [s.border for s in self.sites]
        return tuple(
            (node.netns, prefix, via)
            for node in on_segment
            if node.addresses6
            for prefix, via, owner in routed
            if owner != node.netns
        )

    def site(self, name: str) -> SitePlan:
        for s in self.sites:
            if s.spec.name == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {', '.join(s.spec.name for s in self.sites)}")


def plan(spec: LabSpec, lab_id: str) -> LabPlan:
    """Names and addresses for every part of the lab described by C{spec}."""
    if not LAB_ID.match(lab_id):
        raise ValueError(f"bad lab id {lab_id!r}")
    public = Node("public", f"{lab_id}-pub", "public")
    mediator_v6 = tuple(f"{a}/{PUBLIC_PREFIXLEN6}" for a in MEDIATOR_ADDRESSES6) if spec.ipv6 else ()
    mediator = Node(
        "mediator",
        f"{lab_id}-med",
        "mediator",
        addresses=tuple(f"{a}/{PUBLIC_PREFIXLEN}" for a in MEDIATOR_ADDRESSES) + mediator_v6,
        iface="wan0",
    )
    wan_links = [WanLink("mediator", mediator.netns, "wan0", "m0", Link())]
    lan_links: list[LanLink] = []
    sites: list[SitePlan] = []
    for index, s in enumerate(spec.sites, start=1):
        public_ip = f"198.18.1.{index}" if s.ip.has_v4 else None
        public_ip6 = site_ip6(index) if s.ip.has_v6 else None
        wan_addr = (f"{public_ip}/{PUBLIC_PREFIXLEN}",) if public_ip else ()
        wan_addr += (f"{public_ip6}/{PUBLIC_PREFIXLEN6}",) if public_ip6 else ()
        if s.kind is SiteKind.NAT and s.cgnat is not None:
            site, links = _cgnat_site(s, index, lab_id)
            lan_links += links
        elif s.kind is SiteKind.NAT:
            lan_net, gw = f"10.{index}.0.0/24", f"10.{index}.0.1"
            net6 = lan_net6(index) if public_ip6 else None
            gw6 = f"2001:2:0:{index:x}::1" if public_ip6 else None
            border = Node(f"{s.name}.nat", f"{lab_id}-{s.name}-nat", "nat", s.name, wan_addr, "wan0")
            hosts = _lan_hosts(s.name, index, lab_id, 1, s.hosts, first=1, gateway6=gw6)
            lan_links += [LanLink(h.netns, border.netns, f"h{k}") for k, h in enumerate(hosts, start=1)]
            site = SitePlan(s, index, public_ip, border, hosts, lan_net, gw, public_ip6, net6, gw6)
        else:
            border = Node(f"{s.name}.1", f"{lab_id}-{s.name}", "host", s.name, wan_addr, "wan0")
            site = SitePlan(s, index, public_ip, border, (border,), public_ip6=public_ip6)
        sites.append(site)
        wan_links.append(WanLink(site.border.name, site.border.netns, "wan0", f"s{index}", s.link))
    return LabPlan(lab_id, public, mediator, tuple(sites), tuple(wan_links), tuple(lan_links))


def _lan_hosts(
    site: str, index: int, lab_id: str, home: int, count: int, first: int, gateway6: str | None = None
) -> tuple[Node, ...]:
    """
    The hosts of one LAN 10.i.(home-1).0/24, numbered from C{first}; with
    C{gateway6} (a dual-stack NAT site) also on its routed IPv6 prefix.
    """
    return tuple(
        Node(
            f"{site}.{first + k}",
            f"{lab_id}-{site}-h{first + k}",
            "host",
            site,
            (f"10.{index}.{home - 1}.{k + 2}/24",)
            + ((f"2001:2:0:{index:x}::{k + 2:x}/{PUBLIC_PREFIXLEN6}",) if gateway6 else ()),
            "eth0",
            gateway=f"10.{index}.{home - 1}.1",
            gateway6=gateway6,
        )
        for k in range(count)
    )


def _cgnat_site(s: SiteSpec, index: int, lab_id: str) -> tuple[SitePlan, list[LanLink]]:
    """A carrier NAT with the public address, home NATs on its 100.64.i.0/24 LAN, hosts behind each."""
    public_ip = f"198.18.1.{index}"
    carrier_net, carrier_gw = f"100.64.{index}.0/24", f"100.64.{index}.1"
    carrier = Node(
        f"{s.name}.cgn", f"{lab_id}-{s.name}-cgn", "nat", s.name, (f"{public_ip}/{PUBLIC_PREFIXLEN}",), "wan0"
    )
    homes, links, hosts = [], [], []
    for h in range(1, s.homes + 1):
        suffix = "" if h == 1 else str(h)
        nat = Node(
            f"{s.name}.nat{suffix}",
            f"{lab_id}-{s.name}-nat{suffix}",
            "nat",
            s.name,
            (f"100.64.{index}.{h + 1}/24",),
            "wan0",
            gateway=carrier_gw,
        )
        lan = _lan_hosts(s.name, index, lab_id, h, s.hosts, first=(h - 1) * s.hosts + 1)
        homes.append(Home(nat, lan, f"10.{index}.{h - 1}.0/24", f"10.{index}.{h - 1}.1", f"n{h}"))
        links.append(LanLink(nat.netns, carrier.netns, f"n{h}"))
        links += [LanLink(x.netns, nat.netns, f"h{k}") for k, x in enumerate(lan, start=1)]
        hosts += lan
    site = SitePlan(s, index, public_ip, carrier, tuple(hosts), carrier_net, carrier_gw, homes=tuple(homes))
    return site, links

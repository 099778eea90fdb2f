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
    public_ip: str
    border: Node  # the namespace holding the public address (the NAT, or the host itself)
    hosts: tuple[Node, ...]
    lan_net: str | None = None
    lan_gateway: str | None = None
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
    mediator = Node(
        "mediator",
        f"{lab_id}-med",
        "mediator",
        addresses=tuple(f"{a}/{PUBLIC_PREFIXLEN}" for a in MEDIATOR_ADDRESSES),
        iface="wan0",
    )
    wan_links = [WanLink("mediator", mediator.netns, "wan0", "m0", Link())]
    lan_links: list[LanLink] = []
    sites: list[SitePlan] = []
    for index, s in enumerate(spec.sites, start=1):
        public_ip = f"198.18.1.{index}"
        wan_addr = (f"{public_ip}/{PUBLIC_PREFIXLEN}",)
        if s.kind is SiteKind.NAT and s.cgnat is not None:
            site, links = _cgnat_site(s, index, lab_id)
            lan_links += links
        elif s.kind is SiteKind.NAT:
            lan_net, gw = f"10.{index}.0.0/24", f"10.{index}.0.1"
            border = Node(f"{s.name}.nat", f"{lab_id}-{s.name}-nat", "nat", s.name, wan_addr, "wan0")
            hosts = _lan_hosts(s.name, index, lab_id, 1, s.hosts, first=1)
            lan_links += [LanLink(h.netns, border.netns, f"h{k}") for k, h in enumerate(hosts, start=1)]
            site = SitePlan(s, index, public_ip, border, hosts, lan_net, gw)
        else:
            border = Node(f"{s.name}.1", f"{lab_id}-{s.name}", "host", s.name, wan_addr, "wan0")
            site = SitePlan(s, index, public_ip, border, (border,))
        sites.append(site)
        wan_links.append(WanLink(site.border.name, site.border.netns, "wan0", f"s{index}", s.link))
    return LabPlan(lab_id, public, mediator, tuple(sites), tuple(wan_links), tuple(lan_links))


def _lan_hosts(site: str, index: int, lab_id: str, home: int, count: int, first: int) -> tuple[Node, ...]:
    """The hosts of one LAN 10.i.(home-1).0/24, numbered from C{first}."""
    return tuple(
        Node(
            f"{site}.{first + k}",
            f"{lab_id}-{site}-h{first + k}",
            "host",
            site,
            (f"10.{index}.{home - 1}.{k + 2}/24",),
            "eth0",
            gateway=f"10.{index}.{home - 1}.1",
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
    site = SitePlan(s, index, public_ip, carrier, tuple(hosts), carrier_net, carrier_gw, tuple(homes))
    return site, links

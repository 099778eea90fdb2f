"""
Hypothesis strategies for NAT-lab specs (C{natbypass.lab.spec}), shared by
the spec's and the rules' tests.  Imported by tests only (hypothesis is a
test dependency).
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

from natbypass.lab.spec import (
    FilteringRule,
    Inbound,
    IpVersion,
    LabSpec,
    Link,
    MappingRule,
    NatRules,
    SiteKind,
    SiteSpec,
)

names = st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True).filter(
    lambda n: n not in {"mediator", "public", "med", "pub", "all"}
)
nats = st.builds(
    NatRules,
    mapping=st.sampled_from(MappingRule),
    filtering=st.sampled_from(FilteringRule),
    inbound=st.sampled_from(Inbound),
    hairpin=st.booleans(),
    udp_timeout=st.none() | st.integers(1, 86400),
    portmap=st.booleans(),
)
delays = st.integers(0, 5000).map(float)


@st.composite
def links(draw: st.DrawFn) -> Link:
    """A site link: delay, jitter no larger than the delay, loss."""
    delay = draw(delays)
    jitter = draw(st.integers(0, int(delay)).map(float))
    return Link(delay, jitter, float(draw(st.integers(0, 100))))


@st.composite
def sites(draw: st.DrawFn, name: str) -> SiteSpec:
    """A site of any kind called C{name}."""
    kind = draw(st.sampled_from(SiteKind))
    link = draw(links())
    if kind is SiteKind.NAT:
        hosts = draw(st.integers(1, 8))
        if draw(st.booleans()):  # a home NAT behind a carrier NAT (neither a port-mapping gateway; IPv4 only)
            no_gateway = nats.map(lambda n: replace(n, portmap=False))
            cgnat, homes = draw(no_gateway), draw(st.integers(1, 8))
            return SiteSpec(name, kind, nat=draw(no_gateway), hosts=hosts, link=link, cgnat=cgnat, homes=homes)
        ip = draw(st.sampled_from([IpVersion.V4, IpVersion.DUAL]))  # IPv6 is never NATed
        return SiteSpec(name, kind, nat=draw(nats), hosts=hosts, link=link, ip=ip)
    inbound = Inbound.DROP if kind is SiteKind.OPEN else draw(st.sampled_from(Inbound))
    return SiteSpec(name, kind, link=link, inbound=inbound, ip=draw(st.sampled_from(IpVersion)))


@st.composite
def specs(draw: st.DrawFn) -> LabSpec:
    """A whole lab spec of 1-6 sites."""
    site_names = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    return LabSpec(tuple(draw(sites(n)) for n in site_names))

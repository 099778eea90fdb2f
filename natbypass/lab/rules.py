"""
nftables rulesets for the lab's NATs, firewalls and lossy links.

Pure text generation (no I/O), so each behaviour can be read and unit-tested;
L{natbypass.lab.netns} loads the text with C{nft -f} inside a namespace.

How each behaviour is made (ground truth is measured by the lab probes):

- Mapping.  Linux conntrack NAT allocates a port per *flow* and only needs
  the whole reply tuple to be unique, so C{snat to W} keeps the internal
  port for every destination: endpoint-independent with port preservation.
  C{snat to W : jhash(ip saddr . th sport) map {...}} gives each internal
  endpoint one deterministic, rewritten port: endpoint-independent without
  preservation (adding C{ip daddr} to the hash makes it address-dependent).
  C{snat to W random} draws a random port per flow (symmetric), and
  C{snat to W : numgen inc map {...}} takes the next port per flow
  (symmetric, predictable).  The hash/counter go through a map because the
  nat statement reads the port register in network byte order.
- Filtering.  Conntrack alone only lets replies from the exact remote
  address:port in: address-and-port-dependent filtering.  For the other two,
  every outbound packet records its public port -> internal endpoint in the
  dynamic map C{natmap} (and, for address-dependent filtering, the remote
  address it went to in the set C{contacted}); a new inbound flow to a mapped
  port is DNATed to the internal endpoint if anyone may send (EIF) or if the
  internal endpoint has sent to that address (ADF).
- Hairpinning.  A LAN packet to the NAT's public address is DNATed through
  C{natmap} and SNATed to the sender's public mapping.
- Unsolicited inbound ends in the input chain: dropped, or rejected with an
  ICMP port unreachable / TCP RST.
"""

from __future__ import annotations

from .spec import FilteringRule, Inbound, MappingRule, NatRules

#: Public ports used by the rewriting mappings.
HASH_PORT_BASE = 40000
HASH_PORT_COUNT = 8192
SEQ_PORT_BASE = 20000
SEQ_PORT_COUNT = 4096

TABLE = "nblab"


def _port_map(count: int, base: int) -> str:
    return "{ " + ", ".join(f"{i} : {base + i}" for i in range(count)) + " }"


# Anonymous maps: a named map cannot be keyed by the plain integer jhash/numgen yield.
_HASH_MAP = _port_map(HASH_PORT_COUNT, HASH_PORT_BASE)
_SEQ_MAP = _port_map(SEQ_PORT_COUNT, SEQ_PORT_BASE)


#: One seed for every jhash: without it each jhash expression draws its own, and
#: the hairpin rule would map an internal endpoint to another port than the
#: outbound rule does.
HASH_SEED = "0x4e42"


def snat_statement(nat: NatRules, public_ip: str) -> str:
    """The nat statement that allocates public ports for C{nat.mapping}."""
    if nat.mapping is MappingRule.EIM_PP:
        return f"snat ip to {public_ip}"
    if nat.mapping is MappingRule.EIM:
        return (
            f"snat ip to {public_ip} : jhash ip saddr . th sport mod {HASH_PORT_COUNT} seed {HASH_SEED} map {_HASH_MAP}"
        )
    if nat.mapping is MappingRule.ADM:
        return (
            f"snat ip to {public_ip} : jhash ip saddr . th sport . ip daddr mod {HASH_PORT_COUNT} seed {HASH_SEED} "
            f"map {_HASH_MAP}"
        )
    if nat.mapping is MappingRule.APDM_RANDOM:
        return f"snat ip to {public_ip} random"
    if nat.mapping is MappingRule.APDM_SEQUENTIAL:
        return f"snat ip to {public_ip} : numgen inc mod {SEQ_PORT_COUNT} map {_SEQ_MAP}"
    raise ValueError(nat.mapping)


def _unsolicited(inbound: Inbound, match: str, family: str = "ip") -> list[str]:
    if inbound is Inbound.DROP:
        return [f"{match} drop"]
    if family == "inet":
        return [f"{match} meta l4proto tcp reject with tcp reset", f"{match} reject"]
    icmp = "icmpv6 type port-unreachable" if family == "ip6" else "icmp type port-unreachable"
    return [f"{match} meta l4proto tcp reject with tcp reset", f"{match} reject with {icmp}"]


def nat_ruleset(nat: NatRules, wan_if: str, public_ip: str, lan_if: str, lan_net: str) -> str:
    """The whole C{ip nblab} table of a NAT namespace."""
    t = nat.udp_timeout or 120
    wan, lan = f'oifname "{wan_if}"', f'oifname "{lan_if}"'
    l4 = "meta l4proto { udp, tcp }"
    snat = snat_statement(nat, public_ip)
    out: list[str] = [f"table ip {TABLE} {{"]
    out += [
        "  # public port -> internal endpoint, refreshed by every outbound packet",
        "  map natmap {",
        "    type inet_proto . inet_service : ipv4_addr . inet_service",
        f"    flags dynamic,timeout; timeout {t}s; size 65535",
        "  }",
        "  # public port . remote address the internal endpoint has sent to",
        "  set contacted {",
        "    type inet_proto . inet_service . ipv4_addr",
        f"    flags dynamic,timeout; timeout {t}s; size 65535",
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    inbound_new = f'iifname "{wan_if}" ip daddr {public_ip} ct state new {l4}'
    to_internal = "dnat ip to meta l4proto . th dport map @natmap"
    if nat.filtering is FilteringRule.EIF:
        out.append(f"    {inbound_new} meta l4proto . th dport @natmap {to_internal}")
    elif nat.filtering is FilteringRule.ADF:
        out.append(f"    {inbound_new} meta l4proto . th dport . ip saddr @contacted {to_internal}")
    if nat.hairpin:
        out.append(f'    iifname "{lan_if}" ip daddr {public_ip} {l4} meta l4proto . th dport @natmap {to_internal}')
    out += [
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    {wan} {l4} {snat}",
        f"    {wan} snat ip to {public_ip}",
    ]
    if nat.hairpin:
        out.append(f"    {lan} ip saddr {lan_net} ct status dnat {l4} {snat}")
    out += [
        "  }",
        "  # runs after SNAT: th sport is the public port",
        "  chain track {",
        "    type filter hook postrouting priority srcnat + 10; policy accept;",
        f"    {wan} {l4} ct direction original update @natmap "
        "{ meta l4proto . th sport : ct original ip saddr . ct original proto-src }",
        f"    {wan} {l4} ct direction reply update @natmap "
        "{ meta l4proto . th sport : ct reply ip saddr . ct reply proto-src }",
        f"    {wan} {l4} update @contacted {{ meta l4proto . th sport . ip daddr }}",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        '    iifname "lo" accept',
        f'    iifname "{wan_if}" icmp type echo-request accept',
    ]
    if not nat.hairpin:
        out += [f"    {x}" for x in _unsolicited(nat.inbound, f'iifname "{lan_if}" ip daddr {public_ip} {l4}')]
    out += [f"    {x}" for x in _unsolicited(nat.inbound, f'iifname "{wan_if}"')]
    out += [
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f'    iifname "{wan_if}" ct state new ct status dnat accept',
    ]
    out += [f"    {x}" for x in _unsolicited(nat.inbound, f'iifname "{wan_if}" ct state new')]
    out += ["  }", "}"]
    return "\n".join(out) + "\n"


#: ICMPv6 that IPv6 cannot work without (RFC 4890): neighbour discovery and path MTU.
_ICMP6_NEEDED = (
    "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert, "
    "packet-too-big, echo-request } accept"
)


def firewall_ruleset(inbound: Inbound, wan_if: str) -> str:
    """A stateful firewall on a public host (both families): replies in, unsolicited inbound out."""
    out = [
        f"table inet {TABLE} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        '    iifname "lo" accept',
        f"    {_ICMP6_NEEDED}",
    ]
    out += [f"    {x}" for x in _unsolicited(inbound, f'iifname "{wan_if}"', "inet")]
    out += ["  }", "}"]
    return "\n".join(out) + "\n"


TABLE6 = TABLE + "6"


def firewall6_ruleset(inbound: Inbound, wan_if: str) -> str:
    """
    The IPv6 side of a dual-stack NAT (an C{ip6} table of its own, beside
    the NAT's C{ip} one): it routes its LAN's public addresses untranslated
    and, like a home router, forwards new flows from the LAN only; an
    unsolicited inbound flow (UDP or TCP) is dropped or rejected as
    C{inbound} says.  Replies to what a host sent are let in by conntrack.
    """
    out = [
        f"table ip6 {TABLE6} {{",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        "    ct state established,related accept",
        "    icmpv6 type { packet-too-big, echo-request } accept",
    ]
    out += [f"    {x}" for x in _unsolicited(inbound, f'iifname "{wan_if}" ct state new', "ip6")]
    out += [
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        '    iifname "lo" accept',
        f"    {_ICMP6_NEEDED}",
    ]
    out += [f"    {x}" for x in _unsolicited(inbound, f'iifname "{wan_if}"', "ip6")]
    out += ["  }", "}"]
    return "\n".join(out) + "\n"


#: numgen draws from 0..LOSS_SCALE-1, so loss is set in steps of 1/LOSS_SCALE.
LOSS_SCALE = 1_000_000


def loss_ruleset(loss_pct: float, iface: str) -> str:
    """Drop C{loss_pct} percent of the packets arriving on C{iface}.

    Loaded at both ends of a link (the site's C{wan0} and its bridge port),
    so each direction loses C{loss_pct}; dropping on ingress keeps the loss
    invisible to senders, as on a real link (an egress drop would return EPERM).
    """
    threshold = round(loss_pct / 100 * LOSS_SCALE)
    return (
        "\n".join(
            [
                f"table netdev {TABLE}loss_{iface} {{",
                "  chain ingress {",
                f'    type filter hook ingress device "{iface}" priority 0; policy accept;',
                f"    numgen random mod {LOSS_SCALE} < {threshold} drop",
                "  }",
                "}",
            ]
        )
        + "\n"
    )


# ---------------------------------------------------------- port-mapping gateway

#: The table and chains miniupnpd (nftables build) fills with its mappings.
GATEWAY_TABLE = "nbupnp"
STUN_PORTS = (3478, 3479)


def gateway_ruleset(public_ip: str, wan_if: str) -> str:
    """
    What a NAT that runs miniupnpd needs besides L{nat_ruleset} (load it
    after that): the empty chains miniupnpd fills (its DNAT runs before the
    NAT's own prerouting, and the NAT's forward chain already admits DNATed
    flows), and two rules in the NAT's table.  miniupnpd learns its public
    address by STUN and refuses to map when that STUN test sees a rewritten
    port or a filtered change-request answer; so the NAT box's own packets
    leave unrewritten and STUN answers reach it.
    """
    return (
        "\n".join(
            [
                f"table inet {GATEWAY_TABLE} {{",
                "  chain forward {",
                "    type filter hook forward priority filter - 10; policy accept;",
                "    jump miniupnpd",
                "  }",
                "  chain miniupnpd {",
                "  }",
                "  chain prerouting {",
                "    type nat hook prerouting priority dstnat - 10; policy accept;",
                "    jump prerouting_miniupnpd",
                "  }",
                "  chain postrouting {",
                "    type nat hook postrouting priority srcnat - 10; policy accept;",
                "    jump postrouting_miniupnpd",
                "  }",
                "  chain prerouting_miniupnpd {",
                "  }",
                "  chain postrouting_miniupnpd {",
                "  }",
                "}",
                f'insert rule ip {TABLE} postrouting oifname "{wan_if}" ip saddr {public_ip} accept',
                f'insert rule ip {TABLE} input iifname "{wan_if}" udp sport {{ {", ".join(map(str, STUN_PORTS))} }} accept',
            ]
        )
        + "\n"
    )


def miniupnpd_config(wan_if: str, lan_if: str, lan_net: str, stun: tuple[str, int]) -> str:
    """miniupnpd's configuration: UPnP-IGD, NAT-PMP and PCP on C{lan_if}, mappings for C{lan_net} only."""
    return (
        "\n".join(
            [
                f"ext_ifname={wan_if}",
                f"listening_ip={lan_if}",
                "enable_upnp=yes",
                "enable_natpmp=yes",  # NAT-PMP and PCP
                "ext_perform_stun=yes",
                f"ext_stun_host={stun[0]}",
                f"ext_stun_port={stun[1]}",
                "secure_mode=yes",
                "system_uptime=yes",
                f"upnp_table_name={GATEWAY_TABLE}",
                f"upnp_nat_table_name={GATEWAY_TABLE}",
                "upnp_forward_chain=miniupnpd",
                "upnp_nat_chain=prerouting_miniupnpd",
                "upnp_nat_postrouting_chain=postrouting_miniupnpd",
                "uuid=4e61744a-6279-7061-7373-000000000001",
                f"allow 1024-65535 {lan_net} 1024-65535",
                "deny 0-65535 0.0.0.0/0 0-65535",
            ]
        )
        + "\n"
    )

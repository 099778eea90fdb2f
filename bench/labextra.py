"""
What the stream benchmarks add to a running NAT lab, without changing natbypass/lab:

  - L{forward_port}: a DNAT port on a site's NAT to its first host (so plain
    TCP and sshd are reachable from another site, as a port forward on a
    home router makes them);
  - L{set_loss}: loss on a site's link, per direction, changeable while the lab
    runs (the same nftables C{numgen} drop the lab uses for C{loss_pct});
  - L{set_rate}: a bandwidth limit on a site's link, both directions, with
    C{tc tbf} (this kernel has no C{netem}; delay stays the lab's wire).
"""

from __future__ import annotations

from natbypass.lab import netns as labnetns
from natbypass.lab.lab import Lab
from natbypass.lab.rules import LOSS_SCALE

TABLE = "nbbench"


def _link(lab: Lab, site: str) -> tuple[str, str, str]:
    """(site-side netns, its interface, bridge port in the public netns) of C{site}'s link."""
    border = lab.plan.site(site).border
    for link in lab.plan.wan_links:
        if link.netns == border.netns:
            return link.netns, link.iface, link.bridge_port
    raise KeyError(site)


def forward_port(lab: Lab, site: str, port: int) -> str:
    """DNAT TCP C{port} on C{site}'s public address to its first host; returns that public address."""
    plan = lab.plan.site(site)
    host = plan.hosts[0].addresses[0].split("/")[0]
    labnetns.nft(
        plan.border.netns,
        f"table ip {TABLE}fwd{port} {{\n"
        "  chain prerouting {\n"
        "    type nat hook prerouting priority dstnat - 10; policy accept;\n"
        f'    iifname "wan0" ip daddr {plan.public_ip} tcp dport {port} dnat ip to {host}:{port}\n'
        "  }\n"
        "}\n",
    )
    return plan.public_ip


def _loss_table(iface: str, pct: float) -> str:
    threshold = round(pct / 100 * LOSS_SCALE)
    return (
        f"table netdev {TABLE}loss_{iface} {{\n"
        "  chain ingress {\n"
        f'    type filter hook ingress device "{iface}" priority 10; policy accept;\n'
        f"    numgen random mod {LOSS_SCALE} < {threshold} drop\n"
        "  }\n"
        "}\n"
    )


def set_loss(lab: Lab, site: str, pct: float) -> None:
    """C{pct}% loss in each direction of C{site}'s link (0: none); replaces what this module set before."""
    site_ns, iface, port = _link(lab, site)
    for ns, dev in ((site_ns, iface), (lab.plan.public.netns, port)):
        labnetns.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "netdev", f"{TABLE}loss_{dev}"], check=False)
        if pct > 0:
            labnetns.nft(ns, _loss_table(dev, pct))


def set_rate(lab: Lab, site: str, mbit: float | None, queue_ms: float = 100.0) -> None:
    """
    Limit C{site}'s link to C{mbit} Mbit/s each way (None: no limit), with a
    queue of C{queue_ms} at that rate (a router's buffer; beyond it tbf drops).
    """
    site_ns, iface, port = _link(lab, site)
    for ns, dev in ((site_ns, iface), (lab.plan.public.netns, port)):
        labnetns.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        if mbit:
            labnetns.run(
                [
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", f"{mbit}mbit", "burst", "32kb", "latency", f"{queue_ms}ms",
                ]
            )  # fmt: skip

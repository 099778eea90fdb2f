"""
What the stream benchmarks add to a running NAT lab, without changing natbypass/lab:

  - L{forward_port}: a DNAT port on a site's NAT to its first host (so plain
    TCP and sshd are reachable from another site, as a port forward on a
    home router makes them);
  - L{set_loss}: loss on a site's link, per direction, changeable while the lab
    runs (the same nftables C{numgen} drop the lab uses for C{loss_pct}), with
    counters (L{loss_counters}: packets seen and dropped, their mean size);
  - L{set_offloads}: TSO/GSO/GRO on a site's link devices, so that the loss
    rule sees MTU-sized packets for every protocol, not TCP super-segments;
  - L{set_rate}: a bandwidth limit on a site's link, both directions, with
    C{tc tbf} (this kernel has no C{netem}; delay stays the lab's wire).
"""

from __future__ import annotations

import json
import shutil
import subprocess

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
        "  counter seen {}\n"
        "  counter dropped {}\n"
        "  chain ingress {\n"
        f'    type filter hook ingress device "{iface}" priority 10; policy accept;\n'
        "    counter name seen\n"
        f"    numgen random mod {LOSS_SCALE} < {threshold} counter name dropped drop\n"
        "  }\n"
        "}\n"
    )


def set_loss(lab: Lab, site: str, pct: float) -> None:
    """C{pct}% loss in each direction of C{site}'s link (0: none, only counted); replaces what was set before."""
    site_ns, iface, port = _link(lab, site)
    for ns, dev in ((site_ns, iface), (lab.plan.public.netns, port)):
        labnetns.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "netdev", f"{TABLE}loss_{dev}"], check=False)
        labnetns.nft(ns, _loss_table(dev, pct))  # at 0% too: its counters still count


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


def loss_counters(lab: Lab, site: str) -> dict[str, dict[str, int]]:
    """
    Per direction of C{site}'s link (C{"in"}: towards the site, C{"out"}: from
    it), what the loss rule saw and dropped since L{set_loss}: packets and bytes.
    Empty when no loss is set.
    """
    site_ns, iface, port = _link(lab, site)
    out: dict[str, dict[str, int]] = {}
    for way, ns, dev in (("in", site_ns, iface), ("out", lab.plan.public.netns, port)):
        argv = ["ip", "netns", "exec", ns, "nft", "-j", "list", "counters", "table", "netdev", f"{TABLE}loss_{dev}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode:
            continue
        found = {}
        for item in json.loads(done.stdout)["nftables"]:
            c = item.get("counter")
            if c:
                found[f"{c['name']}_packets"], found[f"{c['name']}_bytes"] = c["packets"], c["bytes"]
        out[way] = found
    return out


def ensure_ethtool() -> str | None:
    """The ethtool binary, installed with apt if missing; None if it cannot be had."""
    found = shutil.which("ethtool") or shutil.which("ethtool", path="/usr/sbin:/sbin")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-qq", "ethtool"], check=False, capture_output=True)
    return shutil.which("ethtool", path="/usr/sbin:/sbin:/usr/bin")


def set_offloads(lab: Lab, site: str, on: bool) -> dict[str, str]:
    """
    TSO, GSO and GRO on (C{on}) or off on both devices of C{site}'s link;
    returns each device's resulting state (C{ethtool -k}) for the record.
    Off, every packet the loss rule sees is at most one MTU, whatever the protocol.
    """
    ethtool = ensure_ethtool()
    if ethtool is None:
        raise RuntimeError("ethtool is missing and could not be installed")
    site_ns, iface, port = _link(lab, site)
    state = "on" if on else "off"
    result = {}
    for ns, dev in ((site_ns, iface), (lab.plan.public.netns, port)):
        labnetns.run(
            ["ip", "netns", "exec", ns, ethtool, "-K", dev, "tso", state, "gso", state, "gro", state], check=False
        )
        shown = labnetns.run(["ip", "netns", "exec", ns, ethtool, "-k", dev], check=False)
        keep = ("tcp-segmentation-offload:", "generic-segmentation-offload:", "generic-receive-offload:")
        result[dev] = ", ".join(line.strip() for line in shown.splitlines() if line.strip().startswith(keep))
    return result

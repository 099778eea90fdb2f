"""
Creating and removing the lab's namespaces, links and rulesets.

The only module that runs C{ip}, C{nft} and C{sysctl}.  Every command is
aimed at a lab namespace (C{ip -n}, C{ip netns exec}); nothing is changed in
the namespace the lab is started from.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from twisted.logger import Logger

from . import rules
from .spec import NatRules, SiteKind
from .topology import LabPlan, Node, WanLink, lab_id_of_netns

log = Logger()


class LabError(RuntimeError):
    """Building or using the lab failed; the message has the failing command."""


_capability_checked: str | None | bool = False


def missing_requirements(tun: bool = False) -> str | None:
    """Why a lab cannot be built here (C{tun}: one with delayed links), or None if it can."""
    global _capability_checked
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs '{tool}' (apt-get install iproute2 nftables)"
    if tun and not os.path.exists("/dev/net/tun"):
        return "delayed lab links need /dev/net/tun (TAP devices)"
    if _capability_checked is False:
        _capability_checked = None
        if shutil.which("unshare"):
            probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
            if probe.returncode != 0:
                _capability_checked = (
                    f"cannot create network namespaces here (unshare --net: {probe.stderr.strip()}); "
                    "a container needs --privileged or CAP_SYS_ADMIN + CAP_NET_ADMIN"
                )
    return _capability_checked if isinstance(_capability_checked, str) else None


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 30) -> str:
    """Run a command; raise LabError with its output if it fails."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def ip(netns: str, *args: str) -> str:
    """
    Run C{ip -n NETNS ...}: aimed at the lab namespace without entering it;
    returns the output, raises L{LabError} if it fails.
    """
    return run(["ip", "-n", netns, *args])


def nft(netns: str, ruleset: str) -> None:
    """
    Load an nftables C{ruleset} in C{netns}, fed to C{nft -f -} on stdin (no
    temporary file); raises L{LabError} with nft's message if it fails.
    """
    run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=ruleset)


def sysctl(netns: str, key: str, value: str | int, **more: str | int) -> None:
    """Set one or more sysctls inside C{netns} (one process; C{more} uses C{__} for dots)."""
    pairs = [f"{key}={value}"] + [f"{k.replace('__', '.')}={v}" for k, v in more.items()]
    run(["ip", "netns", "exec", netns, "sysctl", "-qw", *pairs])


def list_netns() -> list[str]:
    """Names of all network namespaces (C{ip netns list})."""
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lab_netns(lab_id: str | None = None) -> dict[str, list[str]]:
    """Lab namespaces present now, by lab id (only C{lab_id}'s if given)."""
    labs: dict[str, list[str]] = {}
    for name in list_netns():
        owner = lab_id_of_netns(name)
        if owner and (lab_id is None or owner == lab_id):
            labs.setdefault(owner, []).append(name)
    return labs


def netns_pids(netns: str) -> list[int]:
    """
    The PIDs of the processes running in C{netns}, so L{destroy} can kill them
    before deleting it; empty when there are none (or no such namespace).
    """
    out = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def kill_pids(pids: Sequence[int], grace: float = 1.0) -> None:
    """SIGTERM C{pids}, then SIGKILL whatever is left after C{grace} seconds."""
    alive = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone once reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def destroy(netns_names: Sequence[str], extra_pids: Sequence[int] = ()) -> None:
    """Kill every process in the namespaces (and C{extra_pids}), then delete them."""
    pids = set(extra_pids)
    for name in netns_names:
        pids.update(netns_pids(name))
    pids.discard(os.getpid())
    kill_pids(sorted(pids))
    for name in netns_names:
        run(["ip", "netns", "del", name], check=False)


def _no_bridge_netfilter() -> dict[str, int]:
    """Sysctls that keep bridged frames out of the IP hooks, as on a real switch.

    With C{br_netfilter} loaded on the machine (e.g. by Docker), bridged
    frames would pass nftables' ip hooks: a NAT's DNAT of a hairpinned packet
    then becomes an L2 redirect that the bridge refuses to send back out of
    its ingress port.  The sysctls are per namespace and only exist when the
    module is loaded; the lab behaves the same either way.
    """
    return {
        f"net__bridge__bridge-nf-call-{family}": 0
        for family in ("iptables", "ip6tables", "arptables")
        if os.path.exists(f"/proc/sys/net/bridge/bridge-nf-call-{family}")
    }


def _start_wire(link: WanLink, public_netns: str, log_path: str | None) -> subprocess.Popen[str]:
    """Start the delaying wire for C{link} and wait until both TAPs exist."""
    argv = [
        sys.executable,
        "-m",
        "natbypass.lab.wire",
        f"{link.netns}:{link.iface}",
        f"{public_netns}:{link.bridge_port}",
        f"--delay-ms={link.link.delay_ms}",
        f"--jitter-ms={link.link.jitter_ms}",
    ]
    stderr = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=python_env(),
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise LabError(f"the delay wire for {link.node} did not start (see {log_path or 'stderr'})")
    assert proc.stdout is not None
    proc.stdout.close()
    return proc


def python_env() -> dict[str, str]:
    """The environment for Python processes in the lab: this natbypass importable."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _ipv6_sysctls(enabled: bool) -> dict[str, int]:
    """The IPv6 and bridge sysctls of a lab namespace (keyword form of L{sysctl})."""
    out: dict[str, int] = {"net__ipv6__conf__default__disable_ipv6": 0 if enabled else 1, **_no_bridge_netfilter()}
    if enabled:  # addresses usable at once (no duplicate address detection), nothing autoconfigured
        for scope in ("all", "default"):
            out[f"net__ipv6__conf__{scope}__accept_dad"] = 0
            out[f"net__ipv6__conf__{scope}__accept_ra"] = 0
            out[f"net__ipv6__conf__{scope}__autoconf"] = 0
    return out


def _add_addresses(netns: str, addresses: Sequence[str], iface: str) -> None:
    """Add C{addresses} ("ADDR/LEN") to C{iface}; IPv6 ones without duplicate address detection."""
    for addr in addresses:
        ip(netns, "addr", "add", addr, "dev", iface, *(("nodad",) if ":" in addr else ()))


def _static_neighbours(plan: LabPlan) -> None:
    """
    Permanent ARP entries between every pair of nodes on the public segment.
    The lab's "internet" is one Ethernet segment, so without them the first
    packet between two sites waits for an ARP exchange across both delayed
    links -- a round trip that no real path through routers has, and that
    would inflate every first-packet time the lab measures.
    """
    entries = []
    for link in plan.wan_links:
        mac = json.loads(ip(link.netns, "-j", "link", "show", "dev", link.iface))[0]["address"]
        entries += [(link, addr.split("/")[0], mac) for addr in plan.node(link.node).addresses]
    for link in plan.wan_links:
        batch = "".join(
            f"neigh replace {addr} lladdr {mac} nud permanent dev {link.iface}\n"
            for owner, addr, mac in entries
            if owner is not link
        )
        if batch:
            run(["ip", "-n", link.netns, "-batch", "-"], input=batch)


def _build_nat(
    netns: str,
    nat: NatRules,
    public_ip: str,
    lan_net: str,
    gateway: str,
    hosts: Sequence[Node],
    gateway6: str | None = None,
) -> None:
    """
    A NAT in C{netns} (its C{wan0} already up with C{public_ip}): a bridge
    C{lan0} with C{hosts} on it (each by its C{iface}, default route via
    C{gateway}), the NAT's ruleset and its conntrack timeouts.  With
    C{gateway6} (dual stack) the LAN's IPv6 prefix is routed, untranslated,
    behind an IPv6 firewall of its own.
    """
    ip(netns, "link", "add", "lan0", "type", "bridge")
    ip(netns, "addr", "add", f"{gateway}/24", "dev", "lan0")
    ip(netns, "link", "set", "lan0", "up")
    for k, host in enumerate(hosts, start=1):
        port = f"h{k}" if host.role == "host" else f"n{k}"
        ip(netns, "link", "add", port, "type", "veth", "peer", "name", host.iface, "netns", host.netns)
        ip(netns, "link", "set", port, "master", "lan0", "up")
        _add_addresses(host.netns, host.addresses, host.iface)
        ip(host.netns, "link", "set", host.iface, "up")
        ip(host.netns, "route", "add", "default", "via", gateway)
        if host.gateway6:
            ip(host.netns, "-6", "route", "add", "default", "via", host.gateway6)
    nft(netns, rules.nat_ruleset(nat, "wan0", public_ip, "lan0", lan_net))
    timeouts: dict[str, int] = {}
    if nat.udp_timeout is not None:  # conntrack is per namespace: this NAT's mapping lifetime
        timeouts = {
            "net__netfilter__nf_conntrack_udp_timeout": nat.udp_timeout,
            "net__netfilter__nf_conntrack_udp_timeout_stream": nat.udp_timeout,
        }
    if gateway6:  # dual stack: the LAN's IPv6 is routed, behind a firewall of its own
        ip(netns, "addr", "add", f"{gateway6}/64", "dev", "lan0", "nodad")
        nft(netns, rules.firewall6_ruleset(nat.inbound, "wan0"))
        timeouts["net__ipv6__conf__all__forwarding"] = 1
    sysctl(netns, "net.ipv4.ip_forward", 1, **timeouts)


def build(plan: LabPlan, log_path: str | None = None) -> list[subprocess.Popen[str]]:
    """Create everything in C{plan}; returns the wire processes (killed by the caller at teardown)."""
    if any(w.link.needs_wire for w in plan.wan_links):
        why = missing_requirements(tun=True)
        if why:
            raise LabError(why)
    pub = plan.public.netns
    v6 = any(s.public_ip6 for s in plan.sites)
    for node in plan.nodes:
        run(["ip", "netns", "add", node.netns])
        ip(node.netns, "link", "set", "lo", "up")
        # IPv6 off unless a site has it (then usable at once: no DAD, no RAs), bridges as plain
        # switches: one process per namespace.
        sysctl(node.netns, "net.ipv6.conf.all.disable_ipv6", 0 if v6 else 1, **_ipv6_sysctls(v6))
    ip(pub, "link", "add", "br0", "type", "bridge")
    ip(pub, "link", "set", "br0", "up")

    wires = []
    for link in plan.wan_links:
        if link.link.needs_wire:
            wires.append(_start_wire(link, pub, log_path))
        else:
            ip(pub, "link", "add", link.bridge_port, "type", "veth", "peer", "name", link.iface, "netns", link.netns)
        ip(pub, "link", "set", link.bridge_port, "master", "br0", "up")
        node = plan.node(link.node)
        _add_addresses(node.netns, node.addresses, link.iface)
        ip(node.netns, "link", "set", link.iface, "up")
        if link.link.loss_pct > 0:
            nft(link.netns, rules.loss_ruleset(link.link.loss_pct, link.iface))  # inbound
            nft(pub, rules.loss_ruleset(link.link.loss_pct, link.bridge_port))  # outbound

    _static_neighbours(plan)
    for netns_name, prefix, via in plan.routes6():
        ip(netns_name, "-6", "route", "add", prefix, "via", via)

    for site in plan.sites:
        spec = site.spec
        border = site.border.netns
        if spec.kind is SiteKind.FIREWALL:
            nft(border, rules.firewall_ruleset(spec.inbound, "wan0"))
            continue
        if spec.kind is SiteKind.OPEN:
            continue
        assert spec.nat is not None and site.lan_net and site.lan_gateway
        assert site.public_ip is not None  # a NAT site always has IPv4
        if spec.cgnat is None:
            _build_nat(border, spec.nat, site.public_ip, site.lan_net, site.lan_gateway, site.hosts, site.lan_gateway6)
            continue
        # Two NATs in series: the home NATs are the carrier NAT's LAN hosts (IPv4 only, see spec).
        _build_nat(border, spec.cgnat, site.public_ip, site.lan_net, site.lan_gateway, [h.nat for h in site.homes])
        for home in site.homes:
            own = home.nat.addresses[0].split("/")[0]
            _build_nat(home.nat.netns, spec.nat, own, home.lan_net, home.lan_gateway, home.hosts)
    log.info("lab {lab_id} built: {count} namespaces", lab_id=plan.lab_id, count=len(plan.nodes))
    return wires

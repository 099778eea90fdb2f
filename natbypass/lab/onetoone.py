"""
A mediator behind a 1:1 NAT in the lab: the way a cloud VM (Google Cloud,
AWS, Azure) sees its external IPs.  The VM only has private addresses; a
gateway maps each public IP onto one of them, both ways, ports unchanged.

Added to a running L{Lab} (named under its lab id, so the lab's teardown
removes it with everything in it)::

    public ns (the lab's)   bridge br0, the "internet" 198.18.0.0/15
    <lab>-cgw  the cloud's 1:1 NAT: wan0 198.18.0.12 and .13 on br0; lan0 10.99.0.1/24
    <lab>-cvm  the VM: eth0 10.99.0.2/24 and 10.99.0.3/24, default via 10.99.0.1

The mediator in the VM binds the private addresses and names the public ones
with C{--stun-advertise PUBLIC=LOCAL}; a client in a lab site then runs
C{natbypass detect} against 198.18.0.12, and must get the answer it gets
from the lab's own mediator (public addresses on its interface).  Without
C{--stun-advertise} the responder names private addresses the client cannot
reach, and detection fails: tests/test_lab_onetoone.py checks both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from . import netns as _netns
from .lab import Lab
from .topology import PUBLIC_PREFIXLEN

#: The VM's external IPs on the lab's public segment, and the private ones the 1:1 NAT maps them onto.
PUBLIC_ADDRESSES = ("198.18.0.12", "198.18.0.13")
LOCAL_ADDRESSES = ("10.99.0.2", "10.99.0.3")
GATEWAY_LAN = "10.99.0.1"
STUN_PORT = 3478
STUN_ALT_PORT = 3479
TABLE = "onetoone"


def onetoone_ruleset(pairs: tuple[tuple[str, str], ...], table: str = TABLE) -> str:
    """
    The gateway's nftables table: each (public, local) pair DNATed inbound
    and SNATed outbound, addresses only, so ports pass unchanged (a cloud's
    1:1 NAT).  Pure text, for C{nft -f}.
    """
    dnat = "".join(f"        ip daddr {public} dnat ip to {local}\n" for public, local in pairs)
    snat = "".join(f"        ip saddr {local} snat ip to {public}\n" for public, local in pairs)
    return (
        f"table ip {table} {{}}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        f"{dnat}"
        "    }\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f"{snat}"
        "    }\n"
        "}\n"
    )


@dataclass(frozen=True)
class CloudVM:
    """Where the VM behind the 1:1 NAT lives, and its addresses on both sides."""

    gateway_netns: str
    vm_netns: str
    public: tuple[str, str] = PUBLIC_ADDRESSES
    local: tuple[str, str] = LOCAL_ADDRESSES

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(public, local) per address: the 1:1 NAT's map and C{--stun-advertise}'s arguments."""
        return tuple(zip(self.public, self.local))


def add_cloud_vm(lab: Lab) -> CloudVM:
    """Build the gateway and the VM namespaces in C{lab} (see the module doc)."""
    vm = CloudVM(f"{lab.lab_id}-cgw", f"{lab.lab_id}-cvm")
    public_ns = lab.plan.public.netns
    for name in (vm.gateway_netns, vm.vm_netns):
        _netns.run(["ip", "netns", "add", name])
        _netns.ip(name, "link", "set", "lo", "up")
        _netns.sysctl(name, "net.ipv6.conf.all.disable_ipv6", 1, net__ipv6__conf__default__disable_ipv6=1)
    # The gateway's outside: a port of the lab's public bridge.
    _netns.ip(public_ns, "link", "add", "cg0", "type", "veth", "peer", "name", "wan0", "netns", vm.gateway_netns)
    _netns.ip(public_ns, "link", "set", "cg0", "master", "br0", "up")
    for address in vm.public:
        _netns.ip(vm.gateway_netns, "addr", "add", f"{address}/{PUBLIC_PREFIXLEN}", "dev", "wan0")
    _netns.ip(vm.gateway_netns, "link", "set", "wan0", "up")
    # Its inside: a link to the VM.
    _netns.ip(vm.gateway_netns, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", vm.vm_netns)
    _netns.ip(vm.gateway_netns, "addr", "add", f"{GATEWAY_LAN}/24", "dev", "lan0")
    _netns.ip(vm.gateway_netns, "link", "set", "lan0", "up")
    for address in vm.local:
        _netns.ip(vm.vm_netns, "addr", "add", f"{address}/24", "dev", "eth0")
    _netns.ip(vm.vm_netns, "link", "set", "eth0", "up")
    _netns.ip(vm.vm_netns, "route", "add", "default", "via", GATEWAY_LAN)
    _netns.nft(vm.gateway_netns, onetoone_ruleset(vm.pairs))
    _netns.sysctl(vm.gateway_netns, "net.ipv4.ip_forward", 1)
    return vm


def start_mediator(vm: CloudVM, *, advertise: bool = True, workers: int = 1) -> subprocess.Popen[str]:
    """
    Run C{natbypass mediator} in the VM on its private addresses (with
    C{--stun-advertise} for each public one unless C{advertise} is false)
    and wait until its responder listens.  The caller stops it (the lab's
    teardown kills it too).
    """
    (l1, l2) = vm.local
    argv = [
        "ip", "netns", "exec", vm.vm_netns, sys.executable, "-m", "natbypass", "mediator",
        "--stun", f"{l1}:{STUN_PORT}", "--stun-alternate", f"{l2}:{STUN_ALT_PORT}",
        "--signal", f"tcp:7000:interface={l1}", "--stun-workers", str(workers),
    ]  # fmt: skip
    if advertise:
        for public, local in vm.pairs:
            argv += ["--stun-advertise", f"{public}={local}"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=_netns.python_env(),
    )
    marker = "every STUN worker is answering" if workers > 1 else "STUN responder on"
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc
    proc.wait()
    raise _netns.LabError(f"the mediator behind the 1:1 NAT did not start:\n{''.join(seen[-20:])}")


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a process started by L{start_mediator} (SIGTERM, then SIGKILL after 5 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_detect(lab: Lab, node: str, stun_ip: str, *, tcp: bool = True, timeout: float = 60) -> dict[str, Any]:
    """C{natbypass detect --json [--tcp]} in C{node} against C{stun_ip}:3478; {"error": ...} when it fails."""
    argv = [sys.executable, "-m", "natbypass", "detect", "--stun", f"{stun_ip}:{STUN_PORT}", "--json"]
    if tcp:
        argv.append("--tcp")
    r = lab.exec(node, argv, timeout=timeout)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}", "exit": r.returncode}

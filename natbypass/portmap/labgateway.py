"""
A real port-mapping gateway in the NAT lab: miniupnpd (nftables build) on
a NAT site's border namespace.  It learns its public address by STUN, so it
starts once the lab's mediator answers STUN (its first check takes a few
seconds).  Lab and tests only; it needs root and C{miniupnpd}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

from natbypass.lab import netns as _netns
from natbypass.lab import rules

STATE_DIR = "/run/natbypass-lab"
#: miniupnpd's STUN check waits up to 3 s per round; ready well within this.
START_TIMEOUT = 20.0


def missing_gateway_tools() -> str | None:
    """Why a gateway cannot run here, or None."""
    if shutil.which("miniupnpd") is None:
        return "port-mapping lab sites need miniupnpd (apt-get install miniupnpd-nftables)"
    return None


def start_gateway(lab: Any, site: str, stun: tuple[str, int] | None = None) -> subprocess.Popen[Any]:
    """
    Load the gateway rules in C{site}'s NAT and start miniupnpd there;
    returns once it listens for NAT-PMP/PCP (its log says so), or raises
    L{natbypass.lab.netns.LabError}.  The process is killed with the lab.
    """
    why = missing_gateway_tools()
    if why:
        raise _netns.LabError(why)
    plan = lab.plan.site(site)
    if plan.spec.nat is None or not plan.spec.nat.portmap or plan.lan_net is None:
        raise _netns.LabError(f'site {site} is not a port-mapping gateway (its nat needs "portmap": true)')
    border = plan.border.netns
    _netns.nft(border, rules.gateway_ruleset(plan.public_ip, "wan0"))
    stun = stun or (lab.mediator_addresses[0], 3478)
    os.makedirs(STATE_DIR, exist_ok=True)
    conf = os.path.join(STATE_DIR, f"{border}-miniupnpd.conf")
    log_path = os.path.join(STATE_DIR, f"{border}-miniupnpd.log")
    with open(conf, "w") as f:
        f.write(rules.miniupnpd_config("wan0", "lan0", plan.lan_net, stun))
    log = open(log_path, "wb")
    proc = lab.spawn(
        f"{site}.nat",
        ["miniupnpd", "-d", "-f", conf, "-P", os.path.join(STATE_DIR, f"{border}-miniupnpd.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            text = f.read().replace(b"\0", b"").decode(errors="replace")
        if "Listening for NAT-PMP/PCP" in text:
            if "Port forwarding is now disabled" in text:
                raise _netns.LabError(f"miniupnpd in {border} refuses to map (see {log_path})")
            return proc
        if proc.poll() is not None:
            raise _netns.LabError(f"miniupnpd in {border} exited ({proc.returncode}); see {log_path}")
        time.sleep(0.1)
    raise _netns.LabError(f"miniupnpd in {border} not ready in {START_TIMEOUT:g} s; see {log_path}")

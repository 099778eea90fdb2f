"""
IPv6 and dual stack in the NAT lab (issue 12): the lab's IPv6 sites, then
peers that connect over IPv6 and prefer it over IPv4 (happy eyeballs).

Needs root, C{ip} and C{nft}; skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab.lab import Lab
from natbypass.lab.netns import missing_requirements

SKIP = missing_requirements()
PY = sys.executable

#: Answers every UDP datagram and accepts TCP on ADDR:PORT; prints "ready".
_SERVER = r"""
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((host, port))
t = socket.socket(fam, socket.SOCK_STREAM); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((host, port)); t.listen(8)
def accept():
    while True:
        c, _ = t.accept(); c.sendall(b"hi"); c.close()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
while True:
    data, peer = u.recvfrom(2048)
    u.sendto(data, peer)
"""

#: Sends one UDP datagram / opens one TCP connection to ADDR:PORT; prints "udp RESULT tcp RESULT".
_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(1.5)
try:
    u.connect((host, port)); u.send(b"x"); u.recv(64); udp = "answered"
except socket.timeout:
    udp = "silent"
except OSError as e:
    udp = "refused" if e.errno == 111 else "error"
try:
    socket.create_connection((host, port), timeout=1.5).close(); tcp = "answered"
except socket.timeout:
    tcp = "silent"
except ConnectionRefusedError:
    tcp = "refused"
print("udp", udp, "tcp", tcp)
"""


class _LabCase(SynchronousTestCase):
    if SKIP:
        skip = SKIP


def serve(lab: Lab, node: str, host: str, port: int) -> None:
    """Start L{_SERVER} in C{node} on C{host}:C{port} and wait until it listens."""
    proc = lab.spawn(node, [PY, "-c", _SERVER, host, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise AssertionError(f"server in {node} did not start: {line!r}")


def reach(lab: Lab, node: str, host: str, port: int) -> str:
    """What L{_CLIENT} in C{node} gets from C{host}:C{port}: C{"udp X tcp Y"}."""
    done = lab.exec(node, [PY, "-c", _CLIENT, host, str(port)], timeout=30, check=True)
    return done.stdout.strip()


class LabIPv6Tests(_LabCase):
    """The lab's IPv6: an IPv6-only firewalled site, a dual-stack NAT site, the mediator's two addresses."""

    def setUp(self) -> None:
        spec = {
            "sites": {
                "f": {"kind": "firewall", "ip": "v6"},
                "r": {"kind": "firewall", "ip": "v6", "inbound": "reject"},
                "d": {"nat": "port-restricted-cone", "ip": "dual"},
                "o": {"kind": "open", "ip": "dual", "delay_ms": 5},
            }
        }
        self.lab = Lab.start(spec)
        self.addCleanup(self.lab.stop)

    def test_addresses(self) -> None:
        """IPv6 from 2001:2::/48 only; the IPv6-only site has no IPv4; the mediator has two IPv6 addresses."""
        lab = self.lab
        self.assertEqual(lab.mediator_addresses6, ("2001:2::2", "2001:2::3"))
        self.assertIsNone(lab.public_address("f"))
        self.assertTrue(lab.address6("d").startswith("2001:2:0:"))
        shown = lab.exec("mediator", ["ip", "-6", "-br", "addr", "show", "dev", "wan0"], check=True).stdout
        for a in lab.mediator_addresses6:
            self.assertIn(a, shown)
        self.assertNotIn("tentative", lab.exec("f", ["ip", "-6", "addr"], check=True).stdout)

    def test_outbound_reaches_mediator_both_families(self) -> None:
        """Every IPv6 site reaches both mediator addresses over UDP and TCP; the dual sites over IPv4 too."""
        lab = self.lab
        for addr in lab.mediator_addresses6 + lab.mediator_addresses:
            serve(lab, "mediator", addr, 5000)
        for node in ("f", "d", "o"):
            for addr in lab.mediator_addresses6:
                self.assertEqual(reach(lab, node, addr, 5000), "udp answered tcp answered", node)
        for node in ("d", "o"):
            self.assertEqual(reach(lab, node, lab.mediator_addresses[1], 5000), "udp answered tcp answered", node)

    def test_firewall_drops_unsolicited(self) -> None:
        """
        New inbound IPv6 flows to a firewalled host (and to a host behind a
        dual-stack NAT) are dropped, or rejected where the spec says so; an
        open host answers.
        """
        lab = self.lab
        for node in ("f", "r", "d", "o"):
            serve(lab, node, lab.address6(node), 6000)
        self.assertEqual(reach(lab, "mediator", lab.address6("f"), 6000), "udp silent tcp silent")
        self.assertEqual(reach(lab, "mediator", lab.address6("r"), 6000), "udp refused tcp refused")
        self.assertEqual(reach(lab, "mediator", lab.address6("d"), 6000), "udp silent tcp silent")
        self.assertEqual(reach(lab, "mediator", lab.address6("o"), 6000), "udp answered tcp answered")
        # Between two firewalled sites as well.
        self.assertEqual(reach(lab, "d", lab.address6("f"), 6000), "udp silent tcp silent")

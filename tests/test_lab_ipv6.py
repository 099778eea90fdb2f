"""
IPv6 and dual stack in the NAT lab (issue 12): the lab's IPv6 sites, then
peers that connect over IPv6 and prefer it over IPv4 (happy eyeballs).

Needs root, C{ip} and C{nft}; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from statistics import median

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab.lab import Lab
from natbypass.lab.netns import LabError, missing_requirements
from natbypass.lab.topology import MEDIATOR_ADDRESSES6
from natbypass.lab.traversal import (
    SIGNAL_PORT,
    STUN_ALT_PORT,
    STUN_PORT,
    ConnectResult,
    Scenario,
    ipv6_mediator_args,
    ipv6_peer_args,
)
from natbypass.punch.families import FAMILY_HEAD_START

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
    """
    The lab's IPv6: an IPv6-only firewalled site, a dual-stack NAT site, the
    mediator's two addresses; and beside them a CGNAT site, IPv4 only.
    """

    def setUp(self) -> None:
        spec = {
            "sites": {
                "f": {"kind": "firewall", "ip": "v6"},
                "r": {"kind": "firewall", "ip": "v6", "inbound": "reject"},
                "d": {"nat": "port-restricted-cone", "ip": "dual"},
                "o": {"kind": "open", "ip": "dual", "delay_ms": 5},
                "c": "cgnat",
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
        # The CGNAT site stays IPv4 only: no IPv6 address behind the carrier, none on it.
        self.assertRaises(LabError, lab.address6, "c")
        self.assertNotIn("2001:2", lab.exec("c.cgn", ["ip", "-6", "addr"], check=True).stdout)

    def test_outbound_reaches_mediator_both_families(self) -> None:
        """Every IPv6 site reaches both mediator addresses over UDP and TCP; the dual sites over IPv4 too."""
        lab = self.lab
        for addr in lab.mediator_addresses6 + lab.mediator_addresses:
            serve(lab, "mediator", addr, 5000)
        for node in ("f", "d", "o"):
            for addr in lab.mediator_addresses6:
                self.assertEqual(reach(lab, node, addr, 5000), "udp answered tcp answered", node)
        for node in ("d", "o", "c"):
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


# ------------------------------------------------------------------ peers

MEDIATOR6 = ipv6_mediator_args()
PEER6 = ipv6_peer_args()

#: Drops IPv6 UDP and TCP between sites on the public segment (not to or from the mediator).
BLOCK6 = """
table bridge nblblock6 {
  chain forward {
    type filter hook forward priority 0; policy accept;
    ether type ip6 ip6 saddr != { 2001:2::2, 2001:2::3 } ip6 daddr != { 2001:2::2, 2001:2::3 } \\
      meta l4proto { udp, tcp } drop
  }
}
"""


def family(address: str) -> str:
    """C{v6} for C{[ADDR]:PORT}, else C{v4}."""
    return "v6" if address.startswith("[") else "v4"


class _ScenarioCase(_LabCase):
    spec: dict = {}

    def setUp(self) -> None:
        self.lab = Lab.start(self.spec)
        self.addCleanup(self.lab.stop)
        self.scenario = Scenario(self.lab)
        self.scenario.start_mediator(*MEDIATOR6)

    def connect(self, node: str, my_id: str, peer: str, protocol: str, *extra: str) -> ConnectResult:
        result = self.scenario.connect(node, my_id, peer, protocol, count=2, timeout=5.0, extra=extra)
        self.assertTrue(result.ok, result.summary())
        return result


class FirewalledIPv6Tests(_ScenarioCase):
    """Two sites behind stateful IPv6 firewalls (no NAT) connect directly over IPv6, on both protocols."""

    spec = {
        "sites": {
            "a": {"kind": "firewall", "ip": "dual", "delay_ms": 10},
            "b": {"kind": "firewall", "ip": "dual", "delay_ms": 10},
        }
    }

    def test_udp_and_tcp_over_ipv6(self) -> None:
        self.scenario.start_peer("b", "b", *PEER6)
        for protocol in ("udp", "tcp"):
            result = self.connect("a", f"a-{protocol}", "b", protocol, *PEER6)
            c = result.connected
            assert c is not None
            self.assertEqual(c["protocol"], protocol)
            self.assertEqual(family(c["remote_address"]), "v6", result.summary())
            self.assertEqual(c["remote_address"].split("]")[0][1:], self.lab.address6("b"))
            self.assertEqual(family(c["local_address"]), "v6")

    def test_signalling_over_ipv6(self) -> None:
        """A peer that reaches the mediator over IPv6 (its dual-stack signalling endpoint) registers and connects."""
        self.scenario.start_peer("b", "b", *PEER6)
        mediator6 = ("--mediator", rf"tcp:{MEDIATOR_ADDRESSES6[0].replace(':', chr(92) + ':')}:{SIGNAL_PORT}")
        stun4 = ("--stun", f"{self.lab.mediator_addresses[0]}:{STUN_PORT}")
        result = self.connect("a", "a6", "b", "udp", *PEER6, *mediator6, *stun4)
        c = result.connected
        assert c is not None
        self.assertEqual(family(c["remote_address"]), "v6")
        with open(self.scenario.mediator_log) as log:
            self.assertIn(f"peer a6 registered from {self.lab.address6('a')} ", log.read())

    def test_rfc5780_over_ipv6(self) -> None:
        """
        C{natbypass detect} against the mediator's two IPv6 addresses: RFC
        5780 over IPv6 measures the firewall as the lab built it (no
        mapping, address-and-port-dependent filtering).
        """
        server = f"[{MEDIATOR_ADDRESSES6[0]}]:{STUN_PORT}"
        done = self.lab.exec("a", [PY, "-m", "natbypass", "detect", "--json", "--stun", server], timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        result = json.loads(done.stdout)
        self.assertEqual((result["mapping"], result["filtering"]), ("none", "address-and-port-dependent"))
        self.assertEqual(result["other_address"], f"[{MEDIATOR_ADDRESSES6[1]}]:{STUN_ALT_PORT}")
        self.assertEqual(result["public_address"], result["local_address"])

    def test_detect_reports_ipv6(self) -> None:
        """C{natbypass detect --stun6}: IPv6 reachable and not translated (the firewall is no NAT66)."""
        argv = [PY, "-m", "natbypass", "detect", "--json", "--stun", f"{self.lab.mediator_addresses[0]}:{STUN_PORT}"]
        argv += ["--stun6", f"[{MEDIATOR_ADDRESSES6[0]}]:{STUN_PORT}"]
        done = self.lab.exec("a", argv, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        ipv6 = json.loads(done.stdout)["ipv6"]
        self.assertEqual((ipv6["reachable"], ipv6["translated"]), (True, False))
        self.assertEqual(ipv6["public_address"].split("]")[0][1:], self.lab.address6("a"))


class DualStackTests(_ScenarioCase):
    """Dual-stack NAT sites (IPv4 NAT, IPv6 firewall): IPv6 preferred, IPv4 after the head start when IPv6 is blocked."""

    spec = {
        "sites": {
            "a": {"nat": "port-restricted-cone", "ip": "dual", "delay_ms": 10},
            "b": {"nat": "port-restricted-cone", "ip": "dual", "delay_ms": 10},
        }
    }

    def times(self, my_id: str, runs: int, *extra: str) -> tuple[list[float], set[str]]:
        """Connect C{runs} times (auto): the elapsed times in ms, and the families of the paths."""
        elapsed, seen = [], set()
        for k in range(runs):
            c = self.connect("a", f"{my_id}{k}", "b", "auto", *extra).connected
            assert c is not None
            elapsed.append(float(c["elapsed_ms"]))
            seen.add(family(c["remote_address"]))
        return elapsed, seen

    def test_prefers_ipv6_then_falls_back(self) -> None:
        self.scenario.start_peer("b", "b", *PEER6)
        runs = 3
        v6_times, v6_seen = self.times("dual", runs, *PEER6)
        self.assertEqual(v6_seen, {"v6"})
        v4_times, v4_seen = self.times("v4only", runs)  # a connector without IPv6: the normal IPv4 time
        self.assertEqual(v4_seen, {"v4"})
        self.lab.exec("public", ["nft", "-f", "-"], input=BLOCK6, check=True)
        blocked_times, blocked_seen = self.times("blocked", runs, *PEER6)
        self.assertEqual(blocked_seen, {"v4"})
        delay_ms = FAMILY_HEAD_START * 1000
        # IPv4 wins within the happy-eyeballs delay plus the normal time (and a margin for this noisy machine).
        self.assertLessEqual(
            median(blocked_times), median(v4_times) + delay_ms + 200, (v6_times, v4_times, blocked_times)
        )
        print(
            f"\nconnect ms (median of {runs}): ipv6 {median(v6_times):.0f}, ipv4 only {median(v4_times):.0f}, "
            f"ipv6 blocked {median(blocked_times):.0f}; runs {v6_times} {v4_times} {blocked_times}"
        )

"""
The NAT lab on a real kernel: each behaviour is measured from outside with
the plain-socket probes, links are timed, and cleanup is checked.

Needs root, C{ip} and C{nft}; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.lab.interfaces import ILab
from natbypass.lab.lab import Lab, owner_alive, read_state, remove_lab, running_labs
from natbypass.lab.netns import LabError, lab_netns, missing_requirements, python_env

SKIP = missing_requirements()
TUN_SKIP = missing_requirements(tun=True)
PY = sys.executable
PORTS = (4000, 4001)


def start_reflector(lab: Lab) -> None:
    """Start the probe reflector on the mediator's two addresses and wait until it listens."""
    a1, a2 = lab.mediator_addresses
    proc = lab.spawn(
        "mediator",
        [PY, "-m", "natbypass.lab.probe", "serve", a1, a2, "--ports", "4000,4001"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise AssertionError(f"reflector did not start: {line!r}")


def probe_all(lab: Lab, jobs: dict[str, tuple[str, list[str]]], timeout: float = 60) -> dict[str, Any]:
    """Run C{natbypass.lab.probe} commands in parallel: {key: (node, args)} -> {key: decoded JSON}."""
    procs = {
        key: lab.spawn(
            node, [PY, "-m", "natbypass.lab.probe", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, (node, args) in jobs.items()
    }
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"probe {key} failed: {stderr[-800:]}")
        out[key] = json.loads(stdout.strip().splitlines()[-1])
    return out


class _LabCase(SynchronousTestCase):
    if SKIP:
        skip = SKIP


#: site -> (spec, expected UDP/TCP mapping, port preserving, port sequence, expected filtering)
BEHAVIOURS: dict[str, tuple[Any, str, bool, str | None, str]] = {
    "open": ("open", "endpoint-independent", True, None, "endpoint-independent"),
    "fw": ("firewall", "endpoint-independent", True, None, "address-and-port-dependent"),
    "fc": ("full-cone", "endpoint-independent", True, None, "endpoint-independent"),
    "rc": ("restricted-cone", "endpoint-independent", True, None, "address-dependent"),
    "prc": ("port-restricted-cone", "endpoint-independent", True, None, "address-and-port-dependent"),
    "symr": ("symmetric-random", "address-and-port-dependent", False, "random", "address-and-port-dependent"),
    "symp": (
        "symmetric-predictable",
        "address-and-port-dependent",
        False,
        "sequential(+1)",
        "address-and-port-dependent",
    ),
    "fcr": ("full-cone-rewrite", "endpoint-independent", False, None, "endpoint-independent"),
    "rcr": ("restricted-cone-rewrite", "endpoint-independent", False, None, "address-dependent"),
    "prcr": ("port-restricted-cone-rewrite", "endpoint-independent", False, None, "address-and-port-dependent"),
    "adm": ({"nat": {"mapping": "adm", "filtering": "adf"}}, "address-dependent", False, None, "address-dependent"),
}


class BehaviourTests(_LabCase):
    """Each NAT behaviour measured from outside (one lab per test, with just the sites it needs)."""

    def start(self, sites: dict[str, Any]) -> Lab:
        self.lab = Lab.start({"sites": sites})
        self.addCleanup(self.lab.stop)
        start_reflector(self.lab)
        return self.lab

    def server(self, which: int = 0) -> str:
        return f"{self.lab.mediator_addresses[which]}:{PORTS[which]}"

    def test_interface(self) -> None:
        """
        Every ILab attribute is readable on a lab with IPv6; without IPv6,
        C{mediator_addresses6} raises LabError as documented (so verifyObject
        is given an IPv6 lab).
        """
        self.assertTrue(verifyObject(ILab, self.start({"a": {"kind": "open", "ip": "dual"}})))
        ipv4 = Lab.start({"sites": {"b": "open"}})
        self.addCleanup(ipv4.stop)
        self.assertRaises(LabError, getattr, ipv4, "mediator_addresses6")

    def test_mapping(self) -> None:
        """UDP and TCP mapping, port preservation and port sequence match each site's spec."""
        self.start({name: spec for name, (spec, *_) in BEHAVIOURS.items()})
        # UDP, then TCP: a sequential NAT has one port counter for all its flows, so probes
        # running at the same time through it would interleave their ports.
        results = probe_all(
            self.lab, {(site, "udp"): (site, ["mapping", self.server(0), self.server(1)]) for site in BEHAVIOURS}
        )
        results.update(
            probe_all(
                self.lab,
                {(site, "tcp"): (site, ["mapping", self.server(0), self.server(1), "--tcp"]) for site in BEHAVIOURS},
            )
        )
        for (site, proto), got in results.items():
            _, mapping, pp, sequence, _ = BEHAVIOURS[site]
            where = f"{site}/{proto}: {got}"
            self.assertEqual(got["mapping"], mapping, where)
            self.assertEqual(got["public_ip"], self.lab.public_address(site), where)
            self.assertEqual(got["port_preserving"], pp, where)
            self.assertEqual(got["port_sequence"], sequence, where)

    def test_filtering(self) -> None:
        """UDP filtering (replies from other sockets) and TCP filtering (connect-backs) match each site's spec."""
        self.start({name: spec for name, (spec, *_) in BEHAVIOURS.items()})
        jobs = {(site, "udp"): (site, ["filtering", self.server(0)]) for site in BEHAVIOURS}
        jobs.update({(site, "tcp"): (site, ["filtering", self.server(0), "--tcp"]) for site in BEHAVIOURS})
        for (site, proto), got in probe_all(self.lab, jobs).items():
            self.assertEqual(got["filtering"], BEHAVIOURS[site][4], f"{site}/{proto}: {got}")

    def test_unsolicited_inbound(self) -> None:
        """From outside, a closed port is silent on 'drop' sites and refuses on 'reject' sites."""
        expect = {
            "prc": "timeout",
            "fc": "timeout",
            "fw": "timeout",
            "rej": "refused",
            "fwr": "refused",
            "open": "refused",
        }
        self.start(
            {
                "prc": "port-restricted-cone",
                "fc": "full-cone",
                "fw": "firewall",
                "open": "open",
                "rej": {"nat": {"preset": "port-restricted-cone", "inbound": "reject"}},
                "fwr": {"kind": "firewall", "inbound": "reject"},
            }
        )
        jobs = {}
        for site in expect:
            target = f"{self.lab.public_address(site)}:9"
            jobs[(site, "udp")] = ("mediator", ["send", target, "--wait", "1"])
            jobs[(site, "tcp")] = ("mediator", ["send", target, "--wait", "1", "--tcp"])
        for (site, proto), got in probe_all(self.lab, jobs).items():
            self.assertEqual(got["result"], expect[site], f"{site}/{proto}")

    def _hairpin(self, site: str, sender: str = "1", listener_host: str = "2") -> tuple[dict[str, Any], list[str]]:
        listener = self.lab.spawn(
            f"{site}.{listener_host}",
            [PY, "-m", "natbypass.lab.probe", "listen", self.server(0), "--seconds", "4"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None
        public = json.loads(listener.stdout.readline())["public"]
        self.assertTrue(public.startswith(self.lab.public_address(site) + ":"), public)
        got = probe_all(self.lab, {"x": (f"{site}.{sender}", ["send", public, "--wait", "1"])})["x"]
        listener.kill()
        rest = listener.stdout.read().splitlines()
        listener.wait()
        return got, rest

    def test_hairpin_on(self) -> None:
        """A LAN host reaches its neighbour's public mapping, seen as coming from the NAT's public address."""
        self.start({"hp": {"nat": {"preset": "port-restricted-cone", "hairpin": True}, "hosts": 2}})
        got, seen = self._hairpin("hp")
        self.assertEqual(got["result"], "reply")
        self.assertTrue(got["seen_as"].startswith(self.lab.public_address("hp") + ":"), got)
        self.assertEqual(len(seen), 1)
        self.assertTrue(json.loads(seen[0])["from"].startswith(self.lab.public_address("hp") + ":"), seen)

    def test_hairpin_same_host(self) -> None:
        """Hairpinning also works between two sockets of one host (what RFC 5780 clients test)."""
        self.start({"hp": {"nat": {"preset": "full-cone", "hairpin": True}}})
        got, seen = self._hairpin("hp", sender="1", listener_host="1")
        self.assertEqual(got["result"], "reply")
        self.assertEqual(len(seen), 1)

    def test_hairpin_off(self) -> None:
        self.start({"nohp": {"nat": "port-restricted-cone", "hosts": 2}})
        got, seen = self._hairpin("nohp")
        self.assertEqual(got["result"], "timeout")
        self.assertEqual(seen, [])

    def test_lan_direct(self) -> None:
        """Two hosts behind one NAT talk directly over the LAN, with private addresses."""
        self.start({"nohp": {"nat": "port-restricted-cone", "hosts": 2}})
        listener = self.lab.spawn(
            "nohp.2",
            [PY, "-m", "natbypass.lab.probe", "listen", self.server(0), "--seconds", "3", "--port", "5555"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert listener.stdout is not None
        listener.stdout.readline()
        got = probe_all(self.lab, {"x": ("nohp.1", ["send", f"{self.lab.address('nohp.2')}:5555"])})["x"]
        listener.kill()
        listener.wait()
        self.assertEqual(got["result"], "reply")
        self.assertTrue(got["seen_as"].startswith(self.lab.address("nohp.1") + ":"), got)

    def test_mapping_timeout(self) -> None:
        """A 2 s UDP timeout: a reply 1 s after the last packet gets in, one 3.5 s after does not."""
        self.start(
            {
                "tmo": {"nat": {"preset": "port-restricted-cone", "udp_timeout": 2}},
                "tmoe": {"nat": {"preset": "full-cone", "udp_timeout": 2}},
                "prc": "port-restricted-cone",
            }
        )
        jobs = {}
        for site in ("tmo", "tmoe", "prc"):
            jobs[(site, 1000)] = (site, ["send", self.server(0), "--delay-ms", "1000"])
            jobs[(site, 3500)] = (site, ["send", self.server(0), "--delay-ms", "3500"])
        got = probe_all(self.lab, jobs)
        self.assertEqual(got[("tmo", 1000)]["result"], "reply")
        self.assertEqual(got[("tmoe", 1000)]["result"], "reply")
        self.assertEqual(got[("tmo", 3500)]["result"], "timeout")
        self.assertEqual(got[("tmoe", 3500)]["result"], "timeout")
        self.assertEqual(got[("prc", 3500)]["result"], "reply")  # default 30 s timeout

    def test_no_way_out(self) -> None:
        """No lab namespace has a route outside the lab's ranges, and the lab adds no interface here."""
        before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        self.start({"open": "open", "fc": {"nat": "full-cone", "delay_ms": 0 if TUN_SKIP else 1}})
        self.assertEqual(subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout, before)
        for node in ["mediator", "open", "fc.nat", "public"]:
            r = self.lab.exec(node, ["ip", "route", "get", "192.0.2.1"])
            self.assertNotEqual(r.returncode, 0, f"{node} has a route out: {r.stdout}")
        # A host behind a NAT only has its default route to the NAT (which has none).
        r = self.lab.exec("fc", ["ip", "route", "get", "192.0.2.1"])
        self.assertIn("via 10.2.0.1 dev eth0", r.stdout)

    def test_addresses(self) -> None:
        self.start({"x": "open", "hp": {"nat": "full-cone", "hosts": 2}})
        self.assertEqual(self.lab.mediator_addresses, ("198.18.0.2", "198.18.0.3"))
        self.assertEqual(self.lab.address("hp.2"), "10.2.0.3")
        self.assertEqual(self.lab.public_address("hp.2"), self.lab.public_address("hp"))
        r = self.lab.exec("hp.2", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        self.assertIn("10.2.0.3/24", r.stdout)


class LinkTests(_LabCase):
    """Delay, jitter and loss are what was asked for (measured round trips to the mediator)."""

    if TUN_SKIP:
        skip = TUN_SKIP

    def test_delay_jitter_loss(self) -> None:
        spec = {
            "sites": {
                "d": {"nat": "full-cone", "delay_ms": 25},
                "j": {"kind": "open", "delay_ms": 20, "jitter_ms": 6},
                "l": {"kind": "open", "loss_pct": 20},
                "z": "open",
            }
        }
        with Lab.start(spec) as lab:
            start_reflector(lab)
            server = f"{lab.mediator_addresses[0]}:{PORTS[0]}"
            args = ["rtt", server, "--count", "400", "--interval", "0.005"]
            got = probe_all(lab, {s: (s, args) for s in "djlz"})
        d, j, l, z = (got[s] for s in "djlz")
        # Delay is one way, each direction: RTT ~ 2 x 25 ms, never less.
        self.assertGreaterEqual(d["min_ms"], 50.0, d)
        self.assertLess(d["median_ms"], 50.0 + 10, d)
        self.assertEqual(d["loss_pct"], 0.0, d)
        # Jitter +/-6 ms each way: spread visible, bounded below by 2 x (20 - 6).
        self.assertGreaterEqual(j["min_ms"], 28.0, j)
        self.assertGreater(j["stdev_ms"], 1.0, j)
        self.assertLess(abs(j["median_ms"] - 40.0), 8, j)
        # 20 % each direction: 1 - 0.8^2 = 36 % of round trips lost (binomial sd 2.4 % at n=400).
        self.assertLess(abs(l["loss_pct"] - 36.0), 10.0, l)
        self.assertLess(l["median_ms"], 10.0, l)
        # The plain link adds neither.
        self.assertEqual(z["loss_pct"], 0.0, z)
        self.assertLess(z["median_ms"], 10.0, z)


class LifecycleTests(_LabCase):
    def test_stop_removes_everything(self) -> None:
        lab = Lab.start({"sites": {"a": {"nat": "full-cone", "delay_ms": 0 if TUN_SKIP else 5}, "b": "open"}})
        names = {n.netns for n in lab.plan.nodes}
        self.assertEqual(set(lab_netns(lab.lab_id)[lab.lab_id]), names)
        self.assertIsNotNone(read_state(lab.lab_id))
        proc = lab.spawn("a", ["sleep", "60"])
        lab.stop()
        self.assertEqual(lab_netns(lab.lab_id), {})
        self.assertIsNone(read_state(lab.lab_id))
        self.assertIsNotNone(proc.poll())
        lab.stop()  # idempotent

    def test_context_manager_cleans_up_on_error(self) -> None:
        holder = []
        with self.assertRaises(ZeroDivisionError):
            with Lab.start("a=open") as lab:
                holder.append(lab.lab_id)
                raise ZeroDivisionError("a test failing inside the lab")
        self.assertEqual(lab_netns(holder[0]), {})

    def test_bad_spec_builds_nothing(self) -> None:
        before = set(lab_netns())
        self.assertRaises(ValueError, Lab.start, {"sites": {"a": "nope"}})
        self.assertEqual(set(lab_netns()), before)

    def test_two_labs_side_by_side(self) -> None:
        """Two labs with the same site names and addresses do not see each other."""
        with Lab.start("a=full-cone") as one, Lab.start("a=full-cone") as two:
            self.assertNotEqual(one.lab_id, two.lab_id)
            start_reflector(one)
            server = f"{one.mediator_addresses[0]}:{PORTS[0]}"
            self.assertEqual(probe_all(one, {"x": ("a", ["send", server])})["x"]["result"], "reply")
            # The same address in lab two is lab two's mediator, which runs no reflector.
            self.assertEqual(probe_all(two, {"x": ("a", ["send", server])})["x"]["result"], "refused")
        self.assertEqual(lab_netns(one.lab_id), {})
        self.assertEqual(lab_netns(two.lab_id), {})

    def _owner(self) -> subprocess.Popen[str]:
        code = (
            "import sys, time\n"
            "from natbypass.lab.lab import Lab\n"
            f"lab = Lab.start({{'sites': {{'a': {{'nat': 'full-cone', 'delay_ms': {0 if TUN_SKIP else 1}}}}}}})\n"
            "print(lab.lab_id, flush=True)\n"
            "time.sleep(60)\n"
        )
        return subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, env=python_env())

    def test_sigterm_cleans_up(self) -> None:
        owner = self._owner()
        assert owner.stdout is not None
        lab_id = owner.stdout.readline().strip()
        self.assertTrue(lab_netns(lab_id))
        owner.send_signal(signal.SIGTERM)
        owner.wait(20)
        self.assertEqual(lab_netns(lab_id), {})
        self.assertIsNone(read_state(lab_id))

    def test_sigint_cleans_up(self) -> None:
        """Ctrl-C in the owner (KeyboardInterrupt) still removes the lab, through atexit."""
        owner = self._owner()
        assert owner.stdout is not None
        lab_id = owner.stdout.readline().strip()
        self.assertTrue(lab_netns(lab_id))
        owner.send_signal(signal.SIGINT)
        owner.wait(20)
        self.assertEqual(lab_netns(lab_id), {})
        self.assertIsNone(read_state(lab_id))

    def test_killed_owner_leaves_a_stale_lab(self) -> None:
        """SIGKILL cannot be caught: the lab is then stale, and removable by id."""
        owner = self._owner()
        assert owner.stdout is not None
        lab_id = owner.stdout.readline().strip()
        owner.kill()
        owner.wait()
        self.addCleanup(remove_lab, lab_id)
        state = running_labs()[lab_id]
        self.assertFalse(owner_alive(state))
        remove_lab(lab_id)
        self.assertEqual(lab_netns(lab_id), {})
        self.assertNotIn(lab_id, running_labs())

    def test_attach(self) -> None:
        with Lab.start("a=symmetric-random,b=open") as lab:
            other = Lab.attach(lab.lab_id)
            self.assertEqual(other.spec, lab.spec)
            self.assertEqual(other.public_address("b"), lab.public_address("b"))
            self.assertEqual(other.exec("b", ["ip", "-4", "-o", "addr", "show", "wan0"]).returncode, 0)
        self.assertRaises(LabError, Lab.attach, lab.lab_id)


class RulesetKernelTests(_LabCase):
    def test_every_combination_loads(self) -> None:
        """The kernel accepts the NAT ruleset of every mapping x filtering x inbound x hairpin (nft -c, in a lab namespace)."""
        import itertools

        from natbypass.lab import rules
        from natbypass.lab.spec import FilteringRule, Inbound, MappingRule, NatRules

        with Lab.start("a=full-cone") as lab:
            for m, f, i, h in itertools.product(MappingRule, FilteringRule, Inbound, (False, True)):
                text = rules.nat_ruleset(NatRules(m, f, i, h, 5), "wan0", "198.18.1.1", "lan0", "10.1.0.0/24")
                r = lab.exec(
                    "a.nat", ["nft", "-c", "-f", "-"], input=text.replace(f"table ip {rules.TABLE}", "table ip nbcheck")
                )
                self.assertEqual(r.returncode, 0, f"{m}/{f}/{i}/hairpin={h}: {r.stderr}")

"""
The mediator behind a 1:1 NAT (natbypass.lab.onetoone): C{natbypass detect}
from lab sites behind known NATs, against the mediator in a "cloud VM" with
private addresses and C{--stun-advertise}, must give the answer it gives
against the lab's own mediator (public addresses on its interface); without
C{--stun-advertise} it cannot (the responder names unreachable private
addresses).  The real-network tests need root, ip and nft; the ruleset is
tested everywhere.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import onetoone
from natbypass.lab.netns import missing_requirements

SKIP = missing_requirements()

#: A site per filtering behaviour (the CHANGE-REQUEST answers must come from the right public address)
#: and a symmetric one (the mapping tests must reach the other public address).
SITES = {
    "fc": "full-cone",
    "rc": "restricted-cone",
    "prc": "port-restricted-cone",
    "sym": "symmetric-random",
}
#: What must match between the two mediators: everything detect concludes.
COMPARED = ("nat_type", "mapping", "filtering", "port_preserving", "tcp_mapping", "reachable")


class RulesetTests(SynchronousTestCase):
    def test_each_pair_both_ways_ports_kept(self) -> None:
        text = onetoone.onetoone_ruleset((("198.18.0.12", "10.99.0.2"), ("198.18.0.13", "10.99.0.3")))
        self.assertIn("ip daddr 198.18.0.12 dnat ip to 10.99.0.2\n", text)
        self.assertIn("ip daddr 198.18.0.13 dnat ip to 10.99.0.3\n", text)
        self.assertIn("ip saddr 10.99.0.2 snat ip to 198.18.0.12\n", text)
        self.assertIn("ip saddr 10.99.0.3 snat ip to 198.18.0.13\n", text)
        self.assertNotIn(":", text.split("table ip onetoone {\n", 1)[1].replace("policy accept;", ""))  # no ports
        self.assertEqual(text.count("type nat hook"), 2)

    def test_cloud_vm_pairs(self) -> None:
        vm = onetoone.CloudVM("nbl000000-cgw", "nbl000000-cvm")
        self.assertEqual(vm.pairs, (("198.18.0.12", "10.99.0.2"), ("198.18.0.13", "10.99.0.3")))


def summary(result: dict) -> dict:
    return {key: result.get(key, result.get("error")) for key in COMPARED}


class OneToOneLabTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def setUp(self) -> None:
        from natbypass.lab.lab import Lab

        self.lab = Lab.start({"sites": SITES})
        self.addCleanup(self.lab.stop)
        self.vm = onetoone.add_cloud_vm(self.lab)

    def detect_all(self, stun_ip: str) -> dict[str, dict]:
        with ThreadPoolExecutor(len(SITES)) as pool:
            return dict(zip(SITES, pool.map(lambda site: onetoone.run_detect(self.lab, site, stun_ip), SITES)))

    def behind(self, **kwargs) -> dict[str, dict]:
        mediator = onetoone.start_mediator(self.vm, **kwargs)
        try:
            return self.detect_all(self.vm.public[0])
        finally:
            onetoone.stop(mediator)

    def test_detect_through_onetoone_nat_with_advertise(self) -> None:
        """Behind the 1:1 NAT with --stun-advertise (one process, then two workers): the reference answers."""
        from natbypass.lab import interop

        interop.start_mediator(self.lab)
        # Against the lab's own mediator, which holds its public addresses: the reference, itself checked.
        reference = self.detect_all(self.lab.mediator_addresses[0])
        self.assertEqual(
            {site: r.get("nat_type") for site, r in reference.items()},
            {"fc": "full-cone", "rc": "restricted-cone", "prc": "port-restricted-cone", "sym": "symmetric"},
        )
        expected = {site: summary(r) for site, r in reference.items()}
        for workers in (1, 2):
            results = self.behind(workers=workers)
            self.assertEqual({site: summary(r) for site, r in results.items()}, expected, f"{workers} workers")
            for site, r in results.items():
                self.assertEqual(r["server"], f"{self.vm.public[0]}:3478", site)
                self.assertEqual(r["other_address"], f"{self.vm.public[1]}:3479", site)  # public, not 10.99.0.3
                for test in r["tests"] + r["tcp_tests"]:
                    if test["answered"]:  # RESPONSE-ORIGIN: a public address
                        self.assertIn(test["source"].rsplit(":", 1)[0], self.vm.public, (site, test))

    def test_without_advertise_detection_fails(self) -> None:
        """The control: without --stun-advertise the responder names private addresses clients cannot reach."""
        results = self.behind(advertise=False)
        for site, r in results.items():
            self.assertEqual(r.get("other_address"), f"{self.vm.local[1]}:3479", site)
            self.assertEqual(r.get("mapping"), "unknown", site)

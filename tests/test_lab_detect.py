"""
NAT detection against the lab's ground truth: C{natbypass detect} (UDP and
C{--tcp}) and coturn's C{turnutils_natdiscovery} run in every kind of site
against the mediator's RFC 5780 responder must report the lab's behaviour.

The real-network tests need root, ip, nft (and coturn for its test); the
parsing and expectations are tested everywhere.
"""

from __future__ import annotations

import importlib.util

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import interop
from natbypass.lab.netns import missing_requirements
from natbypass.lab.spec import parse_spec

SKIP = missing_requirements()
if not SKIP and (
    importlib.util.find_spec("natbypass.app.detect") is None
    or importlib.util.find_spec("natbypass.app.mediator_tap") is None
):
    SKIP = "natbypass.app.detect / natbypass.app.mediator_tap (issue 2) are not in the tree yet"

COTURN_EIM = """
-= Mapping Behavior Discovery =-

========================================
RFC 5780 response 1
No ALG: Mapped == XOR-Mapped
0: : IPv4. Response origin: : 198.18.0.2:3478
0: : IPv4. UDP reflexive addr: 198.18.1.1:56256

========================================
NAT with Endpoint Independent Mapping!
========================================

-= Filtering Behavior Discovery =-
STUN receive timeout..

========================================
NAT with Address Dependent Filtering!
========================================
"""
COTURN_HAIRPIN = """
-= Hairpinning Behavior Discovery =-
0: : IPv4. UDP reflexive addr: 198.18.1.1:52349
Received a request (maybe a successful hairpinning)

-= Mapping Behavior Discovery =-

========================================
NAT with Address and Port Dependent Mapping!
========================================
"""


class ParseTests(SynchronousTestCase):
    def test_mapping_and_filtering(self) -> None:
        self.assertEqual(
            interop.parse_natdiscovery(COTURN_EIM),
            {"mapping": "endpoint-independent", "filtering": "address-dependent", "hairpin": None},
        )

    def test_hairpin(self) -> None:
        got = interop.parse_natdiscovery(COTURN_HAIRPIN)
        self.assertEqual(got, {"mapping": "address-and-port-dependent", "filtering": None, "hairpin": "yes"})
        no = COTURN_HAIRPIN.replace("Received a request (maybe a successful hairpinning)", "STUN receive timeout..")
        self.assertEqual(interop.parse_natdiscovery(no)["hairpin"], "no")

    def test_no_nat(self) -> None:
        self.assertEqual(
            interop.parse_natdiscovery("-= Mapping Behavior Discovery =-\nNo NAT! (Endpoint Independent Mapping)\n")[
                "mapping"
            ],
            "endpoint-independent",
        )

    @given(
        st.lists(
            st.sampled_from(
                [
                    "NAT with Endpoint Independent Mapping!",
                    "NAT with Address Dependent Filtering!",
                    "-= Hairpinning Behavior Discovery =-",
                    "Received a request (maybe a successful hairpinning)",
                    "No NAT!",
                    "STUN receive timeout..",
                    "-= Mapping Behavior Discovery =-",
                ]
            )
            | st.text(max_size=30),
            max_size=12,
        )
    )
    @settings(deadline=None)
    def test_any_output(self, lines: list[str]) -> None:
        """Any output parses to known values or None, never an exception."""
        got = interop.parse_natdiscovery("\n".join(lines))
        names = {None, "endpoint-independent", "address-dependent", "address-and-port-dependent"}
        self.assertIn(got["mapping"], names)
        self.assertIn(got["filtering"], names)
        self.assertIn(got["hairpin"], {None, "yes", "no"})


class ExpectedTests(SynchronousTestCase):
    def test_expectations(self) -> None:
        spec = parse_spec({"sites": interop.TABLE_SITES})
        e = {s.name: interop.expected(s) for s in spec.sites}
        self.assertEqual((e["open"].mapping, e["open"].filtering), ("none", "none"))
        self.assertEqual((e["fw"].mapping, e["fw"].filtering), ("none", "address-and-port-dependent"))
        self.assertEqual(
            (e["rc"].mapping, e["rc"].filtering, e["rc"].port_preserving),
            ("endpoint-independent", "address-dependent", True),
        )
        self.assertFalse(e["fcr"].port_preserving)
        self.assertEqual(e["symp"].mapping, "address-and-port-dependent")
        self.assertEqual(e["adm"].mapping, "address-dependent")
        self.assertEqual(e["adm"].coturn_mapping, "address-and-port-dependent")
        self.assertEqual((e["hairpin"].hairpin, e["fc"].hairpin, e["open"].hairpin), ("yes", "no", None))

    def test_markdown_flags_mismatches(self) -> None:
        spec = parse_spec({"sites": {"fc": "full-cone"}})
        row = interop.Row("fc", "eim-pp/eif drop", interop.expected(spec.sites[0]))
        row.detect = {
            "nat_type": "full-cone",
            "mapping": "endpoint-independent",
            "filtering": "endpoint-independent",
            "tcp_mapping": "endpoint-independent",
            "port_preserving": True,
        }
        row.coturn = {"mapping": "endpoint-independent", "filtering": "address-dependent", "hairpin": "no"}
        self.assertTrue(row.detect_ok)
        self.assertFalse(row.coturn_ok)
        text = interop.markdown([row])
        self.assertIn("| fc | `eim-pp/eif drop` |", text)
        self.assertIn("**NO**", text)


class DetectInLabTests(SynchronousTestCase):
    if SKIP:
        skip = SKIP

    def start(self) -> interop.Lab:
        lab = interop.Lab.start({"sites": interop.TABLE_SITES})
        self.addCleanup(lab.stop)
        interop.start_mediator(lab)
        return lab

    def test_detect_classifies_every_site(self) -> None:
        """natbypass detect --json --tcp reports each site's configured mapping, filtering and port preservation."""
        rows = interop.collect(self.start(), with_coturn=False, with_probes=False, parallel=3)
        bad = {r.site: (r.expected, r.detect) for r in rows if not r.detect_ok}
        self.assertEqual(bad, {})

    def test_coturn_against_our_responder(self) -> None:
        """coturn's RFC 5780 client, pointed at our responder, reports each site's behaviour."""
        if not interop.have_coturn():
            raise self.skipTest("turnutils_natdiscovery (coturn) is not installed")
        rows = interop.collect(self.start(), with_coturn=True, with_probes=False, parallel=3)
        bad = {r.site: (r.expected, r.coturn) for r in rows if not r.coturn_ok}
        self.assertEqual(bad, {})

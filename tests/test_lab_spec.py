"""
Tests for natbypass.lab.spec: presets, strict parsing, canonical JSON round trip.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab.spec import (
    PRESETS,
    FilteringRule,
    Inbound,
    IpVersion,
    LabSpec,
    LabSpecError,
    MappingRule,
    NatRules,
    SiteKind,
    describe,
    loads,
    parse_spec,
    spec_to_json,
)
from natbypass.testing.labspec import specs


class PresetTests(SynchronousTestCase):
    def test_classic_types(self) -> None:
        """Each classic NAT type maps to the RFC 4787 behaviour it is named after."""
        self.assertEqual(PRESETS["full-cone"], NatRules(MappingRule.EIM_PP, FilteringRule.EIF))
        self.assertEqual(PRESETS["restricted-cone"], NatRules(MappingRule.EIM_PP, FilteringRule.ADF))
        self.assertEqual(PRESETS["port-restricted-cone"], NatRules(MappingRule.EIM_PP, FilteringRule.APDF))
        self.assertEqual(PRESETS["symmetric-random"].mapping, MappingRule.APDM_RANDOM)
        self.assertEqual(PRESETS["symmetric-predictable"].mapping, MappingRule.APDM_SEQUENTIAL)
        self.assertIs(PRESETS["open"], SiteKind.OPEN)
        self.assertIs(PRESETS["firewall"], SiteKind.FIREWALL)

    def test_preset_strings(self) -> None:
        spec = parse_spec({"sites": {"a": "full-cone", "b": "open", "c": "firewall"}})
        self.assertEqual(spec.site("a").kind, SiteKind.NAT)
        self.assertEqual(spec.site("a").nat, PRESETS["full-cone"])
        self.assertEqual(spec.site("b").kind, SiteKind.OPEN)
        self.assertEqual(spec.site("c").kind, SiteKind.FIREWALL)

    def test_preset_with_overrides(self) -> None:
        spec = parse_spec({"sites": {"a": {"nat": {"preset": "full-cone", "hairpin": True, "inbound": "reject"}}}})
        nat = spec.site("a").nat
        assert nat is not None
        self.assertEqual(
            (nat.mapping, nat.filtering, nat.hairpin, nat.inbound),
            (MappingRule.EIM_PP, FilteringRule.EIF, True, Inbound.REJECT),
        )

    def test_short_form(self) -> None:
        self.assertEqual(
            loads("a=full-cone, b=symmetric-random"), parse_spec({"sites": {"a": "full-cone", "b": "symmetric-random"}})
        )

    def test_describe(self) -> None:
        self.assertEqual(describe(PRESETS["full-cone"]), "eim-pp/eif drop")  # type: ignore[arg-type]
        self.assertEqual(describe(None, SiteKind.FIREWALL), "firewall")


class ErrorTests(SynchronousTestCase):
    def assertRejected(self, obj: object, fragment: str) -> None:
        e = self.assertRaises(LabSpecError, parse_spec, obj)
        self.assertIn(fragment, str(e))

    def test_errors_name_the_field(self) -> None:
        self.assertRejected({"sites": {"a": "fullcone"}}, "sites.a")
        self.assertRejected({"sites": {"a": {"nat": {"mapping": "weird"}}}}, "sites.a.nat.mapping")
        self.assertRejected({"sites": {"a": {"nat": "full-cone", "hosts": 0}}}, "sites.a.hosts")
        self.assertRejected({"sites": {"a": {"nat": "full-cone", "loss_pct": 101}}}, "sites.a.loss_pct")
        self.assertRejected({"sites": {"a": {"nat": "full-cone", "delay_ms": 5, "jitter_ms": 6}}}, "jitter_ms")
        self.assertRejected({"sites": {"a": {"nat": "full-cone", "colour": 1}}}, "colour")
        self.assertRejected({"sites": {"mediator": "open"}}, "site names")
        self.assertRejected({"sites": {"A": "open"}}, "site names")
        self.assertRejected({"sites": {}}, "non-empty")
        self.assertRejected({"sites": {"a": {"kind": "open", "inbound": "reject"}}}, "firewall")
        self.assertRejected({"sites": {"a": {"kind": "open", "hosts": 2}}}, "hosts")
        self.assertRejected({"sites": {"a": {"nat": {"udp_timeout": True}}}}, "udp_timeout")
        self.assertRejected([], "spec")

    def test_bad_text(self) -> None:
        self.assertRaises(LabSpecError, loads, "{not json")
        self.assertRaises(LabSpecError, loads, "a")
        self.assertRaises(LabSpecError, loads, "a=open,a=open")

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
            max_leaves=12,
        )
    )
    @settings(max_examples=300, deadline=None)
    def test_junk_only_raises_spec_error(self, obj: object) -> None:
        """Whatever JSON comes in, the parser either accepts it or raises LabSpecError."""
        for candidate in (obj, {"sites": obj}, {"sites": {"a": obj}}, {"sites": {"a": {"nat": obj}}}):
            try:
                parse_spec(candidate)
            except LabSpecError:
                pass


class RoundTripTests(SynchronousTestCase):
    @given(specs())
    @settings(max_examples=200, deadline=None)
    def test_round_trip(self, spec: LabSpec) -> None:
        """The canonical JSON of a spec parses back to the same spec, also through text."""
        self.assertEqual(parse_spec(spec_to_json(spec)), spec)
        self.assertEqual(loads(json.dumps(spec_to_json(spec))), spec)


class IpVersionTests(SynchronousTestCase):
    def test_default_is_ipv4(self) -> None:
        """Without C{ip} a site is IPv4 only, and its canonical JSON has no C{ip} field."""
        spec = loads("a=firewall,b=full-cone")
        self.assertEqual({s.ip for s in spec.sites}, {IpVersion.V4})
        self.assertFalse(spec.ipv6)
        self.assertNotIn("ip", json.dumps(spec_to_json(spec)))

    def test_ipv6_sites(self) -> None:
        """Firewall and open sites may be IPv6 only or dual stack; NAT sites dual stack."""
        spec = parse_spec(
            {
                "sites": {
                    "a": {"kind": "firewall", "ip": "v6"},
                    "b": {"kind": "open", "ip": "dual"},
                    "c": {"nat": "full-cone", "ip": "dual"},
                }
            }
        )
        self.assertEqual([s.ip for s in spec.sites], [IpVersion.V6, IpVersion.DUAL, IpVersion.DUAL])
        self.assertTrue(spec.ipv6)
        self.assertEqual(spec_to_json(spec)["sites"]["c"]["ip"], "dual")

    def test_nat_site_without_ipv4(self) -> None:
        """An IPv6-only NAT site would be NAT66, which the lab does not build: refused, saying so."""
        e = self.assertRaises(LabSpecError, parse_spec, {"sites": {"a": {"nat": "full-cone", "ip": "v6"}}})
        self.assertIn("sites.a.ip", str(e))
        self.assertIn("not NATed", str(e))

    def test_bad_ip(self) -> None:
        e = self.assertRaises(LabSpecError, parse_spec, {"sites": {"a": {"kind": "firewall", "ip": "v5"}}})
        self.assertIn("sites.a.ip", str(e))

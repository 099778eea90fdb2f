"""
The lab's port-mapping gateway option, without a lab: the spec field, the
nftables text and miniupnpd's configuration.  (tests/test_lab_portmap.py
runs the real gateway.)
"""

from __future__ import annotations

from hypothesis import given
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import rules, spec
from natbypass.testing.labspec import specs


class SpecTests(SynchronousTestCase):
    def test_portmap_field(self) -> None:
        s = spec.loads('{"sites": {"g": {"nat": {"preset": "symmetric-random", "portmap": true}}}}')
        nat = s.site("g").nat
        self.assertTrue(nat.portmap)
        self.assertEqual(nat.mapping, spec.MappingRule.APDM_RANDOM)
        self.assertEqual(spec.nat_to_json(nat)["portmap"], True)
        self.assertEqual(spec.parse_spec(spec.spec_to_json(s)), s)
        self.assertEqual(spec.describe(nat), "apdm-random/apdf drop portmap")

    def test_off_by_default_and_absent_from_the_canonical_form(self) -> None:
        s = spec.loads("a=full-cone")
        self.assertFalse(s.site("a").nat.portmap)
        self.assertNotIn("portmap", spec.spec_to_json(s)["sites"]["a"]["nat"])

    def test_bad_values(self) -> None:
        for bad in ('"yes"', "1", "null"):
            with self.assertRaises(spec.LabSpecError) as e:
                spec.loads(f'{{"sites": {{"g": {{"nat": {{"portmap": {bad}}}}}}}}}')
            self.assertIn("sites.g.nat.portmap", str(e.exception))

    @given(specs())
    def test_portmap_only_in_the_canonical_form_when_on(self, s: spec.LabSpec) -> None:
        """Specs round-trip; `portmap` appears only on the NATs that run a gateway (so existing specs are unchanged)."""
        self.assertEqual(spec.parse_spec(spec.spec_to_json(s)), s)
        for name, site in spec.spec_to_json(s)["sites"].items():
            nat = s.site(name).nat
            self.assertEqual("portmap" in site.get("nat", {}), nat is not None and nat.portmap)


class RulesTests(SynchronousTestCase):
    def test_gateway_ruleset(self) -> None:
        text = rules.gateway_ruleset("198.18.1.1", "wan0")
        self.assertIn(f"table inet {rules.GATEWAY_TABLE} {{", text)
        for chain in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
            self.assertIn(f"  chain {chain} {{\n  }}", text)
        # miniupnpd's DNAT runs before the NAT's own prerouting chain (priority dstnat).
        self.assertIn("type nat hook prerouting priority dstnat - 10;", text)
        # The NAT box's own packets are not rewritten (miniupnpd's STUN check), STUN answers reach it.
        self.assertIn('insert rule ip nblab postrouting oifname "wan0" ip saddr 198.18.1.1 accept', text)
        self.assertIn('insert rule ip nblab input iifname "wan0" udp sport { 3478, 3479 } accept', text)

    def test_miniupnpd_config(self) -> None:
        conf = rules.miniupnpd_config("wan0", "lan0", "10.1.0.0/24", ("198.18.0.2", 3478))
        lines = conf.splitlines()
        for line in (
            "ext_ifname=wan0",
            "listening_ip=lan0",
            "enable_upnp=yes",
            "enable_natpmp=yes",
            "ext_perform_stun=yes",
            "ext_stun_host=198.18.0.2",
            "ext_stun_port=3478",
            "secure_mode=yes",
            f"upnp_nat_table_name={rules.GATEWAY_TABLE}",
            "allow 1024-65535 10.1.0.0/24 1024-65535",
        ):
            self.assertIn(line, lines)
        self.assertEqual(lines[-1], "deny 0-65535 0.0.0.0/0 0-65535")  # the rules are read in order

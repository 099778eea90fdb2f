"""
Tests for the pure parts of the lab builder: topology planning and nftables text.

Whether the rules really behave as named is measured in tests/test_lab_netns.py.
"""

from __future__ import annotations

from hypothesis import given, settings
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import rules
from natbypass.lab.spec import FilteringRule, Inbound, LabSpec, MappingRule, NatRules, loads, parse_spec
from natbypass.lab.topology import LAB_ID, lab_id_of_netns, new_lab_id, plan
from natbypass.testing.labspec import specs


def ruleset(**kw: object) -> str:
    return rules.nat_ruleset(NatRules(**kw), "wan0", "198.18.1.1", "lan0", "10.1.0.0/24")  # type: ignore[arg-type]


class RulesTests(SynchronousTestCase):
    def test_mapping_statements(self) -> None:
        self.assertEqual(rules.snat_statement(NatRules(MappingRule.EIM_PP), "1.2.3.4"), "snat ip to 1.2.3.4")
        self.assertEqual(
            rules.snat_statement(NatRules(MappingRule.APDM_RANDOM), "1.2.3.4"), "snat ip to 1.2.3.4 random"
        )
        eim = rules.snat_statement(NatRules(MappingRule.EIM), "1.2.3.4")
        self.assertIn("jhash ip saddr . th sport mod", eim)
        self.assertNotIn("daddr", eim)
        self.assertIn("ip daddr", rules.snat_statement(NatRules(MappingRule.ADM), "1.2.3.4"))
        seq = rules.snat_statement(NatRules(MappingRule.APDM_SEQUENTIAL), "1.2.3.4")
        self.assertIn("numgen inc", seq)
        self.assertIn(f"0 : {rules.SEQ_PORT_BASE}, 1 : {rules.SEQ_PORT_BASE + 1},", seq)

    def test_filtering(self) -> None:
        """Only EIF and ADF open mapped ports to new flows, ADF only for contacted addresses."""
        self.assertNotIn("dnat ip to", ruleset(filtering=FilteringRule.APDF))
        eif = ruleset(filtering=FilteringRule.EIF)
        self.assertIn("meta l4proto . th dport @natmap dnat", eif)
        self.assertNotIn("@contacted dnat", eif)
        self.assertIn("meta l4proto . th dport . ip saddr @contacted dnat", ruleset(filtering=FilteringRule.ADF))

    def test_inbound(self) -> None:
        self.assertNotIn("reject", ruleset(inbound=Inbound.DROP))
        rejecting = ruleset(inbound=Inbound.REJECT)
        self.assertIn("reject with tcp reset", rejecting)
        self.assertIn("reject with icmp type port-unreachable", rejecting)

    def test_hairpin(self) -> None:
        on, off = ruleset(hairpin=True), ruleset(hairpin=False)
        self.assertIn('iifname "lan0" ip daddr 198.18.1.1', on.split("chain postrouting")[0])
        self.assertIn('oifname "lan0" ip saddr 10.1.0.0/24 ct status dnat', on)
        self.assertNotIn('oifname "lan0"', off)
        self.assertIn('iifname "lan0" ip daddr 198.18.1.1 meta l4proto { udp, tcp } drop', off)

    def test_hairpin_maps_like_outbound(self) -> None:
        """The hairpin rule gives an endpoint the port outbound traffic gets: one jhash seed for both."""
        for mapping in (MappingRule.EIM, MappingRule.ADM):
            text = ruleset(mapping=mapping, hairpin=True)
            snat = rules.snat_statement(NatRules(mapping), "198.18.1.1")
            self.assertIn(f"seed {rules.HASH_SEED}", snat)
            self.assertEqual(text.count(snat), 2)

    def test_timeout(self) -> None:
        self.assertIn("timeout 7s", ruleset(udp_timeout=7))

    def test_firewall_and_loss(self) -> None:
        fw = rules.firewall_ruleset(Inbound.DROP, "wan0")
        self.assertIn("ct state established,related accept", fw)
        self.assertIn('iifname "wan0" drop', fw)
        loss = rules.loss_ruleset(2.5, "wan0")
        self.assertIn(f"numgen random mod {rules.LOSS_SCALE} < {rules.LOSS_SCALE // 40} drop", loss)
        self.assertIn('device "wan0"', loss)


class TopologyTests(SynchronousTestCase):
    def test_ids(self) -> None:
        lab_id = new_lab_id()
        self.assertRegex(lab_id, LAB_ID)
        self.assertNotEqual(lab_id, new_lab_id())
        self.assertEqual(lab_id_of_netns(f"{lab_id}-a-nat"), lab_id)
        self.assertIsNone(lab_id_of_netns("nblzzzzzz-a"))
        self.assertIsNone(lab_id_of_netns("other"))
        self.assertIsNone(lab_id_of_netns("nbl123456"))

    def test_plan(self) -> None:
        spec = parse_spec({"sites": {"a": {"nat": "full-cone", "hosts": 2, "delay_ms": 5}, "b": "open"}})
        p = plan(spec, "nbl0a0b0c")
        names = [n.name for n in p.nodes]
        self.assertEqual(names, ["public", "mediator", "a.nat", "a.1", "a.2", "b.1"])
        self.assertEqual(len({n.netns for n in p.nodes}), len(names))
        for n in p.nodes:
            self.assertTrue(n.netns.startswith("nbl0a0b0c-"))
        self.assertEqual(p.node("a"), p.node("a.1"))
        self.assertEqual(p.node("a.2").addresses, ("10.1.0.3/24",))
        self.assertEqual(p.node("a.2").gateway, "10.1.0.1")
        self.assertEqual(p.site("a").public_ip, "198.18.1.1")
        self.assertEqual(p.site("b").public_ip, "198.18.1.2")
        self.assertEqual(p.node("b").addresses, ("198.18.1.2/15",))
        self.assertEqual(p.mediator.addresses, ("198.18.0.2/15", "198.18.0.3/15"))
        ports = [w.bridge_port for w in p.wan_links]
        self.assertEqual(len(set(ports)), len(ports))
        self.assertTrue(all(len(w.bridge_port) <= 15 and len(w.iface) <= 15 for w in p.wan_links))
        self.assertTrue(p.wan_links[1].link.needs_wire)
        self.assertRaises(KeyError, p.node, "zz")

    def test_addresses_stay_in_lab_ranges(self) -> None:
        """Every address the lab assigns is in 198.18.0.0/15 or 10/8."""
        import ipaddress

        spec = loads(",".join(f"s{i}={'open' if i % 2 else 'full-cone'}" for i in range(200)))
        p = plan(spec, "nbl000000")
        for node in p.nodes:
            for a in node.addresses:
                ip = ipaddress.ip_interface(a).ip
                self.assertTrue(
                    ip in ipaddress.ip_network("198.18.0.0/15") or ip in ipaddress.ip_network("10.0.0.0/8"), a
                )
        self.assertEqual(len({s.public_ip for s in p.sites}), 200)


class PlanPropertyTests(SynchronousTestCase):
    @given(specs())
    @settings(max_examples=100, deadline=None)
    def test_any_spec_plans_cleanly(self, spec: LabSpec) -> None:
        """Any valid spec gives unique namespaces, addresses and bridge ports, and short interface names."""
        p = plan(spec, "nbl0a0b0c")
        netns = [n.netns for n in p.nodes]
        self.assertEqual(len(set(netns)), len(netns))
        self.assertTrue(all(lab_id_of_netns(n) == "nbl0a0b0c" for n in netns))
        addrs = [a.split("/")[0] for n in p.nodes for a in n.addresses]
        self.assertEqual(len(set(addrs)), len(addrs))
        ports = [w.bridge_port for w in p.wan_links]
        self.assertEqual(len(set(ports)), len(ports))
        names = [w.iface for w in p.wan_links] + ports + [l.bridge_port for l in p.lan_links]
        self.assertTrue(all(0 < len(n) <= 15 for n in names))
        self.assertEqual(
            len(p.lan_links),
            sum(s.homes * (s.hosts + (s.cgnat is not None)) for s in spec.sites if s.kind.value == "nat"),
        )


class IPv6PlanTests(SynchronousTestCase):
    def test_ipv4_lab_has_no_ipv6(self) -> None:
        """A spec without IPv6 sites plans no IPv6 anywhere (the lab stays as it was)."""
        lab = plan(parse_spec({"sites": {"a": "full-cone", "b": "firewall"}}), "nbl000001")
        self.assertEqual([n.addresses6 for n in lab.nodes if n.addresses6], [])
        self.assertEqual(lab.routes6(), ())

    def test_dual_and_v6_sites(self) -> None:
        """Benchmarking addresses (2001:2::/48), the mediator's two, and routes to the dual-stack LANs."""
        spec = parse_spec(
            {"sites": {"a": {"nat": "full-cone", "ip": "dual", "hosts": 2}, "b": {"kind": "firewall", "ip": "v6"}}}
        )
        lab = plan(spec, "nbl000001")
        self.assertEqual(lab.mediator.addresses6, ("2001:2::2", "2001:2::3"))
        a, b = lab.sites
        self.assertEqual((a.public_ip, a.public_ip6, a.lan_net6), ("198.18.1.1", "2001:2::1:1", "2001:2:0:1::/64"))
        self.assertEqual([h.addresses6 for h in a.hosts], [("2001:2:0:1::2",), ("2001:2:0:1::3",)])
        self.assertEqual({h.gateway6 for h in a.hosts}, {"2001:2:0:1::1"})
        self.assertEqual((b.public_ip, b.public_ip6), (None, "2001:2::1:2"))
        self.assertEqual(b.border.addresses, ("2001:2::1:2/64",))
        self.assertEqual(
            set(lab.routes6()),
            {
                (lab.mediator.netns, "2001:2:0:1::/64", "2001:2::1:1"),
                (b.border.netns, "2001:2:0:1::/64", "2001:2::1:1"),
            },
        )
        for node in lab.nodes:
            for addr in node.addresses6:
                self.assertTrue(addr.startswith("2001:2:"), addr)

    def test_cgnat_beside_dual_stack(self) -> None:
        """A CGNAT site (IPv4 only) in a lab with IPv6: no IPv6 behind the carrier, no IPv6 route to it."""
        spec = parse_spec({"sites": {"c": "cgnat", "d": {"nat": "port-restricted-cone", "ip": "dual"}}})
        lab = plan(spec, "nbl000001")
        c, d = lab.sites
        self.assertEqual((c.public_ip, c.public_ip6, c.lan_net6), ("198.18.1.1", None, None))
        self.assertEqual([n.addresses6 for h in c.homes for n in (h.nat, *h.hosts)], [(), ()])
        self.assertEqual(d.hosts[0].addresses6, ("2001:2:0:2::2",))
        self.assertEqual(set(lab.routes6()), {(lab.mediator.netns, "2001:2:0:2::/64", "2001:2::1:2")})

    def test_firewall6(self) -> None:
        """The dual-stack NAT's own ip6 table: replies in, new inbound flows dropped or rejected, ND allowed."""
        drop = rules.firewall6_ruleset(Inbound.DROP, "wan0")
        self.assertIn(f"table ip6 {rules.TABLE6}", drop)
        self.assertIn("ct state established,related accept", drop)
        self.assertIn('iifname "wan0" ct state new drop', drop)
        self.assertIn("nd-neighbor-solicit", drop)
        reject = rules.firewall6_ruleset(Inbound.REJECT, "wan0")
        self.assertIn("reject with icmpv6 type port-unreachable", reject)
        self.assertIn("reject with tcp reset", reject)

    def test_firewall_rejects_both_families(self) -> None:
        """The inet firewall's reject has no IPv4-only ICMP type (which would let IPv6 through)."""
        fw = rules.firewall_ruleset(Inbound.REJECT, "wan0")
        self.assertNotIn("icmp type", fw)
        self.assertIn('iifname "wan0" reject\n', fw)

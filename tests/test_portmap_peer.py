"""
The Peer with port mapping, in memory: off by default (nothing goes to the
gateway), on it maps both main ports, publishes them, never waits for a
silent gateway longer than PORTMAP_READY_WAIT, and deletes the mappings at
stop.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from natbypass import peer as peer_module
from natbypass.portmap import natpmp, pcp
from natbypass.portmap.testing import EXT, FakeGateway
from natbypass.testing.mediator import MemoryMediator

GATEWAY = "127.0.0.1"


class PeerPortMappingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MemoryMediator()
        self.addCleanup(self.m.stop)

    def gateway(self, **kw) -> FakeGateway:
        gw = FakeGateway(**kw)
        self.m.reactor.listenUDP(pcp.PORT, gw, interface=GATEWAY)
        self.m.stun_ports.add((GATEWAY, pcp.PORT))
        return gw

    def to_gateway(self) -> list[bytes]:
        return [data for _, _, dest, data in self.m.reactor.network.sent if dest[1] == pcp.PORT]

    def test_off_by_default(self) -> None:
        gw = self.gateway()
        a = self.m.peer("alice", "127.0.0.1", discover=False)
        self.m.settle(a.whenReady())
        self.m.reactor.advance(10)
        self.assertFalse(a.config.port_mapping)
        self.assertEqual((self.to_gateway(), gw.requests, a.port_mappings), ([], [], {}))

    def test_maps_publishes_and_deletes(self) -> None:
        gw = self.gateway()
        a = self.m.peer("alice", "127.0.0.1", discover=False, port_mapping=True, port_mapping_gateway=GATEWAY)
        self.m.settle(a.whenReady())
        udp, tcp = a.port_mappings["udp"], a.port_mappings["tcp"]
        self.assertEqual((udp.method, udp.internal_port, udp.external[0]), ("pcp", a.local_udp_address()[1], EXT))
        self.assertEqual((tcp.protocol, tcp.internal_port), ("tcp", a.local_tcp_address()[1]))
        kinds = {(c.kind, c.host, c.port) for c in a.description().candidates}
        self.assertIn((peer_module.portmap_kind("udp"), *udp.external), kinds)
        self.assertIn((peer_module.portmap_kind("tcp"), *tcp.external), kinds)
        requests = len(gw.requests)
        self.m.settle(a.stopService())
        deletes = [r for r in gw.requests[requests:] if r.lifetime == 0]
        self.assertEqual(sorted(r.protocol for r in deletes), ["tcp", "udp"])
        self.assertEqual({r.nonce for r in deletes}, {udp.state[0], tcp.state[0]})

    def test_silent_gateway_delays_readiness_a_bounded_time(self) -> None:
        self.gateway(pcp_on=False, natpmp_on=False)
        a = self.m.peer("alice", "127.0.0.1", discover=False, port_mapping=True, port_mapping_gateway=GATEWAY)
        start = self.m.reactor.seconds()
        self.m.settle(a.whenReady())
        waited = self.m.reactor.seconds() - start
        self.assertLessEqual(waited, peer_module.PORTMAP_READY_WAIT + 0.1)
        self.assertGreaterEqual(waited, peer_module.PORTMAP_READY_WAIT - 0.1)
        self.assertEqual(a.port_mappings, {})
        self.assertNotIn("portmap", {c.kind for c in a.description().candidates})
        # PCP and NAT-PMP gave up within their budgets; UPnP found no SSDP answer either.
        self.m.settle(a.whenReady(), limit=7, check=False)
        self.assertTrue(any(natpmp.decode_request(d) for d in self.to_gateway() if d[0] == natpmp.VERSION))

    def test_natpmp_when_pcp_is_silent(self) -> None:
        self.gateway(pcp_on=False)
        a = self.m.peer("alice", "127.0.0.1", discover=False, port_mapping=True, port_mapping_gateway=GATEWAY)
        self.m.settle(a.whenReady(), limit=1, check=False)
        self.m.settle(a.whenReady(), limit=3, check=False)
        self.assertEqual({m.method for m in a.port_mappings.values()}, {"natpmp"})

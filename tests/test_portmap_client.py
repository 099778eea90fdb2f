"""
Tests for the NAT-PMP, PCP and UPnP-IGD clients and the PortMapper
service, in memory: a fake gateway on a MemoryUDPReactor, a fake HTTP
function for UPnP's description and SOAP calls, time from the reactor's
clock.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.portmap import natpmp, pcp, upnp
from natbypass.portmap.client import NatPmpClient, PcpClient, doubling_times
from natbypass.portmap.errors import DecodeError, MappingError
from natbypass.portmap.interfaces import IPortMappingClient, PortMapping
from natbypass.portmap.mapper import PortMapper
from natbypass.portmap.testing import EXT, FakeGateway
from natbypass.testing.udp import MemoryUDPReactor

GW, ME = "10.1.0.1", "10.1.0.2"


def network(**gateway: Any) -> tuple[MemoryUDPReactor, FakeGateway]:
    reactor = MemoryUDPReactor(latency=0.001)
    gw = FakeGateway(**gateway)
    reactor.listenUDP(5351, gw, interface=GW)
    return reactor, gw


def step(reactor: MemoryUDPReactor, seconds: float) -> None:
    """Advance in 1 ms steps, so datagrams sent on the way are delivered (the network's latency is 1 ms)."""
    reactor.pump([0.001] * round(seconds * 1000))


def result_of(d: defer.Deferred) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


class ScheduleTests(SynchronousTestCase):
    def test_doubling(self) -> None:
        self.assertEqual(doubling_times(0.25, 2.0), [0.0, 0.25, 0.75, 1.75])
        self.assertEqual(doubling_times(3.0, 2.0), [0.0])
        self.assertEqual(doubling_times(0.25, 100, limit=9)[-1], 0.25 * (2**8 - 1))

    @given(st.floats(0.01, 5), st.floats(0.01, 60))
    def test_bounded(self, first: float, budget: float) -> None:
        times = doubling_times(first, budget, jitter=lambda: 1.1)
        self.assertEqual(times[0], 0.0)
        self.assertTrue(all(t < budget for t in times))
        self.assertEqual(times, sorted(times))


class NatPmpClientTests(SynchronousTestCase):
    def test_interface(self) -> None:
        reactor, _ = network()
        verifyObject(IPortMappingClient, NatPmpClient(reactor, GW, local_host=ME))
        verifyObject(IPortMappingClient, PcpClient(reactor, GW, local_host=ME))
        verifyObject(IPortMappingClient, upnp.UpnpClient(reactor, GW, local_host=ME, http=lambda *a: None))

    def test_map_and_unmap(self) -> None:
        reactor, gw = network()
        client = NatPmpClient(reactor, GW, local_host=ME)
        out = result_of(client.map("udp", 4000, 7200))
        step(reactor, 0.01)
        self.assertEqual(out, [PortMapping("natpmp", "udp", 4000, (EXT, 40000), 3600, out[0].granted_at)])
        self.assertEqual(gw.requests[1], natpmp.MapRequest("udp", 4000, 4000, 7200))
        done = result_of(client.unmap(out[0]))
        step(reactor, 0.01)
        self.assertEqual(done, [None])
        self.assertEqual(gw.requests[-1], natpmp.MapRequest("udp", 4000, 0, 0))
        self.assertEqual(reactor.network.ports.keys(), {(GW, 5351)})  # every transaction closed its port

    def test_silent_gateway_costs_the_budget(self) -> None:
        reactor, gw = network(natpmp_on=False)
        out = result_of(NatPmpClient(reactor, GW, local_host=ME, budget=2.0).map("udp", 4000, 60))
        step(reactor, 1.99)
        self.assertEqual(out, [])
        self.assertEqual(len(gw.requests), 4)  # sends at 0, 0.25, 0.75, 1.75 (RFC 6886 3.1)
        step(reactor, 0.02)
        self.assertIsInstance(out[0].value, MappingError)
        self.assertIn("no answer", str(out[0].value))
        self.assertEqual(reactor.network.ports.keys(), {(GW, 5351)})

    def test_cancel_closes_the_port(self) -> None:
        reactor, _ = network(natpmp_on=False)
        d = NatPmpClient(reactor, GW, local_host=ME).map("udp", 4000, 60)
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        d.cancel()
        self.assertEqual(reactor.network.ports.keys(), {(GW, 5351)})
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_refusal(self) -> None:
        reactor, _ = network()
        gw_port = reactor.udp[(GW, 5351)]

        def refuse(data: bytes, addr: Any) -> None:
            gw_port.write(bytes.fromhex("00 80 0002 00000001 00000000"), addr)

        gw_port.protocol.datagramReceived = refuse
        out = result_of(NatPmpClient(reactor, GW, local_host=ME).map("tcp", 4000, 60))
        step(reactor, 0.01)
        self.assertEqual((out[0].value.method, out[0].value.code), ("natpmp", natpmp.Result.NOT_AUTHORIZED))

    def test_responses_from_elsewhere_are_ignored(self) -> None:
        reactor, _ = network(natpmp_on=False)
        out = result_of(NatPmpClient(reactor, GW, local_host=ME, budget=1).externalAddress())
        step(reactor, 0.001)
        (port,) = [p for a, p in reactor.network.ports.items() if a[0] == ME]
        reactor.network.send(("10.9.9.9", 5351), port.address, natpmp.ExternalAddressResponse(0, 1, EXT).encode())
        reactor.network.send((GW, 5351), port.address, b"garbage")
        step(reactor, 0.01)
        self.assertEqual(out, [])
        reactor.network.send((GW, 5351), port.address, natpmp.ExternalAddressResponse(0, 1, EXT).encode())
        step(reactor, 0.01)
        self.assertEqual(out, [EXT])


class PcpClientTests(SynchronousTestCase):
    def test_map_renew_unmap_keep_the_nonce(self) -> None:
        reactor, gw = network()
        client = PcpClient(reactor, GW, local_host=ME, rand=lambda: 0.5)
        out = result_of(client.map("tcp", 4000, 7200))
        step(reactor, 0.01)
        first = out[0]
        self.assertEqual((first.method, first.external, first.lifetime), ("pcp", (EXT, 4000), 3600))
        nonce = gw.requests[0].nonce
        self.assertEqual(first.state, (nonce,))
        again = result_of(client.map("tcp", 4000, 7200, previous=first))
        step(reactor, 0.01)
        self.assertEqual(gw.requests[1].nonce, nonce)
        self.assertEqual((gw.requests[1].external_port, gw.requests[1].external_address), (4000, EXT))
        self.assertEqual(again[0].external, (EXT, 4000))
        result_of(client.unmap(first))
        step(reactor, 0.01)
        self.assertEqual((gw.requests[2].nonce, gw.requests[2].lifetime), (nonce, 0))

    def test_rfc_schedule(self) -> None:
        reactor, gw = network(pcp_on=False)
        out = result_of(PcpClient(reactor, GW, local_host=ME, budget=10, rand=lambda: 0.5).map("udp", 1, 60))
        step(reactor, 9.99)
        # IRT 3 s then doubling (RFC 6887 8.1.1; jitter 0 here): 0, 3, 9.
        self.assertEqual([round(t) for t, src, dst, _ in reactor.network.sent if dst == (GW, 5351)], [0, 3, 9])
        step(reactor, 0.02)
        self.assertIsInstance(out[0].value, MappingError)
        self.assertEqual(len(gw.requests), 3)

    def test_refusal(self) -> None:
        reactor, _ = network(pcp_result=pcp.Result.NO_RESOURCES)
        out = result_of(PcpClient(reactor, GW, local_host=ME).map("udp", 1, 60))
        step(reactor, 0.01)
        self.assertEqual(out[0].value.code, pcp.Result.NO_RESOURCES)
        self.assertIn("no-resources", str(out[0].value))

    def test_client_address_is_the_bound_one(self) -> None:
        # Bound to the wildcard, the port sends from 127.0.0.1 but claims "": the gateway says ADDRESS_MISMATCH,
        # which is why the client binds to the address it names (route_source_address by default).
        reactor, gw = network()
        out = result_of(PcpClient(reactor, GW, local_host="0.0.0.0").map("udp", 1, 60))
        step(reactor, 0.01)
        self.assertEqual(out[0].value.code, pcp.Result.ADDRESS_MISMATCH)

    def test_natpmp_only_gateway(self) -> None:
        reactor, _ = network()
        gw_port = reactor.udp[(GW, 5351)]
        gw_port.protocol.datagramReceived = lambda data, addr: gw_port.write(bytes.fromhex("00 81 0001 00000005"), addr)
        out = result_of(PcpClient(reactor, GW, local_host=ME).map("udp", 1, 60))
        step(reactor, 0.01)
        self.assertIn("version 0 only", str(out[0].value))


DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceList><device><serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList></device></deviceList>
</device></root>"""


def soap_answer(action: str, **out: str) -> bytes:
    args = "".join(f"<{k}>{v}</{k}>" for k, v in out.items())
    return (
        f'<s:Envelope xmlns:s="{upnp.SOAP_ENV}"><s:Body><u:{action}Response xmlns:u="x">{args}'
        f"</u:{action}Response></s:Body></s:Envelope>"
    ).encode()


def soap_fault(code: int, text: str) -> bytes:
    return (
        f'<s:Envelope xmlns:s="{upnp.SOAP_ENV}"><s:Body><s:Fault><detail>'
        f'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}</errorCode>'
        f"<errorDescription>{text}</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


class FakeIGD:
    """The HTTP side of a UPnP gateway; its SSDP side answers on the memory network."""

    def __init__(self, reactor: MemoryUDPReactor, conflicts: int = 0) -> None:
        self.calls: list[tuple[bytes, str, dict, bytes]] = []
        self.conflicts = conflicts
        ssdp = DatagramProtocol()
        location = f"http://{GW}:5000/rootDesc.xml"
        answer = f"HTTP/1.1 200 OK\r\nST: {upnp.IGD}\r\nLOCATION: {location}\r\n\r\n".encode()
        ssdp.datagramReceived = lambda data, addr: reactor.udp[(GW, 1900)].write(answer, addr)
        reactor.listenUDP(1900, ssdp, interface=GW)

    def __call__(self, method: bytes, url: str, headers: dict, body: bytes) -> defer.Deferred:
        self.calls.append((method, url, dict(headers), body))
        if method == b"GET":
            return defer.succeed((200, DESCRIPTION))
        action = headers["SOAPAction"].strip('"').split("#")[1]
        if action == "AddPortMapping" and self.conflicts:
            self.conflicts -= 1
            return defer.succeed((500, soap_fault(718, "ConflictInMappingEntry")))
        if action == "GetExternalIPAddress":
            return defer.succeed((200, soap_answer(action, NewExternalIPAddress=EXT)))
        return defer.succeed((200, soap_answer(action)))


class UpnpClientTests(SynchronousTestCase):
    def test_discover_map_unmap(self) -> None:
        reactor = MemoryUDPReactor(latency=0.001)
        igd = FakeIGD(reactor)
        client = upnp.UpnpClient(reactor, GW, local_host=ME, http=igd)
        out = result_of(client.map("udp", 4000, 600))
        step(reactor, 0.01)
        self.assertEqual(out[0], PortMapping("upnp", "udp", 4000, (EXT, 4000), 600, out[0].granted_at))
        self.assertEqual(igd.calls[0][:2], (b"GET", f"http://{GW}:5000/rootDesc.xml"))
        method, url, headers, body = igd.calls[1]
        self.assertEqual((method, url), (b"POST", f"http://{GW}:5000/ctl/IPConn"))
        self.assertEqual(headers["SOAPAction"], '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"')
        self.assertIn(f"<NewInternalClient>{ME}</NewInternalClient>".encode(), body)
        self.assertIn(b"<NewLeaseDuration>600</NewLeaseDuration>", body)
        result_of(client.unmap(out[0]))
        self.assertIn(b"<u:DeletePortMapping", igd.calls[-1][3])
        self.assertEqual(sum(1 for c in igd.calls if c[0] == b"GET"), 1)  # discovered once

    def test_conflict_tries_another_port(self) -> None:
        reactor = MemoryUDPReactor(latency=0.001)
        client = upnp.UpnpClient(
            reactor, GW, local_host=ME, http=FakeIGD(reactor, conflicts=1), rand=lambda a, b: 33333
        )
        out = result_of(client.map("tcp", 4000, 600))
        step(reactor, 0.01)
        self.assertEqual(out[0].external, (EXT, 33333))

    def test_no_ssdp_answer(self) -> None:
        reactor = MemoryUDPReactor(latency=0.001)
        out = result_of(upnp.UpnpClient(reactor, GW, local_host=ME, http=lambda *a: None, budget=3).map("tcp", 1, 60))
        step(reactor, 3.01)
        self.assertIn("no answer", str(out[0].value))

    def test_stalled_http_is_bounded(self) -> None:
        reactor = MemoryUDPReactor(latency=0.001)
        igd = FakeIGD(reactor)
        client = upnp.UpnpClient(reactor, GW, local_host=ME, http=lambda *a: defer.Deferred(), budget=2)
        out = result_of(client.map("tcp", 1, 60))
        step(reactor, 2.1)
        self.assertIn("device description: no answer", str(out[0].value))
        self.assertFalse(igd.calls)


class UpnpParserTests(SynchronousTestCase):
    def test_search_response(self) -> None:
        h = upnp.parse_search_response(b"HTTP/1.1 200 OK\r\nLocation: http://10.0.0.1:5000/d.xml\r\nST: x\r\n\r\n")
        self.assertEqual(h["location"], "http://10.0.0.1:5000/d.xml")
        for bad in (b"", b"HTTP/1.1 404 No\r\n\r\n", b"HTTP/1.1 200 OK\r\nLOCATION: file:///etc/passwd\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n", b"\xff\xfe"):  # fmt: skip
            self.assertRaises(DecodeError, upnp.parse_search_response, bad)

    def test_description(self) -> None:
        self.assertEqual(
            upnp.parse_description(DESCRIPTION, "http://10.1.0.1:5000/rootDesc.xml"),
            ("urn:schemas-upnp-org:service:WANIPConnection:1", "http://10.1.0.1:5000/ctl/IPConn"),
        )
        with_base = DESCRIPTION.replace(b"<device>", b"<URLBase>http://10.1.0.1:6000/</URLBase><device>", 1)
        self.assertEqual(upnp.parse_description(with_base, "http://x/")[1], "http://10.1.0.1:6000/ctl/IPConn")
        self.assertRaises(DecodeError, upnp.parse_description, b"<root/>", "http://x/")
        self.assertRaises(DecodeError, upnp.parse_description, b"<root", "http://x/")

    def test_soap(self) -> None:
        headers, body = upnp.soap_request("urn:s", "AddPortMapping", [("NewPortMappingDescription", "a<b&c")])
        self.assertIn(b"a&lt;b&amp;c", body)
        self.assertEqual(headers["SOAPAction"], '"urn:s#AddPortMapping"')
        self.assertEqual(upnp.parse_soap_response(200, soap_answer("X", A="1"), "X"), {"A": "1"})
        with self.assertRaises(MappingError) as e:
            upnp.parse_soap_response(500, soap_fault(718, "ConflictInMappingEntry"), "X")
        self.assertEqual(e.exception.code, 718)
        self.assertRaises(DecodeError, upnp.parse_soap_response, 200, b"<a/>", "X")
        self.assertRaises(DecodeError, upnp.parse_soap_response, 200, b"not xml", "X")

    @given(st.binary(max_size=200))
    def test_ssdp_anything(self, data: bytes) -> None:
        try:
            upnp.parse_search_response(data)
        except DecodeError:
            pass

    @given(st.text(max_size=200))
    def test_description_and_soap_anything(self, text: str) -> None:
        for parse in (lambda: upnp.parse_description(text.encode(), "http://x/"),
                      lambda: upnp.parse_soap_response(200, text.encode(), "X")):  # fmt: skip
            try:
                parse()
            except (DecodeError, MappingError):
                pass

    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=50))
    def test_soap_arguments_round_trip(self, value: str) -> None:
        _, body = upnp.soap_request("urn:s", "X", [("A", value)])
        body = body.replace(b"<u:X ", b"<u:XResponse ").replace(b"</u:X>", b"</u:XResponse>")
        self.assertEqual(upnp.parse_soap_response(200, body, "X"), {"A": value.strip()})


class FakeClient:
    """An IPortMappingClient that answers from a script."""

    def __init__(self, method: str, clock: Any, results: list[Any]) -> None:
        self.method, self.clock, self.results = method, clock, results
        self.calls: list[tuple] = []
        self.unmapped: list[PortMapping] = []

    def map(self, protocol: str, internal_port: int, lifetime: int, previous: PortMapping | None = None):
        self.calls.append((protocol, internal_port, lifetime, previous))
        r = self.results.pop(0) if self.results else MappingError(self.method, "no")
        if isinstance(r, Exception):
            return defer.fail(r)
        if r is None:
            return defer.Deferred()
        return defer.succeed(PortMapping(self.method, protocol, internal_port, r, 100, self.clock.seconds()))

    def unmap(self, mapping: PortMapping):
        self.unmapped.append(mapping)
        return defer.succeed(None)


class PortMapperTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()

    def mapper(self, *clients: FakeClient) -> PortMapper:
        m = PortMapper(self.clock, "10.1.0.1", clients=clients)
        m.startService()
        return m

    def test_order_and_fallback(self) -> None:
        a = FakeClient("pcp", self.clock, [MappingError("pcp", "no answer")])
        b = FakeClient("natpmp", self.clock, [(EXT, 5000)])
        c = FakeClient("upnp", self.clock, [(EXT, 6000)])
        out = result_of(self.mapper(a, b, c).map("udp", 4000))
        self.assertEqual((out[0].method, out[0].external), ("natpmp", (EXT, 5000)))
        self.assertEqual(c.calls, [])

    def test_all_fail(self) -> None:
        out = result_of(
            self.mapper(FakeClient("pcp", self.clock, []), FakeClient("upnp", self.clock, [])).map("tcp", 1)
        )
        self.assertIsInstance(out[0].value, MappingError)
        self.assertIn("pcp: no; upnp: no", str(out[0].value))

    def test_renews_at_half_life_and_reports_changes(self) -> None:
        a = FakeClient("pcp", self.clock, [(EXT, 5000), (EXT, 5000), (EXT, 5001)])
        m = self.mapper(a)
        seen: list[Any] = []
        m.changed.append(lambda p, mp: seen.append((p, mp and mp.external)))
        first = result_of(m.map("udp", 4000))[0]
        self.clock.advance(49.9)
        self.assertEqual(len(a.calls), 1)
        self.clock.advance(0.2)
        self.assertEqual(a.calls[1][3], first)  # renewed with the mapping it renews
        self.assertEqual(seen, [])
        self.clock.advance(50)
        self.assertEqual(seen, [("udp", (EXT, 5001))])
        self.assertEqual(m.mappings[("udp", 4000)].external, (EXT, 5001))

    def test_failed_renewal_retries_then_gives_up(self) -> None:
        a = FakeClient("pcp", self.clock, [(EXT, 5000)])  # then every renewal fails
        m = self.mapper(a)
        seen: list[Any] = []
        m.changed.append(lambda p, mp: seen.append((p, mp)))
        result_of(m.map("udp", 4000))
        self.clock.advance(50)  # renewal fails with 50 s left: retry at 75, 87.5, ...
        self.clock.advance(25)
        self.assertEqual(len(a.calls), 3)
        self.clock.pump([1] * 30)
        self.assertEqual(seen, [("udp", None)])
        self.assertEqual(m.mappings, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_deletes_and_stops_renewing(self) -> None:
        a = FakeClient("pcp", self.clock, [(EXT, 5000), (EXT, 5002)])
        m = self.mapper(a)
        result_of(m.map("udp", 4000))
        result_of(m.map("tcp", 4000))
        stopped = result_of(m.stopService())
        self.assertEqual(stopped, [None])
        self.assertEqual(sorted(x.protocol for x in a.unmapped), ["tcp", "udp"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_a_pending_map(self) -> None:
        a = FakeClient("pcp", self.clock, [None])
        m = self.mapper(a)
        out = result_of(m.map("udp", 4000))
        result_of(m.stopService())
        self.assertTrue(out[0].check(defer.CancelledError))

    def test_no_gateway(self) -> None:
        m = PortMapper(self.clock, find_gateway=lambda: None)
        out = result_of(m.map("udp", 1))
        self.assertIn("no IPv4 default gateway", str(out[0].value))

    def test_probe_reports_each_protocol(self) -> None:
        a = FakeClient("pcp", self.clock, [(EXT, 5000)])
        b = FakeClient("natpmp", self.clock, [MappingError("natpmp", "refused")])
        result = result_of(defer.ensureDeferred(self.mapper(a, b).probe("udp", 4000)))[0]
        self.assertEqual(result["pcp"].external, (EXT, 5000))
        self.assertEqual(result["natpmp"], "refused")
        self.assertEqual(len(a.unmapped), 1)

    def test_default_clients_against_the_fake_gateway(self) -> None:
        reactor, gw = network(pcp_on=False)
        m = PortMapper(reactor, GW, local_host=ME)
        verifyObject(IPortMappingClient, m.clients()[2])
        out = result_of(m.map("udp", 4000))
        step(reactor, 1.6)  # PCP's budget (1.5 s) spent, then NAT-PMP answers
        self.assertEqual((out[0].method, out[0].external), ("natpmp", (EXT, 40000)))
        # PCP sent at 0, 0.5 and (jitter permitting, +/-10%) at 1.5 s, within its 1.5 s budget.
        self.assertIn(sum(isinstance(r, pcp.MapRequest) for r in gw.requests), (2, 3))

"""The test doubles of natbypass.testing provide what they declare and behave as documented."""

from __future__ import annotations

import errno

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
    ISystemHandle,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.punch.candidates import CandidateError, PortRange
from natbypass.testing.udp import MemoryNAT, MemoryUDPReactor


class Recorder(DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str, int]]] = []

    def datagramReceived(self, data: bytes, addr) -> None:
        self.got.append((data, addr))


class MemoryUDPReactorTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        reactor = MemoryUDPReactor()
        for interface in (IReactorUDP, IReactorTime, IReactorTCP):
            self.assertTrue(verifyObject(interface, reactor))
        port = reactor.listenUDP(0, DatagramProtocol())
        self.assertTrue(verifyObject(IUDPTransport, port))
        self.assertTrue(verifyObject(IListeningPort, port))
        self.assertFalse(ISystemHandle.providedBy(port))
        handled = MemoryUDPReactor(handles=True).listenUDP(0, DatagramProtocol())
        self.assertTrue(verifyObject(ISystemHandle, handled))
        self.assertTrue(verifyObject(IListeningPort, reactor.listenTCP(0, None)))

    def test_delivery_after_latency(self) -> None:
        reactor = MemoryUDPReactor(latency=0.1)
        a, b = Recorder(), Recorder()
        pa = reactor.listenUDP(1000, a, interface="10.0.0.1")
        reactor.listenUDP(2000, b, interface="10.0.0.2")
        pa.write(b"hi", ("10.0.0.2", 2000))
        reactor.advance(0.05)
        self.assertEqual(b.got, [])
        reactor.advance(0.05)
        self.assertEqual(b.got, [(b"hi", ("10.0.0.1", 1000))])
        self.assertEqual(pa.written, [(b"hi", ("10.0.0.2", 2000))])

    def test_wildcard_port(self) -> None:
        reactor = MemoryUDPReactor()
        a, b = Recorder(), Recorder()
        pa = reactor.listenUDP(1000, a)
        reactor.listenUDP(2000, b, interface="0.0.0.0")
        pa.write(b"x", ("192.0.2.9", 2000))
        reactor.advance(0)
        self.assertEqual(b.got, [(b"x", ("127.0.0.1", 1000))])

    def test_ports_are_booked(self) -> None:
        reactor = MemoryUDPReactor()
        port = reactor.listenUDP(0, DatagramProtocol(), interface="10.0.0.1")
        number = port.getHost().port
        e = self.assertRaises(CannotListenError, reactor.listenUDP, number, DatagramProtocol(), interface="10.0.0.1")
        self.assertEqual(e.socketError.errno, errno.EADDRINUSE)
        port.stopListening()
        self.assertEqual(reactor.open_udp_ports(), [])
        reactor.listenUDP(number, DatagramProtocol(), interface="10.0.0.1")

    def test_reserve_tcp_port(self) -> None:
        reactor = MemoryUDPReactor()
        held = reactor.reserve_tcp_port(PortRange(5000, 5001), "10.0.0.1")
        self.assertEqual(held.getsockname(), ("10.0.0.1", 5000))
        self.assertEqual(reactor.reserve_tcp_port(PortRange(5000, 5001), "10.0.0.1").getsockname()[1], 5001)
        self.assertRaises(CandidateError, reactor.reserve_tcp_port, PortRange(5000, 5001), "10.0.0.1")
        held.close()
        self.assertEqual(reactor.open_tcp_sockets(), [("10.0.0.1", 5001)])


class MemoryNATTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryUDPReactor()
        self.inside, self.server, self.other = Recorder(), Recorder(), Recorder()
        self.port = self.reactor.listenUDP(4000, self.inside, interface="10.0.0.2")
        self.reactor.listenUDP(3478, self.server, interface="192.0.2.1")
        self.reactor.listenUDP(3478, self.other, interface="192.0.2.2")

    def nat(self, mapping: str, filtering: str, **kw) -> MemoryNAT:
        nat = MemoryNAT(["10.0.0.2"], "198.51.100.7", mapping, filtering, **kw)
        self.reactor.network.nats.append(nat)
        return nat

    def test_symmetric_nat_hands_out_ports_in_sequence(self) -> None:
        self.nat("address-and-port-dependent", "address-and-port-dependent", first_port=61000, port_step=2)
        self.port.write(b"1", ("192.0.2.1", 3478))
        self.port.write(b"2", ("192.0.2.2", 3478))
        self.reactor.advance(0)
        self.assertEqual(self.server.got, [(b"1", ("198.51.100.7", 61000))])
        self.assertEqual(self.other.got, [(b"2", ("198.51.100.7", 61002))])

    def test_filtering(self) -> None:
        self.nat("endpoint-independent", "address-dependent", port_preserving=True)
        self.port.write(b"out", ("192.0.2.1", 3478))
        self.reactor.advance(0)
        self.assertEqual(self.server.got, [(b"out", ("198.51.100.7", 4000))])
        self.reactor.network.send(("192.0.2.1", 9), ("198.51.100.7", 4000), b"same address")
        self.reactor.network.send(("192.0.2.2", 3478), ("198.51.100.7", 4000), b"other address")
        self.reactor.advance(0)
        self.assertEqual(self.inside.got, [(b"same address", ("192.0.2.1", 9))])

"""
An in-memory UDP network for tests of the punch engines and what embeds them.

Twisted's ``MemoryReactor`` has no ``listenUDP``; this is the small fake that
``twisted/names/test/test_util.py`` suggests: transports that deliver
datagrams to each other through a ``Clock`` with a fixed one-way latency and
an optional drop rule, so timing tests are exact and need no sockets.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol

Address = tuple[str, int]
DropRule = Callable[[Address, Address, bytes], bool]


class FakeDatagramTransport:
    """The transport a protocol gets from :meth:`FakeUDPNetwork.listen`."""

    def __init__(self, network: FakeUDPNetwork, address: Address, protocol: DatagramProtocol):
        self._network = network
        self.address = address
        self.protocol = protocol
        self.written: list[tuple[bytes, Address]] = []

    def write(self, data: bytes, addr: Address) -> None:
        self.written.append((data, addr))
        self._network.send(self.address, addr, data)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self.address)

    def stopListening(self) -> None:
        self._network.close(self.address)


class FakeUDPNetwork:
    """Hosts addressed by ``(host, port)``; ``latency`` seconds one way."""

    def __init__(self, clock: IReactorTime, latency: float = 0.0, drop: DropRule | None = None):
        self.clock = clock
        self.latency = latency
        self.drop = drop
        self._ports: dict[Address, FakeDatagramTransport] = {}
        self.delivered = 0

    def listen(self, address: Address, protocol: DatagramProtocol) -> FakeDatagramTransport:
        if address in self._ports:
            raise OSError(98, f"address in use: {address}")
        transport = FakeDatagramTransport(self, address, protocol)
        self._ports[address] = transport
        protocol.makeConnection(transport)
        return transport

    def close(self, address: Address) -> None:
        transport = self._ports.pop(address, None)
        if transport is not None:
            transport.protocol.doStop()

    def send(self, source: Address, dest: Address, data: bytes) -> None:
        """Carry one datagram (also used by tests to spoof a source)."""
        if self.drop is not None and self.drop(source, dest, data):
            return
        self.clock.callLater(self.latency, self._deliver, source, dest, data)

    def _deliver(self, source: Address, dest: Address, data: bytes) -> None:
        transport = self._ports.get(dest)
        if transport is not None:
            self.delivered += 1
            transport.protocol.datagramReceived(data, source)

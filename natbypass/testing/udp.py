"""
In-memory UDP for tests: the one set of datagram doubles that the STUN,
punch, discovery and peer tests share, on the model of
C{twisted.internet.testing.MemoryReactor} (whose stock version has no
C{listenUDP}; C{twisted/names/test/test_util.py} shows the idea).

- L{MemoryUDPNetwork} carries datagrams between ports addressed by
  C{(host, port)} through a clock, with a fixed one-way latency, an optional
  drop rule and optional L{MemoryNAT} boxes on the way; it logs every
  datagram in C{sent}.
- L{MemoryUDPPort} is what a protocol's C{transport} is: it records
  C{written}, raises C{fail} when set, and frees its address when closed.
- L{MemoryUDPReactor} is C{MemoryReactorClock} plus C{IReactorUDP}
  over its own network (it is the clock too): port 0 picks a free port, a
  busy one raises C{CannotListenError}; C{listenTCP} keeps the same books,
  and L{MemoryUDPReactor.reserve_tcp_port} stands in for
  C{natbypass.punch.candidates.reserve_tcp_port}.

Nothing here touches a socket; time moves only when the test advances it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IReactorUDP,
    ISystemHandle,
    IUDPTransport,
)
from twisted.internet.protocol import AbstractDatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from natbypass.punch.candidates import CandidateError, PortRange

Address = tuple[str, int]
DropRule = Callable[[Address, Address, bytes], bool]

#: RFC 4787 behaviours a MemoryNAT can have (the words discovery reports).
ENDPOINT_INDEPENDENT = "endpoint-independent"
ADDRESS_DEPENDENT = "address-dependent"
ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
WILDCARDS = ("", "0.0.0.0", "::")


def _address(kind: str, host: str, port: int) -> IPv4Address | IPv6Address:
    return IPv6Address(kind, host, port) if ":" in host else IPv4Address(kind, host, port)


class MemorySocket:
    """The C{getHandle()} of a port of C{MemoryUDPReactor(handles=True)}: C{sendto} as a socket's."""

    def __init__(self, port: MemoryUDPPort) -> None:
        self._port = port
        self.sent: list[tuple[bytes, Address]] = []
        self.fail: Exception | None = None

    def sendto(self, data: bytes, addr: Address) -> int:
        if self.fail is not None:
            raise self.fail
        self.sent.append((data, addr))
        self._port.network.send(self._port.source, tuple(addr), data)
        return len(data)


@implementer(IUDPTransport, IListeningPort)
class MemoryUDPPort:
    """A bound UDP port on a L{MemoryUDPNetwork}; the transport of its protocol."""

    def __init__(self, network: MemoryUDPNetwork, address: Address, protocol: AbstractDatagramProtocol) -> None:
        self.network = network
        self.address = address
        self.host, self.port = address
        self.protocol = protocol
        self.written: list[tuple[bytes, Address]] = []
        #: Set to make C{write} raise it (a full socket buffer, a firewall's EPERM).
        self.fail: Exception | None = None
        self.listening = True
        self._broadcast = False
        self._connected: Address | None = None
        #: The socket of a port that also provides C{ISystemHandle}.
        self.handle: MemorySocket | None = None
        #: Called once the port is closed (the reactor frees the number).
        self.closed: list[Callable[[], None]] = []

    @property
    def source(self) -> Address:
        """Where datagrams from this port come from (a wildcard port sends from the network's default host)."""
        host = self.network.default_host if self.host in WILDCARDS else self.host
        return (host, self.port)

    def write(self, data: bytes, addr: Address | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        if addr is None:
            assert self._connected is not None, "write without an address on an unconnected port"
            addr = self._connected
        # An IPv6 socket also takes (host, port, flowinfo, scope_id), as the QUIC engine sends to.
        addr = tuple(addr)[:2]  # type: ignore[assignment]
        self.written.append((data, addr))  # type: ignore[arg-type]
        self.network.send(self.source, addr, data)  # type: ignore[arg-type]

    def connect(self, host: str, port: int) -> None:
        self._connected = (host, port)

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address("UDP", self.host, self.port)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            self.network.close(self.address)

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self._broadcast = enabled

    def getBroadcastAllowed(self) -> bool:
        return self._broadcast

    def getHandle(self) -> MemorySocket:
        assert self.handle is not None, "this port offers no system handle"
        return self.handle


class MemoryNAT:
    """
    A NAT (or, with C{translate=False}, a firewall that only filters) in
    front of the C{inside} hosts, with RFC 4787 C{mapping} and
    C{filtering} behaviour.  New mappings take ports C{first_port},
    C{first_port + port_step}, ... (a NAT that hands out ports in sequence);
    with C{port_preserving} the first mapping of an inside port keeps it.
    C{blocked} drops everything both ways.  C{mappings} maps
    C{(inside address, key)} to the public address, in creation order.
    """

    def __init__(
        self,
        inside: Iterable[str],
        public_ip: str,
        mapping: str = ENDPOINT_INDEPENDENT,
        filtering: str = ENDPOINT_INDEPENDENT,
        *,
        translate: bool = True,
        port_preserving: bool = False,
        first_port: int = 61000,
        port_step: int = 1,
        blocked: bool = False,
    ) -> None:
        self.inside = set(inside)
        self.public_ip = public_ip
        self.mapping = mapping
        self.filtering = filtering
        self.translate = translate
        self.port_preserving = port_preserving
        self.blocked = blocked
        self._next_port = first_port
        self._port_step = port_step
        self.mappings: dict[tuple[Address, Any], Address] = {}
        self._inside_of: dict[Address, Address] = {}
        self.permissions: set[tuple[Address, Any]] = set()

    def _key(self, dest: Address) -> Any:
        return {ENDPOINT_INDEPENDENT: (), ADDRESS_DEPENDENT: (dest[0],), ADDRESS_AND_PORT_DEPENDENT: dest}[self.mapping]

    def _public_for(self, source: Address, dest: Address) -> Address:
        if not self.translate:
            return source
        key = (source, self._key(dest))
        if key not in self.mappings:
            public = (self.public_ip, source[1])
            if not (self.port_preserving and public not in self._inside_of):
                public = (self.public_ip, self._next_port)
                self._next_port += self._port_step
            self.mappings[key] = public
            self._inside_of[public] = source
        return self.mappings[key]

    def flush(self, first_port: int | None = None) -> None:
        """
        Forget every mapping and permission (a conntrack flush, a reboot):
        the next outbound datagram gets a new mapping, from C{first_port}
        on when given, and never the port it had (no port preservation).
        """
        self.mappings.clear()
        self._inside_of.clear()
        self.permissions.clear()
        self.port_preserving = False
        if first_port is not None:
            self._next_port = first_port

    def outbound(self, source: Address, dest: Address) -> Address | None:
        """The source a datagram from C{source} to C{dest} leaves with (None: dropped); opens the filter."""
        if source[0] not in self.inside:
            return source
        if self.blocked:
            return None
        public = self._public_for(source, dest)
        self.permissions |= {(public, "any"), (public, dest[0]), (public, dest)}
        return public

    def owns(self, dest: Address) -> bool:
        return dest[0] == self.public_ip if self.translate else dest[0] in self.inside

    def inbound(self, source: Address, dest: Address) -> Address | None:
        """The inside address a datagram from C{source} to public C{dest} goes to (None: filtered)."""
        if self.blocked:
            return None
        inside = self._inside_of.get(dest) if self.translate else dest
        key = {ADDRESS_DEPENDENT: source[0], ADDRESS_AND_PORT_DEPENDENT: source}.get(self.filtering, "any")
        if inside is None or (dest, key) not in self.permissions:
            return None
        return inside


class MemoryUDPNetwork:
    """
    UDP ports addressed by C{(host, port)}; C{latency} seconds one way
    through C{clock}.  C{drop(source, dest, data)} returning True loses a
    datagram; C{nats} translate and filter on the way.  A port bound to a
    wildcard host receives what is sent to its port on any host no other
    port holds, and sends from C{default_host}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        latency: float = 0.0,
        drop: DropRule | None = None,
        default_host: str = "127.0.0.1",
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.drop = drop
        self.default_host = default_host
        self.nats: list[MemoryNAT] = []
        self.ports: dict[Address, MemoryUDPPort] = {}
        #: Every datagram handed to the network: (time, source, dest, data), before NAT and drop rule.
        self.sent: list[tuple[float, Address, Address, bytes]] = []
        self.delivered = 0

    def listen(self, address: Address, protocol: AbstractDatagramProtocol, handle: bool = False) -> MemoryUDPPort:
        """
        Bind C{protocol} to C{address} (OSError EADDRINUSE when it is
        taken); with C{handle} the port also provides C{ISystemHandle}.
        """
        address = (address[0], address[1])
        if address in self.ports:
            raise OSError(errno.EADDRINUSE, f"address in use: {address}")
        port = MemoryUDPPort(self, address, protocol)
        if handle:
            port.handle = MemorySocket(port)
            alsoProvides(port, ISystemHandle)
        self.ports[address] = port
        protocol.makeConnection(port)
        return port

    def close(self, address: Address) -> None:
        port = self.ports.pop(address, None)
        if port is not None:
            port.listening = False
            for callback in port.closed:
                callback()
            port.protocol.doStop()

    def send(self, source: Address, dest: Address, data: bytes) -> None:
        """Carry one datagram (tests also call it to spoof a source)."""
        self.sent.append((self.clock.seconds(), source, dest, data))
        if self.drop is not None and self.drop(source, dest, data):
            return
        for nat in self.nats:
            translated = nat.outbound(source, dest)
            if translated is None:
                return
            source = translated
        self.clock.callLater(self.latency, self._deliver, source, dest, data)

    def _deliver(self, source: Address, dest: Address, data: bytes) -> None:
        for nat in self.nats:
            if nat.owns(dest):
                inside = nat.inbound(source, dest)
                if inside is None:
                    return
                dest = inside
        port = self.ports.get(dest)
        if port is None:
            port = next((p for (h, n), p in self.ports.items() if n == dest[1] and h in WILDCARDS), None)
        if port is not None:
            self.delivered += 1
            port.protocol.datagramReceived(data, source)


class MemoryTCPSocket:
    """What L{MemoryUDPReactor.reserve_tcp_port} returns: a held TCP port number, no socket."""

    def __init__(self, reactor: MemoryUDPReactor, host: str, port: int, listening: bool) -> None:
        self.reactor = reactor
        self.address = (host, port)
        self.listening = listening
        self.closed = False

    def getsockname(self) -> Address:
        return self.address

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.reactor.taken.discard(("tcp", *self.address))


@implementer(IListeningPort)
class MemoryTCPPort:
    """A listening TCP port of L{MemoryUDPReactor} (the factory is in C{tcpServers})."""

    def __init__(self, reactor: MemoryUDPReactor, host: str, port: int, factory: Any) -> None:
        self.reactor, self.host, self.port, self.factory = reactor, host, port, factory
        self.listening = True

    def getHost(self) -> IPv4Address | IPv6Address:
        return _address("TCP", self.host, self.port)

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        if self.listening:
            self.listening = False
            self.reactor.taken.discard(("tcp", self.host, self.port))


@implementer(IReactorUDP)
class MemoryUDPReactor(MemoryReactorClock):
    """
    C{MemoryReactorClock} (IReactorTime, IReactorTCP, ... recording) plus
    C{IReactorUDP} on C{self.network}, a L{MemoryUDPNetwork} whose
    clock is this reactor.  C{udp} and C{tcp} map every address ever
    bound to its port (C{listening} tells whether it still is); C{taken}
    holds the C{(kind, host, port)} in use (add to it to play another
    program holding a port).  C{handles=True}: UDP ports also provide
    C{ISystemHandle} (a L{MemorySocket}), as C{udp.Port} does.
    """

    def __init__(
        self,
        latency: float = 0.0,
        drop: DropRule | None = None,
        *,
        handles: bool = False,
        default_host: str = "127.0.0.1",
        first_port: int = 40000,
    ) -> None:
        super().__init__()
        self.network = MemoryUDPNetwork(self, latency, drop, default_host)
        self.handles = handles
        self.taken: set[tuple[str, str, int]] = set()
        self.udp: dict[Address, MemoryUDPPort] = {}
        self.tcp: dict[Address, MemoryTCPPort] = {}
        self.tcp_reserved: list[MemoryTCPSocket] = []
        self._next_port = first_port

    def _take(self, kind: str, host: str, port: int) -> int:
        if port == 0:
            while (kind, host, self._next_port) in self.taken:
                self._next_port += 1
            port = self._next_port
            self._next_port += 1
        if (kind, host, port) in self.taken:
            raise CannotListenError(host, port, OSError(errno.EADDRINUSE, "Address already in use"))
        self.taken.add((kind, host, port))
        return port

    def listenUDP(
        self, port: int, protocol: AbstractDatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> MemoryUDPPort:
        number = self._take("udp", interface, port)
        listening = self.network.listen((interface, number), protocol, handle=self.handles)
        listening.closed.append(lambda: self.taken.discard(("udp", interface, number)))
        self.udp[(interface, number)] = listening
        return listening

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> MemoryTCPPort:
        number = self._take("tcp", interface, port)
        super().listenTCP(number, factory, backlog, interface)
        listening = MemoryTCPPort(self, interface, number, factory)
        self.tcp[(interface, number)] = listening
        return listening

    def reserve_tcp_port(
        self, port_range: PortRange | None = None, interface: str = "0.0.0.0", listen: bool = True
    ) -> MemoryTCPSocket:
        """C{natbypass.punch.candidates.reserve_tcp_port} in memory: the first free port of C{port_range}."""
        for port in port_range if port_range is not None else (0,):
            try:
                number = self._take("tcp", interface, port)
            except CannotListenError:
                continue
            sock = MemoryTCPSocket(self, interface, number, listen)
            self.tcp_reserved.append(sock)
            return sock
        raise CandidateError(f"no free TCP port in {port_range} on {interface}")

    def refuse_tcp_connections(self) -> int:
        """Fail every pending C{connectTCP} with ConnectionRefusedError (nobody listens in memory); how many."""
        pending, self.tcpClients = self.tcpClients, []
        for host, port, factory, _timeout, _bind in pending:
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError(host, port)))
        return len(pending)

    def open_udp_ports(self) -> list[Address]:
        """The addresses of the UDP ports still bound."""
        return [a for a, p in self.udp.items() if p.listening]

    def open_tcp_sockets(self) -> list[Address]:
        """The addresses of the reserved TCP ports still held."""
        return [s.address for s in self.tcp_reserved if not s.closed]

"""
Doubles for RFC 5780 discovery tests, built on L{natbypass.testing.udp}:
a configurable STUN server on four addresses, one client behind a
L{natbypass.testing.udp.MemoryNAT} (L{MemoryInternet}), and a
TCP binder that plays connect-and-bind through a NAT.

The server is not C{natbypass.stun.server} on purpose: discovery must cope
with servers that ours would never be (no OTHER-ADDRESS, CHANGE-REQUEST
ignored or refused), so it is scripted by C{mode}.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import DatagramProtocol

from natbypass.stun import message as m
from natbypass.stun.client import StunUDPProtocol, TCPBinding, binding_request
from natbypass.testing.udp import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    Address,
    MemoryNAT,
    MemoryUDPNetwork,
    MemoryUDPReactor,
)

PRIMARY = ("192.0.2.1", 3478)
OTHER = ("192.0.2.2", 3479)
INSIDE = ("10.0.0.2", 40000)
PUBLIC_IP = "198.51.100.7"
LATENCY = 0.01


class _ServerSocket(DatagramProtocol):
    def __init__(self, server: FakeSTUNServer, address: Address) -> None:
        self.server, self.address = server, address

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.server.receive(data, tuple(addr), self.address)


class FakeSTUNServer:
    """
    An RFC 5780 server on C{primary} and C{other} (and the two mixed
    addresses).  C{mode}: "rfc5780", "single" (no OTHER-ADDRESS, ignores
    CHANGE-REQUEST), "ignore-change" (advertises OTHER-ADDRESS, answers from
    where it was asked), "refuse-change" (420 to CHANGE-REQUEST).
    C{received} logs (time, source, destination) of every request.
    """

    def __init__(self, network: MemoryUDPNetwork, mode: str = "rfc5780",
                 primary: Address = PRIMARY, other: Address = OTHER) -> None:  # fmt: skip
        self.network, self.mode, self.primary, self.other = network, mode, primary, other
        self.received: list[tuple[float, Address, Address]] = []
        for host in (primary[0], other[0]):
            for port in (primary[1], other[1]):
                network.listen((host, port), _ServerSocket(self, (host, port)))

    def receive(self, data: bytes, src: Address, dst: Address) -> None:
        self.received.append((self.network.clock.seconds(), src, dst))
        req = m.decode(data)
        change = req.get(m.ChangeRequest)
        if change is not None and self.mode == "refuse-change":
            reply = req.reply(m.MessageClass.ERROR, [m.ErrorCode(420, "Unknown Attribute")])
            self.network.send(dst, src, reply.encode())
            return
        origin = dst
        if change is not None and self.mode == "rfc5780":
            ips = {self.primary[0]: self.other[0], self.other[0]: self.primary[0]}
            ports = {self.primary[1]: self.other[1], self.other[1]: self.primary[1]}
            origin = (
                ips[dst[0]] if change.change_ip else dst[0],
                ports[dst[1]] if change.change_port else dst[1],
            )
        attrs: list[m.Attribute] = [m.XorMappedAddress(*src), m.ResponseOrigin(*origin)]
        if self.mode != "single":
            attrs.append(m.OtherAddress(*self.other))
        self.network.send(origin, src, req.reply(m.MessageClass.SUCCESS, attrs).encode())


class MemoryInternet:
    """
    One STUN client at C{INSIDE} behind one L{MemoryNAT} (or none:
    C{translate=False}, a firewall that only filters), one
    L{FakeSTUNServer}, on a L{MemoryUDPReactor} (C{clock}).
    """

    def __init__(
        self,
        mapping: str = ENDPOINT_INDEPENDENT,
        filtering: str = ENDPOINT_INDEPENDENT,
        *,
        translate: bool = True,
        port_preserving: bool = False,
        blocked: bool = False,
        server_mode: str = "rfc5780",
    ) -> None:
        self.clock = self.reactor = MemoryUDPReactor(latency=LATENCY)
        self.network = self.reactor.network
        self.nat = MemoryNAT([INSIDE[0]], PUBLIC_IP, mapping, filtering, translate=translate,
                             port_preserving=port_preserving, blocked=blocked)  # fmt: skip
        self.network.nats.append(self.nat)
        self.server = FakeSTUNServer(self.network, server_mode)
        self.protocol = StunUDPProtocol(self.clock)
        self.reactor.listenUDP(INSIDE[1], self.protocol, interface=INSIDE[0])
        self.client = self.protocol.client

    @property
    def mappings(self) -> dict[Any, Address]:
        return self.nat.mappings

    @property
    def outbound(self) -> list[tuple[float, Address]]:
        """(time, destination) of every datagram the client sent."""
        return [(t, dst) for t, src, dst, _ in self.network.sent if src == INSIDE]

    def run(self, d: defer.Deferred[Any], limit: float = 120.0) -> Any:
        """Advance the clock from event to event until C{d} fires; its result."""
        result: list[Any] = []
        d.addBoth(result.append)
        while not result and self.clock.seconds() < limit:
            calls = self.clock.getDelayedCalls()
            assert calls, "nothing scheduled and nothing fired"
            self.clock.advance(max(0, min(c.getTime() for c in calls) - self.clock.seconds()))
        assert result, "did not finish"
        if hasattr(result[0], "raiseException"):
            result[0].raiseException()
        return result[0]

    def discover(self, **kw: Any) -> Any:
        from natbypass.stun import discovery

        return self.run(discovery.discover(self.client, PRIMARY, INSIDE, self.clock, **kw))


class FakeTCPBinder:
    """
    A C{tcp_binder} for C{discovery.discover_tcp}: connect-and-bind through
    a NAT with C{mapping} (None: no NAT).  C{refused} servers refuse;
    C{calls} logs (remote, local).
    """

    def __init__(self, mapping: str | None, refused: Any = (), other: Address | None = OTHER) -> None:
        self.mapping = mapping
        self.refused = set(refused)
        self.other = other
        self.calls: list[tuple[Address, Address | None]] = []
        self.mappings: dict[Any, Address] = {}
        self._ports = itertools.count(62000)

    def __call__(self, remote: Address, local: Address | None) -> defer.Deferred[TCPBinding]:
        self.calls.append((remote, local))
        if remote in self.refused:
            return defer.fail(ConnectionRefusedError())
        bound = ("10.0.0.2", 45000) if local is None or local[1] == 0 else local
        if self.mapping is None:
            mapped = bound
        else:
            key = {ENDPOINT_INDEPENDENT: (), ADDRESS_DEPENDENT: (remote[0],),
                   ADDRESS_AND_PORT_DEPENDENT: remote}[self.mapping]  # fmt: skip
            mapped = self.mappings.setdefault(key, (PUBLIC_IP, next(self._ports)))
        response = binding_request().reply(m.MessageClass.SUCCESS, [])
        return defer.succeed(TCPBinding(bound, mapped, self.other, remote, response))

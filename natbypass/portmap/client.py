"""
NAT-PMP and PCP clients: one UDP transaction per request to the gateway's
port 5351, resent on the protocol's schedule and cut to a budget, so a
gateway that never answers costs at most C{budget} seconds.

Each transaction binds its own ephemeral port (closed when it ends) and
connects it to the gateway, so an ICMP port unreachable ends it at once and
only the gateway's datagrams are read.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from zope.interface import implementer

from natbypass.net import route_source_address

from . import natpmp, pcp
from .errors import DecodeError, MappingError
from .interfaces import IPortMappingClient, PortMapping

Address = tuple[str, int]


def doubling_times(
    first: float, budget: float, *, limit: int = 16, jitter: Callable[[], float] | None = None
) -> list[float]:
    """
    Send offsets from 0: 0, C{first}, 3 C{first}, 7 C{first}, ... (the
    interval doubling, each optionally scaled by C{jitter()}), only those
    before C{budget}, at most C{limit}.
    """
    times, at, interval = [0.0], 0.0, first
    while len(times) < limit:
        at += interval * (jitter() if jitter else 1.0)
        if at >= budget:
            break
        times.append(at)
        interval *= 2
    return times


class _Transaction(DatagramProtocol):
    """One request to the gateway: sends at C{times}, fires with the first accepted response."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        gateway: Address,
        payload: bytes,
        decode: Callable[[bytes], Any],
        accept: Callable[[Any], bool],
        times: Sequence[float],
        budget: float,
        method: str,
        connect: bool = True,
    ) -> None:
        self.clock = clock
        self.gateway = gateway
        self.payload = payload
        self.decode = decode
        self.accept = accept
        self.times = times
        self.budget = budget
        self.method = method
        self.connect = connect
        self.sent = 0
        self.done: Deferred[Any] = Deferred(lambda _: self._finish())
        self._calls: list[Any] = []
        self._port: Any = None

    def start(self, port: Any) -> Deferred[Any]:
        self._port = port
        if self.connect:
            port.connect(*self.gateway)
        self._calls = [self.clock.callLater(t, self._send) for t in self.times]
        self._calls.append(self.clock.callLater(self.budget, self._expire))
        return self.done

    def _send(self) -> None:
        self.sent += 1
        try:
            self.transport.write(self.payload, None if self.connect else self.gateway)
        except OSError as e:  # no route, unreachable: the next send may work; the budget bounds it
            self.log.debug(
                "{method} send to {gateway} failed: {error}", method=self.method, gateway=self.gateway, error=e
            )

    def _expire(self) -> None:
        self._fail(
            MappingError(self.method, f"no answer from {self.gateway[0]} in {self.budget:g} s ({self.sent} sends)")
        )

    def connectionRefused(self) -> None:
        self._fail(MappingError(self.method, f"{self.gateway[0]} port {self.gateway[1]} is closed (ICMP unreachable)"))

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        if addr[0] != self.gateway[0] or self.done.called:
            return
        try:
            message = self.decode(data)
        except DecodeError as e:
            self.log.debug("{method}: dropped a bad response: {error}", method=self.method, error=e)
            return
        if self.accept(message):
            self._finish()
            self.done.callback(message)

    def _fail(self, error: MappingError) -> None:
        if not self.done.called:
            self._finish()
            self.done.errback(error)

    def _finish(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        if self._port is not None:
            port, self._port = self._port, None
            port.stopListening()


def udp_request(
    reactor: Any,
    gateway: Address,
    payload: bytes,
    decode: Callable[[bytes], Any],
    accept: Callable[[Any], bool],
    times: Sequence[float],
    budget: float,
    method: str,
    *,
    clock: IReactorTime | None = None,
    local_host: str = "",
    connect: bool = True,
) -> Deferred[Any]:
    """
    Send C{payload} to C{gateway} at C{times} (offsets in seconds) from a
    fresh port on C{local_host}; fire with the first decoded response that
    C{accept}s, or fail with L{MappingError} after C{budget} seconds.
    Cancelling closes the port.
    """
    tx = _Transaction(clock or reactor, gateway, payload, decode, accept, times, budget, method, connect)
    try:
        port = reactor.listenUDP(0, tx, interface=local_host)
    except Exception as e:  # CannotListenError and friends: report as this method failing
        return defer.fail(MappingError(method, f"cannot bind a UDP port: {e}"))
    return tx.start(port)


def _local_host(gateway: str, local_host: str | None) -> str:
    return local_host if local_host is not None else route_source_address((gateway, natpmp.PORT))


@implementer(IPortMappingClient)
class NatPmpClient:
    """RFC 6886 against one gateway: the external address, then the mapping (its response has only the port)."""

    method = "natpmp"

    def __init__(
        self,
        reactor: Any,
        gateway: str,
        *,
        clock: IReactorTime | None = None,
        budget: float = 2.0,
        local_host: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock or reactor
        self.gateway = gateway
        self.budget = budget
        self.local_host = local_host

    def _request(self, request: Any, accept: Callable[[Any], bool]) -> Deferred[Any]:
        return udp_request(
            self.reactor,
            (self.gateway, natpmp.PORT),
            request.encode(),
            natpmp.decode_response,
            accept,
            doubling_times(natpmp.INITIAL_RTO, self.budget, limit=natpmp.MAX_SENDS),
            self.budget,
            self.method,
            clock=self.clock,
            local_host=_local_host(self.gateway, self.local_host),
        )

    @staticmethod
    def _check(response: Any) -> Any:
        if response.result != natpmp.Result.SUCCESS:
            raise MappingError("natpmp", f"the gateway refused: {natpmp.result_name(response.result)}", response.result)
        return response

    def externalAddress(self) -> Deferred[str]:
        """The gateway's external IPv4 address (RFC 6886 3.2)."""
        d = self._request(natpmp.ExternalAddressRequest(), lambda r: isinstance(r, natpmp.ExternalAddressResponse))
        return d.addCallback(self._check).addCallback(lambda r: r.address)

    async def _map(self, protocol: str, internal_port: int, lifetime: int, previous: PortMapping | None) -> PortMapping:
        address = await self.externalAddress()
        hint = previous.external[1] if previous is not None else internal_port
        request = natpmp.MapRequest(protocol, internal_port, hint, int(lifetime))
        response = self._check(
            await self._request(
                request,
                lambda r: (
                    isinstance(r, natpmp.MapResponse)
                    and r.protocol == protocol
                    and r.internal_port in (internal_port, 0)
                ),
            )
        )
        if response.lifetime == 0 or response.external_port == 0:
            raise MappingError(self.method, "the gateway granted no mapping (port or lifetime 0)")
        return PortMapping(
            self.method,
            protocol,
            internal_port,
            (address, response.external_port),
            response.lifetime,
            self.clock.seconds(),
        )

    def map(
        self, protocol: str, internal_port: int, lifetime: int, previous: PortMapping | None = None
    ) -> Deferred[PortMapping]:
        return defer.ensureDeferred(self._map(protocol, internal_port, lifetime, previous))

    def unmap(self, mapping: PortMapping) -> Deferred[None]:
        request = natpmp.MapRequest(mapping.protocol, mapping.internal_port, 0, 0)
        d = self._request(request, lambda r: isinstance(r, natpmp.MapResponse) and r.protocol == mapping.protocol)
        return d.addCallback(self._check).addCallback(lambda _: None)


@implementer(IPortMappingClient)
class PcpClient:
    """
    RFC 6887 MAP against one gateway.  The nonce made for a mapping is kept
    in it (C{PortMapping.state}) and reused to renew and delete it.
    C{irt}: the initial retransmission time (the RFC's 3 s by default).
    """

    method = "pcp"

    def __init__(
        self,
        reactor: Any,
        gateway: str,
        *,
        clock: IReactorTime | None = None,
        budget: float = 2.0,
        irt: float = pcp.IRT,
        local_host: str | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.reactor = reactor
        self.clock = clock or reactor
        self.gateway = gateway
        self.budget = budget
        self.irt = irt
        self.local_host = local_host
        self.rand = rand

    def _request(self, request: pcp.MapRequest, local_host: str) -> Deferred[pcp.MapResponse]:
        def accept(r: Any) -> bool:
            if isinstance(r, pcp.ErrorResponse):
                return True  # a refusal (or a NAT-PMP-only server) ends the transaction
            return (
                r.nonce == request.nonce and r.protocol == request.protocol and r.internal_port == request.internal_port
            )

        def check(r: Any) -> pcp.MapResponse:
            if isinstance(r, pcp.ErrorResponse) and r.version != pcp.VERSION:
                raise MappingError(self.method, f"the gateway speaks version {r.version} only", r.result)
            if r.result != pcp.Result.SUCCESS:
                raise MappingError(self.method, f"the gateway refused: {pcp.result_name(r.result)}", r.result)
            return r

        times = doubling_times(self.irt, self.budget, jitter=lambda: 0.9 + 0.2 * self.rand())
        d = udp_request(
            self.reactor,
            (self.gateway, pcp.PORT),
            request.encode(),
            pcp.decode_response,
            accept,
            times,
            self.budget,
            self.method,
            clock=self.clock,
            local_host=local_host,
        )
        return d.addCallback(check)

    async def _map(self, protocol: str, internal_port: int, lifetime: int, previous: PortMapping | None) -> PortMapping:
        local = _local_host(self.gateway, self.local_host)
        if previous is not None:
            nonce, suggested = previous.state[0], previous.external
        else:
            nonce, suggested = secrets.token_bytes(12), ("0.0.0.0", internal_port)
        request = pcp.MapRequest(local, nonce, protocol, internal_port, int(lifetime), suggested[1], suggested[0])
        r = await self._request(request, local)
        if r.lifetime == 0 or r.external_port == 0:
            raise MappingError(self.method, "the gateway granted no mapping (port or lifetime 0)")
        return PortMapping(
            self.method,
            protocol,
            internal_port,
            (r.external_address, r.external_port),
            r.lifetime,
            self.clock.seconds(),
            (nonce,),
        )

    def map(
        self, protocol: str, internal_port: int, lifetime: int, previous: PortMapping | None = None
    ) -> Deferred[PortMapping]:
        return defer.ensureDeferred(self._map(protocol, internal_port, lifetime, previous))

    def unmap(self, mapping: PortMapping) -> Deferred[None]:
        local = _local_host(self.gateway, self.local_host)
        request = pcp.MapRequest(
            local,
            mapping.state[0],
            mapping.protocol,
            mapping.internal_port,
            0,
            mapping.external[1],
            mapping.external[0],
        )
        return self._request(request, local).addCallback(lambda _: None)

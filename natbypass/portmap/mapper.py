"""
The C{PortMapper} service: ask the gateway for inbound mappings with PCP,
then NAT-PMP, then UPnP-IGD (the first that grants one wins), renew each at
half its lifetime, delete them all when the service stops.

Every step is bounded: a gateway that never answers costs each protocol
its budget (by default 1.5 + 1.5 + 3 s), in the background of whoever
asked.  Nothing is sent before C{map} is called, and only to the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .client import NatPmpClient, PcpClient
from .errors import MappingError
from .gateway import default_gateway
from .interfaces import IPortMappingClient, PortMapping
from .upnp import UpnpClient

#: The order the protocols are tried in.
METHODS = ("pcp", "natpmp", "upnp")
#: What a mapping is asked for (RFC 6886's recommended two hours).
LIFETIME = 7200
#: A failed renewal is retried while at least this much of the lifetime is left.
MIN_RETRY = 2.0
#: Deleting the mappings at stop waits at most this long.
STOP_BUDGET = 2.0


def default_clients(
    reactor: Any, gateway: str, clock: IReactorTime | None = None, local_host: str | None = None
) -> list[IPortMappingClient]:
    """PCP, NAT-PMP and UPnP clients for C{gateway} with the default budgets."""
    # PCP's RFC retransmission starts at 3 s, for servers far away; a gateway
    # on the LAN answers in milliseconds, so resend after 0.5 s within the budget.
    return [
        PcpClient(reactor, gateway, clock=clock, budget=1.5, irt=0.5, local_host=local_host),
        NatPmpClient(reactor, gateway, clock=clock, budget=1.5, local_host=local_host),
        UpnpClient(reactor, gateway, clock=clock, budget=3.0, local_host=local_host),
    ]


class PortMapper(Service):
    """
    Inbound port mappings on this host's gateway.  C{gateway} None: the
    default route's (read when the first mapping is asked for); C{clients}
    replaces the PCP/NAT-PMP/UPnP clients (tests, or a chosen order).
    C{changed(protocol, mapping)} observers hear of every renewal with a
    new address and of every mapping lost (C{mapping} None).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        gateway: str | None = None,
        *,
        clock: IReactorTime | None = None,
        clients: Sequence[IPortMappingClient] | None = None,
        lifetime: int = LIFETIME,
        local_host: str | None = None,
        find_gateway: Callable[[], str | None] = default_gateway,
    ) -> None:
        self.reactor = reactor
        self.clock = clock or reactor
        self.gateway = gateway
        self.lifetime = lifetime
        self.local_host = local_host
        self._find_gateway = find_gateway
        self._clients = list(clients) if clients is not None else None
        #: Live mappings by (protocol, internal port).
        self.mappings: dict[tuple[str, int], PortMapping] = {}
        self.changed: list[Callable[[str, PortMapping | None], None]] = []
        self._timers: dict[tuple[str, int], IDelayedCall] = {}
        self._pending: set[Deferred[Any]] = set()

    def clients(self) -> list[IPortMappingClient]:
        """The clients in the order they are tried (made for the gateway on first use)."""
        if self._clients is None:
            gateway = self.gateway or self._find_gateway()
            if gateway is None:
                raise MappingError("portmap", "no IPv4 default gateway to ask")
            self.gateway = gateway
            self._clients = default_clients(self.reactor, gateway, self.clock, self.local_host)
        return self._clients

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._pending.add(d)
        return d.addBoth(lambda r: (self._pending.discard(d), r)[1])

    async def _first(self, protocol: str, internal_port: int) -> PortMapping:
        errors: list[str] = []
        for client in self.clients():
            try:
                mapping = await self._track(client.map(protocol, internal_port, self.lifetime))
            except MappingError as e:
                errors.append(str(e))
                continue
            self._keep(client, mapping)
            self.log.info(
                "{method} mapped {protocol} port {port} to {external} for {lifetime} s",
                method=mapping.method,
                protocol=protocol,
                port=internal_port,
                external=f"{mapping.external[0]}:{mapping.external[1]}",
                lifetime=mapping.lifetime,
            )
            return mapping
        raise MappingError("portmap", f"no protocol mapped {protocol} port {internal_port}: " + "; ".join(errors))

    def map(self, protocol: str, internal_port: int) -> Deferred[PortMapping]:
        """A mapping of this host's C{internal_port} (udp or tcp), kept until stop; fails with MappingError."""
        return defer.ensureDeferred(self._first(protocol, internal_port))

    async def probe(self, protocol: str, internal_port: int, lifetime: int = 60) -> dict[str, PortMapping | str]:
        """
        Ask every protocol for a mapping of C{internal_port} and delete each
        one granted: what C{natbypass detect --port-mapping} reports.  Values:
        the mapping, or why that protocol failed.
        """
        out: dict[str, PortMapping | str] = {}
        for client in self.clients():
            try:
                mapping = await self._track(client.map(protocol, internal_port, lifetime))
            except MappingError as e:
                out[client.method] = e.reason
                continue
            out[client.method] = mapping
            try:
                await self._track(client.unmap(mapping))
            except MappingError as e:
                self.log.warn("{method}: could not delete the probe mapping: {error}", method=client.method, error=e)
        return out

    def _keep(self, client: IPortMappingClient, mapping: PortMapping) -> None:
        key = (mapping.protocol, mapping.internal_port)
        self.mappings[key] = mapping
        self._schedule(client, mapping, mapping.lifetime / 2)

    def _schedule(self, client: IPortMappingClient, mapping: PortMapping, delay: float) -> None:
        key = (mapping.protocol, mapping.internal_port)
        old = self._timers.pop(key, None)
        if old is not None and old.active():
            old.cancel()
        self._timers[key] = self.clock.callLater(max(delay, 0.0), self._renew, client, mapping)

    def _renew(self, client: IPortMappingClient, mapping: PortMapping) -> None:
        key = (mapping.protocol, mapping.internal_port)
        self._timers.pop(key, None)
        d = self._track(client.map(mapping.protocol, mapping.internal_port, self.lifetime, previous=mapping))

        def renewed(new: PortMapping) -> None:
            self._keep(client, new)
            if new.external != mapping.external:
                self._notify(new.protocol, new)

        def failed(f: Any) -> None:
            if f.check(defer.CancelledError):
                return
            left = mapping.granted_at + mapping.lifetime - self.clock.seconds()
            self.log.warn(
                "{method}: renewing {protocol} port {port} failed ({error}); {left:.0f} s left",
                method=client.method,
                protocol=mapping.protocol,
                port=mapping.internal_port,
                error=f.getErrorMessage(),
                left=left,
            )
            if left / 2 >= MIN_RETRY:
                self._schedule(client, mapping, left / 2)
            else:
                self.mappings.pop(key, None)
                self._notify(mapping.protocol, None)

        d.addCallbacks(renewed, failed)

    def _notify(self, protocol: str, mapping: PortMapping | None) -> None:
        for observer in list(self.changed):
            observer(protocol, mapping)

    def stopService(self) -> Deferred[None]:
        """Stop renewing and delete every mapping (bounded by L{STOP_BUDGET})."""
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for d in list(self._pending):
            d.cancel()
        by_method = {c.method: c for c in (self._clients or [])}
        deletes = []
        for mapping in self.mappings.values():
            client = by_method.get(mapping.method)
            if client is not None:
                d = client.unmap(mapping)
                d.addErrback(
                    lambda f, m=mapping: self.log.warn(
                        "{method}: deleting {protocol} port {port} failed: {error}",
                        method=m.method,
                        protocol=m.protocol,
                        port=m.internal_port,
                        error=f.getErrorMessage(),
                    )
                )
                deletes.append(d)
        self.mappings.clear()
        done = defer.DeferredList(deletes, consumeErrors=True)
        done.addTimeout(STOP_BUDGET, self.clock).addErrback(lambda _: None)
        return done.addCallback(lambda _: None)

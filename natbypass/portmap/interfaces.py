"""The port-mapping client interface that PCP, NAT-PMP and UPnP-IGD each implement."""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class PortMapping:
    """
    One inbound mapping a gateway granted: peers that send to C{external}
    reach C{internal_port} of this host, for C{lifetime} seconds from
    C{granted_at} (the clock's time) unless renewed.  C{method} says which
    protocol answered; C{state} is what that protocol needs to renew or
    delete it (the PCP nonce, the UPnP control URL).
    """

    method: str
    protocol: str
    internal_port: int
    external: tuple[str, int]
    lifetime: float
    granted_at: float = 0.0
    state: tuple = field(default=(), compare=False)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "protocol": self.protocol,
            "internal_port": self.internal_port,
            "external": f"{self.external[0]}:{self.external[1]}",
            "lifetime": self.lifetime,
        }


class IPortMappingClient(Interface):
    """One port-mapping protocol spoken to one gateway; every method is bounded in time."""

    method = Attribute("The protocol's name: pcp, natpmp or upnp.")

    def map(protocol, internal_port, lifetime, previous=None):
        """
        A Deferred firing with a L{PortMapping} of C{internal_port}
        (C{protocol} udp or tcp) for about C{lifetime} seconds; C{previous}
        is the mapping to renew.  Fails with MappingError.
        """

    def unmap(mapping):
        """A Deferred firing when C{mapping} is deleted (or the gateway gave no answer in time)."""

"""
The mapping probe a peer runs at start: RFC 5780's mapping tests from a
short-lived socket of their own (L{natbypass.stun.discovery.probe_mapping}).

Full discovery (L{natbypass.stun.discovery.discover}) must wait out the
filtering tests before it may send to the server's alternate address, so a
symmetric NAT's port step is known only seconds after start: a peer that
connects at once would offer without it, and the peer it connects to could
not predict its ports.  The probe learns the mapping and the step in two
round trips, in parallel with the main ports' first Bindings, on a socket
whose filter may be opened to the alternate address (the main socket's may
not, or the filtering tests would be wrong).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from natbypass.names import resolve_address
from natbypass.net import route_source_address
from natbypass.punch.candidates import CandidateError, PortRange, bind_udp
from natbypass.stun import discovery
from natbypass.stun.client import Address, RetransmitPolicy, StunUDPProtocol

log = Logger()


async def probe_from_fresh_socket(
    reactor: Any,
    clock: IReactorTime,
    server: Address,
    port_range: PortRange | None,
    bind_host: str,
    timeout: float,
) -> discovery.MappingProbe | None:
    """
    Bind a UDP port, run the mapping tests from it within C{timeout}
    seconds, close it (also when cancelled).  None when no port or no route
    could be had: the peer then goes on with what full discovery finds.
    C{server} may be a name (the peer's default STUN server is the
    mediator's host): resolved here, through the reactor's resolver, since
    the probe starts before the main ports have resolved it.
    """
    try:
        server = await resolve_address(reactor, server)
    except DNSLookupError as e:
        log.warn("no mapping probe: {error}", error=e)
        return None
    protocol = StunUDPProtocol(clock)
    try:
        port = bind_udp(reactor, protocol, port_range, bind_host)
    except CandidateError as e:
        log.warn("no mapping probe: {error}", error=e)
        return None
    try:
        local = (route_source_address(server), port.getHost().port)
        policy = RetransmitPolicy.within(timeout, rto=0.25)
        probe: discovery.MappingProbe = await discovery.probe_mapping(
            protocol.client, server, local, clock, policy=policy
        )
    except OSError as e:  # no route to the server
        log.warn("no mapping probe: {error}", error=e)
        return None
    finally:
        port.stopListening()
    log.info("mapping probe: mapping {mapping}, port step {delta}", mapping=probe.mapping, delta=probe.port_delta)
    return probe

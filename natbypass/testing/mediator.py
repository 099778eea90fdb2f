"""
A whole mediator (STUN responder and signalling state) in memory, with the
peers of a test, on one L{MemoryUDPReactor} and its clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from natbypass.peer import Peer, PeerConfig
from natbypass.signaling.server import Limits, SignalingFactory, SignalingState
from natbypass.stun.server import STUNService

from .signaling import MemoryNetwork
from .udp import MemoryUDPReactor

Address = tuple[str, int]


class MemoryMediator:
    """
    The mediator of an in-memory test: its STUN responder on two addresses,
    its signalling state behind a L{MemoryNetwork}, and the services a test
    starts against it (stopped by L{stop}).  L{settle} moves bytes and time
    until a Deferred has a result.
    """

    stun_address: Address = ("127.0.0.1", 3478)
    stun_alternate: Address = ("127.0.0.2", 3479)

    def __init__(self, latency: float = 0.02, limits: Limits | None = None) -> None:
        self.reactor = MemoryUDPReactor(latency=latency)
        self.stun = STUNService(self.reactor, self.stun_address, self.stun_alternate, stats_interval=0)
        self.stun.startService()
        #: The UDP ports of the mediator itself (not the peers').
        self.stun_ports = set(self.reactor.open_udp_ports())
        self.state = SignalingState(self.reactor, limits or Limits(offer_timeout=10.0))
        self.network = MemoryNetwork(SignalingFactory(self.state), self.reactor)
        self.services: list[Any] = []

    def settle(self, d: Deferred[Any], limit: float = 30.0, check: bool = True) -> Any:
        """
        Move bytes and time (10 ms steps) until C{d} has a result and return
        it (raising a failure); with C{check} false, just run for C{limit}.
        """
        out: list[Any] = []
        d.addBoth(out.append)
        end = self.reactor.seconds() + limit
        while not out and self.reactor.seconds() < end:
            self.network.flush()
            self.reactor.refuse_tcp_connections()  # STUN over TCP: nobody listens in memory
            self.reactor.advance(0.01)
        if not check:
            return None
        if not out:
            raise AssertionError(f"did not finish within {limit} s")
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def peer(self, name: str, host: str, protocol: str = "udp", peer_args: dict | None = None, **config: Any) -> Peer:
        """A started L{Peer} at C{host} (short timeouts unless C{config} says otherwise)."""
        config.setdefault("punch_timeout", 1.0)
        config.setdefault("stun_timeout", 1.0)
        p = Peer(
            self.reactor,
            name,
            self.network.endpoint(host),
            self.stun_address,
            protocol=protocol,
            config=PeerConfig(bind_host=host, **config),
            reserve_tcp_port=self.reactor.reserve_tcp_port,
            **(peer_args or {}),
        )
        return self.start(p)

    def start(self, service: Any) -> Any:
        """Start C{service} and stop it with the rest."""
        service.startService()
        self.services.append(service)
        return service

    def peer_ports(self) -> set[Address]:
        """The UDP ports open now that are not the mediator's."""
        return set(self.reactor.open_udp_ports()) - self.stun_ports

    def stop(self) -> None:
        """Stop every service started here, let them finish, then the STUN responder."""
        for s in self.services:
            if s.running:
                s.stopService()
        self.settle(Deferred(), limit=1.0, check=False)
        self.stun.stopService()

"""
The C{Peer} service: what an application embeds to reach other peers.

It composes the parts and holds no protocol logic of its own:

- one UDP socket, shared by the STUN client and the punch endpoint through a
  C{UDPMux}, so the port whose mapping STUN learned is the port that punches;
- one TCP port (a listening socket with SO_REUSEPORT), whose mapping it
  learns by STUN over TCP *from that port*, for TCP simultaneous open;
- the signalling client, which registers, sends and answers offers;
- the traversal engines, run in the mediator's order with happy-eyeballs
  fallback (C{natbypass.selection}, C{natbypass.punch.race}).

Start-up learns the two mapped addresses (one round trip each) and is then
ready; RFC 5780 behaviour discovery runs on in the background and improves
later offers, so a first C{connect} never waits for the filtering tests.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass import selection
from natbypass._deprecate import deprecated_alias
from natbypass.address import is_wildcard
from natbypass.identity import Fingerprint, FingerprintError, Identity
from natbypass.interfaces import IIncomingHandler, IPeer, IPeerApprover, IPeerConnection, IStreamHandler
from natbypass.names import resolve_address
from natbypass.nat import NatSummary
from natbypass.portmap import MappingError, PortMapper, PortMapping
from natbypass.punch import birthday, candidates, families, race, repunch, tcp
from natbypass.punch.candidates import LocalNetworks, PortRange, ProbeBudget, TokenBucket
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.udp import ProbeSchedule, QuicSetup, punch_udp
from natbypass.secure import ChannelSecurity
from natbypass.secure.quic import get_engine, warm_up
from natbypass.signaling.client import Decline, IncomingOffer, SignalingClient
from natbypass.signaling.wire import MAX_PUBLISHED, PUBLISHABLE_KINDS, Candidate, Description, Session
from natbypass.streams import PeerAddress, StreamRefused, frames
from natbypass.stun import discovery
from natbypass.stun.client import (
    NETWORK_ERRORS,
    StunUDPProtocol,
    binding_request,
    mapped_address,
    route_source_address,
    tcp_binding,
)
from natbypass.stun.probe import probe_from_fresh_socket
from natbypass.trust import AllowList, KnownPeers, PeerCheck, PeerRejected, pinned

Address = tuple[str, int]

# Import the QUIC engine with the rest of the program, not in the first connect.
get_engine()

#: How long an answered offer's ports wait for its session (the mediator
#: replies to our accept in one round trip); then they are closed.
ANSWER_HOLD = 30.0
#: With port mapping on, readiness waits at most this long for the mappings (they go on in the background).
PORTMAP_READY_WAIT = 2.0


def portmap_kind(protocol: str) -> str:
    """The candidate kind of a gateway mapping: C{portmap} or C{tcp-portmap}."""
    return "portmap" if protocol == "udp" else "tcp-portmap"


def parse_wish(protocol: str | Sequence[str]) -> tuple[str, ...]:
    """The application's protocol wish as the wire carries it: C{()} is auto."""
    return selection.parse_wish(protocol) or ()


@dataclass(frozen=True)
class PeerConfig:
    """Tunables of a peer; the defaults suit the open internet."""

    bind_host: str = "0.0.0.0"
    port_range: PortRange | None = None
    #: Run RFC 5780 discovery (in the background; needs a two-address mediator).
    discover: bool = True
    #: How long the UDP punch and the TCP simultaneous open may each try.
    punch_timeout: float = 5.0
    keepalive_interval: float = 15.0
    liveness_timeout: float | None = None
    #: Head start of the preferred protocol before the other one starts (auto).
    head_start: float = selection.DEFAULT_HEAD_START
    #: Advertise loopback host candidates (two peers on one machine).
    loopback_candidates: bool = False
    #: How long learning one mapped address may take at start.
    stun_timeout: float = 3.0
    #: Seconds between re-reads of the interface addresses.
    host_refresh: float = 60.0
    #: Publish our interface addresses (host candidates): in our own
    #: offers, and in answers to offers the application approved (never
    #: before).  False: never (only the mapped addresses; two peers on one
    #: LAN then meet through their NAT, if it hairpins).
    reveal_host_candidates: bool = True
    #: Ask the gateway for inbound mappings of the main ports (PCP, NAT-PMP,
    #: UPnP-IGD) and publish them.  Off by default: it sends to the gateway.
    port_mapping: bool = False
    #: The gateway to ask; None: the default route's.
    port_mapping_gateway: str | None = None
    #: Publish our mapped candidates (never host ones), NAT summary and wish
    #: with the registration, so a connect to us takes one mediator round trip
    #: (docs/protocol.md 5.1); we still approve every peer before we punch.
    publish_candidates: bool = True
    #: Re-punch a UDP path through the mediator when it falls silent (its
    #: peer's NAT rebound behind a filter; docs/streams.md, "Path migration").
    repunch: bool = True
    #: Birthday punching (port-restricted cone x random symmetric NAT, UDP;
    #: docs/traversal.md): extra sockets we open on the symmetric side (0:
    #: off), probes a second and in all that we spray on the cone side.
    birthday_sockets: int = birthday.BIRTHDAY_SOCKETS
    birthday_rate: float = birthday.BIRTHDAY_RATE
    birthday_probes: int = birthday.BIRTHDAY_PROBES
    #: Dual stack: punch from IPv6 sockets as well (on C{bind_host6}), offer
    #: IPv6 host candidates and race the families (IPv6 first, IPv4
    #: C{family_head_start} later: L{families}).
    ipv6: bool = False
    #: Where the IPv6 sockets bind (C{::}: every IPv6 address, all offered as host candidates).
    bind_host6: str = "::"
    #: The IPv6 STUN server that maps the IPv6 ports (None: host candidates only).
    stun6: Address | None = None
    family_head_start: float = families.FAMILY_HEAD_START


@dataclass(frozen=True)
class PeerStats:
    """
    What a peer has done since it was made, as L{Peer.stats} reads it (for
    L{natbypass.metrics}): a snapshot, not updated afterwards.
    """

    #: Direct paths open now, by protocol.
    connections: dict[str, int]
    #: Traversals under way (ours and those peers started).
    traversals: int
    #: Finished traversals by (outcome, protocol) as reported to the mediator; protocol "" when none connected.
    outcomes: dict[tuple[str, str], int]
    #: Race attempts of finished traversals by (protocol, result): connected, failed, cancelled, not-started.
    attempts: dict[tuple[str, str], int]
    #: Secure-channel handshakes (QUIC on udp, TLS 1.3 on tcp) by protocol: (count, total seconds).
    handshakes: dict[str, tuple[int, float]]


class UDPSocket:
    """
    One UDP port and what shares it: the STUN client (to learn its mapping)
    and the punch endpoint (to punch and carry data from that very port).
    """

    def __init__(self, reactor: Any, clock: IReactorTime, port_range: PortRange | None, bind_host: str) -> None:
        self.stun = StunUDPProtocol(clock)
        self.punch = PunchEndpoint()
        self.port = candidates.bind_udp(reactor, UDPMux(self.stun, self.punch), port_range, bind_host)
        self.mapped: Address | None = None

    @property
    def local(self) -> Address:
        host = self.port.getHost()
        return (host.host, host.port)

    async def learn(self, server: Address, timeout: float) -> Address | None:
        """One Binding request: the public address of this port towards C{server}."""
        policy = self.stun.client.policy.within(timeout)
        response, _ = await self.stun.client.request(binding_request(), server, policy)
        self.mapped = mapped_address(response)
        return self.mapped

    def close(self) -> Deferred[None]:
        return defer.maybeDeferred(self.port.stopListening)


class TCPPort:
    """
    One TCP port we punch from: a listening socket with SO_REUSEPORT (so the
    STUN-over-TCP connection and every simultaneous open can bind it too,
    and an inbound SYN is accepted), and its mapping learned from that port.
    """

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime,
        port_range: PortRange | None,
        bind_host: str,
        reserve: Callable[[PortRange | None, str], socket.socket] = candidates.reserve_tcp_port,
    ) -> None:
        self.reactor, self.clock = reactor, clock
        self.socket: socket.socket | None = reserve(port_range, bind_host)
        self.local: Address = self.socket.getsockname()[:2]
        self.mapped: Address | None = None

    async def learn(self, server: Address, timeout: float) -> Address | None:
        binding = await tcp_binding(self.reactor, server, self.local, clock=self.clock, timeout=timeout)
        self.mapped = binding.mapped
        return self.mapped

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None


@dataclass
class Ports:
    """The UDP socket and TCP port one session punches from (and, dual stack, the IPv6 ones)."""

    udp: UDPSocket
    tcp: TCPPort
    udp6: UDPSocket | None = None
    tcp6: TCPPort | None = None


@dataclass
class _Answer:
    """
    An offer we approved, until its session arrives or it is over: the key
    the peer must prove, the ports we answered from (once bound) and the
    timer that closes them if the session never comes.
    """

    fingerprint: Fingerprint
    ports: Ports | None = None
    expiry: IDelayedCall | None = None


#: How long stopping waits for the connections to close cleanly (a UDP path's drain is bounded by 5 s).
CLOSE_WAIT = 6.0


@implementer(IPeer)
class Peer(MultiService):
    """
    A peer: registers with the mediator, opens direct paths on C{connect}
    and hands connections that others open to the C{listen} handler.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        peer_id: str,
        mediator: IStreamClientEndpoint,
        stun_server: Address,
        *,
        token: str | None = None,
        protocol: str | Sequence[str] = "auto",
        config: PeerConfig = PeerConfig(),
        clock: IReactorTime | None = None,
        reserve_tcp_port: Callable[[PortRange | None, str], socket.socket] = candidates.reserve_tcp_port,
        identity: Identity | None = None,
        known_peers: KnownPeers | None = None,
        allow: AllowList | None = None,
    ) -> None:
        """
        C{reactor} binds every UDP port and makes every TCP connection;
        C{reserve_tcp_port} holds the TCP ports punched from (tests pass an
        in-memory reactor and its C{reserve_tcp_port}, see natbypass.testing).

        @param identity: the key this peer registers its id with (the
            mediator binds the id to it); None: an ephemeral key made now,
            so the id is bound to this process only (use
            L{natbypass.identity.load_or_create} to keep it).
        @param known_peers: trust on first use for C{connect} without a
            fingerprint: the first key a peer proves is recorded, a later
            different one refused.  None: such a connect trusts the key the
            mediator says the peer registered (see C{docs/security.md}).
        @param allow: which peers may connect to us, when the C{listen}
            handler is not an L{IPeerApprover} itself; None: everyone (each
            still proves the key the mediator bound its id to).
        """
        super().__init__()
        self.reactor = reactor
        self._reserve_tcp_port = reserve_tcp_port
        self.clock = clock or reactor
        self.peer_id = peer_id
        self.stun_server = stun_server
        self.wish = parse_wish(protocol)
        self.config = config
        if identity is None:
            identity = Identity.generate()
            self.log.info(
                "peer {peer_id}: no identity given, using the ephemeral key {fingerprint}",
                peer_id=peer_id,
                fingerprint=str(identity.fingerprint),
            )
        #: The identity key this peer registers with and authenticates with.
        self.identity: Identity = identity
        self.known_peers = known_peers
        self.allow = allow
        self.signaling = SignalingClient(mediator, peer_id, clock=self.clock, token=token, identity=identity)
        self.signaling.setServiceParent(self)
        self.signaling.setOfferHandler(self._offered)
        self.signaling.setSessionHandler(self._accepted_session)
        #: Our UDP paths that can be re-punched through the mediator (natbypass.punch.repunch).
        self.repunchers = repunch.RepunchRegistry()
        self.signaling.setRepunchHandler(self._repunch_noticed)
        self.nat = NatSummary()
        self.behavior: discovery.NATBehavior | None = None
        self._main: Ports | None = None
        #: Offers we approved, by offering peer, until the session arrives (or never does).
        self._answers: dict[str, _Answer] = {}
        #: Answers under way (approval, ports, mappings), cancelled at stop.
        self._answering: set[Deferred[Description]] = set()
        #: This machine's interface addresses (host candidates), read at start and then periodically.
        self.host_addresses: list[str] = []
        #: Our interfaces' networks, which screen the peers' candidates (L{candidates.refusal}).
        self.local_networks = LocalNetworks()
        #: The pace every attempt shares (UDP probes and flights to unproven
        #: addresses, TCP connects): L{candidates.PEER_RATE} bytes a second.
        self.pace = TokenBucket(self.clock, candidates.PEER_RATE, candidates.PEER_BURST)
        #: One birthday punch at a time (docs/security.md): its own bounds are far above the pace's.
        self.birthday = birthday.BirthdayLimiter()
        self._birthday_config = birthday.BirthdayConfig(
            config.birthday_sockets, config.birthday_rate, config.birthday_probes
        )
        self._host_refresh: LoopingCall | None = None
        self._handler: IIncomingHandler | None = None
        self._ready: Deferred[None] | None = None
        #: Per protocol, fires once that protocol's main mapping is learned (or failed to be).
        self._learned: dict[str, Deferred[None]] = {}
        self._discovery: Deferred[Any] | None = None
        #: The mapping probe (natbypass.stun.probe): the NAT's port step before discovery ends.
        self._probe: Deferred[Any] | None = None
        self._connections: set[IPeerConnection] = set()
        #: The live connection to each peer (the latest), which C{openStream} reuses.
        self._by_peer: dict[str, IPeerConnection] = {}
        #: Connections other peers opened to us, approved before anything was punched.
        self._approved: set[IPeerConnection] = set()
        #: C{openStream} connects under way, shared by concurrent callers.
        self._stream_connects: dict[tuple[str, str | None], list[Deferred[IPeerConnection]]] = {}
        #: Stream services by name (L{serve}).
        self._services: dict[str, Any] = {}
        #: Traversals under way (ours and those peers started), cancelled at stop.
        self._traversals: set[Deferred[IPeerConnection]] = set()
        self._warm_up: Any = None
        self._outcomes: Counter[tuple[str, str]] = Counter()
        self._attempt_results: Counter[tuple[str, str]] = Counter()
        self._handshakes: dict[str, tuple[int, float]] = {}
        #: The gateway's mappings of the main ports, by protocol (port mapping on).
        self.port_mappings: dict[str, PortMapping] = {}
        self.port_mapper: PortMapper | None = None
        self._mapped: Deferred[Any] | None = None
        self._mapped_wait: IDelayedCall | None = None
        #: What we last published at the mediator (L{_publish}).
        self._published: Description | None = None

    # ------------------------------------------------------------ service

    def startService(self) -> None:
        self._main = self._bind()
        self._host_refresh = LoopingCall(self.refreshHostAddresses)
        self._host_refresh.clock = self.clock
        self._host_refresh.start(self.config.host_refresh, now=True)
        if self.config.port_mapping:
            self._start_port_mapping()
        super().startService()
        self._learned = {
            "udp": defer.ensureDeferred(self._learn_one(self._main.udp, "UDP")),
            "tcp": defer.ensureDeferred(self._learn_one(self._main.tcp, "TCP")),
        }
        if self.config.stun6 is not None:  # IPv6 has no NAT to discover: its mappings only
            for name, port in (("udp6", self._main.udp6), ("tcp6", self._main.tcp6)):
                if port is not None:
                    self._learned[name] = defer.ensureDeferred(self._learn_ipv6(port, name.upper()))
        self._learned["udp"].addCallback(self._start_discovery)
        if self.config.discover:
            self._probe = defer.ensureDeferred(self._probe_mapping())
            self._probe.addErrback(
                lambda f: None if f.check(defer.CancelledError) else self.log.failure("mapping probe failed", f)
            )
        for learned in self._learned.values():
            learned.addCallback(lambda _: self._publish())
        self._ready = defer.ensureDeferred(self._learn())
        # The QUIC engine's one-off set-up (its first key share: tens of ms of
        # CPU that holds the GIL) runs once the first requests are out, while
        # the mediator's answers are on their way, not in the first punch.
        self._warm_up = self.clock.callLater(0, warm_up)

    async def _learn(self) -> None:
        """Wait for both mapped addresses (learned at once, in parallel) and log them."""
        await defer.gatherResults([_follow(d) for d in self._learned.values()] + [self._mappings_ready()])
        self.log.info(
            "peer {peer_id}: udp {udp} mapped to {udp_mapped}, tcp {tcp} mapped to {tcp_mapped}",
            peer_id=self.peer_id,
            udp=self.local_udp_address(),
            udp_mapped=self.udp_mapped,
            tcp=self.local_tcp_address(),
            tcp_mapped=self.tcp_mapped,
        )

    def _start_discovery(self, _: Any) -> None:
        if self.config.discover and self.udp_mapped is not None:
            self._discovery = self._discover()

    async def _probe_mapping(self) -> None:
        """
        Learn the mapping and a symmetric NAT's port step in two round trips
        (natbypass.stun.probe), so a connect made at start offers them; full
        discovery's result replaces this one when it comes.
        """
        cfg = self.config
        probe = await probe_from_fresh_socket(
            self.reactor, self.clock, self.stun_server, cfg.port_range, cfg.bind_host, cfg.stun_timeout
        )
        if probe is not None and self.behavior is None:
            self.nat = probe.summary()
            self._publish()

    def _bind(self) -> Ports:
        cfg = self.config
        udp = UDPSocket(self.reactor, self.clock, cfg.port_range, cfg.bind_host)
        try:
            ports = Ports(udp, TCPPort(self.reactor, self.clock, cfg.port_range, cfg.bind_host, self._reserve_tcp_port))
        except BaseException:
            udp.close()
            raise
        if cfg.ipv6:
            try:
                ports.udp6 = UDPSocket(self.reactor, self.clock, cfg.port_range, cfg.bind_host6)
                ports.tcp6 = TCPPort(self.reactor, self.clock, cfg.port_range, cfg.bind_host6, self._reserve_tcp_port)
            except (OSError, CannotListenError, candidates.CandidateError) as e:
                # No IPv6 here (or no free port): go on with IPv4 alone.
                self.log.warn("peer {peer_id}: no IPv6 ports ({error}); IPv4 only", peer_id=self.peer_id, error=e)
                if ports.udp6 is not None:
                    ports.udp6.close()
                ports.udp6 = ports.tcp6 = None
        return ports

    async def _learn_one(self, port: UDPSocket | TCPPort, what: str) -> None:
        try:
            self.stun_server = await resolve_address(self.reactor, self.stun_server)  # a name: its address
            await port.learn(self.stun_server, self.config.stun_timeout)
        except NETWORK_ERRORS as e:  # no answer: go on without; a bug fails the connects that wait for it
            self.log.warn("no {what} mapping from {server}: {error}", what=what, server=self.stun_server, error=e)

    async def _learn_ipv6(self, port: UDPSocket | TCPPort, what: str) -> None:
        """L{_learn_one} of an IPv6 port, from the IPv6 STUN server (C{PeerConfig.stun6})."""
        assert self.config.stun6 is not None
        try:
            await port.learn(self.config.stun6, self.config.stun_timeout)
        except NETWORK_ERRORS as e:  # IPv6 may well not work here: the peer goes on with IPv4
            self.log.warn("no {what} mapping from {server}: {error}", what=what, server=self.config.stun6, error=e)

    def _discover(self) -> Deferred[Any]:
        local = (route_source_address(self.stun_server), self.local_udp_address()[1])
        assert self._main is not None
        d = discovery.discover(self._main.udp.stun.client, self.stun_server, local, self.clock)

        def found(behavior: discovery.NATBehavior) -> None:
            self.behavior = behavior
            self.nat = behavior.summary()
            self.log.info(
                "peer {peer_id}: NAT is {nat_type} (mapping {mapping}, filtering {filtering})",
                peer_id=self.peer_id,
                nat_type=behavior.nat_type,
                mapping=behavior.mapping,
                filtering=behavior.filtering,
            )
            self._publish()

        d.addCallback(found)
        d.addErrback(lambda f: None if f.check(defer.CancelledError) else self.log.failure("discovery failed", f))
        return d

    def stopService(self) -> Deferred[None]:
        if self._warm_up is not None and self._warm_up.active():
            self._warm_up.cancel()
        if self._host_refresh is not None and self._host_refresh.running:
            self._host_refresh.stop()
        if self._discovery is not None:
            self._discovery.cancel()
        if self._probe is not None:
            self._probe.cancel()
        if self._mapped_wait is not None and self._mapped_wait.active():
            self._mapped_wait.cancel()
        for traversal in list(self._traversals):
            traversal.cancel()
        for answering in list(self._answering):
            answering.cancel()
        for port in list(self._services.values()):
            port.stopListening()
        # Connections close cleanly: a UDP path first delivers what its streams
        # wrote (QUIC drains, see QuicChannel.close), so the sockets stay open
        # until every path is closed, or CLOSE_WAIT has passed.
        closing = [conn.whenLost() for conn in list(self._connections)]
        for conn in list(self._connections):
            conn.close()
        for peer in list(self._answers):
            self._dropAnswer(peer)
        drained: Deferred[Any] = defer.DeferredList(closing, consumeErrors=True)
        drained.addTimeout(CLOSE_WAIT, self.clock)
        drained.addErrback(lambda f: f.trap(defer.TimeoutError))
        drained.addCallback(lambda _: super(Peer, self).stopService())
        if self._main is not None:
            main = self._main

            def release(result: Any) -> Any:
                return _close_ports(main)

            drained.addCallback(release)
        return drained

    @property
    def fingerprint(self) -> Fingerprint:
        """The fingerprint of this peer's identity key (what the mediator binds its id to)."""
        return self.identity.fingerprint

    def whenReady(self) -> Deferred[None]:
        """Fires once the mapped addresses are known and the mediator registration is up."""
        assert self._ready is not None, "start the service first"
        both = defer.gatherResults([_follow(self._ready), self.signaling.whenRegistered()], consumeErrors=True)
        # Fail with the first failure itself (an IdBound, a CancelledError when
        # the caller cancels or times out), not a FirstError wrapping it.
        both.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return both.addCallback(lambda _: None)

    def whenDiscovered(self) -> Deferred[None]:
        """Fires once background NAT discovery has finished (at once when it is not run)."""
        return _follow(self._discovery).addCallback(lambda _: None)

    def whenMappingKnown(self) -> Deferred[None]:
        """Fires once the mapping probe has finished (at once when discovery is off): C{nat} has the port step."""
        return _follow(self._probe).addBoth(lambda _: None)

    @property
    def traversals(self) -> int:
        """How many traversals (ours and those peers started) are under way."""
        return len(self._traversals)

    @property
    def stats(self) -> PeerStats:
        """A snapshot of this peer's paths, traversals and handshakes (read-only)."""
        open_paths = Counter(conn.protocol for conn in self._connections)
        return PeerStats(
            dict(open_paths),
            len(self._traversals),
            dict(self._outcomes),
            dict(self._attempt_results),
            dict(self._handshakes),
        )

    @property
    def udp_mapped(self) -> Address | None:
        """The public address of the main UDP socket, once learned."""
        return self._main.udp.mapped if self._main is not None else None

    @property
    def tcp_mapped(self) -> Address | None:
        """The public address of the main TCP port, once learned."""
        return self._main.tcp.mapped if self._main is not None else None

    def local_udp_address(self) -> Address:
        assert self._main is not None, "start the service first"
        return self._main.udp.local

    def local_tcp_address(self) -> Address:
        assert self._main is not None, "start the service first"
        return self._main.tcp.local

    # -------------------------------------------------------- candidates

    def description(self, wish: tuple[str, ...] | None = None, ports: Ports | None = None) -> Description:
        """
        Our candidates, NAT behaviour and wish, as offers and answers carry
        them; C{ports} are what the session will punch from (default: the
        peer's main ones).
        """
        ports = ports or self._main
        assert ports is not None, "start the service first"
        cands: list[Candidate] = []
        hosts = self.host_addresses if self.config.reveal_host_candidates else []
        # Dual stack: IPv6 addresses only with the IPv6 ports (none when those could not be bound).
        hosts6, hosts = families.split_hosts(hosts) if self.config.ipv6 else ([], hosts)
        cands += [Candidate("host", h, ports.udp.local[1]) for h in hosts]
        cands += self._mapping_candidates(ports, "udp")
        if ports.udp.mapped is not None:
            cands.append(Candidate("srflx", *ports.udp.mapped))
        cands += [Candidate("tcp-host", h, ports.tcp.local[1]) for h in hosts]
        cands += self._mapping_candidates(ports, "tcp")
        if ports.tcp.mapped is not None:
            cands.append(Candidate("tcp-srflx", *ports.tcp.mapped))
        cands += _ipv6_candidates(ports, hosts6[: families.MAX_HOSTS6])
        unique = {(c.protocol, c.host, c.port): c for c in reversed(cands)}
        return Description(tuple(reversed(unique.values())), self.nat, self.wish if wish is None else wish)

    # ------------------------------------------------------- port mapping

    def _start_port_mapping(self) -> None:
        """Ask the gateway for mappings of the main ports, in the background; deleted when the peer stops."""
        assert self._main is not None
        mapper = PortMapper(self.reactor, self.config.port_mapping_gateway, clock=self.clock)
        mapper.changed.append(self._mapping_changed)
        mapper.setServiceParent(self)  # stopped with the peer: its stopService deletes the mappings
        self.port_mapper = mapper
        wanted = {"udp": self._main.udp.local[1], "tcp": self._main.tcp.local[1]}
        asks = [
            mapper.map(protocol, port).addCallbacks(
                lambda m: self._mapping_changed(m.protocol, m),
                lambda f, p=protocol: self.log.warn(
                    "peer {peer_id}: no {protocol} port mapping: {error}",
                    peer_id=self.peer_id,
                    protocol=p,
                    error=f.value.reason if f.check(MappingError) else f.getErrorMessage(),
                ),
            )
            for protocol, port in wanted.items()
        ]
        self._mapped = defer.DeferredList(asks, consumeErrors=True)

    def _mapping_changed(self, protocol: str, mapping: PortMapping | None) -> None:
        if mapping is None:
            self.port_mappings.pop(protocol, None)
        else:
            self.port_mappings[protocol] = mapping
        self._publish()

    def publication(self) -> Description:
        """
        What we publish at the mediator: the main ports' mapped candidates
        (server-reflexive and port mappings; host addresses go only to
        peers we approved), our NAT summary and wish.  No candidates behind
        a NAT whose ports are predicted per session (they are not the main
        ports'), so such a peer is introduced in two round trips.
        """
        main = self._main
        cands: list[Candidate] = []
        if main is not None and self.nat.port_delta is None:
            for protocol, port in (("udp", main.udp), ("tcp", main.tcp)):
                cands += self._mapping_candidates(main, protocol)
                if port.mapped is not None:  # what STUN saw, even where it is our own (public) address
                    cands.append(Candidate("srflx" if protocol == "udp" else "tcp-srflx", *port.mapped))
            cands += _ipv6_candidates(main, [])
        unique = tuple({(c.protocol, c.host, c.port): c for c in cands if c.kind in PUBLISHABLE_KINDS}.values())
        return Description(unique[:MAX_PUBLISHED], self.nat, self.wish)

    def _publish(self) -> None:
        """Publish when what we would publish changed (the client sends it again on reconnection)."""
        if not self.config.publish_candidates or not self.running:
            return
        publication = self.publication()
        if publication != self._published:
            self._published = publication
            self.signaling.publish(publication)

    def _mappings_ready(self) -> Deferred[None]:
        """Fires when the first mappings are settled, or after L{PORTMAP_READY_WAIT} (they go on)."""
        ready: Deferred[None] = Deferred()
        if self._mapped is None:
            ready.callback(None)
            return ready
        self._mapped_wait = self.clock.callLater(PORTMAP_READY_WAIT, lambda: ready.called or ready.callback(None))

        def settled(_: Any) -> None:
            if self._mapped_wait is not None and self._mapped_wait.active():
                self._mapped_wait.cancel()
            if not ready.called:
                ready.callback(None)

        self._mapped.addBoth(settled)
        return ready

    def _mapping_candidates(self, ports: Ports, protocol: str) -> list[Candidate]:
        """The gateway's mapping of C{protocol} as a candidate, for the main ports only (the ones mapped)."""
        mapping = self.port_mappings.get(protocol)
        main = self._main
        if mapping is None or main is None or getattr(ports, protocol) is not getattr(main, protocol):
            return []
        return [Candidate(portmap_kind(protocol), *mapping.external)]

    def refreshHostAddresses(self) -> None:
        """
        Read the interface addresses again (C{getifaddrs}: one system call,
        no child process, so it does not hold up the reactor).  Done at start
        and every C{host_refresh} seconds, so offers never wait for it.
        """
        cfg = self.config
        wildcard = is_wildcard(cfg.bind_host)
        try:
            entries = candidates.read_interface_addresses()
            hosts = candidates.usable_addresses(
                entries, include_loopback=cfg.loopback_candidates, families=("inet", "inet6") if cfg.ipv6 else ("inet",)
            )
        except candidates.CandidateError as e:
            if wildcard:
                self.log.warn("no host candidates: {error}", error=e)
            entries, hosts = [], []
        own = hosts if wildcard else [cfg.bind_host]
        if cfg.ipv6 and not is_wildcard(cfg.bind_host6):
            own = [h for h in own if ":" not in h] + [cfg.bind_host6]
        self.host_addresses = own
        self.local_networks = LocalNetworks.of(
            entries, None if wildcard else cfg.bind_host, loopback=cfg.loopback_candidates
        )

    # ------------------------------------------------------------ connect

    refresh_host_addresses = deprecated_alias(refreshHostAddresses, "refresh_host_addresses")

    def connect(
        self, peer_id: str, protocol: str | Sequence[str] | None = None, fingerprint: Fingerprint | str | None = None
    ) -> Deferred[IPeerConnection]:
        """
        Open a secure direct path to C{peer_id}.

        The peer must prove the key C{fingerprint} (a pin); without one, the
        key on record in C{known_peers} (trust on first use), or else the key
        the mediator says C{peer_id} registered.
        """
        wish = self.wish if protocol is None else parse_wish(protocol)
        pin = Fingerprint.parse(fingerprint) if isinstance(fingerprint, str) else fingerprint
        return defer.ensureDeferred(self._connect(peer_id, wish, pin))

    async def _connect(self, peer_id: str, wish: tuple[str, ...], pin: Fingerprint | None = None) -> IPeerConnection:
        # Only the mappings of the protocols we may use: a UDP-only connect
        # does not wait for STUN over TCP (two round trips).  The mapping
        # probe (two round trips, from start) tells whether our NAT needs
        # fresh, predicted ports, which the peer must know from our offer.
        wanted = wish or selection.PROTOCOLS
        learned = [_follow(d) for p, d in self._learned.items() if p.rstrip("6") in wanted]
        await defer.gatherResults([*learned, self.whenMappingKnown()])
        offered = self.nat
        try:
            return await self._introduce(peer_id, wish, pin)
        except race.AllAttemptsFailed:
            # A first connect does not wait for the filtering tests; if what
            # discovery then found could change the plan (a predictable
            # symmetric NAT's port step, say), ask once more with it.
            await self.whenDiscovered()
            if self.nat == offered:
                raise
            self.log.info(
                "retrying {peer} now that discovery found mapping {mapping}, filtering {filtering}",
                peer=peer_id,
                mapping=self.nat.mapping,
                filtering=self.nat.filtering,
            )
            return await self._introduce(peer_id, wish, pin)

    async def _introduce(self, peer_id: str, wish: tuple[str, ...], pin: Fingerprint | None) -> IPeerConnection:
        ports = await self._session_ports(wish)
        try:
            session = await self.signaling.connect(peer_id, self.description(wish, ports))
        except BaseException:
            self._release(ports)
            raise
        verify, first_use = self._outgoing_check(session, pin)
        # Introduced in one round trip, the target may still refuse us: then
        # the attempt stops and the connect fails with its reason.
        revoked = self.signaling.whenRevoked(session.id)
        attempt = defer.ensureDeferred(self._traverse(session, wish, ports, verify))
        why: list[Exception] = []
        revoked.addCallback(lambda err: (why.append(err), attempt.cancel()))
        revoked.addErrback(lambda f: f.trap(defer.CancelledError))
        try:
            conn = await attempt
        except BaseException:
            if why:
                raise why[0] from None
            raise
        finally:
            revoked.cancel()
        if first_use and self.known_peers is not None:
            self.known_peers.record(peer_id, conn.peer_fingerprint)
            self.log.info(
                "first contact with {peer}: recorded its key {fingerprint} in {path}",
                peer=peer_id,
                fingerprint=str(conn.peer_fingerprint),
                path=self.known_peers.path,
            )
        return conn

    def _outgoing_check(self, session: Session, pin: Fingerprint | None) -> tuple[PeerCheck, bool]:
        """
        What the peer we connect to must prove: our pin, else the key on
        record for it, else the key the mediator says it registered.  The
        second value says whether a success is a first contact to record.
        """
        if pin is not None:
            return pinned(pin), False
        if self.known_peers is not None:
            known = self.known_peers

            def check(presented: Fingerprint) -> None:
                known.check(session.peer, presented)

            return check, known.get(session.peer) is None
        return pinned(_claimed(session.description, session.peer)), False

    async def _session_ports(self, wish: tuple[str, ...]) -> Ports:
        """
        The ports a new session punches from.  Behind a symmetric NAT that
        hands out ports in sequence, fresh ones whose mappings are learned
        right now: the port the NAT gives the flow to the peer is then the
        next in sequence, which the peer predicts (the long-lived ports'
        mappings are stale after their earlier flows).  Such a NAT counts
        every new flow, so only the protocols of C{wish} get fresh ports,
        one after the other, the preferred one last: its next flow is then
        exactly the predicted one.
        """
        main = self._main
        assert main is not None
        if self.nat.port_delta is None:
            return main
        cfg = self.config
        ports = Ports(main.udp, main.tcp, main.udp6, main.tcp6)  # no NAT66: IPv6 keeps the main ports
        try:
            for protocol in reversed(wish or ("udp", "tcp")):
                if protocol == "tcp":
                    ports.tcp = TCPPort(self.reactor, self.clock, cfg.port_range, cfg.bind_host, self._reserve_tcp_port)
                    await self._learn_one(ports.tcp, "TCP")
                else:
                    ports.udp = UDPSocket(self.reactor, self.clock, cfg.port_range, cfg.bind_host)
                    await self._learn_one(ports.udp, "UDP")
        except BaseException:
            # Cancelled (a withdrawn offer, a cancelled connect, stop) or failed: close what we bound.
            self._release(ports)
            raise
        return ports

    def _release(self, ports: Ports, keep_udp: bool = False) -> None:
        """Close a session's own ports (never the main ones)."""
        assert self._main is not None
        if ports.tcp is not self._main.tcp:
            ports.tcp.close()
        if ports.udp is not self._main.udp and not keep_udp:
            ports.udp.close()

    def listen(self, handler: IIncomingHandler) -> None:
        self._handler = handler

    # ------------------------------------------------------------ streams

    def _adopt(self, conn: IPeerConnection) -> None:
        """A new path: count it, name our end of its streams, serve its streams, reuse it for C{openStream}."""
        self._connections.add(conn)
        conn.local_id = self.peer_id  # type: ignore[attr-defined]
        conn.local_fingerprint = self.fingerprint  # type: ignore[attr-defined]
        conn.setStreamHandler(_PeerServices(self))
        self._by_peer[conn.peer_id] = conn

        def gone(_: Any) -> None:
            self._connections.discard(conn)
            self._approved.discard(conn)
            if self._by_peer.get(conn.peer_id) is conn:
                del self._by_peer[conn.peer_id]

        conn.whenLost().addBoth(gone)

    def connectionTo(self, peer_id: str) -> IPeerConnection | None:
        """The live connection to C{peer_id} that C{openStream} would use, if any."""
        return self._by_peer.get(peer_id)

    def reconnect(
        self, peer_id: str, protocol: str | Sequence[str] | None = None, fingerprint: Fingerprint | str | None = None
    ) -> Deferred[IPeerConnection]:
        """
        A fresh path to C{peer_id}, as after its loss (see docs/streams.md,
        "Path migration"): the live connection, if any, is closed first; the
        peer must prove C{fingerprint}, by default the key the old connection
        proved (else as L{connect}).
        """
        old = self._by_peer.get(peer_id)
        if old is not None:
            if fingerprint is None:
                fingerprint = old.peer_fingerprint
            old.close()
        return self.connect(peer_id, protocol, fingerprint)

    def serve(self, service: str, factory: Any) -> ServicePort:
        frames.valid_service(service)
        if service in self._services:
            raise CannotListenError(None, service, ValueError(f"the service {service!r} is already served"))
        port = ServicePort(self, service, factory)
        self._services[service] = port
        factory.doStart()
        return port

    @property
    def served(self) -> list[str]:
        """The names of the services served now (L{serve}), sorted."""
        return sorted(self._services)

    def _unserve(self, port: ServicePort) -> None:
        if self._services.get(port.service) is port:
            del self._services[port.service]
            port.factory.doStop()

    def openStream(
        self,
        peer_id: str,
        service: str,
        factory: Any,
        protocol: str | Sequence[str] | None = None,
        fingerprint: Fingerprint | str | None = None,
    ) -> Deferred[Any]:
        frames.valid_service(service)
        pin = Fingerprint.parse(fingerprint) if isinstance(fingerprint, str) else fingerprint
        return defer.ensureDeferred(self._openStream(peer_id, service, factory, protocol, pin))

    async def _openStream(
        self,
        peer_id: str,
        service: str,
        factory: Any,
        protocol: str | Sequence[str] | None,
        pin: Fingerprint | None,
    ) -> Any:
        conn = self._by_peer.get(peer_id)
        if conn is None or (pin is not None and conn.peer_fingerprint != pin):
            key = (peer_id, None if pin is None else str(pin))
            # Every caller waits on a Deferred of its own; the shared connect's
            # result is handed to them all and consumed (never left unhandled).
            waiter: Deferred[IPeerConnection] = Deferred()
            waiters = self._stream_connects.get(key)
            if waiters is not None:
                waiters.append(waiter)
            else:
                waiters = self._stream_connects[key] = [waiter]

                def done(result: Any, key: tuple[str, str | None] = key, waiters: list = waiters) -> None:
                    self._stream_connects.pop(key, None)
                    for each in waiters:
                        if not each.called:  # a caller may have cancelled its own wait
                            (each.errback if isinstance(result, Failure) else each.callback)(result)

                self.connect(peer_id, protocol, pin).addBoth(done)
            conn = await waiter
        return await conn.openStream(service, factory)

    def streamRequested(self, connection: IPeerConnection, address: Any) -> Any:
        """Which protocol serves a stream a peer opened (see L{_PeerServices})."""
        port = self._services.get(address.service)
        if port is None:
            raise StreamRefused(f"{self.peer_id} has no service {address.service!r}")
        if connection not in self._approved:
            # A path we opened: the peer was not approved as a caller; it must pass now.
            fingerprint = connection.peer_fingerprint
            approver = IPeerApprover(self._handler, None)
            if approver is not None:
                approved = approver.approvePeer(connection.peer_id, fingerprint)
                if not isinstance(approved, bool):
                    approved = False  # a decision that waits cannot gate a stream: ask at connect time
            elif self.allow is not None:
                approved = self.allow.allows(connection.peer_id, fingerprint)
            else:
                approved = True
            if not approved:
                raise StreamRefused(f"{connection.peer_id} (key {fingerprint}) may not open streams to {self.peer_id}")
        protocol = port.factory.buildProtocol(address)
        if protocol is None:
            raise StreamRefused(f"the service {address.service!r} refused the stream")
        return protocol

    def _offered(self, offer: IncomingOffer) -> Deferred[Description]:
        if self._handler is None and not self._services:
            raise Decline(f"{self.peer_id} accepts no connections")
        if offer.session is not None:
            d = defer.ensureDeferred(self._introduced(offer, offer.session, self.clock.seconds()))
        else:
            d = defer.ensureDeferred(self._answer(offer))
        self._answering.add(d)
        d.addBoth(lambda result: (self._answering.discard(d), result)[1])
        return d

    async def _approve(self, offer: IncomingOffer) -> Fingerprint:
        """
        Ask the application (an L{IPeerApprover} handler) or the allow list
        whether the offering peer may connect, before anything is punched.
        """
        try:
            fingerprint = _claimed(offer.description, offer.peer)
        except PeerRejected as e:
            raise Decline(str(e)) from None
        approver = IPeerApprover(self._handler, None)
        if approver is not None:
            approved = await defer.maybeDeferred(approver.approvePeer, offer.peer, fingerprint)
            why = f"{self.peer_id}'s application refused {offer.peer} (key {fingerprint})"
        elif self.allow is not None:
            approved = self.allow.allows(offer.peer, fingerprint)
            why = f"{offer.peer} with key {fingerprint} is not in {self.peer_id}'s allow list"
        else:
            approved = True
        if not approved:
            self.log.info("refused {peer} (key {fingerprint})", peer=offer.peer, fingerprint=str(fingerprint))
            raise Decline(why)
        return fingerprint

    async def _answer(self, offer: IncomingOffer) -> Description:
        answer = _Answer(await self._approve(offer))
        # A newer offer from the same peer replaces an older one (sessions name only the peer).
        self._dropAnswer(offer.peer)
        self._answers[offer.peer] = answer
        try:
            # Unlike a connect, an answer waits for discovery when it is still
            # running (only in the peer's first seconds): the offering side may
            # need our NAT's port step to predict where our probes come from.
            await _follow(self._ready)
            await self.whenDiscovered()
            answer.ports = await self._session_ports(offer.description.wish or self.wish)
        except BaseException:
            # Withdrawn (the offerer left, the offer expired), our mediator
            # connection lost, or stopped: nothing of it may stay open.
            self._dropAnswer(offer.peer, answer)
            raise
        if self._answers.get(offer.peer) is not answer:  # replaced meanwhile
            self._release(answer.ports)
            raise Decline(f"a newer offer from {offer.peer} replaced this one")
        # The session comes back one round trip after our accept, or never (the
        # accept failed, the mediator went away): then the ports close.
        answer.expiry = self.clock.callLater(ANSWER_HOLD, self._dropAnswer, offer.peer, answer)
        return self.description(ports=answer.ports)

    async def _introduced(self, offer: IncomingOffer, session: Session, received: float) -> Description:
        """
        An introduction in one round trip: the initiator has its session
        already, but nothing of ours moves until the application approved
        it (a refusal is our C{reject}, which revokes the initiator's
        session).  Then we punch from the main ports, whose mappings we
        published, and say yes (with no description: host candidates are
        not sent after the fact).
        """
        approved = await self._approve(offer)
        main = self._main
        if main is None:
            raise Decline(f"{self.peer_id} is stopping")
        late = round((self.clock.seconds() - received) * 1000)
        if late:  # approval took a while: the common start time is sooner now
            session = dataclasses.replace(session, start_in_ms=max(0, session.start_in_ms - late))
        self._incoming(session, self._traverse(session, self.wish, main, pinned(approved)))
        return Description()

    def _dropAnswer(self, peer: str, answer: _Answer | None = None) -> None:
        """Forget the answered offer of C{peer} (only if it is still C{answer}) and close its ports."""
        current = self._answers.get(peer)
        if current is None or (answer is not None and current is not answer):
            return
        del self._answers[peer]
        if current.expiry is not None and current.expiry.active():
            current.expiry.cancel()
        if current.ports is not None:
            self._release(current.ports)

    def _accepted_session(self, session: Session) -> None:
        answer = self._answers.pop(session.peer, None)
        if answer is None or answer.ports is None:
            self.log.warn(
                "session {session} from {peer}, which we never approved", session=session.id, peer=session.peer
            )
            if answer is not None:
                self._answers[session.peer] = answer  # still being answered: not this session's
            return
        if answer.expiry is not None and answer.expiry.active():
            answer.expiry.cancel()
        ports, approved = answer.ports, answer.fingerprint
        # The key we approved is the one the peer must prove.
        self._incoming(session, self._traverse(session, self.wish, ports, pinned(approved)))

    def _incoming(self, session: Session, traversal: Any) -> None:
        """Hand the path a peer we approved opens to the handler, or log why it failed."""
        d = defer.ensureDeferred(traversal)

        def arrived(conn: IPeerConnection) -> None:
            self._approved.add(conn)
            if self._handler is not None:
                self._handler.connectionArrived(conn)

        d.addCallbacks(
            arrived,
            lambda f: self.log.warn(
                "incoming session {session} from {peer} failed: {reason}",
                session=session.id,
                peer=session.peer,
                reason=f.getErrorMessage(),
            ),
        )

    async def _traverse(
        self, session: Session, wish: tuple[str, ...], ports: Ports, verify: PeerCheck
    ) -> IPeerConnection:
        """
        Run the attempts in the mediator's order and report the outcome to
        it.  A session's own ports are closed once the race is over, except
        the UDP socket of a UDP path, which closes with the path (a TCP path
        is an adopted socket of its own).
        """
        attempt = defer.ensureDeferred(self._race(session, wish, ports, ChannelSecurity(self.identity, verify)))
        self._traversals.add(attempt)
        attempt.addBoth(lambda result: (self._traversals.discard(attempt), result)[1])
        try:
            conn = await attempt
        except BaseException:
            self._release(ports)
            raise
        udp_path = conn.protocol == "udp"
        self._release(ports, keep_udp=udp_path)
        if self.config.repunch and udp_path and ports.udp is not None and conn.local_address.port == ports.udp.local[1]:
            self._repunchable(conn, session, ports.udp)
        if udp_path and self._main is not None and ports.udp is not self._main.udp:
            conn.whenLost().addBoth(lambda _: ports.udp.close())
        return conn

    def _repunchable(self, conn: IPeerConnection, session: Session, udp: UDPSocket) -> None:
        """Let a UDP path ask the mediator for a re-punch when it falls silent (docs/streams.md)."""
        # Our STUN address is what the peer sees only when our NAT maps independently of the destination.
        dependent = self.nat.mapping in ("address-dependent", "address-and-port-dependent")

        async def learn() -> Address | None:
            return None if dependent else await udp.learn(self.stun_server, self.config.stun_timeout)

        psession = PunchSession(session.id, session.key, 0 if session.controlling else 1, session.peer)
        learned = lambda: defer.ensureDeferred(learn())  # noqa: E731
        repunch.attach(
            conn, psession, self.repunchers, self.clock, learned, self.signaling.repunch, udp.punch.sendTo,
            lambda host: candidates.refusal(host, self._screening_networks()),
        )  # fmt: skip

    def _repunch_noticed(self, notice: Any) -> None:
        c = notice.candidate
        self.repunchers.noticed(notice.session, None if c is None else (c.host, c.port))

    async def _race(
        self, session: Session, wish: tuple[str, ...], ports: Ports, security: ChannelSecurity
    ) -> IPeerConnection:
        attempts = self._attempts(session, ports, security)
        order = [p for p in session.order if p in attempts and (not wish or p in wish)]
        outcome = race.Outcome()
        if not order:
            reason = (
                f"no protocol to try: the mediator's order is {list(session.order)}, candidates for {sorted(attempts)}"
            )
            self._report(session, "failed", None, reason)
            raise race.AllAttemptsFailed(outcome) from ValueError(reason)
        try:
            conn = await race.race([(p, attempts[p]) for p in order], self.clock, self.config.head_start, outcome)
        except Exception as e:
            self._attempt_results.update((a.protocol, a.result) for a in outcome.attempts)
            self._report(session, "failed", None, str(e))
            raise
        self._attempt_results.update((a.protocol, a.result) for a in outcome.attempts)
        count, total = self._handshakes.get(conn.protocol, (0, 0.0))
        self._handshakes[conn.protocol] = (count + 1, total + (conn.handshake_ms or 0.0) / 1000)
        self._adopt(conn)
        conn.outcome = outcome
        self._report(session, "connected", conn.protocol, outcome.describe())
        return conn

    def _attempts(
        self, session: Session, ports: Ports, security: ChannelSecurity
    ) -> dict[str, Callable[[], Deferred[IPeerConnection]]]:
        """One attempt factory per protocol the peer gave us candidates for."""
        start_delay = session.start_in_ms / 1000.0
        psession = PunchSession(session.id, session.key, 0 if session.controlling else 1, session.peer)
        remote = session.description
        delta = remote.nat.port_delta

        refused: list[str] = []
        over_cap = 0
        local = self._screening_networks()
        srflx_kept: dict[str, list[Address]] = {}

        def targets(protocol: str) -> tuple[list[Address], list[Address]]:
            """The peer's (IPv6, IPv4) addresses for C{protocol}, screened and in probing order."""
            nonlocal over_cap
            srflx = [
                (c.host, c.port)
                for c in remote.candidates
                if c.protocol == protocol and c.kind.endswith(("srflx", "portmap"))
            ]
            hosts = [(c.host, c.port) for c in remote.candidates if c.protocol == protocol and c.kind.endswith("host")]
            kept = candidates.screen(srflx, hosts, local)
            srflx_kept[protocol] = list(kept.srflx)
            refused.extend(f"{protocol} {host!a} port {port}: {why}" for (host, port), why in kept.refused)
            over_cap += kept.over_cap
            (srflx6, srflx4), (hosts6, hosts4) = families.split(kept.srflx), families.split(kept.hosts)
            return (
                candidates.remote_addresses(srflx6, hosts6),  # IPv6 is not translated: no ports to predict
                candidates.remote_addresses(
                    srflx4, hosts4, predict_delta=delta, max_predicted=candidates.MAX_PREDICTED
                ),
            )

        (udp6, udp4), (tcp6, tcp4) = targets("udp"), targets("tcp")
        if refused or over_cap:
            # Once per session, whatever the peer (or the mediator) listed.
            self.log.warn(
                "{peer_id}'s candidates: refused {refused_count} ({refused}); left out {over_cap} beyond "
                "{limit} per protocol",
                peer_id=ascii(session.peer),
                refused_count=len(refused),
                refused="; ".join(refused) or "none",
                over_cap=over_cap,
                limit=candidates.MAX_CANDIDATES_PER_PROTOCOL,
            )

        def tcp_(port: TCPPort | None, to: list[Address]) -> families.DelayedAttempt | None:
            if port is None or port.socket is None or not to:
                return None
            return lambda delay: tcp.punch_tcp(
                self.reactor,
                psession,
                port.local,
                to,
                start_delay=delay,
                window=self.config.punch_timeout,
                listener=port.socket,
                keepalive_interval=self.config.keepalive_interval,
                security=security,
                pace=self.pace,
            )

        # Per protocol, IPv6 first and IPv4 after the family head start (happy eyeballs, RFC 8305).
        # Birthday punching is IPv4's (a NAT's); IPv6 is not translated.
        srflx4 = families.split(srflx_kept["udp"])[1]
        v6 = {
            "udp": self._udp_attempt(ports.udp6, udp6, None, remote, psession, security),
            "tcp": tcp_(ports.tcp6, tcp6),
        }
        v4 = {
            "udp": self._udp_attempt(ports.udp, udp4, srflx4, remote, psession, security),
            "tcp": tcp_(ports.tcp, tcp4),
        }
        clock, head_start = self.clock, self.config.family_head_start
        attempts: dict[str, Callable[[], Deferred[IPeerConnection]]] = {}
        for protocol in ("udp", "tcp"):
            attempt = families.family_attempt(protocol, v6[protocol], v4[protocol], clock, head_start, start_delay)
            if attempt is None:
                continue
            row = selection.feasibility(self.nat, remote.nat, protocol)
            if row.fail_fast and v6[protocol] is None and not self._port_mapped(protocol, remote):
                # No punch can work on this pair (and no IPv6 to try): fail at once with the table's reason.
                attempt = lambda p=protocol, why=row.reason: defer.fail(PunchFailed(p, why))  # noqa: E731
            attempts[protocol] = attempt
        return attempts

    def _port_mapped(self, protocol: str, remote: Description) -> bool:
        """Does either side have a port mapping for C{protocol} (a full-cone address: no guessing needed)?"""
        return protocol in self.port_mappings or any(
            c.protocol == protocol and c.kind.endswith("portmap") for c in remote.candidates
        )

    def _udp_attempt(
        self,
        sock: UDPSocket | None,
        targets: list[Address],
        srflx: list[Address] | None,
        remote: Description,
        psession: PunchSession,
        security: ChannelSecurity,
    ) -> families.DelayedAttempt | None:
        """
        The UDP attempt from C{sock} to C{targets}: a plain punch, or (IPv4,
        C{srflx} given) our part of a birthday punch (docs/traversal.md).
        """
        if sock is None or not targets:
            return None
        cfg = self.config
        schedule = ProbeSchedule(timeout=cfg.punch_timeout)
        part = selection.feasibility(self.nat, remote.nat, "udp").birthday if srflx is not None else None
        # A host without NAT (a stateful firewall) lists no srflx apart from its host address.
        aim = srflx or targets[:1]
        if part is None or not self._birthday_config.enabled or self._port_mapped("udp", remote):
            return lambda delay: punch_udp(
                sock.punch,
                psession,
                targets,
                self.clock,
                start_delay=delay,
                schedule=schedule,
                keepalive_interval=cfg.keepalive_interval,
                liveness_timeout=cfg.liveness_timeout,
                security=security,
                budget=ProbeBudget(self.clock, self.pace),
            )

        def start(delay: float) -> Deferred[Any]:
            quic = QuicSetup.make(security, self.clock, cfg.keepalive_interval, cfg.liveness_timeout)
            budget = ProbeBudget(self.clock, self.pace)
            if part == "probe":
                return birthday.punch_birthday_probe(
                    sock.punch, psession, targets, self.clock, aim[0][0], quic,
                    start_delay=delay, schedule=schedule, config=self._birthday_config, budget=budget,
                )  # fmt: skip
            return birthday.punch_birthday_open(
                self.reactor, self.clock, sock.punch, psession, targets, aim[0], quic,
                start_delay=delay, schedule=schedule, config=self._birthday_config,
                bind_host=cfg.bind_host, port_range=cfg.port_range, budget=budget,
            )  # fmt: skip

        self.log.info(
            "birthday punch with {peer}: we {what}",
            peer=psession.peer_id,
            what="probe random ports of its IP" if part == "probe" else "open extra sockets towards its address",
        )
        return lambda delay: self.birthday.run(lambda: start(delay))

    def _screening_networks(self) -> LocalNetworks:
        """
        What screens the peers' candidates: our interfaces' networks, and
        loopback when configured, bound there, or when the STUN server saw
        us at a loopback address (the mediator runs on this machine).
        """
        local = self.local_networks
        mapped = [a for a in (self.udp_mapped, self.tcp_mapped) if a is not None]
        if not local.loopback and any(_is_loopback(host) for host, _ in mapped):
            local = dataclasses.replace(local, loopback=True)
        return local

    def _report(self, session: Session, outcome: str, protocol: str | None, detail: str | None) -> None:
        self._outcomes[(outcome, protocol or "")] += 1
        d = self.signaling.report(session.id, outcome, protocol, (detail or "")[:500] or None)
        d.addErrback(lambda f: self.log.debug("report to the mediator failed: {f.value}", f=f))


def _close_ports(ports: Ports) -> Deferred[Any]:
    """Close every socket of C{ports}; fires when the UDP ones are closed."""
    for port in (ports.tcp, ports.tcp6):
        if port is not None:
            port.close()
    return defer.gatherResults([u.close() for u in (ports.udp, ports.udp6) if u is not None])


def _ipv6_candidates(ports: Ports, hosts6: Sequence[str]) -> list[Candidate]:
    """
    The candidates of the IPv6 ports: C{hosts6} (our IPv6 interface
    addresses) and what the IPv6 STUN server saw (the same address where
    there is no NAT66, but it proves the address is reachable from outside).
    """
    out: list[Candidate] = []
    for port, host_kind, srflx_kind in ((ports.udp6, "host", "srflx"), (ports.tcp6, "tcp-host", "tcp-srflx")):
        if port is None:
            continue
        out += [Candidate(host_kind, h, port.local[1]) for h in hosts6]
        if port.mapped is not None:
            out.append(Candidate(srflx_kind, *port.mapped))
    return out


def _claimed(description: Description, peer_id: str) -> Fingerprint:
    """The fingerprint the mediator says C{peer_id} registered (it overwrites what peers declare)."""
    if description.fingerprint is None:
        raise PeerRejected(f"the mediator gave no key for {peer_id}: nothing to check its identity against")
    try:
        return Fingerprint.parse(description.fingerprint)
    except FingerprintError as e:
        raise PeerRejected(f"the mediator gave a malformed key for {peer_id}: {e}") from None


def _is_loopback(host: str) -> bool:
    """Whether C{host} is a loopback address (False for anything else, a name included)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _follow(d: Deferred[Any] | None) -> Deferred[Any]:
    """A new Deferred with C{d}'s result, leaving C{d}'s own chain untouched."""
    out: Deferred[Any] = Deferred()
    if d is None:
        out.callback(None)
        return out

    def passthrough(result: Any) -> Any:
        (out.errback if isinstance(result, Failure) else out.callback)(result)
        return result

    d.addBoth(passthrough)
    return out


@implementer(IStreamHandler)
class _PeerServices:
    """Each connection's stream handler: the peer's services."""

    def __init__(self, peer: Peer) -> None:
        self._peer = peer

    def streamRequested(self, connection: IPeerConnection, address: Any) -> Any:
        return self._peer.streamRequested(connection, address)


@implementer(IListeningPort)
class ServicePort:
    """What L{Peer.serve} returns: C{stopListening} stops serving the service."""

    def __init__(self, peer: Peer, service: str, factory: Any) -> None:
        self.peer = peer
        self.service = service
        self.factory = factory

    def startListening(self) -> None:
        """Already serving (L{Peer.serve} started it)."""

    def stopListening(self) -> Deferred[None]:
        self.peer._unserve(self)
        return defer.succeed(None)

    def getHost(self) -> PeerAddress:
        return PeerAddress(self.peer.peer_id, self.peer.fingerprint, self.service, "natbypass", None, 0)

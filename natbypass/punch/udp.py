"""
UDP hole punching: a pure state machine, its driver, and the connection it makes.

L{UDPPunchMachine} holds all decisions and no I/O: it is told the time
and the packets that arrived, and answers with actions (send these bytes
there; the path is chosen; give up because ...).  L{UDPPunchAttempt}
runs it on a L{natbypass.punch.mux.PunchEndpoint} with an injected
clock, and on success hands the socket's session to a
L{UDPPeerConnection}, which carries DATA frames, answers late probes,
sends keepalives and notices a dead path.

Why a peer-reflexive address is safe to accept: a PROBE from an address we did
not know (the peer's NAT picked a new port, as symmetric NATs do) is only
answered when its MAC verifies with the session key, which only the two peers
have; and an address is only *selected* when an ACK from that very address
echoes a nonce we sent there, so the peer must both receive at and send from
it.  A third host can replay what it sniffed, but a replayed PROBE only earns
its sender an ACK that echoes a nonce it already knows, and a replayed ACK
arrives from the attacker's address, not from the one the echoed probe went
to, so it selects nothing.  An on-path attacker could always relay (or drop)
the traffic anyway; confidentiality is left to the layer above.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.address import format_address
from natbypass.interfaces import IPeerConnection
from natbypass.punch.connection import PathConnection
from natbypass.punch.mux import Address, PunchEndpoint
from natbypass.punch.packet import MAX_PAYLOAD, PacketType, PunchPacket, encode, verify
from natbypass.punch.session import PunchFailed, PunchSession

NonceSource = Callable[[], int]


def random_nonce() -> int:
    """A fresh 64-bit nonce from the OS's CSPRNG."""
    return int.from_bytes(os.urandom(8), "big")


@dataclass(frozen=True)
class ProbeSchedule:
    """
    When probes go out: every C{fast_interval} for C{fast_period} (most paths
    open in one or two round trips), then backing off by C{backoff} up to
    C{max_interval}, until C{timeout} after the start.
    """

    fast_interval: float = 0.02
    fast_period: float = 0.2
    backoff: float = 1.5
    max_interval: float = 0.5
    timeout: float = 5.0

    def next_interval(self, elapsed: float, last: float | None) -> float:
        """The wait before the next round, C{elapsed} seconds after the start."""
        if elapsed < self.fast_period or last is None:
            return self.fast_interval
        return min(max(last, self.fast_interval) * self.backoff, self.max_interval)


@dataclass(frozen=True)
class Send:
    """Action: send C{data} to C{address}."""

    address: Address
    data: bytes


@dataclass(frozen=True)
class Selected:
    """Action: the path to C{address} is verified both ways."""

    address: Address
    rtt: float


@dataclass(frozen=True)
class Failed:
    """Action: the attempt is over without a path."""

    reason: str


Action = Send | Selected | Failed


@dataclass
class PunchStats:
    """What an attempt did, for its outcome and its failure reason."""

    probes_sent: int = 0
    acks_sent: int = 0
    verified_probes: int = 0
    #: Packets of our session that failed the MAC or carried our own role.
    invalid: int = 0
    #: Verified ACKs that echoed no probe we sent to their source.
    stray_acks: int = 0


class PunchState(enum.StrEnum):
    """Where a L{UDPPunchMachine} is: before the start time, probing, or finished."""

    WAITING = "waiting"
    PUNCHING = "punching"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class UDPPunchMachine:
    """
    The punching logic for one session, clock-injected and I/O-free.

    Feed it L{poll} at L{next_wakeup} and every packet of the session
    through L{packet_received}; carry out the actions it returns.
    """

    def __init__(
        self,
        session: PunchSession,
        candidates: Iterable[Address],
        start_at: float,
        schedule: ProbeSchedule = ProbeSchedule(),
        nonce_source: NonceSource = random_nonce,
        max_early_data: int = 16,
    ) -> None:
        self._session = session
        self._candidates: list[Address] = list(dict.fromkeys(candidates))
        self._known = set(self._candidates)
        self._start_at = start_at
        self._schedule = schedule
        self._nonce = nonce_source
        self._sent: dict[int, tuple[Address, float]] = {}
        self._next_round = start_at
        self._last_interval: float | None = None
        self._max_early = max_early_data
        self.state = PunchState.WAITING
        self.stats = PunchStats()
        #: Verified DATA payloads that arrived before the path was chosen here
        #: (the peer chose first); the connection delivers them.
        self.early_data: list[bytes] = []
        self.prflx: list[Address] = []

    @property
    def candidates(self) -> Sequence[Address]:
        return tuple(self._candidates)

    @property
    def deadline(self) -> float:
        return self._start_at + self._schedule.timeout

    @property
    def done(self) -> bool:
        return self.state in (PunchState.SUCCEEDED, PunchState.FAILED)

    def next_wakeup(self) -> float | None:
        """When L{poll} must next run, or None when finished."""
        if self.done:
            return None
        return min(self._next_round, self.deadline)

    def _packet(self, type_: PacketType, nonce: int, echo: int = 0) -> bytes:
        s = self._session
        return encode(type_, s.role, s.sid, nonce, s.key, echo=echo)

    def _probe(self, now: float, address: Address) -> Send:
        nonce = self._nonce()
        self._sent[nonce] = (address, now)
        self.stats.probes_sent += 1
        return Send(address, self._packet(PacketType.PROBE, nonce))

    def poll(self, now: float) -> list[Action]:
        """Run whatever is due at C{now}."""
        if self.done:
            return []
        if now >= self.deadline:
            self.state = PunchState.FAILED
            return [Failed(self._failure_reason())]
        if now < self._next_round:
            return []
        self.state = PunchState.PUNCHING
        actions: list[Action] = [self._probe(now, a) for a in self._candidates]
        self._last_interval = self._schedule.next_interval(now - self._start_at, self._last_interval)
        self._next_round = now + self._last_interval
        return actions

    def packet_received(self, now: float, packet: PunchPacket, source: Address) -> list[Action]:
        """Handle one packet of our session from C{source}."""
        if self.done:
            return []
        s = self._session
        if packet.role != s.peer_role or not verify(packet, s.key):
            self.stats.invalid += 1
            return []
        if packet.type == PacketType.PROBE:
            return self._on_probe(now, packet, source)
        if packet.type == PacketType.ACK:
            return self._on_ack(now, packet, source)
        if packet.type == PacketType.DATA and len(self.early_data) < self._max_early:
            self.early_data.append(packet.payload)
        return []

    def _on_probe(self, now: float, packet: PunchPacket, source: Address) -> list[Action]:
        self.stats.verified_probes += 1
        self.stats.acks_sent += 1
        actions: list[Action] = [Send(source, self._packet(PacketType.ACK, self._nonce(), echo=packet.nonce))]
        if self.state is PunchState.WAITING:
            # The peer started first (clock skew): start now, not at start_at.
            self._next_round = now
        if source not in self._known:
            # Peer-reflexive: the address its NAT gave this flow.  Safe
            # because the MAC verified; see the module docstring.
            self._known.add(source)
            self._candidates.append(source)
            self.prflx.append(source)
            actions.append(self._probe(now, source))
        return actions + self.poll(now)

    def _on_ack(self, now: float, packet: PunchPacket, source: Address) -> list[Action]:
        sent = self._sent.get(packet.echo)
        if sent is None or sent[0] != source:
            self.stats.stray_acks += 1
            return []
        self.state = PunchState.SUCCEEDED
        return [Selected(source, now - sent[1])]

    def _failure_reason(self) -> str:
        st = self.stats
        tried = ", ".join(format_address(a) for a in self._candidates) or "none"
        if st.verified_probes:
            why = (
                f"the peer's probes reached us ({st.verified_probes}) but none of our "
                "answers or probes reached it: its NAT filters us"
            )
        else:
            why = "nothing from the peer reached us"
        return (
            f"no verified UDP path within {self._schedule.timeout:g} s: {why}; "
            f"sent {st.probes_sent} probes to {len(self._candidates)} "
            f"candidate{'s' if len(self._candidates) != 1 else ''} ({tried}), "
            f"ignored {st.invalid} invalid packets"
        )


class ReplayWindow:
    """
    Accept each sequence number once, within C{size} of the highest seen
    (the IPsec/DTLS anti-replay window), so a captured DATA frame cannot be
    delivered twice.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._highest = 0
        self._bits = 0  # bit i set: highest - i was seen

    def accept(self, seq: int) -> bool:
        if seq <= 0:
            return False
        if seq > self._highest:
            shift = seq - self._highest
            self._bits = ((self._bits << shift) | 1) & ((1 << self._size) - 1)
            self._highest = seq
            return True
        offset = self._highest - seq
        if offset >= self._size or self._bits >> offset & 1:
            return False
        self._bits |= 1 << offset
        return True


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    return (IPv6Address if ":" in host else IPv4Address)("UDP", host, port)


@implementer(IPeerConnection)
class UDPPeerConnection(PathConnection):
    """
    A punched UDP path: datagrams in DATA frames, keepalives, a liveness check.

    DATA frames carry a sequence number and are authenticated with the
    session key (not encrypted); replays are dropped.  Every verified packet
    from the peer counts as a sign of life; C{liveness_timeout} without one
    (default: three keepalive intervals) and the connection is lost.
    """

    log = Logger()
    protocol = "udp"
    delivery = "datagram"
    secure = False
    max_datagram_size = MAX_PAYLOAD

    def __init__(
        self,
        endpoint: PunchEndpoint,
        session: PunchSession,
        remote: Address,
        clock: IReactorTime,
        keepalive_interval: float = 15.0,
        liveness_timeout: float | None = None,
        nonce_source: NonceSource = random_nonce,
        early_data: Sequence[bytes] = (),
        max_pending: int = 64,
    ) -> None:
        super().__init__(session)
        self._endpoint = endpoint
        self._session = session
        self._remote = remote
        self._clock = clock
        self._interval = keepalive_interval
        self._timeout = liveness_timeout if liveness_timeout is not None else 3 * keepalive_interval
        self._nonce = nonce_source
        self._pending: list[bytes] = list(early_data)[:max_pending]
        self._max_pending = max_pending
        self._seq = 0
        self._replay = ReplayWindow()
        self.invalid = 0
        #: The probe/ACK round trip that chose the path, and what the punch did
        #: (set by the attempt that made this connection).
        self.rtt: float | None = None
        self.punch_stats: PunchStats | None = None
        host = endpoint.getHost()
        self.local_address = _address(host.host, host.port)
        self.remote_address = _address(*remote)
        endpoint.register(session.sid, self)
        self._keepalive = clock.callLater(self._interval, self._sendKeepalive)
        self._liveness = clock.callLater(self._timeout, self._dead)

    def __repr__(self) -> str:
        return f"<UDPPeerConnection {self.peer_id!r} {format_address(self._remote)}>"

    # -- IPeerConnection

    def _take_pending(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        return pending

    def send(self, data: bytes) -> None:
        if self._lost is not None:
            return
        if len(data) > MAX_PAYLOAD:
            raise ValueError(f"datagram of {len(data)} bytes exceeds max_datagram_size {MAX_PAYLOAD}")
        self._seq += 1
        self._write(PacketType.DATA, self._seq, payload=data)

    def close(self) -> None:
        if self._lost is None:
            self._write(PacketType.CLOSE, self._nonce())
            self._lose(Failure(ConnectionDone("closed locally")))

    # -- packets

    def _write(self, type_: PacketType, nonce: int, echo: int = 0, payload: bytes = b"") -> None:
        s = self._session
        self._endpoint.sendTo(encode(type_, s.role, s.sid, nonce, s.key, echo, payload), self._remote)

    def packetReceived(self, packet: PunchPacket, source: Address) -> None:
        s = self._session
        if self._lost is not None:
            return
        if packet.role != s.peer_role or not verify(packet, s.key):
            self.invalid += 1
            self.log.debug("ignoring an invalid packet from {source}", source=source)
            return
        self._liveness.reset(self._timeout)
        t = packet.type
        if t == PacketType.PROBE:
            # The peer has not seen our ACK yet: answer where it asked from.
            s_ack = encode(PacketType.ACK, s.role, s.sid, self._nonce(), s.key, echo=packet.nonce)
            self._endpoint.sendTo(s_ack, source)
        elif t == PacketType.KEEPALIVE:
            self._write(PacketType.KEEPALIVE_ACK, self._nonce(), echo=packet.nonce)
        elif t == PacketType.DATA:
            if self._replay.accept(packet.nonce):
                self._deliver(packet.payload)
        elif t == PacketType.CLOSE:
            self._lose(Failure(ConnectionDone("the peer closed the connection")))

    def _deliver(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.dataReceived(data)
        elif len(self._pending) < self._max_pending:
            self._pending.append(data)

    def _sendKeepalive(self) -> None:
        self._write(PacketType.KEEPALIVE, self._nonce())
        self._keepalive = self._clock.callLater(self._interval, self._sendKeepalive)

    def _dead(self) -> None:
        self._lose(
            Failure(
                ConnectionLost(
                    f"no packet from peer {self.peer_id!r} at {format_address(self._remote)} for "
                    f"{self._timeout:g} s (keepalive every {self._interval:g} s): the path is dead"
                )
            )
        )

    def _lose(self, reason: Failure) -> None:
        if self._lost is not None:
            return
        for call in (self._keepalive, self._liveness):
            if call.active():
                call.cancel()
        self._endpoint.unregister(self._session.sid, self)
        self._notify_lost(reason)


class UDPPunchAttempt:
    """
    Runs a L{UDPPunchMachine} on a shared socket with an injected clock.

    Use L{punch_udp}; this class is the packet handler it registers.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: PunchEndpoint,
        session: PunchSession,
        machine: UDPPunchMachine,
        clock: IReactorTime,
        make_connection: Callable[[Address, Sequence[bytes]], UDPPeerConnection],
    ) -> None:
        self._endpoint = endpoint
        self._session = session
        self._machine = machine
        self._clock = clock
        self._make_connection = make_connection
        self._timer = None
        self.deferred: Deferred = Deferred(lambda d: self._stop())
        endpoint.register(session.sid, self)
        self._run([])

    def _poll(self) -> None:
        self._timer = None
        self._run(self._machine.poll(self._clock.seconds()))

    def packetReceived(self, packet: PunchPacket, source: Address) -> None:
        self._run(self._machine.packet_received(self._clock.seconds(), packet, source))

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._endpoint.sendTo(action.data, action.address)
            elif isinstance(action, Selected):
                self._stop()
                self.log.info(
                    "UDP path to {peer_id} via {address} (rtt {rtt_ms:.1f} ms)",
                    peer_id=self._session.peer_id,
                    address=format_address(action.address),
                    rtt_ms=action.rtt * 1000,
                )
                conn = self._make_connection(action.address, self._machine.early_data)
                conn.rtt = action.rtt
                conn.punch_stats = self._machine.stats
                self.deferred.callback(conn)
                return
            elif isinstance(action, Failed):
                self._stop()
                self.deferred.errback(PunchFailed("udp", action.reason))
                return
        wake = self._machine.next_wakeup()
        if wake is None:
            return
        # A packet may have moved the next round earlier (the peer started first).
        delay = max(0.0, wake - self._clock.seconds())
        if self._timer is None:
            self._timer = self._clock.callLater(delay, self._poll)
        else:
            self._timer.reset(delay)

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._endpoint.unregister(self._session.sid, self)


def punch_udp(
    endpoint: PunchEndpoint,
    session: PunchSession,
    candidates: Iterable[Address],
    clock: IReactorTime,
    start_delay: float = 0.0,
    schedule: ProbeSchedule = ProbeSchedule(),
    keepalive_interval: float = 15.0,
    liveness_timeout: float | None = None,
    nonce_source: NonceSource = random_nonce,
) -> Deferred:
    """
    Punch a UDP path to the peer from C{endpoint}'s socket.

    Probing starts C{start_delay} seconds from now (the mediator's
    synchronised start).  Returns a Deferred that fires with a
    L{UDPPeerConnection}, or fails with L{PunchFailed} after
    C{schedule.timeout}; cancelling it stops the probes.
    """
    machine = UDPPunchMachine(session, candidates, clock.seconds() + start_delay, schedule, nonce_source)

    def make_connection(remote: Address, early: Sequence[bytes]) -> UDPPeerConnection:
        return UDPPeerConnection(
            endpoint,
            session,
            remote,
            clock,
            keepalive_interval=keepalive_interval,
            liveness_timeout=liveness_timeout,
            nonce_source=nonce_source,
            early_data=early,
        )

    return UDPPunchAttempt(endpoint, session, machine, clock, make_connection).deferred

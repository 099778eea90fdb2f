"""
UDP hole punching, then QUIC on the punched 5-tuple.

L{UDPPunchMachine} holds all punch decisions and no I/O: it is told the time
and the packets that arrived, and answers with actions (send these bytes
there; this address proved the session key; the path is chosen; give up
because ...).  L{UDPPunchAttempt} runs it on a
L{natbypass.punch.mux.PunchEndpoint} with an injected clock and secures the
path with a L{natbypass.secure.quic.QuicChannel} on the same socket: role 0
is the QUIC client, role 1 the server.  The handshake overlaps the punch:
role 0 sends its first flight at the start time to one candidate (a bounded
speculation) and moves to the first address that proves the session key if
that one does not answer; role 1 answers only addresses that proved it.  Only when the channel proved
the peer's identity key (and the key passed the C{ChannelSecurity}'s check)
does it hand out a L{UDPPeerConnection}: datagrams are QUIC DATAGRAM frames
(RFC 9221), liveness is QUIC's idle timeout kept open by periodic PINGs,
close is QUIC's CONNECTION_CLOSE.

What the session key does and does not do.  PROBE and ACK are authenticated
with the mediator's session key, so a host without it cannot open or divert a
path.  An ACK is accepted only when it comes from the address our probe went
to and echoes that probe's fresh nonce; a probe is answered at most once per
(nonce, source), and at most C{max_learned} addresses we were not told of
(peer-reflexive: the peer's NAT picked a new port) are learned.  But the
session key is also the mediator's, and a host on the path can always relay
packets, so the punch only I{finds} a 5-tuple: it never trusts it.  All that
is carried on it is QUIC, mutually authenticated by the identity keys, which
neither the mediator nor a relay has; they see ciphertext, and a replayed
packet is dropped by QUIC's AEAD and packet numbers (so it delivers nothing
twice and refreshes no liveness).  See C{docs/security.md}, "UDP path".
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.address import format_address
from natbypass.identity import Fingerprint
from natbypass.interfaces import IPeerConnection
from natbypass.punch.candidates import ProbeBudget
from natbypass.punch.connection import PathConnection
from natbypass.punch.flight import FlightResender
from natbypass.punch.migration import PathFollower
from natbypass.punch.mux import Address, PunchEndpoint
from natbypass.punch.packet import PacketType, PunchPacket, encode, verify
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.secure import ChannelSecurity
from natbypass.secure.quic import AUTH_FAILED, QuicChannel, QuicClosed, QuicEngine, warm_up
from natbypass.streams.quic import QuicCarrier
from natbypass.trust import PeerRejected

NonceSource = Callable[[], int]

#: How many peer-reflexive addresses an attempt learns at most (default).
MAX_LEARNED = 8
#: What role 0 may send to its speculative QUIC target before that address
#: proved the session key: one first flight, once (qh3 2.1: two 1,280-byte
#: datagrams, its ClientHello carries an X25519MLKEM768 key share; aioquic:
#: one of 1,200).  QUIC's retransmissions to it wait for the proof.
SPECULATIVE_BUDGET = 2 * 1280
#: How many QUIC connections role 1 answers in one attempt: a client starts at
#: most three (speculative, at the first proof, at the first ACK).
MAX_HANDSHAKES = 4
#: RFC 9000 section 10.2.3: an application close sent before the handshake is
#: confirmed travels as a transport APPLICATION_ERROR; a peer that refuses our
#: key as its handshake completes closes with it.
APPLICATION_ERROR = 0x0C
#: QUIC's PROTOCOL_VIOLATION: we close with it when the peer broke the stream layer's rules.
PROTOCOL_VIOLATION = 0x0A


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
class Verified:
    """
    Action: a packet from C{address} proved the session key for the first
    time (a role-1 attempt then accepts the peer's QUIC Initial from it).
    """

    address: Address


@dataclass(frozen=True)
class Selected:
    """Action: the path to C{address} is verified both ways."""

    address: Address
    rtt: float


@dataclass(frozen=True)
class Failed:
    """Action: the attempt is over without a path."""

    reason: str


Action = Send | Verified | Selected | Failed


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
    #: Verified probes seen before from the same source (replays): not answered.
    replayed: int = 0
    #: Verified probes from new addresses beyond C{max_learned}: not answered, not learned.
    learned_refused: int = 0
    #: Probes to unproven addresses the attempt's L{ProbeBudget} held back.
    budget_withheld: int = 0
    #: Probes to guessed ports of a birthday punch (L{natbypass.punch.birthday}), among C{probes_sent},
    #: and which of them (1-based) reached the peer first (None: none did).
    sprayed: int = 0
    landed_at: int | None = None


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
    through L{packet_received}; carry out the actions it returns.  Once it
    succeeded it still answers probes from the addresses it knows (the peer
    may not have our ACK yet), but learns nothing new.

    @param max_learned: how many peer-reflexive addresses it learns at most.
    @param max_seen: how many (nonce, source) pairs of answered probes it
        remembers to recognise replays (oldest forgotten first).
    @param budget: what probes to addresses that have not proved the
        session key may cost (None: no bound).  With one, each round
        offers the least-probed unproven candidates first, so a budget that
        runs short spreads over all of them.
    """

    def __init__(
        self,
        session: PunchSession,
        candidates: Iterable[Address],
        start_at: float,
        schedule: ProbeSchedule = ProbeSchedule(),
        nonce_source: NonceSource = random_nonce,
        max_learned: int = MAX_LEARNED,
        max_seen: int = 4096,
        budget: ProbeBudget | None = None,
    ) -> None:
        self._session = session
        self.budget = budget
        self._probed: dict[Address, int] = {}
        self._candidates: list[Address] = list(dict.fromkeys(candidates))
        self._known = set(self._candidates)
        self._start_at = start_at
        self._schedule = schedule
        self._nonce = nonce_source
        self._sent: dict[int, tuple[Address, float]] = {}
        self._seen: OrderedDict[tuple[int, Address], None] = OrderedDict()
        self._max_seen = max_seen
        self._max_learned = max_learned
        self._next_round = start_at
        self._last_interval: float | None = None
        self.state = PunchState.WAITING
        self.stats = PunchStats()
        self.prflx: list[Address] = []
        #: Addresses that sent a packet proving the session key, in order.
        self.verified: list[Address] = []

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
        self._probed[address] = self._probed.get(address, 0) + 1
        return Send(address, self._packet(PacketType.PROBE, nonce))

    def _round(self, now: float) -> list[Action]:
        """One probe to every candidate, those to unproven addresses within the budget."""
        if self.budget is None:
            return [self._probe(now, a) for a in self._candidates]
        out: list[Action] = []
        # Stable: the first round goes in candidate order (predicted ports first).
        for address in sorted(self._candidates, key=lambda a: self._probed.get(a, 0)):
            if address in self.verified or self.budget.spend(self._probe_size):
                out.append(self._probe(now, address))
            else:
                self.stats.budget_withheld += 1
        return out

    @property
    def _probe_size(self) -> int:
        return len(self._packet(PacketType.PROBE, 0))

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
        actions: list[Action] = self._round(now)
        self._last_interval = self._schedule.next_interval(now - self._start_at, self._last_interval)
        self._next_round = now + self._last_interval
        return actions

    def adopt(self, address: Address) -> None:
        """
        The path to C{address} was chosen by other means (the peer's QUIC
        Initial arrived from it): stop punching.  It must have been verified.
        """
        if address not in self.verified:
            raise ValueError(f"{format_address(address)} never proved the session key")
        if not self.done:
            self.state = PunchState.SUCCEEDED

    def packet_received(self, now: float, packet: PunchPacket, source: Address) -> list[Action]:
        """Handle one packet of our session from C{source}."""
        if self.state is PunchState.FAILED:
            return []
        s = self._session
        if packet.role != s.peer_role or not verify(packet, s.key):
            self.stats.invalid += 1
            return []
        if packet.type == PacketType.PROBE:
            return self._on_probe(now, packet, source)
        if packet.type == PacketType.ACK and not self.done:
            return self._on_ack(now, packet, source)
        return []

    def _verified(self, source: Address) -> list[Action]:
        if source in self.verified:
            return []
        self.verified.append(source)
        return [Verified(source)]

    def _on_probe(self, now: float, packet: PunchPacket, source: Address) -> list[Action]:
        seen = (packet.nonce, source)
        if seen in self._seen:
            # A replay (the peer never sends one nonce twice): one answer per
            # captured probe and source, whatever the attacker resends.
            self.stats.replayed += 1
            return []
        learned = source not in self._known
        if learned and (self.done or len(self.prflx) >= self._max_learned):
            self.stats.learned_refused += 1
            return []
        self._seen[seen] = None
        if len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)
        self.stats.verified_probes += 1
        self.stats.acks_sent += 1
        actions: list[Action] = [Send(source, self._packet(PacketType.ACK, self._nonce(), echo=packet.nonce))]
        actions += self._verified(source)
        if self.done:
            return actions
        if self.state is PunchState.WAITING:
            # The peer started first (clock skew): start now, not at start_at.
            self._next_round = now
        if learned:
            # Peer-reflexive: the address its NAT gave this flow (bounded).
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
        return [*self._verified(source), Selected(source, now - sent[1])]

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
        extra = ""
        if st.replayed or st.learned_refused:
            extra = (
                f"; dropped {st.replayed} replayed probes and {st.learned_refused} from new addresses "
                f"beyond the {self._max_learned} learned ones"
            )
        if st.budget_withheld:
            extra += f"; held back {st.budget_withheld} probes to unproven addresses (the attempt's probe budget)"
        return (
            f"no verified UDP path within {self._schedule.timeout:g} s: {why}; "
            f"sent {st.probes_sent} probes to {len(self._candidates)} "
            f"candidate{'s' if len(self._candidates) != 1 else ''} ({tried}), "
            f"ignored {st.invalid} invalid packets{extra}"
        )


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    return (IPv6Address if ":" in host else IPv4Address)("UDP", host, port)


def _is_initial(data: bytes) -> bool:
    """A QUIC v1 long-header Initial packet (RFC 9000 section 17.2.2)?"""
    return len(data) >= 1200 and data[0] & 0xF0 == 0xC0 and data[1:5] == b"\x00\x00\x00\x01"


@implementer(IPeerConnection)
class UDPPeerConnection(PathConnection):
    """
    A punched UDP path secured by QUIC: datagrams are DATAGRAM frames.

    Made by L{punch_udp} once the channel is ready (both identity keys
    proven).  Every C{keepalive_interval} it sends a QUIC PING, whose ACK
    keeps the NAT mapping open and the idle timer of both sides fresh; when
    nothing authenticated arrives for the channel's idle timeout the path is
    lost (C{ConnectionLost}).  Replayed packets are dropped by QUIC (AEAD,
    packet numbers): they deliver nothing and refresh nothing.  Streams are
    QUIC streams (L{natbypass.streams.quic.QuicCarrier}).  C{path} (a
    L{natbypass.punch.migration.PathFollower}) moves the path when the
    peer's NAT rebinds, and probes it when it falls silent while in use.
    """

    log = Logger()
    protocol = "udp"
    delivery = "datagram"
    secure = True

    def __init__(
        self,
        channel: QuicChannel,
        endpoint: PunchEndpoint,
        session: PunchSession,
        clock: IReactorTime,
        keepalive_interval: float = 15.0,
        idle_timeout: float = 45.0,
        handshake_ms: float = 0.0,
        max_pending: int = 64,
    ) -> None:
        super().__init__(session)
        if channel.peer_fingerprint is None:
            raise ValueError("the QUIC channel is not ready: wait for its .ready")
        self._channel = channel
        self._endpoint = endpoint
        self._clock = clock
        self._interval = keepalive_interval
        self._idle = idle_timeout
        self._remote: Address = channel.remote
        self._pending: list[bytes] = []
        self._max_pending = max_pending
        self.peer_fingerprint: Fingerprint = channel.peer_fingerprint
        self.cipher = channel.cipher
        self.handshake_ms = handshake_ms
        self.max_datagram_size = channel.max_datagram_size
        #: The probe/ACK round trip that chose the path (None when the peer's
        #: QUIC Initial chose it), and what the punch did (set by the attempt).
        self.rtt: float | None = None
        self.punch_stats: PunchStats | None = None
        host = endpoint.getHost()
        self.local_address = _address(host.host, host.port)
        self.remote_address = _address(*self._remote)
        self._ping: IDelayedCall | None = clock.callLater(self._interval, self._sendPing)
        #: Follows the peer's NAT when it rebinds, and probes a silent path (L{natbypass.punch.migration}).
        self.path = PathFollower(channel, endpoint, clock, keepalive_interval, on_move=self._moved)
        channel.lost.addCallback(self._channelLost)
        self._carrier = QuicCarrier(channel, self.role, self._streamLayerBroken)
        self._startStreams(self._carrier, clock)
        channel.setReceiver(self)

    def __repr__(self) -> str:
        return f"<UDPPeerConnection {self.peer_id!r} {format_address(self._remote)} {self.peer_fingerprint}>"

    # -- IPeerConnection

    def _take_pending(self) -> list[bytes]:
        pending, self._pending = self._pending, []
        return pending

    def send(self, data: bytes) -> None:
        if self._lost is not None:
            return
        if len(data) > self.max_datagram_size:
            raise ValueError(f"datagram of {len(data)} bytes exceeds max_datagram_size {self.max_datagram_size}")
        self._channel.sendDatagram(data)

    def close(self) -> None:
        if self._lost is None:
            # Deliver what the streams wrote first (bounded), as a TCP close would
            # (messages are unreliable anyway: a path that only carried them closes at once).
            streams = self.stream_session
            used = streams is not None and (streams.stats["opened"] or streams.stats["accepted"])
            self._channel.close(0, "closed", drain=bool(used))

    # -- QuicReceiver (the channel's side)

    def datagramFrameReceived(self, data: bytes) -> None:
        if self._lost is not None:
            return
        if self._receiver is not None:
            self._receiver.dataReceived(data)
        elif len(self._pending) < self._max_pending:
            self._pending.append(data)

    def streamReceived(self, stream_id: int, data: bytes, fin: bool) -> None:
        self._carrier.streamReceived(stream_id, data, fin)

    def streamReset(self, stream_id: int, code: int) -> None:
        self._carrier.streamReset(stream_id, code)

    def pumped(self) -> None:
        self._carrier.pumped()

    def _streamLayerBroken(self, why: str) -> None:
        self.log.warn("closing the UDP path to {peer}: {why}", peer=self.peer_id, why=why)
        self._channel.close(PROTOCOL_VIOLATION, why)

    def connectionLost(self, reason: Failure) -> None:
        """The channel ended: handled through its C{lost} Deferred (which also covers an end before this)."""

    # -- liveness

    def _sendPing(self) -> None:
        self._ping = self._clock.callLater(self._interval, self._sendPing)
        self._channel.ping()

    def _moved(self, old: Address, new: Address) -> None:
        self._remote = new
        self.remote_address = _address(*new)

    def _channelLost(self, reason: Exception) -> None:
        if self._ping is not None and self._ping.active():
            self._ping.cancel()
        self._ping = None
        self.path.stop()
        self._endpoint.unrouteQuic(self._remote, self._channel)
        self._notify_lost(Failure(self._lossReason(reason)))

    def _lossReason(self, reason: Exception) -> Exception:
        where = f"peer {self.peer_id!r} at {format_address(self._remote)}"
        if isinstance(reason, QuicClosed):
            if reason.local:
                if reason.code == 0:
                    return ConnectionDone("closed locally")
                return ConnectionLost(f"we closed the path to {where}: {reason.reason}")
            if "idle" in reason.reason.lower():
                return ConnectionLost(
                    f"no authenticated packet from {where} for {self._idle:g} s (QUIC idle timeout, "
                    f"PING every {self._interval:g} s): the path is dead"
                )
            if reason.code == 0:
                return ConnectionDone("the peer closed the connection")
            if reason.code in (AUTH_FAILED, APPLICATION_ERROR):
                return ConnectionLost(f"{where} refused our identity key and closed the connection ({reason})")
        return ConnectionLost(f"the QUIC connection to {where} ended: {reason}")


class AttemptState(enum.StrEnum):
    """Where a L{UDPPunchAttempt} is."""

    PUNCHING = "punching"
    HANDSHAKING = "handshaking"
    DONE = "done"


class _ChannelSend:
    """
    The C{send} of one QUIC channel of an attempt: the endpoint's C{sendTo}
    behind the speculative budget.

    To an address that has not proved the session key (the speculative
    target of role 0), and before the peer answered, at most C{budget} bytes
    go out: the first flight, once; QUIC's retransmissions are dropped
    (counted in C{withheld}) until the address is proven, when
    L{UDPPunchAttempt} resends the recorded first flight itself.
    """

    def __init__(
        self,
        endpoint: PunchEndpoint,
        proven: Callable[[Address], bool],
        budget: int,
        probe_budget: ProbeBudget | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._proven = proven
        self._budget = budget
        self._probe_budget = probe_budget
        self.channel: QuicChannel | None = None
        #: Resends the handshake flight on the punch's round trip (natbypass.punch.flight).
        self.resender: FlightResender | None = None
        self.recording = False
        #: The datagrams of the first flight (what C{channel.start()} sent).
        self.flight: list[bytes] = []
        #: Bytes sent to the address before it proved the session key.
        self.unproven_bytes = 0
        #: Datagrams not sent because the budget was spent.
        self.withheld = 0

    def __call__(self, data: bytes, addr: Address) -> None:
        if self.recording:
            self.flight.append(data)
        answered = self.channel is not None and self.channel.answered
        if not answered and not self._proven(addr):
            if self.unproven_bytes + len(data) > self._budget:
                self.withheld += 1
                return
            if self._probe_budget is not None and not self._probe_budget.spend(len(data)):
                # The flight counts in the attempt's budget with its probes.
                self.withheld += 1
                return
            self.unproven_bytes += len(data)
        self._endpoint.sendTo(data, addr)
        if self.resender is not None:
            self.resender.sent(data)


class UDPPunchAttempt:
    """
    Runs a L{UDPPunchMachine} on a shared socket with an injected clock, and
    the QUIC handshake alongside it.

    Role 0 (the QUIC client) does not wait for the punch to finish: it
    starts its client as soon as it has evidence of a path, and moves it
    when better evidence shows the first guess was wrong:

      1. I{speculative} (with C{speculate}): at the start time, right after
         the first probe to that candidate, with at most one first flight
         (L{SPECULATIVE_BUDGET}) sent there before it proves the session key;
      2. at the first address that proved the session key (the peer's first
         probe, half a round trip after a synchronised start; or an ACK);
      3. at the address of the first ACK (proven both ways).

    A client that has not been answered moves to newer evidence (it is
    abandoned silently, its route removed and its timer cancelled); one that
    was answered, or that runs on a proven address while the evidence is
    only a probe, stays.  When the first ACK from the speculative target
    echoes a probe sent I{after} the speculative flight (so the probe sent
    with it was lost: the peer's NAT dropped that first round, before the
    peer's own first probe opened it), the flight is sent there once more,
    at once, rather than after QUIC's probe timeout.

    Role 1 (the server) routes QUIC from every address that proved the
    session key to this attempt until its channel is ready, answers the
    first Initial from one of them, and, if the client starts a new
    connection (an Initial with a new source connection id, from the same
    or another proven address), drops the pending one and answers the new
    one, at most L{MAX_HANDSHAKES} times.

    Use L{punch_udp}; this class is the punch packet handler it registers.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: PunchEndpoint,
        session: PunchSession,
        machine: UDPPunchMachine,
        clock: IReactorTime,
        make_channel: Callable[..., QuicChannel],
        make_connection: Callable[[QuicChannel, float], UDPPeerConnection],
        security: ChannelSecurity,
        handshake_timeout: float = 5.0,
        speculate: Address | None = None,
        speculative_budget: int = SPECULATIVE_BUDGET,
    ) -> None:
        self._endpoint = endpoint
        self._session = session
        self._machine = machine
        self._clock = clock
        self._make_channel = make_channel
        self._make_connection = make_connection
        self._security = security
        self._handshake_timeout = handshake_timeout
        self._speculate = speculate if session.role == 0 else None
        self._speculated = False
        self._budget = speculative_budget
        self._timer: IDelayedCall | None = None
        self._handshake_timer: IDelayedCall | None = None
        self._routes: list[Address] = []
        self._channel: QuicChannel | None = None
        self._send: _ChannelSend | None = None
        self._remote: Address | None = None
        self._resend = False
        self._flight_at = 0.0
        self._rtt: float | None = None
        self._punched_at: float | None = None
        #: When the raw path was proven: the first packet that proved the session key; the path
        #: chosen (our probe ACKed, or, role 1, the peer's QUIC Initial adopted).
        self._verified_at: float | None = None
        self._chosen_at: float | None = None
        self.state = AttemptState.PUNCHING
        #: QUIC packets from a verified address that were neither for the channel nor a new Initial.
        self.stray_quic = 0
        #: QUIC connections started (role 0) or answered (role 1).
        self.handshakes = 0
        self.deferred: Deferred[UDPPeerConnection] = Deferred(lambda d: self._cancel())
        endpoint.register(session.sid, self)
        self._run([])

    # -- punch packets

    def _poll(self) -> None:
        self._timer = None
        self._run(self._machine.poll(self._clock.seconds()))

    def packetReceived(self, packet: PunchPacket, source: Address) -> None:
        if self.state is not AttemptState.DONE:
            self._run(self._machine.packet_received(self._clock.seconds(), packet, source))

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if self.state is AttemptState.DONE:
                return
            if isinstance(action, Send):
                self._endpoint.sendTo(action.data, action.address)
            elif isinstance(action, Verified):
                if self._verified_at is None:
                    self._verified_at = self._clock.seconds()
                self._verified(action.address)
            elif isinstance(action, Selected):
                if self._chosen_at is None:
                    self._chosen_at = self._clock.seconds()
                self._selected(action.address, action.rtt)
            elif isinstance(action, Failed):
                if self._handshake_timer is not None:
                    # A handshake on a proven path is under way: its timeout decides.
                    continue
                self._fail(action.reason)
                return
        if self.state is AttemptState.DONE:
            return
        if not self._speculated and self._machine.state is not PunchState.WAITING:
            # Right after the first round of probes, so the target has our probe first.
            self._speculated = True
            if self._speculate is not None and self._channel is None:
                self._startClient(self._speculate)
        wake = self._machine.next_wakeup()
        if wake is None:
            self._stopTimer()
            return
        # A packet may have moved the next round earlier (the peer started first).
        delay = max(0.0, wake - self._clock.seconds())
        if self._timer is None:
            self._timer = self._clock.callLater(delay, self._poll)
        else:
            self._timer.reset(delay)

    def _verified(self, address: Address) -> None:
        if self._session.role == 1:
            # Bounded: candidates plus at most max_learned addresses.
            self._routes.append(address)
            self._endpoint.routeQuic(address, self)
        else:
            self._proven(address)

    def _selected(self, address: Address, rtt: float) -> None:
        self._stopTimer()
        self._rtt = rtt
        if self._send is not None and self._send.resender is not None:
            self._send.resender.knowRtt(rtt)
        self.log.info(
            "UDP path to {peer_id} via {address} (rtt {rtt_ms:.1f} ms)",
            peer_id=self._session.peer_id,
            address=format_address(address),
            rtt_ms=rtt * 1000,
        )
        if self._session.role == 0:
            self._proven(address, probe_sent=self._clock.seconds() - rtt)
        else:
            # The server follows the client's choice: it waits for the Initial
            # (from this or another verified address), within the handshake timeout.
            if self._punched_at is None:
                self._punched_at = self._clock.seconds()
            self._startHandshakeTimer()

    # -- QUIC: role 0 starts clients where the evidence points

    def _proven(self, address: Address, probe_sent: float | None = None) -> None:
        """
        Role 0: C{address} proved the session key: by a probe, or by an ACK
        echoing our probe sent at C{probe_sent} (proven both ways).
        """
        channel = self._channel
        both_ways = probe_sent is not None
        if channel is not None and self._remote == address:
            if probe_sent is not None and self._resend:
                self._resend = False
                # (A microsecond of slack for the float arithmetic of the round trip.)
                if probe_sent > self._flight_at + 1e-6 and not channel.answered and self._send is not None:
                    # Our probe sent with the speculative flight was not
                    # answered, a later one was: the peer's NAT dropped that
                    # first round (the peer started late).  Once more, now.
                    for data in self._send.flight:
                        self._endpoint.sendTo(data, address)
        elif channel is None or not (channel.answered or (self._remote in self._machine.verified and not both_ways)):
            if channel is not None:
                self.log.info(
                    "no QUIC answer from {old}; starting again on {new}, which proved the session key",
                    old=format_address(self._remote),
                    new=format_address(address),
                )
                self._dropChannel()
            self._startClient(address)
        self._startHandshakeTimer()

    def _startClient(self, address: Address) -> None:
        self._newChannel(address)
        self._resend = address not in self._machine.verified
        assert self._channel is not None and self._send is not None
        self._endpoint.routeQuic(address, self._channel)
        self._punched_at = self._flight_at = self._clock.seconds()
        self._send.recording = True
        try:
            self._channel.start()
        finally:
            self._send.recording = False

    def _newChannel(self, address: Address) -> None:
        self.state = AttemptState.HANDSHAKING
        self._remote = address
        send = self._send = _ChannelSend(
            self._endpoint, self._machine.verified.__contains__, self._budget, self._machine.budget
        )
        # The probes' round trip, when known, replaces QUIC's guess (qh3: 333 ms) for its first retransmissions.
        channel = self._channel = send.channel = self._make_channel(address, send, self._rtt)
        send.resender = FlightResender(
            self._clock, lambda data: self._endpoint.sendTo(data, address), lambda: self._flightWanted(channel)
        )
        if self._rtt is not None:
            send.resender.knowRtt(self._rtt)
        self.handshakes += 1
        channel.ready.addCallbacks(self._ready, self._refused, callbackArgs=(channel,), errbackArgs=(channel,))

    def _flightWanted(self, channel: QuicChannel) -> bool:
        """
        Whether resending C{channel}'s handshake flight may help: it is still
        the attempt's, its address proved the session key, and (client) the
        server has not answered or (server) the client has not finished.
        """
        return (
            self.state is not AttemptState.DONE
            and channel is self._channel
            and channel.remote in self._machine.verified
            and not (self._session.role == 0 and channel.answered)
        )

    def _stopResends(self) -> None:
        if self._send is not None and self._send.resender is not None:
            self._send.resender.stop()

    def _dropChannel(self) -> None:
        """Forget the pending channel without a word to the peer (its route and timer go)."""
        self._stopResends()
        channel, self._channel = self._channel, None
        if channel is not None:
            self._endpoint.unrouteQuic(channel.remote, channel)
            channel.abandon()

    # -- QUIC: role 1 answers Initials from proven addresses

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        """A QUIC packet from an address the peer proved (role 1, until the channel is ready)."""
        if self.state is AttemptState.DONE:
            return
        channel = self._channel
        if channel is not None and addr == self._remote and not channel.isNewConnection(data):
            if self._send is not None and self._send.resender is not None:
                self._send.resender.received(data)
            channel.datagramReceived(data, addr)
            return
        if not _is_initial(data) or self.handshakes >= MAX_HANDSHAKES:
            self.stray_quic += 1
            return
        if channel is not None:
            self.log.info(
                "the peer started a new QUIC connection from {new}; dropping the one from {old}",
                new=format_address(addr),
                old=format_address(self._remote),
            )
            self._dropChannel()
        self._machine.adopt(addr)
        if self._chosen_at is None:
            self._chosen_at = self._clock.seconds()
        self._stopTimer()
        if self._punched_at is None:
            self._punched_at = self._clock.seconds()
        self._newChannel(addr)
        self._startHandshakeTimer()
        assert self._channel is not None and self._send is not None and self._send.resender is not None
        self._send.resender.received(data)  # remembered: a repeat of it means our answer was lost
        self._channel.datagramReceived(data, addr)

    # -- both

    def _startHandshakeTimer(self) -> None:
        if self._handshake_timer is None and self.state is not AttemptState.DONE:
            self._handshake_timer = self._clock.callLater(self._handshake_timeout, self._handshakeTimedOut)

    def _handshakeTimedOut(self) -> None:
        self._handshake_timer = None
        where = format_address(self._remote) if self._remote is not None else "the punched path"
        waited = (
            "the peer's QUIC Initial did not arrive" if self._channel is None else "the QUIC handshake did not finish"
        )
        self._fail(f"the path to {where} was punched but {waited} within {self._handshake_timeout:g} s")

    def _ready(self, fingerprint: Fingerprint, channel: QuicChannel) -> None:
        if self.state is AttemptState.DONE or channel is not self._channel:
            return
        handshake_ms = (self._clock.seconds() - (self._punched_at or 0.0)) * 1000
        self._finish()
        # From now on the channel gets its packets straight from the endpoint.
        self._endpoint.routeQuic(channel.remote, channel)
        conn = self._make_connection(channel, handshake_ms)
        conn.rtt = self._rtt
        conn.punch_stats = self._machine.stats
        # Chosen; if QUIC was ready first (no ACK came back), since the peer's first packet proved the key.
        conn.punched_at = self._chosen_at if self._chosen_at is not None else self._verified_at
        self.log.info(
            "UDP path to {peer_id} secured: {cipher}, peer key {fingerprint}, handshake {ms:.1f} ms",
            peer_id=self._session.peer_id,
            cipher=conn.cipher,
            fingerprint=str(fingerprint),
            ms=handshake_ms,
        )
        self.deferred.callback(conn)

    def _refused(self, failure: Failure, channel: QuicChannel) -> None:
        if self.state is AttemptState.DONE or channel is not self._channel:
            return  # over, or a channel we dropped
        self._fail(self._why(failure.value))

    def _why(self, error: BaseException) -> str:
        where = f"the peer at {format_address(self._remote)}" if self._remote is not None else "the peer"
        if isinstance(error, PeerRejected):
            return f"{where} failed authentication: {error}"
        if isinstance(error, QuicClosed) and not error.local and error.code in (AUTH_FAILED, APPLICATION_ERROR):
            return (
                f"{where} refused our identity key {self._security.identity.fingerprint} "
                f"(it closed the QUIC handshake: {error})"
            )
        return f"the QUIC handshake with {where} failed: {error}"

    # -- the end

    def _stopTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _unroute(self) -> None:
        for address in self._routes:
            self._endpoint.unrouteQuic(address, self)
        self._routes = []

    def _finish(self) -> None:
        """Stop every timer and route of the attempt (the channel, if ready, lives on)."""
        self.state = AttemptState.DONE
        self._stopTimer()
        self._stopResends()
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self._unroute()
        self._endpoint.unregister(self._session.sid, self)

    def _abandonChannel(self) -> None:
        channel = self._channel
        if channel is None:
            return
        if channel.answered or self._remote in self._machine.verified:
            self._endpoint.unrouteQuic(channel.remote, channel)
            channel.close(0, "punch attempt abandoned")
        else:
            self._dropChannel()  # nothing to tell an address that never answered

    def _fail(self, reason: str) -> None:
        if self.state is AttemptState.DONE:
            return
        self._finish()
        self._abandonChannel()
        self.deferred.errback(PunchFailed("udp", reason))

    def _cancel(self) -> None:
        if self.state is AttemptState.DONE:
            return
        self._finish()
        self._abandonChannel()


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
    *,
    security: ChannelSecurity,
    handshake_timeout: float = 5.0,
    max_learned: int = MAX_LEARNED,
    engine: str | QuicEngine | None = None,
    speculate: bool | Address = True,
    budget: ProbeBudget | None = None,
) -> Deferred[UDPPeerConnection]:
    """
    Punch a UDP path to the peer from C{endpoint}'s socket and secure it with QUIC.

    Probing starts C{start_delay} seconds from now (the mediator's
    synchronised start).  Role 0, the QUIC client, overlaps its handshake
    with the punch (L{UDPPunchAttempt}): with C{speculate} it sends its
    first flight at the start time, right after its first probe, to one
    candidate; otherwise, or when that candidate does not answer, it starts
    at the first address that proves the session key.  Role 1 answers the
    first Initial that arrives from an address whose punch packets proved
    the session key.  Both then prove their identity keys inside the channel
    (L{natbypass.secure.quic}).  Between cone NATs, after a synchronised
    start, the client is ready one round trip after the start when the
    speculation works (one and a half when it starts on the peer's first
    probe), the server half a round trip after the client.

    @param security: our identity, and the check the peer's proven key must
        pass (raising L{natbypass.trust.PeerRejected} refuses it).
    @param keepalive_interval: seconds between QUIC PINGs on the connection.
    @param liveness_timeout: QUIC's idle timeout (default three keepalive
        intervals): the path is lost after that long without an
        authenticated packet from the peer.
    @param handshake_timeout: how long the QUIC handshake may take after the
        punch proved the path it runs on.
    @param max_learned: how many peer-reflexive addresses the punch learns.
    @param engine: the QUIC engine ("qh3", "aioquic", None: the preferred one).
        It is loaded and warmed up (L{natbypass.secure.quic.warm_up}) now,
        while the punch waits for its start time, not when the path is found.
    @param speculate: role 0 only: the candidate to send the speculative
        first flight to (one of C{candidates}: the peer's server-reflexive
        address, or its host address on a shared LAN), True for the first
        candidate, False for none (start at the first proven address).
    @param budget: what the attempt may send to addresses that have not
        proved the session key (probes and the speculative flight, see
        L{natbypass.punch.candidates.ProbeBudget}); None: no bound beyond
        L{SPECULATIVE_BUDGET} (a L{natbypass.peer.Peer} always gives one).

    @return: a Deferred that fires with a secure L{UDPPeerConnection}, or
        fails with L{PunchFailed} (no path within C{schedule.timeout}, or the
        handshake failed: its reason then names the fingerprint problem);
        cancelling it stops everything.
    """
    machine = UDPPunchMachine(
        session,
        candidates,
        clock.seconds() + start_delay,
        schedule,
        nonce_source,
        max_learned=max_learned,
        budget=budget,
    )
    target: Address | None = None
    if speculate is True:
        target = machine.candidates[0] if machine.candidates else None
    elif speculate is not False:
        target = (speculate[0], speculate[1])
        if target not in machine.candidates:
            raise ValueError(f"the speculative target {format_address(target)} is not a candidate")
    quic = QuicSetup.make(security, clock, keepalive_interval, liveness_timeout, handshake_timeout, engine)
    return quic.attempt(endpoint, session, machine, clock, speculate=target).deferred


@dataclass(frozen=True)
class QuicSetup:
    """
    What every attempt of one session needs to run QUIC on its punched
    path: our identity and the check of the peer's key, the certificate (made
    once), the engine (loaded and warmed up once) and the timers.  A birthday
    punch (L{natbypass.punch.birthday}) shares one among hundreds of sockets.
    """

    security: ChannelSecurity
    certificate: object
    engine: QuicEngine
    keepalive_interval: float
    idle_timeout: float
    handshake_timeout: float

    @classmethod
    def make(
        cls,
        security: ChannelSecurity,
        clock: IReactorTime,
        keepalive_interval: float = 15.0,
        liveness_timeout: float | None = None,
        handshake_timeout: float = 5.0,
        engine: str | QuicEngine | None = None,
    ) -> QuicSetup:
        """The certificate made and the engine warmed up now, while the punch waits for its start time."""
        idle = liveness_timeout if liveness_timeout is not None else 3 * keepalive_interval
        certificate = security.identity.certificate(clock)
        return cls(security, certificate, warm_up(engine), keepalive_interval, idle, handshake_timeout)

    def attempt(
        self,
        endpoint: PunchEndpoint,
        session: PunchSession,
        machine: UDPPunchMachine,
        clock: IReactorTime,
        speculate: Address | None = None,
    ) -> UDPPunchAttempt:
        """Run C{machine} on C{endpoint}'s socket, QUIC on the path it finds (see L{UDPPunchAttempt})."""

        def make_channel(
            remote: Address, send: Callable[[bytes, Address], None], rtt: float | None = None
        ) -> QuicChannel:
            return QuicChannel(
                self.security.identity,
                self.security.verify,
                session.role,
                remote,
                send,
                clock,
                idle_timeout=self.idle_timeout,
                engine=self.engine,
                certificate=self.certificate,
                initial_rtt=rtt,
            )

        def make_connection(channel: QuicChannel, handshake_ms: float) -> UDPPeerConnection:
            return UDPPeerConnection(
                channel,
                endpoint,
                session,
                clock,
                keepalive_interval=self.keepalive_interval,
                idle_timeout=self.idle_timeout,
                handshake_ms=handshake_ms,
            )

        return UDPPunchAttempt(
            endpoint,
            session,
            machine,
            clock,
            make_channel,
            make_connection,
            self.security,
            self.handshake_timeout,
            speculate=speculate,
        )

"""
Birthday punching: UDP between an endpoint-independent (port-restricted
cone) NAT and a symmetric NAT that picks a random port for every flow.

Neither side can name the 5-tuple in advance: the symmetric side's NAT gives
the flow to the peer a port nobody can predict, and the port-restricted
side accepts only the exact address:port it sent to.  So both guess, many
times, and rely on the birthday paradox:

* the B{hard} side (random symmetric, L{punch_birthday_open}) opens many
  UDP sockets (L{BirthdayConfig.sockets}, 256) and sends authenticated punch
  probes from each to the easy side's mapped address: its NAT now holds that
  many random public ports, each of which accepts packets from exactly that
  address;
* the B{easy} side (L{punch_birthday_probe}, L{BirthdayProber}) keeps its
  one punch socket (its mapped address is what the hard side aims at) and
  probes random ports of the hard side's public IP, never one port twice and
  none below 1024, paced (L{BirthdayConfig.rate}) and bounded
  (L{BirthdayConfig.probes}).  With 256 open ports among 64,512, the chance
  that one of C{n} probes lands is C{1 - (1 - 256/64512) ** n}
  (L{success_probability}): 50% at 174, 99.9% at 2,048.

The hard socket a probe lands on verifies it (the session key's MAC) and
answers; the easy side's probe opened its own filter for that address, so
the ACK gets in: that 5-tuple is the path, QUIC runs on it exactly as on a
plain punched path (L{natbypass.punch.udp.QuicSetup}), and every other
extra socket is closed at once (all of them on failure or cancel).

Bounds: the spray goes through its own L{ProbeBudget} (C{probes} datagrams,
C{rate} a second), the hard side's sockets through one budget of
C{sockets} datagrams a second, and a peer runs one birthday punch at a time
(L{BirthdayLimiter}).  See docs/traversal.md ("Birthday punching") and
docs/security.md.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from natbypass.address import format_address
from natbypass.punch.candidates import CandidateError, PortRange, ProbeBudget, bind_udp
from natbypass.punch.mux import Address, PunchEndpoint
from natbypass.punch.packet import PunchPacket
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.udp import (
    Action,
    NonceSource,
    ProbeSchedule,
    PunchState,
    QuicSetup,
    UDPPeerConnection,
    UDPPunchAttempt,
    UDPPunchMachine,
    Verified,
    random_nonce,
)

#: Extra sockets the hard side opens (Tailscale's figure).
BIRTHDAY_SOCKETS = 256
#: Probes a second the easy side sprays at the hard side's IP.
BIRTHDAY_RATE = 400.0
#: Probes the easy side sprays at most in one attempt.
BIRTHDAY_PROBES = 2048
#: The lowest port probed: NATs (and the lab's C{snat random}) draw from 1024-65535.
MIN_PORT = 1024
#: How many ports a random symmetric NAT draws from.
PORT_POOL = 65536 - MIN_PORT
#: Hard limits on the configuration (a typo must not open 100,000 sockets).
MAX_SOCKETS, MAX_RATE = 1024, 5000.0
#: The spray runs in ticks of this many seconds (a few probes each), not one timer per probe.
TICK = 0.02
#: Each extra socket of the hard side sends a probe this often: the first
#: opens its NAT mapping, the next keep it and stand in for a lost ACK.
OPEN_INTERVAL = 1.0


@dataclass(frozen=True)
class BirthdayConfig:
    """How hard a birthday punch may try: extra sockets (hard side), probe rate and total (easy side)."""

    sockets: int = BIRTHDAY_SOCKETS
    rate: float = BIRTHDAY_RATE
    probes: int = BIRTHDAY_PROBES

    def __post_init__(self) -> None:
        if not (isinstance(self.sockets, int) and 0 <= self.sockets <= MAX_SOCKETS):
            raise ValueError(f"birthday sockets must be 0 (off) to {MAX_SOCKETS}, not {self.sockets!r}")
        if not (isinstance(self.probes, int) and 0 <= self.probes <= PORT_POOL):
            raise ValueError(f"birthday probes must be 0 (off) to {PORT_POOL}, not {self.probes!r}")
        if not (0 < self.rate <= MAX_RATE):
            raise ValueError(f"birthday probe rate must be above 0 and at most {MAX_RATE:g} a second")

    @property
    def enabled(self) -> bool:
        """False when either side's effort is switched off (then a plain punch runs)."""
        return self.sockets > 0 and self.probes > 0


def success_probability(sockets: int, probes: int, pool: int = PORT_POOL) -> float:
    """The chance that one of C{probes} distinct random ports is one of C{sockets} random open ones (about)."""
    return 1.0 - (1.0 - sockets / pool) ** probes


def probes_for(probability: float, sockets: int, pool: int = PORT_POOL) -> int:
    """How many probes reach C{probability} (the inverse of L{success_probability})."""
    return math.ceil(math.log(1.0 - probability) / math.log(1.0 - sockets / pool))


def random_ports(count: int, exclude: Iterable[int] = (), rng: random.Random | None = None) -> list[int]:
    """
    C{count} distinct ports from 1024-65535 in random order, none of
    C{exclude} (the ones probed anyway): what the easy side sprays.
    """
    rng = rng or random.SystemRandom()
    skip = set(exclude)
    pool = range(MIN_PORT, 65536)
    wanted = min(count + len(skip), len(pool))
    return [p for p in rng.sample(pool, wanted) if p not in skip][:count]


class BirthdayProber(UDPPunchMachine):
    """
    The easy side's punch: a L{UDPPunchMachine} on the one punch socket
    (probing the peer's candidates as usual) that also sprays probes at
    C{host}'s C{ports} in ticks of L{TICK}, as many as the C{spray} budget
    allows (its rate, its total), each port once.  An ACK from one of them (it echoes
    the nonce sent there) selects that address as usual; so does a probe from
    it (learned as peer-reflexive).  Pure: no I/O, no clock of its own.
    """

    def __init__(
        self,
        session: PunchSession,
        candidates: Iterable[Address],
        start_at: float,
        host: str,
        ports: Iterable[int],
        spray: ProbeBudget,
        schedule: ProbeSchedule = ProbeSchedule(),
        nonce_source: NonceSource = random_nonce,
        **kw,
    ) -> None:
        super().__init__(session, candidates, start_at, schedule, nonce_source, **kw)
        self.host = host
        self._ports: Iterator[int] = iter(ports)
        self._spray = spray
        self._next_spray = start_at
        self._spraying = True
        #: Each guessed address and its place in the spray (bounded by the spray budget).
        self._index: dict[Address, int] = {}

    def next_wakeup(self) -> float | None:
        wake = super().next_wakeup()
        if wake is None or not self._spraying:
            return wake
        return min(wake, self._next_spray)

    def poll(self, now: float) -> list[Action]:
        actions = super().poll(now)
        if self.state is PunchState.PUNCHING and self._spraying and now >= self._next_spray:
            actions += self._spray_tick(now)
            self._next_spray = now + TICK
        return actions

    def _spray_tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        size = self._probe_size
        while self._spray.packets < self._spray.max_packets:
            if not self._spray.spend(size):
                return out
            port = next(self._ports, None)
            if port is None:
                break
            self.stats.sprayed += 1
            self._index[(self.host, port)] = self.stats.sprayed
            out.append(self._probe(now, (self.host, port)))
        self._spraying = False
        return out

    def packet_received(self, now: float, packet: PunchPacket, source: Address) -> list[Action]:
        actions = super().packet_received(now, packet, source)
        if self.stats.landed_at is None and any(isinstance(a, Verified) for a in actions):
            self.stats.landed_at = self._index.get(source)
        return actions

    def _failure_reason(self) -> str:
        return (
            f"{super()._failure_reason()}; birthday: sprayed {self.stats.sprayed} probes at random ports of "
            f"{self.host} (at most {self._spray.max_packets}) and none was answered"
        )


#: The spray's burst, in ticks' worth of probes: a tick that runs late (a busy
#: reactor) catches up on the ones it missed, so the rate holds on average.
SPRAY_BURST_TICKS = 4


def spray_budget(clock: IReactorTime, config: BirthdayConfig, probe_size: int = 64) -> ProbeBudget:
    """The easy side's bound: C{config.probes} datagrams in all, C{config.rate} a second (a few ticks' burst)."""
    return ProbeBudget(
        clock,
        None,
        max_packets=config.probes,
        max_bytes=config.probes * probe_size,
        rate=config.rate,
        burst=max(1.0, config.rate * TICK * SPRAY_BURST_TICKS),
    )


def punch_birthday_probe(
    endpoint: PunchEndpoint,
    session: PunchSession,
    candidates: Iterable[Address],
    clock: IReactorTime,
    host: str,
    quic: QuicSetup,
    *,
    start_delay: float = 0.0,
    schedule: ProbeSchedule = ProbeSchedule(),
    config: BirthdayConfig = BirthdayConfig(),
    ports: Iterable[int] | None = None,
    budget: ProbeBudget | None = None,
    nonce_source: NonceSource = random_nonce,
) -> Deferred[UDPPeerConnection]:
    """
    The easy side of a birthday punch: punch the peer's C{candidates} from
    C{endpoint}'s socket as usual, and spray probes at random ports of the
    peer's public IP C{host} (C{ports}: default L{random_ports}, never the
    candidates' own).  QUIC runs on the path that answers.  C{budget}
    bounds the plain probes, as for L{natbypass.punch.udp.punch_udp}.
    """
    candidates = list(candidates)
    if ports is None:
        ports = random_ports(config.probes, (p for h, p in candidates if h == host))
    machine = BirthdayProber(
        session,
        candidates,
        clock.seconds() + start_delay,
        host,
        ports,
        spray_budget(clock, config),
        schedule,
        nonce_source,
        budget=budget,
    )
    return quic.attempt(endpoint, session, machine, clock).deferred


class _OpeningMachine(UDPPunchMachine):
    """One extra socket's punch (hard side): tells C{landed} when a packet first proves the session key."""

    def __init__(self, *args, landed: Callable[[], None], **kw) -> None:
        super().__init__(*args, **kw)
        self._landed = landed

    def _verified(self, source: Address) -> list[Action]:
        first = not self.verified
        actions = super()._verified(source)
        if first and self.verified:
            self._landed()
        return actions


def open_sockets(
    reactor, count: int, bind_host: str = "", port_range: PortRange | None = None
) -> list[tuple[PunchEndpoint, IListeningPort]]:
    """
    Up to C{count} UDP sockets with a L{PunchEndpoint} each (from
    C{port_range} when given): fewer when the range or the system runs
    out, which the caller reports.
    """
    out: list[tuple[PunchEndpoint, IListeningPort]] = []
    for _ in range(count):
        endpoint = PunchEndpoint()
        endpoint.noisy = False  # no "starting on" / "stopping" log line for each of hundreds
        try:
            port = bind_udp(reactor, endpoint, port_range, bind_host)
        except (CandidateError, OSError):
            break
        out.append((endpoint, port))
    return out


class BirthdayOpen:
    """
    The hard side of a birthday punch: the plain punch on the main socket,
    plus one on each extra socket towards the easy side's mapped address
    C{target} (probes every L{OPEN_INTERVAL}, all of them within one budget).
    The first attempt to connect wins.  The first extra socket a packet of
    the session reaches (the easy side's probe landed) keeps its attempt and
    every other extra socket is closed at once; the winner's socket closes
    with its connection; all close on failure or cancel.
    """

    log = Logger()

    def __init__(
        self,
        main: UDPPunchAttempt,
        sockets: Sequence[tuple[PunchEndpoint, IListeningPort]],
        make_attempt: Callable[[PunchEndpoint, Callable[[], None]], UDPPunchAttempt],
        target: Address,
        budget: ProbeBudget,
        role: int = 1,
    ) -> None:
        self._main = main
        self._role = role
        self._main_first = False
        self._target = target
        self._budget = budget
        self._attempts: list[tuple[UDPPunchAttempt, IListeningPort | None]] = [(main, None)]
        self._main_reason = ""
        self._landed_reason: str | None = None
        self._done = False
        #: The extra socket the easy side's probe reached first, if any.
        self.landed: IListeningPort | None = None
        self.deferred: Deferred[UDPPeerConnection] = Deferred(lambda d: self._stop(None))
        self._ports: list[IListeningPort] = [port for _, port in sockets]
        for endpoint, port in sockets:
            attempt = make_attempt(endpoint, lambda port=port: self._landed(port))
            self._attempts.append((attempt, port))
        self.opened = len(sockets)
        for attempt, port in list(self._attempts):
            attempt.deferred.addCallbacks(self._won, self._lost, callbackArgs=(port,), errbackArgs=(attempt, port))

    def mainReached(self) -> None:
        """A packet of the session reached the main socket (its plain punch found a path)."""
        if self.landed is None and not self._done and self._role == 0:
            # The QUIC client stays on the main socket: no extra socket's may start.
            self._main_first = True
            self._close(keep=None)

    def _landed(self, port: IListeningPort) -> None:
        if self.landed is not None or self._done or self._main_first:
            return
        self.landed = port
        self.log.info("birthday: a probe landed on local port {port}; closing the other sockets", port=port.getHost())
        self._close(keep=port)
        if self._role == 0 and not self._main.deferred.called:
            # One QUIC client only: the easy side answers a newer Initial by
            # dropping a pending handshake, so two of ours (the main socket's
            # and this one's) could each end on a connection the other dropped.
            self._main.deferred.cancel()

    def _close(self, keep: IListeningPort | None) -> None:
        """Cancel the attempt of, and close, every extra socket but C{keep}."""
        attempts, self._attempts = self._attempts, []
        for attempt, port in attempts:
            if port is None or port is keep:
                self._attempts.append((attempt, port))
            elif not attempt.deferred.called:
                attempt.deferred.cancel()
        ports, self._ports = self._ports, []
        for port in ports:
            if port is keep:
                self._ports.append(port)
            else:
                port.stopListening()

    def _won(self, conn: UDPPeerConnection, port: IListeningPort | None) -> None:
        if self._done:
            conn.close()
            return
        if port is not None:
            conn.whenLost().addBoth(lambda _: port.stopListening())
        self._stop(port)
        self.deferred.callback(conn)

    def _lost(self, failure: Failure, attempt: UDPPunchAttempt, port: IListeningPort | None) -> None:
        if failure.check(CancelledError) or self._done:
            return
        reason = failure.value.reason if isinstance(failure.value, PunchFailed) else str(failure.value)
        if attempt is self._main:
            self._main_reason = reason
        elif port is self.landed:
            # The guess that landed failed afterwards (its QUIC handshake): the
            # other extra sockets are gone, so the birthday punch is over now.
            self._landed_reason = reason
            self._stop(None)
            self.deferred.errback(PunchFailed("udp", self._why()))
            return
        self._attempts = [(a, p) for a, p in self._attempts if a is not attempt]
        if any(not a.deferred.called for a, _ in self._attempts):
            return
        self._stop(None)
        self.deferred.errback(PunchFailed("udp", self._why()))

    def _why(self) -> str:
        opened = (
            f"birthday: opened {self.opened} extra sockets towards {format_address(self._target)} "
            f"and sent {self._budget.packets} probes from them"
        )
        if self._landed_reason is not None:
            return f"{opened}; the peer's probe reached one, then: {self._landed_reason}"
        return f"{self._main_reason}; {opened}; none was reached by the peer's probes"

    def _stop(self, keep: IListeningPort | None) -> None:
        """Everything but the winner goes: attempts cancelled, extra sockets closed."""
        self._done = True
        self._close(keep)
        main, self._attempts = self._attempts, []
        for attempt, _ in main:
            if not attempt.deferred.called:
                attempt.deferred.cancel()


def open_budget(clock: IReactorTime, sockets: int, timeout: float, probe_size: int = 64) -> ProbeBudget:
    """The hard side's bound: one probe per socket per L{OPEN_INTERVAL}, for the attempt's C{timeout}."""
    rounds = max(1, math.ceil(timeout / OPEN_INTERVAL))
    return ProbeBudget(
        clock,
        None,
        max_packets=sockets * rounds,
        max_bytes=sockets * rounds * probe_size,
        rate=sockets / OPEN_INTERVAL,
        burst=float(max(1, sockets)),
    )


def punch_birthday_open(
    reactor,
    clock: IReactorTime,
    endpoint: PunchEndpoint,
    session: PunchSession,
    candidates: Iterable[Address],
    target: Address,
    quic: QuicSetup,
    *,
    start_delay: float = 0.0,
    schedule: ProbeSchedule = ProbeSchedule(),
    config: BirthdayConfig = BirthdayConfig(),
    bind_host: str = "",
    port_range: PortRange | None = None,
    budget: ProbeBudget | None = None,
    nonce_source: NonceSource = random_nonce,
) -> Deferred[UDPPeerConnection]:
    """
    The hard side of a birthday punch (L{BirthdayOpen}): the plain punch
    from C{endpoint} (C{reactor} is also the clock), and C{config.sockets}
    extra sockets bound now with C{reactor}, each probing the easy side's
    mapped address C{target} from the start time on.
    """
    start_at = clock.seconds() + start_delay
    opened: list[BirthdayOpen] = []
    main = quic.attempt(
        endpoint,
        session,
        _OpeningMachine(
            session,
            candidates,
            start_at,
            schedule,
            nonce_source,
            budget=budget,
            landed=lambda: opened and opened[0].mainReached(),
        ),
        clock,
    )
    sockets = open_sockets(reactor, config.sockets, bind_host, port_range)
    if len(sockets) < config.sockets:
        BirthdayOpen.log.warn(
            "birthday: opened {opened} of {wanted} extra sockets (the port range or the system ran out)",
            opened=len(sockets),
            wanted=config.sockets,
        )
    shared = open_budget(clock, len(sockets), schedule.timeout)
    opening = ProbeSchedule(OPEN_INTERVAL, 0.0, 1.0, OPEN_INTERVAL, schedule.timeout)

    def make_attempt(extra: PunchEndpoint, landed: Callable[[], None]) -> UDPPunchAttempt:
        machine = _OpeningMachine(
            session, [target], start_at, opening, nonce_source, max_learned=1, budget=shared, landed=landed
        )
        return quic.attempt(extra, session, machine, clock)

    opened.append(BirthdayOpen(main, sockets, make_attempt, target, shared, session.role))
    return opened[0].deferred


class BirthdayLimiter:
    """
    A peer runs at most C{limit} birthday punches at a time (either side):
    a hostile mediator that introduces many sessions cannot make it open
    thousands of sockets or spray thousands of probes at once.
    """

    def __init__(self, limit: int = 1) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> bool:
        """Start one if there is room (True); the caller must L{release} it."""
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)

    def run(self, start: Callable[[], Deferred]) -> Deferred:
        """C{start()} within the limit (released when its Deferred fires), or a L{PunchFailed} at once."""
        if not self.acquire():
            failed: Deferred = Deferred()
            failed.errback(
                PunchFailed("udp", f"another birthday punch is under way (at most {self.limit} at a time): try again")
            )
            return failed
        try:
            d = start()
        except BaseException:
            self.release()
            raise

        def done(result):
            self.release()
            return result

        return d.addBoth(done)

"""
Path migration and fast dead-path detection for an established UDP path
(QUIC on a punched 5-tuple).

When a NAT on the way rebinds (its mapping expired, its conntrack was
flushed, the router restarted), the peer's packets arrive from a new public
address:port.  QUIC already knows what to do (RFC 9000 section 9): an
authenticated packet from a new address makes the engine send there and
validate the new path with PATH_CHALLENGE.  What this module adds is what
the engine cannot do alone:

- L{PathFollower} lets such packets reach the engine at all (the punch
  endpoint routes QUIC by source address; an established path registers its
  connection ids so a short-header packet from an unknown address is handed
  to it), bounds what it lets through (a token bucket of trials, and
  L{MoveBudget}: how often the path may move to an address it never used),
  and moves the endpoint's route when the engine moved the path.
- L{PathWatch} notices a dead path in seconds rather than at QUIC's idle
  timeout: while data flows (or flowed within the keepalive interval), a
  silence longer than a few round trips makes it send a PING; a PING
  unanswered within a bound derived from the round trip makes the path
  I{suspect}, and it keeps probing.  The probes are the recovery: sent
  through the rebinding NAT, they open its new mapping, so the peer's engine
  migrates to it and the path continues on the new 5-tuple.

Nothing unauthenticated moves a path: the engine moves only for a packet
that decrypts under the connection's keys and is the newest it has seen
(a replay is a duplicate and is dropped), and L{PathFollower} feeds it only
packets that carry one of the connection's own ids.  See C{docs/security.md},
"Path migration".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from natbypass.address import format_address
from natbypass.punch.mux import Address, PunchEndpoint
from natbypass.ratelimit import TokenBucket
from natbypass.secure.quic import QuicChannel

#: How many times a path may move to an address it never used, per L{MOVE_WINDOW} seconds.
MAX_MOVES = 4
MOVE_WINDOW = 60.0
#: Packets from unrouted addresses (with our connection id) the engine may try, per second, and at once.
TRIAL_RATE = 64.0
TRIAL_BURST = 64.0


class MoveBudget:
    """
    How often a path may move to a new address: at most C{limit} moves in
    any C{window} seconds.  Pure: told the time, it keeps the times of the
    moves that still count.
    """

    def __init__(self, limit: int = MAX_MOVES, window: float = MOVE_WINDOW) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("a move budget allows at least one move in a positive window")
        self.limit = limit
        self.window = window
        self._moves: deque[float] = deque()

    def _forget(self, now: float) -> None:
        while self._moves and now - self._moves[0] >= self.window:
            self._moves.popleft()

    def allows(self, now: float) -> bool:
        """May the path move now?"""
        self._forget(now)
        return len(self._moves) < self.limit

    def record(self, now: float) -> None:
        """The path moved at C{now}."""
        self._forget(now)
        self._moves.append(now)


@dataclass(frozen=True)
class WatchBounds:
    """
    The bounds of a L{PathWatch}, in seconds and round trips: probe after a
    silence of C{quiet_rtts} round trips (at least C{quiet_min}), and call
    the path suspect when a probe is unanswered after C{answer_rtts} round
    trips (between C{answer_min} and C{answer_max}).
    """

    quiet_min: float = 1.0
    quiet_rtts: float = 4.0
    answer_min: float = 0.5
    answer_rtts: float = 3.0
    answer_max: float = 3.0


@dataclass(frozen=True)
class WatchStep:
    """
    What one L{PathWatch.poll} decided: send a probe (a PING); the path just
    became suspect after C{suspect} seconds of silence; it answered again
    after a stall of C{recovered} seconds; poll again at C{wake}.
    """

    probe: bool
    suspect: float | None
    recovered: float | None
    wake: float


class PathWatch:
    """
    Decides when to probe a path and when it is suspect.  Pure and
    clock-free: each L{poll} is told the time, when the peer was last heard
    from (any authenticated data, or the answer to a probe) and when
    application data last went either way.

    It probes only while the path is in use: data within C{active_window}
    seconds (the keepalive interval: an idle path has its keepalive), or
    while it is suspect.  A probe costs one small packet, at most one per
    answer timeout.

    @ivar suspects: how many times the path went silent past a probe's answer time.
    @ivar recoveries: how many of those ended with the peer heard again.
    @ivar last_stall: the silence, in seconds, that the last recovery ended.
    """

    def __init__(self, active_window: float, bounds: WatchBounds = WatchBounds()) -> None:
        self.active_window = active_window
        self.bounds = bounds
        #: The path's smoothed round trip, when known.
        self.rtt: float | None = None
        self.probe_sent: float | None = None
        self.suspect_since: float | None = None
        self.suspects = 0
        self.recoveries = 0
        self.last_stall: float | None = None

    @property
    def quiet(self) -> float:
        """The silence after which a path in use is probed."""
        b = self.bounds
        q = b.quiet_min if self.rtt is None else max(b.quiet_min, b.quiet_rtts * self.rtt)
        return min(q, self.active_window)

    @property
    def answer_timeout(self) -> float:
        """How long a probe's answer may take before the path is suspect."""
        b = self.bounds
        t = b.answer_min if self.rtt is None else max(b.answer_min, b.answer_rtts * self.rtt)
        return min(t, b.answer_max)

    @property
    def suspect(self) -> bool:
        return self.suspect_since is not None

    def poll(self, now: float, heard_at: float, data_at: float) -> WatchStep:
        recovered = None
        if self.probe_sent is not None and heard_at >= self.probe_sent:
            self.probe_sent = None
        if self.suspect_since is not None and heard_at > self.suspect_since:
            recovered = heard_at - self.suspect_since
            self.recoveries += 1
            self.last_stall = recovered
            self.suspect_since = None
        probe = False
        suspect = None
        if self.probe_sent is not None:
            if now - self.probe_sent >= self.answer_timeout:
                if self.suspect_since is None:
                    self.suspect_since = heard_at
                    self.suspects += 1
                    suspect = now - heard_at
                probe = True
        elif now - heard_at >= self.quiet and (now - data_at <= self.active_window or self.suspect):
            probe = True
        if probe:
            self.probe_sent = now
        if self.probe_sent is not None:
            wake = self.probe_sent + self.answer_timeout
        else:
            wake = max(now, heard_at) + self.quiet
        return WatchStep(probe, suspect, recovered, wake)


@dataclass(frozen=True)
class PathMove:
    """The path moved from C{old} to C{new} at C{at} (the clock's seconds)."""

    at: float
    old: Address
    new: Address


class PathFollower:
    """
    Keeps one established QUIC channel on its path: routes its packets from
    new addresses by connection id (bounded), follows the engine when it
    migrates, and runs its L{PathWatch}.

    Made by L{natbypass.punch.udp.UDPPeerConnection}; L{stop} when the
    channel ends.

    @param on_move: called with (old, new) after the path moved.
    @param on_suspect: called with the silence in seconds when the path became suspect.
    @ivar moves: every L{PathMove}, in order.
    @ivar throttled: packets from new addresses dropped for the trial rate.
    @ivar refused: packets from new addresses dropped because the path moved too often.
    """

    log = Logger()

    def __init__(
        self,
        channel: QuicChannel,
        endpoint: PunchEndpoint,
        clock: IReactorTime,
        keepalive_interval: float,
        on_move: Callable[[Address, Address], object] | None = None,
        on_suspect: Callable[[float], object] | None = None,
        *,
        budget: MoveBudget | None = None,
        trial_rate: float = TRIAL_RATE,
        trial_burst: float = TRIAL_BURST,
        bounds: WatchBounds = WatchBounds(),
    ) -> None:
        self._channel = channel
        self._endpoint = endpoint
        self._clock = clock
        self._on_move = on_move
        #: Called with the silence in seconds when the path became suspect (the re-punch hooks in here).
        self.on_suspect = on_suspect
        self._budget = budget if budget is not None else MoveBudget()
        self._trials = TokenBucket(clock, trial_rate, trial_burst)
        #: The addresses the path used last (current last): moving back to one
        #: is free.  One more than the budget's moves, so the address the path
        #: had before a burst of moves stays known however the budget was spent.
        self._known: deque[Address] = deque([channel.remote], maxlen=self._budget.limit + 1)
        self._cids: set[bytes] = set()
        self.moves: list[PathMove] = []
        self.throttled = 0
        self.refused = 0
        self.watch = PathWatch(keepalive_interval, bounds)
        self._stopped = False
        channel.onMove = self._moved
        channel.onCids = self._routeCids
        self._routeCids()
        self._timer: IDelayedCall | None = clock.callLater(self.watch.quiet, self._tick)

    @property
    def remote(self) -> Address:
        return self._channel.remote

    def _routeCids(self) -> None:
        if self._stopped:
            return
        current = set(self._channel.host_cids)
        for cid in self._cids - current:
            self._endpoint.unrouteCid(cid, self)
        for cid in current - self._cids:
            self._endpoint.routeCid(cid, self)
        self._cids = current

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        """A short-header packet with one of our connection ids, from an address not routed to the channel."""
        if self._stopped:
            return
        if not self._trials.take():
            self.throttled += 1
            return
        if addr not in self._known and not self._budget.allows(self._clock.seconds()):
            self.refused += 1
            return
        self._channel.datagramReceived(data, addr)

    def _moved(self, old: Address, new: Address) -> None:
        now = self._clock.seconds()
        if new not in self._known:
            self._budget.record(now)
        if new in self._known:
            self._known.remove(new)
        self._known.append(new)
        self._endpoint.unrouteQuic(old, self._channel)
        self._endpoint.routeQuic(new, self._channel)
        self.moves.append(PathMove(now, old, new))
        # An ack-eliciting packet on the new path at once: its ACK makes the
        # engine declare what it sent towards the old address lost and resend
        # it now, rather than at its next (backed-off) probe timeout.
        self._channel.ping()
        self.log.info(
            "UDP path moved from {old} to {new} (the peer's NAT rebound)",
            old=format_address(old),
            new=format_address(new),
        )
        if self._on_move is not None:
            self._on_move(old, new)

    def _tick(self) -> None:
        self._timer = None
        if self._stopped:
            return
        channel = self._channel
        now = self._clock.seconds()
        self.watch.rtt = channel.rtt
        step = self.watch.poll(now, channel.heard_at, channel.data_at)
        if step.recovered is not None:
            self.log.info(
                "the path to {remote} answers again after {stall:.2f} s",
                remote=format_address(channel.remote),
                stall=step.recovered,
            )
        if step.suspect is not None:
            self.log.warn(
                "nothing from {remote} for {silence:.2f} s and no answer to a PING within {timeout:.2f} s: "
                "the path is suspect; probing",
                remote=format_address(channel.remote),
                silence=step.suspect,
                timeout=self.watch.answer_timeout,
            )
            if self.on_suspect is not None:
                self.on_suspect(step.suspect)
        if step.probe:
            channel.ping()
        if not self._stopped:
            self._timer = self._clock.callLater(max(0.0, step.wake - self._clock.seconds()), self._tick)

    def stop(self) -> None:
        """The channel ended: no more routes or timers."""
        if self._stopped:
            return
        self._stopped = True
        for cid in self._cids:
            self._endpoint.unrouteCid(cid, self)
        self._cids = set()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

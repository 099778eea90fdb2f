"""
Re-punching an established UDP path through the mediator (issue 12).

QUIC connection migration (L{natbypass.punch.migration}) follows a peer
whose NAT rebound only when the new packets get in.  A peer behind a NAT
that filters by address I{and port} drops them: its filter opened towards
the old port only.  Both sides then fall silent and L{PathWatch} calls the
path suspect within seconds.  The re-punch opens that filter without a new
connection:

1. the suspect side learns its current mapped address by STUN from the
   path's own socket (only meaningful when its NAT maps independently of the
   destination: then that address is exactly the one the peer sees);
2. it asks the mediator to re-punch the session (C{repunch}, naming the
   session and that address); the mediator checks that it is one of the
   session's two peers and tells the other (a C{repunch} notice);
3. the other side sends a few authenticated punch probes (session key) from
   the path's socket to that address: its NAT's filter now lets the new port
   in, and the rebinding side's next PING, which L{PathWatch} keeps sending
   while the path is suspect, moves the path (QUIC migration, as before).

The application sees nothing but a stall: the same connection and streams.
Without an address (a NAT whose mapping depends on the destination) the
notice makes the other side probe the path's current remote address only;
following a random-port symmetric NAT needs a birthday re-punch, not built.

Bounded: L{RepunchPlan} asks at most once per C{ask_interval} while the
path is suspect and at most C{max_asks} times a window; it honours at most
C{max_notices} notices a window, each worth C{probes} small packets; the
mediator allows C{REPUNCH_BUDGET} re-punches of a session a minute and only
an address at the asking peer's own signalling address (docs/security.md).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from natbypass.address import format_address
from natbypass.punch import candidates, packet
from natbypass.punch.migration import MoveBudget
from natbypass.punch.mux import Address
from natbypass.punch.session import PunchSession


@dataclass(frozen=True)
class RepunchBounds:
    """How often a path asks for a re-punch and how much a notice may make it send."""

    #: Seconds between two asks while the path stays suspect.
    ask_interval: float = 5.0
    #: Seconds before asking again after an ask failed (a NAT that rebound also broke our signalling
    #: connection: the client reconnects, and the next ask goes on the new connection).
    failure_retry: float = 1.0
    #: Asks (and honoured notices) per C{window} seconds.
    max_asks: int = 4
    max_notices: int = 4
    window: float = 60.0
    #: Probes sent for one notice, C{probe_spacing} seconds apart.
    probes: int = 5
    probe_spacing: float = 0.1


class RepunchPlan:
    """
    When to ask for a re-punch and whether to honour a notice.  Pure: told
    the time; it keeps only the recent asks and notices.
    """

    def __init__(self, bounds: RepunchBounds = RepunchBounds()) -> None:
        self.bounds = bounds
        self._asks = MoveBudget(bounds.max_asks, bounds.window)
        self._notices = MoveBudget(bounds.max_notices, bounds.window)
        self._last_ask: float | None = None
        self.asked = 0
        self.honoured = 0
        self.ignored = 0

    def ask(self, now: float) -> bool:
        """The path is suspect at C{now}: ask the mediator now?"""
        if self._last_ask is not None and now - self._last_ask < self.bounds.ask_interval:
            return False
        if not self._asks.allows(now):
            return False
        self._asks.record(now)
        self._last_ask = now
        self.asked += 1
        return True

    def failed(self) -> None:
        """The last ask did not reach the mediator, or it said no: the next may come sooner (still budgeted)."""
        self._last_ask = None

    def notice(self, now: float) -> bool:
        """The peer asked for a re-punch: probe?"""
        if not self._notices.allows(now):
            self.ignored += 1
            return False
        self._notices.record(now)
        self.honoured += 1
        return True


def probe_packet(session: PunchSession, nonce: int | None = None) -> bytes:
    """One PROBE of C{session}, authenticated with its key, as the punch sends them."""
    if nonce is None:
        nonce = struct.unpack("!Q", os.urandom(8))[0]
    return packet.encode(packet.PacketType.PROBE, session.role, session.sid, nonce, session.key)


class Repuncher:
    """
    The re-punch of one UDP path: asks when its L{PathFollower} calls it
    suspect, probes when the peer asks.

    @param learn: our current mapped address, learnt by STUN from the path's
        socket, or None when it would not be the peer's view of us (a NAT
        whose mapping depends on the destination); may return a Deferred.
    @param ask: sends the C{repunch} request (session id, our address or None);
        returns a Deferred.
    @param send: sends one datagram from the path's socket.
    @param remote: the path's current remote address.
    @param still_suspect: is the path still suspect (the follower's watch)?
        Asks are repeated only while it is.
    @param refusal: why a notice's address must not be probed, or None (the
        peer's candidate screening, L{candidates.refusal}); an address of
        the other family than the path's is refused too.
    """

    log = Logger()

    def __init__(
        self,
        session: PunchSession,
        clock: IReactorTime,
        learn: Callable[[], Any],
        ask: Callable[[str, Address | None], Any],
        send: Callable[[bytes, Address], None],
        remote: Callable[[], Address],
        still_suspect: Callable[[], bool],
        bounds: RepunchBounds = RepunchBounds(),
        refusal: Callable[[str], str | None] = candidates.refusal,
    ) -> None:
        self.session = session
        self._refusal = refusal
        #: Notices whose address the screening refused (nothing sent).
        self.refused = 0
        self._clock = clock
        self._learn = learn
        self._ask = ask
        self._send = send
        self._remote = remote
        self._still_suspect = still_suspect
        self.plan = RepunchPlan(bounds)
        self._stopped = False
        self._timers: list[IDelayedCall] = []
        self._retry: IDelayedCall | None = None
        #: Probes sent for notices.
        self.probes_sent = 0
        #: Asks that failed (STUN, or the mediator said no), and why the last one did.
        self.failures = 0
        self.last_failure: str | None = None

    def suspect(self, silence: float = 0.0) -> None:
        """The path went silent (L{PathFollower}'s C{on_suspect}): ask now, and again while it stays so."""
        if self._stopped or (self._retry is not None and self._retry.active()):
            return
        self._tryAsk()

    def _tryAsk(self) -> None:
        self._retry = None
        if self._stopped or not self._still_suspect():
            return
        if self.plan.ask(self._clock.seconds()):
            d = defer.maybeDeferred(self._learn)
            d.addErrback(self._noMapping)
            d.addCallback(self._asking)
            d.addErrback(self._askFailed)
        self._retry = self._clock.callLater(self.plan.bounds.ask_interval, self._tryAsk)

    def _noMapping(self, f: Failure) -> None:
        self.log.info("no mapping by STUN for the re-punch: {error}", error=f.getErrorMessage())
        return None

    def _asking(self, mapped: Address | None) -> Any:
        if self._stopped:
            return None
        self.log.info(
            "asking the mediator to re-punch session {session} (our address {mapped})",
            session=self.session.session_id,
            mapped="unknown" if mapped is None else format_address(mapped),
        )
        return self._ask(self.session.session_id, mapped)

    def _askFailed(self, f: Failure) -> None:
        self.failures += 1
        self.last_failure = f"{type(f.value).__name__}: {f.getErrorMessage()}"[:200]
        self.log.warn("the re-punch request failed: {error}", error=f.getErrorMessage())
        self.plan.failed()
        if self._stopped:
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = self._clock.callLater(self.plan.bounds.failure_retry, self._tryAsk)

    def noticed(self, target: Address | None) -> None:
        """The peer asked for a re-punch: probe C{target} (its new address), or the path's remote."""
        if self._stopped:
            return
        if target is not None:
            # The mediator vouches for this address: screen it as the punch screens candidates.
            why = self._refusal(target[0])
            if why is None and (":" in target[0]) != (":" in self._remote()[0]):
                why = "not the path's address family"
            if why is not None:
                self.refused += 1
                self.log.warn("ignoring a re-punch notice to {where}: {why}", where=format_address(target), why=why)
                return
        if not self.plan.notice(self._clock.seconds()):
            self.log.info("ignoring a re-punch notice for {session}: too many", session=self.session.session_id)
            return
        where = target if target is not None else self._remote()
        self.log.info(
            "the peer asks to re-punch session {session}: probing {where}",
            session=self.session.session_id,
            where=format_address(where),
        )
        b = self.plan.bounds
        self._probe(where)
        for i in range(1, b.probes):
            self._timers.append(self._clock.callLater(i * b.probe_spacing, self._probe, where))

    def _probe(self, where: Address) -> None:
        self._timers = [t for t in self._timers if t.active()]
        if self._stopped:
            return
        self.probes_sent += 1
        self._send(probe_packet(self.session), where)

    def stop(self) -> None:
        """The path ended."""
        self._stopped = True
        for t in [*self._timers, self._retry]:
            if t is not None and t.active():
                t.cancel()
        self._timers = []
        self._retry = None


class RepunchRegistry:
    """
    The re-punchers of a peer's UDP paths by session id, so a notice from
    the mediator reaches its path; a notice for any other session is
    counted and dropped.
    """

    log = Logger()

    def __init__(self) -> None:
        self._paths: dict[str, Repuncher] = {}
        self.unknown = 0

    def __len__(self) -> int:
        return len(self._paths)

    def add(self, repuncher: Repuncher) -> None:
        self._paths[repuncher.session.session_id] = repuncher

    def remove(self, repuncher: Repuncher) -> None:
        repuncher.stop()
        if self._paths.get(repuncher.session.session_id) is repuncher:
            del self._paths[repuncher.session.session_id]

    def get(self, session_id: str) -> Repuncher | None:
        return self._paths.get(session_id)

    def noticed(self, session_id: str, target: Address | None) -> None:
        r = self._paths.get(session_id)
        if r is None:
            self.unknown += 1
            self.log.debug("a re-punch notice for session {session}, not one of our paths", session=session_id)
            return
        r.noticed(target)


def attach(
    conn: Any,
    session: PunchSession,
    registry: RepunchRegistry,
    clock: IReactorTime,
    learn: Callable[[], Any],
    ask: Callable[[str, Address | None], Any],
    send: Callable[[bytes, Address], None],
    refusal: Callable[[str], str | None] = candidates.refusal,
) -> Repuncher:
    """
    Give UDP connection C{conn} (its C{path}, a L{PathFollower}) a
    L{Repuncher}: asked when the path turns suspect, told of the peer's
    notices through C{registry}, stopped when the connection is lost.
    """
    path = conn.path
    r = Repuncher(session, clock, learn, ask, send, lambda: path.remote, lambda: path.watch.suspect, refusal=refusal)
    path.on_suspect = r.suspect
    registry.add(r)
    conn.whenLost().addBoth(lambda result: (registry.remove(r), result)[1])
    return r

"""
Resending a QUIC handshake flight on the punch's clock, not QUIC's.

A QUIC engine made before the punch measured the path's round trip (the
client's speculative first flight, the server's answer to it) starts its
loss timers from a guess (qh3: 333 ms, so a first probe timeout near 0.7
s, doubling).  And a server whose flight is lost backs off on its own
timeouts while the client, which has heard nothing it could acknowledge,
stays silent.  At 10% loss per link (about 19% between the peers) that is
what made one UDP connect in ten miss 2 s (docs/reliability.md).

L{FlightResender} keeps the last datagrams a channel sent before its
handshake moved on (its latest flight), and sends exactly those bytes again at 2R, 4R, 8R, ...
after the last send (R: the punch's round trip, or L{GUESS_RTT} until it is
measured), while its C{wanted} says the handshake still waits for them; and
at once when the peer sends a datagram it sent before (it repeats its
flight: it has not heard ours).  A byte-identical datagram is a
duplicate QUIC packet for the receiver: dropped if it had it, the missing
piece if not.  Bounded: at most L{MAX_DATAGRAMS} datagrams kept, and
L{MAX_RESENDS} resends, only to an address that proved the session key.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: The last this many datagrams are kept (a flight is one to four).
MAX_DATAGRAMS = 6
#: At most this many resends of the recorded flight.
MAX_RESENDS = 4
#: The first resend waits this many round trips after the last send; each next one twice as long.
FIRST_WAIT_RTTS = 2.0
#: The least wait before a resend, whatever the round trip.
MIN_WAIT = 0.05
#: The round trip assumed until the punch has measured one (a third of qh3's guess).
GUESS_RTT = 0.1
#: How many of the peer's datagrams are remembered to recognise a repeat.
MAX_SEEN = 16


class FlightResender:
    """
    The resends of one QUIC channel's handshake flight (see the module
    docstring).  C{send} puts one datagram on the path; C{wanted} says
    whether a resend is still useful (the handshake has not moved on, the
    address is proven).
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Callable[[bytes], None],
        wanted: Callable[[], bool],
        max_datagrams: int = MAX_DATAGRAMS,
        max_resends: int = MAX_RESENDS,
    ) -> None:
        self._clock = clock
        self._send = send
        self._wanted = wanted
        self._max_resends = max_resends
        self.datagrams: deque[bytes] = deque(maxlen=max_datagrams)
        #: How many times the flight was sent again.
        self.resends = 0
        self._rtt: float | None = None
        self._last: float | None = None
        self._timer: IDelayedCall | None = None
        self._stopped = False
        self._seen: set[int] = set()

    def sent(self, data: bytes) -> None:
        """The channel sent C{data}: kept as part of its latest flight."""
        if self._stopped:
            return
        self._last = self._clock.seconds()
        self.datagrams.append(data)
        self._arm(reset=True)

    def received(self, data: bytes) -> None:
        """
        The peer sent C{data}: if it sent the same bytes before, it is
        repeating its flight because ours did not reach it; resend ours now
        (no sooner than L{MIN_WAIT} after our last send).
        """
        if self._stopped:
            return
        digest = hash(data)
        if digest not in self._seen:
            if len(self._seen) < MAX_SEEN:
                self._seen.add(digest)
            return
        if self._last is not None and self._clock.seconds() - self._last < MIN_WAIT:
            return
        self._cancel()
        self._fire()

    def knowRtt(self, rtt: float) -> None:
        """The punch measured the path's round trip: it times the resends from now on."""
        if self._rtt is None:
            self._rtt = rtt
            self._arm(reset=True)

    def stop(self) -> None:
        """No more resends (the handshake finished, the channel was dropped, the attempt ended)."""
        self._stopped = True
        self._cancel()

    def _wait(self) -> float:
        rtt = GUESS_RTT if self._rtt is None else self._rtt
        return max(MIN_WAIT, FIRST_WAIT_RTTS * rtt) * 2**self.resends

    def _arm(self, reset: bool = False) -> None:
        if reset:
            self._cancel()
        if (
            self._stopped
            or self._timer is not None
            or self._last is None
            or not self.datagrams
            or self.resends >= self._max_resends
        ):
            return
        delay = max(0.0, self._last + self._wait() - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._fire)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._stopped or self.resends >= self._max_resends or not self._wanted():
            return
        self.resends += 1
        self._last = self._clock.seconds()
        for data in list(self.datagrams):
            self._send(data)
        self._arm()

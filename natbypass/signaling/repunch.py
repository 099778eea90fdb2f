"""
The mediator's memory of established sessions, for re-punching (issue 12;
docs/protocol.md, "Re-punch"): which two peers a session joined, so that
only they may ask to re-punch it, and how often they did.

Pure and clock-free: every call is told the time.  Bounded: at most
C{limit} sessions remembered (the oldest forgotten first), each for
C{ttl} seconds after it was made or last re-punched, and at most
C{budget} re-punches of one session in any C{window} seconds.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field

#: Sessions remembered at once; a session costs about 200 bytes.
MAX_PATHS = 100_000
#: How long a session can be re-punched after it was made or last re-punched (seconds).
PATH_TTL = 3600.0
#: Re-punches of one session per window: a rebinding NAT needs one, a flapping one a few.
REPUNCH_BUDGET = 4
REPUNCH_WINDOW = 60.0


@dataclass
class PathRecord:
    """The two peers of one session, when it stops being re-punchable, and its recent re-punches."""

    peers: tuple[str, str]
    expires: float
    recent: deque[float] = field(default_factory=deque)


class PathTable:
    """Sessions that may be re-punched, in expiry order (so the sweep looks only at the front)."""

    def __init__(
        self,
        limit: int = MAX_PATHS,
        ttl: float = PATH_TTL,
        budget: int = REPUNCH_BUDGET,
        window: float = REPUNCH_WINDOW,
    ) -> None:
        self.limit = limit
        self.ttl = ttl
        self.budget = budget
        self.window = window
        self._paths: dict[str, PathRecord] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def add(self, session: str, a: str, b: str, now: float) -> None:
        """Session C{session} joined peers C{a} and C{b}."""
        self._paths.pop(session, None)
        self._paths[session] = PathRecord((a, b), now + self.ttl)
        while len(self._paths) > self.limit:
            del self._paths[next(iter(self._paths))]

    def other(self, session: str, peer: str, now: float) -> str | None:
        """The other peer of C{session} when C{peer} is one of its two and it has not expired; else None."""
        rec = self._paths.get(session)
        if rec is None or rec.expires <= now or peer not in rec.peers:
            return None
        return rec.peers[1] if rec.peers[0] == peer else rec.peers[0]

    def take(self, session: str, now: float) -> bool:
        """
        Spend one re-punch of C{session} (known, see L{other}): False when
        its budget for the window is spent.  A re-punch keeps the session
        re-punchable for another C{ttl}.
        """
        rec = self._paths[session]
        while rec.recent and now - rec.recent[0] >= self.window:
            rec.recent.popleft()
        if len(rec.recent) >= self.budget:
            return False
        rec.recent.append(now)
        rec.expires = now + self.ttl
        del self._paths[session]
        self._paths[session] = rec
        return True

    def sweep(self, now: float) -> None:
        """Forget the sessions whose time is up."""
        paths = self._paths
        while paths:
            sid = next(iter(paths))
            if paths[sid].expires > now:
                break
            del paths[sid]


def same_host(a: str, b: str) -> bool:
    """Are C{a} and C{b} one IP address (an IPv4-mapped IPv6 address is its IPv4 one)?"""
    try:
        x, y = ipaddress.ip_address(a.split("%", 1)[0]), ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return False
    x = getattr(x, "ipv4_mapped", None) or x
    y = getattr(y, "ipv4_mapped", None) or y
    return x == y

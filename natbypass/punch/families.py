"""
Happy eyeballs across address families (RFC 8305 style) for one protocol.

A dual-stack peer punches a protocol on both families: from its IPv6 socket
to the peer's IPv6 candidates and from its IPv4 socket to the IPv4 ones.
IPv6 goes first (it is usually unNATed and so the more direct path); IPv4
starts L{FAMILY_HEAD_START} later, or at once when IPv6 fails, and the first
connection wins (L{natbypass.punch.race}, nested inside the race between
protocols).  Both peers run the same race from the same start time, so their
attempts of a family meet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from natbypass.punch.race import AttemptFactory, race

#: IPv6's head start over IPv4 (RFC 8305 section 5: the "Connection Attempt Delay", 250 ms recommended,
#: at least 100 ms); both peers start their IPv4 attempt this long after the punch starts, when IPv6 has
#: not connected by then.
FAMILY_HEAD_START = 0.25

#: IPv6 host candidates offered at most (a host often has several: temporary privacy addresses besides its
#: stable one), so that a description stays well within the wire's candidate limit.
MAX_HOSTS6 = 4

T = TypeVar("T", bound=tuple)


def family_name(host: str) -> str:
    """C{"v6"} for an IPv6 literal, else C{"v4"}."""
    return "v6" if ":" in host else "v4"


def split(addresses: Iterable[T]) -> tuple[list[T], list[T]]:
    """(IPv6, IPv4) addresses of C{addresses} ((host, port, ...) tuples), each in the order given."""
    v6: list[T] = []
    v4: list[T] = []
    for address in addresses:
        (v6 if ":" in address[0] else v4).append(address)
    return v6, v4


#: An attempt that starts punching after the delay (seconds) it is given: both peers' punches start then.
DelayedAttempt = Callable[[float], Deferred]


def family_attempt(
    protocol: str,
    v6: DelayedAttempt | None,
    v4: DelayedAttempt | None,
    clock: IReactorTime,
    head_start: float = FAMILY_HEAD_START,
    start_delay: float = 0.0,
) -> AttemptFactory | None:
    """
    One attempt factory for C{protocol} over the families that have one:
    None for neither, the one family's attempt for one, else a race of IPv6
    then IPv4 C{head_start} later (attempts recorded as C{udp/v6},
    C{udp/v4}; a failure's message lists both).  The race begins at the
    punch start, C{start_delay} from now, so that both peers' IPv4 attempts
    start together, C{head_start} after it.
    """
    entries = [(f"{protocol}/{name}", f) for name, f in (("v6", v6), ("v4", v4)) if f is not None]
    if not entries:
        return None
    if len(entries) == 1:
        only = entries[0][1]
        return lambda: only(start_delay)
    at_start = [(name, lambda f=f: f(0.0)) for name, f in entries]

    def attempt() -> Deferred:
        if start_delay <= 0:
            return race(at_start, clock, head_start)
        # Cancelling it before the start cancels the timer; after, the race (the chained Deferred).
        return deferLater(clock, start_delay, lambda: None).addCallback(lambda _: race(at_start, clock, head_start))

    return attempt


def split_hosts(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """(IPv6, IPv4) of the host addresses C{hosts}, each in the order given."""
    v6, v4 = split((h,) for h in hosts)
    return [h for (h,) in v6], [h for (h,) in v4]

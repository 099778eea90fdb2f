"""
Rate limits shared by the mediator's services and the peer: a token bucket
per source in fixed memory (L{RateLimiter}: STUN requests, signalling
accepts), one token bucket (L{TokenBucket}: global limits, probe pacing),
and the key sources are counted under (L{source_key}: IPv6 by /64).
"""

from __future__ import annotations

import os
import socket
from array import array

from twisted.internet.interfaces import IReactorTime

#: Buckets of a L{RateLimiter} (a power of two): 65,536 x 16 bytes = 1 MiB.
RATE_BUCKETS = 1 << 16

_V4_MAPPED = bytes(10) + b"\xff\xff"
#: Prefix of the packed key of a source that is not an IP address: 9 bytes, so that
#: no such key has the length of an IPv4 (4) or IPv6 /64 (8) one.
_TEXT_KEY = b"\xff" * 9


def source_key(host: str) -> str:
    """
    The key that rate limits and connection caps count a source under: an
    IPv4 address itself (also when IPv4-mapped, C{::ffff:a.b.c.d}), the /64
    prefix of an IPv6 address (one host or site usually owns a whole /64,
    so counting single IPv6 addresses would give it billions of budgets),
    and anything else, as given.
    """
    if ":" not in host:
        return host
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except (OSError, ValueError):
        return host
    if packed[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return packed[:8].hex() + "/64"


def packed_source_key(host: str) -> bytes:
    """
    L{source_key} as bytes, what L{RateLimiter} hashes: the 4 bytes of an
    IPv4 address (also when IPv4-mapped), the first 8 bytes of an IPv6
    one, and a 9-byte prefix and the text for anything else.  Packed so
    that a read loop holding a datagram's raw IPv4 source (C{sockaddr_in})
    uses it as it is (L{RateLimiter.allow_key}).
    """
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError, TypeError):
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    except (OSError, ValueError):
        return _TEXT_KEY + host.encode("utf-8", "surrogatepass")
    if packed[:12] == _V4_MAPPED:
        return packed[12:]
    return packed[:8]


class RateLimiter:
    """
    A token bucket per source: C{rate} requests per second of C{clock}, and
    up to C{burst} at once (default: one second's worth).  Sources are
    grouped by L{source_key} (IPv6 by /64).

    Memory is fixed: C{buckets} buckets (a power of two), and a source's
    bucket is chosen by a hash of its key salted with C{salt} (default: 16
    random bytes, drawn here).  Sources that share a bucket share its budget;
    a spoofer who does not know the salt cannot choose whom it shares with,
    and a flood of spoofed sources only drains buckets at random, never
    refuses a new source for want of room (see the module doc).

    The hash is Python's own (SipHash, keyed with the interpreter's secret)
    over the salt and the L{packed_source_key}: about a tenth of the cost of
    a keyed blake2b per datagram, and still secret when C{PYTHONHASHSEED} is
    fixed, thanks to the salt.  L{allow_key} is the entry of a read loop
    that has the packed key already and reads the clock once per batch.
    """

    def __init__(
        self,
        rate: float,
        clock: IReactorTime,
        burst: float | None = None,
        *,
        buckets: int = RATE_BUCKETS,
        salt: bytes | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst is None:
            burst = max(1, rate)
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if buckets < 1 or buckets & (buckets - 1):
            raise ValueError("buckets must be a power of two")
        self.rate = rate
        self.burst = burst
        self.buckets = buckets
        self._clock = clock
        self._mask = buckets - 1
        self._salt = salt if salt is not None else os.urandom(16)
        self._tokens = array("d", [float(burst)]) * buckets
        self._stamps = array("d", [float("-inf")]) * buckets

    def bucket(self, host: str) -> int:
        """The index of the bucket that counts C{host}'s requests."""
        return hash(self._salt + packed_source_key(host)) & self._mask

    def allow(self, host: str, cost: float = 1.0) -> bool:
        """Take C{cost} tokens (one request's worth by default) from C{host}'s bucket; False when there are fewer."""
        return self.allow_key(packed_source_key(host), self._clock.seconds(), cost)

    def allow_key(self, key: bytes, now: float, cost: float = 1.0) -> bool:
        """
        L{allow} for the source whose L{packed_source_key} is C{key} (the 4
        bytes of an IPv4 address), at C{now} (the clock's C{seconds()}).
        """
        index = hash(self._salt + key) & self._mask
        tokens = self._tokens[index]
        elapsed = now - self._stamps[index]
        if elapsed > 0:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
        self._stamps[index] = now
        if tokens < cost:
            self._tokens[index] = tokens
            return False
        self._tokens[index] = tokens - cost
        return True


class TokenBucket:
    """
    One token bucket: C{rate} tokens a second up to C{burst} (default: one
    second's worth), on an injected clock (anything with C{seconds()});
    starts full.  The peer's probe pacing and the STUN responder's global
    limit.
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: float | None = None) -> None:
        if rate < 0:
            raise ValueError("rate must not be negative (0: a budget that never refills)")
        self._clock = clock
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self._tokens = self.burst
        self._at = clock.seconds()

    def take(self, n: float = 1.0, now: float | None = None) -> bool:
        """
        Take C{n} tokens if there are that many (True), else take none
        (False).  C{now}: the clock's C{seconds()}, when the caller has it.
        """
        if now is None:
            now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True

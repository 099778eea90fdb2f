"""
A delaying wire: two TAP devices in two namespaces joined by a userspace
forwarder that holds every Ethernet frame for a chosen delay and jitter.

Why: this kernel has no C{netem} qdisc (nor nftables C{queue}), so delay
cannot be set with C{tc}.  A TAP pair needs no extra dependency, carries
ARP and everything else unchanged, and one end can sit in the public bridge.
Loss is not done here: nftables drops packets on the site's C{wan0} in the
same way for wired and plain (veth) links.

L{DelayLine} is the pure part (a per-direction queue with injected
time and random source); L{main} is the process started by the lab::

    python3 -m natbypass.lab.wire NETNS_A:IFACE_A NETNS_B:IFACE_B --delay-ms 20 --jitter-ms 2

It creates both TAPs (entering each namespace with C{setns}), prints
C{ready} on stdout, then forwards until killed; the TAPs vanish with it.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import fcntl
import os
import random
import select
import signal
import struct
import sys
import time
from collections.abc import Callable

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MAX_FRAME = 65536
#: Frames held per direction before new ones are dropped (a full router queue).
QUEUE_LIMIT = 10_000


class DelayLine:
    """
    Frames in, frames out after C{delay} +/- C{jitter} seconds.

    Jitter is uniform in [-jitter, +jitter]; frames never overtake each other
    (like a real link, unlike netem's default), so a frame whose draw would
    reorder it leaves right after its predecessor.
    """

    def __init__(self, delay: float, jitter: float, uniform: Callable[[float, float], float]) -> None:
        if delay < 0 or jitter < 0 or jitter > delay:
            raise ValueError("need 0 <= jitter <= delay")
        self.delay = delay
        self.jitter = jitter
        self._uniform = uniform
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._last_due = float("-inf")
        self.dropped = 0

    def push(self, now: float, frame: bytes) -> None:
        """Accept C{frame} arriving at C{now}."""
        if len(self._queue) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        due = now + self.delay + (self._uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        due = max(due, self._last_due, now)
        self._last_due = due
        self._queue.append((due, frame))

    def next_due(self) -> float | None:
        """When the next frame leaves, or None if nothing is queued."""
        return self._queue[0][0] if self._queue else None

    def pop_due(self, now: float) -> list[bytes]:
        """The frames whose time has come, in order."""
        out = []
        while self._queue and self._queue[0][0] <= now:
            out.append(self._queue.popleft()[1])
        return out

    def __len__(self) -> int:
        return len(self._queue)


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(netns: str, name: str) -> int:
    """Create TAP C{name} inside C{netns} and return its file descriptor."""
    _setns(f"/run/netns/{netns}")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def forward(fd_a: int, fd_b: int, a_to_b: DelayLine, b_to_a: DelayLine, clock: Callable[[], float]) -> None:
    """Move frames between the two TAPs through the delay lines, forever."""
    lines = {fd_a: (a_to_b, fd_b), fd_b: (b_to_a, fd_a)}
    while True:
        now = clock()
        dues = [d for d in (a_to_b.next_due(), b_to_a.next_due()) if d is not None]
        timeout = max(0.0, min(dues) - now) if dues else None
        readable, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        now = clock()
        for fd in readable:
            line = lines[fd][0]
            for _ in range(64):  # drain a burst, bounded so the other side gets its turn
                try:
                    frame = os.read(fd, MAX_FRAME)
                except BlockingIOError:
                    break
                line.push(now, frame)
        for line, out_fd in lines.values():
            for frame in line.pop_due(clock()):
                try:
                    os.write(out_fd, frame)
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EIO, errno.ENOBUFS):
                        raise


def _endpoint(text: str) -> tuple[str, str]:
    netns, sep, iface = text.partition(":")
    if not sep or not netns or not iface or len(iface) > 15:
        raise argparse.ArgumentTypeError(f"expected NETNS:IFACE (IFACE up to 15 chars), got {text!r}")
    return netns, iface


def main(argv: list[str] | None = None) -> int:
    """
    The wire process the lab starts: open both TAPs, print C{ready}, then
    forward frames through one L{DelayLine} per direction until killed.
    """
    p = argparse.ArgumentParser(prog="python3 -m natbypass.lab.wire", description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=_endpoint, help="NETNS:IFACE of one end")
    p.add_argument("b", type=_endpoint, help="NETNS:IFACE of the other end")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +/- jitter, each direction")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible jitter")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    fd_a = open_tap(*args.a)
    fd_b = open_tap(*args.b)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    os.close(1)
    os.open(os.devnull, os.O_WRONLY)  # becomes fd 1: later prints never hit a closed pipe
    d, j = args.delay_ms / 1000, args.jitter_ms / 1000
    forward(fd_a, fd_b, DelayLine(d, j, rng.uniform), DelayLine(d, j, rng.uniform), time.monotonic)
    return 0


if __name__ == "__main__":
    sys.exit(main())

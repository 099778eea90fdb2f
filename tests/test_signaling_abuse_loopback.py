"""
The mediator's signalling under abuse over real loopback sockets: a client
that sends without ever reading its replies cannot push unbounded data into
the mediator, and another client stays served meanwhile.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from natbypass.signaling.server import Limits, SignalingFactory, SignalingServerProtocol, SignalingState

PING = b'{"op":"ping","rid":1}\n'


class CountingState(SignalingState):
    """Counts the lines the mediator handled."""

    handled = 0

    def received(self, link, message) -> None:
        self.handled += 1
        super().received(link, message)


class SmallBufferProtocol(SignalingServerProtocol):
    """A fixed, small kernel send buffer (no autotuning), so what piles up is the mediator's own."""

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        super().connectionMade()


class SmallBufferFactory(SignalingFactory):
    def buildProtocol(self, addr):
        p = SmallBufferProtocol(self.state, self.state.limits.max_line)
        p.factory = self
        self.protocols.add(p)
        return p


def flood_without_reading(port: int, total: int, seconds: float) -> int:
    """Send up to C{total} bytes of pings for at most C{seconds}, never reading; how many were sent."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    s.connect(("127.0.0.1", port))
    s.settimeout(0.2)
    chunk, sent, deadline = PING * 2000, 0, time.monotonic() + seconds
    try:
        while sent < total and time.monotonic() < deadline:
            try:
                sent += s.send(chunk)
            except TimeoutError:
                pass
    finally:
        s.close()
    return sent


def ping_rtt(port: int) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        f.readline()  # greeting
        started = time.monotonic()
        s.sendall(b'{"op":"ping","rid":9}\n')
        assert b"pong" in f.readline()
        return time.monotonic() - started


class NeverReadingClientTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_mediator_stops_reading_a_client_that_does_not_read(self):
        state = CountingState(reactor, Limits(rate=0))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(SmallBufferFactory(state))
        self.addCleanup(port.stopListening)
        total = 64 * 1024 * 1024
        flooding = deferToThread(flood_without_reading, port.getHost().port, total, 4.0)
        yield deferLater(reactor, 1.0, lambda: None)
        rtt = yield deferToThread(ping_rtt, port.getHost().port)
        sent = yield flooding
        # Before: the mediator read and answered all it could, buffering the replies without bound (hundreds of
        # thousands of lines in these seconds); now it stops at its write buffer, and TCP holds the client back.
        self.assertLess(state.handled, 30_000)
        self.assertLess(sent, total // 4)
        self.assertLess(rtt, 0.5)  # generous: about a millisecond on an idle machine
        self.assertGreaterEqual(state.status()["counters"].get("paused", 0), 1)
        yield deferLater(reactor, 0.2, lambda: None)  # the mediator sees both connections close

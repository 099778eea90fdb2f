"""
The engine peer's echo (natbypass.lab.enginepeer._echo), in memory: role 1
keeps the connection while role 0 is still resending, so a TCP echo still
being retransmitted is not reset by role 1 closing (issue 12: "connected, then
lost the path during the echo").
"""

from __future__ import annotations

import argparse

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab.enginepeer import ECHO_LINGER, ECHO_LINGER_MAX, _echo


class FakeConnection:
    def __init__(self) -> None:
        self.receiver = None
        self.sent: list[bytes] = []
        self.closed = False

    def setReceiver(self, receiver) -> None:
        self.receiver = receiver

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True


class EchoTests(SynchronousTestCase):
    def start(self):
        clock, conn = Clock(), FakeConnection()
        args = argparse.Namespace(role=1, message="echo?")
        d = _echo(clock, args, conn, {})
        return clock, conn, d

    def test_role_1_stays_while_role_0_resends(self) -> None:
        """Role 0 resends every 0.2 s for 2 s (its echo lost, retransmitted): role 1 closes only after it went quiet."""
        clock, conn, d = self.start()
        for _ in range(11):
            conn.receiver.dataReceived(b"echo?")
            clock.advance(0.2)
        self.assertFalse(conn.closed)  # the old code closed 1 s after the first message
        clock.advance(ECHO_LINGER)
        self.assertTrue(conn.closed)
        self.successResultOf(d)
        self.assertEqual(len(conn.sent), 11)

    def test_role_1_goes_when_role_0_closes(self) -> None:
        clock, conn, d = self.start()
        conn.receiver.dataReceived(b"echo?")
        clock.advance(0.1)
        conn.receiver.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)

    def test_a_peer_that_never_stops_is_bounded(self) -> None:
        """A hostile role 0 resending forever holds role 1 at most ECHO_LINGER_MAX."""
        clock, conn, d = self.start()
        for _ in range(int(ECHO_LINGER_MAX / 0.2) + 10):
            if conn.closed:
                break
            conn.receiver.dataReceived(b"echo?")
            clock.advance(0.2)
        self.assertTrue(conn.closed)
        self.successResultOf(d)

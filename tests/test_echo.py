"""Tests for natbypass.app.echo: the line echo used by natbypass-peer and natbypass connect."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.app.echo import (
    EchoClient,
    EchoHandler,
    EchoReceiver,
    EchoStream,
    EchoStreamClient,
    LineBuffer,
    echo_factory,
)
from natbypass.interfaces import IIncomingHandler, IPeerReceiver


class FakeConnection:
    """
    Just enough of an IPeerConnection: records what is sent.  Not a socket
    double, so not in natbypass.testing: the echo needs only send/setReceiver,
    and a real connection over MemoryUDPNetwork would test the punch engine
    again instead of the line echo.
    """

    peer_id = "b"
    protocol = "udp"
    remote_address = None

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.receiver: Any = None

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def setReceiver(self, receiver: Any) -> None:
        self.receiver = receiver


class LineBufferTests(SynchronousTestCase):
    def test_split_across_chunks(self) -> None:
        lines: list[bytes] = []
        buf = LineBuffer(lines.append)
        for chunk in (b"ab", b"c\nde", b"\n\nf"):
            buf.feed(chunk)
        self.assertEqual(lines, [b"abc", b"de", b""])

    def test_overlong_line_dropped(self) -> None:
        lines: list[bytes] = []
        buf = LineBuffer(lines.append)
        buf.feed(b"x" * 5000)
        buf.feed(b"\nok\n")
        self.assertEqual(lines, [b"", b"ok"])


class EchoTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        conn = FakeConnection()
        self.assertTrue(verifyObject(IPeerReceiver, EchoReceiver(conn)))
        self.assertTrue(verifyObject(IIncomingHandler, EchoHandler()))
        self.assertTrue(verifyObject(IPeerReceiver, EchoClient(conn, Clock())))

    def test_handler_echoes(self) -> None:
        conn = FakeConnection()
        EchoHandler().connectionArrived(conn)
        conn.receiver.dataReceived(b"hello\nwor")
        conn.receiver.dataReceived(b"ld\n")
        self.assertEqual(conn.sent, [b"hello\n", b"world\n"])

    def test_client_times_round_trip(self) -> None:
        clock = Clock()
        conn = FakeConnection()
        client = EchoClient(conn, clock)
        d = client.ping(7)
        self.assertEqual(conn.sent, [b"natbypass-echo 7\n"])
        clock.advance(0.25)
        client.dataReceived(b"natbypass-echo 7\n")
        self.assertEqual(self.successResultOf(d), 0.25)

    def test_client_ignores_unknown_lines_and_fails_on_loss(self) -> None:
        conn = FakeConnection()
        client = EchoClient(conn, Clock())
        d = client.ping(1)
        client.dataReceived(b"natbypass-echo 2\n")
        self.assertNoResult(d)
        client.connectionLost(Failure(ConnectionLost("gone")))
        self.failureResultOf(d, ConnectionLost)


class StreamEchoTests(SynchronousTestCase):
    def test_echo_stream_service(self) -> None:
        proto = echo_factory().buildProtocol(None)
        self.assertIsInstance(proto, EchoStream)
        self.assertTrue(verifyObject(IHalfCloseableProtocol, proto))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"any bytes, no lines needed")
        self.assertEqual(transport.value(), b"any bytes, no lines needed")
        self.assertFalse(transport.disconnecting)
        proto.readConnectionLost()  # the peer is done: close after what is echoed
        self.assertTrue(transport.disconnecting)

    def test_stream_client_times_and_fails_on_loss(self) -> None:
        clock = Clock()
        client = EchoStreamClient(clock)
        transport = StringTransport()
        client.makeConnection(transport)
        d = client.ping(3)
        self.assertEqual(transport.value(), b"natbypass-echo 3\n")
        clock.advance(0.5)
        client.dataReceived(b"natbypass-echo 3\n")
        self.assertEqual(self.successResultOf(d), 0.5)
        waiting = client.ping(4)
        client.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(waiting, ConnectionDone)

"""
natbypass.stun.server's service on real sockets: 127.0.0.1 and 127.0.0.2
(RFC 5780), and ::1 (plain RFC 8489), over UDP and TCP.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.trial.unittest import TestCase

from natbypass.stun import message as m
from natbypass.stun.server import STUNService


def request(*attrs: m.Attribute) -> bytes:
    return m.Message(1, m.MessageClass.REQUEST, os.urandom(12), attrs).encode()


class _Collect(DatagramProtocol):
    def __init__(self) -> None:
        self.received: defer.Deferred = defer.Deferred()

    def datagramReceived(self, data: bytes, addr) -> None:
        if not self.received.called:
            self.received.callback((data, addr))


class _TCPCollect(Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 20 and len(self.buffer) >= 20 + int.from_bytes(self.buffer[2:4], "big"):
            self.done.callback(self.buffer)


def _can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


class LoopbackTests(TestCase):
    """The service on real sockets: 127.0.0.1 and 127.0.0.2, ports chosen by the kernel."""

    def setUp(self) -> None:
        if not _can_bind("127.0.0.2"):
            raise self.skipTest("cannot bind 127.0.0.2 (needs a Linux-style 127/8 loopback)")
        self.service = STUNService(reactor, ("127.0.0.1", 0), ("127.0.0.2", 0), stats_interval=0)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @defer.inlineCallbacks
    def test_udp_change_request(self):
        client = _Collect()
        port = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        config = self.service.config
        port.write(request(m.ChangeRequest(True, True)), config.primary)
        data, addr = yield client.received
        response = m.decode(data)
        self.assertEqual(addr, config.alternate)
        self.assertEqual(response.get(m.XorMappedAddress).address, ("127.0.0.1", port.getHost().port))
        self.assertEqual(response.get(m.ResponseOrigin).address, config.alternate)

    @defer.inlineCallbacks
    def test_tcp(self):
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        config = self.service.config
        client = _TCPCollect()
        endpoint = TCP4ClientEndpoint(reactor, *config.alternate)
        proto = yield connectProtocol(endpoint, client)
        self.addCleanup(proto.transport.loseConnection)
        proto.transport.write(request())
        response = m.decode((yield client.done))
        self.assertEqual(response.get(m.ResponseOrigin).address, config.alternate)
        self.assertEqual(response.get(m.OtherAddress).address, config.primary)
        self.assertEqual(response.get(m.XorMappedAddress).address[0], "127.0.0.1")


class IPv6LoopbackTests(TestCase):
    """Plain RFC 8489 over ::1, UDP and TCP."""

    def setUp(self) -> None:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("::1", 0))
        except OSError:
            raise self.skipTest("no IPv6 loopback") from None
        self.service = STUNService(reactor, ("::1", 0), stats_interval=0)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    @defer.inlineCallbacks
    def test_udp(self):
        client = _Collect()
        port = reactor.listenUDP(0, client, interface="::1")
        self.addCleanup(port.stopListening)
        for fingerprint in (False, True):  # fast-path shapes; IPv6 takes the codec path
            client.received = defer.Deferred()
            port.write(m.Message(1, 0, os.urandom(12)).encode(fingerprint=fingerprint),
                       self.service.config.primary)  # fmt: skip
            data, addr = yield client.received
            response = m.decode(data)
            self.assertEqual(response.get(m.XorMappedAddress).address, ("::1", port.getHost().port))
            self.assertIsNone(response.get(m.OtherAddress))
        self.assertEqual(self.service.counters.answered, 2)

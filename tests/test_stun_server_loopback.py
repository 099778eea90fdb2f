"""
natbypass.stun.server's service on real sockets: 127.0.0.1 and 127.0.0.2
(RFC 5780), and ::1 (plain RFC 8489), over UDP and TCP.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from natbypass.stun import batch
from natbypass.stun import message as m
from natbypass.stun.batch import SLOTS
from natbypass.stun.server import BindingResponder, STUNPort, STUNService


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


class _Count(DatagramProtocol):
    def __init__(self) -> None:
        self.responses: list[bytes] = []

    def datagramReceived(self, data: bytes, addr) -> None:
        self.responses.append(data)


@defer.inlineCallbacks
def until(condition):
    """Wait (2 s at most) until C{condition()} is true."""
    for _ in range(200):
        if condition():
            return
        yield deferLater(reactor, 0.01, lambda: None)


class ReadLoopMixin:
    """
    STUNPort's own read loop (the service on the real reactor): every kind of
    datagram counted once, the rate limits applied on the fast path, each
    response byte for byte the codec path's and sent to its own source, and
    the read budget bounding one reactor turn.  C{batch_io}: with
    recvmmsg/sendmmsg (where available) or one system call per datagram.
    """

    batch_io: bool

    def service(self, **kw) -> STUNService:
        kw.setdefault("stats_interval", 0)
        service = STUNService(reactor, ("127.0.0.1", 0), batch_io=self.batch_io, **kw)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsInstance(reactor, PosixReactorBase)  # so the service listens with STUNPort
        return service

    def client(self) -> tuple[_Count, object]:
        client = _Count()
        port = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return client, port

    until = staticmethod(until)

    def stun_port(self, service: STUNService) -> STUNPort:
        """The service's UDP port as the reactor sees it."""
        host, port = service.config.primary
        return next(r for r in reactor.getReaders()
                    if isinstance(r, STUNPort) and (r.getHost().host, r.getHost().port) == (host, port))  # fmt: skip

    def test_batched_where_available(self) -> None:
        """The loop under test is the one asked for."""
        service = self.service(tcp=False)
        self.assertEqual(self.stun_port(service).vectors is not None, self.batch_io and batch.available())

    @defer.inlineCallbacks
    def test_mixed_traffic_counted(self):
        service = self.service(rate=0.001, burst=30)
        client, port = self.client()
        target = service.config.primary
        bare = [m.Message(1, 0, os.urandom(12)).encode(fingerprint=True) for _ in range(10)]
        slow = [request(m.ChangeRequest(True, False)) for _ in range(5)]  # a plain server: 420, codec path
        junk = [b"\x00\x01\x00\x00junk" * 3 for _ in range(5)]
        indications = [m.Message(1, m.MessageClass.INDICATION, os.urandom(12)).encode() for _ in range(5)]
        # 25 so far; of these 15, 5 fit in the burst of 30 and 10 are over the limit
        over = [m.Message(1, 0, os.urandom(12)).encode() for _ in range(15)]
        for data in bare + slow + junk + indications + over:
            port.write(data, target)
        yield self.until(lambda: service.counters.received >= 40 and len(client.responses) >= 20)
        yield deferLater(reactor, 0.05, lambda: None)
        c = service.counters
        self.assertEqual(c.received, 40)
        self.assertEqual((c.answered, c.malformed, c.ignored, c.rate_limited), (20, 5, 5, 10))
        self.assertEqual(len(client.responses), 20)
        classes = sorted(m.decode(r).cls for r in client.responses)
        self.assertEqual(classes.count(m.MessageClass.ERROR), 5)

    @defer.inlineCallbacks
    def test_global_rate_limit_on_the_fast_path(self):
        """Bare Bindings from many sources, each under its own limit: the global limit still drops them."""
        service = self.service(tcp=False, global_rate=0.001, global_burst=12)
        clients = [self.client() for _ in range(40)]
        for _, port in clients:
            port.write(m.Message(1, 0, os.urandom(12)).encode(), service.config.primary)
        yield self.until(lambda: service.counters.received >= 40)
        yield deferLater(reactor, 0.05, lambda: None)
        c = service.counters
        self.assertEqual((c.received, c.answered, c.rate_limited, c.rate_limited_global), (40, 12, 28, 28))
        self.assertEqual(sum(len(client.responses) for client, _ in clients), 12)

    @defer.inlineCallbacks
    def test_each_response_the_codec_paths_to_its_source(self):
        """
        Fast-path requests mixed with codec-path ones, junk and the largest
        datagram, from more sources than one batch holds: each source gets
        exactly the codec path's answer to its own request.
        """
        service = self.service(tcp=False, rate=0)
        codec = BindingResponder(service.config)
        clients = [self.client() for _ in range(80)]
        expected, junk = {}, 0
        for n, (_client, port) in enumerate(clients):
            kind = n % 8
            if kind == 3:
                data = request(m.ChangeRequest(True, False))  # 420 from the codec path
            elif kind == 5:
                data = (b"", b"\x00", bytes(19), b"\x00\x01\x00\x08" + m.MAGIC_COOKIE_BYTES + bytes(20))[n % 4]
                junk += 1
            elif kind == 7 and n == 7:
                data = os.urandom(65507)
                junk += 1
            else:
                data = m.Message(1, 0, os.urandom(12)).encode(fingerprint=bool(n % 2))
            source = ("127.0.0.1", port.getHost().port)
            if kind != 5 and not (kind == 7 and n == 7):
                expected[source[1]] = codec.respond(m.decode(data), source, service.config.primary).data
            port.write(data, service.config.primary)
        yield self.until(lambda: service.counters.received >= len(clients))
        yield deferLater(reactor, 0.05, lambda: None)
        c = service.counters
        self.assertEqual((c.received, c.answered, c.malformed), (len(clients), len(expected), junk))
        for client, port in clients:
            self.assertEqual(client.responses, [expected[port.getHost().port]] if port.getHost().port in expected
                             else [])  # fmt: skip

    def test_read_budget_bounds_one_turn(self):
        """One reactor turn reads one batch (or one datagram) past the budget, however many wait."""
        service = self.service(tcp=False, rate=0, udp_read_budget=1)
        (_, port), stun = self.client(), self.stun_port(service)
        for _ in range(3 * SLOTS):
            port.write(m.Message(1, 0, os.urandom(12)).encode(), service.config.primary)
        stun.doRead()
        self.assertEqual(service.counters.received, SLOTS if stun.vectors is not None else 1)
        self.assertEqual(service.counters.answered, service.counters.received)


class BatchedReadLoopTests(ReadLoopMixin, TestCase):
    batch_io = True

    def setUp(self) -> None:
        if not batch.available():
            raise self.skipTest("recvmmsg/sendmmsg are not available on this system")


class OneByOneReadLoopTests(ReadLoopMixin, TestCase):
    batch_io = False


class ReusePortTests(TestCase):
    until = staticmethod(until)

    @defer.inlineCallbacks
    def test_reuse_port_shares_the_port(self):
        first = STUNService(reactor, ("127.0.0.1", 0), stats_interval=0, rate=0, tcp=False, reuse_port=True)
        first.startService()
        self.addCleanup(first.stopService)
        second = STUNService(reactor, first.config.primary, stats_interval=0, rate=0, tcp=False, reuse_port=True)
        second.startService()  # the same port: allowed with SO_REUSEPORT on both
        self.addCleanup(second.stopService)
        plain = STUNService(reactor, first.config.primary, stats_interval=0, tcp=False)
        self.assertRaises(CannotListenError, plain.startService)  # without it: refused
        clients = [_Count() for _ in range(32)]
        ports = [reactor.listenUDP(0, c, interface="127.0.0.1") for c in clients]
        for p in ports:
            self.addCleanup(p.stopListening)
            p.write(m.Message(1, 0, os.urandom(12)).encode(), first.config.primary)
        yield self.until(lambda: all(c.responses for c in clients))
        self.assertTrue(all(c.responses for c in clients))
        self.assertEqual(first.counters.answered + second.counters.answered, 32)
        self.assertGreater(first.counters.answered, 0)  # 32 flows hashed onto two sockets
        self.assertGreater(second.counters.answered, 0)

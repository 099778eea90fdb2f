"""Tests for natbypass.secure.quic, over an in-memory UDP link driven by a Clock."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import Identity
from natbypass.secure.quic import (
    AUTH_FAILED,
    MAX_DATAGRAM,
    QuicChannel,
    QuicClosed,
    get_engine,
    is_quic,
)
from natbypass.trust import PeerRejected

ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()
A_ADDR, B_ADDR, M_ADDR = ("10.0.0.1", 4000), ("10.0.0.2", 5000), ("10.0.0.3", 6000)


def engine_or_skip(name: str):
    try:
        return get_engine(name)
    except ImportError as e:
        raise SynchronousTestCase.skipTest(None, f"{name} is not installed ({e}); pip install {name}") from None


class CountingClock:
    """An IReactorTime that passes calls to a Clock and remembers the highest number active at once."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list = []
        self.most_active = 0

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, f: Callable, *a: Any, **kw: Any):
        call = self.clock.callLater(delay, f, *a, **kw)
        self.calls = [c for c in self.calls if c.active()] + [call]
        self.most_active = max(self.most_active, len(self.calls))
        return call

    def getDelayedCalls(self):
        return [c for c in self.calls if c.active()]


class Link:
    """An in-memory UDP network: every datagram arrives C{delay} seconds later."""

    def __init__(self, clock: Clock, delay: float = 0.005) -> None:
        self.clock = clock
        self.delay = delay
        self.hosts: dict = {}
        self.sent = 0

    def attach(self, addr, host) -> Callable[[bytes, Any], None]:
        self.hosts[addr] = host

        def send(data: bytes, dst) -> None:
            self.sent += 1
            self.clock.callLater(self.delay, self._deliver, addr, tuple(dst), data)

        return send

    def _deliver(self, src, dst, data: bytes) -> None:
        host = self.hosts.get(dst)
        if host is not None:
            host.datagramReceived(data, src)

    def run(self, seconds: float, step: float = 0.001) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)


class Receiver:
    def __init__(self, channel: QuicChannel | None = None, echo: bool = False) -> None:
        self.streams: dict[int, bytes] = {}
        self.fins: set[int] = set()
        self.datagrams: list[bytes] = []
        self.lost: Failure | None = None
        self.channel = channel
        self.echo = echo

    def streamReceived(self, stream_id: int, data: bytes, fin: bool) -> None:
        self.streams[stream_id] = self.streams.get(stream_id, b"") + data
        if fin:
            self.fins.add(stream_id)
        if self.echo:
            self.channel.sendStream(stream_id, data, fin)

    def datagramFrameReceived(self, data: bytes) -> None:
        self.datagrams.append(data)
        if self.echo:
            self.channel.sendDatagram(data.upper())

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


def outcome(d):
    """What C{d} holds now (a result or a Failure), or None; C{d} keeps it."""
    out: list = []

    def keep(result):
        out.append(result)
        return result

    d.addBoth(keep)
    if out and isinstance(out[0], Failure):
        d.addErrback(lambda f: None)
    return out[0] if out else None


class IsQuicTests(SynchronousTestCase):
    def test_demultiplexing(self) -> None:
        stun = bytes.fromhex("000100002112a442") + bytes(12)
        punch = bytes([0xCE, 0x01, 0x01, 0x00, 0x04]) + b"sess" + bytes(32)
        initial = bytes([0xC3, 0, 0, 0, 1, 8]) + bytes(30)
        short = bytes([0x41]) + bytes(30)
        self.assertEqual(
            [is_quic(p) for p in (stun, punch, initial, short, b"\xc3")], [False, False, True, True, False]
        )


class ChannelTestsMixin:
    client_engine = "aioquic"
    server_engine = "aioquic"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.link = Link(self.clock)

    def make(self, identity, expected, role, addr, remote, engine, clock=None, **kw) -> QuicChannel:
        holder: list = []
        send = self.link.attach(addr, _Late(holder))
        ch = QuicChannel(
            identity, expected, role, remote, send, clock or self.clock, engine=engine_or_skip(engine), **kw
        )
        holder.append(ch)
        self.addCleanup(lambda: ch.ready.addErrback(lambda f: None))
        return ch

    def pair(self, a_expects=None, b_expects=None, b_identity=BOB, **kw):
        a = self.make(ALICE, a_expects or BOB.fingerprint, 0, A_ADDR, B_ADDR, self.client_engine, **kw)
        b = self.make(b_identity, b_expects or ALICE.fingerprint, 1, B_ADDR, A_ADDR, self.server_engine, **kw)
        a.start()
        b.start()
        self.link.run(1.0)
        return a, b

    def test_handshake_stream_and_datagrams(self) -> None:
        timing = CountingClock(self.clock)
        a = self.make(ALICE, BOB.fingerprint, 0, A_ADDR, B_ADDR, self.client_engine, clock=timing)
        b = self.make(BOB, ALICE.fingerprint, 1, B_ADDR, A_ADDR, self.server_engine)
        a.start()
        self.link.run(1.0)
        self.assertEqual(outcome(a.ready), BOB.fingerprint)
        self.assertEqual(outcome(b.ready), ALICE.fingerprint)
        self.assertEqual(timing.most_active, 1, "the channel keeps exactly one timer")
        ra, rb = Receiver(a), Receiver(b, echo=True)
        a.setReceiver(ra)
        b.setReceiver(rb)
        sid = a.openStream()
        self.assertNotEqual(sid, 0)
        a.sendStream(sid, b"hello " * 10000, fin=True)
        a.sendDatagram(b"dgram")
        self.link.run(1.0)
        self.assertEqual(rb.streams[sid], b"hello " * 10000)
        self.assertEqual(ra.streams[sid], b"hello " * 10000)
        self.assertIn(sid, ra.fins)
        self.assertEqual((rb.datagrams, ra.datagrams), ([b"dgram"], [b"DGRAM"]))
        self.assertRaises(ValueError, a.sendDatagram, b"x" * (MAX_DATAGRAM + 1))
        self.assertRaises(ValueError, a.sendStream, 0, b"x")
        a.close(0, "bye")
        self.assertTrue(outcome(a.lost).local)
        self.link.run(2.0)  # the peer drains for 3 PTO before it reports the close
        self.assertIsInstance(outcome(b.lost), QuicClosed)
        self.assertEqual((outcome(b.lost).reason, outcome(b.lost).local), ("bye", False))
        self.assertIsNotNone(ra.lost)

    def test_server_streams_and_early_data(self) -> None:
        """The server may send as soon as it is ready; the client keeps it until it has a receiver."""
        a, b = self.pair()
        sid = b.openStream()
        b.sendStream(sid, b"from server", fin=True)
        self.link.run(0.2)
        ra = Receiver(a)
        a.setReceiver(ra)
        self.assertEqual(ra.streams, {sid: b"from server"})

    def test_not_ready(self) -> None:
        a = self.make(ALICE, BOB.fingerprint, 0, A_ADDR, B_ADDR, self.client_engine)
        self.assertRaises(RuntimeError, a.openStream)
        self.assertRaises(ValueError, QuicChannel, ALICE, BOB.fingerprint, 2, B_ADDR, None, self.clock)

    def test_client_refuses_wrong_server_key(self) -> None:
        a, b = self.pair(b_identity=MALLORY)
        failure = outcome(a.ready)
        failure.trap(PeerRejected)
        self.assertIn(f"is {MALLORY.fingerprint}, expected {BOB.fingerprint}", failure.getErrorMessage())
        # Mallory (the server) already accepted Alice, but learns the refusal.
        self.link.run(0.2)
        self.assertEqual(outcome(b.lost).code, AUTH_FAILED)

    def test_server_refuses_wrong_client_key(self) -> None:
        a, b = self.pair(b_expects=MALLORY.fingerprint)
        failure = outcome(b.ready)
        failure.trap(PeerRejected)
        self.assertIn(f"is {ALICE.fingerprint}, expected {MALLORY.fingerprint}", failure.getErrorMessage())
        failure = outcome(a.ready)
        failure.trap(QuicClosed)
        self.assertEqual(failure.value.code, AUTH_FAILED)

    def test_stolen_certificate_without_key(self) -> None:
        """Mallory presents Bob's certificate but signs with her own key: the handshake fails."""
        a = self.make(ALICE, BOB.fingerprint, 0, A_ADDR, B_ADDR, self.client_engine)
        try:
            b = self.make(
                MALLORY,
                ALICE.fingerprint,
                1,
                B_ADDR,
                A_ADDR,
                self.server_engine,
                certificate=BOB.certificate(self.clock),
            )
        except Exception as e:  # an engine that checks key and certificate refuses at once
            self.assertIn("key", str(e).lower())
            return
        a.start()
        self.link.run(1.0)
        self.assertIsInstance(outcome(a.ready), Failure)
        self.assertFalse(isinstance(outcome(b.ready), type(BOB.fingerprint)))

    def test_idle_timeout(self) -> None:
        a, b = self.pair(idle_timeout=5.0)
        self.assertEqual(outcome(a.ready), BOB.fingerprint)
        self.link.hosts.clear()  # the path dies
        self.assertIsNone(outcome(a.lost))
        self.link.run(4.0, step=0.1)
        self.assertIsNone(outcome(a.lost))
        self.link.run(3.0, step=0.1)
        reason = outcome(a.lost)
        self.assertIsInstance(reason, QuicClosed)
        self.assertIn("idle", reason.reason.lower())
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer is left behind")

    def test_relay_in_the_middle_is_detected(self) -> None:
        """
        Mallory terminates QUIC with Alice (as the server) and with Bob (as the
        client), with her own key, and relays stream 0 (the key proofs) both ways.
        """
        a = self.make(ALICE, BOB.fingerprint, 0, A_ADDR, M_ADDR, self.client_engine)
        b = self.make(BOB, ALICE.fingerprint, 1, B_ADDR, M_ADDR, self.server_engine)
        to_a = Raw(self, engine_or_skip(self.server_engine), False, M_ADDR, A_ADDR)
        to_b = Raw(self, engine_or_skip(self.client_engine), True, M_ADDR, B_ADDR)
        router = _Router({A_ADDR: to_a, B_ADDR: to_b})
        self.link.hosts[M_ADDR] = router
        to_a.on_stream0 = to_b.send0
        to_b.on_stream0 = to_a.send0
        a.start()
        to_b.connect()
        self.link.run(2.0)
        self.assertTrue(to_a.handshake_done and to_b.handshake_done)
        self.assertTrue(to_b.relayed, "Alice's proof reached Bob")
        failure = outcome(b.ready)
        failure.trap(PeerRejected)
        self.assertIn("not made for this connection", failure.getErrorMessage())
        self.assertFalse(isinstance(outcome(a.ready), type(BOB.fingerprint)))


class _Late:
    """Resolves the channel after the Link needed a host for it."""

    def __init__(self, holder: list) -> None:
        self.holder = holder

    def datagramReceived(self, data: bytes, addr) -> None:
        self.holder[0].datagramReceived(data, addr)


class _Router:
    def __init__(self, by_source: dict) -> None:
        self.by_source = by_source

    def datagramReceived(self, data: bytes, addr) -> None:
        self.by_source[addr].datagramReceived(data, addr)


class Raw:
    """A bare QUIC endpoint holding Mallory's key, used by the relay."""

    def __init__(self, test, engine, is_client: bool, addr, remote) -> None:
        self.engine = engine
        self.clock = test.clock
        self.remote = remote
        self.config = engine.config(is_client, MALLORY, MALLORY.certificate(test.clock), 30.0, io.StringIO())
        self.send = test.link.attach(("unused", id(self)), None)
        self.link = test.link
        self.addr = addr
        self.conn = None
        self.timer = None
        self.handshake_done = False
        self.pending = b""
        self.relayed = False
        self.on_stream0: Callable[[bytes], None] = lambda data: None

    def connect(self) -> None:
        self.conn = self.engine.connection(configuration=self.config)
        self.conn.connect(self.remote, now=self.clock.seconds())
        self.pump()

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.conn is None:
            cid = self.engine.destination_cid(data, self.config.connection_id_length)
            self.conn = self.engine.connection(configuration=self.config, original_destination_connection_id=cid)
        self.conn.receive_datagram(data, addr, now=self.clock.seconds())
        self.pump()

    def send0(self, data: bytes) -> None:
        self.pending += data
        self.flush0()

    def flush0(self) -> None:
        if self.handshake_done and self.pending:
            self.conn.send_stream_data(0, self.pending)
            self.relayed = True
            self.pending = b""
            self.pump()

    def pump(self) -> None:
        ev = self.engine.events
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, ev.HandshakeCompleted):
                self.handshake_done = True
                if self.config.is_client:
                    self.conn.get_next_available_stream_id()
                self.flush0()
            elif isinstance(event, ev.StreamDataReceived) and event.stream_id == 0 and event.data:
                self.on_stream0(event.data)
        for data, addr in self.conn.datagrams_to_send(now=self.clock.seconds()):
            self.clock.callLater(self.link.delay, self.link._deliver, self.addr, tuple(addr), data)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        when = self.conn.get_timer()
        if when is not None:
            self.timer = self.clock.callLater(max(0, when - self.clock.seconds()), self.fire)

    def fire(self) -> None:
        self.timer = None
        self.conn.handle_timer(now=self.clock.seconds())
        self.pump()


class AioquicTests(ChannelTestsMixin, SynchronousTestCase):
    client_engine = server_engine = "aioquic"


class Qh3Tests(ChannelTestsMixin, SynchronousTestCase):
    client_engine = server_engine = "qh3"


class InteropAioquicClientQh3ServerTests(ChannelTestsMixin, SynchronousTestCase):
    """Two independent QUIC/TLS implementations, one per side, with pinned keys."""

    client_engine, server_engine = "aioquic", "qh3"
    skip = (
        "qh3 2.1.0 as server with an aioquic 1.7.2 client fails in the server's first flight "
        "('packet builder capacity exhausted'), with default configurations too: an engine bug, "
        "not ours; the other direction is tested"
    )


class InteropQh3ClientAioquicServerTests(ChannelTestsMixin, SynchronousTestCase):
    client_engine, server_engine = "qh3", "aioquic"

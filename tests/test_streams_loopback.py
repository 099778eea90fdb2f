"""
Streams between two real peers on loopback (a real mediator, real UDP and
TCP paths, QUIC and TLS): services, refusal, many concurrent streams with
their bytes intact, backpressure, and streams ending with the connection.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from zope.interface.verify import verifyObject

from natbypass.identity import Identity
from natbypass.interfaces import IPeer
from natbypass.streams import PeerAddress, StreamRefused, StreamTransport
from natbypass.testing.loopback import LoopbackMediator
from natbypass.testing.streams import Collect, Echo
from natbypass.trust import parse_allow


def _sink(into: dict[int, Collect]) -> Factory:
    class Sink(Factory):
        def buildProtocol(self, addr: PeerAddress) -> Collect:
            proto = Collect()
            into[addr.stream_id] = proto
            return proto

    return Sink()


class StreamsLoopbackMixin:
    protocol = "udp"

    @defer.inlineCallbacks
    def pair(self: Any) -> Any:
        bob = yield self.peer("bob", self.protocol)
        bob.serve("echo", Factory.forProtocol(Echo))
        alice = yield self.peer("alice", self.protocol)
        return alice, bob

    @defer.inlineCallbacks
    def test_echo_stream(self: Any) -> Any:
        """A stream to a served service echoes and ends cleanly; its addresses name peers, service and path."""
        alice, bob = yield self.pair()
        self.assertTrue(verifyObject(IPeer, alice))
        proto = yield alice.openStream("bob", "echo", Factory.forProtocol(Collect)).addTimeout(10, reactor)
        self.assertIsInstance(proto.transport, StreamTransport)
        peer, host = proto.transport.getPeer(), proto.transport.getHost()
        self.assertEqual((peer.peer_id, peer.service, peer.path), ("bob", "echo", self.protocol))
        self.assertEqual(peer.fingerprint, bob.fingerprint)
        self.assertEqual((host.peer_id, host.fingerprint), ("alice", alice.fingerprint))
        payload = os.urandom(300_000)
        proto.transport.write(payload)
        proto.transport.loseWriteConnection()
        for _ in range(200):
            if proto.lost is not None:
                break
            yield deferLater(0.05)
        self.assertEqual(hashlib.sha256(proto.data).hexdigest(), hashlib.sha256(payload).hexdigest())
        self.assertTrue(proto.eof)
        self.assertEqual(alice.connectionTo("bob").protocol, self.protocol)

    @defer.inlineCallbacks
    def test_refused_service(self: Any) -> Any:
        """A service nobody serves is refused with the peer's reason; the connection stays usable."""
        alice, bob = yield self.pair()
        d = alice.openStream("bob", "nothing-here", Factory.forProtocol(Collect))
        failure = yield self.assertFailure(d.addTimeout(10, reactor), StreamRefused)
        self.assertIn("no service 'nothing-here'", str(failure))
        proto = yield alice.openStream("bob", "echo", Factory.forProtocol(Collect)).addTimeout(10, reactor)
        proto.transport.write(b"still fine")
        yield waitFor(lambda: proto.data == b"still fine")

    @defer.inlineCallbacks
    def test_concurrent_streams_share_one_connection(self: Any) -> Any:
        """Twenty streams at once, each 200 kB, each echoed intact, over one connection."""
        alice, bob = yield self.pair()
        protos = yield defer.gatherResults(
            [alice.openStream("bob", "echo", Factory.forProtocol(Collect)) for _ in range(20)]
        ).addTimeout(20, reactor)
        self.assertEqual(len(alice._connections), 1)
        payloads = [os.urandom(200_000) for _ in protos]
        for proto, payload in zip(protos, payloads):
            proto.transport.write(payload)
            proto.transport.loseWriteConnection()
        yield waitFor(lambda: all(p.lost is not None for p in protos), 60)
        for proto, payload in zip(protos, payloads):
            self.assertEqual(hashlib.sha256(proto.data).digest(), hashlib.sha256(payload).digest())

    @defer.inlineCallbacks
    def test_paused_reader_stalls_only_its_stream(self: Any) -> Any:
        """
        A receiver that pauses stops its sender at the window (bounded
        memory), while another stream on the same connection flows.
        """
        alice, bob = yield self.pair()
        sinks: dict[int, Collect] = {}
        bob.serve("sink", _sink(sinks))
        slow = yield alice.openStream("bob", "sink", Factory.forProtocol(Collect))
        yield waitFor(lambda: len(sinks) == 1)
        (slow_sink,) = sinks.values()
        slow_sink.transport.pauseProducing()
        slow.transport.write(b"s" * 8_000_000)
        fast = yield alice.openStream("bob", "echo", Factory.forProtocol(Collect))
        fast.transport.write(b"f" * 100_000)
        yield waitFor(lambda: len(fast.data) == 100_000, 20)
        yield deferLater(0.3)
        # The paused stream holds at most its window at bob, the rest waits at alice.
        self.assertLessEqual(len(slow_sink.data), 0)
        self.assertLessEqual(len(slow_sink.transport._rx), 1 << 20)
        slow_sink.transport.resumeProducing()
        yield waitFor(lambda: len(slow_sink.data) == 8_000_000, 60)

    @defer.inlineCallbacks
    def test_streams_end_when_the_connection_dies(self: Any) -> Any:
        """Closing the connection ends its streams with ConnectionLost naming the path."""
        alice, bob = yield self.pair()
        proto = yield alice.openStream("bob", "echo", Factory.forProtocol(Collect))
        alice.connectionTo("bob").close()
        yield waitFor(lambda: proto.lost is not None)
        proto.lost.trap(ConnectionLost)
        self.assertIn("bob", proto.lost.getErrorMessage())

    @defer.inlineCallbacks
    def test_streams_survive_the_mediator_going_away(self: Any) -> Any:
        """With the mediator stopped, a stream keeps flowing and new streams open on the same connection."""
        alice, bob = yield self.pair()
        proto = yield alice.openStream("bob", "echo", Factory.forProtocol(Collect))
        yield self.signal.stopService()
        yield self.stun.stopService()
        proto.transport.write(b"after the mediator")
        yield waitFor(lambda: proto.data == b"after the mediator")
        again = yield alice.openStream("bob", "echo", Factory.forProtocol(Collect)).addTimeout(10, reactor)
        again.transport.write(b"a new stream")
        yield waitFor(lambda: again.data == b"a new stream")

    @defer.inlineCallbacks
    def test_data_delivered_when_the_writer_stops_at_once(self: Any) -> Any:
        """
        What a stream wrote reaches the peer even when its writer stops its
        peer the moment the stream ended cleanly (as natbypass pipe does): on
        UDP the QUIC close waits for the data to be acknowledged.
        """
        payload = os.urandom(2_000_000)
        bob = yield self.peer("bob", self.protocol)
        got = ReadOnly()
        bob.serve("sink", Factory.forProtocol(lambda: got))
        alice = yield self.peer("alice", self.protocol)
        writer = WriteAndFinish(payload)
        yield alice.openStream("bob", "sink", Factory.forProtocol(lambda: writer)).addTimeout(10, reactor)
        yield waitFor(lambda: writer.lost is not None, 30)
        yield alice.stopService()
        yield waitFor(lambda: got.eof or got.lost is not None, 10)
        self.assertEqual(len(got.data), len(payload))
        self.assertTrue(got.eof, got.lost)

    @defer.inlineCallbacks
    def test_streams_back_on_a_path_we_opened_pass_our_allow_list(self: Any) -> Any:
        """
        Bob did not approve alice as a caller when *he* connected to her: her
        streams to his services pass his allow list, so one that omits her is
        refused, with a reason naming her key.
        """
        carol = Identity.generate()
        bob = yield self.peer("bob", self.protocol, peer_args={"allow": parse_allow(f"{carol.fingerprint} carol")})
        bob.serve("echo", Factory.forProtocol(Echo))
        alice = yield self.peer("alice", self.protocol)
        alice.serve("echo", Factory.forProtocol(Echo))
        mine = yield bob.openStream("alice", "echo", Factory.forProtocol(Collect)).addTimeout(10, reactor)
        mine.transport.write(b"bob to alice")
        yield waitFor(lambda: mine.data == b"bob to alice")
        conn = alice.connectionTo("bob")
        d = conn.openStream("echo", Factory.forProtocol(Collect))
        failure = yield self.assertFailure(d.addTimeout(10, reactor), StreamRefused)
        self.assertIn(f"alice (key {alice.fingerprint}) may not open streams to bob", str(failure))


class ReadOnly(Collect):
    """Ends its own side at once (a pipe listener with nothing to send), keeps what arrives."""

    def connectionMade(self) -> None:
        self.transport.loseWriteConnection()


class WriteAndFinish(Collect):
    """Writes its payload, half-closes, and notes how the stream ended."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def waitFor(condition: Any, timeout: float = 10.0) -> Any:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        yield deferLater(0.02)
    raise AssertionError("timed out waiting for a condition")


class UDPStreamsTests(StreamsLoopbackMixin, LoopbackMediator):
    protocol = "udp"


class TCPStreamsTests(StreamsLoopbackMixin, LoopbackMediator):
    protocol = "tcp"

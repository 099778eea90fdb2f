"""
The stream layer in memory: opening and refusal, credit flow control,
half-close, close, abort, producers, limits, and what a hostile peer can make
it do (every input is bounded before it costs memory).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass.streams import StreamRefused, StreamReset, StreamTransport, frames
from natbypass.streams.mux import MuxCarrier, socket_send_queue
from natbypass.streams.session import HIGH_WATER, INITIAL_WINDOW, MAX_STREAMS
from natbypass.testing.streams import Collect, Echo, MemoryPair, Services


def opened(pair: MemoryPair, service: str = "echo", factory: Any = None) -> Any:
    d = pair.a.open(service, factory or Factory.forProtocol(Collect))
    pair.pump()
    return d


class OpeningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.p = MemoryPair()
        self.services = Services(echo=Echo, sink=Collect)
        self.p.b.handler = self.services

    def test_open_and_echo(self) -> None:
        proto = self.successResultOf(opened(self.p))
        self.assertTrue(verifyObject(ITransport, proto.transport))
        self.assertTrue(verifyObject(IConsumer, proto.transport))
        self.assertTrue(verifyObject(IPushProducer, proto.transport))
        proto.transport.write(b"ping")
        self.p.pump()
        self.assertEqual(proto.data, b"ping")
        (request,) = self.services.requests
        self.assertEqual((request.peer_id, request.service, request.stream_id), ("alice", "echo", 8))

    def test_stream_ids_follow_quic_numbering(self) -> None:
        ids = [self.successResultOf(opened(self.p)).transport.stream_id for _ in range(3)]
        self.assertEqual(ids, [8, 12, 16])
        self.p.a.handler = Services(echo=Echo)
        d = self.p.b.open("echo", Factory.forProtocol(Collect))
        self.p.pump()
        self.assertEqual(self.successResultOf(d).transport.stream_id, 9)

    def test_refused_with_reason(self) -> None:
        f = self.failureResultOf(opened(self.p, "nope"), StreamRefused)
        self.assertIn("no service 'nope' here", str(f.value))
        self.assertEqual((len(self.p.a), len(self.p.b)), (0, 0))
        self.assertEqual(self.p.b.stats["refused"], 1)

    def test_no_handler_refuses(self) -> None:
        self.p.b.handler = None
        f = self.failureResultOf(opened(self.p), StreamRefused)
        self.assertIn("accepts no streams", str(f.value))

    def test_streams_wait_for_the_handler(self) -> None:
        """A stream that arrives before the connection's owner set a handler is decided when it does."""
        p = MemoryPair()
        d = opened(p)
        self.assertNoResult(d)
        p.b.handler = Services(echo=Echo)
        p.pump()
        self.assertEqual(self.successResultOf(d).transport.getPeer().service, "echo")

    def test_opens_wait_for_the_path_stream_limit(self) -> None:
        """Past the path's stream limit (QUIC's), opens wait in order and go on as streams end."""
        self.p.ca.max_streams = 4  # ids 8 and 12 only
        first, second = (self.successResultOf(opened(self.p)) for _ in range(2))
        third = opened(self.p)
        fourth = opened(self.p)
        self.assertNoResult(third)
        fourth.cancel()
        self.failureResultOf(fourth, CancelledError)
        first.transport.loseConnection()
        self.p.ca.max_streams = 5
        self.p.b.writable()
        self.p.a.writable()
        self.p.pump()
        self.assertEqual(self.successResultOf(third).transport.stream_id, 16)

    def test_cancel_a_waiting_open_after_it_started(self) -> None:
        self.p.ca.max_streams = 3  # id 8 only
        self.successResultOf(opened(self.p))
        waiting = self.p.a.open("echo", Factory.forProtocol(Collect))
        self.p.ca.max_streams = 4
        self.p.a.writable()  # the open starts: its request is on its way
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.p.pump()
        self.assertEqual((len(self.p.a), len(self.p.b)), (1, 1))

    def test_handler_exception_refuses_without_breaking_the_session(self) -> None:
        class Broken:
            def streamRequested(self, connection: Any, address: Any) -> Any:
                raise RuntimeError("boom")

        self.p.b.handler = Broken()
        self.failureResultOf(opened(self.p), StreamRefused)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.p.b.handler = self.services
        self.successResultOf(opened(self.p))

    def test_bad_service_name_raises_before_sending(self) -> None:
        for name in ("", "a b", "x" * 256, "tab\there"):
            self.assertRaises(ValueError, self.p.a.open, name, Factory.forProtocol(Collect))
        self.assertEqual(self.p.ca.out, [])

    def test_cancel_an_open(self) -> None:
        d = self.p.a.open("echo", Factory.forProtocol(Collect))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.p.pump()
        self.assertEqual((len(self.p.a), len(self.p.b)), (0, 0))

    def test_factory_refusing_aborts(self) -> None:
        class No(Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        self.failureResultOf(opened(self.p, "echo", No()))
        self.assertEqual((len(self.p.a), len(self.p.b)), (0, 0))

    def test_stream_limit(self) -> None:
        for _ in range(MAX_STREAMS):
            self.successResultOf(opened(self.p, "sink"))
        d = self.p.a.open("sink", Factory.forProtocol(Collect))
        self.assertIn("the limit", str(self.failureResultOf(d).value))


class DataTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.p = MemoryPair()
        self.sinks: list[Collect] = []

        def sink() -> Collect:
            proto = Collect()
            self.sinks.append(proto)
            return proto

        self.p.b.handler = Services(echo=Echo, sink=sink)

    def test_half_close_both_ways(self) -> None:
        proto = self.successResultOf(opened(self.p))
        proto.transport.write(b"abc")
        proto.transport.loseWriteConnection()
        self.p.pump()
        self.assertEqual((proto.data, proto.eof, proto.write_closed), (b"abc", True, True))
        proto.lost.trap(ConnectionDone)
        self.assertEqual((len(self.p.a), len(self.p.b)), (0, 0))

    def test_close_delivers_queued_data_then_fin(self) -> None:
        proto = self.successResultOf(opened(self.p, "sink"))
        proto.transport.write(b"x" * 1000)
        proto.transport.loseConnection()
        proto.lost.trap(ConnectionDone)
        self.p.pump()
        (sink,) = self.sinks
        self.assertEqual((len(sink.data), sink.eof), (1000, True))

    def test_not_half_closeable_protocol_closes_on_fin(self) -> None:
        lost: list[Failure] = []

        class Plain(Protocol):
            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                lost.append(reason)

        self.p.b.handler = Services(plain=Plain)
        proto = self.successResultOf(opened(self.p, "plain"))
        proto.transport.loseWriteConnection()
        self.p.pump()
        lost[0].trap(ConnectionDone)
        self.assertTrue(proto.eof)

    def test_plain_protocol_that_sent_fin_first_closes_on_peer_fin(self) -> None:
        """A protocol without IHalfCloseableProtocol that half-closed first loses the connection at the peer's FIN."""
        lost: list[Failure] = []

        class Plain(Protocol):
            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                lost.append(reason)

        proto = self.successResultOf(opened(self.p, "echo", Factory.forProtocol(Plain)))
        proto.transport.write(b"x")
        proto.transport.loseWriteConnection()
        self.p.pump()
        self.assertEqual(len(lost), 1)
        lost[0].trap(ConnectionDone)
        self.assertEqual(len(self.p.a), 0)

    def test_abort_resets_the_peer(self) -> None:
        proto = self.successResultOf(opened(self.p, "sink"))
        proto.transport.abortConnection()
        proto.lost.trap(ConnectionAborted)
        self.p.pump()
        (sink,) = self.sinks
        sink.lost.trap(StreamReset)
        self.assertIn("the peer reset the stream", sink.lost.getErrorMessage())

    def test_credit_bounds_what_is_in_flight(self) -> None:
        """A sender never has more than the window unacknowledged; the rest waits in its queue."""
        proto = self.successResultOf(opened(self.p, "sink"))
        (sink,) = self.sinks
        sink.transport.pauseProducing()
        proto.transport.write(b"y" * (3 * INITIAL_WINDOW))
        self.p.pump()
        self.assertLessEqual(len(sink.transport._rx), INITIAL_WINDOW)
        self.assertEqual(sink.data, b"")
        sink.transport.resumeProducing()
        self.p.pump()
        self.assertEqual(len(sink.data), 3 * INITIAL_WINDOW)

    def test_push_producer_paused_and_resumed(self) -> None:
        @implementer(IPushProducer)
        class Producer:
            paused = 0
            resumed = 0

            def pauseProducing(self) -> None:
                self.paused += 1

            def resumeProducing(self) -> None:
                self.resumed += 1

            def stopProducing(self) -> None:
                pass

        proto = self.successResultOf(opened(self.p, "sink"))
        (sink,) = self.sinks
        sink.transport.pauseProducing()
        producer = Producer()
        proto.transport.registerProducer(producer, True)
        proto.transport.write(b"z" * (INITIAL_WINDOW + HIGH_WATER + 1))
        self.assertEqual(producer.paused, 1)
        sink.transport.resumeProducing()
        self.p.pump()
        self.assertEqual(producer.resumed, 1)

    def test_pull_producer(self) -> None:
        proto = self.successResultOf(opened(self.p, "sink"))
        chunks = [b"p" * 10_000] * 20

        class Pull:
            def resumeProducing(self) -> None:
                if chunks:
                    proto.transport.write(chunks.pop())
                else:
                    proto.transport.unregisterProducer()
                    proto.transport.loseConnection()

            def stopProducing(self) -> None:
                pass

        proto.transport.registerProducer(Pull(), False)
        for _ in range(30):
            self.p.clock.advance(0)
            self.p.pump()
        self.assertEqual(len(self.sinks[0].data), 200_000)
        self.assertTrue(self.sinks[0].eof)

    def test_connection_loss_ends_every_stream(self) -> None:
        protos = [self.successResultOf(opened(self.p, "sink")) for _ in range(3)]
        pending = self.p.a.open("sink", Factory.forProtocol(Collect))
        self.p.a.lost(Failure(ConnectionLost("gone")))
        for proto in protos:
            proto.lost.trap(ConnectionLost)
            self.assertIn("the path to bob was lost: gone", proto.lost.getErrorMessage())
        self.failureResultOf(pending, ConnectionLost)
        self.failureResultOf(self.p.a.open("sink", Factory.forProtocol(Collect)), ConnectionLost)

    def test_protocol_exception_aborts_only_its_stream(self) -> None:
        class Bad(Protocol):
            def dataReceived(self, data: bytes) -> None:
                raise ValueError("bad app")

        self.p.b.handler = Services(bad=Bad, echo=Echo)
        bad = self.successResultOf(opened(self.p, "bad"))
        good = self.successResultOf(opened(self.p, "echo"))
        bad.transport.write(b"x")
        good.transport.write(b"still")
        self.p.pump()
        bad.lost.trap(StreamReset)
        self.assertEqual(good.data, b"still")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_linger_resets_a_peer_that_never_finishes(self) -> None:
        proto = self.successResultOf(opened(self.p, "sink"))
        proto.transport.loseConnection()
        self.p.pump()
        self.assertEqual(len(self.p.a), 1)  # waiting for bob's FIN
        self.p.clock.advance(31)
        self.p.pump()
        self.assertEqual((len(self.p.a), len(self.p.b)), (0, 0))


class HostilePeerTests(SynchronousTestCase):
    """What a peer that ignores the rules can make the stream layer do."""

    def setUp(self) -> None:
        self.p = MemoryPair()
        self.p.b.handler = Services(sink=Collect)

    def test_sending_past_credit_resets_the_stream(self) -> None:
        self.successResultOf(opened(self.p, "sink"))
        self.p.b.streamData(8, b"q" * (INITIAL_WINDOW + 1), False)
        self.assertEqual(self.p.b.stats["flow_violations"], 1)
        self.assertIn(("reset", (8, frames.FLOW_CONTROL_ERROR)), self.p.cb.out)
        self.assertEqual(len(self.p.b), 0)

    def test_streams_of_the_wrong_parity_or_reused_ids_are_ignored(self) -> None:
        for stream_id in (9, 0, 1, 4, 5, 2):
            self.p.b.streamData(stream_id, frames.open_request("sink"), False)
        self.assertEqual(len(self.p.b), 0)
        self.successResultOf(opened(self.p, "sink"))
        self.p.b.streamData(8, b"", True)
        self.p.b.streamData(8, frames.open_request("sink"), False)  # a finished id again: late data
        self.assertLessEqual(len(self.p.b), 1)

    def test_too_many_streams_refused(self) -> None:
        for i in range(MAX_STREAMS + 5):
            self.p.b.streamData(8 + 4 * i, frames.open_request("sink"), False)
        self.assertEqual(len(self.p.b), MAX_STREAMS)
        self.assertEqual(self.p.b.stats["refused"], 5)

    def test_garbage_open_request_resets(self) -> None:
        self.p.b.streamData(8, b"\x07garbage", False)
        self.assertEqual(len(self.p.b), 0)
        self.assertIn(("reset", (8, frames.PROTOCOL_ERROR)), self.p.cb.out)

    def test_silent_opener_holds_only_its_bytes(self) -> None:
        """An open request that never completes costs at most its 257 bytes of buffer."""
        self.p.b.streamData(8, b"\x01\xff" + b"a" * 200, False)
        (transport,) = self.p.b._streams.values()
        self.assertEqual(len(transport._rx), 202)

    def test_data_before_acceptance_resets(self) -> None:
        """The opener must wait for the answer: data pipelined after the request is refused unbuffered."""
        self.p.b.streamData(8, frames.open_request("sink") + b"x" * 100_000, False)
        self.assertEqual(len(self.p.b), 0)
        self.assertIn(("reset", (8, frames.PROTOCOL_ERROR)), self.p.cb.out)

    def test_streams_waiting_for_a_handler_hold_only_their_request(self) -> None:
        p = MemoryPair()
        p.b.streamData(8, frames.open_request("sink"), False)
        p.b.streamData(8, b"more", False)
        self.assertEqual(len(p.b), 0)

    def test_huge_credit_is_a_protocol_error(self) -> None:
        proto = self.successResultOf(opened(self.p, "sink"))
        self.p.a.control(frames.Frame(frames.WINDOW_UPDATE, 0, 8, 0xFFFFFFFF))
        self.p.a.control(frames.Frame(frames.WINDOW_UPDATE, 0, 8, 0xFFFFFFFF))
        proto.lost.trap(StreamReset)

    def test_window_growth_is_bounded_per_session(self) -> None:
        """A fast consumer's window doubles, up to 16 MiB per stream and 64 MiB per connection."""

        class Count(Protocol):
            received = 0

            def dataReceived(self, data: bytes) -> None:
                self.received += len(data)

        self.p.b.handler = Services(count=Count)
        protos = [self.successResultOf(opened(self.p, "count")) for _ in range(6)]
        block = b"w" * (1 << 20)
        for _ in range(40):
            for proto in protos:
                proto.transport.write(block)
            self.p.pump()
        windows = [t.window for t in self.p.b._streams.values()]
        self.assertLessEqual(self.p.b.window_total, 64 * 1024 * 1024)
        self.assertLessEqual(max(windows), 16 * 1024 * 1024)
        self.assertGreater(max(windows), INITIAL_WINDOW)


class FrameTests(SynchronousTestCase):
    @given(
        st.lists(
            st.tuples(
                st.sampled_from([frames.DATA, frames.DATAGRAM, frames.WINDOW_UPDATE, frames.PING]),
                st.integers(0, 2**32 - 1),
                st.binary(max_size=300),
            ),
            max_size=20,
        ),
        st.integers(1, 50),
    )
    def test_round_trip_in_any_slices(self, items: list, step: int) -> None:
        wire = b""
        for type_, stream_id, payload in items:
            if type_ in (frames.DATA, frames.DATAGRAM):
                wire += frames.encode(type_, 0, stream_id, len(payload), payload)
            else:
                wire += frames.encode(type_, frames.SYN if type_ == frames.PING else 0, stream_id, len(payload))
        decoder = frames.FrameDecoder()
        out = []
        for i in range(0, len(wire), step):
            out += decoder.feed(wire[i : i + step])
        self.assertEqual(len(out), len(items))
        self.assertEqual(decoder.buffered, 0)

    @given(st.binary(max_size=200))
    def test_garbage_raises_frame_error_or_waits(self, data: bytes) -> None:
        decoder = frames.FrameDecoder()
        try:
            decoder.feed(data)
        except frames.FrameError:
            return
        self.assertLessEqual(decoder.buffered, len(data))

    def test_oversized_frame_refused_before_buffering(self) -> None:
        decoder = frames.FrameDecoder()
        with self.assertRaises(frames.FrameError):
            decoder.feed(frames.encode(frames.DATA, 0, 8, frames.MAX_FRAME + 1))

    @given(st.binary(max_size=300))
    def test_open_and_answer_parsers_never_crash(self, data: bytes) -> None:
        for parse in (frames.parse_open, frames.parse_answer):
            try:
                parsed = parse(data)
            except frames.OpenError:
                continue
            if parsed is not None:
                self.assertLessEqual(parsed[1], len(data))

    @given(st.text(min_size=1, max_size=60).filter(lambda s: s.isprintable() and not any(c.isspace() for c in s)))
    def test_service_round_trip(self, service: str) -> None:
        if len(service.encode()) > 255:
            return
        self.assertEqual(frames.parse_open(frames.open_request(service)), (service, 2 + len(service.encode())))

    @given(st.one_of(st.none(), st.text(max_size=700)))
    def test_answer_round_trip(self, reason: str | None) -> None:
        parsed = frames.parse_answer(frames.answer(reason))
        assert parsed is not None
        if reason is None:
            self.assertIsNone(parsed[0])
        else:
            self.assertIsNotNone(parsed[0])


class MuxTests(SynchronousTestCase):
    def make(self, **kw: Any) -> tuple[MuxCarrier, list[bytes], list[str], Clock]:
        clock = Clock()
        written: list[bytes] = []
        dead: list[str] = []
        mux = MuxCarrier(written.append, 0, clock, lambda d: None, dead.append, **kw)
        return mux, written, dead, clock

    def test_silent_peer_is_dead_after_the_bound(self) -> None:
        mux, written, dead, clock = self.make(keepalive_interval=10, dead_after=30, pong_timeout=None)
        clock.advance(10)
        self.assertEqual(written, [frames.ping(1)])
        mux.dataReceived(frames.ping(1, answer=True))
        clock.advance(10)
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(dead, [])
        clock.advance(10)
        self.assertEqual(len(dead), 1)
        self.assertIn("nothing heard from the peer for 30 s", dead[0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unanswered_ping_is_dead_after_the_pong_timeout(self) -> None:
        mux, written, dead, clock = self.make(keepalive_interval=10, pong_timeout=5)
        clock.advance(10)
        mux.dataReceived(frames.ping(1, answer=True))
        clock.advance(5)
        self.assertEqual(dead, [])
        clock.advance(5)  # ping 2, unanswered
        clock.advance(4.9)
        self.assertEqual(dead, [])
        clock.advance(0.1)
        self.assertEqual(
            dead,
            ["no answer to a keepalive PING within 5.0 s (nothing heard from the peer for 15.0 s): the path is dead"],
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_any_frame_answers_a_ping(self) -> None:
        """A PONG stuck behind the peer's data: the data proves it is alive."""
        mux, written, dead, clock = self.make(keepalive_interval=10, pong_timeout=5)
        clock.advance(10)
        clock.advance(3)
        mux.dataReceived(frames.datagram(b"data"))
        clock.advance(10)
        self.assertEqual(dead, [])

    def test_ping_behind_our_own_draining_data_waits(self) -> None:
        """Our socket still drains to the peer (it acknowledges): the PING is late, not lost."""
        queue = [100_000]
        mux, written, dead, clock = self.make(keepalive_interval=10, pong_timeout=5, send_queue=lambda: queue[0])
        clock.advance(10)
        queue[0] = 60_000
        clock.advance(5)
        self.assertEqual(dead, [])
        clock.advance(5)  # not draining any more (and the next PING is queued)
        self.assertEqual(len(dead), 1)
        self.assertIn("within 10.0 s", dead[0])

    def test_socket_send_queue(self) -> None:
        """TIOCOUTQ of a real socket (unread bytes stay queued at the writer), None without one."""
        import socket as socketlib

        left, right = socketlib.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)

        class Transport:
            def getHandle(self):
                return left

        queued = socket_send_queue(Transport())
        self.assertEqual(queued(), 0)
        left.send(b"x" * 1000)
        self.assertGreater(queued(), 0)  # what the reader has not taken (AF_UNIX counts buffer memory)
        self.assertIsNone(socket_send_queue(object())())

    def test_ping_is_answered(self) -> None:
        mux, written, dead, clock = self.make(keepalive_interval=None)
        mux.dataReceived(frames.ping(77))
        self.assertEqual(written, [frames.ping(77, answer=True)])

    def test_broken_framing_ends_the_connection(self) -> None:
        mux, written, dead, clock = self.make(keepalive_interval=None)
        mux.dataReceived(b"\x09" * 12)
        self.assertIn("broke the stream framing", dead[0])
        mux.dataReceived(frames.ping(1))
        self.assertEqual(written, [])

    def test_datagrams_and_transport_backpressure(self) -> None:
        got: list[bytes] = []
        clock = Clock()
        mux = MuxCarrier(lambda d: None, 0, clock, got.append, lambda why: None, keepalive_interval=None)
        mux.dataReceived(frames.datagram(b"one") + frames.datagram(b"two"))
        self.assertEqual(got, [b"one", b"two"])
        mux.pauseProducing()
        self.assertFalse(mux.writable(8))
        mux.resumeProducing()
        self.assertTrue(mux.writable(8))


class TransportInterfaceTests(SynchronousTestCase):
    def test_verify(self) -> None:
        p = MemoryPair()
        p.b.handler = Services(echo=Echo)
        proto = self.successResultOf(opened(p))
        self.assertIsInstance(proto.transport, StreamTransport)
        self.assertEqual(str(proto.transport.getPeer()).split(" ")[0], "natbypass:bob/echo")

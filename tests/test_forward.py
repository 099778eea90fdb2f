"""natbypass forward: the -L and --expose grammar, the relay in memory, events, options."""

from __future__ import annotations

import io
import json
import sys

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.app import forward
from natbypass.app.forward import Exposure, ForwardSpec, Relay, Target, join, parse_expose, parse_forward
from natbypass.streams import PeerAddress, StreamRefused

ports = st.integers(1, 65535)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9._-]{0,20}", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts = st.one_of(ipv4, ipv6, st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9]{0,5}){0,2}", fullmatch=True))


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class GrammarTests(SynchronousTestCase):
    @given(bind=st.one_of(st.none(), ipv4, ipv6), port=st.integers(0, 65535), host=hosts, hostport=ports)
    def test_local_round_trip(self, bind: str | None, port: int, host: str, hostport: int) -> None:
        text = (f"{bracket(bind)}:" if bind else "") + f"{port}:{bracket(host)}:{hostport}"
        spec = parse_forward(text)
        self.assertEqual(spec, ForwardSpec(bind or "127.0.0.1", port, Target(host, hostport)))
        self.assertEqual(spec.target.service, f"forward:{bracket(host)}:{hostport}")

    @given(bind=st.one_of(st.none(), ipv4), port=st.integers(0, 65535), name=names)
    def test_local_by_name(self, bind: str | None, port: int, name: str) -> None:
        spec = parse_forward((f"{bind}:" if bind else "") + f"{port}:{name}")
        self.assertEqual(spec, ForwardSpec(bind or "127.0.0.1", port, Target(None, None, name)))
        self.assertEqual(spec.target.service, f"forward:{name}")

    @given(name=st.one_of(st.none(), names), host=hosts, port=ports)
    def test_expose_round_trip(self, name: str | None, host: str, port: int) -> None:
        exposure = parse_expose((f"{name}=" if name else "") + f"{bracket(host)}:{port}")
        self.assertEqual(exposure, Exposure(name, host, port))
        # what -L names reaches what --expose serves
        self.assertIn(parse_forward(f"1:{bracket(host)}:{port}").target.service, exposure.services)
        if name:
            self.assertIn(parse_forward(f"1:{name}").target.service, exposure.services)

    @given(st.text(max_size=40))
    def test_never_crashes(self, text: str) -> None:
        for parse in (parse_forward, parse_expose):
            try:
                parse(text)
            except ValueError:
                pass

    def test_canonical_hosts(self) -> None:
        """One target, one service name, however it is spelt."""
        self.assertEqual(parse_forward("1:[::0001]:22").target.service, "forward:[::1]:22")
        self.assertEqual(parse_forward("1:Web.Example.:80").target.service, "forward:web.example:80")
        self.assertEqual(parse_forward("*:80:web").bind, "0.0.0.0")

    def test_errors(self) -> None:
        for text, message in (
            ("80", "expected [BIND:]PORT:HOST:HOSTPORT"),
            ("1:2:3:4:5", "expected"),
            ("x:80:web", "must be an IP address"),
            ("70000:h:22", "the local port must be a number"),
            ("80:h:0", "the target port must be a number 1-65535"),
            ("80:[::1:22", "missing ']'"),
            ("80:bad host:22", "neither an IP address nor a host name"),
            ("80:12", "cannot be all digits"),
        ):
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_forward(text)
            self.assertIn(message, str(caught.exception), text)
        for text, message in (
            ("web=h", "expected [NAME=]HOST:PORT"),
            ("we b=h:1", "a forward name"),
            ("1=h:1", "cannot be all digits"),
            ("h:0", "must be a number"),
        ):
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_expose(text)
            self.assertIn(message, str(caught.exception), text)


class HalfCloseTransport(StringTransport):
    """A StringTransport that half-closes like TCP: loseWriteConnection tells its half-closeable protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True
        self.protocol.writeConnectionLost()

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def pair() -> tuple[Relay, Relay, HalfCloseTransport, HalfCloseTransport, list]:
    lost: list = []
    a, b = Relay(lambda side, why: lost.append((side, why))), Relay(lambda side, why: lost.append((side, why)))
    ta, tb = HalfCloseTransport(), HalfCloseTransport()
    ta.protocol, tb.protocol = a, b
    a.makeConnection(ta)
    b.makeConnection(tb)
    return a, b, ta, tb, lost


class RelayTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IHalfCloseableProtocol, Relay()))
        self.assertTrue(verifyObject(IPushProducer, forward._Pausing(StringTransport())))

    def test_paused_until_joined_then_both_ways(self) -> None:
        a, b, ta, tb, _ = pair()
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "paused"))
        join(a, b)
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))
        a.dataReceived(b"to b")
        b.dataReceived(b"to a!")
        self.assertEqual((tb.value(), ta.value()), (b"to b", b"to a!"))
        self.assertEqual((a.bytes, b.bytes), (4, 5))

    def test_backpressure_pauses_the_other_side(self) -> None:
        """Each side is the other's producer: a full writer pauses the reader on the other side only."""
        a, b, ta, tb, _ = pair()
        join(a, b)
        self.assertTrue(tb.streaming)
        tb.producer.pauseProducing()  # b's transport is full
        self.assertEqual((ta.producerState, tb.producerState), ("paused", "producing"))
        tb.producer.resumeProducing()
        self.assertEqual(ta.producerState, "producing")
        # stopping (the transport going away) is the relay's business, not a clean close of the other side
        tb.producer.stopProducing()
        self.assertFalse(ta.disconnecting)

    def test_half_close_each_way(self) -> None:
        a, b, ta, tb, _ = pair()
        join(a, b)
        a.readConnectionLost()  # a's side sent everything
        self.assertTrue(tb.write_closed)
        self.assertIsNone(tb.producer)  # nothing will come from a any more
        self.assertFalse(ta.disconnecting)
        b.dataReceived(b"late answer")  # the other way still flows
        self.assertEqual(ta.value(), b"late answer")
        b.readConnectionLost()
        self.assertTrue(ta.write_closed)
        # both directions done on both sides: both close
        self.assertTrue(ta.disconnecting and tb.disconnecting)
        self.assertFalse(ta.aborted or tb.aborted)

    def test_clean_end_closes_abort_aborts(self) -> None:
        a, b, ta, tb, lost = pair()
        join(a, b)
        a.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(tb.disconnecting)
        self.assertFalse(tb.aborted)
        a, b, ta, tb, lost = pair()
        join(a, b)
        a.connectionLost(Failure(ConnectionAborted()))
        self.assertTrue(tb.aborted)
        self.assertEqual(lost[0][0], a)


class FakeStream(HalfCloseTransport):
    def getPeer(self) -> PeerAddress:
        return PeerAddress("bob", None, "forward:web", "udp", None, 8)


class FakePeer:
    """openStream answers with C{result}: an exception or a connected stream."""

    def __init__(self, result: object) -> None:
        self.result = result
        self.opened: list[tuple] = []

    def openStream(self, peer_id, service, factory, protocol=None, fingerprint=None):
        self.opened.append((peer_id, service, protocol, fingerprint))
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        proto = factory.buildProtocol(None)
        transport = FakeStream()
        transport.protocol = proto
        proto.makeConnection(transport)
        return defer.succeed(proto)


class ForwarderTests(SynchronousTestCase):
    def forwarder(self, result: object) -> tuple[forward.Forwarder, io.StringIO, FakePeer, Clock]:
        out, peer, clock = io.StringIO(), FakePeer(result), Clock()
        spec = parse_forward("0:web")
        return forward.Forwarder(peer, "bob", spec, forward.Events(out, True), clock, "udp"), out, peer, clock

    def accept(self, factory: forward.Forwarder) -> tuple[Relay, HalfCloseTransport]:
        local = factory.buildProtocol(None)
        transport = HalfCloseTransport()
        transport.protocol = local
        local.makeConnection(transport)
        return local, transport

    def test_stream_per_connection_with_events(self) -> None:
        factory, out, peer, clock = self.forwarder(None)
        local, transport = self.accept(factory)
        self.assertEqual(peer.opened, [("bob", "forward:web", "udp", None)])
        forwarded = next(iter(factory.active))
        local.dataReceived(b"GET /\r\n")
        self.assertEqual(forwarded.stream.transport.value(), b"GET /\r\n")
        forwarded.stream.dataReceived(b"hello")
        self.assertEqual(transport.value(), b"hello")
        clock.advance(1.5)
        local.connectionLost(Failure(ConnectionDone()))
        forwarded.stream.connectionLost(Failure(ConnectionDone()))
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([e["event"] for e in events], ["opened", "closed"])
        self.assertEqual(
            (events[0]["path"], events[0]["stream_id"], events[0]["from"]), ("udp", 8, "192.168.1.1:54321")
        )
        self.assertEqual((events[1]["bytes_sent"], events[1]["bytes_received"], events[1]["duration_ms"]), (7, 5, 1500))
        self.assertNotIn("reason", events[1])
        self.assertEqual(factory.active, set())

    def test_refusal_is_an_error_event_and_closes_only_that_connection(self) -> None:
        factory, out, peer, clock = self.forwarder(StreamRefused("bob has no service 'forward:web'"))
        local, transport = self.accept(factory)
        other, other_transport = self.accept(factory)
        self.assertTrue(transport.disconnecting)
        (event, second) = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((event["event"], event["connection"], second["connection"]), ("error", 1, 2))
        self.assertIn("bob refused web: bob has no service 'forward:web'", event["reason"])
        self.assertIn("--expose", event["reason"])
        self.assertEqual(factory.errors, 2)

    def test_client_gone_before_the_stream_opened_cancels_it(self) -> None:
        factory, out, peer, clock = self.forwarder(None)
        pending: defer.Deferred = defer.Deferred()
        peer.openStream = lambda *a, **k: pending  # type: ignore[method-assign]
        local, transport = self.accept(factory)
        local.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(pending.called)  # cancelled (and the cancellation handled)
        self.assertEqual(out.getvalue(), "")  # a cancelled open is no error
        self.assertEqual(factory.active, set())


class OptionsTests(SynchronousTestCase):
    base = ["--mediator", "tcp:127.0.0.1:7000", "--id", "alice", "--peer", "bob"]

    def parse(self, *argv: str) -> tuple[int | None, dict | None, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        try:
            return None, forward.parse_options([*self.base, "--known-peers", self.mktemp(), *argv]), ""
        except SystemExit as e:
            return int(e.code or 0), None, err.getvalue()

    def test_repeated_forwards(self) -> None:
        _, options, _ = self.parse("-L", "8080:web", "-L", "0.0.0.0:2222:10.0.0.5:22", "--json")
        self.assertEqual(
            options["local"],
            [
                ForwardSpec("127.0.0.1", 8080, Target(None, None, "web")),
                ForwardSpec("0.0.0.0", 2222, Target("10.0.0.5", 22)),
            ],
        )
        self.assertTrue(options["json"])

    def test_usage_errors(self) -> None:
        for argv, message in (
            ((), "give at least one -L"),
            (("-L", "80"), "expected [BIND:]PORT"),
            (("-L", "1:web", "-R", "2:h:3"), "-R (remote forwarding) is not implemented"),
        ):
            code, _, err = self.parse(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err, argv)

    def test_subcommand_registered(self) -> None:
        from natbypass.app.cli import SUBCOMMANDS

        self.assertEqual(SUBCOMMANDS["forward"][0], "natbypass.app.forward")
        self.assertEqual(SUBCOMMANDS["pipe"][0], "natbypass.app.pipe")

"""natbypass forward: the -L and --expose grammar, the relay in memory, events, options."""

from __future__ import annotations

import io
import json
import sys

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.app import forward, relay, remote_forward
from natbypass.app.forward import (
    Exposure,
    ForwardSpec,
    ListenAllowance,
    Target,
    parse_allow_listen,
    parse_expose,
    parse_forward,
    parse_remote,
)
from natbypass.app.relay import Relay, join
from natbypass.app.remote_forward import ListenStatus
from natbypass.identity import Identity
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
        self.assertTrue(verifyObject(IPushProducer, relay._Pausing(StringTransport())))

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
            ((), "give at least one -L [BIND:]PORT:HOST:HOSTPORT or -R"),
            (("-L", "80"), "expected [BIND:]PORT"),
            (("-R", "2:web"), "-R '2:web': expected [BIND:]PORT:HOST:HOSTPORT (the target on this side"),
            (("-R", "99999:h:3"), "the port to listen on must be a number"),
        ):
            code, _, err = self.parse(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err, argv)

    def test_remote_forwards(self) -> None:
        _, options, _ = self.parse("-R", "8080:127.0.0.1:80", "-R", "*:0:[::1]:22")
        self.assertEqual(
            options["remote"],
            [ForwardSpec("127.0.0.1", 8080, Target("127.0.0.1", 80)), ForwardSpec("0.0.0.0", 0, Target("::1", 22))],
        )
        self.assertEqual(options["local"], [])

    def test_subcommand_registered(self) -> None:
        from natbypass.app.cli import SUBCOMMANDS

        self.assertEqual(SUBCOMMANDS["forward"][0], "natbypass.app.forward")
        self.assertEqual(SUBCOMMANDS["pipe"][0], "natbypass.app.pipe")


class RemoteGrammarTests(SynchronousTestCase):
    @given(bind=st.one_of(st.none(), ipv4, ipv6), port=st.integers(0, 65535), host=hosts, hostport=ports)
    def test_remote_round_trip(self, bind: str | None, port: int, host: str, hostport: int) -> None:
        spec = parse_remote((f"{bracket(bind)}:" if bind else "") + f"{port}:{bracket(host)}:{hostport}")
        self.assertEqual(spec, ForwardSpec(bind or "127.0.0.1", port, Target(host, hostport)))
        self.assertEqual(forward.back_service(spec.target), f"forward-back:{bracket(host)}:{hostport}")
        # what -R asks for is what --allow-remote-listen serves, for the same address
        allowed = parse_allow_listen(f"{bracket(spec.bind)}:{port}")
        self.assertEqual(allowed.services, (forward.listen_service(spec.bind, port),))

    @given(bind=st.one_of(st.none(), ipv4), low=st.integers(1, 65535), width=st.integers(0, 1023))
    def test_allow_range(self, bind: str | None, low: int, width: int) -> None:
        high = min(low + width, 65535)
        allowance = parse_allow_listen((f"{bind}:" if bind else "") + f"{low}-{high}")
        self.assertEqual(allowance, ListenAllowance(bind or "127.0.0.1", low, high))
        self.assertEqual(len(allowance.services), high - low + 1)

    @given(host=hosts, port=ports)
    def test_request_round_trip(self, host: str, port: int) -> None:
        self.assertEqual(
            remote_forward.parse_request(remote_forward.encode_request(Target(host, port))), Target(host, port)
        )

    @given(st.one_of(st.builds(ListenStatus, address=st.builds(lambda h, p: f"{bracket(h)}:{p}", ipv4 | ipv6, ports)),
                     st.builds(ListenStatus, error=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='\\'),
                                                           min_size=1, max_size=100))))  # fmt: skip
    def test_status_round_trip(self, status: ListenStatus) -> None:
        self.assertEqual(remote_forward.parse_status(status.encode()), status)

    @given(st.binary(max_size=80))
    def test_control_parsers_never_crash(self, line: bytes) -> None:
        for parse in (remote_forward.parse_request, remote_forward.parse_status):
            try:
                parse(line)
            except ValueError:
                pass

    @given(st.text(max_size=40))
    def test_option_parsers_never_crash(self, text: str) -> None:
        for parse in (parse_remote, parse_allow_listen):
            try:
                parse(text)
            except ValueError:
                pass

    def test_status_error_is_one_safe_line(self) -> None:
        line = ListenStatus(error="no\nway\r\x1b[31m").encode()
        self.assertNotIn(b"\n", line)
        self.assertEqual(remote_forward.parse_status(line).error, "no way \\x1b[31m")

    def test_errors(self) -> None:
        for text, message in (
            ("8080", "expected [BIND:]PORT or [BIND:]LOW-HIGH"),
            ("1:2:3", "expected [BIND:]PORT"),
            ("x:80", "must be an IP address"),
            ("9-1", "is empty"),
            ("0-10", "the port must be a number 1-65535"),
            ("1000-3000", "at most 1024 ports"),
        ):
            if text == "8080":
                continue  # a lone port is fine
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_allow_listen(text)
            self.assertIn(message, str(caught.exception), text)
        self.assertEqual(parse_allow_listen("0"), ListenAllowance("127.0.0.1", 0, 0))
        self.assertEqual(
            parse_allow_listen("*:8000-8001").services, ("forward-listen:0.0.0.0:8000", "forward-listen:0.0.0.0:8001")
        )
        for line, message in ((b"web", "no HOST:PORT"), (b"h:0", "must be a number"), (b"\xff:1", "not ASCII")):
            with self.assertRaises(ValueError, msg=line) as caught:
                remote_forward.parse_request(line)
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(ValueError):
            remote_forward.parse_status(b"listening nowhere")


class ControlStream(HalfCloseTransport):
    """A stream transport to a control service, as the peer's stream layer gives it."""

    def __init__(self, peer: PeerAddress) -> None:
        super().__init__()
        self.peer = peer

    def getPeer(self) -> PeerAddress:
        return self.peer


ALICE_KEY = Identity.generate().fingerprint
CAROL_KEY = Identity.generate().fingerprint


class ServingTests(SynchronousTestCase):
    """The serving peer's end: --allow-remote-listen's services, one control stream each."""

    def setUp(self) -> None:
        self.reactor = RecordingReactor()
        self.peer = ServingPeer()
        remote_forward.serve_remote_listen(self.peer, [parse_allow_listen("8000-8001")], self.reactor)

    def control(self, service: str = "forward-listen:127.0.0.1:8000") -> tuple[object, ControlStream]:
        addr = PeerAddress("alice", ALICE_KEY, service, "udp", None, 4)
        proto = self.peer.served[service].buildProtocol(addr)
        transport = ControlStream(addr)
        transport.protocol = proto
        proto.makeConnection(transport)
        return proto, transport

    def test_serves_exactly_the_allowed_addresses(self) -> None:
        self.assertEqual(sorted(self.peer.served), ["forward-listen:127.0.0.1:8000", "forward-listen:127.0.0.1:8001"])

    def test_listens_while_the_control_stream_is_open(self) -> None:
        proto, transport = self.control()
        self.assertEqual(self.reactor.tcpServers, [])  # nothing until the requester names its target
        proto.dataReceived(b"127.0.0.1:5000\n")
        ((port, factory, _, interface),) = self.reactor.tcpServers
        self.assertEqual((port, interface), (8000, "127.0.0.1"))
        self.assertEqual(transport.value(), b"listening 127.0.0.1:8000\n")
        # each connection accepted there is a stream back to alice's forward-back service, pinned to her key
        self.assertEqual(
            (factory.peer_id, factory.fingerprint, factory.service), ("alice", ALICE_KEY, "forward-back:127.0.0.1:5000")
        )
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.reactor.ports[0].stopped)  # the control stream's end is the listener's

    def test_bad_request_is_answered_and_closed(self) -> None:
        proto, transport = self.control()
        proto.dataReceived(b"web\n")
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(transport.value(), b"error the forward request 'web' is no HOST:PORT\n")
        self.assertTrue(transport.disconnecting)


class RecordingPort:
    def __init__(self, interface: str, port: int) -> None:
        self.address = IPv4Address("TCP", interface, port)
        self.stopped = False

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        self.stopped = True


class RecordingReactor(MemoryReactorClock):
    """A MemoryReactorClock whose TCP ports say where they listen and whether they were stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[RecordingPort] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        super().listenTCP(port, factory, backlog, interface)
        self.ports.append(RecordingPort(interface, port))
        return self.ports[-1]


class ServingPeer:
    """Peer.serve and nothing else: the services by name."""

    def __init__(self) -> None:
        self.served: dict = {}

    def serve(self, service: str, factory: object) -> str:
        self.served[service] = factory
        return service


class RemoteForwardTests(SynchronousTestCase):
    """The requester's end of -R, on a fake peer and a Clock."""

    def remote(self, result: object) -> tuple[remote_forward.RemoteForward, io.StringIO, FakeControlPeer, Clock]:
        out, peer, clock = io.StringIO(), FakeControlPeer(result), Clock()
        remote = remote_forward.RemoteForward(
            peer, "bob", parse_remote("0:127.0.0.1:5000"), forward.Events(out, True), clock
        )
        return remote, out, peer, clock

    def events(self, out: io.StringIO) -> list[dict]:
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_refused_is_an_error_and_a_failure(self) -> None:
        remote, out, peer, clock = self.remote(StreamRefused("bob has no service 'forward-listen:127.0.0.1:0'"))
        failure = self.failureResultOf(remote.start(), forward.RemoteForwardFailed)
        self.assertIn("bob refused to listen on 127.0.0.1:0", str(failure.value))
        (event,) = self.events(out)
        self.assertEqual((event["event"], event["service"]), ("error", "forward-listen:127.0.0.1:0"))
        self.assertIn("--allow-remote-listen", event["reason"])
        self.assertEqual(clock.getDelayedCalls(), [])  # refused at start: the command exits, no retry

    def test_listening_then_lost_asks_again(self) -> None:
        remote, out, peer, clock = self.remote(None)
        d = remote.start()
        control, transport = peer.controls[-1]
        self.assertEqual(transport.value(), b"127.0.0.1:5000\n")  # the request names our target
        control.dataReceived(b"listening 127.0.0.1:41000\n")
        self.assertEqual(self.successResultOf(d), "127.0.0.1:41000")
        listening = self.events(out)[0]
        self.assertEqual(
            (listening["event"], listening["remote"], listening["service"]),
            ("listening", True, "forward-back:127.0.0.1:5000"),
        )
        # the gate: only bob, with the key that answered, while it listens
        self.assertIsNone(remote.refusal(PeerAddress("bob", ALICE_KEY, "forward-back:127.0.0.1:5000", "udp", None, 5)))
        self.assertIsNotNone(
            remote.refusal(PeerAddress("bob", CAROL_KEY, "forward-back:127.0.0.1:5000", "udp", None, 5))
        )
        self.assertIsNotNone(
            remote.refusal(PeerAddress("carol", ALICE_KEY, "forward-back:127.0.0.1:5000", "udp", None, 5))
        )
        control.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(
            remote.refusal(PeerAddress("bob", ALICE_KEY, "forward-back:127.0.0.1:5000", "udp", None, 5))
        )
        self.assertIn("stopped listening", self.events(out)[-1]["reason"])
        self.assertEqual(len(peer.controls), 1)
        clock.advance(1)
        self.assertEqual(len(peer.controls), 2)  # asked again
        peer.controls[-1][0].dataReceived(b"error cannot listen on 127.0.0.1:0: in use\n")
        clock.advance(1.5)
        self.assertEqual(len(peer.controls), 2)  # the second retry waits twice as long
        clock.advance(0.5)
        self.assertEqual(len(peer.controls), 3)
        remote.stopListening()
        self.assertTrue(peer.controls[-1][1].disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_error_answer_fails_start(self) -> None:
        remote, out, peer, clock = self.remote(None)
        d = remote.start()
        peer.controls[-1][0].dataReceived(b"error cannot listen on 127.0.0.1:0: in use\n")
        self.assertIn("bob cannot listen on 127.0.0.1:0: cannot listen", str(self.failureResultOf(d).value))
        self.assertTrue(peer.controls[-1][1].disconnecting)
        self.assertEqual([e["event"] for e in self.events(out)], ["error"])


class FakeControlPeer:
    """openStream to a control service: fails with C{result}, or connects the control protocol to a ControlStream."""

    def __init__(self, result: object) -> None:
        self.result = result
        self.controls: list = []

    def openStream(self, peer_id, service, factory, protocol=None, fingerprint=None):
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        proto = factory.buildProtocol(None)
        transport = ControlStream(PeerAddress(peer_id, ALICE_KEY, service, "udp", None, 4))
        transport.protocol = proto
        proto.makeConnection(transport)
        self.controls.append((proto, transport))
        return defer.succeed(proto)

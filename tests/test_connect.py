"""natbypass connect: bad usage is refused with exit status 2 before anything starts; what a run prints."""

import io
import json
import os
import sys

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app import connect, peer_tap
from natbypass.app.peer_options import PEER_OPTIONS
from natbypass.identity import Fingerprint, Identity
from natbypass.punch.candidates import PortRange
from natbypass.punch.race import AllAttemptsFailed, AttemptRecord, Outcome
from natbypass.signaling.client import UnknownPeer
from natbypass.streams import StreamRefused
from natbypass.trust import FingerprintMismatch, KnownPeers

ALICE, BOB = Identity.generate(), Identity.generate()


class UsageTests(SynchronousTestCase):
    def run_captured(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        return connect.run(list(argv)), err.getvalue()

    def test_missing_arguments(self) -> None:
        code, err = self.run_captured("--id", "alice")
        self.assertEqual(code, 2)
        self.assertIn("--mediator", err)

    def test_bad_values(self) -> None:
        base = ("--mediator", "tcp:127.0.0.1:7000", "--id", "alice", "--peer", "bob")
        for extra, message in (
            (("--protocol", "quic"), "protocol wish must be"),
            (("--port-range", "5-1"), "port range"),
            (("--count", "-1"), "--count and --interval must be 0 or more"),
            (("--stun", "127.0.0.1:99999"), "the port must be a number"),
            (("--peer-fingerprint", "nb1-not-a-key"), "--peer-fingerprint"),
        ):
            code, err = self.run_captured(*base, *extra)
            self.assertEqual(code, 2, extra)
            self.assertIn(message, err, extra)

    def test_help(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(connect.run(["--help"]), 0)
        self.assertIn("--protocol", out.getvalue())


# -------------------------------------------------------------- the run


class EchoingStream:
    """A stream transport that echoes what is written at once (or raises C{send_error}, or swallows it)."""

    def __init__(self, connection: "EchoingConnection") -> None:
        self.connection = connection
        self.protocol = None
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.connection.send_error is not None:
            raise self.connection.send_error
        if self.connection.echo:
            self.protocol.dataReceived(data)

    def loseConnection(self) -> None:
        self.closed = True


class EchoingConnection:
    """A path whose streams to C{echo} echo (or refuse with C{refuse}); records the services opened."""

    protocol = "udp"
    session_id = "s-1"
    peer_id = "bob"
    outcome = None
    secure = True
    peer_fingerprint = BOB.fingerprint
    cipher = "QUICv1 TLS_AES_128_GCM_SHA256"
    handshake_ms = 101.26
    punched_at = None

    def __init__(
        self,
        local: object,
        remote: object,
        send_error: Exception | None = None,
        echo: bool = True,
        refuse: str | None = None,
    ) -> None:
        self.local_address, self.remote_address = local, remote
        self.send_error, self.echo, self.refuse = send_error, echo, refuse
        self.services: list[str] = []
        self.streams: list[EchoingStream] = []
        self.closed = False

    def openStream(self, service: str, factory) -> defer.Deferred:
        self.services.append(service)
        if self.refuse is not None:
            return defer.fail(StreamRefused(self.refuse))
        transport = EchoingStream(self)
        proto = factory.buildProtocol(None)
        transport.protocol = proto
        proto.makeConnection(transport)
        self.streams.append(transport)
        return defer.succeed(proto)

    def close(self) -> None:
        self.closed = True


class FakePeer:
    """What C{natbypass connect} needs of a Peer: connect gives C{result} (a connection or an exception)."""

    def __init__(self, result: object, ready: defer.Deferred | None = None) -> None:
        self.result = result
        self.running = False
        self.pins: list[object] = []
        self.ready = ready

    def whenReady(self) -> defer.Deferred:
        return self.ready if self.ready is not None else defer.succeed(None)

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False

    def connect(self, peer_id: str, fingerprint: object = None):
        self.pins.append(fingerprint)
        if isinstance(self.result, Exception):
            return defer.fail(self.result)
        return defer.succeed(self.result)


class RunTests(SynchronousTestCase):
    """connect's _main with a fake peer on a Clock: what it prints and returns."""

    def run_main(self, result: object, *extra: str) -> tuple[defer.Deferred, str, FakePeer]:
        known = os.path.join(self.mktemp(), "known_peers")
        argv = ["--mediator", "tcp:127.0.0.1:7000", "--id", "alice", "--peer", "bob", "--known-peers", known, *extra]
        options = connect.parse_options(argv)
        peer, out, clock = FakePeer(result), io.StringIO(), Clock()
        self.made: list[dict] = []

        def make(reactor, options, **kwargs):
            self.made.append(kwargs)
            return peer

        d = defer.ensureDeferred(connect._main(clock, options, out, make=make))
        self.clock = clock
        return d, out.getvalue(), peer

    def test_ipv6_addresses_in_brackets(self) -> None:
        """Regression: IPv6 addresses were printed as 2001:db8::1:40000."""
        conn = EchoingConnection(IPv6Address("UDP", "2001:db8::1", 40000), IPv6Address("UDP", "2001:db8::2", 50000))
        d, out, peer = self.run_main(conn, "--count", "1")
        self.assertEqual(self.successResultOf(d), connect.EXIT_OK)
        self.assertIn("connected to bob over udp: [2001:db8::1]:40000 -> [2001:db8::2]:50000 in 0 ms", out)
        d, out, peer = self.run_main(conn, "--count", "1", "--json")
        self.successResultOf(d)
        event = json.loads(out.splitlines()[0])
        self.assertEqual(
            (event["local_address"], event["remote_address"]), ("[2001:db8::1]:40000", "[2001:db8::2]:50000")
        )

    def test_ipv4_unchanged(self) -> None:
        conn = EchoingConnection(IPv4Address("TCP", "10.0.0.1", 40000), IPv4Address("TCP", "198.51.100.2", 50000))
        d, out, peer = self.run_main(conn, "--count", "2")
        self.assertEqual(self.successResultOf(d), connect.EXIT_OK)
        self.assertIn(": 10.0.0.1:40000 -> 198.51.100.2:50000 in 0 ms", out)
        self.assertIn("echo: 2/2 came back", out)
        # one stream to the echo service carried them, closed at the end
        self.assertEqual(conn.services, ["echo"])
        self.assertTrue(conn.streams[0].closed)
        self.assertTrue(conn.closed)
        self.assertFalse(peer.running)

    def test_connected_event_says_how_it_is_secured(self) -> None:
        conn = EchoingConnection(IPv4Address("UDP", "10.0.0.1", 40000), IPv4Address("UDP", "198.51.100.2", 50000))
        d, out, peer = self.run_main(conn, "--count", "1", "--json")
        self.assertEqual(self.successResultOf(d), connect.EXIT_OK)
        event = json.loads(out.splitlines()[0])
        self.assertEqual(
            (event["secure"], event["peer_fingerprint"], event["cipher"], event["handshake_ms"]),
            (True, str(BOB.fingerprint), "QUICv1 TLS_AES_128_GCM_SHA256", 101.3),
        )
        # without a pin, trust on first use in the known-peers file
        self.assertEqual(peer.pins, [None])
        self.assertIsInstance(self.made[0]["known_peers"], KnownPeers)

    def test_connected_event_times_from_registration(self) -> None:
        """
        Besides C{elapsed_ms} from the command's start, the connected event
        says when the peer was registered (C{registered_ms}) and when the raw
        path was proven (C{punched_ms}, the connection's C{punched_at}), so
        the time of an introduction is measured without the registration.
        """
        conn = EchoingConnection(IPv4Address("UDP", "10.0.0.1", 40000), IPv4Address("UDP", "198.51.100.2", 50000))
        known = os.path.join(self.mktemp(), "known_peers")
        argv = ["--mediator", "tcp:127.0.0.1:7000", "--id", "alice", "--peer", "bob", "--known-peers", known]
        options = connect.parse_options([*argv, "--count", "0", "--json"])
        clock, out, ready, path = Clock(), io.StringIO(), defer.Deferred(), defer.Deferred()
        peer = FakePeer(conn, ready=ready)
        peer.connect = lambda peer_id, fingerprint=None: path
        d = defer.ensureDeferred(connect._main(clock, options, out, make=lambda reactor, options, **kw: peer))
        clock.advance(0.060)
        ready.callback(None)
        clock.advance(0.150)
        conn.punched_at = clock.seconds()
        clock.advance(0.040)
        path.callback(conn)
        self.assertEqual(self.successResultOf(d), connect.EXIT_OK)
        event = json.loads(out.getvalue().splitlines()[0])
        self.assertEqual((event["registered_ms"], event["punched_ms"], event["elapsed_ms"]), (60, 210, 250))

    def test_connected_event_without_punched_at(self) -> None:
        """A connection that does not know when its path was punched: C{punched_ms} is null."""
        conn = EchoingConnection(IPv4Address("UDP", "10.0.0.1", 40000), IPv4Address("UDP", "198.51.100.2", 50000))
        d, out, peer = self.run_main(conn, "--count", "0", "--json")
        self.assertEqual(self.successResultOf(d), connect.EXIT_OK)
        event = json.loads(out.splitlines()[0])
        self.assertEqual((event["registered_ms"], event["punched_ms"]), (0, None))

    def test_pinned_fingerprint_is_passed_and_needs_no_record(self) -> None:
        conn = EchoingConnection(IPv4Address("UDP", "10.0.0.1", 40000), IPv4Address("UDP", "198.51.100.2", 50000))
        d, out, peer = self.run_main(conn, "--count", "0", "--peer-fingerprint", str(BOB.fingerprint).upper())
        self.assertEqual(self.successResultOf(d), connect.EXIT_OK)
        self.assertEqual(peer.pins, [BOB.fingerprint])
        self.assertIsNone(self.made[0]["known_peers"])

    def test_changed_identity_fails_with_its_reason(self) -> None:
        """A peer whose key changed: exit 1 and a failed event that names the mismatch and how to accept it."""
        known = Fingerprint.parse(str(ALICE.fingerprint))
        mismatch = FingerprintMismatch("bob", known, BOB.fingerprint, "/home/u/.config/natbypass/known_peers", 3)
        outcome = Outcome([AttemptRecord("udp", "failed", 0.0, 120.0, f"udp: {mismatch}")])
        d, out, peer = self.run_main(AllAttemptsFailed(outcome), "--json")
        self.assertEqual(self.successResultOf(d), connect.EXIT_FAILED)
        event = json.loads(out.splitlines()[0])
        self.assertEqual(event["event"], "failed")
        self.assertIn("Someone may be impersonating 'bob'", event["reason"])
        self.assertIn("delete line 3", event["reason"])

    def test_unreachable_mediator_is_reported(self) -> None:
        """
        Regression (the reliability campaign): with no mediator listening, the
        command used to wait silently; now it fails after MEDIATOR_TIMEOUT,
        saying which mediator it could not register at.
        """
        known = os.path.join(self.mktemp(), "known_peers")
        argv = ["--mediator", "tcp:127.0.0.1:23799", "--id", "a", "--peer", "b", "--known-peers", known, "--json"]
        options = connect.parse_options(argv)
        peer, out, clock = FakePeer(None, ready=defer.Deferred()), io.StringIO(), Clock()
        d = defer.ensureDeferred(connect._main(clock, options, out, make=lambda reactor, options, **kw: peer))
        self.assertNoResult(d)
        clock.advance(connect.MEDIATOR_TIMEOUT)
        self.assertEqual(self.successResultOf(d), connect.EXIT_FAILED)
        event = json.loads(out.getvalue().splitlines()[0])
        self.assertEqual(event["event"], "failed")
        self.assertIn("not registered at the mediator tcp:127.0.0.1:23799 within 10 s", event["reason"])
        self.assertEqual(peer.pins, [])  # no offer was made
        self.assertFalse(peer.running)

    def test_no_path_is_reported(self) -> None:
        d, out, peer = self.run_main(AllAttemptsFailed(Outcome()), "--json")
        self.assertEqual(self.successResultOf(d), connect.EXIT_FAILED)
        self.assertEqual(json.loads(out)["event"], "failed")
        d, out, peer = self.run_main(UnknownPeer("unknown-peer", "no peer bob"))
        self.assertEqual(self.successResultOf(d), connect.EXIT_FAILED)
        self.assertIn("could not connect to bob: unknown-peer: no peer bob", out)
        self.assertFalse(peer.running)

    def test_bug_in_connect_is_not_a_failed_connect(self) -> None:
        d, out, peer = self.run_main(TypeError("a bug"))
        self.failureResultOf(d, TypeError)
        self.assertEqual(out, "")
        self.assertFalse(peer.running)

    def test_echo_timeout_is_reported(self) -> None:
        conn = EchoingConnection(IPv4Address("UDP", "10.0.0.1", 1), IPv4Address("UDP", "10.0.0.2", 2), echo=False)
        d, _, _ = self.run_main(conn, "--count", "2")
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), connect.EXIT_FAILED)

    def test_refused_echo_stream_is_reported(self) -> None:
        """A peer without the echo service: the path was made, but exit 1 and the echo event says why."""
        conn = EchoingConnection(
            IPv4Address("UDP", "10.0.0.1", 1), IPv4Address("UDP", "10.0.0.2", 2), refuse="bob has no service 'echo'"
        )
        d, out, peer = self.run_main(conn, "--count", "2", "--json")
        self.assertEqual(self.successResultOf(d), connect.EXIT_FAILED)
        events = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([e["event"] for e in events], ["connected", "echo"])
        self.assertEqual((events[1]["sent"], events[1]["received"]), (2, 0))
        self.assertIn("bob has no service 'echo'", events[1]["error"])
        self.assertTrue(conn.closed)

    def test_no_echo_stream_without_count(self) -> None:
        conn = EchoingConnection(IPv4Address("UDP", "10.0.0.1", 1), IPv4Address("UDP", "10.0.0.2", 2))
        d, out, peer = self.run_main(conn, "--count", "0")
        self.assertEqual(self.successResultOf(d), connect.EXIT_OK)
        self.assertEqual(conn.services, [])

    def test_bug_in_echo_is_not_a_lost_echo(self) -> None:
        """It used to end the echo loop (C{except Exception: break}) and print 0/1 came back."""
        conn = EchoingConnection(
            IPv4Address("UDP", "10.0.0.1", 1), IPv4Address("UDP", "10.0.0.2", 2), send_error=TypeError("a bug")
        )
        d, out, peer = self.run_main(conn, "--count", "1")
        self.failureResultOf(d, TypeError)
        self.assertNotIn("echo:", out)
        self.assertFalse(peer.running)


class OptionsTests(SynchronousTestCase):
    """One definition of the shared options: same names and defaults as natbypass-peer's."""

    def test_defaults(self) -> None:
        o = connect.parse_options(["--mediator", "tcp:198.18.0.2:7000", "--id", "alice", "--peer", "bob"])
        self.assertEqual(o["stun"], ("198.18.0.2", 3478))
        self.assertEqual(
            (o["protocol"], o["timeout"], o["port-range"], o["count"], o["interval"], o["json"], o["no-discovery"]),
            ("auto", 5.0, None, 3, 0.0, False, False),
        )

    def test_same_as_the_plugin(self) -> None:
        argv = [
            "--mediator",
            "tls:m.example:7443",
            "--id",
            "bob",
            "--stun",
            "[::1]:4000",
            "--protocol",
            "tcp,udp",
            "--port-range",
            "40000-40010",
            "--timeout",
            "7",
            "--token",
            "t",
            "--ca",
            "ca.pem",
            "--no-discovery",
        ]
        tap = peer_tap.Options()
        tap.parseOptions(argv)
        ours = connect.parse_options(argv + ["--peer", "alice"])
        for spec in PEER_OPTIONS:
            self.assertEqual(ours[spec.name], tap[spec.name], spec.name)
        self.assertEqual(ours["port-range"], PortRange(40000, 40010))

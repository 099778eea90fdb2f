"""
natbypass forward between two real peers on loopback (a real mediator, real
UDP/QUIC and TCP/TLS paths, real TCP sockets at both ends): sha256-checked
transfers, many concurrent forwarded connections, half-close, refusal of
what is not exposed; for -R, data both ways through the peer's listener,
refusal where the peer did not allow it, and the listener's end with the
control stream (or the connection).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from natbypass.app import forward
from natbypass.app.forward import (
    Events,
    Forwarder,
    RemoteForwardFailed,
    back_service,
    parse_allow_listen,
    parse_expose,
    parse_forward,
    parse_remote,
    serve_exposed,
)
from natbypass.app.remote_forward import RemoteForward, serve_back, serve_remote_listen
from natbypass.peer import Peer, PeerConfig
from natbypass.streams import StreamRefused
from natbypass.testing.loopback import LoopbackMediator
from natbypass.testing.streams import Collect
from natbypass.testing.streams import Echo as EchoTarget


@implementer(IHalfCloseableProtocol)
class Digest(Protocol):
    """The target: hashes what arrives, answers the digest when the client half-closes."""

    def connectionMade(self) -> None:
        self.hash = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)

    def readConnectionLost(self) -> None:
        self.transport.write(self.hash.hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """Sends a payload, half-closes, keeps the answer."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.answer = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.answer += data

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # both halves done: Twisted leaves closing to us

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.answer)


class ForwardLoopbackMixin:
    protocol = "udp"

    @defer.inlineCallbacks
    def forwarding(self: Any, spec: str, expose: str | None = None) -> Any:
        target = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Digest))
        self.addCleanup(target.stopListening)
        port = target.getHost().port
        bob = yield self.peer("bob", self.protocol)
        serve_exposed(bob, [parse_expose(expose or f"digest=127.0.0.1:{port}")], reactor)
        alice = yield self.peer("alice", self.protocol)
        out = io.StringIO()
        factory = Forwarder(alice, "bob", parse_forward(spec.format(port=port)), Events(out, True), reactor)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        return listening.getHost().port, factory, out, port

    def send(self: Any, port: int, payload: bytes) -> defer.Deferred:
        client = Client(payload)
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        return client.done

    @defer.inlineCallbacks
    def test_concurrent_forwards_intact(self: Any) -> Any:
        """Twenty connections at once through one -L, 500 kB each, each digest matches; events say so."""
        local, factory, out, _ = yield self.forwarding("0:digest")
        payloads = [os.urandom(500_000) for _ in range(20)]
        answers = yield defer.gatherResults([self.send(local, p) for p in payloads]).addTimeout(60, reactor)
        self.assertEqual(answers, [hashlib.sha256(p).hexdigest().encode() for p in payloads])
        yield waitFor(lambda: not factory.active)
        events = [json.loads(line) for line in out.getvalue().splitlines()]
        closed = [e for e in events if e["event"] == "closed"]
        self.assertEqual(len(closed), 20)
        self.assertEqual(sorted(e["bytes_sent"] for e in closed), [500_000] * 20)
        self.assertEqual({e["bytes_received"] for e in closed}, {64})
        self.assertEqual({e["path"] for e in events if e["event"] == "opened"}, {self.protocol})
        self.assertEqual(factory.errors, 0)

    @defer.inlineCallbacks
    def test_by_address_and_refusal(self: Any) -> Any:
        """HOST:PORT reaches an exposed target; anything else is refused with a clear error, others unaffected."""
        local, factory, out, port = yield self.forwarding("0:127.0.0.1:{port}")
        answer = yield self.send(local, b"x" * 1000).addTimeout(20, reactor)
        self.assertEqual(answer, hashlib.sha256(b"x" * 1000).hexdigest().encode())
        bad = Forwarder(factory.peer, "bob", parse_forward("0:127.0.0.1:22"), factory.events, reactor)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(bad)
        self.addCleanup(listening.stopListening)
        refused, fine = yield defer.gatherResults(
            [self.send(listening.getHost().port, b"nope"), self.send(local, b"fine")]
        ).addTimeout(20, reactor)
        self.assertEqual(refused, b"")
        self.assertEqual(fine, hashlib.sha256(b"fine").hexdigest().encode())
        errors = [json.loads(line) for line in out.getvalue().splitlines() if '"error"' in line]
        self.assertEqual(len(errors), 1)
        self.assertIn("bob refused 127.0.0.1:22: bob has no service 'forward:127.0.0.1:22'", errors[0]["reason"])

    @defer.inlineCallbacks
    def test_dead_target_resets_only_its_stream(self: Any) -> Any:
        """An exposed target that refuses TCP: that forward ends (no answer), the connection stays usable."""
        dead = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        dead_port = dead.getHost().port
        yield dead.stopListening()
        local, factory, out, _ = yield self.forwarding("0:dead", expose=f"dead=127.0.0.1:{dead_port}")
        answer = yield self.send(local, b"anyone?").addTimeout(20, reactor)
        self.assertEqual(answer, b"")
        yield waitFor(lambda: not factory.active)
        closed = [json.loads(line) for line in out.getvalue().splitlines() if '"closed"' in line]
        self.assertIn("reason", closed[0])


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def waitFor(condition: Any, timeout: float = 10.0, out: Any = None) -> Any:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        yield deferLater(0.02)
    raise AssertionError("timed out waiting for a condition" + (f"; events:\n{out.getvalue()}" if out else ""))


class RemoteForwardMixin:
    """-R: alice asks bob to listen; what bob accepts comes back to an echo server on alice's side."""

    protocol = "udp"
    send = ForwardLoopbackMixin.send

    @defer.inlineCallbacks
    def remote(self: Any, allow: str | None = "0", spec: str = "0:127.0.0.1:{port}") -> Any:
        target = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(EchoTarget))
        self.addCleanup(target.stopListening)
        bob = yield self.peer("bob", self.protocol)
        bob.serve("echo", Factory.forProtocol(EchoTarget))  # as natbypass-peer does: it takes connections
        if allow is not None:
            self.addCleanup(lambda: [p.stopListening() for p in bob_ports])
            bob_ports = serve_remote_listen(bob, [parse_allow_listen(allow)], reactor)
        alice = yield self.peer("alice", self.protocol)
        out = io.StringIO()
        events = Events(out, True)
        remote = RemoteForward(alice, "bob", parse_remote(spec.format(port=target.getHost().port)), events, reactor)
        self.addCleanup(self.stopRemote, remote)
        serve_back(alice, [remote], reactor, events)
        return remote, out, bob, alice

    @defer.inlineCallbacks
    def stopRemote(self: Any, remote: RemoteForward) -> Any:
        """
        Stop asking, and let bob see the control stream end before the peers
        stop (a FIN and the connection's close in one burst trip a race in the
        QUIC channel, reported to the lead).
        """
        address = remote.address
        yield remote.stopListening()
        if address is not None:
            yield waitFor(lambda: self.refused(int(address.rsplit(":", 1)[1])))

    def events(self: Any, out: io.StringIO) -> list[dict]:
        return [json.loads(line) for line in out.getvalue().splitlines()]

    @defer.inlineCallbacks
    def test_data_both_ways(self: Any) -> Any:
        """Five connections at once to bob's listener, 300 kB each way, echoed intact by alice's target."""
        remote, out, bob, alice = yield self.remote()
        address = yield remote.start().addTimeout(20, reactor)
        host, port = address.rsplit(":", 1)
        self.assertEqual(host, "127.0.0.1")  # the default bind, on bob's side
        payloads = [os.urandom(300_000) for _ in range(5)]
        answers = yield defer.gatherResults([self.send(int(port), p) for p in payloads]).addTimeout(60, reactor)
        self.assertEqual(
            [hashlib.sha256(a).hexdigest() for a in answers], [hashlib.sha256(p).hexdigest() for p in payloads]
        )
        yield waitFor(lambda: len([e for e in self.events(out) if e["event"] == "closed"]) == 5, out=out)
        events = self.events(out)
        self.assertEqual(events[0]["event"], "listening")
        self.assertEqual((events[0]["remote"], events[0]["address"]), (True, address))
        opened = [e for e in events if e["event"] == "opened"]
        self.assertEqual({(e["remote"], e["from"], e["path"]) for e in opened}, {(True, "bob", self.protocol)})
        closed = [e for e in events if e["event"] == "closed"]
        self.assertEqual({(e["bytes_sent"], e["bytes_received"]) for e in closed}, {(300_000, 300_000)})

    @defer.inlineCallbacks
    def test_listener_ends_with_the_control_stream(self: Any) -> Any:
        """Closing the control stream stops bob's listener: new connections are refused by bob's kernel."""
        remote, out, bob, alice = yield self.remote()
        address = yield remote.start().addTimeout(20, reactor)
        port = int(address.rsplit(":", 1)[1])
        answer = yield self.send(port, b"before").addTimeout(20, reactor)
        self.assertEqual(answer, b"before")
        yield remote.stopListening()
        yield waitFor(lambda: self.refused(port))
        self.assertNotIn("error", [e["event"] for e in self.events(out)])  # our own stop is no error

    @defer.inlineCallbacks
    def test_listener_ends_with_the_connection(self: Any) -> Any:
        """The requesting peer going away (its connection closes) stops bob's listener too."""
        remote, out, bob, alice = yield self.remote()
        address = yield remote.start().addTimeout(20, reactor)
        port = int(address.rsplit(":", 1)[1])
        remote.stopped = True  # no asking again: this test is about bob's side
        yield alice.stopService()
        # Probe only once bob saw the connection end (a connection accepted while it closes trips the
        # QUIC channel race reported to the lead).
        yield waitFor(lambda: bob.connectionTo("alice") is None, timeout=20)
        yield waitFor(lambda: self.refused(port))

    def refused(self: Any, port: int) -> Any:
        """A Deferred-free probe: True once nothing listens on 127.0.0.1:port (a blocking connect on loopback)."""
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    @defer.inlineCallbacks
    def test_refused_where_not_allowed(self: Any) -> Any:
        """bob allows no remote listening: -R fails with a StreamRefused reason the error event spells out."""
        remote, out, bob, alice = yield self.remote(allow=None)
        failure = yield self.assertFailure(remote.start().addTimeout(20, reactor), RemoteForwardFailed)
        self.assertIn("bob refused to listen on 127.0.0.1:0", str(failure))
        (event,) = self.events(out)
        self.assertEqual(event["event"], "error")
        self.assertIn("bob has no service 'forward-listen:127.0.0.1:0'", event["reason"])
        self.assertIn("--allow-remote-listen", event["reason"])

    @defer.inlineCallbacks
    def test_refused_elsewhere_than_allowed(self: Any) -> Any:
        """bob allows one port; -R asks for another address: refused, nothing listens."""
        remote, out, bob, alice = yield self.remote(allow="0", spec="0.0.0.0:0:127.0.0.1:{port}")
        yield self.assertFailure(remote.start().addTimeout(20, reactor), RemoteForwardFailed)
        self.assertIn("no service 'forward-listen:0.0.0.0:0'", self.events(out)[0]["reason"])

    @defer.inlineCallbacks
    def test_back_service_only_for_the_listening_peer(self: Any) -> Any:
        """carol, another peer, cannot use alice's forward-back service to reach alice's target."""
        remote, out, bob, alice = yield self.remote()
        yield remote.start().addTimeout(20, reactor)
        carol = yield self.peer("carol", self.protocol)
        d = carol.openStream("alice", back_service(remote.spec.target), Factory.forProtocol(Collect), self.protocol)
        failure = yield self.assertFailure(d.addTimeout(20, reactor), StreamRefused)
        self.assertIn("takes streams only from the peer listening", failure.reason)

    @defer.inlineCallbacks
    def test_command_exits_1_when_refused(self: Any) -> Any:
        """natbypass forward -R against a peer that does not allow it: an error event, exit status 1."""
        bob = yield self.peer("bob", self.protocol)
        bob.serve("echo", Factory.forProtocol(EchoTarget))  # as natbypass-peer does; no --allow-remote-listen
        options = {
            "json": True,
            "known-peers": None,
            "mediator": f"tcp:127.0.0.1:{self.signal_port}",
            "peer": "bob",
            "peer-fingerprint": None,
            "protocol": self.protocol,
            "local": [],
            "remote": [parse_remote("0:127.0.0.1:9")],
        }

        def make(_: Any, options: Any, **kwargs: Any) -> Peer:
            alice = Peer(
                reactor,
                "alice",
                TCP4ClientEndpoint(reactor, "127.0.0.1", self.signal_port),
                self.stun_address,
                protocol=self.protocol,
                config=PeerConfig(loopback_candidates=True, bind_host="127.0.0.1", punch_timeout=3.0),
            )
            self.addCleanup(lambda: alice.stopService() if alice.running else None)
            return alice

        out = io.StringIO()
        code = yield defer.ensureDeferred(forward._main(NoShutdownTriggers(), options, out, make=make))
        self.assertEqual(code, forward.EXIT_FAILED)
        (event,) = self.events(out)
        self.assertEqual(event["event"], "error")
        self.assertIn("refused to listen", event["reason"])


class NoShutdownTriggers:
    """The global reactor, except that _main's shutdown trigger is not left behind after the test."""

    def addSystemEventTrigger(self, *args: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class UDPRemoteForwardTests(RemoteForwardMixin, LoopbackMediator):
    protocol = "udp"


class TCPRemoteForwardTests(RemoteForwardMixin, LoopbackMediator):
    protocol = "tcp"


class UDPForwardTests(ForwardLoopbackMixin, LoopbackMediator):
    protocol = "udp"


class TCPForwardTests(ForwardLoopbackMixin, LoopbackMediator):
    protocol = "tcp"

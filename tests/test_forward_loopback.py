"""
natbypass forward between two real peers on loopback (a real mediator, real
UDP/QUIC and TCP/TLS paths, real TCP sockets at both ends): sha256-checked
transfers, many concurrent forwarded connections, half-close, refusal of
what is not exposed.
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

from natbypass.app.forward import Events, Forwarder, parse_expose, parse_forward, serve_exposed
from natbypass.testing.loopback import LoopbackMediator


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
def waitFor(condition: Any, timeout: float = 10.0) -> Any:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        yield deferLater(0.02)
    raise AssertionError("timed out waiting for a condition")


class UDPForwardTests(ForwardLoopbackMixin, LoopbackMediator):
    protocol = "udp"


class TCPForwardTests(ForwardLoopbackMixin, LoopbackMediator):
    protocol = "tcp"

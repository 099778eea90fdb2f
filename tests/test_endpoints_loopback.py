"""
natbypass: endpoint strings between two real peers on loopback (a real
mediator, real UDP and TCP paths, QUIC and TLS), proven with Twisted's own
protocols: a twisted.web Site fetched by Agent, AMP with boxes over 64 kB,
and a refused service failing the endpoint's connect.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from natbypass import endpoints
from natbypass.endpoints import client_string, server_string
from natbypass.streams import PeerAddress, StreamRefused
from natbypass.testing.loopback import LoopbackMediator
from natbypass.testing.streams import Collect

BODY = os.urandom(1_500_000)


class Blob(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        peer = request.transport.getPeer()
        request.setHeader(b"x-peer", f"{peer.peer_id} {peer.service} {peer.path}".encode())
        return BODY


class Digest(amp.Command):
    arguments = [(b"first", amp.String()), (b"second", amp.String())]
    response = [(b"sha256", amp.String()), (b"peer", amp.Unicode())]


class Digester(amp.AMP):
    @Digest.responder
    def digest(self, first: bytes, second: bytes) -> dict[str, Any]:
        peer = self.transport.getPeer()
        return {"sha256": hashlib.sha256(first + second).digest(), "peer": peer.peer_id}


@implementer(IAgentEndpointFactory)
class PeerEndpoints:
    """Agent's endpoint factory: http://PEER/ is the web service of the peer PEER."""

    def __init__(self, options: dict[str, str]) -> None:
        self.options = options

    def endpointForURI(self, uri: Any) -> Any:
        return clientFromString(reactor, client_string(uri.host.decode(), "web", **self.options))


class EndpointsLoopbackMixin:
    protocol = "udp"

    def setUp(self: Any) -> Any:
        d = super().setUp()
        self.addCleanup(endpoints.registry.stopAll, reactor)
        return d

    def options(self: Any, name: str) -> dict[str, str]:
        """The peer settings of a string for peer C{name}, against the test's mediator, on loopback only."""
        host, port = self.stun_address
        return {
            "mediator": f"tcp:127.0.0.1:{self.signal_port}",
            "stun": f"{host}:{port}",
            "id": name,
            "identity": os.path.join(self.work, f"{name}.pem"),
            "known_peers": os.path.join(self.work, f"{name}.known"),
            "bind": "127.0.0.1",
            "timeout": "3",
            "protocol": self.protocol,
        }

    @property
    def work(self: Any) -> str:
        if not hasattr(self, "_work"):
            self._work = self.mktemp()
            os.makedirs(self._work)
        return self._work

    def serve(self: Any, service: str, factory: Any) -> defer.Deferred[Any]:
        endpoint = serverFromString(reactor, server_string(service, allow_any="yes", **self.options("bob")))
        d = endpoint.listen(factory)
        # Stopping the peer does not stop its services' factories (a Site's timer): stop the port.
        return d.addCallback(lambda port: (self.addCleanup(port.stopListening), port)[1])

    @defer.inlineCallbacks
    def test_web_site_through_agent(self: Any) -> Any:
        """A twisted.web Site served through serverFromString, fetched by Agent through clientFromString."""
        port = yield self.serve("web", Site(Blob())).addTimeout(20, reactor)
        self.assertEqual(port.getHost().service, "web")
        agent = Agent.usingEndpointFactory(reactor, PeerEndpoints(self.options("alice")))
        for _ in range(2):
            response = yield agent.request(b"GET", b"http://bob/blob").addTimeout(20, reactor)
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"x-peer"), [f"alice web {self.protocol}".encode()])
            body = yield readBody(response).addTimeout(20, reactor)
            self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(BODY).digest())
        (alice,) = [s.peer for s in endpoints.registry.peers(reactor) if s.peer.peer_id == "alice"]
        connection = alice.connectionTo("bob")
        self.assertEqual(connection.protocol, self.protocol)

    @defer.inlineCallbacks
    def test_amp_boxes_over_64k(self: Any) -> Any:
        """AMP over a stream: 12 calls, each box two 60 kB values (120 kB), answered with their digests."""
        yield self.serve("amp", Factory.forProtocol(Digester)).addTimeout(20, reactor)
        endpoint = clientFromString(reactor, client_string("bob", "amp", **self.options("alice")))
        client = yield endpoint.connect(Factory.forProtocol(amp.AMP)).addTimeout(20, reactor)
        self.assertIsInstance(client.transport.getPeer(), PeerAddress)
        values = [(os.urandom(60_000), os.urandom(60_000)) for _ in range(12)]
        answers = yield defer.gatherResults(
            [client.callRemote(Digest, first=a, second=b) for a, b in values]
        ).addTimeout(30, reactor)
        for (a, b), answer in zip(values, answers):
            self.assertEqual(answer["sha256"], hashlib.sha256(a + b).digest())
            self.assertEqual(answer["peer"], "alice")
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_refused_service(self: Any) -> Any:
        """A service bob does not serve fails the endpoint's connect with StreamRefused, saying so."""
        yield self.serve("web", Site(Blob())).addTimeout(20, reactor)
        endpoint = clientFromString(reactor, client_string("bob", "nothing", **self.options("alice")))
        failure = yield self.assertFailure(endpoint.connect(Factory.forProtocol(Collect)).addTimeout(20, reactor),
                                           StreamRefused)  # fmt: skip
        self.assertIn("no service 'nothing'", str(failure))

    @defer.inlineCallbacks
    def test_pinned_key(self: Any) -> Any:
        """A fingerprint= pin that is not bob's key fails the connect; bob's own key connects."""
        port = yield self.serve("echo", Factory.forProtocol(Collect)).addTimeout(20, reactor)
        from natbypass.identity import Identity

        wrong = client_string("bob", "echo", fingerprint=str(Identity.generate().fingerprint), **self.options("alice"))
        yield self.assertFailure(
            clientFromString(reactor, wrong).connect(Factory.forProtocol(Collect)).addTimeout(20, reactor), Exception
        )
        right = client_string("bob", "echo", fingerprint=str(port.peer.fingerprint), **self.options("alice"))
        proto = yield clientFromString(reactor, right).connect(Factory.forProtocol(Collect)).addTimeout(20, reactor)
        self.assertEqual(proto.transport.getPeer().fingerprint, port.peer.fingerprint)


class UDPEndpointsTests(EndpointsLoopbackMixin, LoopbackMediator):
    protocol = "udp"


class TCPEndpointsTests(EndpointsLoopbackMixin, LoopbackMediator):
    protocol = "tcp"

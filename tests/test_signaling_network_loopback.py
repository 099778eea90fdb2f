"""
Signalling over real loopback sockets: TLS with a throwaway CA (right CA,
wrong CA, wrong hostname) and a mediator restart that the peers survive.
"""

from __future__ import annotations

import os

from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from natbypass.signaling.client import SignalingClient, client_endpoint
from natbypass.signaling.service import makeSignalingService
from natbypass.signaling.wire import Candidate, Description, Session
from natbypass.testing.tls import Greeted, make_ca, make_server_cert, pem_cert, pem_key

DESC = Description((Candidate("host", "127.0.0.1", 40000),))


class TLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        ca, ca_key = make_ca("NATbypass test CA")
        cert, key = make_server_cert(ca, ca_key, "localhost")
        other_ca, _ = make_ca("Somebody else's CA")
        self.ca_pem = os.path.join(d, "ca.pem")
        self.other_ca_pem = os.path.join(d, "other-ca.pem")
        self.key_pem = os.path.join(d, "key.pem")
        self.cert_pem = os.path.join(d, "cert.pem")
        for path, data in [
            (self.ca_pem, pem_cert(ca)),
            (self.other_ca_pem, pem_cert(other_ca)),
            (self.key_pem, pem_key(key)),
            (self.cert_pem, pem_cert(cert)),
        ]:
            with open(path, "wb") as f:
                f.write(data)

    @inlineCallbacks
    def start_mediator(self):
        svc = makeSignalingService(
            f"ssl:0:interface=127.0.0.1:privateKey={self.key_pem}:certKey={self.cert_pem}", reactor, status_interval=0
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        port = yield svc.whenListening()
        return svc, port.getHost().port

    @inlineCallbacks
    def probe(self, description: str, ca: str) -> Deferred:
        proto = yield client_endpoint(reactor, description, ca=ca).connect(Factory.forProtocol(Greeted))
        reason = yield proto.lost
        return proto.data, reason

    @inlineCallbacks
    def test_peers_meet_over_tls(self) -> None:
        svc, port = yield self.start_mediator()
        clients = []
        for name in ("alice", "bob"):
            c = SignalingClient(client_endpoint(reactor, f"tls:localhost:{port}", ca=self.ca_pem), name, clock=reactor)
            c.startService()
            self.addCleanup(c.stopService)
            clients.append(c)
        yield clients[0].whenRegistered()
        yield clients[1].whenRegistered()
        clients[1].setOfferHandler(lambda offer: DESC)
        session = yield clients[0].connect("bob", DESC)
        self.assertIsInstance(session, Session)
        self.assertEqual(session.peer, "bob")
        self.assertEqual(svc.state.status()["counters"]["sessions"], 1)

    @inlineCallbacks
    def test_right_ca(self) -> None:
        _, port = yield self.start_mediator()
        data, _ = yield self.probe(f"tls:localhost:{port}", self.ca_pem)
        self.assertIn(b'"proto":"natbypass-signal"', data)

    @inlineCallbacks
    def test_wrong_ca_refused(self) -> None:
        _, port = yield self.start_mediator()
        data, reason = yield self.probe(f"tls:localhost:{port}", self.other_ca_pem)
        self.assertEqual(data, b"")
        self.assertIn("certificate verify failed", str(reason))

    @inlineCallbacks
    def test_wrong_hostname_refused(self) -> None:
        """The certificate names localhost; 127.0.0.1 does not match it."""
        _, port = yield self.start_mediator()
        data, reason = yield self.probe(f"tls:127.0.0.1:{port}", self.ca_pem)
        self.assertEqual(data, b"")
        self.assertIsInstance(reason, VerificationError)
        self.assertIn("IPAddressMismatch", str(reason))


class RestartTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def wait_for(self, predicate, what: str, seconds: float = 10.0):
        for _ in range(int(seconds / 0.05)):
            if predicate():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def test_peers_come_back(self) -> None:
        svc = makeSignalingService("tcp:0:interface=127.0.0.1", reactor, status_interval=0)
        svc.startService()
        port = (yield svc.whenListening()).getHost().port
        clients = []
        for name in ("alice", "bob"):
            c = SignalingClient(
                client_endpoint(reactor, f"tcp:127.0.0.1:{port}"), name, clock=reactor, retry_policy=lambda attempt: 0.1
            )
            c.startService()
            self.addCleanup(c.stopService)
            clients.append(c)
        yield clients[0].whenRegistered()
        yield clients[1].whenRegistered()
        self.assertEqual(svc.state.status()["peers"], 2)

        yield svc.stopService()  # the mediator goes down: listener and connections
        yield self.wait_for(lambda: all(c._proto is None for c in clients), "the clients to notice")
        svc2 = makeSignalingService(f"tcp:{port}:interface=127.0.0.1", reactor, status_interval=0)
        svc2.startService()
        self.addCleanup(svc2.stopService)
        yield svc2.whenListening()
        yield self.wait_for(lambda: svc2.state.status()["peers"] == 2, "both peers to re-register")
        yield clients[0].whenRegistered()
        clients[1].setOfferHandler(lambda offer: DESC)
        session = yield clients[0].connect("bob", DESC)
        self.assertEqual(session.peer, "bob")

"""
End-to-end tests of the Peer service on loopback: a real mediator (STUN on
127.0.0.1 + 127.0.0.2, signalling on 127.0.0.1) and two real peers in this
process.  No NAT here (the NAT lab tests do that); these prove the
composition: registration, offer/answer, punching over UDP and TCP, echo,
fallback, and that a path survives the mediator going away.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass.app.echo import EchoHandler
from natbypass.identity import Fingerprint, Identity
from natbypass.interfaces import IIncomingHandler, IPeer, IPeerApprover, IPeerConnection
from natbypass.nat import NatSummary
from natbypass.peer import Peer
from natbypass.punch.race import AllAttemptsFailed
from natbypass.signaling.client import OfferRejected, SignalingClient
from natbypass.signaling.wire import Candidate, Description
from natbypass.testing.loopback import LoopbackMediator
from natbypass.trust import KnownPeers, parse_allow


class PeerLoopbackTests(LoopbackMediator):
    @defer.inlineCallbacks
    def pair(self, protocol: str) -> Any:
        b = yield self.peer("bob")
        b.listen(EchoHandler())
        a = yield self.peer("alice", protocol)
        conn = yield a.connect("bob")
        self.addCleanup(conn.close)
        return a, b, conn

    def test_interfaces(self) -> None:
        p = Peer(reactor, "x", TCP4ClientEndpoint(reactor, "127.0.0.1", 1), ("127.0.0.1", 3478))
        self.assertTrue(verifyObject(IPeer, p))

    @defer.inlineCallbacks
    def test_learns_mappings(self) -> Any:
        a = yield self.peer("alice")
        self.assertEqual(a.udp_mapped, a.local_udp_address())
        self.assertEqual(a.tcp_mapped, a.local_tcp_address())
        yield a.whenDiscovered()
        self.assertEqual(a.nat.mapping, "none")

    @defer.inlineCallbacks
    def test_udp(self) -> Any:
        a, b, conn = yield self.pair("udp")
        self.assertTrue(verifyObject(IPeerConnection, conn))
        self.assertEqual((conn.protocol, conn.peer_id), ("udp", "bob"))
        self.assertEqual(conn.remote_address.port, b.local_udp_address()[1])
        yield self.assertEchoes(conn)

    @defer.inlineCallbacks
    def test_tcp(self) -> Any:
        a, b, conn = yield self.pair("tcp")
        self.assertEqual(conn.protocol, "tcp")
        self.assertEqual(conn.remote_address.port, b.local_tcp_address()[1])
        yield self.assertEchoes(conn)

    @defer.inlineCallbacks
    def test_auto_prefers_udp_and_records_attempts(self) -> Any:
        a, b, conn = yield self.pair("auto")
        self.assertEqual(conn.protocol, "udp")
        self.assertEqual(conn.outcome.winner, "udp")
        self.assertEqual(conn.outcome.attempts[0].result, "connected")
        yield self.assertEchoes(conn)

    @defer.inlineCallbacks
    def test_predictable_symmetric_nat_punches_from_a_fresh_socket(self) -> Any:
        """
        Behind a NAT that hands out ports in sequence, each session gets a
        fresh socket whose mapping is learned just before the offer; it is
        closed when the path closes.
        """
        b = yield self.peer("bob")
        b.listen(EchoHandler())
        a = yield self.peer("alice", "udp", discover=False)  # discovery would find "no NAT"
        a.nat = NatSummary("address-and-port-dependent", "address-and-port-dependent", False, port_delta=1)
        conn = yield a.connect("bob")
        self.assertNotEqual(conn.local_address.port, a.local_udp_address()[1])
        yield self.assertEchoes(conn)
        conn.close()
        conn2 = yield a.connect("bob")
        self.addCleanup(conn2.close)
        self.assertNotEqual(conn2.local_address.port, a.local_udp_address()[1])  # the first one's may be reused
        yield self.assertEchoes(conn2)

    @defer.inlineCallbacks
    def test_survives_mediator_going_away(self) -> Any:
        a, b, conn = yield self.pair("udp")
        yield self.signal.stopService()
        yield self.stun.stopService()
        yield self.assertEchoes(conn, 5)

    @defer.inlineCallbacks
    def test_unknown_peer_fails_clearly(self) -> Any:
        a = yield self.peer("alice")
        with self.assertRaises(Exception) as caught:
            yield a.connect("nobody")
        self.assertIn("nobody", str(caught.exception))

    @defer.inlineCallbacks
    def test_peer_without_listener_rejects(self) -> Any:
        yield self.peer("bob")
        a = yield self.peer("alice")
        with self.assertRaises(Exception) as caught:
            yield a.connect("bob")
        self.assertIn("accepts no connections", str(caught.exception))

    @defer.inlineCallbacks
    def test_failure_names_every_attempt(self) -> Any:
        """
        Bob advertises a UDP port that never answers and a TCP port nobody
        listens on: both protocols fail, each with its reason.
        """
        silent_udp = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(silent_udp.stopListening)
        closed_tcp = socket.socket()
        closed_tcp.bind(("127.0.0.1", 0))
        self.addCleanup(closed_tcp.close)

        # Bob is only a signalling client: it accepts with those candidates and never punches.
        bob = SignalingClient(TCP4ClientEndpoint(reactor, "127.0.0.1", self.signal_port), "bob", clock=reactor)
        bob.setOfferHandler(
            lambda offer: Description(
                (
                    Candidate("host", "127.0.0.1", silent_udp.getHost().port),
                    Candidate("tcp-host", "127.0.0.1", closed_tcp.getsockname()[1]),
                )
            )
        )
        bob.startService()
        self.addCleanup(bob.stopService)
        yield bob.whenRegistered()
        a = yield self.peer("alice", punch_timeout=0.5)
        with self.assertRaises(AllAttemptsFailed) as caught:
            yield a.connect("bob")
        attempts = caught.exception.outcome.attempts
        self.assertEqual([r.protocol for r in attempts], ["udp", "tcp"])
        for r in attempts:
            self.assertEqual(r.result, "failed")
            self.assertTrue(r.reason)


@implementer(IIncomingHandler, IPeerApprover)
class Gatekeeper(EchoHandler):
    """An echoing handler that asks the application (a Deferred it answers later) who may connect."""

    def __init__(self, answer: bool) -> None:
        super().__init__()
        self.answer = answer
        self.asked: list[tuple[str, Fingerprint]] = []

    def approvePeer(self, peer_id: str, fingerprint: Fingerprint) -> defer.Deferred:
        self.asked.append((peer_id, fingerprint))
        return task.deferLater(reactor, 0.01, lambda: self.answer)


class PeerSecurityLoopbackTests(LoopbackMediator):
    """Identities end to end: approval, pins and trust on first use, on both protocols."""

    #: Released at once, so a test can bring back an id with another key (as an operator could).
    id_hold = 0.0

    @defer.inlineCallbacks
    def test_every_path_is_secure_and_pinned_to_the_registered_key(self) -> Any:
        bob = yield self.peer("bob")
        bob.listen(EchoHandler())
        alice = yield self.peer("alice")
        for protocol in ("udp", "tcp"):
            conn = yield alice.connect("bob", protocol, fingerprint=bob.fingerprint)
            self.addCleanup(conn.close)
            self.assertEqual((conn.protocol, conn.secure, conn.peer_fingerprint), (protocol, True, bob.fingerprint))
            self.assertTrue(conn.cipher.startswith("QUICv1" if protocol == "udp" else "TLSv1.3"), conn.cipher)
            self.assertGreater(conn.handshake_ms, 0)
            yield self.assertEchoes(conn, 1)

    @defer.inlineCallbacks
    def test_wrong_pin_fails_naming_both_keys(self) -> Any:
        bob = yield self.peer("bob")
        bob.listen(EchoHandler())
        alice = yield self.peer("alice", punch_timeout=2.0)
        wrong = Identity.generate().fingerprint
        for protocol in ("udp", "tcp"):
            failure = yield self.assertFailure(alice.connect("bob", protocol, fingerprint=wrong), AllAttemptsFailed)
            self.assertIn(str(wrong), str(failure), protocol)
            self.assertIn(str(bob.fingerprint), str(failure), protocol)
            # bob is told at once (the refusal closes the handshake), not after its punch or handshake
            # timeout: well within 1.5 s even on a loaded machine (polled, so a quick end is not waited for)
            for _ in range(30):
                if bob.traversals == 0:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(bob.traversals, 0, protocol)

    @defer.inlineCallbacks
    def test_approval_is_asked_and_a_refusal_reaches_the_caller(self) -> Any:
        for answer in (True, False):
            name = f"bob-{answer}".lower()
            bob = yield self.peer(name)
            keeper = Gatekeeper(answer)
            bob.listen(keeper)
            alice = yield self.peer(f"alice-{answer}".lower())
            d = alice.connect(name, "udp")
            if answer:
                conn = yield d
                self.addCleanup(conn.close)
                yield self.assertEchoes(conn, 1)
            else:
                failure = yield self.assertFailure(d, OfferRejected)
                self.assertIn("refused", str(failure))
                self.assertIn(str(alice.fingerprint), str(failure))
            # asked once, with the offering peer's registered key, before anything was punched
            self.assertEqual(keeper.asked, [(alice.peer_id, alice.fingerprint)])

    @defer.inlineCallbacks
    def test_allow_list(self) -> Any:
        alice_key, carol_key = Identity.generate(), Identity.generate()
        allow = parse_allow(f"{alice_key.fingerprint} alice\n")
        bob = yield self.peer("bob", peer_args={"allow": allow})
        bob.listen(EchoHandler())
        alice = yield self.peer("alice", peer_args={"identity": alice_key})
        conn = yield alice.connect("bob", "tcp")
        self.addCleanup(conn.close)
        carol = yield self.peer("carol", peer_args={"identity": carol_key})
        failure = yield self.assertFailure(carol.connect("bob", "tcp"), OfferRejected)
        self.assertIn("not in bob's allow list", str(failure))

    @defer.inlineCallbacks
    def test_trust_on_first_use(self) -> Any:
        """First contact records bob's key; a bob with another key later is refused, saying how to accept it."""
        path = os.path.join(self.mktemp(), "known_peers")
        os.makedirs(os.path.dirname(path))
        bob = yield self.peer("bob")
        bob.listen(EchoHandler())
        alice = yield self.peer("alice", peer_args={"known_peers": KnownPeers(path)})
        conn = yield alice.connect("bob", "udp")
        conn.close()
        with open(path) as f:
            self.assertIn(f"bob {bob.fingerprint}", f.read())
        # the same key again: fine
        conn = yield alice.connect("bob", "udp")
        conn.close()
        # bob comes back with another key (its old binding released by the mediator's operator: --id-hold 0 here)
        yield bob.stopService()
        yield self._wait_unregistered("bob")
        impostor = yield self.peer("bob")
        impostor.listen(EchoHandler())
        failure = yield self.assertFailure(alice.connect("bob", "udp"), AllAttemptsFailed)
        self.assertIn("Someone may be impersonating 'bob'", str(failure))
        self.assertIn(str(impostor.fingerprint), str(failure))

    @defer.inlineCallbacks
    def _wait_unregistered(self, peer_id: str) -> Any:
        for _ in range(100):
            if peer_id not in self.signal.state.peers:
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{peer_id} still registered")

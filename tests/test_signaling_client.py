"""
Tests of the peer's signalling client against the real mediator state, in
memory (iosim pumps and a Clock): handshake, offers both ways, errors,
cancellation, keepalive and reconnection with re-registration.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.nat import NatSummary
from natbypass.signaling.client import (
    Decline,
    DuplicateId,
    IncomingOffer,
    OfferRejected,
    OfferTimeout,
    SignalingClient,
    Unauthorized,
    UnknownPeer,
    client_endpoint,
)
from natbypass.signaling.interfaces import ISignalingClient
from natbypass.signaling.server import Limits, SignalingFactory, SignalingState, TokenPolicy
from natbypass.signaling.wire import Candidate, Description, Session
from natbypass.testing.signaling import MemoryNetwork

DESC_A = Description(
    (Candidate("srflx", "203.0.113.1", 5000),), NatSummary("endpoint-independent", "endpoint-independent", True)
)
DESC_B = Description((Candidate("tcp-srflx", "198.51.100.2", 6000),), wish=("tcp",))


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.state = SignalingState(self.clock, Limits(offer_timeout=10.0, keepalive=30.0, idle_timeout=90.0))
        self.net = MemoryNetwork(SignalingFactory(self.state), self.clock)
        self.clients: list[SignalingClient] = []
        self.addCleanup(self.stop_all)

    def stop_all(self) -> None:
        for c in self.clients:
            if c.running:
                c.stopService()
        self.net.flush()

    def client(self, name: str, source: str = "192.0.2.1", **kw) -> SignalingClient:
        kw.setdefault("retry_policy", lambda attempt: 1.0)
        c = SignalingClient(self.net.endpoint(source), name, clock=self.clock, **kw)
        c.startService()
        self.clients.append(c)
        self.net.flush()
        return c

    def settle(self, d: Deferred) -> list:
        out: list = []
        d.addBoth(out.append)
        self.net.flush()
        return out

    def test_interface(self) -> None:
        verifyObject(ISignalingClient, self.client("alice"))

    def test_registers(self) -> None:
        c = self.client("alice")
        self.assertEqual(self.settle(c.whenRegistered()), ["alice"])
        self.assertEqual(self.state.status()["peers"], 1)
        self.assertRegex(c.secret, "^[0-9a-f]{32}$")

    def test_bad_peer_id(self) -> None:
        self.assertRaises(ValueError, SignalingClient, self.net.endpoint(), "no spaces", clock=self.clock)

    def test_offer_accepted(self) -> None:
        a, b = self.client("alice"), self.client("bob")
        offers: list[IncomingOffer] = []
        sessions: list[Session] = []

        def handler(offer: IncomingOffer) -> Description:
            offers.append(offer)
            return DESC_B

        b.setOfferHandler(handler)
        b.setSessionHandler(sessions.append)
        [sa] = self.settle(a.connect("bob", DESC_A))
        self.assertIsInstance(sa, Session)
        self.assertEqual((offers[0].peer, offers[0].description), ("alice", DESC_A))
        [sb] = sessions
        self.assertEqual((sa.id, sa.key), (sb.id, sb.key))
        self.assertEqual((sa.role, sb.role), ("controlling", "controlled"))
        self.assertEqual((sa.description, sb.description), (DESC_B, DESC_A))
        self.assertEqual(sa.order, ("tcp",))

    def test_offer_accepted_later(self) -> None:
        a, b = self.client("alice"), self.client("bob")
        answer: Deferred = Deferred()
        b.setOfferHandler(lambda offer: answer)
        result = self.settle(a.connect("bob", DESC_A))
        self.assertEqual(result, [])
        answer.callback(DESC_B)
        self.net.flush()
        self.assertIsInstance(result[0], Session)

    def test_declined(self) -> None:
        a, b = self.client("alice"), self.client("bob")

        def handler(offer):
            raise Decline("do not disturb")

        b.setOfferHandler(handler)
        [f] = self.settle(a.connect("bob", DESC_A))
        f.trap(OfferRejected)
        self.assertIn("do not disturb", f.value.reason)
        self.assertEqual(f.value.code, 403)

    def test_no_handler_rejects(self) -> None:
        a, _ = self.client("alice"), self.client("bob")
        [f] = self.settle(a.connect("bob", DESC_A))
        f.trap(OfferRejected)

    def test_handler_crash_rejects(self) -> None:
        a, b = self.client("alice"), self.client("bob")
        b.setOfferHandler(lambda offer: 1 / 0)
        [f] = self.settle(a.connect("bob", DESC_A))
        f.trap(OfferRejected)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unknown_peer(self) -> None:
        a = self.client("alice")
        [f] = self.settle(a.connect("nobody", DESC_A))
        f.trap(UnknownPeer)

    def test_offer_timeout_and_cancel_event(self) -> None:
        a, b = self.client("alice"), self.client("bob")
        seen: list[IncomingOffer] = []
        never: Deferred = Deferred()
        b.setOfferHandler(lambda offer: seen.append(offer) or never)
        result = self.settle(a.connect("bob", DESC_A))
        self.clock.advance(10)
        self.state.sweep()  # the mediator's periodic work expires offers
        self.net.flush()
        result[0].trap(OfferTimeout)
        cancelled = []
        seen[0].cancelled.addCallback(cancelled.append)
        self.assertEqual(cancelled, ["expired"])
        self.assertTrue(never.called)  # the handler's Deferred was cancelled
        self.flushLoggedErrors(CancelledError)

    def test_cancel_connect_reports_late_session(self) -> None:
        a, b = self.client("alice"), self.client("bob")
        answer: Deferred = Deferred()
        b.setOfferHandler(lambda offer: answer)
        d = a.connect("bob", DESC_A)
        self.net.flush()
        d.cancel()
        self.assertRaises(CancelledError, self.failureResultOf(d).raiseException)
        answer.callback(DESC_B)
        self.net.flush()
        self.assertEqual(self.state.status()["counters"].get("outcome:cancelled"), 1)

    def test_request_timeout(self) -> None:
        a = self.client("alice", request_timeout=5.0)
        self.net.up = False
        self.net.drop_all()
        d = a.ping()
        self.clock.advance(5)
        self.failureResultOf(d, TimeoutError)

    def test_ping_measures_rtt(self) -> None:
        a = self.client("alice")
        d = a.ping()
        self.clock.advance(0.25)  # the pong waits in the pump meanwhile
        self.net.flush()
        self.assertEqual(self.successResultOf(d), 0.25)
        self.assertEqual(a.rtt, 0.25)

    def test_report(self) -> None:
        a, b = self.client("alice"), self.client("bob")
        b.setOfferHandler(lambda offer: DESC_B)
        [s] = self.settle(a.connect("bob", DESC_A))
        self.assertEqual(self.settle(a.report(s.id, "connected", "udp")), [None])
        self.assertEqual(self.state.status()["counters"]["outcome:connected/udp"], 1)
        self.assertRaises(ValueError, a.report, s.id, "connected")

    def test_answers_keepalive(self) -> None:
        self.client("alice")
        for _ in range(10):
            self.clock.advance(30)
            self.state.sweep()
            self.net.flush()
        self.assertEqual(self.state.status()["peers"], 1)
        self.assertEqual(self.state.status()["counters"]["connections"], 1)

    def test_silent_mediator_triggers_reconnect(self) -> None:
        self.client("alice")
        self.clock.advance(91)  # no pings from the mediator: the client gives up on the link
        self.net.flush()
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual(self.state.status()["counters"]["connections"], 2)
        self.assertEqual(self.state.status()["peers"], 1)

    def test_reregisters_after_restart(self) -> None:
        """The mediator goes away and comes back empty; the peers register again."""
        a, b = self.client("alice"), self.client("bob")
        self.net.up = False
        self.net.drop_all()
        self.state = SignalingState(self.clock)
        self.net.server_factory = SignalingFactory(self.state)
        self.clock.advance(1)  # refused
        self.net.flush()
        self.assertEqual(self.state.status()["peers"], 0)
        self.net.up = True
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual(self.state.status()["peers"], 2)
        b.setOfferHandler(lambda offer: DESC_B)
        [s] = self.settle(a.connect("bob", DESC_A))
        self.assertIsInstance(s, Session)

    def test_replaces_stale_session(self) -> None:
        """A reconnect while the mediator still holds our old link takes it over with the secret."""
        a = self.client("alice")
        [old_pump] = self.net.pumps
        # the client side notices a broken link that the mediator has not seen yet
        self.net.pumps.remove(old_pump)
        old_pump.clientIO.protocol.connectionLost(Failure(ConnectionLost()))
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual(self.state.status()["counters"].get("replaced"), 1)
        self.assertEqual(self.state.status()["peers"], 1)
        self.assertEqual(self.settle(a.whenRegistered()), ["alice"])

    def test_replaced_does_not_fight_back(self) -> None:
        """Taken over by an authorised newcomer, the old client waits instead of replacing it back."""
        self.state.tokens = TokenPolicy.parse("open\nbound alice\n")
        old = self.client("alice", token="open")
        self.assertEqual(self.settle(old.whenRegistered()), ["alice"])
        self.client("alice", source="192.0.2.2", token="bound", take_over=True)
        self.assertEqual(self.state.status()["counters"]["replaced"], 1)
        for _ in range(5):
            self.clock.advance(2)
            self.net.flush()
        self.assertEqual(self.state.status()["counters"]["replaced"], 1)
        self.assertGreaterEqual(self.state.status()["counters"]["errors:duplicate-id"], 2)

    def test_duplicate_id_retries(self) -> None:
        self.client("alice")
        other = self.client("alice", source="192.0.2.2")
        result = self.settle(other.whenRegistered())
        self.assertEqual(result, [])  # still waiting: the id is taken
        self.assertEqual(self.state.status()["counters"]["errors:duplicate-id"], 1)
        self.clients[0].stopService()
        self.net.flush()
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual(result, ["alice"])
        self.flushLoggedErrors(DuplicateId)

    def test_token(self) -> None:
        self.state.tokens = TokenPolicy.parse("t0ken\n")
        no = self.client("alice")
        self.assertEqual(self.settle(no.whenRegistered()), [])
        self.assertEqual(self.state.status()["counters"]["errors:unauthorized"], 1)
        yes = self.client("bob", token="t0ken")
        self.assertEqual(self.settle(yes.whenRegistered()), ["bob"])
        self.flushLoggedErrors(Unauthorized)


class EndpointTests(SynchronousTestCase):
    def test_plain(self) -> None:
        from twisted.internet.testing import MemoryReactor

        ep = client_endpoint(MemoryReactor(), "tcp:127.0.0.1:7000")
        self.assertEqual(type(ep).__name__, "TCP4ClientEndpoint")

    def test_ca_needs_plain_tls(self) -> None:
        from twisted.internet.testing import MemoryReactor

        self.assertRaises(ValueError, client_endpoint, MemoryReactor(), "tcp:127.0.0.1:7000", ca="x.pem")


class DeprecatedNamesTests(SynchronousTestCase):
    def test_old_handler_setters_warn_and_work(self) -> None:
        """The snake_case setters of 0.1 still work, with a DeprecationWarning."""
        from natbypass.signaling.client import SignalingClient

        client = SignalingClient.__new__(SignalingClient)
        handler = object()
        client.set_offer_handler(handler)
        client.set_session_handler(handler)
        self.assertIs(client._offer_handler, handler)
        self.assertIs(client._session_handler, handler)
        warnings = self.flushWarnings()
        self.assertEqual([w["category"] for w in warnings], [DeprecationWarning] * 2)
        self.assertIn("use setOfferHandler", warnings[0]["message"])

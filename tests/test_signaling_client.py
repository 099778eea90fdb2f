"""
Tests of the peer's signalling client against the real mediator state, in
memory (iosim pumps and a Clock): handshake, offers both ways, errors,
cancellation, keepalive and reconnection with re-registration.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.identity import Identity
from natbypass.nat import NatSummary
from natbypass.signaling.client import (
    Decline,
    DuplicateId,
    IdBound,
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
        me = Identity.generate()
        c = self.client("alice", identity=me)
        self.assertIs(c.identity, me)
        self.assertEqual(self.settle(c.whenRegistered()), ["alice"])
        self.assertEqual(self.state.status()["peers"], 1)
        self.assertEqual(self.state.peers["alice"].fingerprint, str(me.fingerprint))

    def test_ephemeral_identity_by_default(self) -> None:
        obs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        c = self.client("alice")
        self.assertIsInstance(c.identity, Identity)
        [event] = [e for e in obs if "ephemeral" in e.get("log_format", "")]
        self.assertEqual(event["fingerprint"], str(c.identity.fingerprint))
        self.assertEqual(self.settle(c.whenRegistered()), ["alice"])

    def rounds_to_session(self, client: SignalingClient) -> tuple[list[list[bytes]], list, list, dict[str, int]]:
        """
        Start C{client}, connect to bob at once, and pump the network in
        rounds (each moves what is in flight once, both ways: a one-way trip):
        what alice sent before each round, and the round registration and
        the session came back in.
        """
        bob = self.client("bob")
        bob.setOfferHandler(lambda offer: DESC_B)
        self.clients.append(client)
        client.startService()
        registered: list = []
        session: list = []
        client.whenRegistered().addBoth(registered.append)
        client.connect("bob", DESC_A).addBoth(session.append)
        alice_pump = self.net.pumps[-1]
        sent: list[list[bytes]] = []
        rounds: dict[str, int] = {}
        for n in range(1, 12):
            sent.append([line.split(b",")[0] for line in alice_pump.clientIO.stream])
            for p in list(self.net.pumps):
                p.pump(advanceClock=False)
            rounds.setdefault("registered", n) if registered else None
            if session:
                rounds["session"] = n
                break
        return sent, registered, session, rounds

    def test_registration_round_trips(self) -> None:
        """
        Hello, a Register with a timed proof (our clock and a random nonce,
        signed) and a connect made meanwhile all leave at once: registered
        is back in round 2 and the session in round 3, as in version 1 --
        proving the key costs no round trip.
        """
        c = SignalingClient(self.net.endpoint(), "alice", clock=self.clock, retry_policy=lambda a: 1.0)
        sent, registered, session, rounds = self.rounds_to_session(c)
        self.assertEqual(sent[0], [b'{"op":"hello"', b'{"op":"register"', b'{"op":"connect"'])
        self.assertEqual(registered, ["alice"])
        self.assertIsInstance(session[0], Session)
        self.assertEqual(rounds, {"registered": 2, "session": 3})

    def test_clock_skew_falls_back_to_the_greeting_nonce(self) -> None:
        """
        A client whose clock is two minutes off: the mediator refuses the timed
        proof (stale-proof), the client signs the greeting's nonce instead and
        resends the connect that was behind it; the caller sees only success,
        a round trip later.
        """
        skewed = Clock()
        skewed.advance(self.clock.seconds() + 120)
        c = SignalingClient(self.net.endpoint(), "alice", clock=skewed, retry_policy=lambda a: 1.0)
        sent, registered, session, rounds = self.rounds_to_session(c)
        self.assertEqual(sent[0], [b'{"op":"hello"', b'{"op":"register"', b'{"op":"connect"'])
        self.assertEqual(sent[2], [b'{"op":"register"', b'{"op":"connect"'])  # nonce proof, connect resent
        self.assertEqual(registered, ["alice"])
        self.assertIsInstance(session[0], Session)
        self.assertEqual(rounds, {"registered": 4, "session": 5})

    def test_greeting_nonce_only(self) -> None:
        """With timed proofs off, Register waits for the greeting's nonce: one round trip more."""
        c = SignalingClient(
            self.net.endpoint(), "alice", clock=self.clock, retry_policy=lambda a: 1.0, timed_proofs=False
        )
        sent, registered, session, rounds = self.rounds_to_session(c)
        self.assertEqual(sent[0], [b'{"op":"hello"'])
        self.assertEqual(sent[1], [b'{"op":"register"', b'{"op":"connect"'])
        self.assertEqual(rounds, {"registered": 3, "session": 4})

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
        fp_a, fp_b = str(a.identity.fingerprint), str(b.identity.fingerprint)
        self.assertEqual((offers[0].peer, offers[0].description), ("alice", replace(DESC_A, fingerprint=fp_a)))
        [sb] = sessions
        self.assertEqual((sa.id, sa.key), (sb.id, sb.key))
        self.assertEqual((sa.role, sb.role), ("controlling", "controlled"))
        self.assertEqual(
            (sa.description, sb.description), (replace(DESC_B, fingerprint=fp_b), replace(DESC_A, fingerprint=fp_a))
        )
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
        for _ in range(91):  # nothing moves (not even the answer to the client's ping): it gives up on the link
            self.clock.advance(1)
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

    def test_shutting_down_fails_requests_at_once_and_reconnects(self) -> None:
        """
        A stopping mediator says shutting-down: pending requests fail with
        it at once (the caller may retry elsewhere), and the client
        reconnects without growing its backoff.
        """
        from natbypass.signaling import client as client_module

        a, b = self.client("alice"), self.client("bob")
        never: Deferred = Deferred()
        b.setOfferHandler(lambda offer: never)
        result = self.settle(a.connect("bob", DESC_A))
        self.assertEqual(result, [])
        obs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.state.shutdown()
        self.net.flush()
        [f] = result
        f.trap(client_module.MediatorShuttingDown)
        self.assertEqual(a._failures, 0)
        self.assertTrue(any("shutting down" in e.get("log_format", "") for e in obs))
        # the replacement mediator is up: both come back within a retry
        self.state = SignalingState(self.clock)
        self.net.server_factory = SignalingFactory(self.state)
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual(self.state.status()["peers"], 2)
        self.flushLoggedErrors(CancelledError)

    def test_replaces_stale_session(self) -> None:
        """A reconnect while the mediator still holds our old link takes it over: the same key is the proof."""
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
        # told it was replaced (duplicate-id), then refused: the owning token rebound the id to the newcomer's key
        self.assertEqual(self.state.status()["counters"]["errors:duplicate-id"], 1)
        self.assertGreaterEqual(self.state.status()["counters"]["errors:id-bound"], 2)

    def test_same_key_twice_newest_wins_without_a_fight(self) -> None:
        """Two processes with one key and one id: the newer replaces the older, which waits for it to leave."""
        me = Identity.generate()
        first = self.client("alice", identity=me)
        second = self.client("alice", source="192.0.2.2", identity=me)
        self.assertEqual(self.settle(second.whenRegistered()), ["alice"])
        result = self.settle(first.whenRegistered())
        for _ in range(5):
            self.clock.advance(2)
            self.net.flush()
        self.assertEqual(result, [])  # still waiting: the id is taken by the newer one
        self.assertEqual(self.state.status()["counters"]["replaced"], 1)
        self.assertGreaterEqual(self.state.status()["counters"]["errors:duplicate-id"], 2)
        second.stopService()
        self.net.flush()
        self.clock.advance(2)
        self.net.flush()
        self.assertEqual(result, ["alice"])
        self.flushLoggedErrors(DuplicateId)

    def test_id_bound_to_another_key_surfaces(self) -> None:
        """Squatting refused: the squatter's whenRegistered and pipelined requests fail with IdBound."""
        self.client("alice")
        squatter = SignalingClient(
            self.net.endpoint("203.0.113.66"), "alice", clock=self.clock, retry_policy=lambda a: 1.0
        )
        self.clients.append(squatter)
        squatter.startService()
        registered, connect = squatter.whenRegistered(), squatter.connect("bob", DESC_A)
        self.net.flush()
        f = self.failureResultOf(registered, IdBound)
        self.assertEqual(f.value.code, 409)
        self.assertIn("another identity key", f.value.reason)
        self.failureResultOf(connect, IdBound)
        self.assertEqual(self.state.status()["peers"], 1)

    def test_id_held_across_reconnect(self) -> None:
        """While we reconnect, the mediator holds our id: a stranger cannot slip in."""
        me = Identity.generate()
        a = self.client("alice", identity=me)
        self.net.drop_all()
        stranger = SignalingClient(self.net.endpoint("203.0.113.66"), "alice", clock=self.clock)
        stranger.startService()
        refused = stranger.whenRegistered()
        self.net.flush()
        self.failureResultOf(refused, IdBound)
        stranger.stopService()
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual(self.settle(a.whenRegistered()), ["alice"])
        self.assertEqual(self.state.peers["alice"].fingerprint, str(me.fingerprint))

    def test_fingerprints_reach_both_sides(self) -> None:
        ka, kb = Identity.generate(), Identity.generate()
        a, b = self.client("alice", identity=ka), self.client("bob", identity=kb)
        offers: list[IncomingOffer] = []
        sessions: list[Session] = []
        b.setOfferHandler(lambda offer: offers.append(offer) or DESC_B)
        b.setSessionHandler(sessions.append)
        [sa] = self.settle(a.connect("bob", DESC_A))
        self.assertEqual(offers[0].description.fingerprint, str(ka.fingerprint))
        self.assertEqual(sa.description.fingerprint, str(kb.fingerprint))
        self.assertEqual(sessions[0].description.fingerprint, str(ka.fingerprint))

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


class LivenessTests(SynchronousTestCase):
    """
    Campaign finding 4 (docs/reliability.md): after a NAT mapping loss a
    listening peer's signalling connection was dead through the NAT, yet
    neither side noticed for 90 s.  The client now pings the mediator when
    it has heard nothing for a while and reconnects when no answer comes.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.state = SignalingState(self.clock, Limits(offer_timeout=10.0, keepalive=30.0, idle_timeout=90.0))
        self.net = MemoryNetwork(SignalingFactory(self.state), self.clock)
        self.clients: list[SignalingClient] = []
        self.dead: list = []
        self.addCleanup(self.stop_all)

    def stop_all(self) -> None:
        for c in self.clients:
            if c.running:
                c.stopService()
        self.step(0)

    def client(self, name: str, **kw) -> SignalingClient:
        kw.setdefault("retry_policy", lambda attempt: 1.0)
        c = SignalingClient(self.net.endpoint("192.0.2.1"), name, clock=self.clock, **kw)
        c.startService()
        self.clients.append(c)
        self.net.flush()
        return c

    def blackhole(self) -> None:
        """The NAT loses the mappings of every connection: nothing gets through either way, not even a FIN."""
        self.dead += self.net.pumps
        self.net.pumps[:] = []

    def step(self, seconds: float) -> None:
        """Let C{seconds} pass, the mediator's sweep running each second, the network moving what it can."""
        for p in self.dead:
            p.clientIO.getOutBuffer()  # lost on the way
            p.serverIO.getOutBuffer()
            if p.clientIO.disconnecting and not p.clientIO.disconnected:
                p.clientIO.disconnected = True
                p.clientIO.reportDisconnect()  # the peer's own socket closes; the mediator hears nothing
        self.net.flush()
        whole = int(seconds)
        for _ in range(whole):
            self.clock.advance(1)
            self.state.sweep()
            self.step(0)
        if seconds > whole:
            self.clock.advance(seconds - whole)
            self.step(0)

    def test_dead_connection_noticed_within_30_s(self) -> None:
        alice = self.client("alice")
        bob = self.client("bob")
        bob.setOfferHandler(lambda offer: DESC_B)
        self.step(7)  # somewhere in the middle of the client's quiet timer
        self.blackhole()
        self.step(30)
        status = self.state.status()
        self.assertEqual(status["counters"]["connections"], 4)  # both reconnected
        out: list = []
        alice.connect("bob", DESC_A).addBoth(out.append)
        self.step(1)
        [session] = out
        self.assertIsInstance(session, Session)

    def test_healthy_connection_kept(self) -> None:
        self.client("alice")
        self.step(600)
        self.assertEqual(self.state.status()["counters"]["connections"], 1)

    def test_defaults_bound_detection(self) -> None:
        c = SignalingClient(self.net.endpoint(), "alice", clock=self.clock)
        self.assertLessEqual(c.ping_interval + c.pong_timeout, 30)
        self.assertGreaterEqual(c.ping_interval, 10)  # 10,000 peers: at most 1,000 pings a second at the mediator

    def test_off(self) -> None:
        self.client("alice", ping_interval=0)
        self.step(3)
        self.blackhole()
        self.step(80)
        self.assertEqual(self.state.status()["counters"]["connections"], 1)
        self.step(15)  # the 90 s watchdog of silence remains
        self.assertEqual(self.state.status()["counters"]["connections"], 2)


class UnreachableAtStartTests(SynchronousTestCase):
    """
    Campaign finding 1, "still to explain": a client that starts while the
    mediator is down must go on trying, and register once it is back.
    """

    def test_registers_once_the_mediator_is_back(self) -> None:
        clock = Clock()
        state = SignalingState(clock)
        net = MemoryNetwork(SignalingFactory(state), clock)
        net.up = False
        c = SignalingClient(net.endpoint(), "alice", clock=clock)
        c.startService()
        self.addCleanup(c.stopService)
        registered: list = []
        c.whenRegistered().addBoth(registered.append)
        for _ in range(5):
            clock.advance(1)
            net.flush()
        self.assertEqual(registered, [])
        net.up = True
        for _ in range(30):
            clock.advance(1)
            net.flush()
        self.assertEqual(registered, ["alice"])

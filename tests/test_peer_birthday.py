"""
How a Peer plans a birthday punch or a fast failure from the two NAT
summaries, in memory (natbypass.testing.mediator; the punching itself:
test_punch_birthday.py; real NATs: test_lab_birthday.py).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app.echo import EchoHandler
from natbypass.nat import NatSummary
from natbypass.punch.race import AllAttemptsFailed
from natbypass.signaling.client import SignalingClient
from natbypass.signaling.wire import Candidate, Description
from natbypass.testing.mediator import MemoryMediator

APD, EI = "address-and-port-dependent", "endpoint-independent"
SYM_RANDOM = NatSummary(APD, APD, False)
PORT_RESTRICTED = NatSummary(EI, APD, False)


class PeerBirthdayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MemoryMediator()
        self.addCleanup(self.m.stop)

    def peer(self, name: str, host: str, nat: NatSummary, protocol: str = "udp", **config: Any):
        # (Not published at registration: the NAT summary is set by hand after it.)
        p = self.m.peer(name, host, protocol, discover=False, publish_candidates=False, **config)
        self.m.settle(p.whenReady())
        p.nat = nat
        return p

    def mute(self, nat: NatSummary, candidates=(Candidate("srflx", "198.18.9.9", 9),)) -> list[Description]:
        """A signalling-only bob that answers with C{nat} and C{candidates} and never punches."""
        offers: list[Description] = []
        bob = SignalingClient(self.m.network.endpoint("127.0.0.3"), "bob", clock=self.m.reactor)
        bob.setOfferHandler(lambda offer: offers.append(offer.description) or Description(candidates, nat))
        bob.startService()
        self.addCleanup(bob.stopService)
        self.m.settle(bob.whenRegistered())
        return offers

    def test_random_symmetric_pair_fails_at_once(self) -> None:
        """No punch can work: both attempts fail at once with the table's reason, nothing is sprayed."""
        self.mute(SYM_RANDOM, (Candidate("srflx", "198.18.9.9", 9), Candidate("tcp-srflx", "198.18.9.9", 9)))
        a = self.peer("alice", "127.0.0.1", SYM_RANDOM, protocol="auto")
        started = self.m.reactor.seconds()
        sent = len(self.m.reactor.network.sent)
        failure = self.assertRaises(AllAttemptsFailed, self.m.settle, a.connect("bob"))
        self.assertLess(self.m.reactor.seconds() - started, 0.5)  # the punch timeout is 1 s here
        text = str(failure)
        for protocol in ("udp", "tcp"):
            self.assertIn(f"{protocol}: failed", text)
        self.assertIn("--port-mapping", text)
        self.assertIn("fails at once", text)
        to_bob = [d for _, _, dest, d in self.m.reactor.network.sent[sent:] if dest[0] == "198.18.9.9"]
        self.assertEqual(to_bob, [])

    def test_port_mapping_lifts_the_fast_failure(self) -> None:
        """A peer with a port mapping is reachable plainly: the punch runs (and here finds nobody)."""
        self.mute(SYM_RANDOM, (Candidate("portmap", "198.18.9.9", 9),))
        a = self.peer("alice", "127.0.0.1", SYM_RANDOM)
        failure = self.assertRaises(AllAttemptsFailed, self.m.settle, a.connect("bob"))
        self.assertIn("no verified UDP path", str(failure))
        self.assertNotIn("fails at once", str(failure))

    def test_birthday_punch_wired_and_cleaned_up(self) -> None:
        """
        Port-restricted alice and random symmetric bob: bob opens its extra
        sockets for the attempt, alice sprays; once the path is up (here the
        plain punch wins: in memory there is no NAT) every extra socket is
        closed and the limiter is free again.
        """
        b = self.peer("bob", "127.0.0.3", SYM_RANDOM, birthday_sockets=8)
        b.listen(EchoHandler())
        a = self.peer("alice", "127.0.0.1", PORT_RESTRICTED)
        idle = self.m.peer_ports()
        d = a.connect("bob")
        seen: set = set()
        while not d.called and self.m.reactor.seconds() < 1e9:
            self.m.network.flush()
            self.m.reactor.advance(0.005)
            seen.add(len(self.m.peer_ports() - idle))
            if len(seen) > 1 and max(seen) >= 8:
                break
        self.assertEqual(max(seen), 8)  # bob's extra sockets, during the attempt
        self.assertEqual(b.birthday.active, 1)
        conn = self.m.settle(d)
        self.m.settle(Deferred(), limit=0.2, check=False)
        self.assertEqual(self.m.peer_ports(), idle)
        self.assertEqual((a.birthday.active, b.birthday.active), (0, 0))
        conn.close()

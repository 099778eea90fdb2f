"""
Tests for natbypass.punch.birthday: birthday punching between a
port-restricted cone and a random symmetric NAT, in memory (the lab test is
test_lab_birthday.py).
"""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import Identity
from natbypass.punch.birthday import (
    MIN_PORT,
    TICK,
    BirthdayConfig,
    BirthdayLimiter,
    BirthdayProber,
    probes_for,
    punch_birthday_open,
    punch_birthday_probe,
    random_ports,
    spray_budget,
    success_probability,
)
from natbypass.punch.candidates import ProbeBudget
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.packet import PacketType, decode, encode
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.udp import ProbeSchedule, QuicSetup, Selected, Send
from natbypass.secure import ChannelSecurity
from natbypass.testing.connection import RecordingReceiver
from natbypass.testing.udp import ADDRESS_AND_PORT_DEPENDENT, MemoryNAT, MemoryUDPReactor
from natbypass.trust import pinned

KEY = b"k" * 32
EASY_IN, EASY_PUB = ("10.1.0.2", 40000), ("198.18.1.1", 40000)
HARD_IN, HARD_PUB_IP = ("10.2.0.2", 50000), "198.18.2.1"
ALICE, BOB = Identity.generate(), Identity.generate()
EASY_SEC = ChannelSecurity(ALICE, pinned(BOB.fingerprint))
HARD_SEC = ChannelSecurity(BOB, pinned(ALICE.fingerprint))


def session(role: int) -> PunchSession:
    return PunchSession("sess-b", KEY, role, peer_id="peer")


class TheoryTests(SynchronousTestCase):
    def test_published_figures(self) -> None:
        """The brief's figures: 256 open ports of 64,512: ~50% at 174 probes, 99.9% at 2,048."""
        self.assertLess(abs(success_probability(256, 174) - 0.5), 0.01)
        self.assertGreater(success_probability(256, 2048), 0.999)
        self.assertEqual(probes_for(0.5, 256), 175)
        self.assertLessEqual(abs(probes_for(0.999, 256) - 1738), 1)

    def test_config_bounds(self) -> None:
        self.assertTrue(BirthdayConfig().enabled)
        self.assertFalse(BirthdayConfig(sockets=0).enabled)
        self.assertFalse(BirthdayConfig(probes=0).enabled)
        for bad in ({"sockets": -1}, {"sockets": 100_000}, {"rate": 0}, {"rate": 1e9}, {"probes": 70_000}):
            self.assertRaises(ValueError, BirthdayConfig, **bad)


class PortChoiceTests(SynchronousTestCase):
    @settings(deadline=None)
    @given(st.integers(0, 5000), st.lists(st.integers(1, 65535), max_size=20), st.integers(0, 2**32))
    def test_distinct_high_ports_never_excluded(self, count, exclude, seed) -> None:
        ports = random_ports(count, exclude, random.Random(seed))
        self.assertEqual(len(ports), count)
        self.assertEqual(len(set(ports)), count)
        self.assertTrue(all(MIN_PORT <= p <= 65535 for p in ports))
        self.assertFalse(set(ports) & set(exclude))

    def test_whole_pool_at_most(self) -> None:
        self.assertEqual(len(random_ports(100_000, rng=random.Random(1))), 65536 - MIN_PORT)


class ProberTests(SynchronousTestCase):
    """The easy side's machine: pacing, no repeats, the bound, and an ACK from a guessed port selecting it."""

    def prober(self, ports, config=BirthdayConfig(rate=400, probes=100), timeout=5.0):
        self.clock = FakeClock()
        spray = spray_budget(self.clock, config)
        return BirthdayProber(
            session(0),
            [(HARD_PUB_IP, 50000)],
            1.0,
            HARD_PUB_IP,
            ports,
            spray,
            ProbeSchedule(timeout=timeout),
            itertools.count(1).__next__,
        )

    def drive(self, m, until: float) -> list[Send]:
        sent = []
        while (wake := m.next_wakeup()) is not None and wake <= until:
            self.clock.now = wake
            sent += [a for a in m.poll(wake) if isinstance(a, Send)]
        return sent

    def test_paced_distinct_and_bounded(self) -> None:
        m = self.prober(range(2000, 3000))
        sent = self.drive(m, 1.0 + 0.1)
        sprayed = [a.address[1] for a in sent if a.address[1] != 50000]
        # 400 a second: the first tick's burst (4 ticks' worth, 32) plus 8 per 20 ms tick: 72 in 0.1 s.
        self.assertGreaterEqual(len(sprayed), 64)
        self.assertLessEqual(len(sprayed), 80)
        self.assertEqual(len(sprayed), len(set(sprayed)))
        sent = self.drive(m, 10.0)
        sprayed += [a.address[1] for a in sent if a.address[1] != 50000]
        self.assertEqual(len(sprayed), 100)  # the bound, whatever the time
        self.assertEqual(len(set(sprayed)), 100)
        self.assertEqual(m.stats.sprayed, 100)
        # Every probe is authenticated like any other.
        self.assertTrue(all(decode(a.data).type == PacketType.PROBE for a in sent))

    def test_ack_from_guessed_port_selects_it(self) -> None:
        m = self.prober(range(2000, 3000))
        sent = self.drive(m, 1.05)
        hit = next(a for a in sent if a.address == (HARD_PUB_IP, 2005))
        nonce = decode(hit.data).nonce
        ack = decode(encode(PacketType.ACK, 1, b"sess-b", 999, KEY, echo=nonce))
        actions = m.packet_received(1.06, ack, (HARD_PUB_IP, 2005))
        selected = [a for a in actions if isinstance(a, Selected)]
        self.assertEqual([s.address for s in selected], [(HARD_PUB_IP, 2005)])
        self.assertEqual(m.stats.landed_at, 6)  # the 6th guess (2000, 2001, ... 2005)
        self.assertEqual(m.next_wakeup(), None)  # done: the spray stops
        self.assertEqual(m.poll(2.0), [])

    def test_failure_reason_counts_the_spray(self) -> None:
        m = self.prober(range(2000, 2010), timeout=1.0)
        self.drive(m, 3.0)
        reason = m.poll(3.0) or None
        self.assertIsNone(reason)  # already failed
        self.assertEqual(m.stats.sprayed, 10)
        self.assertIn("birthday: sprayed 10 probes at random ports of 198.18.2.1", m._failure_reason())

    def test_hostile_acks_do_not_select(self) -> None:
        """ACKs without the key, or echoing a nonce sent elsewhere, select nothing."""
        m = self.prober(range(2000, 3000))
        sent = self.drive(m, 1.05)
        nonce = decode(sent[3].data).nonce
        forged = decode(encode(PacketType.ACK, 1, b"sess-b", 1, b"x" * 32, echo=nonce))
        self.assertEqual(m.packet_received(1.06, forged, sent[3].address), [])
        wrong = decode(encode(PacketType.ACK, 1, b"sess-b", 2, KEY, echo=nonce))
        self.assertEqual(m.packet_received(1.06, wrong, (HARD_PUB_IP, 9)), [])
        self.assertEqual((m.stats.invalid, m.stats.stray_acks), (1, 1))


class FakeClock:
    now = 0.0

    def seconds(self) -> float:
        return self.now


class Birthday:
    """
    The easy side behind a port-restricted cone, the hard side behind an
    address-and-port-dependent NAT that hands out ports 61000, 61007, ...
    (in memory a NAT's ports are not random: the easy side's guesses are
    given, one in C{hit_after} of them right).
    """

    def __init__(self, sockets=16, guesses=None, hard_role=1, timeout=3.0, latency=0.02, easy_sec=EASY_SEC):
        self.reactor = MemoryUDPReactor(latency=latency)
        self.reactor.advance(1000)
        net = self.reactor.network
        net.nats.append(
            MemoryNAT([EASY_IN[0]], EASY_PUB[0], filtering=ADDRESS_AND_PORT_DEPENDENT, port_preserving=True)
        )
        self.hard_nat = MemoryNAT(
            [HARD_IN[0]],
            HARD_PUB_IP,
            ADDRESS_AND_PORT_DEPENDENT,
            ADDRESS_AND_PORT_DEPENDENT,
            first_port=61000,
            port_step=7,
        )
        net.nats.append(self.hard_nat)
        self.easy_ep, self.hard_ep = PunchEndpoint(), PunchEndpoint()
        net.listen(EASY_IN, UDPMux(other=self.easy_ep))
        net.listen(HARD_IN, UDPMux(other=self.hard_ep))
        schedule = ProbeSchedule(timeout=timeout)
        config = BirthdayConfig(sockets=sockets, rate=400, probes=400)
        easy_role = 1 - hard_role
        self.results: dict = {}
        self.at: dict = {}
        self.started = self.reactor.seconds()
        self.easy = punch_birthday_probe(
            self.easy_ep,
            session(easy_role),
            [(HARD_PUB_IP, 60000)],
            self.reactor,
            HARD_PUB_IP,
            QuicSetup.make(easy_sec, self.reactor),
            start_delay=0.1,
            schedule=schedule,
            config=config,
            ports=guesses if guesses is not None else range(2000, 2400),
        )
        self.hard = punch_birthday_open(
            self.reactor,
            self.reactor,
            self.hard_ep,
            session(hard_role),
            [EASY_PUB],
            EASY_PUB,
            QuicSetup.make(HARD_SEC, self.reactor),
            start_delay=0.1,
            schedule=schedule,
            config=config,
            bind_host=HARD_IN[0],
        )
        for name, d in (("easy", self.easy), ("hard", self.hard)):
            d.addBoth(self._keep, name)

    def _keep(self, result, name):
        self.results[name] = result
        self.at[name] = self.reactor.seconds() - self.started

    def run(self, seconds: float) -> None:
        self.reactor.pump([0.002] * round(seconds / 0.002))

    def extra_ports_open(self) -> int:
        return sum(1 for (host, _), p in self.reactor.udp.items() if host == HARD_IN[0] and p.listening)


class BirthdayPairTests(SynchronousTestCase):
    def guesses(self, hit_index: int, hit_port: int) -> list[int]:
        ports = [p for p in range(2000, 2400) if p != hit_port]
        ports.insert(hit_index, hit_port)
        return ports

    def check_connected(self, b: Birthday, hit_port: int) -> None:
        easy, hard = b.results["easy"], b.results["hard"]
        for conn in (easy, hard):
            self.assertFalse(hasattr(conn, "value"), conn)
        self.assertEqual(easy.remote_address.port, hit_port)
        self.assertEqual(easy.peer_fingerprint, BOB.fingerprint)
        self.assertEqual(hard.peer_fingerprint, ALICE.fingerprint)
        # Every extra socket but the winner's is closed.
        self.assertEqual(b.extra_ports_open(), 1)
        got = RecordingReceiver(datagrams=True)
        hard.setReceiver(got)
        easy.send(b"hello")
        b.run(0.2)
        self.assertEqual(got.data, [b"hello"])
        hard.close()
        b.run(6.0)
        self.assertEqual(b.extra_ports_open(), 0)  # the winner's closes with its path

    def test_connects_on_the_port_a_probe_lands_on(self) -> None:
        """The 5th extra socket's mapping is 61000 + 7*5 (the main socket took 61000 first)."""
        for hard_role in (0, 1):
            hit = 61000 + 7 * 5
            b = Birthday(guesses=self.guesses(40, hit), hard_role=hard_role)
            b.run(1.5)
            self.check_connected(b, hit)

    def test_all_sockets_closed_on_failure(self) -> None:
        b = Birthday(guesses=range(2000, 2400), timeout=1.5)
        self.assertEqual(b.extra_ports_open(), 16)
        b.run(8.0)
        for name in ("easy", "hard"):
            self.assertIsInstance(b.results[name].value, PunchFailed)
        self.assertIn("birthday: opened 16 extra sockets towards 198.18.1.1:40000", b.results["hard"].value.reason)
        self.assertIn("none was reached", b.results["hard"].value.reason)
        self.assertIn("birthday: sprayed", b.results["easy"].value.reason)
        self.assertEqual(b.extra_ports_open(), 0)

    def test_landed_guess_that_fails_ends_the_punch_at_once(self) -> None:
        """
        A guess landed but its QUIC handshake failed (the peer proved a key
        we do not accept): the punch fails then, with that reason, not at
        the end of the main socket's punch timeout.
        """
        wrong = ChannelSecurity(Identity.generate(), pinned(BOB.fingerprint))
        b = Birthday(guesses=self.guesses(10, 61000 + 7 * 3), hard_role=1, timeout=3.0, easy_sec=wrong)
        b.run(4.0)
        failure = b.results["hard"].value
        self.assertIsInstance(failure, PunchFailed)
        self.assertIn("the peer's probe reached one, then:", failure.reason)
        self.assertLess(b.at["hard"], 1.0)
        self.assertEqual(b.extra_ports_open(), 0)

    def test_all_sockets_closed_on_cancel(self) -> None:
        b = Birthday()
        b.run(0.05)
        b.hard.cancel()
        b.easy.cancel()
        self.assertIsInstance(b.results["hard"].value, CancelledError)
        self.assertEqual(b.extra_ports_open(), 0)
        sent = len(b.reactor.network.sent)
        b.run(3.0)
        self.assertEqual(len(b.reactor.network.sent), sent)  # nothing more goes out

    def test_hard_side_traffic_is_bounded(self) -> None:
        """One probe per extra socket per second, within the attempt's timeout: a few per socket in all."""
        b = Birthday(sockets=16, guesses=range(2000, 2400), timeout=1.5)
        b.run(8.0)
        extra = [s for _, s, _, _ in b.reactor.network.sent if s[0] == HARD_IN[0] and s != HARD_IN]
        self.assertLessEqual(len(extra), 16 * 2)
        self.assertGreaterEqual(len(extra), 16)


class LimiterTests(SynchronousTestCase):
    def test_one_at_a_time(self) -> None:
        from twisted.internet.defer import Deferred

        limiter = BirthdayLimiter()
        first: Deferred = Deferred()
        d1 = limiter.run(lambda: first)
        d2 = limiter.run(lambda: Deferred())
        self.assertIn("another birthday punch is under way", self.failureResultOf(d2, PunchFailed).value.reason)
        first.callback("done")
        self.assertEqual(self.successResultOf(d1), "done")
        d3 = limiter.run(lambda: Deferred())
        self.assertNoResult(d3)
        self.assertEqual(limiter.active, 1)


class BudgetTests(SynchronousTestCase):
    def test_spray_budget_paces_and_bounds(self) -> None:
        clock = FakeClock()
        b = spray_budget(clock, BirthdayConfig(rate=100, probes=20))
        self.assertIsInstance(b, ProbeBudget)
        self.assertEqual(sum(b.spend(53) for _ in range(9)), 8)  # burst: 4 ticks' worth (8 at 100/s)
        clock.now += TICK
        self.assertEqual(sum(b.spend(53) for _ in range(9)), 2)  # one tick: 2 more
        clock.now += TICK * 100
        self.assertEqual(sum(b.spend(53) for _ in range(20)), 8)  # a late tick catches up, to the burst
        clock.now += 100
        self.assertEqual(sum(b.spend(53) for _ in range(20)), 2)  # 20 in all


class TwoLandingsTests(SynchronousTestCase):
    """
    The easy side's spray reaches the hard side's main socket and an extra
    socket: the two sides must still end on one and the same connection
    (the traversal matrix saw a birthday connect whose first stream never
    opened: each side kept a different QUIC connection).
    """

    def test_main_and_extra_socket_both_reached(self) -> None:
        for hard_role in (0, 1):
            for first, second in ((61000, 61000 + 7 * 5), (61000 + 7 * 5, 61000)):
                ports = [p for p in range(2000, 2400)]
                ports[40:40] = [first, second]
                b = Birthday(guesses=ports, hard_role=hard_role)
                b.run(1.5)
                easy, hard = b.results["easy"], b.results["hard"]
                self.assertFalse(hasattr(easy, "value") or hasattr(hard, "value"), (hard_role, first, easy, hard))
                got = RecordingReceiver(datagrams=True)
                hard.setReceiver(got)
                easy.send(b"hello")
                b.run(0.2)
                self.assertEqual(got.data, [b"hello"], (hard_role, first, second))

"""
Tests for the lab probes' wire format, classification and reflector (in memory).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import probe
from natbypass.lab.probe import (
    Knock,
    KnockTCP,
    ProbeDecodeError,
    Reflector,
    ReflectorTCP,
    Request,
    Response,
    decode,
    encode,
)
from natbypass.testing.udp import MemoryUDPReactor

txids = st.text("0123456789abcdef", min_size=16, max_size=16)
requests = st.builds(Request, txids, st.sampled_from(probe.REPLY_FROM), st.integers(0, probe.MAX_DELAY_MS))
ips = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
responses = st.builds(Response, txids, ips, st.integers(0, 65535))
knocks = st.builds(Knock, txids, st.sampled_from(probe.KNOCK_FROM), ips, st.integers(1, 65535))
messages = requests | responses | knocks


class CodecTests(SynchronousTestCase):
    def test_vector(self) -> None:
        """The exact bytes of one request and one response."""
        self.assertEqual(encode(Request("0123456789abcdef", "addr", 250)), b"NBP1 REQ 0123456789abcdef addr 250\n")
        self.assertEqual(
            decode(b"NBP1 RSP 0123456789abcdef 198.18.1.1 4000\n"), Response("0123456789abcdef", "198.18.1.1", 4000)
        )
        self.assertEqual(
            encode(Knock("0123456789abcdef", "addr", "198.18.1.1", 40000)),
            b"NBP1 KNK 0123456789abcdef addr 198.18.1.1 40000\n",
        )

    @given(messages)
    @settings(deadline=None)
    def test_round_trip(self, msg: probe.Message) -> None:
        self.assertEqual(decode(encode(msg)), msg)

    @given(st.binary(max_size=80))
    @settings(deadline=None)
    def test_garbage(self, data: bytes) -> None:
        """Arbitrary bytes decode or raise ProbeDecodeError, nothing else."""
        try:
            msg = decode(data)
        except ProbeDecodeError:
            return
        self.assertEqual(decode(encode(msg)), msg)

    @given(messages, st.integers(0, 60), st.binary(min_size=1, max_size=3))
    @settings(deadline=None)
    def test_mutations(self, msg: probe.Message, at: int, junk: bytes) -> None:
        """Corrupted messages decode to something valid or raise ProbeDecodeError."""
        data = encode(msg)
        at = at % len(data)
        try:
            decode(data[:at] + junk + data[at + 1 :])
        except ProbeDecodeError:
            pass

    def test_rejects(self) -> None:
        for bad in (
            b"",
            b"NBP1 REQ 0123456789abcdef same",
            b"NBP2 REQ 0123456789abcdef same 0",
            b"NBP1 REQ 0123456789ABCDEF same 0",
            b"NBP1 REQ 0123456789abcdef sideways 0",
            b"NBP1 REQ 0123456789abcdef same -1",
            b"NBP1 RSP 0123456789abcdef 1.2.3 80",
            b"NBP1 RSP 0123456789abcdef 01.2.3.4 80",
            b"NBP1 RSP 0123456789abcdef 1.2.3.4 65536",
            b"NBP1 REQ 0123456789abcdef same \xd9\xa3",
            b"\xff",
            b"NBP1 KNK 0123456789abcdef addr 1.2.3.4",
            b"NBP1 KNK 0123456789abcdef same 1.2.3.4 80",
            b"NBP1 KNK 0123456789abcdef addr 1.2.3.4 0",
            b"NBP1 REQ 0123456789abcdef same 0 0",
        ):
            self.assertRaises(ProbeDecodeError, decode, bad)


class ClassifyTests(SynchronousTestCase):
    P, A = ("198.18.0.2", 4000), ("198.18.0.3", 4001)

    def observed(self, a: int, b: int, c: int, d: int) -> dict[tuple[str, int], tuple[str, int]]:
        keys = [self.P, (self.P[0], self.A[1]), (self.A[0], self.P[1]), self.A]
        return {k: ("198.18.1.1", v) for k, v in zip(keys, [a, b, c, d])}

    def test_mapping(self) -> None:
        self.assertEqual(probe.classify_mapping(self.observed(5, 5, 5, 5), self.P, self.A), "endpoint-independent")
        self.assertEqual(probe.classify_mapping(self.observed(5, 5, 6, 6), self.P, self.A), "address-dependent")
        self.assertEqual(
            probe.classify_mapping(self.observed(5, 6, 7, 8), self.P, self.A), "address-and-port-dependent"
        )
        self.assertEqual(
            probe.classify_mapping(self.observed(5, 6, 5, 6), self.P, self.A), "address-and-port-dependent"
        )

    def test_sequence(self) -> None:
        self.assertEqual(probe.port_sequence([20000, 20001, 20002, 20003]), "sequential(+1)")
        self.assertEqual(probe.port_sequence([65535, 0, 1]), "sequential(+1)")
        self.assertEqual(probe.port_sequence([100, 102, 104]), "sequential(+2)")
        self.assertEqual(probe.port_sequence([54236, 5057, 54581, 64476]), "random")
        self.assertEqual(probe.port_sequence([5, 6]), "random")  # too short to tell
        self.assertEqual(probe.port_sequence([5, 5, 5]), "random")

    def test_filtering(self) -> None:
        self.assertEqual(probe.classify_filtering({"same", "port", "addr", "both"}), "endpoint-independent")
        self.assertEqual(probe.classify_filtering({"same", "port"}), "address-dependent")
        self.assertEqual(probe.classify_filtering({"same"}), "address-and-port-dependent")
        self.assertEqual(probe.classify_filtering(set()), "blocked")

    def test_reply_socket(self) -> None:
        addrs, ports = ("a", "b"), (1, 2)
        self.assertEqual(probe.reply_socket(("a", 1), "same", addrs, ports), ("a", 1))
        self.assertEqual(probe.reply_socket(("a", 1), "port", addrs, ports), ("a", 2))
        self.assertEqual(probe.reply_socket(("b", 2), "addr", addrs, ports), ("a", 2))
        self.assertEqual(probe.reply_socket(("b", 1), "both", addrs, ports), ("a", 2))


class ReflectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryUDPReactor()
        self.reflector = Reflector(self.reactor, ["198.18.0.2", "198.18.0.3"], [4000, 4001])
        self.reflector.listen()

    def test_listens_everywhere(self) -> None:
        want = {(a, p) for a in ("198.18.0.2", "198.18.0.3") for p in (4000, 4001)}
        self.assertEqual(set(self.reactor.open_udp_ports()), want)
        self.assertEqual(set(self.reactor.tcp), want)

    def test_answers_from_the_asked_socket_after_the_delay(self) -> None:
        rx = self.reactor.udp[("198.18.0.2", 4000)]
        rx.protocol.datagramReceived(encode(Request("00000000000000aa", "both", 1500)), ("198.18.1.7", 20001))
        tx = self.reactor.udp[("198.18.0.3", 4001)]
        self.assertEqual(tx.written, [])
        self.reactor.advance(1.499)
        self.assertEqual(tx.written, [])
        self.reactor.advance(0.001)
        self.assertEqual(
            tx.written, [(encode(Response("00000000000000aa", "198.18.1.7", 20001)), ("198.18.1.7", 20001))]
        )
        self.assertEqual(rx.written, [])

    def test_drops_garbage(self) -> None:
        rx = self.reactor.udp[("198.18.0.2", 4000)]
        rx.protocol.datagramReceived(b"hello", ("198.18.1.7", 1))
        rx.protocol.datagramReceived(encode(Response("00000000000000aa", "1.2.3.4", 1)), ("198.18.1.7", 1))
        self.reactor.advance(1)
        self.assertEqual([p.written for p in self.reactor.udp.values()], [[]] * 4)

    def test_tcp_reports_peer_and_closes(self) -> None:
        proto = ReflectorTCP()
        transport = StringTransport(peerAddress=IPv4Address("TCP", "198.18.1.3", 4567))
        proto.makeConnection(transport)
        self.assertEqual(decode(transport.value()), Response("0" * 16, "198.18.1.3", 4567))
        self.assertTrue(transport.disconnecting)

    def test_knock_connects_back_from_the_asked_address(self) -> None:
        rx = self.reactor.udp[("198.18.0.2", 4000)]
        rx.protocol.datagramReceived(encode(Knock("00000000000000bb", "addr", "198.18.1.5", 40001)), ("198.18.1.5", 5))
        rx.protocol.datagramReceived(encode(Knock("00000000000000cc", "port", "198.18.1.5", 40001)), ("198.18.1.5", 5))
        self.assertEqual(
            [(h, p, b) for h, p, _, _, b in self.reactor.tcpClients],
            [("198.18.1.5", 40001, ("198.18.0.3", 0)), ("198.18.1.5", 40001, ("198.18.0.2", 0))],
        )
        factory = self.reactor.tcpClients[0][2]
        proto = factory.buildProtocol(IPv4Address("TCP", "198.18.1.5", 40001))  # type: ignore[attr-defined]
        transport = StringTransport(hostAddress=IPv4Address("TCP", "198.18.0.3", 51000))
        proto.makeConnection(transport)
        self.assertIsInstance(proto, KnockTCP)
        self.assertEqual(decode(transport.value()), Response("00000000000000bb", "198.18.0.3", 51000))
        self.assertTrue(transport.disconnecting)
        # The factory is a client factory: the reactor's connector callbacks exist.
        factory.clientConnectionFailed(None, None)  # type: ignore[attr-defined]

    def test_needs_two_of_each(self) -> None:
        self.assertRaises(ValueError, Reflector, self.reactor, ["a", "a"], [1, 2])
        self.assertRaises(ValueError, Reflector, self.reactor, ["a", "b"], [1])

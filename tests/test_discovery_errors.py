"""
Errors are not swallowed: RFC 5780 discovery reports what the network does
as "no answer", and lets a bug (a TypeError, say) fail it; the STUN
responder, which must never raise, logs a bug with its traceback and counts
it apart from malformed requests.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from natbypass.stun import discovery as dv
from natbypass.stun import message as m
from natbypass.stun.client import NETWORK_ERRORS, StunErrorResponse, StunTimeout, TCPBinding, binding_request
from natbypass.stun.server import STUNDatagramProtocol, STUNServer, STUNStreamProtocol

SERVER = ("192.0.2.1", 3478)
LOCAL = ("10.0.0.2", 40000)


class ScriptedClient:
    """An IStunClient whose every request fails with C{error}."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.stats = None

    def request(self, message, address=None, policy=None) -> defer.Deferred:
        return defer.fail(self.error)

    def handle(self, data, address) -> bool:
        return False

    def failAll(self, reason) -> None:
        pass


def error_response() -> StunErrorResponse:
    response = binding_request().reply(m.MessageClass.ERROR, [m.ErrorCode(420, "Unknown Attribute")])
    return StunErrorResponse(response, SERVER)


class UDPDiscoveryErrorTests(SynchronousTestCase):
    def discover(self, error: BaseException) -> defer.Deferred:
        return dv.discover_udp(ScriptedClient(error), SERVER, LOCAL, Clock())

    def test_network_errors_are_no_answer(self) -> None:
        for error in (StunTimeout(SERVER, 7, 3.0), error_response(), ConnectionError("the STUN socket was closed")):
            behavior = self.successResultOf(self.discover(error))
            self.assertFalse(behavior.reachable, error)
            self.assertEqual(behavior.nat_type, "udp-blocked", error)

    def test_bug_fails_discovery(self) -> None:
        """It used to be reported as an unreachable server (udp-blocked)."""
        self.failureResultOf(self.discover(TypeError("a bug")), TypeError)

    def test_bug_raised_by_the_client_fails_discovery(self) -> None:
        class Raising(ScriptedClient):
            def request(self, message, address=None, policy=None):
                raise AttributeError("a bug")

        self.failureResultOf(dv.discover_udp(Raising(None), SERVER, LOCAL, Clock()), AttributeError)


class TCPDiscoveryErrorTests(SynchronousTestCase):
    def discover(self, error: BaseException) -> defer.Deferred:
        return dv.discover_tcp(lambda remote, local: defer.fail(error), SERVER, Clock())

    def test_network_errors_are_no_answer(self) -> None:
        for error in (
            ConnectionRefusedError(),
            TimeoutError(),
            ConnectionDone(),
            OSError(98, "Address already in use"),
            StunTimeout(SERVER, 1, 10.0),
            error_response(),
        ):
            self.assertIsInstance(error, NETWORK_ERRORS)
            behavior = self.successResultOf(self.discover(error))
            self.assertEqual(behavior.mapping, "unknown", error)
            self.assertFalse(behavior.tests[0].answered)
            self.assertIn("no answer from 192.0.2.1:3478 over TCP", behavior.notes[0])

    def test_bug_fails_discovery(self) -> None:
        """It used to be "no answer" (C{except Exception})."""
        self.failureResultOf(self.discover(TypeError("a bug")), TypeError)

    def test_bug_in_a_later_test_fails_discovery(self) -> None:
        calls = []

        def binder(remote, local):
            calls.append(remote)
            if len(calls) == 1:
                response = binding_request().reply(m.MessageClass.SUCCESS, [])
                return defer.succeed(TCPBinding(LOCAL, ("203.0.113.9", 50000), ("192.0.2.2", 3479), SERVER, response))
            return defer.fail(KeyError("a bug"))

        self.failureResultOf(dv.discover_tcp(binder, SERVER, Clock()), KeyError)
        self.assertEqual(len(calls), 3)

    def test_both_at_once(self) -> None:
        """discover() with UDP and TCP: a bug on either side fails the whole."""
        d = dv.discover(
            ScriptedClient(StunTimeout(SERVER, 1, 1.0)),
            SERVER,
            LOCAL,
            Clock(),
            tcp_binder=lambda remote, local: defer.fail(TypeError("a bug")),
        )
        self.failureResultOf(d, TypeError)


class BuggyResponder:
    """A BindingResponder with a bug."""

    def fast_response(self, data, source, local):
        raise TypeError("a bug")

    def respond(self, request, source, local, *, stream=False):
        raise TypeError("a bug")


class FakeUDPTransport:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 3478)

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.written.append((data, addr))


class ResponderBugTests(SynchronousTestCase):
    def test_datagram_bug_logged_and_counted(self) -> None:
        server = STUNServer(BuggyResponder())
        proto = STUNDatagramProtocol(server)
        transport = FakeUDPTransport()
        proto.makeConnection(transport)
        proto.datagramReceived(binding_request().encode(), ("127.0.0.1", 5000))
        self.assertEqual((server.counters.errors, server.counters.malformed), (1, 0))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(transport.written, [])

    def test_malformed_is_not_a_bug(self) -> None:
        server = STUNServer(BuggyResponder())
        proto = STUNDatagramProtocol(server)
        proto.makeConnection(FakeUDPTransport())

        class Undecodable(BuggyResponder):
            def fast_response(self, data, source, local):
                return None

        server.responder = Undecodable()
        proto.datagramReceived(b"\x00\x01\x00\x00" + m.MAGIC_COOKIE_BYTES + bytes(11), ("127.0.0.1", 5000))
        self.assertEqual((server.counters.errors, server.counters.malformed), (0, 1))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stream_bug_logged_and_counted(self) -> None:
        server = STUNServer(BuggyResponder())
        clock = Clock()
        proto = STUNStreamProtocol(server, clock, 30.0)
        proto.factory = None
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(binding_request().encode() * 2)
        self.assertEqual((server.counters.errors, server.counters.malformed), (2, 0))
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 2)
        self.assertFalse(transport.disconnecting)
        proto.connectionLost()

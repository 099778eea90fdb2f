"""
In-memory fakes for testing signalling without sockets: a recording
C{IChannel} and a C{MemoryNetwork} whose client endpoints connect to a server
factory through C{twisted.test.iosim} pumps.  Used by the tests and handy for
the traversal engine's own tests.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import implementer

from natbypass.identity import Identity
from natbypass.signaling.interfaces import IChannel
from natbypass.signaling.server import Limits, SignalingState
from natbypass.signaling.wire import Greeting, Hello, Message, Ok, Ping, Pong, Register, Registered


@implementer(IChannel)
class FakeChannel:
    """Records what the state machine sends; C{closed} once asked to close."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.closed = False

    def send(self, message: Message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        self.closed = True

    def kernel_rtt(self) -> float | None:
        return None

    def take(self) -> list[Message]:
        """The messages sent since the last call."""
        out, self.sent = self.sent, []
        return out


def signed_register(
    greeting: Greeting | bytes,
    identity: Identity,
    rid: int,
    peer_id: str,
    token: str | None = None,
    replace: bool = False,
) -> Register:
    """
    A C{register} that proves possession of C{identity}'s key: its signature
    over the nonce of C{greeting} (or a nonce given as bytes) and C{peer_id}.
    """
    nonce = greeting if isinstance(greeting, bytes) else greeting.nonce
    if nonce is None:
        raise ValueError("the greeting carries no nonce")
    return Register(rid, peer_id, identity.public_bytes(), identity.sign_registration(nonce, peer_id), token, replace)


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, network: MemoryNetwork, source: str) -> None:
        self.network = network
        self.source = source

    def connect(self, factory: Any) -> Deferred[Any]:
        return self.network._connect(factory, self.source)


class MemoryNetwork:
    """
    Connects client endpoints to C{server_factory} in memory.  Set C{up} to
    False to refuse new connections (a mediator that is down); C{drop_all}
    cuts every live connection; C{flush} moves all pending bytes.
    """

    def __init__(self, server_factory: Any, clock: Any) -> None:
        self.server_factory = server_factory
        self.clock = clock
        self.pumps: list[iosim.IOPump] = []
        self.up = True
        self._port = 40000

    def endpoint(self, source: str = "192.0.2.1") -> IStreamClientEndpoint:
        return _MemoryEndpoint(self, source)

    def _connect(self, factory: Any, source: str) -> Deferred[Any]:
        if not self.up:
            return fail(ConnectionRefusedError("mediator is down"))
        self._port += 1
        client_addr = IPv4Address("TCP", source, self._port)
        server_addr = IPv4Address("TCP", "198.51.100.1", 7000)
        client = factory.buildProtocol(server_addr)
        server = self.server_factory.buildProtocol(client_addr)
        ct = iosim.FakeTransport(client, False, client_addr, server_addr)
        st = iosim.FakeTransport(server, True, server_addr, client_addr)
        self.pumps.append(iosim.connect(server, st, client, ct, greet=False, clock=self.clock))
        return succeed(client)

    def flush(self) -> None:
        """Pump every connection until nothing moves."""
        for _ in range(1000):
            moved = False
            for p in list(self.pumps):
                if p.pump(advanceClock=False):
                    moved = True
                if p.clientIO.disconnected and p.serverIO.disconnected:
                    self.pumps.remove(p)
            if not moved:
                return
        raise AssertionError("the memory network never went quiet")

    def drop_all(self) -> None:
        """Cut every connection, as a mediator crash would."""
        for p in self.pumps:
            p.serverIO.loseConnection()
        self.flush()


#: Keys made once per name (key generation is cheap, but the tests read better with named owners).
KEYS: dict[str, Identity] = {}


def key(name: str) -> Identity:
    """The identity key of the test owner C{name}."""
    if name not in KEYS:
        KEYS[name] = Identity.generate()
    return KEYS[name]


def counting_random() -> callable:
    """Deterministic but distinct 'random' bytes."""
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(4, "big") * (n // 4) + b"\0" * (n % 4)


def udp_first(offer_nat, answer_nat, wish_a, wish_b) -> list[str]:
    """A fixed policy for tests of the state machine: UDP then TCP, narrowed by the wishes."""
    order = list(wish_a) if wish_a else ["udp", "tcp"]
    return [p for p in order if not wish_b or p in wish_b]


class Harness:
    """A mediator's signalling state on a Clock, with helpers that open fake connections and register peers."""

    def __init__(self, **limits) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        tokens = limits.pop("tokens", None)
        choose = limits.pop("choose_order", None)
        self.state = SignalingState(self.clock, Limits(**limits), tokens, choose, random_bytes=counting_random())
        self._rid = itertools.count(100)
        self.nonces: dict[int, bytes] = {}

    def rid(self) -> int:
        """A fresh request id."""
        return next(self._rid)

    def open(self, source: str = "192.0.2.1") -> tuple[FakeChannel, object]:
        ch = FakeChannel()
        link = self.state.open(ch, source)
        if ch.sent and isinstance(ch.sent[0], Greeting):
            self.nonces[id(link)] = ch.sent[0].nonce
        return ch, link

    def register(
        self,
        c,
        rid: int,
        name: str,
        token: str | None = None,
        replace: bool = False,
        identity: Identity | None = None,
    ) -> Register:
        """A register for connection C{c}, signed over its nonce by C{identity} (default: C{name}'s own key)."""
        return signed_register(self.nonces[id(c[1])], identity or key(name), rid, name, token, replace)

    def send(self, ch_link, msg) -> list:
        ch, link = ch_link
        self.state.received(link, msg)
        return ch.take()

    def hello(self, source: str = "192.0.2.1"):
        c = self.open(source)
        c[0].take()
        assert self.send(c, Hello(1, 2)) == [Ok(1)]
        return c

    def peer(self, name: str, source: str = "192.0.2.1", token: str | None = None, identity: Identity | None = None):
        c = self.hello(source)
        out = self.send(c, self.register(c, 2, name, token, identity=identity))
        assert isinstance(out[0], Registered), out
        assert isinstance(out[1], Ping), out
        # answer the RTT probe after 20 ms
        self.clock.advance(0.02)
        assert self.send(c, Pong(out[1].rid)) == []
        return c

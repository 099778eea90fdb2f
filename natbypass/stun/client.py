"""
STUN client transactions (RFC 8489 section 6.2), over UDP and TCP.

The heart is L{StunClient}: it does not own a socket.  It is given a
C{send(data, addr)} callable and is fed every datagram that might be STUN
through L{StunClient.handle}, which returns True only when the datagram
answered one of its transactions.  That is the contract a socket shared with
hole-punching traffic needs: the owner of the socket (a mux) offers each
datagram to the client and passes on what the client did not take.

    client = StunClient(send=transport.write, clock=reactor)
    d = client.request(binding_request(), ("127.0.0.1", 3478))
    # ... in the socket's datagramReceived:
    if not client.handle(data, addr):
        punch.datagramReceived(data, addr)

L{StunUDPProtocol} is the same client on a socket of its own (it is also a
ready-made STUN child for L{natbypass.punch.mux.UDPMux}); L{StunTCPProtocol}
carries it over a TCP connection with RFC 8489 stream framing, and
L{connect_tcp_from} opens such a connection from a chosen local port with
SO_REUSEADDR and SO_REUSEPORT, so the same port can later punch (TCP
simultaneous open) toward a peer.

Time comes from the injected clock only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

# format_address, route_source_address and StunFramingError live in
# natbypass.address, natbypass.net and the codec; callers of the client may
# import them from here too.
from natbypass.address import format_address
from natbypass.net import reusable_binding, route_source_address  # noqa: F401 (re-exported)
from natbypass.stun.message import (
    MAGIC_COOKIE,
    ChangedAddress,
    ErrorCode,
    MappedAddress,
    Message,
    MessageClass,
    Method,
    OtherAddress,
    ResponseOrigin,
    StreamFramer,
    StunDecodeError,
    StunFramingError,
    XorMappedAddress,
    decode,
    is_stun,
)
from natbypass.stun.message import (
    Attribute as StunAttribute,
)

Address = tuple[str, int]

#: How many finished transaction ids are remembered, so that answers to
#: retransmissions of an already answered request are still recognised.
RECENT_TRANSACTIONS = 256


# ----------------------------------------------------------------- errors


class StunTimeout(Exception):
    """No response arrived within the retransmission schedule."""

    def __init__(self, address: Address | None, attempts: int, waited: float) -> None:
        super().__init__(
            f"no STUN response from {format_address(address) if address else 'the server'} "
            f"after {attempts} attempt(s) over {waited:.1f} s"
        )
        self.address = address
        self.attempts = attempts
        self.waited = waited


class StunErrorResponse(Exception):
    """The server answered with an error response (class 0b11)."""

    def __init__(self, response: Message, source: Address | None) -> None:
        err = response.get(ErrorCode)
        self.code = err.code if err is not None else None
        self.reason = err.reason if err is not None else ""
        self.response = response
        self.source = source
        super().__init__(f"STUN error response {self.code} {self.reason!r}")


#: What a transaction fails with when the network or the server lets it
#: down, over UDP or TCP: no answer in time, an error response, a refused or
#: timed-out connection, a connection or socket closed before the answer.
#: Anything else is a bug and is not to be reported as "no answer".
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    StunTimeout,
    StunErrorResponse,
    ConnectError,
    ConnectionClosed,
    OSError,
)


# ----------------------------------------------------------------- helpers


def new_transaction_id() -> bytes:
    """96 random bits (RFC 8489 6: uniformly and randomly from 0 to 2**96-1)."""
    return os.urandom(12)


def binding_request(attributes: Iterable[StunAttribute] = (), transaction_id: bytes | None = None) -> Message:
    """A Binding request with a fresh transaction id."""
    return Message(
        Method.BINDING,
        MessageClass.REQUEST,
        transaction_id if transaction_id is not None else new_transaction_id(),
        tuple(attributes),
    )


def mapped_address(response: Message) -> Address | None:
    """XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS (RFC 3489 servers), else None."""
    attr = response.get(XorMappedAddress) or response.get(MappedAddress)
    return attr.address if attr is not None else None


def other_address(response: Message) -> Address | None:
    """OTHER-ADDRESS (RFC 5780), else CHANGED-ADDRESS (RFC 3489), else None."""
    attr = response.get(OtherAddress) or response.get(ChangedAddress)
    return attr.address if attr is not None else None


def response_origin(response: Message) -> Address | None:
    """RESPONSE-ORIGIN (RFC 5780): the server address the response was sent from, or None."""
    attr = response.get(ResponseOrigin)
    return attr.address if attr is not None else None


@dataclass(frozen=True)
class RetransmitPolicy:
    """
    RFC 8489 6.2.1 timers.  Over UDP a request is sent C{rc} times, at 0,
    RTO, 3 RTO, 7 RTO, ... (the interval doubles) and the transaction fails
    C{rm} RTOs after the last send: with the defaults, sends at 0, 0.5, 1.5,
    3.5, 7.5, 15.5, 31.5 s and failure at 39.5 s.  Over TCP the request is
    sent once and fails after C{ti} seconds.
    """

    rto: float = 0.5
    rc: int = 7
    rm: float = 16
    ti: float = 39.5

    def __post_init__(self) -> None:
        if self.rto <= 0 or self.rc < 1 or self.rm <= 0 or self.ti <= 0:
            raise ValueError(f"invalid retransmission policy {self}")

    def send_times(self) -> tuple[float, ...]:
        """Offsets from the first send at which the request is (re)sent."""
        return tuple(self.rto * (2**k - 1) for k in range(self.rc))

    def give_up_after(self) -> float:
        """Offset from the first send at which an unanswered UDP request fails."""
        return self.send_times()[-1] + self.rm * self.rto

    @classmethod
    def within(cls, timeout: float, rto: float = 0.5) -> RetransmitPolicy:
        """
        The RFC schedule cut to fail after C{timeout} seconds: as many
        doubling retransmissions as leave at least one RTO of waiting after
        the last, then wait out the rest.  Used where the full 39.5 s would
        make a user wait for an answer (filtering tests expect silence).
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        rto = min(rto, timeout)
        rc = 1
        while rto * (2**rc - 1) + rto <= timeout + 1e-9:
            rc += 1
        last = rto * (2 ** (rc - 1) - 1)
        return cls(rto=rto, rc=rc, rm=(timeout - last) / rto, ti=timeout)


@dataclass
class ClientStats:
    """Counters, for logs and tests: what the client sent and what it dropped."""

    requests: int = 0
    sent: int = 0
    retransmissions: int = 0
    responses: int = 0
    error_responses: int = 0
    late: int = 0
    unmatched: int = 0
    malformed: int = 0
    not_responses: int = 0
    timeouts: int = 0
    cancelled: int = 0


class IStunClient(Interface):
    """STUN client transactions over some transport; see L{StunClient}."""

    stats = Attribute("A ClientStats of what was sent, matched and dropped.")

    def request(message, address=None, policy=None):
        """
        Send the request C{message} to C{address} and return a Deferred that
        fires with C{(response, source_address)} for a success response, or
        fails with L{StunErrorResponse}, L{StunTimeout}, or C{CancelledError}
        when cancelled (which stops its timers).
        """

    def handle(data, address):
        """
        Offer one received datagram (or TCP frame).  Returns True when it
        answered (or re-answered) one of this client's transactions and was
        consumed; False for anything else, which the caller may pass on.
        """

    def failAll(reason):
        """Fail every pending transaction with C{reason} (socket closed)."""


@dataclass
class _Transaction:
    message: Message
    address: Address | None
    data: bytes
    deferred: defer.Deferred
    times: tuple[float, ...]
    give_up: float
    started: float
    sends: int = 0
    timer: IDelayedCall | None = None


@implementer(IStunClient)
class StunClient:
    """
    Transactions matched by transaction id, retransmitted on C{clock}.

    C{reliable=True} is the TCP mode: one send, failure after C{policy.ti}.
    Responses are matched on transaction id alone, not on their source: RFC
    5780 tests are answered from the server's other address.
    """

    log = Logger()

    def __init__(
        self,
        send: Callable[[bytes, Address | None], None],
        clock: IReactorTime,
        policy: RetransmitPolicy = RetransmitPolicy(),
        *,
        reliable: bool = False,
        fingerprint: bool = True,
    ) -> None:
        self._send = send
        self._clock = clock
        self.policy = policy
        self.reliable = reliable
        self.fingerprint = fingerprint
        self.stats = ClientStats()
        self._pending: dict[bytes, _Transaction] = {}
        self._recent: OrderedDict[bytes, None] = OrderedDict()

    # ------------------------------------------------------------ sending

    def request(
        self,
        message: Message,
        address: Address | None = None,
        policy: RetransmitPolicy | None = None,
    ) -> defer.Deferred:
        if message.cls != MessageClass.REQUEST:
            raise ValueError("only requests start transactions")
        txid = message.transaction_id
        if txid in self._pending:
            raise ValueError("a transaction with this id is already pending")
        policy = policy or self.policy
        if self.reliable:
            times, give_up = (0.0,), policy.ti
        else:
            times, give_up = policy.send_times(), policy.give_up_after()
        txn = _Transaction(
            message,
            address,
            message.encode(fingerprint=self.fingerprint),
            defer.Deferred(lambda d: self._cancel(txid)),
            times,
            give_up,
            self._clock.seconds(),
        )
        self._pending[txid] = txn
        self.stats.requests += 1
        self._transmit(txn)
        return txn.deferred

    def _transmit(self, txn: _Transaction) -> None:
        txid = txn.message.transaction_id
        if txn.sends:
            self.stats.retransmissions += 1
        txn.sends += 1
        self.stats.sent += 1
        try:
            self._send(txn.data, txn.address)
        except OSError as e:
            # An ICMP error from an earlier send can surface here; the
            # schedule goes on, as if the datagram had been lost.
            self.log.debug("sending to {address} failed: {error}", address=txn.address, error=e)
        if txid not in self._pending:  # the send callback completed it
            return
        if txn.sends < len(txn.times):
            delay = txn.times[txn.sends] - txn.times[txn.sends - 1]
            txn.timer = self._clock.callLater(delay, self._transmit, txn)
        else:
            delay = txn.give_up - txn.times[-1]
            txn.timer = self._clock.callLater(delay, self._timed_out, txn)

    def _timed_out(self, txn: _Transaction) -> None:
        txn.timer = None
        self._finish(txn)
        self.stats.timeouts += 1
        txn.deferred.errback(StunTimeout(txn.address, txn.sends, self._clock.seconds() - txn.started))

    def _cancel(self, txid: bytes) -> None:
        txn = self._pending.get(txid)
        if txn is not None:
            self._finish(txn)
            self.stats.cancelled += 1

    def _finish(self, txn: _Transaction) -> None:
        txid = txn.message.transaction_id
        self._pending.pop(txid, None)
        if txn.timer is not None and txn.timer.active():
            txn.timer.cancel()
        txn.timer = None
        self._recent[txid] = None
        while len(self._recent) > RECENT_TRANSACTIONS:
            self._recent.popitem(last=False)

    def failAll(self, reason: Failure | BaseException) -> None:
        for txn in list(self._pending.values()):
            self._finish(txn)
            txn.deferred.errback(reason)

    @property
    def pending(self) -> int:
        """How many transactions wait for an answer."""
        return len(self._pending)

    # ---------------------------------------------------------- receiving

    def handle(self, data: bytes, address: Address | None) -> bool:
        if not is_stun(data):
            return False
        try:
            message = decode(data)
        except StunDecodeError as e:
            self.stats.malformed += 1
            self.log.debug("dropping malformed STUN from {address}: {error}", address=address, error=e)
            return False
        if message.cls not in (MessageClass.SUCCESS, MessageClass.ERROR):
            self.stats.not_responses += 1
            return False
        txid = message.transaction_id
        txn = self._pending.get(txid)
        if txn is None or message.cookie != MAGIC_COOKIE or message.method != txn.message.method:
            if txn is None and txid in self._recent:
                self.stats.late += 1
                return True
            self.stats.unmatched += 1
            self.log.debug("dropping unmatched STUN response from {address}", address=address)
            return False
        self._finish(txn)
        if message.cls == MessageClass.ERROR:
            self.stats.error_responses += 1
            txn.deferred.errback(StunErrorResponse(message, address))
        else:
            self.stats.responses += 1
            txn.deferred.callback((message, address))
        return True


# --------------------------------------------------------------------- UDP


class StunUDPProtocol(DatagramProtocol):
    """
    A L{StunClient} on a UDP socket: it owns the socket in standalone use, or
    is the STUN child of a L{natbypass.punch.mux.UDPMux} which gives it the
    shared transport.  Datagrams the client does not take are logged and
    dropped.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        policy: RetransmitPolicy = RetransmitPolicy(),
        *,
        fingerprint: bool = True,
    ) -> None:
        self.client = StunClient(self._write, clock, policy, fingerprint=fingerprint)

    def _write(self, data: bytes, address: Address | None) -> None:
        if self.transport is None:
            raise OSError("the STUN socket is not open")
        self.transport.write(data, address)

    def request(self, message: Message, address: Address, policy: RetransmitPolicy | None = None) -> defer.Deferred:
        """See L{StunClient.request}."""
        return self.client.request(message, address, policy)

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        if not self.client.handle(data, addr):
            self.log.debug("ignoring a {size}-byte datagram from {addr}", size=len(data), addr=addr)

    def stopProtocol(self) -> None:
        self.client.failAll(Failure(ConnectionError("the STUN socket was closed")))


# --------------------------------------------------------------------- TCP


class StunStreamFramer(StreamFramer):
    """The client's framer: RFC 8489 messages only (see L{StreamFramer})."""

    def __init__(self) -> None:
        super().__init__(require_cookie=True)


class StunTCPProtocol(Protocol):
    """A L{StunClient} over one TCP connection (no retransmissions)."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        policy: RetransmitPolicy = RetransmitPolicy(),
        *,
        fingerprint: bool = True,
    ) -> None:
        self.client = StunClient(self._write, clock, policy, reliable=True, fingerprint=fingerprint)
        self._framer = StunStreamFramer()

    def _write(self, data: bytes, address: Address | None) -> None:
        if self.transport is None or not self.connected:
            raise OSError("the STUN connection is not open")
        self.transport.write(data)

    def request(self, message: Message, policy: RetransmitPolicy | None = None) -> defer.Deferred:
        """See L{StunClient.request}; the address is the connection's peer."""
        if not self.connected:
            return defer.fail(ConnectionError("the STUN connection is not open"))
        return self.client.request(message, None, policy)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._framer.feed(data)
        except StunFramingError as e:
            self.log.warn("closing a STUN connection that lost its framing: {error}", error=e)
            self.transport.abortConnection()
            return
        peer = self.transport.getPeer()
        for frame in frames:
            if not self.client.handle(frame, (peer.host, peer.port)):
                self.log.debug("ignoring a STUN message on the TCP connection")

    def connectionLost(self, reason: Failure) -> None:
        self.connected = 0
        self.client.failAll(reason)


def connect_tcp_from(
    reactor: IReactorTCP,
    remote: Address,
    local: Address | None = None,
    *,
    clock: IReactorTime | None = None,
    policy: RetransmitPolicy = RetransmitPolicy(),
    timeout: float = 10.0,
) -> defer.Deferred:
    """
    Open a TCP connection to C{remote} carrying a L{StunTCPProtocol}, from
    the local C{local} address (port 0: any port).  The socket gets
    SO_REUSEADDR and SO_REUSEPORT before it binds, so several connections
    (to several servers) and a later punch or listener can share the port,
    as long as each of them sets both options too.  Fires with the
    connected protocol.
    """
    host, port = remote
    if local is None:
        local = ("::" if ":" in host else "0.0.0.0", 0)
    endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    endpoint = endpoint_type(reactor, host, port, timeout=timeout, bindAddress=reusable_binding(local))
    return connectProtocol(endpoint, StunTCPProtocol(clock or reactor, policy))


@dataclass(frozen=True)
class TCPBinding:
    """The outcome of one Binding transaction over TCP."""

    local: Address
    mapped: Address | None
    other: Address | None
    origin: Address | None
    response: Message = field(repr=False)


@defer.inlineCallbacks
def tcp_binding(
    reactor: IReactorTCP,
    remote: Address,
    local: Address | None = None,
    *,
    clock: IReactorTime | None = None,
    policy: RetransmitPolicy = RetransmitPolicy(),
    timeout: float = 10.0,
    attributes: Iterable[StunAttribute] = (),
):
    """
    One Binding request over a fresh TCP connection from C{local} (with
    port reuse, see L{connect_tcp_from}); closes the connection and returns
    a L{TCPBinding}.  This is how the traversal learns the public address of
    the very port it will punch from.  We close first, so the same (local,
    server) pair is in TIME_WAIT for a while: to ask the same server again
    from the same port, keep a L{connect_tcp_from} connection open instead.
    """
    proto = yield connect_tcp_from(reactor, remote, local, clock=clock, policy=policy, timeout=timeout)
    try:
        host = proto.transport.getHost()
        response, _ = yield proto.request(binding_request(attributes))
    finally:
        proto.transport.loseConnection()
    return TCPBinding(
        (host.host, host.port),
        mapped_address(response),
        other_address(response),
        response_origin(response),
        response,
    )

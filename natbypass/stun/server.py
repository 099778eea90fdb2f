"""
The mediator's STUN responder: Binding over UDP and TCP (RFC 8489), NAT
behaviour discovery (RFC 5780) when a second address is configured, and
answers RFC 3489 clients the way they expect.

Layers, bottom up:

  - L{ResponderConfig} and L{BindingResponder}: pure.  Given a decoded
    request, its source and the local socket it arrived on, say what to send,
    from which local socket and to where (a L{Reply}), or nothing.
    L{BindingResponder.respond_datagram} adds a fast path for the common bare
    Binding request that builds the response from bytes precomputed with the
    codec (L{BindingResponder.fast_answer}: per socket, a function of the
    request and the source's raw sockaddr bytes); tests check it byte for
    byte against the codec path.
  - L{RateLimiter}: a token bucket per source (IPv6: per /64), in a
    fixed-size table indexed by a salted hash, on an injected clock.
  - L{STUNServer}: what all of the responder's sockets share (responder,
    counters, limiter, and the table of UDP sockets so that a CHANGE-REQUEST
    can be answered from another socket).
  - L{STUNDatagramProtocol} / L{STUNStreamProtocol}: thin; decode, delegate,
    send.  Malformed input is counted and dropped, never raised.
  - L{STUNPort}: the UDP port on a real reactor: Twisted's C{udp.Port}
    with C{SO_REUSEPORT} on request (worker processes share the ports,
    L{natbypass.stun.worker}) and a read loop that answers bare Bindings
    without a call per datagram into the protocol, reading and sending
    them in batches (C{recvmmsg}/C{sendmmsg}, L{natbypass.stun.batch})
    where Linux offers them (docs/performance.md).
  - L{STUNService}: opens the sockets in C{startService}.

Policy decisions, and why:

  - RESPONSE-ADDRESS (RFC 3489) is refused with 420: honouring it would let
    anyone aim our responses at a third party (reflection).
  - RESPONSE-PORT is honoured, but only towards the request's source IP, so
    it cannot be used to reflect traffic at another host.
  - PADDING (RFC 5780 7.6) asks for an MTU-sized response; we pad the response
    only up to the size of the request, so a small request never buys a large
    response.
  - UNKNOWN-ATTRIBUTES lists at most L{MAX_UNKNOWN_LISTED} types, so that a
    420 stays small whatever the request holds.
  - Requests for methods other than Binding (TURN's, say) get 400 Bad
    Request: a small answer that tells the client at once it asked the wrong
    server, where silence would cost it its whole retransmission schedule.
    Indications and responses are never answered, so two responders cannot
    be made to talk to each other in a loop.
  - Without a second address the responder is a plain RFC 8489 server: no
    OTHER-ADDRESS/RESPONSE-ORIGIN, and CHANGE-REQUEST with a flag set,
    RESPONSE-PORT and PADDING get 420 (RFC 5780 6: a server that cannot
    change address MUST answer CHANGE-REQUEST with 420).  A CHANGE-REQUEST
    with no flag set (sent by RFC 3489 clients in their first test) asks for
    nothing and is ignored.
  - Over TCP the source cannot change and responses cannot be redirected, so
    CHANGE-REQUEST with a flag set and RESPONSE-PORT get 400.
  - Behind a 1:1 NAT (a cloud VM), C{ResponderConfig.advertise} maps each
    local IP to the public one clients reach: responses name the public
    addresses, and a CHANGE-REQUEST is answered from the local socket that
    the NAT shows as the requested public address and port.

Abuse and load (all of it measured by tests/test_stun_abuse.py):

  - Rate limit on by default: L{DEFAULT_RATE} requests per second per
    source with bursts of L{DEFAULT_BURST}.  Generous on purpose: a
    carrier-grade NAT puts thousands of users behind one IPv4 address, and
    one NAT detection costs a client about twenty requests (more with
    retransmissions), so a few users starting at once must all pass.  Yet it
    caps what a spoofer can aim at one victim at about 50 x 192 bytes a
    second, and IPv6 sources are grouped by /64 (one host usually owns one).
  - The limiter cannot be filled: it is L{RATE_BUCKETS} token buckets
    indexed by a hash of the source salted with a secret drawn at start, so
    its memory never grows, a new source always finds a bucket, and a
    spoofer, who cannot compute the hash, can only drain buckets at random:
    a flood of F requests a second takes F / L{RATE_BUCKETS} tokens a second
    from each bucket, which refills at the rate, so locking genuine sources
    out takes F above L{RATE_BUCKETS} x rate (3.3 million a second at the
    default), more than twenty times what the responder answers on one core
    (docs/performance.md).  A source that shares a bucket with a heavy one
    shares its budget: the price of the fixed memory, small while active
    sources are far fewer than buckets.  (A table of sources that refuses
    new ones when full can be filled by a spoofer in a second; one that
    evicts old entries lets a spoofer reset the budget of the victim it
    reflects at.)
  - Amplification (response bytes / request bytes) of a 20-byte bare
    Binding: 4.8 over IPv4 and 7.2 over IPv6 with RFC 5780 and the default
    SOFTWARE; 3.0 and 3.6 as a plain server.  SOFTWARE is capped at
    L{MAX_SOFTWARE_BYTES} bytes (9.6 at most, RFC 5780 over IPv6).
    RESPONSE-ORIGIN, OTHER-ADDRESS and MAPPED-ADDRESS stay in every RFC
    5780 response even though they make most of its size: RFC 5780 has the
    server include RESPONSE-ORIGIN and OTHER-ADDRESS (section 6), the
    client learns that the server supports discovery from the OTHER-ADDRESS
    of a plain Binding response (section 4.2: its first test is a bare
    Binding, indistinguishable from any other), and MAPPED-ADDRESS next to
    XOR-MAPPED-ADDRESS is how clients detect address-rewriting ALGs
    (section 4.6).  Without a second address none of them is sent.
  - STUN over TCP: at most L{DEFAULT_TCP_PER_SOURCE} connections per source
    (IPv6: per /64) and a global cap kept well below the descriptor limit
    (L{tcp_connection_limit}).  A connection that has had no request
    answered for C{idle_timeout} seconds is aborted, not closed gracefully:
    a client that does not read cannot keep it open with unsent responses,
    and reading stops while responses wait (C{IPushProducer}), so it cannot
    make us buffer without bound either.  Rate-limited, malformed or ignored
    messages do not count as activity.  A new connection must get its first
    request answered within L{FIRST_REQUEST_TIMEOUT} (2 s), so holding a slot
    silently costs a reconnection every 2 s; and when the global cap is
    reached a newcomer evicts the oldest connection of the source holding
    the most slots (when that source holds more than the newcomer's would),
    so a few hundred addresses cannot lock everyone else out.
  - A global answer rate (L{DEFAULT_GLOBAL_RATE}) on top of the per-source
    one, and at most L{UDP_READ_BUDGET} bytes read from a UDP socket per
    reactor turn: the responder shares the reactor with signalling, and a
    flood from thousands of sources, each under its own limit, must not
    starve it.  Requests over the global rate are dropped and counted
    (C{rate_limited}, and C{rate_limited_global} of them).
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

from twisted.application.service import Service
from twisted.internet import udp
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import CannotListenError, MessageLengthError
from twisted.internet.interfaces import IPushProducer, IReactorTime, ISystemHandle
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from natbypass import __version__
from natbypass.address import is_wildcard
from natbypass.ratelimit import RateLimiter, TokenBucket, source_key
from natbypass.stun import batch
from natbypass.stun import message as m
from natbypass.stun.batch import DatagramBatch
from natbypass.stun.message import StreamFramer, StunDecodeError, StunFramingError

Address = tuple[str, int]

DEFAULT_SOFTWARE = f"NATbypass {__version__}"
#: SOFTWARE text is bounded so that every response stays small (at most
#: 9.6 times a bare Binding request, RFC 5780 over IPv6; see the module doc).
MAX_SOFTWARE_BYTES = 64
#: At most this many attribute types are listed in a 420's UNKNOWN-ATTRIBUTES.
MAX_UNKNOWN_LISTED = 16
#: The largest STUN message accepted on a TCP connection (header included).
MAX_STREAM_MESSAGE = 4096
#: Bound on any response but a PADDING one (which is bounded by the request):
#: header, four IPv6 address attributes, SOFTWARE and FINGERPRINT.
MAX_RESPONSE_SIZE = 20 + 4 * 24 + 4 + MAX_SOFTWARE_BYTES + 8
#: Most TCP connections open at once, over all STUN listeners (each costs a
#: file descriptor until it goes idle for C{idle_timeout}); more are refused.
#: The default is lower when the descriptor limit is (L{tcp_connection_limit}).
MAX_TCP_CONNECTIONS = 1000
#: Most STUN/TCP connections open at once from one source (IPv6: one /64).
#: A client needs one at a time (it closes it once answered); 8 leave room for
#: a few clients behind one NAT, and 1000 / 8 = 125 sources to fill the table
#: (which then evicts them, see L{STUNStreamFactory}).
DEFAULT_TCP_PER_SOURCE = 8
#: Seconds a new STUN/TCP connection has to get its first request answered
#: before it is cut: a client sends its request as soon as it is connected,
#: so only slot holders wait longer (then C{idle_timeout} applies).
FIRST_REQUEST_TIMEOUT = 2.0
#: Requests answered per second over all sources, UDP and TCP (0: no limit),
#: and the burst on top: what a flood from many sources, each under its own
#: limit, may take from the reactor that signalling shares (1000 NAT
#: detections a second; see docs/reliability.md for what it protects).
DEFAULT_GLOBAL_RATE = 20_000
#: Bytes read from one UDP socket per reactor turn (Twisted's C{maxThroughput},
#: 256 KiB by default: 13,000 bare Bindings, a stall of 100 ms and more for
#: every other connection of the reactor under a flood); about 100 bare
#: Bindings (1 ms of the reactor's time per socket and turn) or one full-size
#: datagram.
UDP_READ_BUDGET = 2048
#: Descriptors left to the rest of the process (listeners, signalling, logs)
#: before the STUN/TCP connections take at most half of the others.
FD_RESERVE = 64
#: Default rate limit: requests per second per source, and the burst allowed
#: on top (see the module doc for why these values).
DEFAULT_RATE = 50
DEFAULT_BURST = 200
#: Token buckets of the rate limiter (a power of two); 16 bytes each.
#: How many times port-0 configurations look for ports free on all sockets.
PORT_ATTEMPTS = 20

_ATTR_CHANGE_REQUEST = m.AttributeType.CHANGE_REQUEST
_ATTR_RESPONSE_ADDRESS = m.AttributeType.RESPONSE_ADDRESS
_ATTR_RESPONSE_PORT = m.AttributeType.RESPONSE_PORT
_ATTR_PADDING = m.AttributeType.PADDING


def _family(host: str) -> int:
    """socket.AF_INET or AF_INET6 of a literal address; ValueError otherwise."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except (OSError, ValueError):
            pass
    raise ValueError(f"not an IP address: {host!r}")


def tcp_connection_limit(descriptors: int, ceiling: int = MAX_TCP_CONNECTIONS) -> int:
    """
    How many STUN/TCP connections to allow at once under a limit of
    C{descriptors} open files (the soft C{RLIMIT_NOFILE}; negative: none):
    half of what is left after L{FD_RESERVE}, at most C{ceiling}, at least
    one.  The other half and the reserve stay for the rest of the mediator,
    so a flood of STUN connections cannot starve the signalling service of
    descriptors (or make accept() fail in a loop).
    """
    if descriptors < 0:
        return ceiling
    return max(1, min(ceiling, (descriptors - FD_RESERVE) // 2))


def descriptor_limit() -> int:
    """The soft limit on open files of this process (-1: none or unknown)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return -1
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return -1 if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True)
class ResponderConfig:
    """
    The responder's addresses.  C{primary} is (IP, port) of the main
    sockets; C{alternate}, when given, is (second IP, second port) and turns
    on RFC 5780: sockets on both IPs x both ports.
    """

    primary: Address
    alternate: Address | None = None
    software: str = DEFAULT_SOFTWARE
    #: (public IP, local IP) pairs: behind a 1:1 NAT (clouds), the public IP
    #: that the NAT maps onto each local one; responses name the public IP in
    #: RESPONSE-ORIGIN, OTHER-ADDRESS (and RFC 3489's SOURCE-ADDRESS,
    #: CHANGED-ADDRESS), since that is what clients see and can reach.
    #: Ports are the same on both sides of a 1:1 NAT.
    advertise: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        host, port = self.primary
        family = _family(host)
        if len(self.software.encode("utf-8")) > MAX_SOFTWARE_BYTES:
            raise ValueError(f"SOFTWARE text longer than {MAX_SOFTWARE_BYTES} bytes")
        self._check_advertise(family)
        if self.alternate is None:
            return
        alt_host, alt_port = self.alternate
        if _family(alt_host) != family:
            raise ValueError("the alternate address must be of the same IP family as the primary")
        if is_wildcard(host) or is_wildcard(alt_host):
            raise ValueError("RFC 5780 needs specific addresses (a wildcard cannot say which IP answered)")
        if alt_host == host:
            raise ValueError("the alternate IP must differ from the primary IP")
        if alt_port == port and port != 0:  # 0 and 0: both picked at bind time
            raise ValueError("the alternate port must differ from the primary port")

    def _check_advertise(self, family: int) -> None:
        ips = {self.primary[0]} | ({self.alternate[0]} if self.alternate is not None else set())
        publics: set[str] = set()
        locals_: set[str] = set()
        for public, local in self.advertise:
            if _family(public) != family or _family(local) != family:
                raise ValueError(f"advertised {public}={local}: both must be of the responder's IP family")
            if is_wildcard(public) or is_wildcard(local):
                raise ValueError(f"advertised {public}={local}: a wildcard address cannot be advertised")
            if local not in ips:
                listed = " or ".join(sorted(ips))
                raise ValueError(
                    f"advertised {public}={local}: {local} is not an address the responder binds ({listed})"
                )
            if public in publics or local in locals_:
                raise ValueError(f"advertised {public}={local}: each public and each local IP may appear once")
            publics.add(public)
            locals_.add(local)

    def public(self, address: Address) -> Address:
        """How clients see the local C{address}: its advertised public IP (L{advertise}), same port."""
        for public, local in self.advertise:
            if local == address[0]:
                return (public, address[1])
        return address

    @property
    def rfc5780(self) -> bool:
        """True when there is a second address: NAT behaviour discovery works."""
        return self.alternate is not None

    def addresses(self) -> tuple[Address, ...]:
        """Every local (IP, port) the responder listens on, primary first."""
        if self.alternate is None:
            return (self.primary,)
        (ip_a, port_a), (ip_b, port_b) = self.primary, self.alternate
        return ((ip_a, port_a), (ip_a, port_b), (ip_b, port_a), (ip_b, port_b))

    def changed(self, local: Address, change_ip: bool, change_port: bool) -> Address | None:
        """
        The local address that answers a request received on C{local} with
        these CHANGE-REQUEST flags (RFC 5780 6.1 table 1); None when there is
        no such socket.
        """
        if self.alternate is None or local not in self.addresses():
            return None
        ips = (self.primary[0], self.alternate[0])
        ports = (self.primary[1], self.alternate[1])
        host, port = local
        if change_ip:
            host = ips[1] if host == ips[0] else ips[0]
        if change_port:
            port = ports[1] if port == ports[0] else ports[0]
        return (host, port)

    def other(self, local: Address) -> Address | None:
        """OTHER-ADDRESS / CHANGED-ADDRESS for C{local}: the other IP and port."""
        return self.changed(local, True, True)


class Reply(NamedTuple):
    """Bytes to send, the local address to send them from, and where to."""

    data: bytes
    origin: Address
    destination: Address


def _attribute_bytes(attr: m.Attribute) -> bytes:
    """One attribute as the codec encodes it (type, length, value, padding)."""
    return m.Message(m.Method.BINDING, m.MessageClass.SUCCESS, bytes(12), (attr,)).encode()[m.HEADER_SIZE :]


# Fast path: a bare or FINGERPRINT-only Binding request from an IPv4 source.
# The response is one struct.pack of header, XOR-MAPPED-ADDRESS, (RFC 5780:
# MAPPED-ADDRESS) and the precomputed tail, then FINGERPRINT; the attribute
# order is the codec path's, and the tests compare the bytes.  The source
# comes as the 6 bytes of port and IPv4 address in network order (what a
# sockaddr_in holds from its third byte): MAPPED-ADDRESS is those bytes.
_BARE_BINDING = b"\x00\x01\x00\x00" + m.MAGIC_COOKIE_BYTES
_FINGERPRINTED_BINDING = b"\x00\x01\x00\x08" + m.MAGIC_COOKIE_BYTES
_FINGERPRINT_HEAD = struct.pack("!HH", m.AttributeType.FINGERPRINT, 4)
_XMA_HEAD = struct.pack("!HHBB", m.AttributeType.XOR_MAPPED_ADDRESS, 8, 0, 1)
_MA_HEAD = struct.pack("!HHBB", m.AttributeType.MAPPED_ADDRESS, 8, 0, 1)
_FP_TYPE = int(m.AttributeType.FINGERPRINT)
_SUCCESS_TYPE = m.message_type(m.Method.BINDING, m.MessageClass.SUCCESS)

#: (request, raw source) -> response bytes, or None when the fast path does not apply.
FastAnswer = Callable[[bytes, bytes], "bytes | None"]


def raw_source(source: Address) -> bytes | None:
    """An IPv4 (host, port) as the fast path takes it: port and address in network order; None if not IPv4."""
    host, port = source
    try:
        return port.to_bytes(2, "big") + socket.inet_aton(host)
    except (OSError, OverflowError, TypeError):
        return None


def _fast_answer(head: bytes, tail: bytes, mapped: bool) -> FastAnswer:
    """
    The fast path of one local socket: C{head} is the response's type and
    length, C{tail} the attributes that depend only on the socket, and
    C{mapped} whether MAPPED-ADDRESS follows XOR-MAPPED-ADDRESS (RFC 5780).
    Everything it uses is bound here, so a call costs no global or
    attribute look-up (about 1.2 us on the machine of docs/performance.md).
    """
    if mapped:
        pack = struct.Struct(f"!4s16s6sHI6s6s{len(tail)}s").pack
    else:
        pack = struct.Struct(f"!4s16s6sHI{len(tail)}s").pack
    bare, fingerprinted, fp_head = _BARE_BINDING, _FINGERPRINTED_BINDING, _FINGERPRINT_HEAD
    xma_head, ma_head, fp_type, fp_xor = _XMA_HEAD, _MA_HEAD, _FP_TYPE, m.FINGERPRINT_XOR
    cookie, cookie_port = m.MAGIC_COOKIE, m.MAGIC_COOKIE >> 16
    fp_pack = struct.Struct("!HHI").pack
    u32 = struct.Struct("!I").unpack_from
    port_and_ip = struct.Struct("!HI").unpack
    crc32 = zlib.crc32

    def answer(data: bytes, raw: bytes) -> bytes | None:
        size = len(data)
        if size == 28:
            if data[:8] != fingerprinted or data[20:24] != fp_head or u32(data, 24)[0] != crc32(data[:20]) ^ fp_xor:
                return None
        elif size != 20 or data[:8] != bare:
            return None
        port, ip = port_and_ip(raw)
        if not port:
            return None
        if mapped:
            prefix = pack(head, data[4:20], xma_head, port ^ cookie_port, ip ^ cookie, ma_head, raw, tail)
        else:
            prefix = pack(head, data[4:20], xma_head, port ^ cookie_port, ip ^ cookie, tail)
        return prefix + fp_pack(fp_type, 4, crc32(prefix) ^ fp_xor)

    return answer


class BindingResponder:
    """
    Pure Binding logic.  No I/O, no clock: the same request, source and
    local address always give the same reply.
    """

    def __init__(self, config: ResponderConfig) -> None:
        self.config = config
        self._software = _attribute_bytes(m.Software(config.software)) if config.software else b""
        # Fast path: per local address, the function that answers from
        # header + mapped addresses + the constant tail (RESPONSE-ORIGIN,
        # OTHER-ADDRESS, SOFTWARE of an answer sent from that same address).
        self._fast: dict[Address, FastAnswer] = {}
        for local in config.addresses():
            if _family(local[0]) != socket.AF_INET:
                continue
            if config.rfc5780:
                other = config.other(local)
                assert other is not None
                tail = (
                    _attribute_bytes(m.ResponseOrigin(*config.public(local)))
                    + _attribute_bytes(m.OtherAddress(*config.public(other)))
                    + self._software
                )
                size = 20 + 2 * 12 + len(tail) + 8
            else:
                tail = self._software
                size = 20 + 12 + len(tail) + 8
            head = struct.pack("!HH", _SUCCESS_TYPE, size - m.HEADER_SIZE)
            self._fast[local] = _fast_answer(head, tail, config.rfc5780)

    # ---------------------------------------------------------------- fast

    def fast_answer(self, local: Address) -> FastAnswer | None:
        """
        The fast path of requests received on C{local}: a function of the
        request and its L{raw_source} that gives the response to a bare or
        FINGERPRINT-only Binding request from an IPv4 source, None for
        anything else (which L{respond_datagram} then handles).  None when
        C{local} has no fast path (IPv6).
        """
        return self._fast.get(local)

    def fast_response(self, data: bytes, source: Address, local: Address) -> bytes | None:
        """L{fast_answer} for one datagram from C{source} (host, port) received on C{local}."""
        answer = self._fast.get(local)
        raw = raw_source(source) if answer is not None else None
        return answer(data, raw) if raw is not None else None

    def respond_datagram(self, data: bytes, source: Address, local: Address) -> Reply | None:
        """
        Answer one datagram received on C{local} from C{source}.  Raises
        L{StunDecodeError} (only) when it is not a well-formed STUN message.
        """
        fast = self.fast_response(data, source, local)
        if fast is not None:
            return Reply(fast, local, source)
        return self.respond(m.decode(data), source, local)

    # ----------------------------------------------------------- codec path

    def respond(self, request: m.Message, source: Address, local: Address, *, stream: bool = False) -> Reply | None:
        """
        The reply to a decoded message received on C{local} from C{source}
        (over TCP when C{stream}), or None when nothing is to be sent.
        """
        if request.cls != m.MessageClass.REQUEST or source[1] == 0:
            return None
        if request.method != m.Method.BINDING:
            return self._error(request, source, local, 400, "Only Binding is served here")
        config = self.config
        unknown = list(request.unknown_required())
        if request.get(m.ResponseAddress) is not None:
            unknown.append(_ATTR_RESPONSE_ADDRESS)
        change = request.get(m.ChangeRequest)
        wants_change = change is not None and (change.change_ip or change.change_port)
        response_port = request.get(m.ResponsePort)
        padding = request.get(m.Padding)
        if not config.rfc5780:
            if wants_change:
                unknown.append(_ATTR_CHANGE_REQUEST)
            if response_port is not None:
                unknown.append(_ATTR_RESPONSE_PORT)
            if padding is not None:
                unknown.append(_ATTR_PADDING)
        if unknown:
            return self._error(request, source, local, 420, "Unknown Attribute", unknown)
        if stream and (wants_change or response_port is not None):
            return self._error(request, source, local, 400, "CHANGE-REQUEST and RESPONSE-PORT need UDP")
        if response_port is not None and (padding is not None or response_port.port == 0):
            return self._error(request, source, local, 400, "Bad RESPONSE-PORT")

        origin = local
        if wants_change:
            assert change is not None
            changed = config.changed(local, change.change_ip, change.change_port)
            if changed is None:
                return self._error(request, source, local, 420, "Unknown Attribute",
                                   [_ATTR_CHANGE_REQUEST])  # fmt: skip
            origin = changed
        destination = source if response_port is None else (source[0], response_port.port)
        other = config.other(local)
        if other is not None:
            other = config.public(other)
        advertised_origin = config.public(origin)
        host, port = source

        attrs: list[m.Attribute]
        if request.is_rfc3489:
            attrs = [m.MappedAddress(host, port)]
            if not is_wildcard(origin[0]):
                attrs.append(m.SourceAddress(*advertised_origin))
            if other is not None:
                attrs.append(m.ChangedAddress(*other))
        else:
            attrs = [m.XorMappedAddress(host, port)]
            if other is not None:
                attrs += [m.MappedAddress(host, port), m.ResponseOrigin(*advertised_origin),
                          m.OtherAddress(*other)]  # fmt: skip
            if config.software:
                attrs.append(m.Software(config.software))
        response = request.reply(m.MessageClass.SUCCESS, attrs)
        fingerprint = not request.is_rfc3489
        data = response.encode(fingerprint=fingerprint)
        if padding is not None and not stream:
            # Pad up to the request's size and no further (see module doc).
            size = len(request.raw or b"") - len(data) - 4
            response = request.reply(m.MessageClass.SUCCESS, attrs + [m.Padding(max(0, size - size % 4))])
            data = response.encode(fingerprint=fingerprint)
        return Reply(data, origin, destination)

    def _error(
        self,
        request: m.Message,
        source: Address,
        local: Address,
        code: int,
        reason: str,
        unknown: list[int] | None = None,
    ) -> Reply:
        attrs: list[m.Attribute] = [m.ErrorCode(code, reason)]
        if unknown:
            listed = tuple(dict.fromkeys(unknown))[:MAX_UNKNOWN_LISTED]
            if request.is_rfc3489 and len(listed) % 2:
                # RFC 3489 11.2.5: repeat one so the list fills 32-bit words.
                listed += listed[-1:]
            attrs.append(m.UnknownAttributes(listed))
        if not request.is_rfc3489 and self.config.software:
            attrs.append(m.Software(self.config.software))
        data = request.reply(m.MessageClass.ERROR, attrs).encode(fingerprint=not request.is_rfc3489)
        return Reply(data, local, source)


# ------------------------------------------------------------------- sockets


@dataclass
class Counters:
    """
    What the responder has done since it started, as plain integers:
    L{snapshot} is what logs and the metrics layer read.  Every field is a
    counter (it only grows) but C{tcp_connections}, a gauge.
    """

    #: STUN messages received (UDP datagrams and TCP frames), whatever they held.
    received: int = 0
    #: Responses sent (success and error).
    answered: int = 0
    #: Messages that were not well-formed STUN (and TCP framing errors).
    malformed: int = 0
    #: Messages dropped because their source was over its rate limit, or all sources over the global one.
    rate_limited: int = 0
    #: Of those, the ones dropped by the global limit (C{--stun-global-rate}).
    rate_limited_global: int = 0
    #: Well-formed messages that call for no answer (indications, responses).
    ignored: int = 0
    #: Responses the socket would not send.
    send_failed: int = 0
    #: TCP connections refused: the global or the per-source cap was reached.
    tcp_refused: int = 0
    #: TCP connections aborted after C{idle_timeout} with no request answered.
    tcp_idle_closed: int = 0
    #: Of those, the ones that never had a request answered (cut L{FIRST_REQUEST_TIMEOUT} after connecting).
    tcp_silent_closed: int = 0
    #: TCP connections aborted to make room for a newcomer at the global cap (the source held the most).
    tcp_evicted: int = 0
    #: TCP connections open now (a gauge).
    tcp_connections: int = 0
    #: Requests on which the responder itself failed (a bug, logged with its traceback).
    errors: int = 0

    def snapshot(self) -> dict[str, int]:
        """Every field by name: a new plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class STUNServer:
    """
    What all of the responder's sockets share: the responder, the counters,
    the optional rate limiter, and the UDP sockets by local address (a
    CHANGE-REQUEST is answered from another socket's transport).

    C{responder} may be set after the sockets are open (port 0: the
    addresses are only known then); until it is, nothing is answered.
    """

    def __init__(
        self,
        responder: BindingResponder | None = None,
        *,
        counters: Counters | None = None,
        limiter: RateLimiter | None = None,
        global_limiter: TokenBucket | None = None,
    ) -> None:
        self.responder = responder
        self.counters = counters if counters is not None else Counters()
        self.limiter = limiter
        #: All sources together (None: no global limit).
        self.global_limiter = global_limiter
        self.sockets: dict[Address, STUNDatagramProtocol] = {}

    def admit(self, host: str) -> bool:
        """Within both the per-source and the global rate?  Counts the refusals."""
        if self.limiter is not None and not self.limiter.allow(host):
            self.counters.rate_limited += 1
            return False
        if self.global_limiter is not None and not self.global_limiter.take():
            self.counters.rate_limited += 1
            self.counters.rate_limited_global += 1
            return False
        return True

    def send(self, reply: Reply) -> bool:
        """Send C{reply} from the UDP socket of C{reply.origin}."""
        sender = self.sockets.get(reply.origin)
        if sender is None or not sender.sendDatagram(reply.data, reply.destination):
            self.counters.send_failed += 1
            return False
        self.counters.answered += 1
        return True


class STUNDatagramProtocol(DatagramProtocol):
    """One UDP socket of the responder: decode, delegate, send."""

    log = Logger()
    noisy = False  # STUNService logs the addresses once

    def __init__(self, server: STUNServer) -> None:
        self.server = server
        self.local: Address | None = None
        self._sendto: Callable[[bytes, Address], object] | None = None

    def startProtocol(self) -> None:
        host = self.transport.getHost()
        self.local = (host.host, host.port)
        self.server.sockets[self.local] = self
        # Send with the socket's own sendto when the transport offers it
        # (ISystemHandle, a public interface of udp.Port): Port.write checks
        # the address three times per datagram, which is 15% of the
        # responder's time (docs/performance.md), and our destinations are
        # always the addresses recvfrom gave us.
        handle = ISystemHandle(self.transport, None)
        self._sendto = handle.getHandle().sendto if handle is not None else self.transport.write

    def stopProtocol(self) -> None:
        if self.local is not None and self.server.sockets.get(self.local) is self:
            del self.server.sockets[self.local]
        self._sendto = None

    def sendDatagram(self, data: bytes, destination: Address) -> bool:
        """Send from this socket; False (never an exception) when it fails."""
        if self._sendto is None:
            return False
        try:
            self._sendto(data, destination)
        except (OSError, MessageLengthError):
            return False
        return True

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        server = self.server
        counters = server.counters
        counters.received += 1
        limiter = server.limiter
        if limiter is not None and not limiter.allow(addr[0]):
            counters.rate_limited += 1
            return
        glob = server.global_limiter
        if glob is not None and not glob.take():
            counters.rate_limited += 1
            counters.rate_limited_global += 1
            return
        self.answer(data, addr)

    def answer(self, data: bytes, addr: Address) -> None:
        """Answer one admitted datagram (counted as received and within the rate limits)."""
        server = self.server
        counters = server.counters
        responder = server.responder
        local = self.local
        if responder is None or local is None:
            counters.ignored += 1
            return
        try:
            fast = responder.fast_response(data, addr, local)
            if fast is not None:
                # The common case, kept short: answer from this very socket.
                try:
                    self._sendto(fast, addr)  # type: ignore[misc]
                except (OSError, MessageLengthError):
                    counters.send_failed += 1
                else:
                    counters.answered += 1
                return
            reply = responder.respond(m.decode(data), addr, local)
        except StunDecodeError:
            counters.malformed += 1
            return
        except Exception:  # a bug must not take the socket down: log it, count it, go on
            counters.errors += 1
            self.log.failure("STUN responder failed on a datagram from {source}", source=addr)
            return
        if reply is None:
            counters.ignored += 1
        else:
            server.send(reply)


@implementer(IPushProducer)
class STUNStreamProtocol(Protocol):
    """
    STUN over one TCP connection (RFC 8489 framing: each message is
    self-delimiting through its length field).  A framing error closes the
    connection, since the stream cannot be resynchronised; a well-framed but
    malformed message is counted and skipped.

    A new connection that has had no request answered within
    C{first_timeout} seconds, or a later one for C{idle_timeout} seconds, is
    aborted (whatever responses are still unsent: a client that does not
    read must not keep it open).  The protocol is its transport's producer:
    when responses pile up unsent, it stops reading requests until they
    drain.
    """

    log = Logger()

    def __init__(
        self,
        server: STUNServer,
        clock: IReactorTime,
        idle_timeout: float,
        first_timeout: float | None = None,
    ) -> None:
        self.server = server
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._first_timeout = idle_timeout if first_timeout is None else min(first_timeout, idle_timeout)
        self._framer = StreamFramer(require_cookie=False, max_size=MAX_STREAM_MESSAGE)
        self._timer = None
        self._open = False
        #: No request answered yet.
        self._silent = True
        #: The L{source_key} this connection counts under (set by the factory).
        self.source: str | None = None
        self.local: Address | None = None
        self.peer: Address | None = None

    def connectionMade(self) -> None:
        self._open = True
        self.server.counters.tcp_connections += 1
        if self.factory is not None:
            self.factory.track(self)
        host, peer = self.transport.getHost(), self.transport.getPeer()
        self.local, self.peer = (host.host, host.port), (peer.host, peer.port)
        self.transport.registerProducer(self, True)
        self._timer = self._clock.callLater(self._first_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self.server.counters.tcp_idle_closed += 1
        if self._silent:
            self.server.counters.tcp_silent_closed += 1
        self.log.debug("aborting idle STUN/TCP connection from {peer}", peer=self.peer)
        self.transport.abortConnection()

    def evict(self) -> None:
        """
        Make room for another connection: forget this one now (the slot is
        free at once) and abort it (the transport reports the loss later).
        """
        self.server.counters.tcp_evicted += 1
        self._forget()
        self.log.debug("evicting STUN/TCP connection from {peer}", peer=self.peer)
        self.transport.abortConnection()

    def _forget(self) -> None:
        if self._open:
            self._open = False
            self.server.counters.tcp_connections -= 1
            if self.factory is not None:
                self.factory.untrack(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: object = None) -> None:
        self._forget()

    # IPushProducer: the transport says when its write buffer is full.

    def pauseProducing(self) -> None:
        """Responses wait unsent: stop reading requests."""
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Responses drained: read requests again."""
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The connection is going away; C{connectionLost} cleans up."""

    def dataReceived(self, data: bytes) -> None:
        if not self._open:
            return  # evicted: its transport is going away
        try:
            for frame in self._framer.frames(data):
                self._message(frame)
        except StunFramingError:
            self.server.counters.malformed += 1
            self.transport.loseConnection()

    def _message(self, frame: bytes) -> None:
        server = self.server
        counters = server.counters
        counters.received += 1
        assert self.peer is not None and self.local is not None
        if not server.admit(self.peer[0]):
            return
        if server.responder is None:
            counters.ignored += 1
            return
        try:
            reply = server.responder.respond(m.decode(frame), self.peer, self.local, stream=True)
        except StunDecodeError:
            counters.malformed += 1
            return
        except Exception:  # as for datagrams: one bad request must not end the connection
            counters.errors += 1
            self.log.failure("STUN responder failed on a message from {peer}", peer=self.peer)
            return
        if reply is None:
            counters.ignored += 1
            return
        self.transport.write(reply.data)
        counters.answered += 1
        # Only an answered request is activity: junk, indications and
        # requests over the rate limit do not keep the connection open.
        self._silent = False
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)


class STUNStreamFactory(Factory):
    """
    Makes a L{STUNStreamProtocol} per TCP connection, at most
    C{max_connections} at once and C{per_source} from one source
    (L{source_key}: IPv6 by /64).  Past the per-source cap a connection is
    refused.  At the global cap a newcomer evicts the oldest connection of
    the source that holds the most, as long as that source holds more than
    the newcomer's source would with it; otherwise it is refused.  So
    whoever fills the table loses its own slots first, and a source with
    few connections always gets one.  (Refusing means C{buildProtocol}
    returns None: Twisted closes the socket, no protocol is made.)
    """

    noisy = False
    log = Logger()

    def __init__(
        self,
        server: STUNServer,
        clock: IReactorTime,
        idle_timeout: float = 30.0,
        max_connections: int = MAX_TCP_CONNECTIONS,
        per_source: int = DEFAULT_TCP_PER_SOURCE,
        first_timeout: float = FIRST_REQUEST_TIMEOUT,
    ) -> None:
        self.server = server
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.first_timeout = first_timeout
        self.max_connections = max_connections
        self.per_source = per_source
        self.connections: set[STUNStreamProtocol] = set()
        #: Open connections by source key, oldest first.
        self._by_source: dict[str, dict[STUNStreamProtocol, None]] = {}
        #: Source keys by how many connections they hold (1 .. per_source), to find the biggest at once.
        self._by_count: dict[int, dict[str, None]] = {}

    def open_from(self, host: str) -> int:
        """How many connections are open from C{host}'s source (L{source_key})."""
        return len(self._by_source.get(source_key(host), ()))

    def buildProtocol(self, addr: object) -> STUNStreamProtocol | None:
        """A protocol, or None (Twisted then closes the socket) when full."""
        host = getattr(addr, "host", "")
        held = self.open_from(host)
        if held >= self.per_source or (len(self.connections) >= self.max_connections and not self._evict_for(held)):
            self.server.counters.tcp_refused += 1
            self.log.debug("refusing STUN/TCP connection from {host}: full", host=host)
            return None
        proto = STUNStreamProtocol(self.server, self.clock, self.idle_timeout, self.first_timeout)
        proto.factory = self
        return proto

    def _evict_for(self, held: int) -> bool:
        """Evict the oldest connection of the biggest source if it holds more than C{held} + 1; done?"""
        for count in range(max(self._by_count, default=0), held + 1, -1):
            sources = self._by_count.get(count)
            if sources:
                victim = next(iter(self._by_source[next(iter(sources))]))
                victim.evict()
                return True
        return False

    def _recount(self, key: str, before: int, after: int) -> None:
        if before:
            sources = self._by_count[before]
            del sources[key]
            if not sources:
                del self._by_count[before]
        if after:
            self._by_count.setdefault(after, {})[key] = None

    def track(self, proto: STUNStreamProtocol) -> None:
        """Count an open connection (called by the protocol)."""
        self.connections.add(proto)
        key = source_key(proto.transport.getPeer().host)
        proto.source = key
        mine = self._by_source.setdefault(key, {})
        mine[proto] = None
        self._recount(key, len(mine) - 1, len(mine))

    def untrack(self, proto: STUNStreamProtocol) -> None:
        """Forget a closed connection (called by the protocol)."""
        self.connections.discard(proto)
        key = proto.source
        mine = self._by_source.get(key) if key is not None else None
        if mine is None or proto not in mine:
            return
        del mine[proto]
        self._recount(key, len(mine) + 1, len(mine))
        if not mine:
            del self._by_source[key]


# ------------------------------------------------------------------- service


class STUNPort(udp.Port):
    """
    A UDP port of the responder on a file-descriptor reactor (epoll, poll,
    select): Twisted's C{udp.Port} with three changes.

      - C{reusePort}: the socket is bound with C{SO_REUSEPORT}, so that
        other processes (L{natbypass.stun.worker}) can bind the same address
        and the kernel spreads the flows among them: it hashes each
        datagram's 4-tuple onto one of the sockets, so one source port
        always reaches the same process.
      - C{doRead} answers bare Binding requests (the fast path,
        L{BindingResponder.fast_answer}) in its own loop, with everything it
        needs in local variables and the counters added once per read:
        C{udp.Port.doRead} calls C{datagramReceived} per datagram, which
        looks up the counters, limiters and responder again each time
        (measured in docs/performance.md).  Everything else goes to the
        protocol (L{STUNDatagramProtocol.answer}).  The read budget
        (C{maxThroughput}), the rate limits and the counters are the
        protocol's.
      - C{batchIO}: on an IPv4 socket where Linux's C{recvmmsg}/C{sendmmsg}
        can be called (L{natbypass.stun.batch}), the loop reads up to
        L{batch.SLOTS} datagrams per system call and sends the fast path's
        responses the same way; a batch that does not fill every slot ends
        the read (the socket was empty), which saves the C{recvfrom} that
        would only have said so.  The read budget is checked per batch.
    """

    reusePort = False
    #: Use recvmmsg/sendmmsg where available (False: one recvfrom/sendto per datagram).
    batchIO = True
    _batch: DatagramBatch | None = None

    @property
    def vectors(self) -> DatagramBatch | None:
        """The batch vectors while this port reads and sends in batches, else None."""
        return self._batch

    def createInternetSocket(self) -> socket.socket:
        skt = super().createInternetSocket()
        if self.reusePort:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt

    def _bindSocket(self) -> None:
        super()._bindSocket()
        if self.batchIO and self.addressFamily == socket.AF_INET and batch.available():
            self._batch = DatagramBatch(self.socket.fileno())

    def connectionLost(self, reason: object = None) -> None:
        vectors, self._batch = self._batch, None
        super().connectionLost(reason)
        if vectors is not None:
            vectors.close()

    def doRead(self) -> None:
        protocol = self.protocol
        server = protocol.server
        responder = server.responder
        local = protocol.local
        fast = responder.fast_answer(local) if responder is not None and local is not None else None
        if fast is None or self.addressFamily != socket.AF_INET:
            return super().doRead()
        limits = _Limits(server, self.reactor.seconds)
        try:
            if self._batch is not None:
                self._read_batches(self._batch, fast, protocol.answer, limits)
            else:
                self._read_each(fast, protocol.answer, limits)
        finally:
            counters = server.counters
            counters.received += limits.received
            counters.answered += limits.answered
            counters.rate_limited += limits.limited
            counters.rate_limited_global += limits.limited_global
            counters.send_failed += limits.failed

    def _read_each(self, fast: FastAnswer, answer: Callable[[bytes, Address], None], limits: _Limits) -> None:
        """One recvfrom and one sendto per datagram."""
        recvfrom, sendto = self.socket.recvfrom, self.socket.sendto
        size, budget = self.maxPacketSize, self.maxThroughput
        admit = limits.admit
        now = limits.seconds() if admit is not None else 0.0
        read = received = answered = limited = limited_global = failed = 0
        try:
            while read < budget:
                try:
                    data, addr = recvfrom(size)
                except (BlockingIOError, InterruptedError, ConnectionRefusedError):
                    return
                read += len(data)
                received += 1
                raw = raw_source(addr)
                if raw is None:  # recvfrom on an AF_INET socket gives IPv4 sources only
                    continue
                refused = admit(raw[2:], now) if admit is not None else 0
                if refused:
                    limited += 1
                    limited_global += refused - 1
                    continue
                try:
                    reply = fast(data, raw)
                except Exception:
                    reply = None  # the protocol's path logs and counts what went wrong
                if reply is None:
                    answer(data, addr)
                    continue
                try:
                    sendto(reply, addr)
                except OSError:
                    failed += 1
                else:
                    answered += 1
        finally:
            limits.add(received, answered, limited, limited_global, failed)

    def _read_batches(self, vectors: DatagramBatch, fast: FastAnswer, answer: Callable[[bytes, Address], None],
                      limits: _Limits) -> None:  # fmt: skip
        """One recvmmsg per L{batch.SLOTS} datagrams, one sendmmsg for their fast-path responses."""
        receive, send, move_name = vectors.receive, vectors.send, vectors.move_name
        memory, slots, lengths, send_lengths = vectors.memory, vectors.slots, vectors.lengths, vectors.send_lengths
        received_slots, send_slots = vectors.received_slots, vectors.send_slots
        admit, seconds = limits.admit, limits.seconds
        ntoa, budget, now = socket.inet_ntoa, self.maxThroughput, 0.0
        read = received = answered = limited = limited_global = failed = 0
        try:
            while read < budget:
                try:
                    got = receive()
                except ConnectionRefusedError:
                    return
                if not got:
                    return
                received += got
                if admit is not None:
                    now = seconds()  # once per batch: its datagrams arrived within microseconds
                queued = 0
                for i, length_at, source_from, source_to, data_from in received_slots[:got]:
                    size = lengths[length_at]
                    read += size
                    raw = memory[source_from:source_to]
                    if admit is not None:
                        refused = admit(raw[2:], now)
                        if refused:
                            limited += 1
                            limited_global += refused - 1
                            continue
                    data = memory[data_from : data_from + size]
                    try:
                        reply = fast(data, raw)
                    except Exception:
                        reply = None  # the protocol's path logs and counts what went wrong
                    if reply is None:
                        answer(data, (ntoa(raw[2:]), (raw[0] << 8) | raw[1]))
                        continue
                    at, length_at = send_slots[queued]
                    size = len(reply)
                    memory[at : at + size] = reply
                    send_lengths[length_at] = size
                    if queued != i:
                        move_name(i, queued)
                    queued += 1
                if queued:
                    refused = send(queued)
                    failed += refused
                    answered += queued - refused
                if got < slots:
                    return
        finally:
            limits.add(received, answered, limited, limited_global, failed)


class _Limits:
    """
    What one C{STUNPort.doRead} needs of the rate limits and what it
    counts.  C{admit(key, now)} (None when both limits are off) applies the
    per-source limiter (L{RateLimiter.allow_key}, on the packed IPv4
    source) and then the global bucket, at C{now} (C{seconds()}, read once
    per batch): 0 admitted, 1 over the source's limit, 2 over the global one.
    """

    __slots__ = ("admit", "seconds", "received", "answered", "limited", "limited_global", "failed")

    def __init__(self, server: STUNServer, seconds: Callable[[], float]) -> None:
        allow = server.limiter.allow_key if server.limiter is not None else None
        take = server.global_limiter.take if server.global_limiter is not None else None

        def admit(key: bytes, now: float) -> int:
            if allow is not None and not allow(key, now):
                return 1
            if take is not None and not take(1.0, now):
                return 2
            return 0

        self.admit: Callable[[bytes, float], int] | None = admit if allow is not None or take is not None else None
        self.seconds = seconds
        self.received = self.answered = self.limited = self.limited_global = self.failed = 0

    def add(self, received: int, answered: int, limited: int, limited_global: int, failed: int) -> None:
        self.received += received
        self.answered += answered
        self.limited += limited
        self.limited_global += limited_global
        self.failed += failed


def _listen_udp(reactor, host: str, port: int, protocol: DatagramProtocol, reuse_port: bool, batch_io: bool = True):
    """
    A L{STUNPort} on C{reactor} when it is one of Twisted's POSIX reactors
    (epoll, poll, select: what C{listenUDP} itself makes a C{udp.Port} on),
    else (an in-memory test reactor) C{listenUDP}, which cannot share ports.
    C{batch_io}: L{STUNPort.batchIO}.
    """
    if not isinstance(reactor, PosixReactorBase):
        if reuse_port:
            raise CannotListenError(host, port, OSError("SO_REUSEPORT needs a file-descriptor reactor"))
        return reactor.listenUDP(port, protocol, interface=host, maxPacketSize=65535)
    listening = STUNPort(port, protocol, host, 65535, reactor)
    listening.reusePort = reuse_port
    listening.batchIO = batch_io
    listening.startListening()
    return listening


class STUNService(Service):
    """
    Opens the responder's sockets when started: UDP and (unless C{tcp} is
    false) TCP on C{primary}, and with C{alternate} on all four combinations
    of the two IPs and two ports (RFC 5780).  Port 0 in either address picks
    free ports (tests); the chosen ports are then in L{config}.

    UDP has no endpoint type, and TCP must listen on exactly the UDP port
    numbers, so both are opened with C{listenUDP}/C{listenTCP} of the
    injected reactor.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        primary: Address,
        alternate: Address | None = None,
        *,
        software: str = DEFAULT_SOFTWARE,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        tcp: bool = True,
        stats_interval: float = 300.0,
        idle_timeout: float = 30.0,
        tcp_per_source: int = DEFAULT_TCP_PER_SOURCE,
        tcp_max: int | None = None,
        global_rate: float = DEFAULT_GLOBAL_RATE,
        global_burst: float | None = None,
        first_timeout: float = FIRST_REQUEST_TIMEOUT,
        udp_read_budget: int = UDP_READ_BUDGET,
        advertise: tuple[tuple[str, str], ...] = (),
        reuse_port: bool = False,
        batch_io: bool = True,
    ) -> None:
        # Validate now (raises ValueError), with the ports as requested.
        ResponderConfig(primary, alternate, software, advertise)
        self._advertise = advertise
        #: Bind the UDP sockets with SO_REUSEPORT, so that other processes
        #: (L{natbypass.stun.worker}) can bind the same ports and the kernel
        #: spreads the flows among them.
        self.reuse_port = reuse_port
        #: Read and send UDP in batches (recvmmsg/sendmmsg) where the system has them (L{STUNPort.batchIO}).
        self.batch_io = batch_io
        self._udp_ports: list = []
        self._reactor = reactor
        self._primary = primary
        self._alternate = alternate
        self._software = software
        self._tcp = tcp
        self._stats_interval = stats_interval
        self._idle_timeout = idle_timeout
        self._tcp_per_source = tcp_per_source
        self._first_timeout = first_timeout
        self._udp_read_budget = udp_read_budget
        #: The global cap on STUN/TCP connections (default: L{tcp_connection_limit}).
        self.tcp_max = tcp_max if tcp_max is not None else tcp_connection_limit(descriptor_limit())
        limiter = RateLimiter(rate, reactor, max(1, burst)) if rate > 0 else None
        glob = TokenBucket(reactor, global_rate, global_burst) if global_rate > 0 else None
        self.server = STUNServer(limiter=limiter, global_limiter=glob)
        self.config: ResponderConfig | None = None
        self._ports: list = []
        self._stats: LoopingCall | None = None

    @property
    def counters(self) -> Counters:
        return self.server.counters

    def startService(self) -> None:
        ports_are_free = self._primary[1] == 0 or (self._alternate is not None and self._alternate[1] == 0)
        for attempt in range(PORT_ATTEMPTS if ports_are_free else 1):
            try:
                self.config = self._listen()
                break
            except CannotListenError as e:
                self._close()
                if attempt == (PORT_ATTEMPTS if ports_are_free else 1) - 1:
                    self.log.critical(
                        "STUN responder cannot listen on {host}:{port} ({reason}): is another "
                        "STUN server running there? Choose other --stun/--stun-alternate "
                        "addresses.",
                        host=e.interface,
                        port=e.port,
                        reason=e.socketError,
                    )
                    raise
        assert self.config is not None
        self.server.responder = BindingResponder(self.config)
        super().startService()
        transports = "UDP and TCP" if self._tcp else "UDP"
        listening = ", ".join(f"{h}:{p}" for h, p in self.config.addresses())
        if self.config.rfc5780:
            self.log.info(
                "STUN responder on {addresses} ({transports}); RFC 5780 behaviour discovery on",
                addresses=listening,
                transports=transports,
                rfc5780=True,
            )
        else:
            self.log.info(
                "STUN responder on {addresses} ({transports}); no second address "
                "(--stun-alternate), so RFC 5780 behaviour discovery is off: plain "
                "RFC 8489 responses, CHANGE-REQUEST gets 420",
                addresses=listening,
                transports=transports,
                rfc5780=False,
            )
        if self.server.limiter is not None:
            self.log.info(
                "STUN rate limit: {rate} requests per second per source IP (IPv6: per /64), bursts of {burst}",
                rate=self.server.limiter.rate,
                burst=self.server.limiter.burst,
            )
        else:
            self.log.warn(
                "STUN rate limit off (--stun-rate 0): every request is answered, spoofed ones "
                "included, so the responder can be used to reflect traffic at others",
                rate=0,
            )
        glob = self.server.global_limiter
        if glob is not None:
            self.log.info(
                "STUN global rate limit: {global_rate} requests per second from all sources, bursts of {global_burst}",
                global_rate=glob.rate,
                global_burst=glob.burst,
            )
        if self._tcp:
            self.log.info(
                "STUN/TCP: at most {tcp_max} connections (then the source holding most loses its oldest), "
                "{per_source} per source IP (IPv6: per /64), aborted {first_timeout} s after connecting with no "
                "request answered, {idle_timeout} s after the last answer",
                tcp_max=self.tcp_max,
                per_source=self._tcp_per_source,
                first_timeout=self._first_timeout,
                idle_timeout=self._idle_timeout,
            )
        if self._stats_interval > 0:
            self._stats = LoopingCall(self.logCounters)
            self._stats.clock = self._reactor
            self._stats.start(self._stats_interval, now=False)

    def _listen(self) -> ResponderConfig:
        """Open every socket; returns the config with the ports now bound."""
        self._ports = []

        self._udp_ports = []

        def udp(host: str, port: int) -> int:
            listening = _listen_udp(
                self._reactor, host, port, STUNDatagramProtocol(self.server), self.reuse_port, self.batch_io
            )
            # Bounded work per reactor turn (udp.Port reads up to maxThroughput bytes per turn).
            listening.maxThroughput = self._udp_read_budget
            self._ports.append(listening)
            self._udp_ports.append(listening)
            return listening.getHost().port

        host, port = self._primary
        port = udp(host, port)
        alternate = None
        if self._alternate is not None:
            alt_host, alt_port = self._alternate
            alt_port = udp(host, alt_port)
            udp(alt_host, port)
            udp(alt_host, alt_port)
            alternate = (alt_host, alt_port)
        config = ResponderConfig((host, port), alternate, self._software, self._advertise)
        if self._tcp:
            factory = STUNStreamFactory(
                self.server, self._reactor, self._idle_timeout, self.tcp_max, self._tcp_per_source, self._first_timeout
            )
            for tcp_host, tcp_port in config.addresses():
                self._ports.append(self._reactor.listenTCP(tcp_port, factory, interface=tcp_host))
        return config

    def _close(self) -> list:
        ports, self._ports = self._ports, []
        self._udp_ports = []
        return [p.stopListening() for p in ports]

    def stopUDP(self) -> Deferred:
        """
        Close the UDP sockets and keep the rest (TCP) running: once STUN
        workers share the ports (SO_REUSEPORT), this process leaves the UDP
        answering to them.
        """
        closing, self._udp_ports = self._udp_ports, []
        self._ports = [p for p in self._ports if p not in closing]
        for p in closing:
            self.server.sockets.pop((p.getHost().host, p.getHost().port), None)
        return DeferredList([d for d in (p.stopListening() for p in closing) if d is not None])

    def logCounters(self) -> None:
        """Log the counters (also done every C{stats_interval} seconds)."""
        self.log.info(
            "STUN counters: {received} received, {answered} answered, {malformed} malformed, "
            "{rate_limited} rate-limited ({rate_limited_global} by the global limit), {ignored} ignored, "
            "{send_failed} send failures, {tcp_refused} TCP connections refused, {tcp_idle_closed} aborted idle "
            "({tcp_silent_closed} silent from the start), {tcp_evicted} evicted, "
            "{tcp_connections} open, {errors} responder errors",
            **self.counters.snapshot(),
        )

    def stopService(self) -> Deferred:
        super().stopService()
        if self._stats is not None and self._stats.running:
            self._stats.stop()
        self._stats = None
        self.logCounters()
        return DeferredList([d for d in self._close() if d is not None])

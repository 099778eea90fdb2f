"""
Candidates: the addresses a peer offers, and the local ports behind them.

* host addresses: every local interface address (so two peers on one LAN
  connect directly), read with C{getifaddrs} through C{ifaddr} -- a system
  call, no child process, nothing that blocks the reactor, no traffic;
* the STUN-mapped UDP address and the TCP mapped address (learned elsewhere,
  from the very sockets bound here; carried as C{signaling.wire.Candidate});
* predicted ports of a symmetric NAT that allocates in sequence, and the
  order in which the peer's addresses are probed.

Local ports come from an optional C{--port-range LOW-HIGH}.  Each port is
bound once and the socket kept: the UDP one is the socket that does STUN and
punching, the TCP one holds the port (and listens) while punching sockets
share it through C{SO_REUSEPORT}.  Nothing binds, closes and rebinds a
number, which would race with other programs.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import ifaddr
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol

from natbypass.net import family_of, share_port
from natbypass.ratelimit import TokenBucket

try:
    import fcntl
except ImportError:  # not POSIX: interface flags are unknown
    fcntl = None  # type: ignore[assignment]

Address = tuple[str, int]

#: ASCII digits only: str.isdigit() would take "²".
_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?")


class CandidateError(ValueError):
    """A bad port range, unreadable interface addresses, or no free port (the one error type)."""


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of local ports, from C{--port-range LOW-HIGH}."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.high <= 65535):
            raise CandidateError(f"port range {self.low}-{self.high} is not within 1-65535 with LOW <= HIGH")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """Parse C{"LOW-HIGH"} (or a single port C{"N"})."""
        m = _PORT_RANGE.fullmatch(text)
        if m is None:
            raise CandidateError(f"--port-range wants LOW-HIGH (e.g. 40000-40100), not {text!r}")
        low = int(m.group(1))
        return cls(low, int(m.group(2) or low))

    def __iter__(self):
        return iter(range(self.low, self.high + 1))

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True)
class InterfaceAddress:
    """
    One address of one network interface, as the system reports it.

    C{up} and C{loopback} are the interface's C{IFF_UP} and
    C{IFF_LOOPBACK} flags, or None where they could not be read (C{ifaddr}
    does not report flags; see L{read_interface_addresses}).
    """

    interface: str
    address: str
    up: bool | None = None
    loopback: bool | None = None
    #: The network prefix length (C{24} for a /24), where reported.
    prefix: int | None = None


_FAMILIES = {"inet": 4, "inet6": 6}


def usable_addresses(
    addresses: Iterable[InterfaceAddress],
    include_loopback: bool = False,
    families: Sequence[str] = ("inet",),
) -> list[str]:
    """
    The host candidates among C{addresses} (pure): of interfaces that are
    up (or whose state is unknown), of the C{families} asked for
    (C{"inet"}, C{"inet6"}), neither link-local nor loopback (a loopback
    interface and loopback addresses only with C{include_loopback}), each
    once, in order.  An IPv6 zone (C{%eth0}) is dropped with the
    link-local addresses that need one.
    """
    versions = {_FAMILIES[f] for f in families if f in _FAMILIES}
    out: list[str] = []
    for entry in addresses:
        if entry.up is False or (entry.loopback and not include_loopback):
            continue
        try:
            addr = ipaddress.ip_address(entry.address.partition("%")[0])
        except ValueError:
            raise CandidateError(
                f"interface {entry.interface} has an address that is not an IP: {entry.address!r}"
            ) from None
        if addr.version not in versions or addr.is_link_local or _site_local(addr):
            continue
        if addr.is_loopback and not include_loopback:
            continue
        if str(addr) not in out:
            out.append(str(addr))
    return out


def _site_local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """IPv6 site-local (C{fec0::/10}): deprecated (RFC 3879), the same prefix means different sites."""
    return isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local


#: Linux C{ioctl} that reads an interface's flags, and the flags we use.
_SIOCGIFFLAGS = 0x8913
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8
_IFREQ = struct.Struct("16sH22x")


def interface_flags(name: str) -> tuple[bool, bool] | None:
    """
    C{(up, loopback)} of interface C{name} from the C{SIOCGIFFLAGS}
    ioctl (Linux; a system call that does not block), or None where that
    is not available.
    """
    if fcntl is None or not sys.platform.startswith("linux"):
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            reply = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, _IFREQ.pack(name.encode()[:15], 0))
    except (OSError, UnicodeError):
        return None
    flags = _IFREQ.unpack(reply)[1]
    return bool(flags & _IFF_UP), bool(flags & _IFF_LOOPBACK)


def read_interface_addresses(
    adapters: Callable[[], Iterable[ifaddr.Adapter]] = ifaddr.get_adapters,
    flags: Callable[[str], tuple[bool, bool] | None] = interface_flags,
) -> list[InterfaceAddress]:
    """
    Every address of every interface, from C{getifaddrs} (through
    C{ifaddr}), with the interface flags from C{flags}.

    C{ifaddr} reports names and addresses but no flags: without
    C{SIOCGIFFLAGS} (not Linux) an interface counts as up, and a loopback
    interface is recognised only by its loopback addresses.  Raises
    L{CandidateError} when the system refuses the list.
    """
    try:
        found = list(adapters())
    except OSError as e:
        raise CandidateError(f"cannot list interface addresses: {e}") from None
    out: list[InterfaceAddress] = []
    for adapter in found:
        state = flags(adapter.name)
        up, loopback = state if state is not None else (None, None)
        for ip in adapter.ips:
            # IPv4: "a.b.c.d"; IPv6: (address, flowinfo, scope_id).
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            prefix = getattr(ip, "network_prefix", None)
            out.append(InterfaceAddress(adapter.name, address, up, loopback, prefix))
    return out


def host_addresses(
    include_loopback: bool = False,
    families: Sequence[str] = ("inet",),
    read: Callable[[], Iterable[InterfaceAddress]] = read_interface_addresses,
) -> list[str]:
    """
    This machine's interface addresses (IPv4 by default); see
    L{usable_addresses}.  Sends no traffic, runs no command, does not
    block.  Raises L{CandidateError} when they cannot be read.
    """
    return usable_addresses(read(), include_loopback, families)


def predicted_ports(mapped: Address, delta: int, span: int) -> list[Address]:
    """C{mapped} port + delta, + 2*delta, ... (C{span} of them), within 1-65535."""
    host, port = mapped
    ports = (port + k * delta for k in range(1, span + 1))
    return [(host, p) for p in ports if 1 <= p <= 65535]


def remote_addresses(
    srflx: Iterable[Address],
    others: Iterable[Address] = (),
    predict_delta: int | None = None,
    span: int = 8,
    max_predicted: int | None = None,
) -> list[Address]:
    """
    The peer's addresses to punch (one transport), in the order the first
    packets go out.

    Predicted ports come first: a symmetric NAT on *our* side hands out a new
    port for each new destination in the order we first send to them, so
    when both sides are predictable and both probe predicted ports first, in
    ascending order, the i-th flows of both sides meet.  Then the mapped
    (srflx) addresses, then C{others} (host addresses).  At most
    C{max_predicted} predicted ports in all (None: C{span} per srflx).
    """
    srflx = list(srflx)
    predicted: list[Address] = []
    if predict_delta:
        for address in srflx:
            predicted += predicted_ports(address, predict_delta, span)
    if max_predicted is not None:
        predicted = predicted[:max_predicted]
    return list(dict.fromkeys([*predicted, *srflx, *others]))


# ------------------------------------------------------------------ screening

#: At most this many of a peer's candidates are punched per protocol (after
#: the refused ones are dropped; server-reflexive ones first).  A peer has one
#: server-reflexive address and a host address per interface.
MAX_CANDIDATES_PER_PROTOCOL = 8
#: At most this many predicted ports per protocol (a symmetric NAT's next
#: ports: C{span} 8 from the first server-reflexive candidate).
MAX_PREDICTED = 8

#: Cloud metadata services (AWS, GCP, Azure, ECS, Alibaba): never a peer,
#: whatever network we are on.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_V4_RESERVED = ipaddress.ip_network("240.0.0.0/4")
_V4_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_V4_BROADCAST = ipaddress.ip_address("255.255.255.255")

Network = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class LocalNetworks:
    """
    What the screening of a peer's candidates knows of this peer: the
    networks of its interfaces (address and prefix), and whether loopback
    candidates are allowed (two peers on one machine).
    """

    networks: tuple[Network, ...] = ()
    loopback: bool = False

    @classmethod
    def of(
        cls, addresses: Iterable[InterfaceAddress], bind_host: str | None = None, loopback: bool = False
    ) -> LocalNetworks:
        """
        The networks of the interfaces that are up (or whose state is
        unknown) among C{addresses}; with C{bind_host} (a socket bound to one
        address sends only from it) just that address's (with its
        interface's prefix when listed, else alone).  Loopback is allowed
        with C{loopback} or when C{bind_host} is a loopback address.
        """
        nets: list[Network] = []
        for entry in addresses:
            if entry.up is False:
                continue
            try:
                nets.append(
                    ipaddress.ip_interface(f"{entry.address.partition('%')[0]}/{entry.prefix or ''}".rstrip("/"))
                )
            except ValueError:
                continue
        if bind_host is not None:
            try:
                bound = ipaddress.ip_address(bind_host)
            except ValueError:
                return cls((), loopback)
            nets = [n for n in nets if n.ip == bound] or [ipaddress.ip_interface(bound)]
            loopback = loopback or bound.is_loopback
        return cls(tuple(dict.fromkeys(nets)), loopback)


def refusal(host: str, local: LocalNetworks = LocalNetworks()) -> str | None:
    """
    Why a peer's candidate address C{host} must not be probed (pure), or
    None when it may be.

    Refused always: not an IP; unspecified (C{0.0.0.0/8}, C{::}); multicast;
    the limited broadcast and the broadcast address of one of C{local}'s
    IPv4 networks; C{240.0.0.0/4} and IPv6's reserved blocks; IPv4-mapped
    IPv6 (C{::ffff:a.b.c.d}: another spelling of an IPv4 address); IPv6
    link-local (the wire carries no zone, without which it cannot be sent
    to); IPv6 site-local (C{fec0::/10}, deprecated: ambiguous between
    sites); cloud metadata services (L{METADATA_ADDRESSES}).  Refused unless
    this peer is on that network: loopback (C{local.loopback}), IPv4
    link-local (C{169.254.0.0/16}: one of C{local}'s networks is
    link-local).  Private, shared (C{100.64.0.0/10}), benchmarking
    (C{198.18.0.0/15} and C{2001:2::/48}, the NAT lab), IPv6 unique local
    (C{fc00::/7}) and documentation ranges are allowed: peers live there.
    """
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return "an IPv4-mapped IPv6 address"
    if addr.is_unspecified or addr in _V4_THIS_NETWORK:
        return "unspecified"
    if addr.is_multicast:
        return "multicast"
    if addr == _V4_BROADCAST:
        return "broadcast"
    if addr in METADATA_ADDRESSES:
        return "a cloud metadata service"
    if addr.is_loopback:
        return None if local.loopback else "loopback (only with loopback candidates, or bound to loopback)"
    if addr in _V4_RESERVED or (addr.version == 6 and addr.is_reserved):
        return "reserved"
    if _site_local(addr):
        return "IPv6 site-local (deprecated, RFC 3879)"
    if addr.is_link_local:
        if addr.version == 6:
            return "IPv6 link-local (no zone)"
        if not any(n.version == 4 and n.ip.is_link_local for n in local.networks):
            return "link-local, and no interface of ours is"
    for net in local.networks:
        if net.version == 4 and net.network.prefixlen <= 30 and addr == net.network.broadcast_address:
            return f"the broadcast address of our network {net.network}"
    return None


@dataclass(frozen=True)
class Screened:
    """What L{screen} kept of one protocol's candidates, and what it refused and why."""

    srflx: tuple[Address, ...]
    hosts: tuple[Address, ...]
    refused: tuple[tuple[Address, str], ...] = ()
    #: Good candidates beyond the cap, left out.
    over_cap: int = 0


def screen(
    srflx: Iterable[Address],
    hosts: Iterable[Address],
    local: LocalNetworks = LocalNetworks(),
    limit: int = MAX_CANDIDATES_PER_PROTOCOL,
) -> Screened:
    """
    A peer's candidates of one protocol, screened (pure): the refused ones
    (L{refusal}) dropped, duplicates dropped, at most C{limit} kept,
    server-reflexive ones first.
    """
    kept: dict[Address, bool] = {}
    refused: list[tuple[Address, str]] = []
    seen: set[Address] = set()
    over = 0
    for is_srflx, group in ((True, srflx), (False, hosts)):
        for address in group:
            if address in seen:
                continue
            seen.add(address)
            why = refusal(address[0], local)
            if why is not None:
                refused.append((address, why))
            elif len(kept) >= limit:
                over += 1
            else:
                kept[address] = is_srflx
    return Screened(
        tuple(a for a, s in kept.items() if s), tuple(a for a, s in kept.items() if not s), tuple(refused), over
    )


# ------------------------------------------------------------------ budgets

#: What one attempt (one protocol of one offer) may send to addresses that
#: have not proved the session key, in bytes, over the whole attempt: UDP
#: probes and the speculative QUIC first flight (C{udp.SPECULATIVE_BUDGET},
#: 2,560) together.  Probes are 53 bytes: about 100 besides the flight.
MAX_OFFER_BYTES = 8 * 1024
#: ... and in datagrams.
MAX_OFFER_PACKETS = 128
#: The attempt's own pace (RFC 8445's Ta, one check per 1/rate s) once its
#: first rounds (C{burst} datagrams: every candidate, predicted ports too,
#: twice or more) are out.
OFFER_RATE, OFFER_BURST = 16.0, 40.0
#: The peer-wide pace shared by every attempt, UDP and TCP, in bytes per
#: second and burst bytes: a peer sends at most this to addresses that did
#: not prove a session key, however many offers it answers.
PEER_RATE, PEER_BURST = 16 * 1024.0, 32 * 1024.0
#: What a TCP connect attempt is charged (a SYN with its options, IPv4).
SYN_BYTES = 64


class ProbeBudget:
    """
    What one attempt may send to addresses that have not proved the
    session key: at most C{max_packets} datagrams and C{max_bytes} bytes
    in all, paced by its own bucket (C{rate}, C{burst}, in datagrams) and
    by the peer-wide C{pace} (bytes) it shares with every other attempt.
    A send the budget refuses is not made (counted in C{withheld}).
    """

    def __init__(
        self,
        clock,
        pace: TokenBucket | None = None,
        max_packets: int = MAX_OFFER_PACKETS,
        max_bytes: int = MAX_OFFER_BYTES,
        rate: float = OFFER_RATE,
        burst: float = OFFER_BURST,
    ) -> None:
        self.pace = pace
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self._own = TokenBucket(clock, rate, burst)
        self.packets = 0
        self.bytes = 0
        self.withheld = 0

    def spend(self, size: int) -> bool:
        """May one datagram (or connect) of C{size} bytes go out now?  If so, it is counted."""
        ok = (
            self.packets < self.max_packets
            and self.bytes + size <= self.max_bytes
            and self._own.take()
            and (self.pace is None or self.pace.take(size))
        )
        if not ok:
            self.withheld += 1
            return False
        self.packets += 1
        self.bytes += size
        return True


def bind_udp(
    reactor,
    protocol: DatagramProtocol,
    port_range: PortRange | None = None,
    interface: str = "",
) -> IListeningPort:
    """
    C{listenUDP} on the first free port of C{port_range} (any port without
    one).  Raises L{CandidateError} saying so when every port is taken.
    """
    ports: Iterable[int] = port_range if port_range is not None else (0,)
    last: Exception | None = None
    for port in ports:
        try:
            return reactor.listenUDP(port, protocol, interface=interface)
        except CannotListenError as e:
            last = e
    raise CandidateError(
        f"no free UDP port in {port_range} on {interface or 'all interfaces'} ({last}); "
        "widen --port-range or stop what holds those ports"
    )


def reserve_tcp_port(
    port_range: PortRange | None = None,
    interface: str = "0.0.0.0",
    listen: bool = True,
) -> socket.socket:
    """
    Bind (and by default listen on) a TCP port for STUN-over-TCP and
    punching, and keep it: the returned non-blocking socket holds the port.

    The port is claimed with a plain bind (no reuse flags), so a port that
    anything else uses -- even another NATbypass with C{SO_REUSEPORT} -- is
    skipped; only then is C{SO_REUSEADDR}/C{SO_REUSEPORT} turned on, so our
    own punching sockets (see C{natbypass.net.reusable_socket}) can
    bind the same port.
    """
    ports: Iterable[int] = port_range if port_range is not None else (0,)
    last: OSError | None = None
    for port in ports:
        sock = socket.socket(family_of(interface), socket.SOCK_STREAM)
        try:
            sock.bind((interface, port))
        except OSError as e:
            sock.close()
            last = e
            continue
        share_port(sock)
        sock.setblocking(False)
        sock.set_inheritable(False)
        if listen:
            sock.listen(16)
        return sock
    raise CandidateError(
        f"no free TCP port in {port_range} on {interface} ({last}); widen --port-range or stop what holds those ports"
    )

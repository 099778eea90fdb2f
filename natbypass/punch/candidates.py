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
        if addr.version not in versions or addr.is_link_local:
            continue
        if addr.is_loopback and not include_loopback:
            continue
        if str(addr) not in out:
            out.append(str(addr))
    return out


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
            out.append(InterfaceAddress(adapter.name, address, up, loopback))
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
) -> list[Address]:
    """
    The peer's addresses to punch (one transport), in the order the first
    packets go out.

    Predicted ports come first: a symmetric NAT on *our* side hands out a new
    port for each new destination in the order we first send to them, so
    when both sides are predictable and both probe predicted ports first, in
    ascending order, the i-th flows of both sides meet.  Then the mapped
    (srflx) addresses, then C{others} (host addresses).
    """
    srflx = list(srflx)
    predicted: list[Address] = []
    if predict_delta:
        for address in srflx:
            predicted += predicted_ports(address, predict_delta, span)
    return list(dict.fromkeys([*predicted, *srflx, *others]))


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

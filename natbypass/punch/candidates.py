"""
Candidates: the addresses a peer offers, and the local ports behind them.

* host addresses: every local interface address (so two peers on one LAN
  connect directly), parsed from ``ip -j addr`` -- no traffic is sent;
* the STUN-mapped UDP address and the TCP mapped address (learned elsewhere,
  from the very sockets bound here; carried as ``signaling.wire.Candidate``);
* predicted ports of a symmetric NAT that allocates in sequence, and the
  order in which the peer's addresses are probed.

Local ports come from an optional ``--port-range LOW-HIGH``.  Each port is
bound once and the socket kept: the UDP one is the socket that does STUN and
punching, the TCP one holds the port (and listens) while punching sockets
share it through ``SO_REUSEPORT``.  Nothing binds, closes and rebinds a
number, which would race with other programs.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import DatagramProtocol

Address = tuple[str, int]

#: ASCII digits only: str.isdigit() would take "²".
_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?")


class CandidateError(ValueError):
    """A bad port range, unusable ``ip`` output, or no free port (the one error type)."""


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of local ports, from ``--port-range LOW-HIGH``."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.high <= 65535):
            raise CandidateError(
                f"port range {self.low}-{self.high} is not within 1-65535 with LOW <= HIGH"
            )

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """Parse ``"LOW-HIGH"`` (or a single port ``"N"``)."""
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


def parse_ip_addr_json(
    text: str, include_loopback: bool = False, families: Sequence[str] = ("inet",)
) -> list[str]:
    """
    The usable addresses in ``ip -j addr`` output: interfaces that are up,
    scope global (or host, for loopback when asked), not link-local.
    """
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CandidateError(f"'ip -j addr' output is not JSON: {e}") from None
    if not isinstance(data, list):
        raise CandidateError("'ip -j addr' output is not a list of interfaces")
    out: list[str] = []
    for link in data:
        if not isinstance(link, dict):
            raise CandidateError("'ip -j addr' output has a non-object interface")
        flags = link.get("flags", [])
        if not isinstance(flags, list) or "UP" not in flags:
            continue
        loopback = "LOOPBACK" in flags
        if loopback and not include_loopback:
            continue
        infos = link.get("addr_info", [])
        if not isinstance(infos, list):
            raise CandidateError("'ip -j addr' addr_info is not a list")
        for info in infos:
            if not isinstance(info, dict) or info.get("family") not in families:
                continue
            local = info.get("local")
            if not isinstance(local, str):
                continue
            try:
                addr = ipaddress.ip_address(local)
            except ValueError:
                raise CandidateError(f"'ip -j addr' gave a bad address {local!r}") from None
            if addr.is_link_local or (addr.is_loopback and not include_loopback):
                continue
            if str(addr) not in out:
                out.append(str(addr))
    return out


def _run_ip() -> str:
    return subprocess.run(
        ["ip", "-j", "addr", "show"], check=True, capture_output=True, text=True, timeout=5
    ).stdout


def host_addresses(
    include_loopback: bool = False,
    families: Sequence[str] = ("inet",),
    run: Callable[[], str] = _run_ip,
) -> list[str]:
    """
    This machine's interface addresses (IPv4 by default), read with ``ip``.
    Sends no traffic.  Raises :class:`CandidateError` when ``ip`` fails.
    """
    try:
        text = run()
    except (OSError, subprocess.SubprocessError) as e:
        raise CandidateError(f"cannot list interface addresses with 'ip -j addr': {e}") from None
    return parse_ip_addr_json(text, include_loopback, families)


def predicted_ports(mapped: Address, delta: int, span: int) -> list[Address]:
    """``mapped`` port + delta, + 2*delta, ... (``span`` of them), within 1-65535."""
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
    (srflx) addresses, then ``others`` (host addresses).
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
    ``listenUDP`` on the first free port of ``port_range`` (any port without
    one).  Raises :class:`CandidateError` saying so when every port is taken.
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
    anything else uses -- even another NATbypass with ``SO_REUSEPORT`` -- is
    skipped; only then is ``SO_REUSEADDR``/``SO_REUSEPORT`` turned on, so our
    own punching sockets (see ``natbypass.punch.tcp.reusable_socket``) can
    bind the same port.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    ports: Iterable[int] = port_range if port_range is not None else (0,)
    last: OSError | None = None
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((interface, port))
        except OSError as e:
            sock.close()
            last = e
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.set_inheritable(False)
        if listen:
            sock.listen(16)
        return sock
    raise CandidateError(
        f"no free TCP port in {port_range} on {interface} ({last}); "
        "widen --port-range or stop what holds those ports"
    )

"""
Socket helpers shared by the STUN client, the TCP punch and the port
reservation: one place that knows how NATbypass sockets share a port.

Several of our TCP sockets use one local port at once: the reserved
listening socket, the STUN-over-TCP connection that learns the port's
mapping, and every simultaneous-open attempt.  Linux lets them bind the same
address only when *each* of them sets C{SO_REUSEADDR} and C{SO_REUSEPORT}
(and they belong to one user), so every such socket is made here.

Not used by C{natbypass.lab.probe}: the lab probes measure NATs with plain
blocking sockets inside network namespaces, deliberately independently of
NATbypass's own networking code (a probe that shared these helpers could not
catch a bug in them), and run as C{python3 -m natbypass.lab.probe} in a
namespace where they need nothing but the standard library.
"""

from __future__ import annotations

import socket
from typing import Any

try:
    from twisted.internet.tcp import makeBinding
except ImportError:  # Twisted before makeBinding: connectTCP sets SO_REUSEADDR only
    makeBinding = None

Address = tuple[str, int]


def family_of(host: str) -> socket.AddressFamily:
    """C{AF_INET6} for an IPv6 literal (or C{"::"}), else C{AF_INET}."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def share_port(sock: socket.socket) -> None:
    """
    Turn on C{SO_REUSEADDR} and C{SO_REUSEPORT}, so our other sockets that
    do the same can bind the port of C{sock} too.  Call before C{bind}, or
    after a plain C{bind} that claimed the port exclusively
    (C{natbypass.punch.candidates.reserve_tcp_port}).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def reusable_socket(local: Address, listen: bool = False) -> socket.socket:
    """
    A non-blocking, non-inheritable TCP socket bound to C{local} that shares
    the port with our other sockets (see L{share_port}); listening when
    C{listen}.
    """
    sock = socket.socket(family_of(local[0]), socket.SOCK_STREAM)
    try:
        share_port(sock)
        sock.setblocking(False)
        sock.set_inheritable(False)
        sock.bind(local)
        if listen:
            sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


def reusable_binding(local: Address) -> Any:
    """
    The C{bindAddress} of a Twisted TCP client endpoint that binds C{local}
    the way L{reusable_socket} does (C{SO_REUSEADDR} + C{SO_REUSEPORT}).
    On a Twisted without C{makeBinding} it is the plain tuple, which gets
    C{SO_REUSEADDR} only.
    """
    if makeBinding is None:
        return local
    return makeBinding(local[0], local[1], reuseAddress=True, reusePort=True)


def route_source_address(remote: Address) -> str:
    """
    The local IP the kernel would use to reach C{remote} (an IP literal):
    C{connect()} an unbound UDP socket, which sends nothing, and read its
    name.  A wildcard bind cannot be compared with a mapped address; this
    can.  Raises C{OSError} when there is no route.
    """
    with socket.socket(family_of(remote[0]), socket.SOCK_DGRAM) as s:
        s.connect(remote)
        return s.getsockname()[0]

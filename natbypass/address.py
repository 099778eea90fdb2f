"""
Addresses as people and logs see them, shared by every command, plugin and
log line: the one C{HOST:PORT} grammar (with its error messages), the one
way of writing an address back (IPv6 in brackets), and the wildcard hosts.
Pure; no name resolution, no sockets (those helpers are in L{natbypass.net}).
"""

from __future__ import annotations

import ipaddress
from typing import Any

Address = tuple[str, int]

#: The hosts that mean "every local address" when bound (C{""} is how
#: Twisted's C{listenUDP}/C{listenTCP} spell it), never a concrete address.
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def is_wildcard(host: str) -> bool:
    """True when C{host} is a wildcard bind address, not a concrete one."""
    return host in WILDCARDS


def format_address(address: tuple[str, int] | Any) -> str:
    """
    C{HOST:PORT}, with an IPv6 host in brackets (C{[2001:db8::1]:3478}) so
    that the text parses back with L{parse_host_port}.  Takes an
    C{(host, port)} tuple or anything with C{host} and C{port} attributes
    (Twisted's C{IPv4Address}/C{IPv6Address}).
    """
    if isinstance(address, tuple):
        host, port = address[0], address[1]
    else:
        host, port = address.host, address.port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(
    text: str, default_port: int | None = None, *, allow_zero: bool = False, ip_only: bool = False
) -> Address:
    """
    C{HOST[:PORT]} -> (host, port); IPv6 literals in brackets when a port
    follows (C{[::1]:3478}), bare IPv6 literals taken whole.  C{ip_only}
    refuses host names (an address to bind, or to name in RFC 5780
    responses, must be exact).  Raises ValueError with a message a person
    can act on.
    """
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{text!r}: only IPv6 addresses go in brackets") from None
    elif text.count(":") > 1:
        host = text  # a bare IPv6 literal
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: not an IPv6 address (write [IPv6]:PORT)") from None
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host = text
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if ip_only and not is_ip(host):
        raise ValueError(f"{host!r} is not an IP address (use a literal IP, e.g. 192.0.2.10)")
    if not _valid_host(host):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{text!r}: a port is needed (HOST:PORT)")
        return host, default_port
    low = 0 if allow_zero else 1
    if not (port_text.isascii() and port_text.isdigit()) or not low <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from {low} to 65535")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253 or not host.isascii():
        return False
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-" and all(c.isalnum() or c == "-" for c in label)
        for label in labels
    )


def is_ip(host: str) -> bool:
    """
    Whether C{host} is an IP address literal (v4 or v6), not a name: a name
    must be resolved before it can be used as a datagram destination.
    """
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False

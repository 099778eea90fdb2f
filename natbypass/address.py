"""
``HOST:PORT`` parsing shared by every command and plugin: one grammar, one
set of error messages.  Pure; no name resolution.
"""

from __future__ import annotations

import ipaddress

Address = tuple[str, int]


def parse_host_port(
    text: str, default_port: int | None = None, *, allow_zero: bool = False, ip_only: bool = False
) -> Address:
    """
    ``HOST[:PORT]`` -> (host, port); IPv6 literals in brackets when a port
    follows (``[::1]:3478``), bare IPv6 literals taken whole.  ``ip_only``
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
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isalnum() or c == "-" for c in label)
        for label in labels
    )


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False

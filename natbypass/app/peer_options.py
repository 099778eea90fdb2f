"""
Options shared by everything that starts a peer: the ``natbypass-peer``
twistd plugin and ``natbypass connect``.  Parsing only; no I/O.
"""

from __future__ import annotations

import re
from natbypass.address import parse_host_port
from natbypass.app.detect import DEFAULT_PORT

Address = tuple[str, int]

#: The host in a Twisted client endpoint string: positional (tcp:HOST:PORT)
#: or keyword (tcp:host=HOST:port=PORT); IPv6 hosts escape their colons.
_POSITIONAL = re.compile(r"^(?:tcp|tls|ssl):((?:\\:|[^:=])+):")
_KEYWORD = re.compile(r"(?:^|:)host=((?:\\:|[^:])+)")


def mediator_host(endpoint: str) -> str:
    """The mediator's host in a client endpoint string, for the default STUN server."""
    m = _KEYWORD.search(endpoint) or _POSITIONAL.match(endpoint)
    if m is None:
        raise ValueError(
            f"cannot find the host in {endpoint!r}; give --stun HOST:PORT or an endpoint like tcp:HOST:7000"
        )
    return m.group(1).replace("\\:", ":")


def stun_server(stun: str | None, mediator: str) -> Address:
    """``--stun`` or, without it, port 3478 on the mediator's host."""
    if stun:
        return parse_host_port(stun, DEFAULT_PORT)
    return (mediator_host(mediator), DEFAULT_PORT)


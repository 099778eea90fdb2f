"""The IPv4 default gateway, read from C{/proc/net/route} (no subprocess, no netlink)."""

from __future__ import annotations

import ipaddress
import struct

ROUTE_FILE = "/proc/net/route"
RTF_GATEWAY = 0x2


def parse_route_table(text: str) -> str | None:
    """
    The gateway of the first default route (destination 0, mask 0, with the
    gateway flag) in the text of C{/proc/net/route}; None when there is none.
    Addresses there are hex in host (little-endian) byte order.
    """
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            destination, gateway, flags, mask = (int(fields[i], 16) for i in (1, 2, 3, 7))
        except ValueError:
            continue
        if destination == 0 and mask == 0 and flags & RTF_GATEWAY and gateway:
            return str(ipaddress.IPv4Address(struct.pack("<I", gateway & 0xFFFFFFFF)))
    return None


def default_gateway(path: str = ROUTE_FILE) -> str | None:
    """This host's IPv4 default gateway, or None (no default route, or no /proc)."""
    try:
        with open(path) as f:
            return parse_route_table(f.read())
    except OSError:
        return None

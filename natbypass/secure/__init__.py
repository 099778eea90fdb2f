"""
Secure channels over punched paths, authenticated by pinned identity keys.

  - L{natbypass.secure.tls}: TLS 1.3 (pyOpenSSL) over an adopted TCP connection;
  - L{natbypass.secure.quic}: QUIC (aioquic or qh3) over the punched UDP 5-tuple.

Both authenticate each side by the fingerprint of its L{natbypass.identity}
key, never by a CA or a host name; see C{docs/security.md}.

L{ChannelSecurity} is what the punch engines are given to secure the path
they open: our identity, and the check the peer's proven key must pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from natbypass.identity import Identity
from natbypass.trust import PeerCheck


@dataclass(frozen=True)
class ChannelSecurity:
    """
    How a punched path is secured: we prove C{identity}; the peer's proven
    fingerprint goes through C{verify} (a L{natbypass.trust.PeerCheck}: a
    pin, a known-peers entry, or an allow list), which raises
    L{natbypass.trust.PeerRejected} to refuse it.
    """

    identity: Identity
    verify: PeerCheck

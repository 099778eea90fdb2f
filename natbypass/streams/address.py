"""The address of one end of a stream: which peer, which key, which service, over which path."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IAddress
from zope.interface import implementer

from natbypass.identity import Fingerprint


@implementer(IAddress)
@dataclass(frozen=True)
class PeerAddress:
    """
    What C{getPeer()} (the remote end) and C{getHost()} (ours) of a stream
    transport return.

    @ivar peer_id: the peer's id at the mediator (ours for C{getHost}).
    @ivar fingerprint: the key that end proved it holds.
    @ivar service: the service the stream was opened to.
    @ivar path: C{"udp"} (QUIC) or C{"tcp"} (TLS with the multiplexer).
    @ivar address: that end of the path, an C{IPv4Address}/C{IPv6Address}
        (the peer's as seen after its NAT).
    @ivar stream_id: the stream's number on its connection.
    """

    peer_id: str
    fingerprint: Fingerprint | None
    service: str
    path: str
    address: object
    stream_id: int

    def __str__(self) -> str:
        host = getattr(self.address, "host", "?")
        port = getattr(self.address, "port", "?")
        return f"natbypass:{self.peer_id}/{self.service} via {self.path} {host}:{port} (stream {self.stream_id})"

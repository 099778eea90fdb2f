"""
Streams over a secure peer connection: many concurrent bidirectional byte
streams, each a Twisted transport, over either path.

  - on the UDP path, native QUIC streams (L{natbypass.secure.quic});
  - on the TCP path, a yamux-like multiplexer inside TLS
    (L{natbypass.streams.frames}, L{natbypass.streams.mux}).

Both run the same stream layer (L{natbypass.streams.session}): each stream
opens with a one-line request naming a I{service} (the peer answers accept or
refuse with a reason), and is flow-controlled by credit the receiver grants as
its application consumes (so a fast sender never buffers without bound and one
stalled stream never blocks another).  A stream's transport
(L{StreamTransport}) is an C{ITransport}, C{IPushProducer} and C{IConsumer};
it half-closes (C{loseWriteConnection}, C{IHalfCloseableProtocol}), closes
cleanly (C{loseConnection}) or aborts (C{abortConnection}: a reset), and its
C{getPeer}/C{getHost} are L{PeerAddress}es naming the peer, its proven key,
the service and the path.

Applications use it through L{natbypass.interfaces.IPeerConnection.openStream},
L{natbypass.interfaces.IPeer.serve} and C{IPeer.openStream}, or through the
Twisted endpoints of L{natbypass.endpoints} (C{natbypass:} strings).
"""

from __future__ import annotations

from natbypass.streams.address import PeerAddress
from natbypass.streams.errors import StreamError, StreamRefused, StreamReset

__all__ = ["PeerAddress", "StreamError", "StreamRefused", "StreamReset", "StreamTransport"]


def __getattr__(name: str) -> object:
    # The transport pulls in Twisted's protocol machinery: only on demand.
    if name == "StreamTransport":
        from natbypass.streams.transport import StreamTransport

        return StreamTransport
    raise AttributeError(name)

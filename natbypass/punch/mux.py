"""
One UDP socket, two users: STUN and hole punching.

The port whose NAT mapping STUN learned must be the port that punches, so both
share one socket.  L{UDPMux} is that socket's protocol: it hands STUN
messages to one C{DatagramProtocol} and everything else to another, each of
which writes through the shared transport as if it owned it.

L{PunchEndpoint} is the usual "everything else": it decodes punch
packets and routes them by session id to the attempt that owns the session,
and routes QUIC packets (the secure channel of a punched path, on the same
5-tuple) by remote address to that path's channel, so one local port can
serve several peers at once.  A short-header QUIC packet from an address
nobody routed goes, by its destination connection id, to the handler that
registered that id (L{PunchEndpoint.routeCid}: an established path's
L{natbypass.punch.migration.PathFollower}), which decides whether the engine
may see it: that is how a path follows the peer's NAT when it rebinds.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from natbypass.punch.packet import PunchDecodeError, PunchPacket, decode
from natbypass.secure.quic import is_quic
from natbypass.stun.message import is_stun

Address = tuple[str, int]


class UDPMux(DatagramProtocol):
    """
    Demultiplex STUN from punch traffic on one socket.

    A datagram is STUN when its first two bits are zero and bytes 4..8 are the
    magic cookie (RFC 8489 section 5 / RFC 7983; see
    C{natbypass.stun.message.is_stun}); punch packets start with 0xCE, so the
    two never collide.
    """

    log = Logger()

    def __init__(self, stun: DatagramProtocol | None = None, other: DatagramProtocol | None = None) -> None:
        self._stun = stun
        self._other = other

    def _attach(self, child: DatagramProtocol | None) -> None:
        if child is not None and self.transport is not None and child.transport is None:
            child.makeConnection(self.transport)

    def setSTUN(self, protocol: DatagramProtocol) -> None:
        """Hand STUN messages to C{protocol} (attached to the socket at once if it is open)."""
        self._stun = protocol
        self._attach(protocol)

    def setOther(self, protocol: DatagramProtocol) -> None:
        """Hand every non-STUN datagram to C{protocol}."""
        self._other = protocol
        self._attach(protocol)

    def startProtocol(self) -> None:
        self._attach(self._stun)
        self._attach(self._other)

    def stopProtocol(self) -> None:
        for child in (self._stun, self._other):
            if child is not None and child.transport is not None:
                child.doStop()

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        child = self._stun if is_stun(data) else self._other
        if child is None:
            self.log.debug("no consumer for a {size}-byte datagram from {addr}", size=len(data), addr=addr)
            return
        child.datagramReceived(data, addr)


class IPacketHandler(TypingProtocol):
    """What a L{PunchEndpoint} routes a session's packets to."""

    def packetReceived(self, packet: PunchPacket, source: Address) -> None: ...


class IQuicHandler(TypingProtocol):
    """What a L{PunchEndpoint} routes the QUIC packets of one remote address to (a channel, or an attempt)."""

    def datagramReceived(self, data: bytes, addr: Address) -> None: ...


class PunchEndpoint(DatagramProtocol):
    """
    Decode punch packets and route them by session id; route QUIC packets
    (RFC 9443 first bits, L{natbypass.secure.quic.is_quic}) by remote address.

    Punch packets go to the handler of their session (the attempt that
    punches it).  QUIC packets go only to the handler routed for their exact
    source address: an attempt registers the addresses its peer proved with
    the session key (a bounded set), then the one channel of the chosen path.
    QUIC from any other address is dropped and counted, so nobody can make a
    peer start a QUIC handshake, or feed one, from an address the punch did
    not verify; except a short-header packet (only an established connection
    takes one) whose destination connection id an established path
    registered (L{routeCid}): it goes to that path's handler, which bounds
    what it lets through (see C{natbypass.punch.migration}).

    Never raises on bad input: undecodable datagrams, packets for sessions
    nobody registered and unsolicited QUIC are logged, counted and dropped.
    MAC checks happen in the handler, which holds the key.
    """

    log = Logger()

    def __init__(self) -> None:
        self._handlers: dict[bytes, IPacketHandler] = {}
        self._quic: dict[Address, IQuicHandler] = {}
        #: Datagrams that were not punch packets at all.
        self.undecodable = 0
        #: Well-formed packets for a session no handler owns.
        self.unrouted = 0
        #: QUIC packets from an address nobody routed.
        self.unsolicited_quic = 0
        self._cids: dict[bytes, IQuicHandler] = {}
        self._cid_lengths: dict[int, int] = {}
        #: Short-header QUIC packets from an unrouted address handed over by connection id.
        self.migrating_quic = 0

    def register(self, session_id: bytes, handler: IPacketHandler) -> None:
        """Route C{session_id}'s packets to C{handler} (replacing any previous one)."""
        self._handlers[session_id] = handler

    def unregister(self, session_id: bytes, handler: IPacketHandler) -> None:
        """Stop routing to C{handler} (no-op if another handler took over)."""
        if self._handlers.get(session_id) is handler:
            del self._handlers[session_id]

    def routeQuic(self, addr: Address, handler: IQuicHandler) -> None:
        """Hand the QUIC packets from C{addr} to C{handler} (replacing any previous one)."""
        self._quic[(addr[0], addr[1])] = handler

    def unrouteQuic(self, addr: Address, handler: IQuicHandler) -> None:
        """Stop handing C{addr}'s QUIC packets to C{handler} (no-op if another handler took over)."""
        key = (addr[0], addr[1])
        if self._quic.get(key) is handler:
            del self._quic[key]

    def routeCid(self, cid: bytes, handler: IQuicHandler) -> None:
        """Hand short-header QUIC packets for connection id C{cid} from unrouted addresses to C{handler}."""
        if cid not in self._cids:
            self._cid_lengths[len(cid)] = self._cid_lengths.get(len(cid), 0) + 1
        self._cids[cid] = handler

    def unrouteCid(self, cid: bytes, handler: IQuicHandler) -> None:
        """Stop handing C{cid}'s packets to C{handler} (no-op if another handler took over)."""
        if self._cids.get(cid) is handler:
            del self._cids[cid]
            left = self._cid_lengths[len(cid)] - 1
            if left:
                self._cid_lengths[len(cid)] = left
            else:
                del self._cid_lengths[len(cid)]

    def cidRoutes(self) -> int:
        """How many connection ids QUIC is routed for now."""
        return len(self._cids)

    def quicRoutes(self) -> int:
        """How many remote addresses QUIC is routed for now."""
        return len(self._quic)

    def sendTo(self, data: bytes, addr: Address) -> None:
        """Send one datagram from the shared socket; errors are logged, not raised."""
        if self.transport is None:
            self.log.warn("punch socket not open; dropping a datagram to {addr}", addr=addr)
            return
        try:
            self.transport.write(data, addr)
        except OSError as e:
            # ICMP errors surface here on connected-less sockets too; a
            # punch path simply does not exist yet, which is no failure.
            self.log.debug("sending to {addr} failed: {error}", addr=addr, error=e)

    def getHost(self):
        """The local address of the shared socket."""
        return self.transport.getHost()

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        if is_quic(data):
            self._quicReceived(data, (addr[0], addr[1]))
            return
        try:
            packet = decode(data)
        except PunchDecodeError as e:
            self.undecodable += 1
            self.log.debug("dropping a non-punch datagram from {addr}: {error}", addr=addr, error=e)
            return
        handler = self._handlers.get(packet.session_id)
        if handler is None:
            self.unrouted += 1
            self.log.debug(
                "dropping a {type} for unknown session {session!r} from {addr}",
                type=packet.type.name,
                session=packet.session_id,
                addr=addr,
            )
            return
        handler.packetReceived(packet, addr)

    def _quicReceived(self, data: bytes, addr: Address) -> None:
        handler = self._quic.get(addr)
        if handler is None and data[0] & 0x80 == 0:
            # Short header (RFC 9000 section 17.3): 1 byte, then the destination connection id.
            for length in self._cid_lengths:
                handler = self._cids.get(data[1 : 1 + length])
                if handler is not None:
                    self.migrating_quic += 1
                    break
        if handler is None:
            self.unsolicited_quic += 1
            self.log.debug("dropping unsolicited QUIC ({size} bytes) from {addr}", size=len(data), addr=addr)
            return
        handler.datagramReceived(data, addr)

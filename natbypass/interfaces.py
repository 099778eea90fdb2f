"""
The public API of NATbypass, as zope Interfaces.

An application embeds an L{IPeer} service, asks it to C{connect} to a
peer (or C{listen} for peers that connect to it) and receives
L{IPeerConnection} objects.  It attaches an L{IPeerReceiver} to
each connection to be given what arrives and to be told when the path dies.

Why the shape: one connection to a peer, whichever protocol won, carries
messages (C{send}/C{IPeerReceiver}) and any number of byte streams
(C{openStream}, L{IStreamHandler}; each stream a Twisted transport for an
ordinary C{IProtocol}), always encrypted and authenticated by both sides'
keys.  L{IPeer.serve} and L{IPeer.openStream} (and the C{natbypass:}
endpoints built on them) are the usual way in.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IPeerReceiver(Interface):
    """
    What the application gives a connection to be handed its data.

    Mirrors C{IProtocol}'s two callbacks so a Twisted programmer knows it.
    """

    def dataReceived(data: bytes) -> None:
        """
        One message arrived from the peer: exactly what it passed to one
        C{send} (streams go to their own protocols, not here).
        """

    def connectionLost(reason) -> None:
        """
        The path is gone (closed by either side, or found dead by the
        liveness check); C{reason} is a C{Failure} that says why.
        """


class IPeerConnection(Interface):
    """A direct, authenticated path to one peer, once hole punching succeeded."""

    peer_id = Attribute("The remote peer's id (str), as the mediator named it.")
    session_id = Attribute("The mediator's id (str) of the session this path belongs to.")
    protocol = Attribute('The transport protocol of the path: "udp" or "tcp".')
    delivery = Attribute(
        'What C{send} carries: "datagram" (message boundaries kept; unreliable QUIC DATAGRAM frames on the UDP '
        "path, reliable ordered messages on the TCP path).  Byte streams are opened with C{openStream}."
    )
    secure = Attribute(
        "True: data is encrypted and authenticated end to end (TLS 1.3 on the TCP path, QUIC on the UDP "
        "path), both sides proven by their pinned identity keys.  Every connection an application is "
        "handed is secure; there is no public way to send data unencrypted."
    )
    peer_fingerprint = Attribute(
        "The L{natbypass.identity.Fingerprint} of the key the peer proved it holds in the handshake."
    )
    cipher = Attribute(
        'What protects the path, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384" or "QUICv1 TLS_AES_128_GCM_SHA256".'
    )
    handshake_ms = Attribute("How long the secure handshake took, in ms, from the punched path to both sides proven.")
    punched_at = Attribute(
        "When the raw path was proven (seconds on the peer's clock), before the secure handshake on it "
        "finished: UDP, the path chosen (our probe ACKed or, role 1, the peer's QUIC Initial taken; else the "
        "first packet that proved the session key); TCP, the connected socket.  None if not known."
    )
    role = Attribute(
        "0 or 1, agreed by both sides without a round trip (the lower peer id "
        "is 0).  A layer on top uses it to pick who plays client: role 0 is "
        "the TLS/QUIC client."
    )
    outcome = Attribute(
        "How the path was made: a natbypass.punch.race.Outcome listing every attempt (protocol, "
        "result, start and end, reason), or None."
    )
    local_address = Attribute("Our end of the path, an IPv4Address/IPv6Address.")
    remote_address = Attribute("The peer's end of the path as we see it (after its NAT).")

    def setReceiver(receiver: IPeerReceiver) -> None:
        """
        Deliver what arrives from now on to C{receiver}.

        Data that arrives before a receiver is set is kept (up to a bound) and
        delivered when it is set, so nothing sent right after the connection
        was made is lost to a race.
        """

    def send(data: bytes) -> None:
        """
        Send C{data} to the peer as one message (raising C{ValueError} when it
        exceeds C{max_datagram_size}): unreliable on the UDP path (a QUIC
        DATAGRAM frame), reliable and ordered on the TCP path.  Sending on a
        closed connection is ignored.
        """

    max_datagram_size = Attribute("The largest message one send() carries on this path (bytes).")

    def close() -> None:
        """
        Close the path (tell the peer when the protocol can), stop its timers,
        and fire C{connectionLost} / C{whenLost} with C{ConnectionDone}.
        Idempotent.
        """

    def whenLost():
        """
        Return a new Deferred that fires (never errbacks) with the loss reason,
        a C{ConnectionDone} or C{ConnectionLost} exception instance, when the
        path is gone.  Fires at once if it is already gone.
        """

    def openStream(service: str, factory):
        """
        Open a new bidirectional stream to the peer's C{service} and run a
        protocol of C{factory} (an C{IProtocolFactory}) over it.

        Returns a Deferred that fires with the protocol once the peer accepted
        the stream (its C{connectionMade} has run), or fails with
        L{natbypass.streams.StreamRefused} (the peer's reason) or
        C{ConnectionLost}.  Cancelling it abandons the stream.  The protocol's
        transport is a L{natbypass.streams.StreamTransport}.
        """

    def setStreamHandler(handler: IStreamHandler | None) -> None:
        """Hand the streams the peer opens to us to C{handler} (None: refuse them all)."""

    streams = Attribute("How many streams are open on this connection (int).")


class IStreamHandler(Interface):
    """Decides what serves a stream a peer opened to us."""

    def streamRequested(connection: IPeerConnection, address):
        """
        The peer behind C{connection} opened a stream to C{address.service}
        (C{address} is the L{natbypass.streams.PeerAddress} the stream's
        C{getPeer} returns).  Return the C{IProtocol} to run over it, or raise
        L{natbypass.streams.StreamRefused} with a reason the opener is told;
        C{None} refuses with a generic reason.
        """


class IIncomingHandler(Interface):
    """What an application gives C{IPeer.listen} to be told of peers connecting in."""

    def connectionArrived(connection: IPeerConnection) -> None:
        """A peer connected to us; C{connection} is ready for C{setReceiver}."""


class IPeerApprover(Interface):
    """
    Decides which peers may connect to us, before anything is punched.

    An L{IIncomingHandler} may provide it too; C{IPeer.listen} then asks it.
    """

    def approvePeer(peer_id: str, fingerprint):
        """
        May C{peer_id}, whose registered key has C{fingerprint} (a
        L{natbypass.identity.Fingerprint}), connect?  Return a bool, or a
        Deferred that fires with one.  The handshake later proves the peer
        holds that key, so approving a fingerprint approves only its holder.
        """


class IPeer(Interface):
    """
    The service an application embeds to reach peers (an C{IService}).

    C{connect} returns a Deferred that fires with an L{IPeerConnection}
    or fails with the outcome of every attempt (see
    C{natbypass.punch.race.AllAttemptsFailed}); cancelling it stops the
    attempts.
    """

    peer_id = Attribute("Our own id at the mediator (str).")

    def startService() -> None:
        """Register with the mediator and gather candidates."""

    def stopService():
        """Close every connection and the mediator session; may return a Deferred."""

    def connect(peer_id: str, protocol: str = "auto"):
        """
        Open a direct path to C{peer_id}.

        C{protocol} is C{"auto"}, C{"udp"}, C{"tcp"} or a sequence of them
        in order of preference; see C{docs/selection.md}.
        """

    def reconnect(peer_id: str, protocol=None, fingerprint=None):
        """
        Open a fresh path to C{peer_id} (after the old one was lost, say):
        closes the live connection to it, if any, and connects again; the
        peer must prove the key the old connection proved unless
        C{fingerprint} says otherwise.  Fires like C{connect}.
        """

    def listen(handler: IIncomingHandler) -> None:
        """Hand connections that other peers open to us to C{handler}."""

    def serve(service: str, factory):
        """
        Serve streams that approved peers open to C{service} with protocols
        of C{factory} (an C{IProtocolFactory}; C{buildProtocol} is given the
        stream's L{natbypass.streams.PeerAddress}; returning None refuses).
        Returns an C{IListeningPort} whose C{stopListening} stops serving.
        Peers are approved as for C{listen} (an approver, or the allow list).
        """

    def openStream(peer_id: str, service: str, factory, protocol=None, fingerprint=None):
        """
        Open a stream to C{peer_id}'s C{service}: over the live connection to
        that peer when there is one (proven with the same pin), else over a new
        one (concurrent calls share it).  Fires like
        L{IPeerConnection.openStream}; fails like C{connect} when no path can
        be made.
        """

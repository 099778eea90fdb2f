"""
zope Interfaces of the signalling layer: what the mediator's protocol asks
of the state machine, what the state machine asks of a connection, and what
the peer-side client offers to the traversal engine.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IChannel(Interface):
    """One client connection as the state machine sees it: a sink for messages."""

    def send(message):
        """Write one C{natbypass.signaling.wire.Message} as a line."""

    def close():
        """Close the connection after pending writes (idempotent)."""

    def kernel_rtt():
        """
        The kernel's smoothed round-trip time of this connection in seconds
        (TCP_INFO), or None where there is none: known from the TCP handshake
        on, before the first ping has come back.
        """


class ISignalingState(Interface):
    """
    The mediator's signalling state machine: registrations, pending offers,
    sessions, limits and counters.  It never touches sockets; protocols hand
    it decoded messages and it answers through C{IChannel}.
    """

    def open(channel, source):
        """
        A connection from C{source} (the peer's IP as a string) arrived.
        Returns an opaque link handle for the other calls, or None when it was
        refused (the state has then already sent an error and closed it).
        """

    def received(link, message):
        """Handle one decoded message from the connection C{link}."""

    def malformed(link, error):
        """The connection sent a line that failed to decode (a C{WireError})."""

    def closed(link):
        """The connection is gone; forget it and tidy up what depended on it."""

    def sweep():
        """Periodic work: keepalive pings, idle timeouts, session expiry."""

    def status():
        """A dict of gauges and counters for the operator."""

    def shutdown():
        """The mediator is stopping: tell every connection so and close it."""


class ISignalingClient(Interface):
    """
    The peer's handle on the mediator.  It stays registered across
    reconnections; results arrive as Deferreds and events.
    """

    peer_id = Attribute("The id this peer registers under.")
    identity = Attribute(
        "The C{natbypass.identity.Identity} whose key this peer registers with: the mediator binds"
        " C{peer_id} to it and tells the other side of each session its fingerprint."
    )

    def whenRegistered():
        """Deferred that fires (with the peer id) once registered, now or after the next (re)connection."""

    def connect(peer_id, description):
        """
        Ask for an introduction to C{peer_id}; a Deferred firing with a
        C{natbypass.signaling.wire.Session}, or failing with a
        C{natbypass.signaling.client.SignalingError} subclass (rejected, unknown
        peer, timeout, gone).  Cancelling it abandons the attempt.
        """

    def set_offer_handler(handler):
        """
        C{handler(offer: IncomingOffer)} is called for every offer; it returns
        (or returns a Deferred of) an C{Accept}-like description to accept, or
        None / raises to reject.  Sessions created by accepting reach the
        session handler.
        """

    def set_session_handler(handler):
        """C{handler(session)} is called with each session this peer accepted."""

    def report(session_id, outcome, protocol=None, detail=None):
        """Tell the mediator how an attempt ended; Deferred firing with None."""

    def publish(description):
        """Publish our mapped candidates, NAT summary and wish (kept, re-sent on reconnection): introductions in one round trip."""

    def repunch(session_id, mapped=None):
        """Ask the mediator to re-punch an established session's UDP path (docs/protocol.md 5.2); Deferred firing with None."""

    def setRepunchHandler(handler):
        """C{handler(notice)} is called with each C{RepunchNotice}: the other peer of a session asks to re-punch it."""

    def whenRevoked(session_id):
        """A Deferred that fires with the SignalingError if the mediator revokes a connect's session (the target refused)."""

    def ping():
        """Measure the round-trip time to the mediator; Deferred firing with seconds."""

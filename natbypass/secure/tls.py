"""
TLS 1.3 over a punched TCP path, both sides authenticated by pinned keys.

The TCP path exists before TLS does (simultaneous open, or an accept on the
punching port: L{natbypass.punch.tcp}), so TLS starts on an already-connected
transport: L{start_tls} builds a C{TLSMemoryBIOProtocol} over it and the
caller routes the transport's later C{dataReceived}/C{connectionLost} to
L{SecureTLS.protocol} (or sets C{transport.protocol} to it).

Each side presents the self-signed certificate of its identity key and checks
the other's against a L{natbypass.trust.PeerCheck} (usually L{pinned}): no CA,
no host name, no dates: the pin is the check.  TLS 1.3's CertificateVerify
then proves the peer holds that key, over a transcript that includes both
sides' key shares, so nobody without the key -- not even whoever knows the
punch session key -- can stand in the middle.  Role 0 is the TLS client.

The client checks the server's certificate (the verify callback) while it
processes the server's flight, before it sends its own certificate: a client
shows its certificate only to a server that proved the pinned key.  The
server shows its certificate to any client that sends a ClientHello.

Each side reports success (and connects its application) when I{its} TLS
handshake completes: the client once the server proved its key (one round
trip), the server once the client did (half a round trip later).  In TLS 1.3
the client completes before the server has checked the client's certificate,
so a server that refuses the client's key does so on a channel the client
already counts as ready: the server sends an alert and never connects its
application, so nothing the client sent is delivered, and the client's
application loses the connection with a L{PeerRefusedUs} reason that names
its key.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.identity import Fingerprint, Identity
from natbypass.trust import PeerCheck, PeerRejected, as_check

__all__ = ["ALPN", "PeerRefusedUs", "PinnedTLS", "SecureTLS", "start_tls"]

#: The ALPN protocol both sides offer.
ALPN = b"natbypass/2"


class PeerRefusedUs(Exception):
    """
    The peer ended TLS with an alert, during the handshake or (on the client)
    before it sent any application data: almost always because it does not
    accept our key.  The message names our fingerprint, so the user can
    check it with the peer.
    """


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class PinnedTLS:
    """
    Makes the OpenSSL connection of I{one} TLS path: our identity
    certificate, TLS 1.3 only, no resumption, and a peer certificate checked
    against C{expected}.

    Usable anywhere Twisted takes a connection creator
    (C{TLSMemoryBIOFactory}, C{transport.startTLS}).  After a failed
    handshake, L{rejection} says why the peer's key was refused; after a
    successful one, L{peer_fingerprint} is the key it proved it holds.

    @param identity: our key.
    @param expected: the fingerprint we pin, or a L{PeerCheck}.
    @param clock: dates our certificate (see L{Identity.certificate}).
    @param certificate: our certificate, if already made (else a new one).
    """

    log = Logger()

    def __init__(
        self,
        identity: Identity,
        expected: Fingerprint | PeerCheck,
        clock: IReactorTime,
        certificate: x509.Certificate | None = None,
    ) -> None:
        self._identity = identity
        self._check = as_check(expected)
        self._certificate = certificate if certificate is not None else identity.certificate(clock)
        self.peer_fingerprint: Fingerprint | None = None
        self.rejection: PeerRejected | None = None

    def context(self, is_client: bool) -> SSL.Context:
        """A new OpenSSL context for one side of the path."""
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.use_certificate(crypto.X509.from_cryptography(self._certificate))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(self._identity.private_key))
        ctx.check_privatekey()
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE, self._verify)
        if is_client:
            ctx.set_alpn_protos([ALPN])
        else:
            ctx.set_alpn_select_callback(self._selectALPN)
        return ctx

    def _selectALPN(self, conn: SSL.Connection, offered: list[bytes]) -> Any:
        return ALPN if ALPN in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        # OpenSSL's own verdict (always "self-signed") is ignored: only the
        # leaf matters, and only its key, which the handshake's
        # CertificateVerify then proves the peer holds.  Never raises.
        if depth != 0:
            return True
        presented = Fingerprint.of_certificate(cert.to_cryptography())
        try:
            self._check(presented)
        except PeerRejected as e:
            self.rejection = e
            self.log.warn("TLS peer refused: {reason}", reason=str(e))
            return False
        except Exception as e:  # a PeerCheck must never break OpenSSL's callback
            self.rejection = PeerRejected(f"the key check failed: {e!r}")
            self.log.failure("TLS key check raised", Failure())
            return False
        self.peer_fingerprint = presented
        return True

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.context(True), None)
        conn.set_app_data(tlsProtocol)
        return conn

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.context(False), None)
        conn.set_app_data(tlsProtocol)
        return conn


def _alert(reason: Failure) -> str | None:
    """The TLS alert that ended a connection, if one did, in OpenSSL's words (e.g. C{"tlsv1 alert unknown ca"})."""
    if not reason.check(SSL.Error):
        return None
    errors = reason.value.args[0] if reason.value.args and isinstance(reason.value.args[0], list) else []
    for error in errors:
        text = str(error[-1]) if isinstance(error, tuple) and error else str(error)
        if "alert" in text:
            return text
    message = reason.getErrorMessage()
    return message if "alert" in message else None


@implementer(IHandshakeListener)
class _Gate(Protocol):
    """
    Sits between TLS and the application: connects the application only once
    TLS has authenticated the peer (the verify callback passed and the
    handshake completed), and fires the handshake Deferred.
    """

    def __init__(self, secure: SecureTLS, app: IProtocol, is_client: bool) -> None:
        self._secure = secure
        self._app = app
        self._is_client = is_client
        self._open = False
        #: Whether the peer sent any application data (which a server only
        #: does once it accepted our key).
        self._heard = False

    def handshakeCompleted(self) -> None:
        tls = self.transport
        creator = self._secure.creator
        peer = tls.getPeerCertificate()
        if peer is None or creator.peer_fingerprint is None:
            tls.abortConnection()
            return
        proved = Fingerprint.of_certificate(peer.to_cryptography())
        if not proved.matches(creator.peer_fingerprint):
            tls.abortConnection()
            return
        self._secure.peer_fingerprint = proved
        self._open = True
        self._app.makeConnection(tls)
        self._secure._handshakeDone()

    def dataReceived(self, data: bytes) -> None:
        if self._open:  # TLS hands over no data before the handshake is done
            self._heard = True
            self._app.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._open:
            alert = _alert(reason)
            if self._is_client and not self._heard and alert is not None:
                reason = Failure(self._secure._refusedUs(f"TLS alert after the handshake: {alert}"))
            self._app.connectionLost(reason)
        self._secure._lost(reason)


class SecureTLS:
    """
    One TLS path being set up or in use; made by L{start_tls}.

    @ivar protocol: the C{TLSMemoryBIOProtocol}; route the transport's
        C{dataReceived} and C{connectionLost} to it.
    @ivar handshake: fires with the peer's L{Fingerprint} once TLS has
        authenticated the peer (the application protocol is connected just
        before): on the client, once the server proved its key, before the
        server has checked ours; or fails with L{PeerRejected} (we refused
        its key), L{PeerRefusedUs} (it ended the handshake with an alert: it
        refused ours), or the connection's loss.
    @ivar creator: the L{PinnedTLS} of this path.
    @ivar peer_fingerprint: the key the peer proved, once it did.
    """

    log = Logger()

    def __init__(
        self, creator: PinnedTLS, app: IProtocol, is_client: bool, clock: IReactorTime, our: Fingerprint
    ) -> None:
        self.creator = creator
        self.handshake: Deferred[Fingerprint] = Deferred()
        self.peer_fingerprint: Fingerprint | None = None
        self._our = our
        factory = TLSMemoryBIOFactory(creator, is_client, Factory(), clock=clock)
        self.protocol: TLSMemoryBIOProtocol = factory.protocol(factory, _Gate(self, app, is_client))

    @property
    def cipher(self) -> str:
        """
        The protocol version and cipher suite in use, e.g. C{"TLSv1.3
        TLS_AES_256_GCM_SHA384"}, from the OpenSSL connection (C{""} before
        the handshake chose them).
        """
        conn = self.protocol.getHandle()
        name = conn.get_cipher_name() if conn is not None else None
        return f"{conn.get_protocol_version_name()} {name}" if name else ""

    def exporter(self, label: bytes, length: int = 32) -> bytes:
        """
        The TLS exporter value (RFC 8446 section 7.5, no context) for
        C{label}: derived from this connection's handshake secret and
        transcript, so known only to its two endpoints and unique to it.
        Usable once the handshake is done.
        """
        conn = self.protocol.getHandle()
        if not self.handshake.called or conn is None:
            raise RuntimeError("the TLS exporter is defined only once the handshake is done, while connected")
        value = conn.export_keying_material(label, length)
        if value is None:
            raise RuntimeError("OpenSSL exported no keying material")
        return bytes(value)

    def send_now(self, data: bytes) -> None:
        """
        Encrypt C{data} and hand it to the transport at once.

        C{TLSMemoryBIOProtocol.write} (as Twisted sets it up) gathers small
        writes until the next reactor turn; this one goes out right behind
        whatever TLS has just produced, e.g. in the same flight as the
        client's Finished when called from the handshake callback.
        """
        TLSMemoryBIOProtocol.write(self.protocol, data)

    def _handshakeDone(self) -> None:
        self.log.info("TLS peer authenticated as {fingerprint}", fingerprint=str(self.peer_fingerprint))
        if not self.handshake.called:
            self.handshake.callback(self.peer_fingerprint)

    def _refusedUs(self, how: str) -> PeerRefusedUs:
        return PeerRefusedUs(f"the peer refused our key {self._our} ({how}); check that it pins or allows {self._our}")

    def _lost(self, reason: Failure) -> None:
        if self.handshake.called:
            return
        alert = _alert(reason)
        if self.creator.rejection is not None:
            self.handshake.errback(Failure(self.creator.rejection))
        elif alert is not None:
            self.handshake.errback(Failure(self._refusedUs(f"it ended the TLS handshake: {alert}")))
        else:
            self.handshake.errback(reason)


def start_tls(
    transport: ITransport,
    app: IProtocol,
    identity: Identity,
    expected: Fingerprint | PeerCheck,
    role: int,
    clock: IReactorTime,
    certificate: x509.Certificate | None = None,
) -> SecureTLS:
    """
    Start TLS on an already-connected stream C{transport}.

    @param app: the application protocol; connected to the TLS transport once
        TLS authenticated the peer, never before (see L{SecureTLS.handshake}).
    @param expected: the peer's pinned fingerprint or a L{PeerCheck}.
    @param role: the path's role; 0 is the TLS client, 1 the server.
    @param clock: the reactor's clock (TLS write batching, certificate dates).
    @return: the L{SecureTLS}; route the transport's later events to its
        C{protocol}.
    """
    if role not in (0, 1):
        raise ValueError("role is 0 (TLS client) or 1 (TLS server)")
    creator = PinnedTLS(identity, expected, clock, certificate)
    secure = SecureTLS(creator, app, role == 0, clock, identity.fingerprint)
    secure.protocol.makeConnection(transport)
    return secure

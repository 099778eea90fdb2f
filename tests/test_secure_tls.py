"""Tests for natbypass.secure.tls."""

from __future__ import annotations

import os
import shutil

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from natbypass.identity import Identity
from natbypass.punch.tcp import EXPORTER_LABEL
from natbypass.secure.tls import ALPN, PeerRefusedUs, PinnedTLS, start_tls
from natbypass.trust import PeerRejected

ALICE, BOB, MALLORY = Identity.generate(), Identity.generate(), Identity.generate()


class Collect(Protocol):
    """The application protocol: records what arrives; echoes when told to."""

    def __init__(self, echo: bool = False) -> None:
        self.data = b""
        self.made = False
        self.lost: Failure | None = None
        self.echo = echo

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.echo:
            self.transport.write(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


class Adopter(Protocol):
    """
    Stands for an adopted TCP path: a plaintext line first (bytes before TLS,
    which the TCP punch no longer sends but which must not confuse TLS), then
    TLS on the same transport, with whatever followed the line in the same
    read handed to TLS.
    """

    def __init__(self, identity: Identity, expected, role: int, clock, app: Protocol, certificate=None) -> None:
        self.args = (identity, expected, role, clock)
        self.certificate = certificate
        self.app = app
        self.buffer = b""
        self.secure = None

    def connectionMade(self) -> None:
        self.transport.write(b"PUNCHED\n")

    def dataReceived(self, data: bytes) -> None:
        if self.secure is not None:
            self.secure.protocol.dataReceived(data)
            return
        self.buffer += data
        if b"\n" in self.buffer:
            _, rest = self.buffer.split(b"\n", 1)
            self.secure = start_tls(self.transport, self.app, *self.args, certificate=self.certificate)
            if rest:
                self.secure.protocol.dataReceived(rest)

    def connectionLost(self, reason: Failure) -> None:
        if self.secure is not None:
            self.secure.protocol.connectionLost(reason)


class Wire(iosim.FakeTransport):
    """A fake TCP transport that keeps a copy of every byte written to it."""

    def __init__(self, protocol: Protocol, isServer: bool) -> None:
        super().__init__(protocol, isServer)
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data
        super().write(data)


def pair(client: tuple, server: tuple, clock: Clock):
    """Connect two adopters (role 0 = client side) over an in-memory TCP pair."""
    c = Adopter(*client, clock=clock, app=Collect())
    s = Adopter(*server, clock=clock, app=Collect(echo=True))
    pump = iosim.connect(s, iosim.makeFakeServer(s), c, iosim.makeFakeClient(c), greet=False, clock=clock)
    for _ in range(20):
        pump.pump()
    return c, s, pump


def result(d: defer.Deferred):
    out: list = []
    d.addBoth(out.append)
    return out[0] if out else None


class PinnedTLSTests(SynchronousTestCase):
    def test_interfaces_and_context(self) -> None:
        creator = PinnedTLS(ALICE, BOB.fingerprint, Clock())
        self.assertTrue(verifyObject(IOpenSSLClientConnectionCreator, creator))
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, creator))
        conn = creator.clientConnectionForTLS(None)
        self.assertIsInstance(conn, SSL.Connection)

    def test_right_keys_connect(self) -> None:
        clock = Clock()
        c, s, pump = pair((ALICE, BOB.fingerprint, 0), (BOB, ALICE.fingerprint, 1), clock)
        self.assertEqual(result(c.secure.handshake), BOB.fingerprint)
        self.assertEqual(result(s.secure.handshake), ALICE.fingerprint)
        self.assertTrue(c.app.made and s.app.made)
        self.assertEqual(c.secure.protocol.getHandle().get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(c.secure.protocol.negotiatedProtocol, ALPN)
        self.assertEqual(c.secure.cipher, s.secure.cipher)
        self.assertRegex(c.secure.cipher, r"^TLSv1\.3 TLS_")
        c.app.transport.write(b"ping")
        for _ in range(5):
            pump.pump()
        self.assertEqual((s.app.data, c.app.data), (b"ping", b"ping"))

    def test_server_refuses_wrong_client_key(self) -> None:
        """
        The client is ready once the server proved its key (TLS 1.3: before the
        server checked the client's); the server refuses, delivers nothing, and
        the client's application loses the connection saying its key was refused.
        """
        clock = Clock()
        c, s, pump = pair((MALLORY, BOB.fingerprint, 0), (BOB, ALICE.fingerprint, 1), clock)
        failure = result(s.secure.handshake)
        self.assertIsInstance(failure, Failure)
        failure.trap(PeerRejected)
        self.assertIn(f"is {MALLORY.fingerprint}, expected {ALICE.fingerprint}", failure.getErrorMessage())
        self.assertFalse(s.app.made)
        self.assertEqual(result(c.secure.handshake), BOB.fingerprint)
        self.assertTrue(c.app.made)
        c.app.lost.trap(PeerRefusedUs)
        self.assertIn(f"the peer refused our key {MALLORY.fingerprint}", c.app.lost.getErrorMessage())
        self.assertIn("alert", c.app.lost.getErrorMessage())
        self.assertEqual(s.app.data, b"")

    def test_client_refuses_wrong_server_key(self) -> None:
        clock = Clock()
        c, s, pump = pair((ALICE, BOB.fingerprint, 0), (MALLORY, ALICE.fingerprint, 1), clock)
        failure = result(c.secure.handshake)
        failure.trap(PeerRejected)
        self.assertIn(str(MALLORY.fingerprint), failure.getErrorMessage())
        self.assertFalse(c.app.made)
        self.assertFalse(s.app.made)
        refused = result(s.secure.handshake)
        refused.trap(PeerRefusedUs)
        self.assertIn(f"the peer refused our key {MALLORY.fingerprint}", refused.getErrorMessage())

    def test_stolen_certificate_without_key_is_unusable(self) -> None:
        """
        Mallory has Bob's (public) certificate but only her own key: OpenSSL
        will not pair them, so she cannot even offer it.  (The QUIC tests
        show the same forgery refused on the wire, where the stack allows it.)
        """
        creator = PinnedTLS(MALLORY, ALICE.fingerprint, Clock(), certificate=BOB.certificate(Clock()))
        self.assertRaises(SSL.Error, creator.serverConnectionForTLS, None)

    def records(self, data: bytes) -> list[tuple[int, int]]:
        """The (content type, length) of each TLS record in C{data}."""
        out = []
        while data:
            out.append((data[0], int.from_bytes(data[3:5], "big")))
            data = data[5 + out[-1][1] :]
        return out

    def test_client_checks_server_before_sending_its_certificate(self) -> None:
        """
        OpenSSL runs the client's verify callback (our pin check) while it reads
        the server's flight, before it writes its own certificate: when the check
        runs, the client has sent nothing but its ClientHello.
        """
        clock = Clock()
        sent_at_check: list[bytes] = []

        def check(fingerprint) -> None:
            sent_at_check.append(client_wire.sent)
            if fingerprint != BOB.fingerprint:
                raise PeerRejected("not bob")

        client = Adopter(ALICE, check, 0, clock, app=Collect())
        server = Adopter(BOB, ALICE.fingerprint, 1, clock, app=Collect())
        client_wire = Wire(client, isServer=False)
        pump = iosim.connect(server, Wire(server, isServer=True), client, client_wire, greet=False, clock=clock)
        for _ in range(20):
            pump.pump()
        self.assertEqual(result(server.secure.handshake), ALICE.fingerprint)
        # The callback runs more than once for the one certificate; every time, before our certificate.
        before = sent_at_check[0]
        self.assertEqual(set(sent_at_check), {before})
        self.assertEqual(self.records(before[len(b"PUNCHED\n") :]), [(0x16, len(before) - len(b"PUNCHED\n") - 5)])
        self.assertGreater(
            len(client_wire.sent), len(before) + 300
        )  # then its Certificate, CertificateVerify, Finished

    def test_client_certificate_never_shown_to_wrong_server(self) -> None:
        """
        A server with another key than the pinned one never gets the client's
        certificate: its own check is never called, and after its ClientHello the
        client sends only an alert (one short record), far too small for a
        certificate.
        """
        clock = Clock()
        seen: list = []
        client = Adopter(ALICE, BOB.fingerprint, 0, clock, app=Collect())
        server = Adopter(MALLORY, seen.append, 1, clock, app=Collect())
        client_wire = Wire(client, isServer=False)
        pump = iosim.connect(server, Wire(server, isServer=True), client, client_wire, greet=False, clock=clock)
        for _ in range(20):
            pump.pump()
        result(client.secure.handshake).trap(PeerRejected)
        result(server.secure.handshake).trap(PeerRefusedUs)
        self.assertEqual(seen, [])
        self.assertIsNone(server.secure.creator.peer_fingerprint)
        (hello, *after) = self.records(client_wire.sent[len(b"PUNCHED\n") :])
        self.assertEqual(hello[0], 0x16)
        self.assertEqual(len(after), 1)
        self.assertLess(after[0][1], 64)

    def test_peer_check_callable(self) -> None:
        seen = []
        clock = Clock()
        c, s, _ = pair((ALICE, seen.append, 0), (BOB, ALICE.fingerprint, 1), clock)
        self.assertEqual(seen[-1:], [BOB.fingerprint])
        self.assertEqual(result(c.secure.handshake), BOB.fingerprint)

    def test_role_validated(self) -> None:
        self.assertRaises(ValueError, start_tls, None, Protocol(), ALICE, BOB.fingerprint, 2, Clock())


def _write_pem(path: str, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


class OpenSSLInteropTests(TestCase):
    """
    Our TLS server side against OpenSSL's C{s_client}, over loopback.

    The server is made exactly as the TCP path makes role 1's side of every
    connection (C{natbypass.punch.tcp}: C{start_tls(transport, app, identity,
    security.verify, 1, reactor, certificate=...)}); the certificate is passed
    in so that s_client can pin it with C{-CAfile}.  s_client cannot send the
    TCP path's SELECT (a MAC with the session key over the TLS exporter), so
    these tests stop at the TLS layer; they check that the exporter SELECT
    covers is the standard one (s_client C{-keymatexport}).  SELECT itself is
    covered in C{tests/test_punch_tcp.py} and C{tests/test_tcp_security.py}.
    """

    timeout = 30

    def setUp(self) -> None:
        self.openssl = shutil.which("openssl")
        if self.openssl is None:
            raise self.skipTest("the openssl command is not installed (apt-get install openssl)")
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.secure: list = []
        self.exported: list[bytes] = []
        # s_client can only pin a whole certificate (-CAfile), so the server
        # uses this one and the tests hand it to s_client.
        self.bob_cert = BOB.certificate(reactor)
        self.bob_pem = _write_pem(
            os.path.join(self.dir, "bob.crt"), self.bob_cert.public_bytes(serialization.Encoding.PEM)
        )
        test = self

        class Server(Protocol):
            def connectionMade(self) -> None:
                app = Collect()
                app.connectionMade = lambda: app.transport.write(b"hello-from-natbypass\n")
                self.secure = start_tls(
                    self.transport, app, BOB, ALICE.fingerprint, 1, reactor, certificate=test.bob_cert
                )
                test.secure.append(self.secure)
                self.secure.handshake.addCallback(self.export)

            def export(self, fingerprint):
                test.exported.append(self.secure.exporter(EXPORTER_LABEL))
                return fingerprint

            def dataReceived(self, data: bytes) -> None:
                self.secure.protocol.dataReceived(data)

            def connectionLost(self, reason: Failure) -> None:
                self.secure.protocol.connectionLost(reason)

        self.port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def write_identity(self, name: str, identity: Identity) -> tuple[str, str]:
        cert = identity.certificate(reactor).public_bytes(serialization.Encoding.PEM)
        return (
            _write_pem(os.path.join(self.dir, name + ".crt"), cert),
            _write_pem(os.path.join(self.dir, name + ".key"), identity.private_pem()),
        )

    def s_client(self, cert: str, key: str, ca: str) -> defer.Deferred:
        args = [
            "s_client",
            "-connect",
            f"127.0.0.1:{self.port.getHost().port}",
            "-tls1_3",
            "-alpn",
            ALPN.decode(),
            "-cert",
            cert,
            "-key",
            key,
            "-CAfile",
            ca,
            "-verify_return_error",
            "-ign_eof",
            "-keymatexport",
            EXPORTER_LABEL.decode(),
            "-keymatexportlen",
            "32",
        ]
        # stdin closes at once; -ign_eof keeps s_client reading until the server hangs up.
        return getProcessOutputAndValue(self.openssl, args, env=os.environ, reactor=reactor)

    def hang_up_later(self) -> None:
        # The server app sends its line once the client is authenticated; the
        # test then hangs up so s_client exits.
        def close():
            for secure in self.secure:
                if secure.handshake.called:
                    secure.protocol.loseConnection()

        call = reactor.callLater(1.0, close)
        self.addCleanup(lambda: call.active() and call.cancel())

    @defer.inlineCallbacks
    def test_right_client_key(self):
        cert, key = self.write_identity("alice", ALICE)
        self.hang_up_later()
        out, err, code = yield self.s_client(cert, key, self.bob_pem)
        self.assertEqual(len(self.secure), 1)
        fingerprint = yield self.secure[0].handshake
        self.assertEqual(fingerprint, ALICE.fingerprint)
        # The server's application speaks first, once it accepted the client's key.
        self.assertIn(b"\nhello-from-natbypass", out)
        self.assertIn(b"TLSv1.3", out)
        # The TLS exporter the TCP path's SELECT covers is RFC 8446's, as OpenSSL computes it.
        self.assertIn(b"Keying material: " + self.exported[0].hex().upper().encode(), out)

    @defer.inlineCallbacks
    def test_wrong_client_key_refused(self):
        cert, key = self.write_identity("mallory", MALLORY)
        self.hang_up_later()
        out, err, code = yield self.s_client(cert, key, self.bob_pem)
        self.assertNotIn(b"hello-from-natbypass", out)
        with self.assertRaises(PeerRejected) as e:
            yield self.secure[0].handshake
        self.assertIn(str(MALLORY.fingerprint), str(e.exception))

    @defer.inlineCallbacks
    def test_client_pin_of_server(self):
        """s_client trusting only Mallory's certificate refuses our server (Bob)."""
        cert, key = self.write_identity("alice", ALICE)
        other = os.path.join(self.dir, "mallory.crt")
        _write_pem(other, MALLORY.certificate(reactor).public_bytes(serialization.Encoding.PEM))
        self.hang_up_later()
        out, err, code = yield self.s_client(cert, key, other)
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"hello-from-natbypass", out)
        self.assertIn(b"verify error", out + err)
        with self.assertRaises(PeerRefusedUs) as e:
            yield self.secure[0].handshake
        self.assertIn(str(BOB.fingerprint), str(e.exception))

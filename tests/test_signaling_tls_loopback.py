"""
The peer's checks of the mediator's certificate, over real loopback sockets
with a throwaway CA: an unverified C{ssl:} client string is refused, and a
certificate whose subjectAltName does not name the host (or that has none,
which service-identity reports as a C{CertificateError}, not a
C{VerificationError}) fails the connection instead of being logged and let
through.
"""

from __future__ import annotations

import ipaddress
import os

from cryptography import x509
from service_identity import CertificateError, VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from natbypass.app import peer_tap
from natbypass.signaling.client import check_mediator_endpoint, client_endpoint
from natbypass.signaling.service import makeSignalingService
from natbypass.testing.tls import Greeted, make_ca, make_server_cert, pem_cert, pem_key


class CertificateCheckTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca, self.ca_key = make_ca("NATbypass test CA")
        self.ca_pem = self.write("ca.pem", pem_cert(self.ca))

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    @inlineCallbacks
    def mediator(self, names: list[x509.GeneralName] | None, common_name: str = "localhost"):
        """A signalling service on 127.0.0.1 whose certificate has C{names} as subjectAltName; its port."""
        cert, key = make_server_cert(self.ca, self.ca_key, common_name, names if names is not None else [])
        tag = str(len(os.listdir(self.dir)))
        cert_pem, key_pem = self.write(f"cert{tag}.pem", pem_cert(cert)), self.write(f"key{tag}.pem", pem_key(key))
        svc = makeSignalingService(
            f"ssl:0:interface=127.0.0.1:privateKey={key_pem}:certKey={cert_pem}", reactor, status_interval=0
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        port = yield svc.whenListening()
        return port.getHost().port

    @inlineCallbacks
    def probe(self, description: str, ca: str | None) -> Deferred:
        """Connect, read the greeting (if TLS lets any through); the bytes and why the connection ended."""
        proto = yield client_endpoint(reactor, description, ca=ca).connect(Factory.forProtocol(Greeted))
        reason = yield proto.lost
        return proto.data, reason

    @inlineCallbacks
    def test_no_subject_alt_name_refused(self) -> None:
        """
        A certificate with no subjectAltName names no host, whatever its CN
        says.  Twisted's verify callback only fails the handshake on a
        VerificationError; service-identity raises CertificateError here, which
        Twisted logged and then carried on with the connection.
        """
        port = yield self.mediator(None)
        data, reason = yield self.probe(f"tls:localhost:{port}", self.ca_pem)
        self.assertEqual(data, b"")
        self.assertIsInstance(reason, CertificateError)
        self.assertIn("subjectAltName", str(reason))

    @inlineCallbacks
    def test_no_subject_alt_name_refused_for_an_ip(self) -> None:
        port = yield self.mediator(None, common_name="127.0.0.1")
        data, reason = yield self.probe(f"tls:127.0.0.1:{port}", self.ca_pem)
        self.assertEqual(data, b"")
        self.assertIsInstance(reason, CertificateError)

    @inlineCallbacks
    def test_other_name_refused(self) -> None:
        port = yield self.mediator([x509.DNSName("mediator.example")])
        data, reason = yield self.probe(f"tls:localhost:{port}", self.ca_pem)
        self.assertEqual(data, b"")
        self.assertIsInstance(reason, VerificationError)
        self.assertIn("DNSMismatch", str(reason))

    @inlineCallbacks
    def test_ip_subject_alt_name_accepted(self) -> None:
        """An IP mediator is checked against the certificate's IP addresses."""
        port = yield self.mediator([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], common_name="127.0.0.1")
        data, _ = yield self.probe(f"tls:127.0.0.1:{port}", self.ca_pem)
        self.assertIn(b'"proto":"natbypass-signal"', data)

    @inlineCallbacks
    def test_keyword_form_verified(self) -> None:
        port = yield self.mediator([x509.DNSName("localhost")])
        data, _ = yield self.probe(f"tls:port={port}:host=localhost:timeout=5", self.ca_pem)
        self.assertIn(b'"proto":"natbypass-signal"', data)

    @inlineCallbacks
    def test_system_roots_without_ca(self) -> None:
        """Without --ca the system's roots decide, and they do not know the throwaway CA."""
        port = yield self.mediator([x509.DNSName("localhost")])
        data, reason = yield self.probe(f"tls:localhost:{port}", None)
        self.assertEqual(data, b"")
        self.assertIn("certificate verify failed", str(reason))


class ClientStringTests(SynchronousTestCase):
    """Which client strings name a mediator whose certificate is checked."""

    def test_ssl_refused(self) -> None:
        """
        A Twisted C{ssl:HOST:PORT} client string checks nothing at all (no
        chain, no name): anyone on the path could play the mediator.
        """
        for description in ("ssl:mediator.example:7443", "ssl:host=mediator.example:port=7443:hostname=m"):
            with self.assertRaises(ValueError, msg=description) as caught:
                client_endpoint(MemoryReactor(), description)
            self.assertIn("tls:HOST:PORT", str(caught.exception))
            self.assertIn("--ca", str(caught.exception))

    def test_ssl_refused_with_ca(self) -> None:
        self.assertRaises(ValueError, client_endpoint, MemoryReactor(), "ssl:mediator.example:7443", ca="ca.pem")

    def test_peer_plugin_says_what_to_use(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            peer_tap.Options().parseOptions(["--mediator", "ssl:mediator.example:7443", "--id", "bob"])
        self.assertIn("tls:HOST:PORT", str(caught.exception))

    def test_tls_forms(self) -> None:
        """Positional and keyword host and port, escaped IPv6 colons, a timeout: all understood."""
        for description in (
            "tls:mediator.example:7443",
            "tls:port=7443:host=mediator.example",
            "tls:mediator.example:7443:timeout=5",
            "tls:\\:\\:1:7443",
        ):
            check_mediator_endpoint(description, None)
            check_mediator_endpoint(description, "ca.pem")
            self.assertTrue(IStreamClientEndpoint.providedBy(client_endpoint(MemoryReactor(), description)))

    def test_tls_unsupported_options(self) -> None:
        for description in (
            "tls:mediator.example:7443:trustRoots=/etc/ca",
            "tls:mediator.example",
            "tls:mediator.example:https",
            "tls:mediator.example:7443:extra",
        ):
            with self.assertRaises(ValueError, msg=description):
                check_mediator_endpoint(description, None)

    def test_tcp_unchanged(self) -> None:
        check_mediator_endpoint("tcp:mediator.example:7000", None)
        with self.assertRaises(ValueError) as caught:
            check_mediator_endpoint("tcp:mediator.example:7000", "ca.pem")
        self.assertIn("--ca", str(caught.exception))

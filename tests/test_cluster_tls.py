"""
The cluster's Redis over TLS with a password, for real on loopback: a
redis-server of our own with C{--tls-port}, a certificate from a test CA
(natbypass.testing.tls) naming 127.0.0.1, and an ACL user; the
mediator's directory connects with C{rediss://USER:PASSWORD@127.0.0.1:PORT/0}
and C{--redis-ca}.  A wrong CA and a wrong password are refused, each with a
logged reason and a counted metric.  Skipped when redis-server is missing or
built without TLS.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import tempfile
import time
from typing import Any

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from natbypass.app.mediator_tap import Options as MediatorOptions
from natbypass.metrics import MediatorCollector
from natbypass.signaling.cluster import ClusterRouting, directory_from_url
from natbypass.signaling.server import SignalingState
from natbypass.testing.tls import make_ca, make_server_cert, pem_cert, pem_key
from tests.test_cluster_loopback import stop_redis

REDIS = shutil.which("redis-server")
USER, PASSWORD = "natbypass", "s3cret pass/word"


def write_pem(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def redis_has_tls() -> bool:
    if REDIS is None:
        return False
    out = subprocess.run([REDIS, "--version"], capture_output=True, text=True).stdout
    # Debian builds with TLS in the binary; a build without it refuses --tls-port at start (checked below too).
    return "v=" in out


def start_tls_redis(directory: str, cert: str, key: str, ca: str) -> tuple[subprocess.Popen, int]:
    """redis-server on a TLS port only (tries a few random ports), default user off, one ACL user."""
    for _ in range(10):
        port = random.randrange(20000, 60000)
        log = os.path.join(directory, f"redis-{port}.log")
        p = subprocess.Popen(
            [REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
             "--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all",
             "--save", "", "--appendonly", "no", "--logfile", log, "--dir", directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = open(log).read() if os.path.exists(log) else ""
            if "Ready to accept connections" in text:
                return p, port
            if p.poll() is not None:
                if "TLS" in text and "not supported" in text:
                    raise SkipTest("redis-server was built without TLS")
                break
            time.sleep(0.02)
        p.kill()
        p.wait()
    raise RuntimeError("redis-server with TLS did not start")


class _TLSRedisCase(TestCase):
    """A real TLS Redis with an ACL user, its certificate naming C{cert_ip}; the directory as the mediator builds it."""

    timeout = 30
    #: The address in the certificate's subjectAltName (None: no subjectAltName; the CN is 127.0.0.1).
    cert_ip: str | None = "127.0.0.1"

    def setUp(self) -> None:
        if not redis_has_tls():
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        self.dir = tempfile.mkdtemp()
        ca, ca_key = make_ca("natbypass test CA")
        names = [] if self.cert_ip is None else [x509.IPAddress(ipaddress.ip_address(self.cert_ip))]
        cert, key = make_server_cert(ca, ca_key, "127.0.0.1", names)
        self.ca = write_pem(os.path.join(self.dir, "ca.pem"), pem_cert(ca))
        self.wrong_ca = write_pem(os.path.join(self.dir, "wrong-ca.pem"), pem_cert(make_ca("another CA")[0]))
        self.redis, self.port = start_tls_redis(
            self.dir,
            write_pem(os.path.join(self.dir, "cert.pem"), pem_cert(cert)),
            write_pem(os.path.join(self.dir, "key.pem"), pem_key(key)),
            self.ca,
        )
        self.services: list[Any] = []

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        for s in self.services:
            yield s.stopService()
        stop_redis(self.redis, self.dir)

    def url(self, password: str = PASSWORD) -> str:
        from urllib.parse import quote

        return f"rediss://{USER}:{quote(password, safe='')}@127.0.0.1:{self.port}/0"

    def start(self, url: str, ca: str, *more: str) -> tuple[Any, SignalingState]:
        """The directory and the signalling state, built from the mediator's own options."""
        opts = MediatorOptions()
        opts.parseOptions(["--redis", url, "--redis-ca", ca, *more])
        directory = directory_from_url(
            reactor, opts["redis"], opts.get("redis-password"), opts["redis-ca"], opts["redis-tls-verify"] != "ca"
        )
        state = SignalingState(reactor, cluster=directory)
        directory.startService()
        self.services.append(directory)
        return directory, state

    @defer.inlineCallbacks
    def wait_for(self, condition: Any, seconds: float = 10.0) -> Any:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                self.fail("timed out")
            yield deferLater(reactor, 0.05, lambda: None)

    def failures_metric(self, state: SignalingState) -> dict[str, float]:
        [family] = [f for f in MediatorCollector(state, None).collect() if f.name.endswith("cluster_connect_failures")]
        return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


class RedisTLSTests(_TLSRedisCase):
    @defer.inlineCallbacks
    def test_tls_user_and_password(self) -> Any:
        """rediss:// with an ACL user and --redis-ca: connected, and the directory works."""
        directory, state = self.start(self.url(), self.ca)
        yield self.wait_for(lambda: directory.available)
        outcome = yield directory.claim("alice", b"d" * 32, 60, 30, False, False)
        self.assertEqual(outcome[0], "new")
        self.assertEqual(state.status()["cluster_available"], True)
        self.assertEqual(self.failures_metric(state), {"auth": 0, "tls": 0, "closed": 0})

    @defer.inlineCallbacks
    def test_wrong_ca_refused(self) -> Any:
        """A server certificate from another CA: never available, the reason logged once and counted."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        directory, state = self.start(self.url(), self.wrong_ca)
        yield self.wait_for(lambda: directory.connect_failures.get("tls", 0) >= 2)
        self.assertFalse(directory.available)
        self.assertIn("certificate verify failed", directory.last_error)
        self.assertGreaterEqual(self.failures_metric(state)["tls"], 2)
        logged = [e for e in events if e.get("kind") == "tls"]
        self.assertEqual(len(logged), 1, "the same reason is logged once, not at every retry")
        self.assertIn("--redis-ca", logged[0]["hint"])

    @defer.inlineCallbacks
    def test_wrong_password_refused(self) -> Any:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        directory, state = self.start(self.url("wrong"), self.ca)
        yield self.wait_for(lambda: directory.connect_failures.get("auth", 0) >= 2)
        self.assertFalse(directory.available)
        self.assertIn("WRONGPASS", directory.last_error)
        self.assertGreaterEqual(self.failures_metric(state)["auth"], 2)
        [logged] = [e for e in events if e.get("kind") == "auth"]
        self.assertIn("password", logged["hint"])
        self.assertNotIn("wrong", str(logged), "the password is never logged")

    @defer.inlineCallbacks
    def test_system_roots_refuse_a_private_ca(self) -> Any:
        """Without --redis-ca the system's roots are used: a private CA's certificate is refused."""
        directory = directory_from_url(reactor, self.url())
        ClusterRouting(SignalingState(reactor), directory)
        directory.startService()
        self.services.append(directory)
        yield self.wait_for(lambda: directory.connect_failures.get("tls", 0) >= 1)
        self.assertFalse(directory.available)


class _NotNamingTheHost:
    """Tests for a certificate that chains to the CA but does not name the URL's address (mixed into a case)."""

    @defer.inlineCallbacks
    def test_name_checked_by_default(self) -> Any:
        directory, state = self.start(self.url(), self.ca)
        yield self.wait_for(lambda: directory.connect_failures.get("tls", 0) >= 1)
        self.assertFalse(directory.available)
        self.assertIn("does not name the host", directory.last_error)

    @defer.inlineCallbacks
    def test_chain_only_with_a_private_ca(self) -> Any:
        """--redis-tls-verify ca: the private CA's word is enough (a managed Redis's own per-instance CA)."""
        directory, state = self.start(self.url(), self.ca, "--redis-tls-verify", "ca")
        yield self.wait_for(lambda: directory.available)
        self.assertEqual((yield directory.claim("alice", b"d" * 32, 60, 30, False, False))[0], "new")


class RedisTLSNameTests(_NotNamingTheHost, _TLSRedisCase):
    """The certificate names another address (127.0.0.2) than the URL's (127.0.0.1)."""

    cert_ip = "127.0.0.2"

    @defer.inlineCallbacks
    def test_chain_still_checked(self) -> Any:
        directory, state = self.start(self.url(), self.wrong_ca, "--redis-tls-verify", "ca")
        yield self.wait_for(lambda: directory.connect_failures.get("tls", 0) >= 1)
        self.assertIn("certificate verify failed", directory.last_error)


class RedisTLSNoNameTests(_NotNamingTheHost, _TLSRedisCase):
    """A certificate without subjectAltName (its address only in the CN)."""

    cert_ip = None


class RedisCAOptionTests(SynchronousTestCase):
    def test_chain_only_needs_a_private_ca(self) -> None:
        with self.assertRaisesRegex(usage.UsageError, "needs --redis-ca"):
            MediatorOptions().parseOptions(["--redis", "rediss://127.0.0.1:6380/0", "--redis-tls-verify", "ca"])
        with self.assertRaisesRegex(usage.UsageError, "full or ca"):
            MediatorOptions().parseOptions(["--redis", "rediss://127.0.0.1:6380/0", "--redis-tls-verify", "none"])

    def test_needs_tls(self) -> None:
        with self.assertRaisesRegex(usage.UsageError, "rediss://"):
            MediatorOptions().parseOptions(["--redis", "redis://127.0.0.1:6379/0", "--redis-ca", __file__])

    def test_needs_redis(self) -> None:
        with self.assertRaisesRegex(usage.UsageError, "need --redis"):
            MediatorOptions().parseOptions(["--redis-ca", __file__])

    def test_no_certificate(self) -> None:
        with self.assertRaisesRegex(usage.UsageError, "no PEM certificate"):
            MediatorOptions().parseOptions(["--redis", "rediss://127.0.0.1:6380/0", "--redis-ca", __file__])

    def test_unreadable(self) -> None:
        with self.assertRaisesRegex(usage.UsageError, "--redis-ca"):
            MediatorOptions().parseOptions(["--redis", "rediss://127.0.0.1:6380/0", "--redis-ca", "/nonexistent"])

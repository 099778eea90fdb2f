"""The natbypass-peer twistd plugin: options are checked, makeService builds an unstarted Peer."""

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from natbypass.app import peer_tap
from natbypass.identity import Identity, read_identity
from natbypass.interfaces import IPeer
from natbypass.punch.candidates import PortRange


class PeerTapTests(SynchronousTestCase):
    def parse(self, *argv: str) -> peer_tap.Options:
        options = peer_tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        o = self.parse("--mediator", "tcp:198.18.0.2:7000", "--id", "bob")
        self.assertEqual(o["stun"], ("198.18.0.2", 3478))
        self.assertEqual((o["protocol"], o["timeout"], o["port-range"]), ("auto", 5.0, None))

    def test_explicit(self) -> None:
        o = self.parse(
            "--mediator",
            "tls:m.example:7443",
            "--id",
            "bob",
            "--stun",
            "127.0.0.2:4000",
            "--protocol",
            "tcp,udp",
            "--port-range",
            "40000-40010",
        )
        self.assertEqual(o["stun"], ("127.0.0.2", 4000))
        self.assertEqual(o["port-range"], PortRange(40000, 40010))

    def test_errors(self) -> None:
        cases = {
            ("--id", "bob"): "--mediator ENDPOINT is required",
            ("--mediator", "tcp:h:7000"): "--id NAME is required",
            ("--mediator", "tcp:h:7000", "--id", "-bad"): "--id NAME is required",
            ("--mediator", "tcp:h:7000", "--id", "bob", "--protocol", "quic"): "protocol wish must be",
            ("--mediator", "tcp:h:7000", "--id", "bob", "--port-range", "9-1"): "port range",
            ("--mediator", "unix:/x", "--id", "bob"): "cannot find the host",
        }
        for argv, message in cases.items():
            with self.assertRaises(usage.UsageError, msg=argv) as caught:
                self.parse(*argv)
            self.assertIn(message, str(caught.exception), argv)

    def test_make_service(self) -> None:
        path = os.path.join(self.mktemp(), "identity.pem")
        o = self.parse("--mediator", "tcp:198.18.0.2:7000", "--id", "bob", "--identity", path)
        service = peer_tap.makeService(o, MemoryReactorClock())
        self.assertTrue(verifyObject(IPeer, service))
        self.assertEqual(service.peer_id, "bob")
        self.assertFalse(service.running)
        # the key is made at --identity, and kept across restarts
        self.assertEqual(service.fingerprint, read_identity(path).fingerprint)
        again = peer_tap.makeService(o, MemoryReactorClock())
        self.assertEqual(again.fingerprint, service.fingerprint)
        self.assertIs(service.signaling.identity, service.identity)

    def test_identity_defaults_to_none(self) -> None:
        """Unset, make_peer uses natbypass.identity.default_identity_path() (resolved when the peer is made)."""
        o = self.parse("--mediator", "tcp:198.18.0.2:7000", "--id", "bob")
        self.assertIsNone(o["identity"])

    def test_allow(self) -> None:
        """--allow FILE: only the listed keys may connect; --allow-any (the default): everyone."""
        key = os.path.join(self.mktemp(), "identity.pem")
        base = ("--mediator", "tcp:198.18.0.2:7000", "--id", "bob", "--identity", key)
        alice, carol = Identity.generate(), Identity.generate()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"# who may reach bob\n{alice.fingerprint} alice\n")
        o = self.parse(*base, "--allow", path)
        self.assertTrue(o["allow"].allows("alice", alice.fingerprint))
        self.assertFalse(o["allow"].allows("carol", carol.fingerprint))
        self.assertFalse(o["allow"].allows("alice", carol.fingerprint))
        service = peer_tap.makeService(o, MemoryReactorClock())
        self.assertIs(service.allow, o["allow"])
        self.assertIsNone(self.parse(*base)["allow"])
        self.assertIsNone(self.parse(*base, "--allow-any")["allow"])
        for argv, message in (
            ((*base, "--allow", path, "--allow-any"), "not both"),
            ((*base, "--allow", path + ".missing"), path + ".missing"),
        ):
            with self.assertRaises(usage.UsageError, msg=argv) as caught:
                self.parse(*argv)
            self.assertIn(message, str(caught.exception))


class ExposeTests(SynchronousTestCase):
    def test_expose_serves_forward_and_echo(self) -> None:
        key = os.path.join(self.mktemp(), "identity.pem")
        base = ("--mediator", "tcp:198.18.0.2:7000", "--id", "bob", "--identity", key, "--allow-any")
        o = PeerTapTests.parse(self, *base, "--expose", "web=127.0.0.1:8080", "--expose", "[::1]:22")
        service = peer_tap.makeService(o, MemoryReactorClock())
        self.assertEqual(
            service.served,
            ["echo", "forward:127.0.0.1:8080", "forward:[::1]:22", "forward:web"],
        )

    def test_expose_needs_a_say_on_who(self) -> None:
        base = ("--mediator", "tcp:198.18.0.2:7000", "--id", "bob")
        for argv, message in (
            ((*base, "--expose", "127.0.0.1:22"), "--allow FILE (or --allow-any)"),
            ((*base, "--allow-any", "--expose", "nope"), "expected [NAME=]HOST:PORT"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                PeerTapTests.parse(self, *argv)
            self.assertIn(message, str(caught.exception))


class AllowRemoteListenTests(SynchronousTestCase):
    def test_serves_the_control_services(self) -> None:
        key = os.path.join(self.mktemp(), "identity.pem")
        base = ("--mediator", "tcp:198.18.0.2:7000", "--id", "bob", "--identity", key, "--allow-any")
        o = PeerTapTests.parse(self, *base, "--allow-remote-listen", "8000", "--allow-remote-listen", "*:9000-9001")
        service = peer_tap.makeService(o, MemoryReactorClock())
        self.assertEqual(
            service.served,
            [
                "echo",
                "forward-listen:0.0.0.0:9000",
                "forward-listen:0.0.0.0:9001",
                "forward-listen:127.0.0.1:8000",
            ],
        )

    def test_refused_by_default_and_needs_a_say_on_who(self) -> None:
        key = os.path.join(self.mktemp(), "identity.pem")
        base = ("--mediator", "tcp:198.18.0.2:7000", "--id", "bob", "--identity", key)
        service = peer_tap.makeService(PeerTapTests.parse(self, *base), MemoryReactorClock())
        self.assertFalse([s for s in service.served if s.startswith("forward-listen:")])
        for argv, message in (
            ((*base, "--allow-remote-listen", "8000"), "--allow FILE (or --allow-any)"),
            ((*base, "--allow-any", "--allow-remote-listen", "9-1"), "is empty"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                PeerTapTests.parse(self, *argv)
            self.assertIn(message, str(caught.exception))

"""
The natbypass: endpoints in memory: the string grammar (hypothesis round
trips and arbitrary input), the errors a person reads, the plugins, peer
sharing, and the endpoints' connect/listen/cancel over a stand-in peer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from natbypass import endpoints
from natbypass.endpoints import (
    DEFAULT_SERVICE,
    NATbypassClientEndpoint,
    NATbypassServerEndpoint,
    PeerNotStarted,
    PeerRegistry,
    client_string,
    escape,
    parse_client,
    parse_server,
    server_string,
)
from natbypass.identity import Identity, default_identity_path
from natbypass.peer import Peer
from natbypass.trust import AllowList

ROOT = Path(__file__).resolve().parent.parent
WORK = tempfile.mkdtemp(prefix="natbypass-endpoints-")
IDENTITY = os.path.join(WORK, "identity.pem")
KNOWN = os.path.join(WORK, "known_peers")
MEDIATOR = "tcp:127.0.0.1:7000"
BASE = {"mediator": MEDIATOR, "id": "alice", "identity": IDENTITY, "known_peers": KNOWN}

peer_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,20}", fullmatch=True)
services = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Co", "Cn")), min_size=1, max_size=30
).filter(lambda s: s.isprintable() and not any(c.isspace() for c in s))
fingerprints = st.builds(lambda: Identity.generate().fingerprint)
protocols = st.sampled_from(["auto", "udp", "tcp", "tcp,udp", "udp,tcp"])


class GrammarTests(SynchronousTestCase):
    """Strings built with client_string/server_string parse back to what went in, through Twisted's parser."""

    def tearDown(self) -> None:
        for reactor in getattr(self, "reactors", []):
            endpoints.registry.stopAll(reactor)

    def reactor(self) -> MemoryReactorClock:
        reactor = MemoryReactorClock()
        self.reactors = getattr(self, "reactors", []) + [reactor]
        return reactor

    @settings(max_examples=60, deadline=None)
    @given(peer_ids, peer_ids, services, st.one_of(st.none(), protocols), st.one_of(st.none(), fingerprints))
    def test_client_round_trip(self, me: str, target: str, service: str, protocol: Any, pin: Any) -> None:
        options = dict(BASE, id=me, stun="127.0.0.2:3479", timeout="2.5", bind="127.0.0.1")
        if protocol is not None:
            options["protocol"] = protocol
        if pin is not None:
            options["fingerprint"] = str(pin)
        endpoint = clientFromString(self.reactor(), client_string(target, service, **options))
        self.assertIsInstance(endpoint, NATbypassClientEndpoint)
        self.assertEqual((endpoint.peer_id, endpoint.service, endpoint.protocol), (target, service, protocol))
        self.assertEqual(endpoint.fingerprint, pin)
        peer = endpoint.peer
        self.assertEqual((peer.peer_id, peer.stun_server), (me, ("127.0.0.2", 3479)))
        self.assertEqual((peer.config.punch_timeout, peer.config.bind_host), (2.5, "127.0.0.1"))
        self.assertEqual(peer.known_peers.path, KNOWN)

    @settings(max_examples=60, deadline=None)
    @given(peer_ids, services, protocols, st.booleans())
    def test_server_round_trip(self, me: str, service: str, protocol: str, discovery: bool) -> None:
        options = dict(BASE, id=me, protocol=protocol, allow_any="yes", discovery="yes" if discovery else "no")
        endpoint = serverFromString(self.reactor(), server_string(service, **options))
        self.assertIsInstance(endpoint, NATbypassServerEndpoint)
        self.assertEqual(endpoint.service, service)
        self.assertEqual(endpoint.peer.peer_id, me)
        self.assertEqual(endpoint.peer.config.discover, discovery)
        self.assertTrue(endpoint.peer.allow.allow_any)

    @given(st.text(max_size=40))
    def test_escape(self, value: str) -> None:
        """An escaped value is one field: no bare ':' or '=' is left in it."""
        escaped = escape(value)
        unescaped, i = "", 0
        while i < len(escaped):
            if escaped[i] == "\\":
                i += 1
            else:
                self.assertNotIn(escaped[i], ":=")
            unescaped += escaped[i]
            i += 1
        self.assertEqual(unescaped, value)

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.text(max_size=12), max_size=4),
        st.dictionaries(
            st.sampled_from(endpoints.CLIENT_KEYS + endpoints.SERVER_KEYS + ("bogus",)), st.text(max_size=24)
        ),
    )
    def test_arbitrary_arguments_parse_or_say_why(self, args: list[str], kwargs: dict[str, str]) -> None:
        """Whatever the fields, the parsers return a spec or raise ValueError; never anything else."""
        kwargs = {k: v for k, v in kwargs.items() if k not in ("identity", "known-peers", "allow")}
        for parse in (parse_client, parse_server):
            try:
                spec = parse(args, kwargs)
            except ValueError as e:
                self.assertTrue(str(e))
            else:
                self.assertEqual(spec.settings.mediator, kwargs["mediator"])
                self.assertEqual(spec.settings.identity, default_identity_path())

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=60).filter(lambda s: not s.endswith("\\")))
    def test_arbitrary_strings(self, text: str) -> None:
        """Through Twisted's parser and the registry (mediator strings included): a ValueError or an endpoint."""
        text = f"natbypass:{text}:identity={escape(IDENTITY)}:known-peers={escape(KNOWN)}"
        try:
            endpoint = clientFromString(self.reactor(), text)
        except ValueError as e:
            self.assertTrue(str(e))
        else:
            verifyObject(IStreamClientEndpoint, endpoint)

    def test_defaults(self) -> None:
        """Service 'default', STUN on 3478 of the mediator's host, the default identity, auto; the peer's given."""
        spec = parse_client(["bob"], {"mediator": r"tls:m.example:7443", "id": "alice"})
        self.assertEqual((spec.target, spec.service, spec.protocol, spec.fingerprint), ("bob", "default", None, None))
        self.assertEqual(spec.settings.stun, ("m.example", 3478))
        self.assertEqual(spec.settings.identity, default_identity_path())
        self.assertEqual((spec.settings.bind, spec.settings.timeout, spec.settings.discovery), ("0.0.0.0", 5.0, True))
        self.assertEqual(spec.given, frozenset({"mediator", "peer_id"}))
        server = parse_server([], {"mediator": MEDIATOR, "id": "bob", "allow-any": "yes"})
        self.assertEqual(server.service, DEFAULT_SERVICE)
        self.assertEqual(server.allow, AllowList.any())

    def test_keyword_forms(self) -> None:
        spec = parse_client([], {"peer": "bob", "service": "web", "mediator": MEDIATOR, "id": "a"})
        self.assertEqual((spec.target, spec.service), ("bob", "web"))
        server = parse_server([], {"service": "web", "mediator": MEDIATOR, "id": "a", "allow-any": "yes"})
        self.assertEqual(server.service, "web")

    def test_allow_file(self) -> None:
        path = os.path.join(WORK, "allow")
        fp = Identity.generate().fingerprint
        Path(path).write_text(f"{fp} alice\n")
        spec = parse_server(["web"], {"mediator": MEDIATOR, "id": "bob", "allow": path})
        self.assertTrue(spec.allow.allows("alice", fp))
        self.assertFalse(spec.allow.allows("mallory", fp))


class ErrorTests(SynchronousTestCase):
    """Bad strings raise ValueError saying what to write."""

    def check(self, parse: Any, args: list[str], kwargs: dict[str, str], message: str) -> None:
        with self.assertRaises(ValueError) as caught:
            parse(args, kwargs)
        self.assertIn(message, str(caught.exception))

    def test_client_errors(self) -> None:
        ok = {"mediator": MEDIATOR, "id": "alice"}
        cases = [
            ([], ok, "names the peer to reach"),
            ([""], ok, "names the peer to reach"),
            (["-bob"], ok, "'-bob' is not a peer id"),
            (["bob"], {"id": "alice"}, r"mediator=tcp\:HOST\:7000"),
            (["bob"], {"mediator": MEDIATOR}, "id=NAME"),
            (["bob"], dict(ok, id="a b"), "is not a peer id"),
            (["bob", "web", "x"], ok, "too many fields"),
            (["bob", "web"], dict(ok, service="web"), "the service is given twice"),
            (["bob"], dict(ok, colour="red"), "unknown key 'colour'"),
            (["bob"], dict(ok, allow="/x"), "unknown key 'allow'"),
            (["bob", "has space"], ok, "a service name is"),
            (["bob"], dict(ok, fingerprint="nb1-1234"), "fingerprint='nb1-1234'"),
            (["bob"], dict(ok, protocol="sctp"), "protocol='sctp'"),
            (["bob"], dict(ok, mediator="ssl:m:7443"), "would not check the mediator's certificate"),
            (["bob"], dict(ok, mediator="unix:/x"), "give --stun"),
            (["bob"], dict(ok, stun="h:99999"), "stun:"),
            (["bob"], dict(ok, timeout="0"), "timeout='0'"),
            (["bob"], dict(ok, timeout="soon"), "timeout='soon'"),
            (["bob"], dict(ok, discovery="maybe"), "discovery='maybe': say yes or no"),
            (["bob"], dict(ok, **{"port-range": "9-1"}), "port range"),
        ]
        for args, kwargs, message in cases:
            self.check(parse_client, args, kwargs, message)

    def test_server_errors(self) -> None:
        ok = {"mediator": MEDIATOR, "id": "bob"}
        self.check(parse_server, ["web"], ok, "says who may connect: allow=FILE")
        self.check(parse_server, ["web"], dict(ok, **{"allow-any": "no"}), "says who may connect")
        self.check(parse_server, ["web"], dict(ok, allow="/x", **{"allow-any": "yes"}), "not both")
        self.check(parse_server, ["web"], dict(ok, allow=os.path.join(WORK, "missing")), "no such file")
        self.check(parse_server, ["web", "more"], dict(ok, **{"allow-any": "yes"}), "too many fields")
        self.check(parse_server, ["web"], dict(ok, fingerprint="x", **{"allow-any": "yes"}), "unknown key")
        self.check(parse_server, ["web"], dict(ok, protocol="x", **{"allow-any": "yes"}), "protocol='x'")

    def test_through_twisted(self) -> None:
        """clientFromString passes the parsers' ValueError on; an unescaped mediator is explained."""
        with self.assertRaises(ValueError) as caught:
            clientFromString(MemoryReactorClock(), "natbypass:bob:mediator=tcp:h:7000:id=a")
        self.assertIn(r"a ':' inside a value is written '\:'", str(caught.exception))

    def test_unusable_mediator_and_identity(self) -> None:
        reactor = MemoryReactorClock()
        self.addCleanup(endpoints.registry.stopAll, reactor)
        with self.assertRaises(ValueError) as caught:
            clientFromString(reactor, client_string("bob", **dict(BASE, mediator="tcp:h:1:2:3:4:5")))
        self.assertIn("is not a usable client endpoint", str(caught.exception))
        bad = os.path.join(WORK, "bad.pem")
        Path(bad).write_bytes(b"not a key")
        os.chmod(bad, 0o600)
        with self.assertRaises(ValueError) as caught:
            clientFromString(reactor, client_string("bob", **dict(BASE, identity=bad)))
        self.assertIn(f"identity={bad}", str(caught.exception))


class PluginTests(SynchronousTestCase):
    def test_plugins_found(self) -> None:
        import twisted.plugins

        clients = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor, twisted.plugins)]
        servers = [p for p in getPlugins(IStreamServerEndpointStringParser, twisted.plugins)]
        client = [p for p in clients if p.prefix == "natbypass"]
        server = [p for p in servers if p.prefix == "natbypass"]
        self.assertEqual((len(client), len(server)), (1, 1))
        verifyObject(IPlugin, client[0])
        verifyObject(IStreamClientEndpointStringParserWithReactor, client[0])
        verifyObject(IStreamServerEndpointStringParser, server[0])

    def test_plugin_file_is_cheap(self) -> None:
        """Importing the plugin file (as Twisted does to list plugins) loads nothing of natbypass."""
        code = (
            "import sys, twisted.plugins.natbypass_endpoints; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'natbypass'))"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), "[]", out.stderr)


class SharingTests(SynchronousTestCase):
    """Strings naming the same (mediator, id, identity) share one peer per reactor; conflicts are refused."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.addCleanup(endpoints.registry.stopAll, self.reactor)

    def client(self, target: str = "bob", reactor: Any = None, **options: str) -> NATbypassClientEndpoint:
        return clientFromString(reactor or self.reactor, client_string(target, "web", **dict(BASE, **options)))

    def server(self, service: str = "web", **options: str) -> NATbypassServerEndpoint:
        return serverFromString(self.reactor, server_string(service, **dict(BASE, **options)))

    def test_shared(self) -> None:
        a, b = self.client("bob"), self.client("carol", stun="127.0.0.1:3478")
        s = self.server(allow_any="yes")
        self.assertIs(a.peer, b.peer)
        self.assertIs(a.peer, s.peer)
        self.assertEqual(len(endpoints.registry.peers(self.reactor)), 1)
        self.assertIsInstance(a.peer, Peer)

    def test_not_shared(self) -> None:
        a = self.client()
        self.assertIsNot(a.peer, self.client(id="alice2").peer)
        self.assertIsNot(a.peer, self.client(identity=os.path.join(WORK, "other.pem")).peer)
        self.assertIsNot(a.peer, self.client(mediator="tcp:127.0.0.1:7001").peer)
        other = MemoryReactorClock()
        self.addCleanup(endpoints.registry.stopAll, other)
        self.assertIsNot(a.peer, self.client(reactor=other).peer)

    def test_identity_is_loaded(self) -> None:
        from natbypass.identity import read_identity

        self.assertEqual(self.client().peer.fingerprint, read_identity(IDENTITY).fingerprint)

    def test_conflicting_settings(self) -> None:
        self.client(stun="127.0.0.2:3478")
        with self.assertRaises(ValueError) as caught:
            self.client(stun="127.0.0.3:3478")
        self.assertIn("already set up with stun=('127.0.0.2', 3478)", str(caught.exception))
        with self.assertRaises(ValueError):
            self.client(timeout="9")
        self.client()  # leaving a setting out takes the shared peer's

    def test_client_protocol_is_per_endpoint(self) -> None:
        a, b = self.client(protocol="udp"), self.client(protocol="tcp")
        self.assertIs(a.peer, b.peer)
        self.assertEqual((a.protocol, b.protocol), ("udp", "tcp"))

    def test_allow_list_set_once(self) -> None:
        client = self.client()
        self.assertIsNone(client.peer.allow)
        self.server(allow_any="yes")
        self.assertTrue(client.peer.allow.allow_any)
        self.server("ssh", allow_any="yes")
        path = os.path.join(WORK, "allow-one")
        Path(path).write_text(f"{Identity.generate().fingerprint}\n")
        with self.assertRaises(ValueError) as caught:
            self.server("other", allow=path)
        self.assertIn("one peer (one id) has one allow list", str(caught.exception))


class FakePeer:
    """Stands in for a Peer: records what the endpoints ask and answers with Deferreds the test fires."""

    def __init__(self, reactor: Any, peer_id: str, *args: Any, **kwargs: Any) -> None:
        self.peer_id = peer_id
        self.running = False
        self.allow = kwargs.get("allow")
        self.cancelled: list[str] = []
        self.ready: defer.Deferred[None] = defer.Deferred(lambda d: self.cancelled.append("ready"))
        self.opens: list[tuple[Any, ...]] = []
        self.opened: defer.Deferred[Any] = defer.Deferred(lambda d: self.cancelled.append("open"))
        self.served: dict[str, Any] = {}
        self.stops = 0
        self.fingerprint = "nb1-fake"

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False
        self.stops += 1

    def whenReady(self) -> defer.Deferred[None]:
        return self.ready

    def openStream(self, *args: Any) -> defer.Deferred[Any]:
        self.opens.append(args)
        return self.opened

    def serve(self, service: str, factory: Any) -> Any:
        if service in self.served:
            raise CannotListenError(None, service, ValueError("already served"))
        self.served[service] = factory
        return Port()


@implementer(IListeningPort)
class Port:
    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        pass

    def getHost(self) -> Any:
        return None


class EndpointTests(SynchronousTestCase):
    """connect/listen over a stand-in peer: ready first, then the stream; cancellation; the shared start."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.registry = PeerRegistry(make=FakePeer)

    def shared(self, **options: str) -> Any:
        spec = parse_client(["bob"], {"mediator": MEDIATOR, "id": "alice", "identity": IDENTITY, **options})
        return self.registry.peer(self.reactor, spec.settings, spec.given)

    def test_interfaces(self) -> None:
        peer = FakePeer(None, "alice")
        self.assertTrue(verifyObject(IStreamClientEndpoint, NATbypassClientEndpoint(peer, "bob", "web")))
        self.assertTrue(verifyObject(IStreamServerEndpoint, NATbypassServerEndpoint(peer, "web")))

    def test_constructor_checks(self) -> None:
        peer = FakePeer(None, "alice")
        with self.assertRaises(ValueError):
            NATbypassClientEndpoint(peer, "bob", "two words")
        with self.assertRaises(ValueError):
            NATbypassClientEndpoint(peer, "bob", "web", protocol="sctp")
        with self.assertRaises(ValueError):
            NATbypassClientEndpoint(peer, "bob", "web", fingerprint="nb1-short")
        with self.assertRaises(ValueError):
            NATbypassServerEndpoint(peer, "")
        pin = Identity.generate().fingerprint
        self.assertEqual(NATbypassClientEndpoint(peer, "bob", fingerprint=str(pin)).fingerprint, pin)

    def test_unstarted_peer(self) -> None:
        """A peer the application never started fails connect and listen, saying what to do."""
        peer = FakePeer(None, "alice")
        failure = self.failureResultOf(NATbypassClientEndpoint(peer, "bob").connect(Factory()), PeerNotStarted)
        self.assertIn("call its startService()", str(failure.value))
        failure = self.failureResultOf(NATbypassServerEndpoint(peer).listen(Factory()), CannotListenError)
        self.assertIsInstance(failure.value.socketError, PeerNotStarted)
        self.assertEqual((peer.opens, peer.served), ([], {}))

    def test_connect_waits_for_ready_then_opens(self) -> None:
        shared = self.shared()
        peer = shared.peer
        factory = Factory.forProtocol(Protocol)
        endpoint = NATbypassClientEndpoint(peer, "bob", "web", "tcp", ready=shared.whenReady)
        d = endpoint.connect(factory)
        self.assertTrue(peer.running)
        self.assertEqual(peer.opens, [])
        peer.ready.callback(None)
        self.assertEqual(peer.opens, [("bob", "web", factory, "tcp", None)])
        self.assertNoResult(d)
        proto = Protocol()
        peer.opened.callback(proto)
        self.assertIs(self.successResultOf(d), proto)

    def test_cancel_while_waiting_for_ready(self) -> None:
        shared = self.shared()
        d = NATbypassClientEndpoint(shared.peer, "bob", ready=shared.whenReady).connect(Factory())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(shared.peer.cancelled, ["ready"])
        self.assertEqual(shared.peer.opens, [])

    def test_cancel_while_opening(self) -> None:
        """Cancelling connect cancels the stream being opened."""
        shared = self.shared()
        shared.peer.ready.callback(None)
        d = NATbypassClientEndpoint(shared.peer, "bob", ready=shared.whenReady).connect(Factory())
        self.assertEqual(len(shared.peer.opens), 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(shared.peer.cancelled, ["open"])

    def test_listen(self) -> None:
        shared = self.shared()
        factory = Factory.forProtocol(Protocol)
        d = NATbypassServerEndpoint(shared.peer, "web", ready=shared.whenReady).listen(factory)
        self.assertNoResult(d)
        self.assertEqual(shared.peer.served, {})
        shared.peer.ready.callback(None)
        port = self.successResultOf(d)
        self.assertTrue(verifyObject(IListeningPort, port))
        self.assertIs(shared.peer.served["web"], factory)
        again = NATbypassServerEndpoint(shared.peer, "web", ready=shared.whenReady).listen(factory)
        self.failureResultOf(again, CannotListenError)

    def test_ready_failure_fails_listen(self) -> None:
        shared = self.shared()
        d = NATbypassServerEndpoint(shared.peer, "web", ready=shared.whenReady).listen(Factory())
        shared.peer.ready.errback(RuntimeError("id taken"))
        failure = self.failureResultOf(d, CannotListenError)
        self.assertIn("id taken", str(failure.value))

    def test_started_once_and_stopped_with_the_reactor(self) -> None:
        shared = self.shared()
        shared.whenReady()
        shared.whenReady()
        (before,) = self.reactor.triggers["before"]["shutdown"]
        function, args, kwargs = before
        function(*args, **kwargs)
        self.assertEqual(shared.peer.stops, 1)
        self.assertTrue(shared.stopped)
        self.failureResultOf(shared.whenReady(), PeerNotStarted)
        # The next string for it gets a fresh peer.
        self.assertIsNot(self.shared().peer, shared.peer)

    def test_stop_all(self) -> None:
        a, b = self.shared(), self.shared(id="carol")
        a.whenReady()
        self.successResultOf(self.registry.stopAll(self.reactor))
        self.assertEqual((a.peer.stops, b.peer.stops), (1, 0))
        self.assertEqual(self.registry.peers(self.reactor), [])

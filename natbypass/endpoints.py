"""
Twisted endpoints over NATbypass streams, and the C{natbypass:} endpoint strings.

L{NATbypassClientEndpoint} opens a stream to a peer's service
(L{natbypass.peer.Peer.openStream}), L{NATbypassServerEndpoint} serves one
(L{natbypass.peer.Peer.serve}); any Twisted protocol runs over them unchanged.
C{clientFromString(reactor, "natbypass:bob:service=web:mediator=...:id=alice")}
and C{serverFromString(reactor, "natbypass:web:mediator=...:id=bob:allow=FILE")}
build them through the parsers in C{twisted/plugins/natbypass_endpoints.py}.

Strings that name the same (mediator, id, identity file) share one L{Peer} per
reactor (L{PeerRegistry}, as txtorcon shares one Tor controller): made when
the first such string is parsed, started by the first C{connect}/C{listen},
stopped when the reactor shuts down.  The grammar and its defaults are in
C{docs/endpoints.md}.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocol, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from natbypass.app.peer_options import stun_server
from natbypass.identity import Fingerprint, IdentityFileError, default_identity_path, default_known_peers_path
from natbypass.peer import Peer, PeerConfig, parse_wish
from natbypass.signaling import wire
from natbypass.signaling.client import check_mediator_endpoint
from natbypass.streams import frames
from natbypass.trust import AllowList, KnownPeers

#: The service a string names when it gives none.
DEFAULT_SERVICE = "default"

#: What each key of a C{natbypass:} string sets (for the error that lists them).
_PEER_KEYS = (
    "mediator",
    "id",
    "stun",
    "identity",
    "known-peers",
    "token",
    "ca",
    "bind",
    "port-range",
    "timeout",
    "discovery",
    "host-candidates",
)
CLIENT_KEYS = ("peer", "service", "fingerprint", "protocol", *_PEER_KEYS)
SERVER_KEYS = ("service", "protocol", "allow", "allow-any", *_PEER_KEYS)

_YES = {"yes": True, "true": True, "1": True, "on": True, "no": False, "false": False, "0": False, "off": False}


class PeerNotStarted(Exception):
    """An endpoint was used over a L{Peer} nobody started."""


# --------------------------------------------------------------------- grammar


@dataclass(frozen=True)
class PeerSettings:
    """
    Everything a C{natbypass:} string says about the peer it runs over.
    Strings with the same L{key} share one peer, so their other settings
    must agree (see L{PeerRegistry.peer}).
    """

    mediator: str
    peer_id: str
    identity: str
    stun: tuple[str, int]
    known_peers: str
    token: str | None = None
    ca: str | None = None
    protocol: str = "auto"
    bind: str = "0.0.0.0"
    port_range: str | None = None
    timeout: float = 5.0
    discovery: bool = True
    host_candidates: bool = True

    @property
    def key(self) -> tuple[str, str, str]:
        """What identifies a shared peer: the mediator, our id there and the key we prove it with."""
        return (self.mediator, self.peer_id, self.identity)

    def config(self) -> PeerConfig:
        """The L{PeerConfig} of a peer made from these settings."""
        from natbypass.punch.candidates import PortRange

        return PeerConfig(
            bind_host=self.bind,
            port_range=PortRange.parse(self.port_range) if self.port_range else None,
            punch_timeout=self.timeout,
            discover=self.discovery,
            reveal_host_candidates=self.host_candidates,
        )


#: String keys of the settings (C{known-peers}) by dataclass field (C{known_peers}).
_KEY_OF = {f.name: {"peer_id": "id"}.get(f.name, f.name.replace("_", "-")) for f in fields(PeerSettings)}


@dataclass(frozen=True)
class ClientSpec:
    """A parsed client string: the target and the peer settings (C{given}: the keys the string set)."""

    settings: PeerSettings
    given: frozenset[str]
    target: str
    service: str
    protocol: str | None
    fingerprint: Fingerprint | None


@dataclass(frozen=True)
class ServerSpec:
    """A parsed server string: the service, who may connect, and the peer settings."""

    settings: PeerSettings
    given: frozenset[str]
    service: str
    allow: AllowList


def escape(value: str) -> str:
    """C{value} as one field of an endpoint string: C{\\}, C{:} and C{=} escaped with a backslash."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def client_string(target: str, service: str = DEFAULT_SERVICE, **options: str) -> str:
    """
    A C{natbypass:} client string, every value escaped; C{options} are keys
    of L{CLIENT_KEYS} with C{_} for C{-} (C{known_peers="..."}).
    """
    return ":".join(["natbypass", escape(target), escape(service), *_fields(options)])


def server_string(service: str = DEFAULT_SERVICE, **options: str) -> str:
    """A C{natbypass:} server string, like L{client_string}."""
    return ":".join(["natbypass", escape(service), *_fields(options)])


def _fields(options: Mapping[str, str]) -> list[str]:
    return [f"{name.replace('_', '-')}={escape(value)}" for name, value in options.items()]


def parse_client(args: Sequence[str], kwargs: Mapping[str, str]) -> ClientSpec:
    """
    The arguments Twisted split a client string into (C{natbypass:PEER[:SERVICE]:key=value...}).

    @raise ValueError: saying what is wrong and what to write instead.
    """
    _known(kwargs, CLIENT_KEYS, "client")
    target, service = _positional(args, kwargs, ("peer", "service"), "natbypass:PEER[:SERVICE]:mediator=...:id=...")
    if not target:
        raise ValueError("a natbypass: client string names the peer to reach: natbypass:PEER[:SERVICE]:...")
    _peer_id(target, "the peer")
    settings, given = _settings(kwargs)
    protocol = kwargs.get("protocol")
    if protocol is not None:
        _wish(protocol)
    fingerprint = kwargs.get("fingerprint")
    try:
        pin = Fingerprint.parse(fingerprint) if fingerprint is not None else None
    except ValueError as e:
        raise ValueError(f"fingerprint={fingerprint!r}: {e} (natbypass id prints a peer's fingerprint)") from None
    return ClientSpec(settings, given, target, _service(service), protocol, pin)


def parse_server(args: Sequence[str], kwargs: Mapping[str, str]) -> ServerSpec:
    """
    The arguments Twisted split a server string into (C{natbypass:[SERVICE:]key=value...}).

    @raise ValueError: saying what is wrong and what to write instead.
    """
    _known(kwargs, SERVER_KEYS, "server")
    (service,) = _positional(args, kwargs, ("service",), "natbypass:SERVICE:mediator=...:id=...:allow=FILE")
    settings, given = _settings(kwargs, server=True)
    allow_file, allow_any = kwargs.get("allow"), _flag(kwargs, "allow-any", None)
    if allow_file is not None and allow_any:
        raise ValueError("give allow=FILE or allow-any=yes, not both")
    if allow_file is not None:
        allow = AllowList.load(allow_file)  # a TrustFileError is a ValueError naming the file and line
    elif allow_any:
        allow = AllowList.any()
    else:
        raise ValueError(
            "a natbypass: server string says who may connect: allow=FILE (fingerprints, one a line; "
            "a known_peers file works) or allow-any=yes (any peer, each proving the key its id is bound to)"
        )
    return ServerSpec(settings, given, _service(service), allow)


def _known(kwargs: Mapping[str, str], keys: Sequence[str], kind: str) -> None:
    unknown = sorted(set(kwargs) - set(keys))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in a natbypass: {kind} string; the keys are: {', '.join(keys)}")


def _positional(args: Sequence[str], kwargs: Mapping[str, str], names: Sequence[str], form: str) -> list[str | None]:
    if len(args) > len(names):
        raise ValueError(
            f"too many fields in a natbypass: string ({':'.join(args)}): the form is {form}; "
            f"a ':' inside a value is written '\\:'"
        )
    values: list[str | None] = []
    for i, name in enumerate(names):
        positional = args[i] if i < len(args) else None
        if positional is not None and name in kwargs:
            raise ValueError(f"the {name} is given twice: {positional!r} and {name}={kwargs[name]!r}")
        values.append(positional if positional is not None else kwargs.get(name))
    return values


def _peer_id(text: str, what: str) -> str:
    if not wire.PEER_ID.match(text):
        raise ValueError(
            f"{what} {text!r} is not a peer id: 1-64 letters, digits and . _ @ : + -, starting with a letter or digit"
        )
    return text


def _service(service: str | None) -> str:
    service = DEFAULT_SERVICE if service is None else service
    frames.valid_service(service)
    return service


def _wish(protocol: str) -> None:
    try:
        parse_wish(protocol)
    except ValueError as e:
        raise ValueError(f"protocol={protocol!r}: {e}") from None


def _flag(kwargs: Mapping[str, str], key: str, default: bool | None) -> bool | None:
    if key not in kwargs:
        return default
    try:
        return _YES[kwargs[key].lower()]
    except KeyError:
        raise ValueError(f"{key}={kwargs[key]!r}: say yes or no") from None


def _settings(kwargs: Mapping[str, str], server: bool = False) -> tuple[PeerSettings, frozenset[str]]:
    """The peer settings of a string, defaults filled in, and which of them the string gave."""
    mediator = kwargs.get("mediator")
    if not mediator:
        raise ValueError(r"a natbypass: string names the mediator: mediator=tcp\:HOST\:7000 (or tls\:HOST\:7443)")
    peer_id = kwargs.get("id")
    if not peer_id:
        raise ValueError("a natbypass: string names our own peer id at the mediator: id=NAME")
    _peer_id(peer_id, "id=")
    check_mediator_endpoint(mediator, kwargs.get("ca"))
    try:
        stun = stun_server(kwargs.get("stun"), mediator)
    except ValueError as e:
        raise ValueError(f"stun: {e}") from None
    timeout_text = kwargs.get("timeout", "5")
    try:
        timeout = float(timeout_text)
        if not 0 < timeout <= 300:
            raise ValueError
    except ValueError:
        raise ValueError(f"timeout={timeout_text!r}: seconds each protocol may try, above 0 and at most 300") from None
    if server and "protocol" in kwargs:
        _wish(kwargs["protocol"])
    port_range = kwargs.get("port-range")
    if port_range is not None:
        from natbypass.punch.candidates import PortRange

        PortRange.parse(port_range)
    settings = PeerSettings(
        mediator=mediator,
        peer_id=peer_id,
        identity=kwargs.get("identity") or default_identity_path(),
        stun=stun,
        known_peers=kwargs.get("known-peers") or default_known_peers_path(),
        token=kwargs.get("token"),
        ca=kwargs.get("ca"),
        protocol=kwargs.get("protocol", "auto") if server else "auto",
        bind=kwargs.get("bind", "0.0.0.0"),
        port_range=port_range,
        timeout=timeout,
        discovery=bool(_flag(kwargs, "discovery", True)),
        host_candidates=bool(_flag(kwargs, "host-candidates", True)),
    )
    given = frozenset(f for f, key in _KEY_OF.items() if key in kwargs and (server or key != "protocol"))
    return settings, given


# -------------------------------------------------------------------- sharing


class SharedPeer:
    """
    One peer that endpoint strings share: made by L{PeerRegistry}, started
    by the first endpoint that needs it, stopped with the reactor.
    """

    log = Logger()

    def __init__(self, reactor: Any, peer: Peer, settings: PeerSettings) -> None:
        self.reactor = reactor
        self.peer = peer
        self.settings = settings
        self.started = False
        self._trigger: Any = None

    @property
    def stopped(self) -> bool:
        """Started once and stopped since (by the reactor's shutdown or by hand): no longer usable."""
        return self.started and not self.peer.running

    def whenReady(self) -> Deferred[None]:
        """Start the peer if nobody has; fires once it is registered with the mediator and knows its mappings."""
        if self.stopped:
            return defer.fail(PeerNotStarted(f"the shared peer {self.peer.peer_id!r} has been stopped"))
        if not self.started:
            self.started = True
            self.log.info(
                "starting the shared peer {peer_id} ({fingerprint}) at {mediator} for natbypass: endpoints",
                peer_id=self.peer.peer_id,
                fingerprint=str(self.peer.fingerprint),
                mediator=self.settings.mediator,
            )
            self.peer.startService()
            self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        return self.peer.whenReady()

    def stop(self) -> Deferred[None]:
        """Stop the peer (its streams and connections end); harmless when it never started."""
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, NotImplementedError):
                pass  # already run (we are the shutdown), or a test reactor
            self._trigger = None
        if not self.peer.running:
            return defer.succeed(None)
        return defer.maybeDeferred(self.peer.stopService)


class PeerRegistry:
    """
    The peers C{natbypass:} strings run over: one per reactor and
    (mediator, id, identity file), shared by every string that names them.
    """

    def __init__(self, make: Callable[..., Peer] = Peer) -> None:
        self._make = make
        self._peers: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], SharedPeer]] = (
            weakref.WeakKeyDictionary()
        )

    def peer(
        self, reactor: Any, settings: PeerSettings, given: frozenset[str] = frozenset(), allow: AllowList | None = None
    ) -> SharedPeer:
        """
        The shared peer for C{settings} on C{reactor}, made (not started) if
        there is none yet (or the last one was stopped).  The settings a
        string gave (C{given}) must match the running peer's; C{allow} sets
        who may connect once, and must match it afterwards.

        @raise ValueError: on a setting the shared peer already has otherwise,
            or an identity file that cannot be used.
        """
        peers = self._peers.setdefault(reactor, {})
        shared = peers.get(settings.key)
        if shared is None or shared.stopped:
            shared = peers[settings.key] = SharedPeer(reactor, self._build(reactor, settings), settings)
        else:
            for name in sorted(given):
                mine, theirs = getattr(settings, name), getattr(shared.settings, name)
                if mine != theirs:
                    raise ValueError(
                        f"the peer {settings.peer_id!r} at {settings.mediator} is already set up with "
                        f"{_KEY_OF[name]}={theirs!r}, and another natbypass: string for it says {mine!r}: "
                        f"give them the same value (or leave it out of all but one)"
                    )
        if allow is not None:
            current = shared.peer.allow
            if current is None:
                shared.peer.allow = allow
            elif current != allow:
                raise ValueError(
                    f"the peer {settings.peer_id!r} already lets in what {current.source} allows, and another "
                    f"natbypass: string for it gives {allow.source}: one peer (one id) has one allow list"
                )
        return shared

    def _build(self, reactor: Any, settings: PeerSettings) -> Peer:
        from natbypass.identity import load_or_create
        from natbypass.signaling.client import client_endpoint

        try:
            identity = load_or_create(settings.identity)
        except IdentityFileError as e:
            raise ValueError(f"identity={settings.identity}: {e}") from None
        try:
            mediator = client_endpoint(reactor, settings.mediator, settings.ca)
        except (ValueError, TypeError, KeyError, OSError) as e:
            # Twisted's own parser raises TypeError on a wrong number of fields.
            raise ValueError(
                f"mediator={settings.mediator!r} is not a usable client endpoint ({e}): "
                r"write it like tcp\:HOST\:7000 or tls\:HOST\:7443"
            ) from None
        return self._make(
            reactor,
            settings.peer_id,
            mediator,
            settings.stun,
            token=settings.token,
            protocol=settings.protocol,
            config=settings.config(),
            identity=identity,
            known_peers=KnownPeers(settings.known_peers),
        )

    def peers(self, reactor: Any) -> list[SharedPeer]:
        """The shared peers made for C{reactor}."""
        return list(self._peers.get(reactor, {}).values())

    def stopAll(self, reactor: Any) -> Deferred[None]:
        """Stop and forget every shared peer of C{reactor} (tests; the reactor's shutdown stops them anyway)."""
        peers = self._peers.pop(reactor, {})
        stopping = [shared.stop() for shared in peers.values()]
        return defer.gatherResults(stopping, consumeErrors=True).addCallback(lambda _: None)


#: The registry the endpoint string parsers use.
registry = PeerRegistry()


def clientFromArgs(reactor: Any, args: Sequence[str], kwargs: Mapping[str, str]) -> NATbypassClientEndpoint:
    """The client endpoint of a parsed C{natbypass:} string, over the registry's shared peer."""
    spec = parse_client(args, kwargs)
    shared = registry.peer(reactor, spec.settings, spec.given)
    return NATbypassClientEndpoint(
        shared.peer, spec.target, spec.service, spec.protocol, spec.fingerprint, ready=shared.whenReady
    )


def serverFromArgs(reactor: Any, args: Sequence[str], kwargs: Mapping[str, str]) -> NATbypassServerEndpoint:
    """The server endpoint of a parsed C{natbypass:} string, over the registry's shared peer."""
    spec = parse_server(args, kwargs)
    shared = registry.peer(reactor, spec.settings, spec.given, spec.allow)
    return NATbypassServerEndpoint(shared.peer, spec.service, ready=shared.whenReady)


# ------------------------------------------------------------------ endpoints


def _started(peer: Any) -> Callable[[], Deferred[None]]:
    def ready() -> Deferred[None]:
        if not getattr(peer, "running", False):
            return defer.fail(
                PeerNotStarted(
                    f"the peer {peer.peer_id!r} is not running: call its startService() (or give it a parent "
                    f"service) before using an endpoint over it"
                )
            )
        return peer.whenReady()

    return ready


@implementer(IStreamClientEndpoint)
class NATbypassClientEndpoint:
    """
    Opens a stream to C{peer_id}'s C{service} over C{peer} (one connection
    per remote peer, shared by every stream to it).  C{fingerprint} pins the
    key that peer must prove; without it the peer's known-peers file decides
    (trust on first use), as for L{Peer.connect}.
    """

    def __init__(
        self,
        peer: Peer,
        peer_id: str,
        service: str = DEFAULT_SERVICE,
        protocol: str | Sequence[str] | None = None,
        fingerprint: Fingerprint | str | None = None,
        *,
        ready: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        """
        @param ready: what C{connect} waits for first (default: the peer must
            have been started, then its C{whenReady}); the string parsers pass
            their shared peer's, which starts it.
        """
        frames.valid_service(service)
        if protocol is not None:
            parse_wish(protocol)
        self.peer = peer
        self.peer_id = peer_id
        self.service = service
        self.protocol = protocol
        self.fingerprint = Fingerprint.parse(fingerprint) if isinstance(fingerprint, str) else fingerprint
        self._ready = ready or _started(peer)

    def connect(self, protocolFactory: Any) -> Deferred[IProtocol]:
        """
        Fires with the protocol once the stream is open (its C{connectionMade}
        has run); fails with L{natbypass.streams.StreamRefused} when the peer
        refuses the service, or like L{Peer.connect} when no path can be
        made.  Cancelling it abandons the attempt.
        """
        return defer.ensureDeferred(self._connect(protocolFactory))

    async def _connect(self, factory: Any) -> IProtocol:
        await self._ready()
        return await self.peer.openStream(self.peer_id, self.service, factory, self.protocol, self.fingerprint)

    def __repr__(self) -> str:
        return f"<NATbypassClientEndpoint {self.peer.peer_id} -> {self.peer_id}/{self.service}>"


@implementer(IStreamServerEndpoint)
class NATbypassServerEndpoint:
    """
    Serves C{service} on C{peer} to the peers it approves (its approver or
    allow list), each stream a connection of the factory's protocol.
    """

    def __init__(
        self, peer: Peer, service: str = DEFAULT_SERVICE, *, ready: Callable[[], Deferred[None]] | None = None
    ) -> None:
        """@param ready: as for L{NATbypassClientEndpoint}."""
        frames.valid_service(service)
        self.peer = peer
        self.service = service
        self._ready = ready or _started(peer)

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:
        """
        Fires with the service's C{IListeningPort} once the peer is
        registered with the mediator (others can reach it); fails with
        C{CannotListenError} when the service is served already.
        """
        return defer.ensureDeferred(self._listen(protocolFactory))

    async def _listen(self, factory: Any) -> IListeningPort:
        try:
            await self._ready()
        except defer.CancelledError:
            raise
        except Exception as e:
            raise CannotListenError(None, self.service, e) from e
        return self.peer.serve(self.service, factory)

    def __repr__(self) -> str:
        return f"<NATbypassServerEndpoint {self.peer.peer_id}/{self.service}>"

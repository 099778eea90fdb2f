"""
Mediators as one cluster on Redis (C{--redis URL}; docs/cluster.md).

Redis holds the shared directory:

  - C{nb:bind:ID}: the digest of the key ID is bound to, expiring C{id_hold}
    after its owner left (refreshed while connected), so a binding outlives
    mediator restarts;
  - C{nb:peer:ID}: the node (mediator process) holding ID's live
    connection, expiring C{presence_ttl} after its last refresh, so a dead
    mediator's peers vanish from the directory on their own;
  - C{nb:nat:ID}: the NAT summary ID published last (in a connect or accept).

Offers and their answers between mediators travel by pub/sub on one
channel per node (C{nb:node:NODE}): an offer is only useful for its 30 s,
PUBLISH says at once whether the node is there to hear it, and there is
nothing to trim or acknowledge (docs/cluster.md explains the choice).

L{IClusterDirectory} is what the signalling state asks of Redis; the
L{RedisDirectory} implements it over two RESP connections (commands and
subscriber) kept up by C{ClientService}.  Tests use an in-memory fake.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from .resp import ClusterUnavailable, RedisError, RedisURL, RespProtocol, flatten

PREFIX = "nb:"
#: Every bound id, scored by when its binding expires (ms, Redis' clock): --max-ids across the cluster.
IDS = f"{PREFIX}ids"

#: The milliseconds of Redis' own clock (TIME), so every mediator counts expiry on one clock.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: bind, peer, ids.  ARGV: digest, node, bind ttl ms, presence ttl ms, owns (0/1), replace (0/1),
#: max ids (0: no limit), peer id.  Returns {outcome, bound ms left or ids bound, node holding the id}:
#: outcome "bound" (another key), "duplicate" (live elsewhere, no replace), "full" (a new id while
#: --max-ids ids are bound in the cluster), else "new", "same" or "rebound" (and then the id is ours).
#: C{ids} is a sorted set of every bound id scored by its binding's expiry: the cluster-wide count.
CLAIM = (
    _NOW
    + """
local b = redis.call('GET', KEYS[1])
if b and b ~= ARGV[1] and ARGV[5] ~= '1' then
  return {'bound', redis.call('PTTL', KEYS[1]), redis.call('GET', KEYS[2]) or ''}
end
local p = redis.call('GET', KEYS[2])
if p and p ~= ARGV[2] and ARGV[6] ~= '1' then
  return {'duplicate', 0, p}
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if not b and tonumber(ARGV[7]) > 0 then
  local n = redis.call('ZCARD', KEYS[3])
  if n >= tonumber(ARGV[7]) then return {'full', n, ''} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[8])
local how = 'new'
if b then how = (b == ARGV[1]) and 'same' or 'rebound' end
return {how, 0, p or ''}
"""
)

#: KEYS: bind, peer, ids.  ARGV: node, hold ms, peer id.  Only while the presence is ours (the peer
#: did not move on).
LEAVE = (
    _NOW
    + """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  if tonumber(ARGV[2]) > 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3])
  else
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[3], ARGV[3])
  end
end
return 0
"""
)

#: KEYS: peer.  ARGV: channel prefix, payload, our node.  -1: not registered; -2: registered here
#: (a stale entry of ours); else the receivers of PUBLISH (0: that node is gone), and the node.
ROUTE = """
local n = redis.call('GET', KEYS[1])
if not n then return {-1, ''} end
if n == ARGV[3] then return {-2, n} end
return {redis.call('PUBLISH', ARGV[1] .. n, ARGV[2]), n}
"""

#: KEYS: bind1, peer1, bind2, peer2, ..., ids.  ARGV: node, bind ttl ms, presence ttl ms, digest1,
#: digest2, ..., id1, id2, ...  Re-publishes our registrations (after Redis came back, and every
#: refresh): a binding is renewed when it is ours or free, the presence when it is ours or free.
#: Returns the ids' indexes (1-based) whose binding belongs to another key or whose presence another
#: node took.
REFRESH = (
    _NOW
    + """
local lost = {}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local bk, pk, d = KEYS[2 * i - 1], KEYS[2 * i], ARGV[3 + i]
  local b = redis.call('GET', bk)
  local p = redis.call('GET', pk)
  if (b and b ~= d) or (p and p ~= ARGV[1]) then
    lost[#lost + 1] = i
  else
    redis.call('SET', bk, d, 'PX', ARGV[2])
    redis.call('SET', pk, ARGV[1], 'PX', ARGV[3])
    redis.call('ZADD', KEYS[#KEYS], now + tonumber(ARGV[2]), ARGV[3 + n + i])
  end
end
return lost
"""
)


class IClusterReceiver(Interface):
    """What the directory tells the signalling state."""

    def cluster_message(payload):
        """A message another node published to ours (bytes)."""

    def cluster_up():
        """Redis is reachable again (or for the first time): re-publish our registrations."""

    def cluster_down(reason):
        """Redis is not reachable: refuse what needs it, keep the rest."""


class IClusterDirectory(Interface):
    """The shared directory and message bus of a mediator cluster (Redis in production)."""

    node = Attribute("This mediator process's node id (random per start), its channel's name.")
    available = Attribute("Is Redis reachable now (commands and our channel)?")

    def set_receiver(receiver):
        """Where messages and up/down events go (an L{IClusterReceiver})."""

    def claim(peer_id, digest, bind_ttl, presence_ttl, owns, replace, max_ids=0):
        """
        Bind C{peer_id} to C{digest} and mark it held by us, atomically; a
        Deferred of (outcome, bound ms left, node that holds it), see L{CLAIM}.
        A new id is refused (outcome C{full}) while C{max_ids} ids are bound
        in the whole cluster (0: no limit).
        Fails with L{ClusterUnavailable} when Redis is not reachable.
        """

    def leave(peer_id, hold):
        """Our connection of C{peer_id} left: the binding now expires in C{hold} seconds (0: now)."""

    def route(peer_id, payload):
        """
        Publish C{payload} to the node holding C{peer_id}: a Deferred of
        (receivers, node), receivers -1 when no node holds it, -2 when we do.
        """

    def publish(node, payload):
        """Publish C{payload} to C{node}'s channel (fire and forget)."""

    def refresh(entries, bind_ttl, presence_ttl):
        """
        Renew our registrations C{entries} (a list of (peer id, digest)); a
        Deferred of the ids another key or node took meanwhile.
        """

    def publish_nat(peer_id, nat, ttl):
        """Record the NAT summary C{peer_id} published (a JSON-able dict)."""

    def status():
        """A dict for the operator: node, available, rtt_ms, reconnects."""


def new_node_id(random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    """A fresh node id: 9 random bytes, base64url (12 characters)."""
    return base64.urlsafe_b64encode(random_bytes(9)).decode("ascii")


def encode_payload(obj: dict[str, Any]) -> bytes:
    """A message between nodes: compact JSON."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode_payload(data: bytes) -> dict[str, Any]:
    """The inverse of L{encode_payload}; raises ValueError on anything but a JSON object."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("a cluster message is a JSON object")
    return obj


class _Factory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], RespProtocol]) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> RespProtocol:
        return self.make()


class _Receiver(Protocol):
    def cluster_message(self, payload: bytes) -> None: ...
    def cluster_up(self) -> None: ...
    def cluster_down(self, reason: str) -> None: ...


def load_ca(path: str) -> Any:
    """
    The trust root in the PEM file C{path} (C{--redis-ca}): every certificate
    in it.  Raises ValueError when it holds none, OSError when unreadable.
    """
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    blocks = [b + marker for b in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    try:
        return trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
    except Exception as e:
        raise ValueError(f"{path}: not a PEM certificate ({e})") from None


def redis_endpoint(
    reactor: Any, url: RedisURL, connect_timeout: float = 5.0, ca: Any = None, check_name: bool = True
) -> IStreamClientEndpoint:
    """
    A client endpoint for C{url}: TCP, TLS, or a Unix socket.  TLS checks
    the server's certificate against C{ca} (a trust root, L{load_ca}) or,
    without one, the system's roots, and (unless C{check_name} is False,
    only with C{ca}) that it names the URL's host: a DNS name or an IP
    address in its subjectAltName; a certificate without one is refused.
    """
    from .client import VerifiedTLS

    if not check_name and ca is None:
        raise ValueError("the name check can only be left out with a private CA (--redis-ca)")
    if url.path is not None:
        return UNIXClientEndpoint(reactor, url.path, timeout=connect_timeout)
    assert url.host is not None and url.port is not None
    ep = HostnameEndpoint(reactor, url.host.encode("idna"), url.port, timeout=connect_timeout)
    if url.tls:
        return wrapClientTLS(VerifiedTLS(url.host, ca, check_name), ep)
    return ep


@implementer(IClusterDirectory)
class RedisDirectory(Service):
    """
    The directory on one Redis: a command connection (scripts, PUBLISH) and
    a subscriber connection (our node's channel), each reconnecting with
    backoff.  Every C{ping_interval} seconds a PING measures the Redis round
    trip; one unanswered within C{ping_timeout} takes the connection for
    dead.  C{available} is true while both connections are up.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
        node: str | None = None,
        ping_interval: float = 1.0,
        ping_timeout: float = 2.0,
        where: str = "redis",
    ) -> None:
        self.clock = clock
        self.node = node or new_node_id()
        self.channel = f"{PREFIX}node:{self.node}"
        self.where = where
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self._auth = {"password": password, "username": username}
        self._db = db
        self._cmd: RespProtocol | None = None
        self._sub: RespProtocol | None = None
        self._subscribed = False
        self._receiver: _Receiver | None = None
        self.available = False
        self.rtt: float | None = None
        self.reconnects = 0
        self._ping_call: Any = None
        self._ping_out: float | None = None
        #: Connections that could not be set up, by kind (auth, tls, closed), and the last reason.
        self.connect_failures: dict[str, int] = {}
        self.last_error: str | None = None
        policy = backoffPolicy(initialDelay=0.2, maxDelay=5.0)
        self._cmd_service = ClientService(
            endpoint,
            _Factory(
                lambda: RespProtocol(
                    db=db, on_ready=self._cmd_ready, on_lost=self._lost, on_failed=self._setup_failed, **self._auth
                )
            ),
            retryPolicy=policy,
            clock=clock,
        )
        self._sub_service = ClientService(
            endpoint,
            _Factory(
                lambda: RespProtocol(
                    on_ready=self._sub_ready,
                    on_message=self._message,
                    on_lost=self._lost,
                    on_failed=self._setup_failed,
                    **self._auth,
                )
            ),
            retryPolicy=policy,
            clock=clock,
        )

    def set_receiver(self, receiver: Any) -> None:
        self._receiver = receiver

    # -- service

    def startService(self) -> None:
        super().startService()
        self.log.info("cluster: node {node} connecting to {where}", node=self.node, where=self.where)
        self._cmd_service.startService()
        self._sub_service.startService()
        self._ping_call = self.clock.callLater(self.ping_interval, self._ping)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        d1 = self._cmd_service.stopService()
        d2 = self._sub_service.stopService()
        return d1.addCallback(lambda _: d2).addCallback(lambda _: None)

    # -- connections

    def _cmd_ready(self, proto: RespProtocol) -> None:
        self._cmd = proto
        self._check_up()

    def _sub_ready(self, proto: RespProtocol) -> None:
        self._sub = proto

        def subscribed(_: Any) -> None:
            self._subscribed = True
            self._check_up()

        proto.execute("SUBSCRIBE", self.channel).addCallbacks(subscribed, lambda f: proto.transport.abortConnection())

    _HINTS = {
        "auth": "check the user and password (the --redis URL or --redis-password-file)",
        "tls": "check --redis-ca (the CA that signed Redis' certificate) and that the certificate names the "
        "URL's host in its subjectAltName",
    }

    def _setup_failed(self, kind: str, text: str) -> None:
        """A connection to Redis could not be set up: count it, say why (once per new reason)."""
        if not self.running:
            return
        self.connect_failures[kind] = self.connect_failures.get(kind, 0) + 1
        if text != self.last_error:
            hint = self._HINTS.get(kind, "retrying with backoff")
            self.log.error(
                "cluster: cannot use {where}: {reason}; {hint} (refusing registrations until it works)",
                where=self.where,
                reason=text,
                hint=hint,
                kind=kind,
            )
        self.last_error = text

    def _check_up(self) -> None:
        if self._cmd is not None and self._sub is not None and self._subscribed and not self.available:
            self.available = True
            self.last_error = None
            self.log.info("cluster: node {node} connected to {where}", node=self.node, where=self.where)
            if self._receiver is not None:
                self._receiver.cluster_up()

    def _lost(self, proto: RespProtocol) -> None:
        if proto is self._cmd:
            self._cmd = None
        elif proto is self._sub:
            self._sub, self._subscribed = None, False
        else:
            return
        self._ping_out = None
        if self.available:
            self.available = False
            self.reconnects += 1
            self.log.error(
                "cluster: lost the connection to {where}; operations that need it are refused "
                "(503 cluster-unavailable) until it returns",
                where=self.where,
            )
            if self._receiver is not None:
                self._receiver.cluster_down("the connection to Redis was lost")

    def _message(self, channel: bytes, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.cluster_message(data)

    def _ping(self) -> None:
        self._ping_call = self.clock.callLater(self.ping_interval, self._ping)
        now = self.clock.seconds()
        if self._ping_out is not None:
            if now - self._ping_out > self.ping_timeout:
                self.log.warn("cluster: Redis did not answer a PING in {t:g} s; reconnecting", t=self.ping_timeout)
                self._ping_out = None
                for p in (self._cmd, self._sub):
                    if p is not None and p.transport is not None:
                        p.transport.abortConnection()
            return
        cmd, sub = self._cmd, self._sub
        if cmd is None:
            return
        self._ping_out = now

        def pong(_: Any) -> None:
            if self._ping_out == now:
                self.rtt = self.clock.seconds() - now
                self._ping_out = None

        cmd.execute("PING").addCallbacks(pong, lambda f: None)
        if sub is not None and self._subscribed:
            sub.execute("PING").addErrback(lambda f: None)

    # -- IClusterDirectory

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        cmd = self._cmd
        if cmd is None or not self.available:
            return fail(ClusterUnavailable("Redis is not reachable"))
        return cmd.execute(*flatten(["EVAL", script, len(keys), keys, args]))

    def claim(
        self,
        peer_id: str,
        digest: bytes,
        bind_ttl: float,
        presence_ttl: float,
        owns: bool,
        replace: bool,
        max_ids: int = 0,
    ) -> Deferred[tuple[str, int, str]]:
        d = self._eval(
            CLAIM,
            [f"{PREFIX}bind:{peer_id}", f"{PREFIX}peer:{peer_id}", IDS],
            [digest, self.node, _ms(bind_ttl), _ms(presence_ttl), int(owns), int(replace), max_ids, peer_id],
        )
        return d.addCallback(lambda r: (r[0].decode(), int(r[1]), r[2].decode()))

    def leave(self, peer_id: str, hold: float) -> None:
        if self.available:
            self._eval(
                LEAVE, [f"{PREFIX}bind:{peer_id}", f"{PREFIX}peer:{peer_id}", IDS], [self.node, _ms(hold), peer_id]
            ).addErrback(self._log_failure, "leave")

    def route(self, peer_id: str, payload: bytes) -> Deferred[tuple[int, str]]:
        d = self._eval(ROUTE, [f"{PREFIX}peer:{peer_id}"], [f"{PREFIX}node:", payload, self.node])
        return d.addCallback(lambda r: (int(r[0]), r[1].decode()))

    def publish(self, node: str, payload: bytes) -> None:
        cmd = self._cmd
        if cmd is not None and self.available:
            cmd.execute("PUBLISH", f"{PREFIX}node:{node}", payload).addErrback(self._log_failure, "publish")

    def refresh(self, entries: list[tuple[str, bytes]], bind_ttl: float, presence_ttl: float) -> Deferred[list[str]]:
        if not entries:
            return succeed([])
        keys: list[str] = []
        for peer_id, _ in entries:
            keys += [f"{PREFIX}bind:{peer_id}", f"{PREFIX}peer:{peer_id}"]
        keys.append(IDS)
        args = [self.node, _ms(bind_ttl), _ms(presence_ttl)] + [dg for _, dg in entries] + [p for p, _ in entries]
        d = self._eval(REFRESH, keys, args)
        return d.addCallback(lambda lost: [entries[int(i) - 1][0] for i in lost])

    def publish_nat(self, peer_id: str, nat: dict[str, Any], ttl: float) -> None:
        cmd = self._cmd
        if cmd is not None and self.available:
            cmd.execute("SET", f"{PREFIX}nat:{peer_id}", encode_payload(nat), "PX", _ms(ttl)).addErrback(
                self._log_failure, "publish_nat"
            )

    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "available": self.available,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "reconnects": self.reconnects,
            "connect_failures": dict(self.connect_failures),
            "last_error": self.last_error,
        }

    def _log_failure(self, f: Failure, what: str) -> None:
        if not f.check(ClusterUnavailable, RedisError):
            self.log.failure("cluster: {what} failed", f, what=what)
        elif f.check(RedisError):
            self.log.warn("cluster: Redis refused {what}: {err}", what=what, err=f.value)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def directory_from_url(
    reactor: Any, url: str, password: str | None = None, ca: str | None = None, check_name: bool = True
) -> RedisDirectory:
    """
    A L{RedisDirectory} for C{--redis URL} (C{password}: C{--redis-password-file}'s, over the URL's;
    C{ca}: C{--redis-ca}'s PEM file, the CA a C{rediss://} server's certificate must chain to;
    C{check_name} False: C{--redis-tls-verify ca}, the chain only).
    """
    u = RedisURL(url)
    return RedisDirectory(
        redis_endpoint(reactor, u, ca=load_ca(ca) if ca is not None else None, check_name=check_name),
        reactor,
        password=password if password is not None else u.password,
        username=u.username,
        db=u.db,
        where=u.endpoint_string(),
    )


class RemoteChannel:
    """
    The channel of a stand-in link: the other side of an offer that lives
    on another mediator.  What the state sends it (the initiator's session
    or error, the target's cancel) is published to that mediator, which
    hands it to its own connection.
    """

    remote = True

    def __init__(self, routing: ClusterRouting, node: str | None, offer_id: str) -> None:
        self.routing = routing
        #: The other mediator; None until the route is known.
        self.node = node
        self.offer_id = offer_id

    def send(self, message: Any) -> None:
        if self.node is not None:
            self.routing.relay(self.node, self.offer_id, message)

    def close(self) -> None:
        """Nothing to close here: the connection is the other mediator's."""

    def kernel_rtt(self) -> float | None:
        return None


class ClusterRouting:
    """
    The signalling state's side of the cluster: registrations claimed in
    Redis before they are confirmed, offers to peers of other mediators
    published to them, their answers, cancels and sessions relayed back,
    our registrations refreshed and re-published after Redis returns.

    Each offer between two mediators exists on both, under one id: on the
    initiator's mediator with a stand-in for the target, on the target's
    with a stand-in for the initiator (L{RemoteChannel}), so the state's own
    limits, fairness, timeouts and session making apply unchanged.  The
    target's mediator makes the session (id, key, order, start time) once.
    """

    log = Logger()

    def __init__(self, state: Any, directory: Any, presence_ttl: float = 30.0, refresh_interval: float = 10.0) -> None:
        self.state = state
        self.directory = directory
        self.presence_ttl = presence_ttl
        self.refresh_interval = refresh_interval
        self._last_refresh = float("-inf")
        self._nats: dict[str, Any] = {}
        directory.set_receiver(self)

    # -- helpers

    @property
    def node(self) -> str:
        return self.directory.node

    def bind_ttl(self) -> float:
        hold = self.state.limits.id_hold
        return hold + self.presence_ttl if hold > 0 else self.presence_ttl

    def hop(self) -> float:
        """The time a message takes through Redis, about a Redis round trip."""
        rtt = getattr(self.directory, "rtt", None)
        return rtt if rtt is not None else 0.0005

    def _unavailable(self, link: Any, rid: int | None, what: str) -> None:
        self.state._count("cluster:refused")
        self.state._error(
            link,
            rid,
            "cluster-unavailable",
            f"the mediators' shared directory (Redis) is not reachable, so {what} cannot be done now; "
            "retry in a few seconds or use another mediator",
        )

    def status(self) -> dict[str, Any]:
        s = self.directory.status()
        return {
            "cluster_node": s.get("node"),
            "cluster_available": bool(s.get("available")),
            "cluster_rtt_ms": s.get("rtt_ms"),
            "cluster_reconnects": s.get("reconnects", 0),
            "cluster_connect_failures": s.get("connect_failures", {}),
            "cluster_last_error": s.get("last_error"),
        }

    # -- registration

    def claim(self, link: Any, msg: Any, fp: Any, owns: bool) -> None:
        """Claim C{msg.id} in Redis; the connection's next lines wait for the answer."""
        st = self.state
        link.queued = []
        try:
            d = self.directory.claim(
                msg.id, fp.digest, self.bind_ttl(), self.presence_ttl, owns, msg.replace, st.limits.max_ids
            )
        except Exception:
            d = fail()

        def done(result: tuple[str, int, str]) -> None:
            outcome, left_ms, holder = result
            if not link.open or link not in st.links:  # gone meanwhile
                if outcome not in ("bound", "duplicate") and msg.id not in st.peers:
                    self.directory.leave(msg.id, st.limits.id_hold)
                return
            now = st.clock.seconds()
            if outcome == "bound":
                st._count("ids:squat-refused")
                self.log.warn(
                    "refused registration of {peer_id} from {source}: the id is bound to another key (cluster)",
                    peer_id=msg.id,
                    source=link.source,
                )
                where = (
                    "its owner is connected" if holder else f"its owner left; held for another {left_ms / 1000:.0f} s"
                )
                st._error(
                    link,
                    msg.rid,
                    "id-bound",
                    f"peer id {msg.id} belongs to another identity key: {where}. Use another id, or the owner's key",
                )
            elif outcome == "full":
                self.log.warn(
                    "refused registration of {peer_id}: {n} ids bound in the cluster", peer_id=msg.id, n=left_ms
                )
                st._error(
                    link,
                    msg.rid,
                    "too-many-ids",
                    f"the cluster holds its maximum of {st.limits.max_ids} bound ids (connected or held for "
                    "departed peers, on every mediator); ids already bound to your key still work; try a new id later",
                )
            elif outcome == "duplicate":
                st._error(
                    link,
                    msg.rid,
                    "duplicate-id",
                    f"peer id {msg.id} is registered by a live connection on another mediator; "
                    "send replace=true to take it over",
                )
            elif st._register_checked(link, msg, fp, owns, now, claimed=True):
                link.last_seen = now
                if holder and holder != self.node:
                    st._count("replaced:remote")
                    self.directory.publish(holder, encode_payload({"t": "kick", "id": msg.id}))
            elif msg.id not in st.peers:
                self.directory.leave(msg.id, st.limits.id_hold)

        def failed(f: Failure) -> None:
            if link.open and link in st.links:
                if not f.check(ClusterUnavailable):
                    self.log.failure("cluster: claiming {peer_id} failed", f, peer_id=msg.id)
                self._unavailable(link, msg.rid, "a registration")

        def finally_(_: Any) -> None:
            if link in st.links:
                st.release(link)

        d.addCallbacks(done, failed).addErrback(
            lambda f: self.log.failure("cluster: registration of {peer_id} failed", f, peer_id=msg.id)
        ).addBoth(finally_)

    def leave(self, peer_id: str) -> None:
        self._nats.pop(peer_id, None)
        self.directory.leave(peer_id, self.state.limits.id_hold)

    def published(self, link: Any, description: Any) -> None:
        """Record the NAT summary a peer of ours describes itself with (once per change)."""
        nat = description.nat
        if link.peer_id is None or self._nats.get(link.peer_id) == nat:
            return
        from .wire import nat_to_wire

        self._nats[link.peer_id] = nat
        self.directory.publish_nat(link.peer_id, nat_to_wire(nat), self.bind_ttl())

    # -- offers

    def _stand_in(self, node: str | None, offer_id: str, peer_id: str) -> Any:
        from .server import _Link

        link = _Link(RemoteChannel(self, node, offer_id), "cluster", self.state.clock.seconds(), 0.0, b"")
        link.peer_id = peer_id
        link.nonce = None
        return link

    def offer(self, link: Any, rid: int, target_id: str, description: Any) -> None:
        """C{link} offers to C{target_id}, not registered here: publish the offer to whoever holds it."""
        from .wire import Offer, encode

        st = self.state
        if not self.directory.available:
            self._unavailable(link, rid, "an offer to a peer of another mediator")
            return
        now = st.clock.seconds()
        timeout = st.limits.offer_timeout
        offer_id = st._id()
        stand_in = self._stand_in(None, offer_id, target_id)
        st.add_offer(offer_id, link, rid, stand_in, description, now + timeout)
        rtt = link.rtt if link.rtt is not None else (link.channel.kernel_rtt() or st.limits.unknown_rtt)
        payload = encode_payload(
            {
                "t": "offer",
                "from": self.node,
                "to": target_id,
                "rid": rid,
                "group": link.group,
                "rtt": rtt,
                "line": encode(Offer(offer_id, link.peer_id, description, int(timeout * 1000))).decode("utf-8"),
            }
        )

        def routed(result: tuple[int, str]) -> None:
            receivers, node = result
            offer = st.offers.get(offer_id)
            if receivers > 0:
                stand_in.channel.node = node
                if offer is None:  # the initiator left (or the answer came) meanwhile: make sure it is withdrawn
                    self.relay(node, offer_id, _cancel(offer_id, f"peer {link.peer_id} disconnected"))
                return
            if offer is None:
                return
            st.offers.pop(offer_id, None)
            st._drop_offer(offer)
            st._count("offers:unknown-peer")
            if receivers == 0:
                reason = f"peer {target_id} is registered at a mediator that does not answer; retry in a few seconds"
            else:
                reason = f"no peer {target_id} is registered"
            if link.open:
                st._error(link, rid, "unknown-peer", reason)

        def failed(f: Failure) -> None:
            offer = st.offers.pop(offer_id, None)
            if offer is None:
                return
            st._drop_offer(offer)
            if not f.check(ClusterUnavailable):
                self.log.failure("cluster: routing an offer failed", f)
            if link.open:
                self._unavailable(link, rid, "an offer to a peer of another mediator")

        st._count("offers:remote")
        self.directory.route(target_id, payload).addCallbacks(routed, failed)

    def relay(self, node: str, offer_id: str, message: Any) -> None:
        from .wire import encode

        self.directory.publish(
            node, encode_payload({"t": "relay", "offer": offer_id, "line": encode(message).decode("utf-8")})
        )

    # -- IClusterReceiver

    def cluster_message(self, payload: bytes) -> None:
        try:
            obj = decode_payload(payload)
            kind = obj.get("t")
            if kind == "offer":
                self._offer_in(obj)
            elif kind == "relay":
                self._relay_in(obj)
            elif kind == "kick":
                self._kick(obj["id"])
        except Exception:
            self.log.failure("cluster: a message from another mediator could not be handled")

    def _offer_in(self, obj: dict[str, Any]) -> None:
        from .wire import Offer, decode_from_server

        st = self.state
        msg = decode_from_server(obj["line"].encode("utf-8"))
        if not isinstance(msg, Offer):
            raise ValueError("an offer message without an offer")
        stand_in = self._stand_in(str(obj["from"]), msg.offer, msg.peer)
        stand_in.group = str(obj["group"])
        stand_in.rtt = float(obj["rtt"])
        stand_in.fingerprint = msg.description.fingerprint
        rid = int(obj["rid"])
        target = st.peers.get(obj["to"])
        if target is None:
            st._count("offers:unknown-peer")
            st._error(stand_in, rid, "unknown-peer", f"no peer {obj['to']} is registered")
            return
        st._offer_to(stand_in, rid, target, msg.description, offer_id=msg.offer, timeout=msg.expires_in_ms / 1000)

    def _relay_in(self, obj: dict[str, Any]) -> None:
        from .wire import Cancel, Error, SessionReply, decode_from_server

        st = self.state
        offer = st.offers.get(obj["offer"])
        if offer is None:
            return
        msg = decode_from_server(obj["line"].encode("utf-8"))
        if isinstance(msg, Cancel) and not getattr(offer.target.channel, "remote", False):
            del st.offers[offer.id]
            st._drop_offer(offer)
            if offer.target.open:
                offer.target.channel.send(msg)
        elif isinstance(msg, (SessionReply, Error)) and not getattr(offer.initiator.channel, "remote", False):
            del st.offers[offer.id]
            st._drop_offer(offer)
            a = offer.initiator
            if isinstance(msg, SessionReply):
                s = msg.session
                pair = f"{offer.description.nat.kind()},{s.description.nat.kind()}"
                st.sessions[s.id] = (st.clock.seconds() + st.limits.session_ttl, a.peer_id, s.peer, 0, pair)
                st._count("sessions")
                st._count("sessions-by-nat:" + pair)
            else:
                st._count(f"offers:remote-{msg.error}")
            if a.open:
                a.channel.send(msg)

    def _kick(self, peer_id: str) -> None:
        st = self.state
        link = st.peers.get(peer_id)
        if link is None:
            return
        st._count("replaced")
        self.log.info("peer {peer_id} registered on another mediator; closing its session here", peer_id=peer_id)
        st._error(link, None, "duplicate-id", "replaced by a newer registration of this id (on another mediator)")
        st._close(link)
        st.closed(link)

    def cluster_up(self) -> None:
        self.state._count("cluster:up")
        self._last_refresh = float("-inf")
        self.tick(self.state.clock.seconds())

    def cluster_down(self, reason: str) -> None:
        self.state._count("cluster:down")

    # -- periodic

    def tick(self, now: float) -> None:
        """Refresh our registrations' presence and bindings (and re-publish them after Redis returned)."""
        if now - self._last_refresh < self.refresh_interval or not self.directory.available:
            return
        self._last_refresh = now
        st = self.state
        entries = [(pid, st.bindings[pid]) for pid in st.peers if pid in st.bindings]
        for i in range(0, len(entries), 500):
            self.directory.refresh(entries[i : i + 500], self.bind_ttl(), self.presence_ttl).addCallbacks(
                self._lost_ids, lambda f: None
            )

    def _lost_ids(self, ids: list[str]) -> None:
        for peer_id in ids:
            link = self.state.peers.get(peer_id)
            if link is None:
                continue
            self.log.warn("cluster: {peer_id} was taken by another key or mediator meanwhile; closing", peer_id=peer_id)
            self._kick(peer_id)


def _cancel(offer_id: str, reason: str) -> Any:
    from .wire import Cancel

    return Cancel(offer_id, reason)

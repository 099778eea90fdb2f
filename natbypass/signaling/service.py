"""
The signalling half of the mediator's twistd plugin: options that
C{natbypass.app.mediator_tap} merges into its own, and the service they build.
"""

from __future__ import annotations

import gc
import resource
import time
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from .. import __version__
from ..listening import EndpointListener
from .server import ChooseOrder, Limits, SignalingFactory, SignalingState, TokenPolicy

#: C{optParameters} rows for C{usage.Options} (name, short, default, help, coerce).
SIGNAL_OPT_PARAMETERS: list[list[Any]] = [
    [
        "signal",
        None,
        "tcp:7000",
        "Signalling listener, any Twisted server endpoint string (e.g. ssl:7443:privateKey=key.pem:certKey=cert.pem).",
    ],
    [
        "token-file",
        None,
        None,
        "File of tokens (one per line: TOKEN [PEER-ID [FINGERPRINT]]); turns on authentication.",
    ],
    [
        "id-hold",
        None,
        86_400.0,
        "Seconds a peer id stays bound to its key after its owner disconnects, so nobody else can take it "
        "(0: only while connected).",
        float,
    ],
    ["max-ids", None, 250_000, "Most peer ids bound at once, connected or held (0: no limit).", int],
    [
        "proof-window",
        None,
        30.0,
        "Seconds a timed registration proof's clock may differ from ours (0: peers always sign the greeting's "
        "nonce, one round trip more).",
        float,
    ],
    ["max-peers", None, 100_000, "Most peers registered at once (0: no limit).", int],
    [
        "max-per-source",
        None,
        100,
        "Most signalling connections from one IPv4 address or one IPv6 /64 (0: no limit).",
        int,
    ],
    [
        "max-connections",
        None,
        10_000,
        "Most signalling connections at once (0: as many as file descriptors allow); lowered at start to the "
        "descriptor limit (ulimit -n) minus --fd-reserve.",
        int,
    ],
    [
        "fd-reserve",
        None,
        64,
        "File descriptors kept free of signalling connections (listeners, STUN sockets, logs).",
        int,
    ],
    [
        "shutdown-grace",
        None,
        5.0,
        "Seconds a stopping mediator gives its peers to take the shutting-down notice before it cuts them off.",
        float,
    ],
    [
        "accept-rate",
        None,
        10.0,
        "New signalling connections per second per IPv4 address or IPv6 /64 (0: no limit); over it (and "
        "--accept-burst) a connection is closed as it is accepted, without a reply. A connection refused at "
        "--max-per-source or --max-connections costs 10 of them.",
        float,
    ],
    [
        "accept-burst",
        None,
        100.0,
        "New connections one address may open at once on top of --accept-rate (e.g. the peers behind one NAT "
        "reconnecting after a restart).",
        float,
    ],
    ["rate", None, 20.0, "Messages per second allowed per connection (bursts of twice that; 0: no limit).", float],
    [
        "max-line",
        None,
        8192,
        "Longest signalling line in bytes; longer ones are refused and the connection closed.",
        int,
    ],
    ["idle-timeout", None, 90.0, "Close signalling connections silent for this many seconds.", float],
    ["keepalive", None, 30.0, "Ping registered peers after this many seconds (also refreshes the RTT).", float],
    ["offer-timeout", None, 30.0, "Seconds a peer has to answer an offer.", float],
    [
        "redis",
        None,
        None,
        "Run as one of a cluster of mediators sharing a Redis: redis://[[USER]:PASSWORD@]HOST:PORT/DB, "
        "rediss://... (TLS, the certificate checked) or unix:///PATH (docs/cluster.md). Without it the mediator "
        "keeps everything in memory.",
    ],
    ["redis-password-file", None, None, "File holding the Redis password (instead of one in the --redis URL)."],
    [
        "redis-ca",
        None,
        None,
        "PEM file of the CA(s) a rediss:// server's certificate must chain to (default: the system's roots).",
    ],
    [
        "redis-tls-verify",
        None,
        "full",
        "full: the certificate chains to the CA and names the URL's host in its subjectAltName; ca: the chain "
        "to --redis-ca only (a managed Redis whose own per-instance CA signs a certificate that does not name "
        "the address clients use).",
    ],
    ["status-interval", None, 60.0, "Seconds between status lines in the log (0: none).", float],
    [
        "gc-freeze-interval",
        None,
        0.0,
        "Every this many seconds collect garbage fully, then gc.freeze() what lives, so "
        "that the collector's full passes between two of these skip the idle connections (0: off; see docs/performance.md).",
        float,
    ],
]


def check_signaling_options(options: usage.Options) -> None:
    """Validate the signalling options (call from C{postOptions}); raises UsageError."""
    for name in (
        "max-peers",
        "max-per-source",
        "max-connections",
        "fd-reserve",
        "shutdown-grace",
        "rate",
        "accept-rate",
        "accept-burst",
        "status-interval",
        "gc-freeze-interval",
        "id-hold",
        "max-ids",
        "proof-window",
    ):
        if options[name] < 0:
            raise usage.UsageError(f"--{name} must not be negative")
    if not 256 <= options["max-line"] <= 1 << 24:
        raise usage.UsageError("--max-line must be between 256 and 16777216 bytes")
    for name in ("idle-timeout", "keepalive", "offer-timeout"):
        if options[name] <= 0:
            raise usage.UsageError(f"--{name} must be positive")
    if options["keepalive"] >= options["idle-timeout"]:
        raise usage.UsageError("--keepalive must be shorter than --idle-timeout, or live peers would be dropped")
    if options.get("redis") is not None:
        from .resp import RedisURL

        try:
            RedisURL(options["redis"])
        except ValueError as e:
            raise usage.UsageError(f"--redis: {e}") from None
        if options.get("redis-password-file") is not None:
            try:
                with open(options["redis-password-file"], encoding="utf-8") as f:
                    options["redis-password"] = f.read().strip()
            except OSError as e:
                raise usage.UsageError(f"--redis-password-file: {e}") from None
        if options.get("redis-ca") is not None:
            from .cluster import load_ca

            if not RedisURL(options["redis"]).tls:
                raise usage.UsageError("--redis-ca needs a rediss:// URL (TLS)")
            try:
                load_ca(options["redis-ca"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--redis-ca: {e}") from None
        if options.get("redis-tls-verify", "full") not in ("full", "ca"):
            raise usage.UsageError("--redis-tls-verify is full or ca")
        if options.get("redis-tls-verify") == "ca" and options.get("redis-ca") is None:
            raise usage.UsageError(
                "--redis-tls-verify ca needs --redis-ca: without the name check only a private CA that signs "
                "nothing but this Redis's certificate makes the chain mean anything"
            )
    elif options.get("redis-password-file") is not None or options.get("redis-ca") is not None:
        raise usage.UsageError("--redis-password-file and --redis-ca need --redis")
    if options["token-file"] is not None:
        try:
            options["signal-tokens"] = TokenPolicy.from_file(options["token-file"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--token-file {options['token-file']}: {e}") from None


#: Descriptors a process holds besides connections, at least (stdio, the listener, the reactor's waker).
_FD_FLOOR = 16


def connection_cap(
    requested: int,
    reserve: int,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
) -> int:
    """
    The signalling connection cap to use: C{requested} (0: none asked for),
    but below the soft descriptor limit (C{RLIMIT_NOFILE}) minus C{reserve}
    descriptors for everything else, so the mediator never runs out of
    descriptors and can still refuse a connection with a message.  Logged.

    @param requested: C{--max-connections}.
    @param reserve: C{--fd-reserve}.
    @param getrlimit: C{resource.getrlimit} (tests inject one).
    @return: the cap, at least 1.
    """
    soft, _hard = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return requested
    room = max(1, soft - max(reserve, _FD_FLOOR))
    if requested and requested <= room:
        SignalingService.log.info(
            "signalling: at most {cap} connections ({limit} file descriptors, {reserve} reserved)",
            cap=requested,
            limit=soft,
            reserve=reserve,
        )
        return requested
    SignalingService.log.warn(
        "signalling: at most {cap} connections, not {requested}: the file descriptor limit is {limit} "
        "({reserve} reserved); raise it (ulimit -n, LimitNOFILE=) for more",
        cap=room,
        requested=requested or "unlimited",
        limit=soft,
        reserve=reserve,
    )
    return room


class SignalingService(MultiService):
    """
    The listener plus the periodic sweep and status line.  Stopping it stops
    listening, tells every signalling peer that the mediator shuts down
    (they reconnect, to the next mediator) and closes the connections,
    cutting off those still open after C{grace} seconds; the Deferred
    C{stopService} returns fires once all are gone.  C{state} is there for
    the operator and tests.
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        state: SignalingState,
        clock: Any = None,
        grace: float = 5.0,
    ) -> None:
        super().__init__()
        self.listener = EndpointListener(endpoint, "signalling")
        self.state = state
        self.clock = clock if clock is not None else state.clock
        self.grace = grace
        # A plain TCP port closes a connection its factory returns None for; wrapping factories (TLS) cannot.
        self.factory = SignalingFactory(
            state, drop_by_none=isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint))
        )

    def startService(self) -> None:
        super().startService()
        self.listener.listen(self.factory)

    def whenListening(self) -> Deferred[IListeningPort]:
        """The listening port, once bound (C{getHost()} tells the address)."""
        return self.listener.whenListening()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        stopped = self.listener.stop()
        n = len(self.state.links)
        self.state.shutdown()
        if n:
            self.log.info(
                "signalling stopping: told {n} connections to reconnect elsewhere; waiting up to {grace:g} s",
                n=n,
                grace=self.grace,
            )
        return DeferredList([stopped, self._drain()], fireOnOneErrback=True, consumeErrors=True).addCallback(
            lambda _: None
        )

    def _drain(self) -> Deferred[None]:
        """Fires when every connection is gone; those left after the grace period are aborted."""
        idle = self.factory.whenIdle()
        if idle.called:
            return idle

        def cut() -> None:
            n = self.factory.abortAll()
            if n:
                self.state.count("closed:shutdown-aborted", n)
                self.log.warn("signalling: cut off {n} connections still open after {grace:g} s", n=n, grace=self.grace)

        timer = self.clock.callLater(self.grace, cut)

        def done(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return idle.addCallback(done)


def makeSignalingService(
    endpoint: str,
    reactor: Any,
    *,
    token_file: str | None = None,
    tokens: TokenPolicy | None = None,
    max_peers: int = 100_000,
    max_per_source: int = 100,
    max_connections: int = 10_000,
    fd_reserve: int = 64,
    shutdown_grace: float = 5.0,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    rate: float = 20.0,
    accept_rate: float = 10.0,
    accept_burst: float = 100.0,
    max_line: int = 8192,
    idle_timeout: float = 90.0,
    keepalive: float = 30.0,
    offer_timeout: float = 30.0,
    id_hold: float = 86_400.0,
    max_ids: int = 250_000,
    proof_window: float = 30.0,
    status_interval: float = 60.0,
    sweep_interval: float = 1.0,
    gc_freeze_interval: float = 0.0,
    choose_order: ChooseOrder | None = None,
    redis: str | None = None,
    redis_password: str | None = None,
    redis_ca: str | None = None,
    redis_check_name: bool = True,
) -> SignalingService:
    """
    A service that listens on C{endpoint} and runs the signalling state.
    Nothing is bound until the service starts.
    """
    if tokens is None and token_file is not None:
        tokens = TokenPolicy.from_file(token_file)
    limits = Limits(
        max_peers=max_peers,
        max_per_source=max_per_source,
        max_connections=connection_cap(max_connections, fd_reserve, getrlimit),
        rate=rate,
        burst=max(2 * rate, 10.0),
        accept_rate=accept_rate,
        accept_burst=accept_burst,
        max_line=max_line,
        idle_timeout=idle_timeout,
        keepalive=keepalive,
        offer_timeout=offer_timeout,
        id_hold=id_hold,
        max_ids=max_ids,
        proof_window=proof_window,
    )
    directory = None
    if redis is not None:
        from .cluster import directory_from_url

        directory = directory_from_url(reactor, redis, redis_password, redis_ca, redis_check_name)
    state = SignalingState(
        reactor, limits, tokens, choose_order, server_name=f"natbypass/{__version__}", cluster=directory
    )
    top = SignalingService(serverFromString(reactor, endpoint), state, reactor, shutdown_grace)
    if directory is not None:
        directory.setServiceParent(top)
    sweeper = TimerService(sweep_interval, state.sweep)
    sweeper.clock = reactor
    sweeper.setServiceParent(top)
    if status_interval > 0:
        status = TimerService(status_interval, state.logStatus)
        status.clock = reactor
        status.setServiceParent(top)
    if gc_freeze_interval > 0:
        _GCFreezer(gc_freeze_interval, reactor).setServiceParent(top)
    return top


class _GCFreezer(Service):
    """
    Opt-in collector tuning for a mediator with many idle peers: a full
    collection walks every tracked object (over 100,000 with 10,000 peers) and
    its pause decides the tail latency.  Each interval: unfreeze, collect
    (one pause; garbage among the frozen objects is reclaimed here), freeze
    the survivors; the collector's own full passes in between skip them.
    The first pass waits one interval, until the peers have come.
    """

    log = Logger()

    def __init__(self, interval: float, clock: Any) -> None:
        self.interval = interval
        self.clock = clock
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.refreeze)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def refreeze(self) -> None:
        started = time.perf_counter()  # a figure for the log, not protocol time
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.log.info(
            "gc: froze {objects} objects after a full collection of {ms:.0f} ms",
            objects=gc.get_freeze_count(),
            ms=(time.perf_counter() - started) * 1000,
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        gc.unfreeze()


def makeSignalingServiceFromOptions(options: usage.Options, reactor: Any) -> IService:
    """Build the service from options checked by C{check_signaling_options}."""
    return makeSignalingService(
        options["signal"],
        reactor,
        tokens=options.get("signal-tokens"),
        max_peers=options["max-peers"],
        max_per_source=options["max-per-source"],
        max_connections=options["max-connections"],
        fd_reserve=options["fd-reserve"],
        shutdown_grace=options["shutdown-grace"],
        rate=options["rate"],
        accept_rate=options["accept-rate"],
        accept_burst=options["accept-burst"],
        max_line=options["max-line"],
        idle_timeout=options["idle-timeout"],
        keepalive=options["keepalive"],
        offer_timeout=options["offer-timeout"],
        id_hold=options["id-hold"],
        max_ids=options["max-ids"],
        proof_window=options["proof-window"],
        status_interval=options["status-interval"],
        gc_freeze_interval=options["gc-freeze-interval"],
        redis=options.get("redis"),
        redis_password=options.get("redis-password"),
        redis_ca=options.get("redis-ca"),
        redis_check_name=options.get("redis-tls-verify", "full") != "ca",
    )

"""
A real mediator on loopback (STUN on 127.0.0.1 + 127.0.0.2, signalling on
127.0.0.1) and real peers made against it, in the test's own process: the
base of the loopback tests of peers, streams, endpoints and applications.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from natbypass.app.echo import EchoClient
from natbypass.peer import Peer, PeerConfig
from natbypass.signaling.service import makeSignalingService
from natbypass.stun.server import STUNService


class LoopbackMediator(TestCase):
    """A real mediator (STUN on 127.0.0.1 + 127.0.0.2, signalling on 127.0.0.1) and peers made against it."""

    timeout = 60
    #: The mediator's --id-hold.
    id_hold = 86_400.0

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.stun = STUNService(reactor, ("127.0.0.1", 0), ("127.0.0.2", 0), stats_interval=0)
        self.stun.startService()
        self.addCleanup(self._stop, self.stun)
        self.signal = makeSignalingService(
            "tcp:0:interface=127.0.0.1", reactor, status_interval=0, id_hold=self.id_hold
        )
        self.signal.startService()
        self.addCleanup(self._stop, self.signal)
        port = yield self.signal.whenListening()
        self.signal_port = port.getHost().port
        self.stun_address = self.stun.config.primary

    def _stop(self, service: Any) -> Any:
        return defer.maybeDeferred(service.stopService) if service.running else None

    @defer.inlineCallbacks
    def peer(self, name: str, protocol: str = "auto", peer_args: dict | None = None, **config: Any) -> Any:
        config.setdefault("loopback_candidates", True)
        config.setdefault("bind_host", "127.0.0.1")
        config.setdefault("punch_timeout", 3.0)
        p = Peer(
            reactor,
            name,
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.signal_port),
            self.stun_address,
            protocol=protocol,
            config=PeerConfig(**config),
            **(peer_args or {}),
        )
        p.startService()
        self.addCleanup(self._stop, p)
        yield p.whenReady()
        return p

    @defer.inlineCallbacks
    def assertEchoes(self, conn: Any, n: int = 3) -> Any:
        client = EchoClient(conn, reactor)
        for i in range(n):
            rtt = yield client.ping(i).addTimeout(5, reactor)
            self.assertGreaterEqual(rtt, 0)

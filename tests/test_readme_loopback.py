"""
The README's embedding example runs as written, against a real mediator and
a real echoing peer on loopback.

The example is taken from README.md (the first python block); only the
mediator's host name and ports change, to this test's loopback mediator.
It runs in its own interpreter, so it uses the global reactor exactly as an
application would.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from natbypass.interfaces import IIncomingHandler, IPeerReceiver
from natbypass.peer import Peer, PeerConfig
from natbypass.signaling.service import makeSignalingService
from natbypass.stun.server import STUNService

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example() -> str:
    """The first python code block of README.md."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match is not None, "README.md has no python example"
    return match.group(1)


@implementer(IIncomingHandler)
class RawEcho:
    """Bob: sends every chunk back as it came (the example sends no newline)."""

    def connectionArrived(self, connection: Any) -> None:
        @implementer(IPeerReceiver)
        class Back:
            def dataReceived(self, data: bytes) -> None:
                connection.send(data)

            def connectionLost(self, reason: Any) -> None:
                pass

        connection.setReceiver(Back())


class _Collect(ProcessProtocol):
    """Collects the example's output and fires when a line matching C{until} appears."""

    def __init__(self, until: str) -> None:
        self.until = until
        self.out = b""
        self.matched: defer.Deferred[str] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if not self.matched.called and self.until.encode() in self.out:
            self.matched.callback(self.out.decode(errors="replace"))

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.matched.called:
            self.matched.errback(AssertionError(f"the example ended early:\n{self.out.decode(errors='replace')}"))
        self.ended.callback(None)


class ReadmeExampleTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_embedding_example_runs(self) -> Any:
        stun = STUNService(reactor, ("127.0.0.1", 0), ("127.0.0.2", 0), stats_interval=0)
        stun.startService()
        self.addCleanup(stun.stopService)
        signal = makeSignalingService("tcp:0:interface=127.0.0.1", reactor, status_interval=0)
        signal.startService()
        self.addCleanup(signal.stopService)
        port = (yield signal.whenListening()).getHost().port
        stun_port = stun.config.primary[1]
        bob = Peer(
            reactor,
            "bob",
            TCP4ClientEndpoint(reactor, "127.0.0.1", port),
            stun.config.primary,
            config=PeerConfig(bind_host="127.0.0.1", loopback_candidates=True),
        )
        bob.startService()
        self.addCleanup(bob.stopService)
        yield bob.whenReady()
        bob.listen(RawEcho())

        code = readme_example()
        self.assertIn('"tcp:mediator.example:7000"', code)
        self.assertIn('("mediator.example", 3478)', code)
        code = code.replace('"tcp:mediator.example:7000"', f'"tcp:127.0.0.1:{port}"')
        code = code.replace('("mediator.example", 3478)', f'("127.0.0.1", {stun_port})')
        proto = _Collect(until="got b'hi bob'")
        # The example keeps its key and known peers under XDG_CONFIG_HOME: a scratch one, not the user's.
        config = os.path.abspath(self.mktemp())
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), XDG_CONFIG_HOME=config)
        process = reactor.spawnProcess(proto, sys.executable, [sys.executable, "-u", "-c", code], env=env, path=ROOT)

        def stop(_: Any = None) -> defer.Deferred[None]:
            try:
                process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            return proto.ended

        self.addCleanup(stop)
        try:
            out = yield proto.matched.addTimeout(30, reactor)
        except defer.TimeoutError:
            self.fail(f"the example did not print {proto.until!r} within 30 s:\n{proto.out.decode(errors='replace')}")
        self.assertRegex(out, r"secure path over (udp|tcp) to .* key nb1-")
        # the example made its key (0600) and recorded bob's at first contact
        self.assertEqual(os.stat(os.path.join(config, "natbypass", "identity.pem")).st_mode & 0o777, 0o600)
        with open(os.path.join(config, "natbypass", "known_peers")) as f:
            self.assertIn(f"bob {bob.fingerprint}", f.read())

"""
The mediator cluster for real, on loopback: a redis-server of our own (a
Unix socket in a temporary directory) and mediator processes (natbypass
mediator --redis ...), with signalling clients registered on different
mediators.  Skipped when redis-server is not installed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from natbypass.identity import Identity
from natbypass.signaling.client import IdBound, SignalingClient, SignalingError, client_endpoint
from natbypass.signaling.wire import Description

REDIS = shutil.which("redis-server")


def start_redis(sock: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [REDIS, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if os.path.exists(sock):
            return p
        time.sleep(0.02)
    p.kill()
    raise RuntimeError("redis-server did not start")


def stop_redis(p: subprocess.Popen, directory: str) -> None:
    """Stop a redis-server of ours and remove its temporary directory."""
    p.terminate()
    p.wait(10)
    shutil.rmtree(directory, ignore_errors=True)


def start_mediator(sock: str, log: str) -> tuple[subprocess.Popen, int]:
    """A mediator process; its signalling port read from its log (bound once, port 0)."""
    stun = random.randrange(20000, 60000)
    f = open(log, "w")
    p = subprocess.Popen(
        [sys.executable, "-m", "natbypass.app.cli", "mediator", "--stun", f"127.0.0.1:{stun}",
         "--signal", "tcp:0:interface=127.0.0.1", "--redis", f"unix://{sock}", "--status-interval", "0",
         "--offer-timeout", "5"],
        stdout=f, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 20
    while time.time() < deadline:
        with open(log) as r:
            text = r.read()
        m = re.search(r"signalling listening on .*port=(\d+)", text)
        if m and "connected to unix:" in text:
            return p, int(m.group(1))
        if p.poll() is not None:
            break
        time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"mediator did not start: {open(log).read()[-2000:]}")


class ClusterLoopbackTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if REDIS is None:
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        if not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "natbypass", "app", "cli.py")):
            raise SkipTest("needs the source tree")
        self.dir = tempfile.mkdtemp()
        self.sock = os.path.join(self.dir, "redis.sock")
        self.redis = start_redis(self.sock)
        self.mediators: list[tuple[subprocess.Popen, int]] = []
        for i in range(2):
            self.mediators.append(start_mediator(self.sock, os.path.join(self.dir, f"m{i}.log")))
        self.clients: list[SignalingClient] = []

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        for c in self.clients:
            yield c.stopService()
        for p, _ in self.mediators:
            p.terminate()
        for p, _ in self.mediators:
            p.wait(10)
        stop_redis(self.redis, self.dir)

    def client(self, name: str, *ports: int, identity: Identity | None = None) -> SignalingClient:
        ep = client_endpoint(reactor, ",".join(f"tcp:127.0.0.1:{p}" for p in ports))
        c = SignalingClient(ep, name, clock=reactor, identity=identity or Identity.generate(), ping_interval=2)
        c.setOfferHandler(lambda offer: Description())
        c.startService()
        self.clients.append(c)
        return c

    @defer.inlineCallbacks
    def test_peers_on_different_mediators_meet(self) -> Any:
        (_, pa), (_, pb) = self.mediators
        alice, bob = self.client("alice", pa), self.client("bob", pb)
        yield defer.gatherResults([alice.whenRegistered(), bob.whenRegistered()])
        sessions = []
        bob.setSessionHandler(sessions.append)
        s = yield alice.connect("bob", Description())
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(sessions), 1)
        self.assertEqual((s.id, s.key), (sessions[0].id, sessions[0].key))
        self.assertEqual(s.peer, "bob")
        self.assertEqual(s.description.fingerprint, str(bob.identity.fingerprint))

    @defer.inlineCallbacks
    def test_id_bound_across_mediators(self) -> Any:
        (_, pa), (_, pb) = self.mediators
        yield self.client("alice", pa).whenRegistered()
        squatter = self.client("alice", pb)
        yield self.assertFailure(squatter.whenRegistered(), IdBound)

    @defer.inlineCallbacks
    def test_mediator_killed_peers_move_and_meet_again(self) -> Any:
        (ma, pa), (_, pb) = self.mediators
        alice = self.client("alice", pa, pb)
        bob = self.client("bob", pb, pa)
        yield defer.gatherResults([alice.whenRegistered(), bob.whenRegistered()])
        ma.kill()  # alice's mediator dies without a word
        ma.wait()
        for _ in range(100):
            yield deferLater(reactor, 0.1, lambda: None)
            try:
                s = yield alice.connect("bob", Description())
                break
            except SignalingError:
                continue
        else:
            self.fail("alice never reached bob through the other mediator")
        self.assertEqual(s.peer, "bob")

    @defer.inlineCallbacks
    def test_redis_stopped_refuses_then_recovers(self) -> Any:
        (_, pa), (_, pb) = self.mediators
        alice, bob = self.client("alice", pa), self.client("bob", pb)
        yield defer.gatherResults([alice.whenRegistered(), bob.whenRegistered()])
        self.redis.terminate()
        self.redis.wait()
        yield deferLater(reactor, 0.5, lambda: None)
        err = yield self.assertFailure(alice.connect("bob", Description()), SignalingError)
        self.assertEqual((err.code, err.error), (503, "cluster-unavailable"))
        self.redis = start_redis(self.sock)
        for _ in range(100):
            yield deferLater(reactor, 0.2, lambda: None)
            try:
                s = yield alice.connect("bob", Description())
                break
            except SignalingError as e:
                if e.error not in ("cluster-unavailable", "unknown-peer"):
                    raise
        else:
            self.fail("the cluster did not recover")
        self.assertEqual(s.peer, "bob")


class RedisScriptsTests(TestCase):
    """The directory's Lua scripts on a real redis-server (Unix socket), in process."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        if REDIS is None:
            raise SkipTest("redis-server is not installed (apt-get install redis-server)")
        from natbypass.signaling.cluster import directory_from_url

        self.dir = tempfile.mkdtemp()
        sock = os.path.join(self.dir, "redis.sock")
        self.redis = start_redis(sock)
        self.directories = [directory_from_url(reactor, f"unix://{sock}") for _ in range(2)]
        for d in self.directories:
            d.startService()
        for _ in range(200):
            if all(d.available for d in self.directories):
                break
            yield deferLater(reactor, 0.02, lambda: None)

    @defer.inlineCallbacks
    def tearDown(self) -> Any:
        for d in self.directories:
            yield d.stopService()
        stop_redis(self.redis, self.dir)

    @defer.inlineCallbacks
    def test_max_ids_across_nodes(self) -> Any:
        """Two nodes share one count of bound ids; an owner re-claims; a hold's end or a departure frees a slot."""
        a, b = self.directories
        claim = lambda d, pid, digest=b"k" * 32, hold=60.0: d.claim(pid, digest, hold, 30.0, False, True, 2)  # noqa: E731
        self.assertEqual((yield claim(a, "x"))[0], "new")
        self.assertEqual((yield claim(b, "y"))[0], "new")
        outcome, n, _ = yield claim(a, "z")
        self.assertEqual((outcome, n), ("full", 2))
        self.assertEqual((yield claim(b, "x"))[0], "same", "a bound id's owner is never refused")
        b.leave("x", 0)  # gone with no hold: its slot is free at once
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield claim(a, "z"))[0], "new")
        outcome, _, _ = yield claim(b, "w")
        self.assertEqual(outcome, "full")
        a.leave("z", 0.2)  # held for 0.2 s, then free
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((yield claim(b, "w"))[0], "full")
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual((yield claim(b, "w"))[0], "new")
        lost = yield b.refresh([("y", b"k" * 32)], 60.0, 30.0)
        self.assertEqual(lost, [], "refresh renews the count's entry with the binding")

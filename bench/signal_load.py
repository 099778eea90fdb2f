"""
Load generator for the signalling benchmark: holds N registered peers on one
mediator from one loopback source address, then, on command, drives offers
between its own peers at a fixed rate and measures the latencies.

Driven by bench/signal_bench.py over stdin/stdout:
    stdout: `REGISTERED n`            once every peer is registered
    stdin:  `GO <offers/s> <seconds>` then stdout `RESULT <json>`
    stdin:  `QUIT`

Peers are minimal (the codec, no ClientService) so the generator costs little
CPU next to the mediator on the same machine.  Latencies use
`time.perf_counter` (this is a measuring tool, not protocol logic).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any

from twisted.internet import reactor, stdio
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import LoopingCall
from twisted.protocols.basic import LineReceiver

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from relcommon import raise_nofile  # noqa: E402  (bench/ is on sys.path when run as a script)

from natbypass.identity import Identity  # noqa: E402
from natbypass.nat import NatSummary  # noqa: E402
from natbypass.signaling import wire  # noqa: E402
from natbypass.signaling.wire import (  # noqa: E402
    Accept,
    Candidate,
    Connect,
    Description,
    Hello,
    Register,
)

DESC = Description(
    (
        Candidate("host", "192.168.1.20", 40000),
        Candidate("srflx", "203.0.113.7", 61000),
        Candidate("tcp-srflx", "203.0.113.7", 61001),
    ),
    NatSummary("endpoint-independent", "address-and-port-dependent", False),
    (),
    "sha256:q83vEjRWeJA",
)


def _template(msg, **placeholders: str) -> bytes:
    """Encode once with the codec; later lines only fill in rid and ids (cheap, and still valid protocol)."""
    line = wire.encode(msg).replace(b"%", b"%%").replace(b'"rid":0', b'"rid":%d')
    for marker in placeholders.values():
        line = line.replace(f'"{marker}"'.encode(), b'"%s"')
    return line


#: One identity key for every simulated peer (a key may own many ids); each registration still signs its nonce.
IDENTITY = Identity.generate()

CONNECT = _template(Connect(0, "PEERMARK", DESC), peer="PEERMARK")
ACCEPT = _template(Accept(0, "OFFERMARK", DESC), offer="OFFERMARK")


class BenchPeer(LineReceiver):
    """
    A minimal peer.  It parses with plain json.loads (the mediator, which is
    what is measured, does the strict decoding) so that the generator, which
    shares the CPUs, stays cheap.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 16

    def __init__(self, gen: Generator, name: str) -> None:
        self.gen = gen
        self.name = name
        self.rid = 10

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def send(self, msg) -> None:
        self.sendLine(wire.encode(msg))

    def connectionMade(self) -> None:
        getattr(self.transport, "setTcpNoDelay", lambda on: None)(True)

    def connect_to(self, peer: str) -> None:
        self.sendLine(CONNECT % (self.next_rid(), peer.encode()))

    def lineReceived(self, line: bytes) -> None:
        msg = json.loads(line)
        op = msg["op"]
        if op == "ping":
            self.sendLine(b'{"op":"pong","rid":%d}' % msg["rid"])
        elif op == "offer":
            self.gen.offer_arrived(msg["peer"])
            self.sendLine(ACCEPT % (self.next_rid(), msg["offer"].encode()))
        elif op == "session":
            self.gen.session_arrived(self.name if msg["role"] == "controlling" else msg["peer"])
        elif op == "hello":
            nonce = wire.b64url_decode(msg["nonce"], "nonce", *wire.NONCE_RANGE)
            self.send(Hello(1, max(wire.VERSIONS)))
            self.send(
                Register(
                    2, self.name, IDENTITY.public_bytes(), IDENTITY.sign_registration(nonce, self.name), None, True
                )
            )
        elif op == "registered":
            self.gen.registered(self)
        elif op == "error":
            self.gen.errors += 1
            if self.gen.errors <= 5:
                print(f"error from mediator: {msg}", file=sys.stderr, flush=True)

    def connectionLost(self, reason=None) -> None:
        self.gen.lost += 1


class Factory(ClientFactory):
    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        self.names = iter(gen.names)

    def buildProtocol(self, addr):
        return BenchPeer(self.gen, next(self.names))

    def clientConnectionFailed(self, connector, reason) -> None:
        self.gen.failed += 1
        print(f"connect failed: {reason.value}", file=sys.stderr, flush=True)


class Generator:
    def __init__(self, host: str, port: int, source: str, prefix: str, n: int) -> None:
        self.host, self.port, self.source = host, port, source
        self.names = [f"{prefix}-{i}" for i in range(n)]
        self.peers: list[BenchPeer] = []
        self.errors = self.lost = self.failed = 0
        self.pending: dict[str, list[float]] = {}  # initiator -> [t0, t_offer, sessions seen]
        self.relay: list[float] = []
        self.full: list[float] = []
        self.factory = Factory(self)
        self.tls: Any = None  # client TLS options when the mediator speaks TLS
        self.out = print  # replaced by the control channel (stdout is non-blocking under StandardIO)

    def start(self) -> None:
        todo = len(self.names)

        def batch() -> None:
            nonlocal todo
            for _ in range(min(200, todo)):
                if self.tls is not None:
                    reactor.connectSSL(self.host, self.port, self.factory, self.tls, bindAddress=(self.source, 0))
                else:
                    reactor.connectTCP(self.host, self.port, self.factory, bindAddress=(self.source, 0))
                todo -= 1
            if not todo:
                loop.stop()

        loop = LoopingCall(batch)
        loop.start(0.02)

    def registered(self, peer: BenchPeer) -> None:
        self.peers.append(peer)
        if len(self.peers) == len(self.names):
            self.out(f"REGISTERED {len(self.peers)}")

    def offer_arrived(self, initiator: str) -> None:
        p = self.pending.get(initiator)
        if p is not None:
            p[1] = time.perf_counter()

    def session_arrived(self, initiator: str) -> None:
        p = self.pending.get(initiator)
        if p is None:
            return
        p[2] += 1
        if p[2] == 2:
            now = time.perf_counter()
            self.relay.append(p[1] - p[0])
            self.full.append(now - p[0])
            del self.pending[initiator]

    def go(self, rate: float, seconds: float, done) -> None:
        self.relay, self.full = [], []
        n = len(self.peers)
        start = time.perf_counter()
        state = {"sent": 0, "i": 0, "busy": 0}

        def tick() -> None:
            due = int((time.perf_counter() - start) * rate)
            if time.perf_counter() - start >= seconds:
                loop.stop()
                reactor.callLater(2.0, finish)
                return
            tries = 0
            while state["sent"] < due and tries < n:
                tries += 1
                i = state["i"] % n
                state["i"] += 1
                a, b = self.peers[i], self.peers[(i + n // 2) % n]
                if a.name in self.pending:
                    state["busy"] += 1  # still waiting for its previous offer
                    continue
                self.pending[a.name] = [time.perf_counter(), 0.0, 0]
                a.connect_to(b.name)
                state["sent"] += 1

        def finish() -> None:
            done(
                {
                    "sent": state["sent"],
                    "completed": len(self.full),
                    "unfinished": len(self.pending),
                    "skipped_busy": state["busy"],
                    "errors": self.errors,
                    "lost": self.lost,
                    "seconds": seconds,
                    "relay": self.relay,
                    "full": self.full,
                }
            )
            self.pending.clear()

        loop = LoopingCall(tick)
        loop.start(0.002)


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, gen: Generator) -> None:
        self.gen = gen
        gen.out = lambda text: self.sendLine(text.encode())

    def lineReceived(self, line: bytes) -> None:
        words = line.decode().split()
        if words and words[0] == "GO":
            self.gen.go(float(words[1]), float(words[2]), lambda r: self.sendLine(("RESULT " + json.dumps(r)).encode()))
        elif words and words[0] == "QUIT":
            reactor.stop()

    def connectionLost(self, reason=None) -> None:
        if reactor.running:
            reactor.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default="127.0.0.2")
    p.add_argument("--prefix", default="g0")
    p.add_argument("-n", type=int, default=5000)
    p.add_argument("--tls", action="store_true", help="speak TLS (the bench's throwaway certificate is not verified)")
    a = p.parse_args()
    raise_nofile()
    gc.disable()  # a short-lived measuring tool: its own collector pauses would be blamed on the mediator
    gen = Generator(a.host, a.port, a.source, a.prefix, a.n)
    if a.tls:
        from twisted.internet.ssl import CertificateOptions

        gen.tls = CertificateOptions(verify=False)  # loopback, our own throwaway certificate
    stdio.StandardIO(Control(gen))
    reactor.callWhenRunning(gen.start)
    reactor.run()


if __name__ == "__main__":
    main()

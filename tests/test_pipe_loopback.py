"""
natbypass pipe between two real peers on loopback: Twisted's StandardIO on
real files at both ends, a 5 MB transfer each way at once, sha256-checked,
both ends finishing cleanly after the half-closes.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.stdio import StandardIO

from natbypass.app.pipe import PIPE_SERVICE, Pipe, _ListenFactory, _OneStream
from natbypass.streams import StreamRefused
from natbypass.testing.loopback import LoopbackMediator


class PipeLoopbackMixin:
    protocol = "udp"

    def files(self: Any, size: int) -> tuple[int, int, str, bytes]:
        base = self.mktemp()
        os.makedirs(base)
        data = os.urandom(size)
        with open(os.path.join(base, "in"), "wb") as f:
            f.write(data)
        fin = os.open(os.path.join(base, "in"), os.O_RDONLY)
        out = os.path.join(base, "out")
        fout = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        return fin, fout, out, data

    @defer.inlineCallbacks
    def test_both_ways_intact(self: Any) -> Any:
        carol = yield self.peer("carol", self.protocol)
        alice = yield self.peer("alice", self.protocol)
        a_in, a_out, a_path, a_data = self.files(5_000_000)
        c_in, c_out, c_path, c_data = self.files(3_000_000)
        listening = Pipe(lambda p: StandardIO(p, stdin=c_in, stdout=c_out, reactor=reactor))
        carol.serve(PIPE_SERVICE, _ListenFactory(listening, "alice"))
        sending = Pipe(lambda p: StandardIO(p, stdin=a_in, stdout=a_out, reactor=reactor))
        yield alice.openStream("carol", PIPE_SERVICE, _OneStream(sending.stream)).addTimeout(10, reactor)
        # a second pipe to a busy listener is refused
        other = Pipe(lambda p: None)
        failure = yield self.assertFailure(
            alice.openStream("carol", PIPE_SERVICE, _OneStream(other.stream)).addTimeout(10, reactor), StreamRefused
        )
        self.assertIn("busy: already piping with alice", str(failure))
        ends = yield defer.gatherResults([sending.done, listening.done]).addTimeout(60, reactor)
        self.assertEqual([type(e) for e in ends], [ConnectionDone, ConnectionDone])
        for path, data in ((c_path, a_data), (a_path, c_data)):
            with open(path, "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertEqual((sending.stdio.bytes, sending.stream.bytes), (5_000_000, 3_000_000))


class UDPPipeTests(PipeLoopbackMixin, LoopbackMediator):
    protocol = "udp"


class TCPPipeTests(PipeLoopbackMixin, LoopbackMediator):
    protocol = "tcp"

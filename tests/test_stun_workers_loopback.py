"""
--stun-workers on real loopback sockets and processes: the mediator's
service tree with two STUN workers on 127.0.0.1, Bindings from many source
ports all answered, both workers' counters in /metrics, a killed worker
restarted, and a clean stop that leaves no process behind; workers also
end when the mediator is killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from natbypass.app import mediator_tap
from natbypass.stun import message as m

SOURCES = 64


class Client(DatagramProtocol):
    noisy = False

    def __init__(self) -> None:
        self.request = m.Message(m.Method.BINDING, m.MessageClass.REQUEST, os.urandom(12)).encode(fingerprint=True)
        self.answer: m.Message | None = None

    def datagramReceived(self, data: bytes, addr) -> None:
        response = m.decode(data)
        if response.transaction_id == self.request[8:20]:
            self.answer = response


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


class STUNWorkersLoopbackTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self):
        options = mediator_tap.Options()
        options.parseOptions(
            [
                "--stun", "127.0.0.1:3478",
                "--stun-workers", "2",
                "--stun-rate", "0",
                "--signal", "tcp:0:interface=127.0.0.1",
                "--metrics", "tcp:0:interface=127.0.0.1",
                "--status-interval", "0",
            ]
        )  # fmt: skip
        options["stun-address"] = ("127.0.0.1", 0)  # a free port, which the workers then join
        self.top = mediator_tap.makeService(options, reactor)
        self.stun = self.top.getServiceNamed("stun")
        self.top.startService()
        self.addCleanup(self.stopped)
        metrics_port = yield self.top.getServiceNamed("metrics").whenListening()
        self.base = f"http://127.0.0.1:{metrics_port.getHost().port}".encode("ascii")
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        self.addCleanup(pool.closeCachedConnections)
        yield self.until(lambda: self.stun.workers_ready() == 2, "both workers ready")

    def stopped(self):
        if self.top.running:
            return self.top.stopService()

    @inlineCallbacks
    def until(self, condition, what: str, timeout: float = 20.0):
        for _ in range(int(timeout / 0.05)):
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @inlineCallbacks
    def metrics(self):
        response = yield self.agent.request(b"GET", self.base + b"/metrics")
        body = yield readBody(response)
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }

    @inlineCallbacks
    def bindings(self, count: int):
        """Send a Binding from each of C{count} source ports until every one is answered."""
        port = self.stun.config.primary[1]
        clients = [Client() for _ in range(count)]
        sockets = [reactor.listenUDP(0, c, interface="127.0.0.1") for c in clients]
        try:
            for _ in range(40):
                for c, s in zip(clients, sockets):
                    if c.answer is None:
                        s.write(c.request, ("127.0.0.1", port))
                yield deferLater(reactor, 0.1, lambda: None)
                if all(c.answer is not None for c in clients):
                    break
        finally:
            for s in sockets:
                yield s.stopListening()
        return clients, sockets

    @inlineCallbacks
    def test_workers_answer_restart_and_stop(self):
        clients, _ = yield self.bindings(SOURCES)
        self.assertEqual(sum(c.answer is not None for c in clients), SOURCES)
        for c in clients:
            self.assertEqual(c.answer.cls, m.MessageClass.SUCCESS)
            self.assertEqual(c.answer.get(m.XorMappedAddress).address[0], "127.0.0.1")

        # Reports come every second: wait for the counts to reach the metrics.
        yield self.until(lambda: self.stun.counters.snapshot()["answered"] >= SOURCES, "the workers' reports")
        samples = yield self.metrics()
        per_worker = [samples[("natbypass_stun_worker_answers_total", (("worker", str(i)),))] for i in (1, 2)]
        self.assertTrue(all(n > 0 for n in per_worker), per_worker)  # SO_REUSEPORT spread the 64 flows
        self.assertEqual(samples[("natbypass_stun_answers_total", ())], sum(per_worker))
        self.assertGreaterEqual(sum(per_worker), SOURCES)
        self.assertEqual(samples[("natbypass_stun_workers_ready", ())], 2)

        # Kill worker 1: it is started again, and the totals keep its answers.
        pids = [slot.protocol.pid for slot in self.stun.slots]
        before = self.stun.counters.snapshot()["answered"]
        os.kill(pids[0], signal.SIGKILL)
        yield self.until(
            lambda: self.stun.restarts == 1 and self.stun.workers_ready() == 2, "worker 1 restarted", timeout=30
        )
        new_pids = [slot.protocol.pid for slot in self.stun.slots]
        self.assertNotEqual(new_pids[0], pids[0])
        self.assertEqual(new_pids[1], pids[1])
        self.assertFalse(alive(pids[0]))
        self.assertGreaterEqual(self.stun.counters.snapshot()["answered"], before)
        clients, _ = yield self.bindings(SOURCES)
        self.assertEqual(sum(c.answer is not None for c in clients), SOURCES)
        samples = yield self.metrics()
        self.assertEqual(samples[("natbypass_stun_worker_restarts_total", ())], 1)

        # Stop: no worker left.
        yield self.top.stopService()
        self.assertEqual([p for p in new_pids if alive(p)], [])
        self.assertEqual(self.stun.workers_ready(), 0)


class OrphanTests(SynchronousTestCase):
    """Workers end with the mediator, even one killed with SIGKILL (their stdin closes)."""

    def test_sigkilled_mediator_leaves_no_worker(self) -> None:
        from natbypass.lab.netns import python_env

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # free now; only this test's mediator wants it
        mediator = subprocess.Popen(
            [sys.executable, "-m", "natbypass", "mediator", "--stun", f"127.0.0.1:{port}", "--stun-workers", "2",
             "--signal", "tcp:0:interface=127.0.0.1", "--status-interval", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=python_env(),
        )  # fmt: skip
        self.addCleanup(lambda: mediator.poll() is None and (mediator.kill(), mediator.wait()))
        workers: list[int] = []
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = children(mediator.pid)
        self.assertEqual(len(workers), 2)
        mediator.kill()
        mediator.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([p for p in workers if alive(p)], [])


def children(pid: int) -> list[int]:
    """PIDs whose parent is C{pid} and that run natbypass.stun.worker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"natbypass.stun.worker" in cmdline:
            found.append(int(entry))
    return found

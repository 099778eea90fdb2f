"""
Tests for natbypass.stun.worker in memory: the report lines (codec and a
hypothesis property), the worker's options and command line, and the
supervisor (spawning, counter aggregation, restart with backoff, stopping)
against a fake process reactor.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from natbypass.metrics import MediatorCollector, MediatorHealth, make_registry
from natbypass.stun import worker as w
from natbypass.stun.server import Counters


def counters(**values: int) -> dict[str, int]:
    return {**Counters().snapshot(), **values}


class ReportTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        report = w.WorkerReport(2, 1234, True, counters(received=5, answered=4))
        self.assertEqual(w.parse_report(report.encode().rstrip(b"\n")), report)
        self.assertTrue(report.encode().endswith(b"\n"))
        self.assertLess(len(report.encode()), w.MAX_REPORT_LINE)

    def test_unknown_and_bad_counters_left_out(self) -> None:
        line = json.dumps(
            {
                "worker": 1,
                "pid": 9,
                "ready": False,
                "counters": {"answered": 3, "bogus": 1, "received": -1, "errors": "x"},
            }
        ).encode()
        self.assertEqual(w.parse_report(line), w.WorkerReport(1, 9, False, {"answered": 3}))

    def test_not_reports(self) -> None:
        for line in [b"", b"hello", b"[]", b'{"worker": 1}', b'{"worker": -1, "pid": 1, "ready": true, "counters": {}}',
                     b'{"worker": 1, "pid": 1, "ready": 1, "counters": {}}',
                     b'{"worker": true, "pid": 1, "ready": true, "counters": {}}',
                     b'{"worker": 1, "pid": 1, "ready": true, "counters": []}', b"\xff\xfe",
                     b'{"worker": 1, "pid": 1, "ready": true, "counters": {}, "x": "' + b"a" * w.MAX_REPORT_LINE + b'"}']:  # fmt: skip
            self.assertIsNone(w.parse_report(line), line[:60])

    @given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
    def test_any_bytes(self, line: bytes) -> None:
        """Any line parses to a valid report or None, never an exception."""
        report = w.parse_report(line)
        if report is not None:
            self.assertTrue(set(report.counters) <= set(Counters().snapshot()))
            self.assertTrue(all(type(v) is int and v >= 0 for v in report.counters.values()))

    @given(
        st.integers(0, 2**31),
        st.integers(0, 2**31),
        st.booleans(),
        st.dictionaries(st.sampled_from(sorted(Counters().snapshot())), st.integers(0, 2**62)),
    )
    def test_encoded_reports_parse(self, worker: int, pid: int, ready: bool, values: dict[str, int]) -> None:
        report = w.WorkerReport(worker, pid, ready, values)
        self.assertEqual(w.parse_report(report.encode()), report)


class WorkerOptionsTests(SynchronousTestCase):
    def test_arguments_round_trip(self) -> None:
        args = w.worker_arguments(
            3,
            ("10.0.0.2", 3478),
            ("10.0.0.3", 3479),
            software="x y",
            rate=50,
            burst=200,
            global_rate=10000.0,
            advertise=(("203.0.113.5", "10.0.0.2"), ("203.0.113.6", "10.0.0.3")),
            report_interval=0.5,
        )
        options = w.WorkerOptions()
        options.parseOptions(args)
        self.assertEqual(options["worker"], 3)
        self.assertEqual(options["stun-address"], ("10.0.0.2", 3478))
        self.assertEqual(options["stun-alternate-address"], ("10.0.0.3", 3479))
        self.assertEqual(options["stun-advertise"], (("203.0.113.5", "10.0.0.2"), ("203.0.113.6", "10.0.0.3")))
        self.assertEqual((options["stun-rate"], options["stun-burst"], options["stun-global-rate"]), (50, 200, 10000))
        self.assertEqual((options["software"], options["report-interval"]), ("x y", 0.5))

    def test_ipv6_and_plain(self) -> None:
        args = w.worker_arguments(
            1, ("::1", 5), None, software="", rate=0, burst=1, global_rate=0, advertise=(), report_interval=1
        )
        options = w.WorkerOptions()
        options.parseOptions(args)
        self.assertEqual(options["stun-address"], ("::1", 5))
        self.assertIsNone(options["stun-alternate-address"])

    def test_errors(self) -> None:
        for argv in [[], ["--stun", "localhost:5"], ["--stun", "127.0.0.1:5", "--report-interval", "0"]]:
            with self.assertRaises(usage.UsageError, msg=argv):
                w.WorkerOptions().parseOptions(argv)


# ---------------------------------------------------------------- supervisor


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.gone = False

    def signalProcess(self, name: str) -> None:
        if self.gone:
            raise ProcessExitedAlready()
        self.signals.append(name)


class FakeUDPPort:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.maxThroughput = 0
        self.closed = False

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", self.host, self.port)

    def stopListening(self) -> None:
        self.closed = True


class ProcessReactor(Clock):
    """A Clock that records spawnProcess calls and fakes the UDP/TCP listeners STUNService opens."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], FakeProcess]] = []
        self.udp: list[FakeUDPPort] = []
        self.tcp: list[Any] = []
        self._pid = 1000

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None, **kw):
        self._pid += 1
        process = FakeProcess(self._pid)
        protocol.makeConnection(process)
        self.spawned.append((protocol, list(args), process))
        return process

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        listening = FakeUDPPort(interface, port or 40000 + len(self.udp))
        self.udp.append(listening)
        return listening

    def listenTCP(self, port, factory, backlog=50, interface=""):
        listening = FakeUDPPort(interface, port)
        self.tcp.append(listening)
        return listening


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.pool = w.STUNWorkers(
            self.reactor,
            ("127.0.0.1", 3478),
            ("127.0.0.2", 3479),
            2,
            global_rate=1000,
            stats_interval=0,
            restart_delay=0.5,
            max_restart_delay=4,
            stop_timeout=5,
            executable="/usr/bin/python3",
        )
        # No real sockets in a unit test: the main service listens through the fake reactor.
        self.pool.main.reuse_port = False
        self.pool.startService()

    def report(self, n: int, pid: int | None = None, ready: bool = True, **values: int) -> None:
        protocol = self.reactor.spawned[n][0]
        line = w.WorkerReport(protocol.index, pid or protocol.pid, ready, counters(**values)).encode()
        protocol.childDataReceived(1, line[:7])  # split anywhere: lines are reassembled
        protocol.childDataReceived(1, line[7:])

    def end(self, n: int, reason: Exception | None = None) -> None:
        protocol, _, process = self.reactor.spawned[n]
        process.gone = True
        protocol.processEnded(Failure(reason or ProcessDone(0)))

    def test_spawns_workers_with_their_share(self) -> None:
        self.assertEqual(len(self.reactor.spawned), 2)
        for n, (_, args, _) in enumerate(self.reactor.spawned, start=1):
            self.assertEqual(args[:3], ["/usr/bin/python3", "-m", "natbypass.stun.worker"])
            options = w.WorkerOptions()
            options.parseOptions(args[3:])
            self.assertEqual(options["worker"], n)
            self.assertEqual(options["stun-address"], ("127.0.0.1", 3478))
            self.assertEqual(options["stun-global-rate"], 500)  # the global rate split in two

    def test_udp_handed_over_once_all_ready(self) -> None:
        self.assertEqual(sum(not p.closed for p in self.reactor.udp), 4)
        self.report(0)
        self.assertEqual(sum(not p.closed for p in self.reactor.udp), 4)
        self.report(1)
        self.assertTrue(all(p.closed for p in self.reactor.udp))
        self.assertFalse(any(p.closed for p in self.reactor.tcp))
        self.assertEqual(self.pool.workers_ready(), 2)

    def test_totals_and_per_worker(self) -> None:
        self.pool.main.counters.answered = 7  # this process's STUN/TCP
        self.report(0, received=10, answered=9)
        self.report(1, received=20, answered=20)
        self.report(0, received=12, answered=11)  # the latest report replaces the previous one
        snapshot = self.pool.counters.snapshot()
        self.assertEqual((snapshot["received"], snapshot["answered"]), (32, 38))
        self.assertEqual(self.pool.per_worker()[1]["answered"], 11)
        self.assertEqual(self.pool.per_worker()[2]["answered"], 20)

    def test_totals_survive_a_restart(self) -> None:
        self.report(0, answered=100)
        self.report(1, answered=50)
        self.end(0, ProcessTerminated(signal=9))
        self.assertEqual(self.pool.counters.snapshot()["answered"], 150)
        self.assertEqual(self.pool.per_worker()[1], {})
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.5)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.reactor.spawned[2][0].index, 1)
        self.report(2, answered=3)
        self.assertEqual(self.pool.counters.snapshot()["answered"], 153)
        self.assertEqual(self.pool.restarts, 1)

    def test_backoff_doubles_then_resets(self) -> None:
        delays = []
        for _ in range(5):
            self.end(len(self.reactor.spawned) - 2)  # worker 1's current process dies at once
            before = self.reactor.seconds()
            while len(self.reactor.spawned) < 3 + len(delays):
                self.reactor.advance(0.25)
            delays.append(self.reactor.seconds() - before)
            # keep worker 1's newest process at index -2 for the next round
            self.reactor.spawned.insert(len(self.reactor.spawned) - 2, self.reactor.spawned.pop())
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 4.0])
        self.reactor.advance(w.STABLE_AFTER)  # up long enough: healthy again
        self.end(len(self.reactor.spawned) - 2)
        self.reactor.advance(0.5)
        self.assertEqual(self.reactor.spawned[-1][0].index, 1)

    def test_bad_lines_counted_and_bounded(self) -> None:
        protocol = self.reactor.spawned[0][0]
        protocol.childDataReceived(1, b"not json\n")
        protocol.childDataReceived(1, b"x" * (w.MAX_REPORT_LINE + 1))
        self.assertEqual(self.pool.bad_lines, 2)
        self.assertEqual(protocol._out, b"")
        self.report(0, answered=1)
        self.assertEqual(self.pool.per_worker()[1]["answered"], 1)

    def test_stop_terms_then_kills(self) -> None:
        stopped = self.pool.stopService()
        signals = [p.signals for _, _, p in self.reactor.spawned]
        self.assertEqual(signals, [["TERM"], ["TERM"]])
        self.end(0)
        self.assertNoResult(stopped)
        self.reactor.advance(5)
        self.assertEqual(self.reactor.spawned[1][2].signals, ["TERM", "KILL"])
        self.end(1, ProcessTerminated(signal=9))
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)  # nothing restarted after stop
        self.assertTrue(all(p.closed for p in self.reactor.udp + self.reactor.tcp))

    def test_status_log_totals_and_shares(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.report(0, answered=5)
        self.report(1, answered=7)
        self.end(0)  # worker 1's answers stay in its share after it ends
        self.pool.logCounters()
        status = [e for e in events if "per_worker" in e][-1]
        self.assertEqual((status["answered"], status["per_worker"], status["restarts"]), (12, "1: 5, 2: 7", 1))

    def test_stop_cancels_a_pending_restart(self) -> None:
        self.end(0)
        stopped = self.pool.stopService()
        self.end(1)
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stderr_logged_bounded(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol = self.reactor.spawned[0][0]
        protocol.childDataReceived(2, b"Traceback: boom\n" + b"y" * (w.MAX_LOG_LINE + 10))
        lines = [e["line"] for e in events if e.get("log_format", "").startswith("STUN worker {worker}: ")]
        self.assertEqual(lines[0], "Traceback: boom")
        self.assertEqual(len(lines[1]), w.MAX_LOG_LINE)

    def test_metrics_totals_and_per_worker(self) -> None:
        self.report(0, received=4, answered=4)
        self.report(1, received=6, answered=5, malformed=1)
        registry = make_registry([MediatorCollector(None, self.pool)])
        from prometheus_client import generate_latest

        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples
        }
        self.assertEqual(samples[("natbypass_stun_answers_total", ())], 9)
        self.assertEqual(samples[("natbypass_stun_worker_answers_total", (("worker", "1"),))], 4)
        self.assertEqual(samples[("natbypass_stun_worker_answers_total", (("worker", "2"),))], 5)
        self.assertEqual(samples[("natbypass_stun_worker_malformed_total", (("worker", "2"),))], 1)
        self.assertEqual(samples[("natbypass_stun_workers_ready", ())], 2)
        self.assertEqual(samples[("natbypass_stun_worker_restarts_total", ())], 0)
        self.assertNotIn(("natbypass_stun_worker_tcp_refused_total", (("worker", "1"),)), samples)

    def health(self) -> list[str]:
        return MediatorHealth(self.pool, None)()

    def samples(self) -> dict[str, float]:
        from prometheus_client import generate_latest

        registry = make_registry([MediatorCollector(None, self.pool)])
        return {
            s.name: s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples
            if not s.labels
        }

    def test_healthz_503_when_every_worker_is_down(self) -> None:
        """Before the hand-over this process answers UDP; after it, no worker up means no UDP STUN: unhealthy."""
        self.assertEqual(self.health(), [])  # starting: this process still answers UDP
        self.report(0)
        self.report(1)
        self.end(0, ProcessTerminated(signal=9))
        self.assertEqual(self.health(), [], "one worker still answers")
        self.assertEqual(self.samples()["natbypass_stun_udp_answering"], 1)
        self.end(1, ProcessTerminated(exitCode=3))
        [problem] = self.health()
        self.assertIn("every STUN worker (2) is down", problem)
        self.assertIn("exit status 3", problem)
        self.assertIn("restarting", problem)
        samples = self.samples()
        self.assertEqual(samples["natbypass_stun_udp_answering"], 0)
        self.assertEqual(samples["natbypass_stun_workers_ready"], 0)
        self.assertEqual(samples["natbypass_stun_worker_restarts_total"], 2)
        self.reactor.advance(0.5)  # both restarted; healthy once one reports ready
        self.assertNotEqual(self.health(), [])
        self.report(3)
        self.assertEqual(self.health(), [])
        self.assertEqual(self.samples()["natbypass_stun_udp_answering"], 1)

    def test_worker_count_checked(self) -> None:
        for n in (0, w.MAX_WORKERS + 1):
            with self.assertRaises(ValueError):
                w.STUNWorkers(self.reactor, ("127.0.0.1", 1), None, n)

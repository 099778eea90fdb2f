"""
STUN on every core: worker processes that answer STUN over UDP on the
mediator's ports (C{--stun-workers N}), and the service that supervises
them from the mediator process.

Why processes: the responder is CPU-bound in one reactor (about two thirds
of it in the kernel's work on each datagram, docs/performance.md), and
Python runs one thread of Python code at a time.  Each worker is a separate
C{python -m natbypass.stun.worker} with its own reactor and its own UDP
sockets bound with C{SO_REUSEPORT} on the same addresses; the kernel hashes
each datagram's 4-tuple onto one of the sockets, so a flow (a client's
source port) always reaches the same worker, and the load spreads over the
cores.  Each worker has all the responder's sockets, so it answers a
CHANGE-REQUEST from another address itself.

The mediator process (L{STUNWorkers}) keeps STUN over TCP, signalling and
metrics.  It binds the UDP ports first (with C{SO_REUSEPORT} too, so port 0
resolves to ports the workers then join, and nothing else can take them),
answers on them until every worker reports ready, then closes its own UDP
sockets and leaves UDP to the workers.

Counters: every C{report_interval} seconds a worker writes one JSON line
with its L{Counters} to its stdout (a pipe to the mediator); the mediator
keeps the latest per worker (lines are bounded, and only known counter
names with non-negative integer values are taken), adds the last counters
of workers that ended (so totals never go back), and serves the totals and
the per-worker values (C{--metrics}, the status log).

Supervision: a worker that ends while the service runs is started again
after a delay that doubles with each quick failure (L{RESTART_DELAY} up to
L{MAX_RESTART_DELAY}; reset after L{STABLE_AFTER} seconds up).  A worker
exits when its stdin closes, so the mediator dying (even by SIGKILL) leaves
no worker behind.  Stopping the service sends SIGTERM, then SIGKILL after
C{stop_timeout}.

Rate limits are per worker: C{--stun-rate} per source applies in each
worker, and a source using many ports may reach several (each port's flows
hash to one); C{--stun-global-rate} is split evenly among the workers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from natbypass.address import parse_host_port
from natbypass.stun.server import (
    DEFAULT_BURST,
    DEFAULT_GLOBAL_RATE,
    DEFAULT_RATE,
    DEFAULT_SOFTWARE,
    Address,
    Counters,
    STUNService,
)

#: Most worker processes (far more than any machine's cores need).
MAX_WORKERS = 64
#: Seconds between a worker's counter reports.
REPORT_INTERVAL = 1.0
#: Longest report line taken from a worker (a report is about 400 bytes); longer ones are dropped.
MAX_REPORT_LINE = 4096
#: Longest stderr line of a worker that is logged (the rest of it is cut).
MAX_LOG_LINE = 2048
#: First restart delay after a worker ends, doubled per quick failure up to L{MAX_RESTART_DELAY}.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
#: A worker up this long is healthy: its next failure restarts it after L{RESTART_DELAY} again.
STABLE_AFTER = 30.0
#: Seconds from SIGTERM to SIGKILL when stopping.
STOP_TIMEOUT = 5.0

_COUNTER_NAMES = frozenset(f.name for f in fields(Counters))
#: Counters that are gauges: not carried over from a worker that ended.
_GAUGES = frozenset({"tcp_connections"})


# ------------------------------------------------------------------ reports


@dataclass(frozen=True)
class WorkerReport:
    """One line from a worker: who it is, whether it is listening, its counters."""

    worker: int
    pid: int
    ready: bool
    counters: Mapping[str, int]

    def encode(self) -> bytes:
        """The line (JSON, newline-terminated) a worker writes."""
        body = {"worker": self.worker, "pid": self.pid, "ready": self.ready, "counters": dict(self.counters)}
        return json.dumps(body, separators=(",", ":")).encode("ascii") + b"\n"


def parse_report(line: bytes) -> WorkerReport | None:
    """
    A worker's report line, or None when it is not one (the mediator trusts
    its workers, but a parser of a pipe's bytes must not raise): unknown
    counter names and values that are not non-negative integers are left out.
    """
    if len(line) > MAX_REPORT_LINE:
        return None
    try:
        body = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    worker, pid, ready, counters = body.get("worker"), body.get("pid"), body.get("ready"), body.get("counters")
    if not all(type(v) is int and v >= 0 for v in (worker, pid)) or type(ready) is not bool:
        return None
    if not isinstance(counters, dict):
        return None
    kept = {k: v for k, v in counters.items() if k in _COUNTER_NAMES and type(v) is int and v >= 0}
    return WorkerReport(worker, pid, ready, kept)


# ------------------------------------------------------------------ the worker process


class WorkerOptions(usage.Options):
    """Options of C{python -m natbypass.stun.worker} (given by the mediator, not typed by people)."""

    synopsis = "--stun IP:PORT [options]"
    optParameters: list[list[Any]] = [
        ["stun", None, None, "IP:PORT of the primary sockets (a concrete port)."],
        ["stun-alternate", None, None, "IP:PORT of the alternate sockets (RFC 5780)."],
        ["stun-rate", None, DEFAULT_RATE, "Requests per second per source (0: no limit).", float],
        ["stun-burst", None, DEFAULT_BURST, "Burst per source.", float],
        ["stun-global-rate", None, DEFAULT_GLOBAL_RATE, "This worker's share of the global rate (0: none).", float],
        ["software", None, DEFAULT_SOFTWARE, "SOFTWARE attribute."],
        ["worker", None, 1, "This worker's number (in its reports).", int],
        ["report-interval", None, REPORT_INTERVAL, "Seconds between counter reports on stdout.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["stun-advertise"] = []

    def opt_stun_advertise(self, value: str) -> None:
        """PUBLIC=LOCAL (repeatable): see the mediator's option."""
        public, _, local = value.partition("=")
        self["stun-advertise"].append((public, local))

    def postOptions(self) -> None:
        if self["stun"] is None:
            raise usage.UsageError("--stun is required")
        try:
            self["stun-address"] = parse_host_port(self["stun"], ip_only=True)
            alternate = self["stun-alternate"]
            self["stun-alternate-address"] = parse_host_port(alternate, ip_only=True) if alternate else None
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["report-interval"] <= 0:
            raise usage.UsageError("--report-interval must be positive")
        self["stun-advertise"] = tuple(self["stun-advertise"])


def _host_port(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def worker_arguments(
    index: int,
    primary: Address,
    alternate: Address | None,
    *,
    software: str,
    rate: float,
    burst: float,
    global_rate: float,
    advertise: tuple[tuple[str, str], ...],
    report_interval: float,
) -> list[str]:
    """The command-line arguments (after C{-m natbypass.stun.worker}) of worker C{index}."""
    args = ["--worker", str(index), "--stun", _host_port(primary)]
    if alternate is not None:
        args += ["--stun-alternate", _host_port(alternate)]
    for public, local in advertise:
        args += ["--stun-advertise", f"{public}={local}"]
    args += [
        "--stun-rate",
        repr(float(rate)),
        "--stun-burst",
        repr(float(burst)),
        "--stun-global-rate",
        repr(float(global_rate)),
        "--software",
        software,
        "--report-interval",
        repr(float(report_interval)),
    ]
    return args


@implementer(IReadDescriptor)
class _StdinWatch:
    """Calls C{lost} when stdin reaches its end: the mediator that holds the other end is gone."""

    def __init__(self, lost: Any) -> None:
        self._lost = lost
        os.set_blocking(0, False)

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "stun-worker-stdin"

    def doRead(self) -> object:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        self._lost()


def run_worker(reactor: Any, options: usage.Options, out: Any = None) -> STUNService:
    """
    Start one worker's responder on C{reactor} (UDP only, C{SO_REUSEPORT})
    and its reports to C{out} (a writable binary file; stdout by default).
    The caller runs the reactor.
    """
    write = out.write if out is not None else (lambda data: os.write(1, data))
    service = STUNService(
        reactor,
        options["stun-address"],
        options["stun-alternate-address"],
        software=options["software"],
        rate=options["stun-rate"],
        burst=options["stun-burst"],
        global_rate=options["stun-global-rate"],
        tcp=False,
        stats_interval=0,
        advertise=options["stun-advertise"],
        reuse_port=True,
    )
    service.startService()

    def report() -> None:
        line = WorkerReport(options["worker"], os.getpid(), bool(service.running), service.counters.snapshot())
        try:
            write(line.encode())
        except OSError:  # the mediator is gone: the stdin watch stops us
            pass

    reports = LoopingCall(report)
    reports.clock = reactor
    reports.start(options["report-interval"], now=True)

    def stop() -> None:
        if reports.running:
            reports.stop()
        report()  # the final counters
        return service.stopService()

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    return service


def main(argv: list[str] | None = None) -> int:
    """C{python -m natbypass.stun.worker ...}: one worker until SIGTERM or the end of stdin."""
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    options = WorkerOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"natbypass.stun.worker: {e}", file=sys.stderr)
        return 2
    # Warnings and errors only: the mediator logs each worker's start and counters itself.
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])])
    from twisted.internet import reactor

    run_worker(reactor, options)
    reactor.addReader(_StdinWatch(lambda: reactor.stop() if reactor.running else None))
    reactor.run()
    return 0


# ------------------------------------------------------------------ the supervisor


class _WorkerProtocol(ProcessProtocol):
    """The mediator's end of one worker's pipes: report lines in, stderr to the log, its end."""

    def __init__(self, pool: STUNWorkers, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self._out = b""
        self._err = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        if len(self._out) > MAX_REPORT_LINE:  # no newline in sight: not a report, drop it
            self._out = b""
            self.pool.bad_line(self.index)
        for line in lines:
            report = parse_report(line)
            if report is None:
                self.pool.bad_line(self.index)
            else:
                self.pool.reported(self.index, report)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        if len(self._err) > MAX_LOG_LINE:
            lines.append(self._err)
            self._err = b""
        for line in lines:
            if line.strip():
                self.pool.log.warn(
                    "STUN worker {worker}: {line}",
                    worker=self.index,
                    line=line[:MAX_LOG_LINE].decode("utf-8", "replace"),
                )

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self.index, self, reason)


class _Slot:
    """One worker position: its current process, latest counters and restart state."""

    def __init__(self) -> None:
        self.protocol: _WorkerProtocol | None = None
        self.counters: dict[str, int] = {}
        self.ready = False
        self.started_at = 0.0
        self.failures = 0
        self.restart: Any = None  # an IDelayedCall while a restart waits
        self.ended: Deferred[None] | None = None
        #: Answers of this position's processes that ended (for the status log's per-worker share).
        self.answered_before = 0


class WorkerCounters:
    """
    The responder's counters over the mediator process (STUN/TCP) and all
    workers: C{snapshot()} like L{Counters}, so the status log and the
    metrics read it the same way.
    """

    def __init__(self, pool: STUNWorkers) -> None:
        self._pool = pool

    def snapshot(self) -> dict[str, int]:
        """Totals by counter name: this process, workers that ended, and each worker's latest report."""
        pool = self._pool
        total = pool.main.counters.snapshot()
        for name, value in pool.retired.items():
            total[name] += value
        for slot in pool.slots:
            for name, value in slot.counters.items():
                total[name] += value
        return total


class STUNWorkers(Service):
    """
    The STUN responder over C{workers} processes: STUN/TCP (and UDP until
    the workers are ready) in this process, UDP in worker processes that it
    starts, restarts and stops (module doc).  Its C{counters} are the
    totals, L{per_worker} each worker's.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        primary: Address,
        alternate: Address | None,
        workers: int,
        *,
        software: str = DEFAULT_SOFTWARE,
        rate: float = DEFAULT_RATE,
        burst: float = DEFAULT_BURST,
        global_rate: float = DEFAULT_GLOBAL_RATE,
        advertise: tuple[tuple[str, str], ...] = (),
        stats_interval: float = 300.0,
        report_interval: float = REPORT_INTERVAL,
        restart_delay: float = RESTART_DELAY,
        max_restart_delay: float = MAX_RESTART_DELAY,
        stop_timeout: float = STOP_TIMEOUT,
        executable: str = sys.executable,
        **tcp_options: Any,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1 to {MAX_WORKERS}")
        self._reactor = reactor
        self.workers = workers
        self.main = STUNService(
            reactor,
            primary,
            alternate,
            software=software,
            rate=rate,
            burst=burst,
            global_rate=global_rate,
            advertise=advertise,
            reuse_port=True,
            stats_interval=0,
            **tcp_options,
        )
        self._settings = dict(
            software=software,
            rate=rate,
            burst=burst,
            global_rate=global_rate / workers,
            advertise=advertise,
            report_interval=report_interval,
        )
        self._stats_interval = stats_interval
        self._restart_delay = restart_delay
        self._max_restart_delay = max_restart_delay
        self._stop_timeout = stop_timeout
        self._executable = executable
        self.slots = [_Slot() for _ in range(workers)]
        #: Counters of worker processes that ended (gauges left out).
        self.retired: dict[str, int] = dict.fromkeys(_COUNTER_NAMES - _GAUGES, 0)
        #: Workers started again after they ended.
        self.restarts = 0
        #: Report lines that did not parse.
        self.bad_lines = 0
        #: How the last worker process that ended went (for /healthz), None before any did.
        self.last_end: str | None = None
        self.counters = WorkerCounters(self)
        self._udp_handed_over = False
        self._stats: LoopingCall | None = None

    @property
    def config(self):
        """The responder's addresses, ports resolved (None until started)."""
        return self.main.config

    @property
    def server(self):
        """This process's L{natbypass.stun.server.STUNServer} (STUN/TCP)."""
        return self.main.server

    def per_worker(self) -> dict[int, dict[str, int]]:
        """Each worker's latest counters by worker number (1..N; since that process started)."""
        return {i: dict(slot.counters) for i, slot in enumerate(self.slots, start=1)}

    def workers_ready(self) -> int:
        """How many workers are running and have reported ready."""
        return sum(1 for slot in self.slots if slot.protocol is not None and slot.ready)

    def udp_answering(self) -> bool:
        """Is STUN over UDP answered: by this process before the hand-over, then by a ready worker?"""
        return not self._udp_handed_over or self.workers_ready() > 0

    def workers_down(self) -> str | None:
        """Why STUN over UDP is not answered (every worker down after the hand-over), for /healthz; else None."""
        if not self.running or self.udp_answering():
            return None
        return (
            f"every STUN worker ({self.workers}) is down, so STUN over UDP is not answered "
            f"(the last one {self.last_end or 'ended'}); restarting them ({self.restarts} restarts so far, "
            "see the log)"
        )

    # -- life cycle

    def startService(self) -> None:
        self.main.startService()  # binds every socket, or raises: nothing to supervise then
        super().startService()
        config = self.main.config
        assert config is not None
        self.log.info(
            "STUN over UDP in {workers} worker processes (SO_REUSEPORT); this process keeps STUN/TCP",
            workers=self.workers,
        )
        for index in range(1, self.workers + 1):
            self._spawn(index)
        if self._stats_interval > 0:
            self._stats = LoopingCall(self.logCounters)
            self._stats.clock = self._reactor
            self._stats.start(self._stats_interval, now=False)

    def _spawn(self, index: int) -> None:
        slot = self.slots[index - 1]
        slot.restart = None
        config = self.main.config
        assert config is not None
        args = worker_arguments(index, config.primary, config.alternate, **self._settings)
        protocol = _WorkerProtocol(self, index)
        slot.protocol, slot.counters, slot.ready = protocol, {}, False
        slot.started_at = self._reactor.seconds()
        slot.ended = Deferred()
        argv = [self._executable, "-m", "natbypass.stun.worker", *args]
        self._reactor.spawnProcess(
            protocol, self._executable, argv, env=_child_env(), childFDs={0: "w", 1: "r", 2: "r"}
        )

    def reported(self, index: int, report: WorkerReport) -> None:
        """A worker's report line: keep its counters; the first ready one of all hands UDP over."""
        slot = self.slots[index - 1]
        slot.counters = dict(report.counters)
        if report.ready and not slot.ready:
            slot.ready = True
            self.log.info("STUN worker {worker} (pid {pid}) answering", worker=index, pid=report.pid)
            if not self._udp_handed_over and self.workers_ready() == self.workers:
                self._udp_handed_over = True
                self.main.stopUDP()
                self.log.info("every STUN worker is answering: UDP left to them")

    def bad_line(self, index: int) -> None:
        """A line from a worker that is not a report: counted, dropped."""
        self.bad_lines += 1
        self.log.warn("STUN worker {worker} wrote a line that is not a report; dropped", worker=index)

    def ended(self, index: int, protocol: _WorkerProtocol, reason: Failure) -> None:
        """A worker's process ended: keep its counters in the totals; restart it if we run."""
        slot = self.slots[index - 1]
        if slot.protocol is not protocol:
            return
        for name, value in slot.counters.items():
            if name not in _GAUGES:
                self.retired[name] += value
        slot.answered_before += slot.counters.get("answered", 0)
        slot.protocol, slot.counters, slot.ready = None, {}, False
        ended, slot.ended = slot.ended, None
        if ended is not None:
            ended.callback(None)
        if not self.running:
            return
        up = self._reactor.seconds() - slot.started_at
        slot.failures = 0 if up >= STABLE_AFTER else slot.failures + 1
        delay = min(self._max_restart_delay, self._restart_delay * 2 ** max(0, slot.failures - 1))
        how = _how_it_ended(reason)
        self.last_end = how
        self.log.warn(
            "STUN worker {worker} (pid {pid}) {how} after {up:.1f} s; restarting it in {delay:.1f} s",
            worker=index,
            pid=protocol.pid,
            how=how,
            up=up,
            delay=delay,
        )
        self.restarts += 1
        slot.restart = self._reactor.callLater(delay, self._spawn, index)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._stats is not None and self._stats.running:
            self._stats.stop()
        self._stats = None
        waits = []
        for slot in self.slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
            if slot.protocol is not None and slot.ended is not None:
                waits.append(slot.ended)
                _signal(slot.protocol, "TERM")
        killer = self._reactor.callLater(self._stop_timeout, self._kill_all)
        done = DeferredList(waits) if waits else succeed(None)

        def stopped(_: object) -> Deferred:
            if killer.active():
                killer.cancel()
            self.logCounters()
            self._udp_handed_over = False
            return self.main.stopService()

        return done.addCallback(stopped)

    def _kill_all(self) -> None:
        for index, slot in enumerate(self.slots, start=1):
            if slot.protocol is not None:
                self.log.warn("STUN worker {worker} did not stop on SIGTERM: killing it", worker=index)
                _signal(slot.protocol, "KILL")

    def logCounters(self) -> None:
        """Log the totals and each worker's share (also every C{stats_interval} seconds)."""
        self.log.info(
            "STUN counters (all {workers} workers and STUN/TCP): {received} received, {answered} answered, "
            "{malformed} malformed, {rate_limited} rate-limited, {ignored} ignored, {send_failed} send failures, "
            "{tcp_connections} TCP open, {errors} responder errors; answered per worker: {per_worker}; "
            "{restarts} restarts",
            workers=self.workers,
            per_worker=", ".join(
                f"{i}: {slot.answered_before + slot.counters.get('answered', 0)}"
                for i, slot in enumerate(self.slots, start=1)
            ),
            restarts=self.restarts,
            **self.counters.snapshot(),
        )


def _how_it_ended(reason: Failure) -> str:
    """A worker process's end in words: its exit status or the signal that killed it."""
    value = reason.value
    status = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    if sig is not None:
        return f"was killed by signal {sig}"
    if status is not None:
        return f"exited with exit status {status}"
    return "exited" if reason.check(ProcessDone) else f"ended ({reason.getErrorMessage()})"


def _signal(protocol: _WorkerProtocol, name: str) -> None:
    try:
        protocol.transport.signalProcess(name)
    except Exception:  # already gone (ProcessExitedAlready) or never started
        pass


def _child_env() -> dict[str, str]:
    """This environment, with the directory that holds this natbypass first on PYTHONPATH."""
    import natbypass

    root = os.path.dirname(os.path.dirname(os.path.abspath(natbypass.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


if __name__ == "__main__":
    sys.exit(main())

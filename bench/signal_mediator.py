"""
Run only the signalling half of the mediator, for the benchmark.

    python3 bench/signal_mediator.py --signal tcp:0:interface=127.0.0.1:backlog=4096

Prints `LISTENING <port>` once bound.  Limits are off (the load generator
opens thousands of connections from one address); logs go to stderr at
warning level unless `--log-file` asks for the full info-level log that
`twistd` would write.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from relcommon import raise_nofile  # noqa: E402  (bench/ is on sys.path when run as a script)

from natbypass.signaling.service import makeSignalingService  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--signal", default="tcp:0:interface=127.0.0.1:backlog=4096")
    p.add_argument("--log-file", help="write every event (info level, JSON lines) here, as an operator would")
    p.add_argument("--status-interval", type=float, default=0)
    p.add_argument("--profile", help="write a cProfile of the whole run here (for finding hot spots)")
    p.add_argument("--gc-stats", action="store_true", help="print garbage-collector pause totals at exit")
    a = p.parse_args()

    raise_nofile()

    observers = [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])]
    if a.log_file:
        observers.append(jsonFileLogObserver(open(a.log_file, "a")))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)

    if a.gc_stats:
        import gc
        import time

        pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        started = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pauses[info["generation"]].append(time.perf_counter() - started[0])
                if info["generation"] == 2:
                    print(
                        f"gc gen2 at {time.monotonic():.1f}: {pauses[2][-1] * 1000:.0f} ms", file=sys.stderr, flush=True
                    )

        gc.callbacks.append(on_gc)

        def report() -> None:
            for gen, xs in pauses.items():
                if xs:
                    print(
                        f"gc gen{gen}: {len(xs)} runs, total {sum(xs) * 1000:.0f} ms, max {max(xs) * 1000:.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )

        reactor.addSystemEventTrigger("after", "shutdown", report)

    def freeze() -> None:
        """Experiment: collect once, then move every live object out of the collector's sight."""
        import gc
        import time

        t = time.perf_counter()
        gc.collect()
        gc.freeze()
        print(f"FROZEN {gc.get_freeze_count()} objects in {(time.perf_counter() - t) * 1000:.0f} ms", flush=True)

    import signal

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(freeze))

    def trim() -> None:
        """Experiment: give free heap memory back to the system (glibc), to tell live memory from fragmentation."""
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print("TRIMMED", flush=True)

    signal.signal(signal.SIGUSR2, lambda *_: reactor.callFromThread(trim))

    svc = makeSignalingService(
        a.signal,
        reactor,
        max_peers=0,
        max_per_source=0,
        rate=0,
        status_interval=a.status_interval,
    )
    svc.startService()

    def listening(port) -> None:
        print(f"LISTENING {port.getHost().port}", flush=True)

    svc.whenListening().addCallbacks(listening, lambda f: (print(f"FAILED {f.value}", flush=True), reactor.stop()))
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    if a.profile:
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, a.profile)
    else:
        reactor.run()


if __name__ == "__main__":
    main()

"""
Racing the connection attempts of a plan (happy eyeballs, RFC 8305 style).

L{HappyEyeballs} runs attempt factories in the order L{natbypass.selection}
chose: the first at once, each next one after a head start or as soon as
everything running has failed; the first connection wins, the rest are
cancelled, and every attempt is recorded in an L{Outcome}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from natbypass.selection import DEFAULT_HEAD_START


@dataclass
class AttemptRecord:
    """One attempt of a race: times in ms since the race started."""

    protocol: str
    result: str = "not-started"  # connected | failed | cancelled | not-started
    started_ms: float | None = None
    ended_ms: float | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Outcome:
    """Every attempt of one connect, in the order they were planned."""

    attempts: list[AttemptRecord] = field(default_factory=list)
    winner: str | None = None

    def describe(self) -> str:
        return "; ".join(
            f"{a.protocol}: {a.result}"
            + (
                f" after {a.ended_ms - a.started_ms:.0f} ms"
                if a.ended_ms is not None and a.started_ms is not None
                else ""
            )
            + (f" ({a.reason})" if a.reason else "")
            for a in self.attempts
        )

    def to_json(self) -> dict[str, Any]:
        return {"winner": self.winner, "attempts": [a.to_json() for a in self.attempts]}


class AllAttemptsFailed(Exception):
    """No attempt connected; C{outcome} has each one's reason."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"every attempt failed: {outcome.describe()}")
        self.outcome = outcome


AttemptFactory = Callable[[], Deferred]


class HappyEyeballs:
    """
    Race attempt factories (callables returning a Deferred that fires with a
    connection): the first starts at once, each next one C{head_start}
    seconds after the previous or at once when nothing else is running.
    The first connection wins and running attempts are cancelled (attempt
    Deferreds must stop their work when cancelled, as punch_udp/punch_tcp do).
    """

    log = Logger()

    def __init__(
        self,
        attempts: Sequence[tuple[str, AttemptFactory]],
        clock: IReactorTime,
        head_start: float = DEFAULT_HEAD_START,
        outcome: Outcome | None = None,
    ) -> None:
        if not attempts:
            raise ValueError("nothing to attempt")
        self._factories = [f for _, f in attempts]
        self._clock = clock
        self._head_start = head_start
        self.outcome = outcome if outcome is not None else Outcome()
        self.outcome.attempts[:] = [AttemptRecord(p) for p, _ in attempts]
        self.outcome.winner = None
        self._running: dict[int, Deferred] = {}
        self._next = 0
        self._timer = None
        self._t0 = 0.0
        self._done = False
        self.deferred: Deferred = Deferred(lambda d: self._cancel())

    def start(self) -> Deferred:
        """Begin the race; returns L{deferred}."""
        self._t0 = self._clock.seconds()
        self._launch()
        return self.deferred

    def _ms(self) -> float:
        return (self._clock.seconds() - self._t0) * 1000

    def _launch(self) -> None:
        self._timer = None
        if self._done or self._next >= len(self._factories):
            return
        i = self._next
        self._next += 1
        record = self.outcome.attempts[i]
        record.result, record.started_ms = "running", self._ms()
        try:
            d = self._factories[i]()
        except Exception:
            # Recorded as this attempt's failure so the race goes on, and
            # logged with its traceback: a raising factory is a bug.
            failure = Failure()
            self.log.failure("attempt factory for {protocol} raised", failure, protocol=record.protocol)
            d = Deferred()
            d.errback(failure)
        self._running[i] = d
        if self._next < len(self._factories):
            self._timer = self._clock.callLater(self._head_start, self._launch)
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(i,), errbackArgs=(i,))

    def _succeeded(self, connection: Any, i: int) -> None:
        self._running.pop(i, None)
        record = self.outcome.attempts[i]
        record.ended_ms = self._ms()
        record.result = "connected"
        self.outcome.winner = record.protocol
        self._stop("another attempt won")
        self.deferred.callback(connection)

    def _failed(self, failure: Failure, i: int) -> None:
        self._running.pop(i, None)
        record = self.outcome.attempts[i]
        if record.result == "cancelled":
            return
        record.ended_ms = self._ms()
        record.result = "failed"
        record.reason = getattr(failure.value, "reason", None) or failure.getErrorMessage()
        if self._done:
            return
        if not self._running:
            if self._next < len(self._factories):
                if self._timer is not None and self._timer.active():
                    self._timer.cancel()
                self._launch()
                return
            self._done = True
            self.deferred.errback(AllAttemptsFailed(self.outcome))

    def _stop(self, why: str) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for i, d in list(self._running.items()):
            record = self.outcome.attempts[i]
            record.result, record.ended_ms, record.reason = "cancelled", self._ms(), why
            d.addErrback(lambda f: f.trap(CancelledError))
            d.cancel()
        self._running.clear()

    def _cancel(self) -> None:
        self._stop("cancelled by the caller")


def race(
    attempts: Sequence[tuple[str, AttemptFactory]],
    clock: IReactorTime,
    head_start: float = DEFAULT_HEAD_START,
    outcome: Outcome | None = None,
) -> Deferred:
    """
    Start a L{HappyEyeballs} race; returns its Deferred (the winning
    connection, or L{AllAttemptsFailed}).  Pass C{outcome} to watch
    the attempts being recorded; it is filled in place.
    """
    return HappyEyeballs(attempts, clock, head_start, outcome).start()

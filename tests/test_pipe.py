"""natbypass pipe: options, and the pipe's ends in memory."""

from __future__ import annotations

import io
import sys

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from natbypass.app import pipe


class OptionsTests(SynchronousTestCase):
    base = ["--mediator", "tcp:127.0.0.1:7000", "--id", "alice"]

    def parse(self, *argv: str, tty: bool = False) -> tuple[int | None, dict | None, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        try:
            options = pipe.parse_options([*self.base, "--known-peers", self.mktemp(), *argv], stderr_is_tty=tty)
            return None, options, ""
        except SystemExit as e:
            return int(e.code or 0), None, err.getvalue()

    def test_progress_defaults_to_the_terminal(self) -> None:
        self.assertFalse(self.parse("--peer", "bob")[1]["progress"])
        self.assertTrue(self.parse("--peer", "bob", tty=True)[1]["progress"])
        self.assertFalse(self.parse("--peer", "bob", "--no-progress", tty=True)[1]["progress"])
        self.assertTrue(self.parse("--listen", "--progress")[1]["progress"])

    def test_usage_errors(self) -> None:
        for argv, message in (
            ((), "give --peer NAME"),
            (("--peer", "bob", "--allow", "x"), "--allow is for --listen"),
            (("--peer", "bob", "--progress", "--no-progress"), "not both"),
            (("--listen", "--allow", "/nonexistent/allow"), "/nonexistent/allow"),
        ):
            code, _, err = self.parse(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err, argv)


class FakeProgress:
    def __init__(self) -> None:
        self.sent = self.received = 0
        self.closed = False

    def update(self, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received

    def close(self) -> None:
        self.closed = True


class PipeTests(SynchronousTestCase):
    def test_failed_stream_finishes_at_once_with_its_reason(self) -> None:
        progress = FakeProgress()
        p = pipe.Pipe(lambda proto: None, progress)
        p.stream._report(10)
        p.stdio._report(4)
        self.assertEqual((progress.sent, progress.received), (4, 10))
        p.stream.connectionLost(Failure(ConnectionLost("gone")))
        reason = self.successResultOf(p.done)
        self.assertIsInstance(reason, ConnectionLost)
        self.assertTrue(progress.closed)

    def test_clean_end_waits_for_stdout(self) -> None:
        from twisted.internet.testing import StringTransport

        p = pipe.Pipe(lambda proto: None)
        p.stdio.makeConnection(StringTransport())
        p.stream.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(p.done)
        p.stdio.writeConnectionLost()  # stdout drained and closed
        self.assertIsInstance(self.successResultOf(p.done), ConnectionDone)

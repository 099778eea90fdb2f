"""natbypass connect: bad usage is refused with exit status 2 before anything starts."""

import io
import sys

from twisted.trial.unittest import SynchronousTestCase

from natbypass.app import connect


class UsageTests(SynchronousTestCase):
    def run_captured(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        return connect.run(list(argv)), err.getvalue()

    def test_missing_arguments(self) -> None:
        code, err = self.run_captured("--id", "alice")
        self.assertEqual(code, 2)
        self.assertIn("--mediator", err)

    def test_bad_values(self) -> None:
        base = ("--mediator", "tcp:127.0.0.1:7000", "--id", "alice", "--peer", "bob")
        for extra, message in (
            (("--protocol", "quic"), "protocol wish must be"),
            (("--port-range", "5-1"), "port range"),
            (("--count", "-1"), "--count and --interval must be 0 or more"),
            (("--stun", "127.0.0.1:99999"), "the port must be a number"),
        ):
            code, err = self.run_captured(*base, *extra)
            self.assertEqual(code, 2, extra)
            self.assertIn(message, err, extra)

    def test_help(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(connect.run(["--help"]), 0)
        self.assertIn("--protocol", out.getvalue())

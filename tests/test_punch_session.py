"""Tests for natbypass.punch.session."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch.session import PunchFailed, PunchSession, decide_role


class SessionTests(SynchronousTestCase):
    def test_roles_agree(self) -> None:
        self.assertEqual((decide_role("alice", "bob"), decide_role("bob", "alice")), (0, 1))
        self.assertRaises(ValueError, decide_role, "same", "same")

    def test_validation(self) -> None:
        self.assertRaises(ValueError, PunchSession, "s", b"k" * 32, 2)
        self.assertRaises(ValueError, PunchSession, "s", b"short", 0)
        self.assertRaises(ValueError, PunchSession, "", b"k" * 32, 0)
        self.assertRaises(ValueError, PunchSession, "s" * 65, b"k" * 32, 0)
        s = PunchSession("sess", b"k" * 32, 1, "bob")
        self.assertEqual((s.sid, s.peer_role), (b"sess", 0))

    def test_failure_says_protocol_and_reason(self) -> None:
        e = PunchFailed("tcp", "refused")
        self.assertEqual((str(e), e.protocol, e.reason), ("tcp: refused", "tcp", "refused"))

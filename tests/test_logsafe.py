"""Tests of natbypass.logsafe: peer text escaped for logs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.logsafe import MAX_LOGGED, escape


def _unescape(s: str) -> str:
    """The inverse of escape (without a cut), to show nothing is lost or ambiguous."""
    out, i = [], 0
    named = {"r": "\r", "n": "\n", "t": "\t", "\\": "\\"}
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
        elif s[i + 1] in named:
            out.append(named[s[i + 1]])
            i += 2
        elif s[i + 1] == "x":
            out.append(chr(int(s[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(chr(int(s[i + 2 : i + 6], 16)))
            i += 6
    return "".join(out)


class EscapeTests(SynchronousTestCase):
    def test_examples(self) -> None:
        self.assertEqual(escape("busy"), "busy")
        self.assertEqual(escape("a\r\nFAKE line"), "a\\r\\nFAKE line")
        self.assertEqual(escape("\x1b[31mred\x07"), "\\x1b[31mred\\x07")
        self.assertEqual(escape("\x9b2J"), "\\x9b2J")
        self.assertEqual(escape("abc\u202edef\u2028"), "abc\\u202edef\\u2028")
        self.assertEqual(escape("a\\x1b"), "a\\\\x1b")  # a literal backslash cannot pass for an escape
        self.assertEqual(escape(None), "")
        self.assertEqual(escape("héllo ünïcode ✓"), "héllo ünïcode ✓")

    def test_cut(self) -> None:
        self.assertEqual(escape("x" * (MAX_LOGGED + 5)), "x" * MAX_LOGGED + "...")
        self.assertEqual(escape("abcdef", limit=3), "abc...")
        self.assertEqual(escape("abcdef", limit=0), "abcdef")

    @given(st.text())
    def test_no_control_characters_survive(self, text: str) -> None:
        out = escape(text, limit=0)
        self.assertFalse(any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029\u202e" for c in out))
        self.assertEqual(_unescape(out), text)

    @given(st.text(), st.integers(1, 50))
    def test_bounded(self, text: str, limit: int) -> None:
        self.assertLessEqual(len(escape(text, limit)), 6 * limit + 3)

"""
Peer-supplied text made safe for logs: control characters (CR, LF, ESC and
the rest of C0 and C1, DEL), Unicode line and paragraph separators and
bidirectional overrides are shown as escapes, and long text is cut, so a
peer cannot forge log lines or drive the operator's terminal.
"""

from __future__ import annotations

import re

#: Longest peer text a log line carries (longer text ends with an ellipsis).
MAX_LOGGED = 300

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069\\\\]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t", "\\": "\\\\"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape(text: object, limit: int = MAX_LOGGED) -> str:
    """
    C{text} (converted with C{str}; None stays empty) with every unsafe
    character escaped (C{\\r}, C{\\n}, C{\\t}, C{\\xNN}, C{\\uNNNN}) and a
    backslash doubled, so the escaping cannot be forged; cut at C{limit}
    characters of the original, with C{...} appended.

    @param text: peer-supplied text (a reason, a detail, an agent string).
    @param limit: the most characters of C{text} kept (0: no limit).
    @return: one printable line.
    """
    if text is None:
        return ""
    s = str(text)
    cut = bool(limit) and len(s) > limit
    if cut:
        s = s[:limit]
    return _UNSAFE.sub(_escape_char, s) + ("..." if cut else "")

"""
Which identity keys we accept for which peers.

Two files, both plain text, one entry a line, C{#} comments (at the start of
a line or after whitespace), blank lines ignored:

  - the B{known-peers} file (trust on first use, like SSH's C{known_hosts}):
    C{PEER_ID FINGERPRINT} lines.  The first key a peer proves it holds is
    recorded; a different key later is an error (L{FingerprintMismatch}) that
    names both fingerprints and how to accept the new one.
  - the B{allow} file (C{--allow FILE}): one fingerprint a line, optionally
    with the peer id it must come with (in either order, so a known-peers file
    is also an allow file).  L{AllowList.any} accepts every key.

Parsing is pure and bounded (line length, entry count, file size) so a
hostile file costs little.  The TLS/QUIC layers take a L{PeerCheck}: a
callable that raises L{PeerRejected}; L{pinned} makes one from a fingerprint.
Record a first-contact key only I{after} the handshake proved the peer holds
it (L{KnownPeers.record}), never from a verification callback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.logger import Logger

from natbypass.identity import Fingerprint, FingerprintError

__all__ = [
    "AllowList",
    "FingerprintMismatch",
    "KnownPeers",
    "PeerCheck",
    "PeerRejected",
    "TrustFileError",
    "parse_allow",
    "parse_known_peers",
    "pinned",
]

#: Longest line either file may hold (characters, without the newline).
MAX_LINE = 1024
#: Most entries either file may hold.
MAX_ENTRIES = 100_000
#: Largest file read (bytes).
MAX_FILE = 16 * 1024 * 1024

#: The peer id grammar of the signalling protocol (natbypass.signaling.wire.PEER_ID).
PEER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}\Z")

_COMMENT = re.compile(r"(?:^|(?<=\s))#.*", re.DOTALL)


class TrustFileError(ValueError):
    """A trust file is malformed; the message names the file and line."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        super().__init__(f"{source}:{line}: {problem}" if line else f"{source}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


class PeerRejected(Exception):
    """A peer's key is not the one we accept for it; the message says why."""


class FingerprintMismatch(PeerRejected):
    """A known peer presented a different key than the one on record."""

    def __init__(self, peer_id: str, known: Fingerprint, presented: Fingerprint, source: str, line: int) -> None:
        super().__init__(
            f"peer {peer_id!r} presented key {presented}, but {source} line {line} records {known} for it. "
            f"Someone may be impersonating {peer_id!r}. If you know its key really changed (check {presented} "
            f"with its owner), delete line {line} of {source} and connect again to record the new key."
        )
        self.peer_id = peer_id
        self.known = known
        self.presented = presented
        self.source = source
        self.line = line


#: What the TLS and QUIC layers call with the fingerprint the peer proved it
#: holds; returns to accept, raises L{PeerRejected} to refuse.
PeerCheck = Callable[[Fingerprint], None]


def pinned(expected: Fingerprint) -> PeerCheck:
    """A L{PeerCheck} that accepts exactly C{expected}."""

    def check(presented: Fingerprint) -> None:
        if not presented.matches(expected):
            raise PeerRejected(f"the peer's key is {presented}, expected {expected}")

    return check


def as_check(expected: Fingerprint | PeerCheck) -> PeerCheck:
    """A fingerprint becomes L{pinned}; a callable is used as it is."""
    return pinned(expected) if isinstance(expected, Fingerprint) else expected


def _lines(text: str, source: str) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number, tokens) for every line that holds something."""
    if len(text) > MAX_FILE:
        raise TrustFileError(source, 0, f"larger than {MAX_FILE} characters")
    count = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if len(raw) > MAX_LINE:
            raise TrustFileError(source, number, f"line longer than {MAX_LINE} characters")
        tokens = _COMMENT.sub("", raw).split()
        if not tokens:
            continue
        count += 1
        if count > MAX_ENTRIES:
            raise TrustFileError(source, number, f"more than {MAX_ENTRIES} entries")
        yield number, tokens


def _peer_id(token: str, source: str, number: int) -> str:
    if not PEER_ID.match(token):
        raise TrustFileError(source, number, f"{token[:80]!r} is not a peer id")
    return token


def _fingerprint(token: str, source: str, number: int) -> Fingerprint:
    try:
        return Fingerprint.parse(token)
    except FingerprintError as e:
        raise TrustFileError(source, number, str(e)) from None


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_FILE:
        raise TrustFileError(path, 0, f"larger than {MAX_FILE} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrustFileError(path, 0, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


# --- known peers -------------------------------------------------------------


def parse_known_peers(text: str, source: str = "<known-peers>") -> dict[str, tuple[Fingerprint, int]]:
    """
    Parse a known-peers file: C{PEER_ID FINGERPRINT} lines.

    @return: peer id -> (fingerprint, line number).
    @raise TrustFileError: on a malformed line, or a peer listed twice with
        different keys.
    """
    entries: dict[str, tuple[Fingerprint, int]] = {}
    for number, tokens in _lines(text, source):
        if len(tokens) != 2:
            raise TrustFileError(source, number, "expected 'PEER_ID FINGERPRINT'")
        peer_id = _peer_id(tokens[0], source, number)
        fp = _fingerprint(tokens[1], source, number)
        if peer_id in entries and entries[peer_id][0] != fp:
            raise TrustFileError(
                source, number, f"{peer_id!r} is already listed with another key on line {entries[peer_id][1]}"
            )
        entries.setdefault(peer_id, (fp, number))
    return entries


def format_known_peer(peer_id: str, fingerprint: Fingerprint) -> str:
    """One known-peers line (with its newline)."""
    if not PEER_ID.match(peer_id):
        raise ValueError(f"{peer_id!r} is not a peer id")
    return f"{peer_id} {fingerprint}\n"


class KnownPeers:
    """
    The trust-on-first-use record of the keys peers proved they hold.

    L{check} during a handshake (it never writes); L{record} once the
    handshake succeeded with a peer that was not yet known.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._entries: dict[str, tuple[Fingerprint, int]] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again (a missing file is an empty record)."""
        text = _read(self.path)
        self._entries = {} if text is None else parse_known_peers(text, self.path)

    def get(self, peer_id: str) -> Fingerprint | None:
        """The recorded key of C{peer_id}, or None."""
        entry = self._entries.get(peer_id)
        return None if entry is None else entry[0]

    def check(self, peer_id: str, presented: Fingerprint) -> bool:
        """
        Is C{presented} acceptable for C{peer_id}?

        @return: True when it is the recorded key, False when the peer is not
            known yet (first contact: accept, then L{record} after the
            handshake).
        @raise FingerprintMismatch: when another key is recorded.
        """
        entry = self._entries.get(peer_id)
        if entry is None:
            return False
        known, line = entry
        if not known.matches(presented):
            raise FingerprintMismatch(peer_id, known, presented, self.path, line)
        return True

    def checker(self, peer_id: str) -> PeerCheck:
        """A L{PeerCheck} for C{peer_id} (accepts an unknown peer's first key)."""

        def check(presented: Fingerprint) -> None:
            self.check(peer_id, presented)

        return check

    def record(self, peer_id: str, fingerprint: Fingerprint) -> bool:
        """
        Remember C{fingerprint} for C{peer_id} if it is not known yet.

        Appends one line (the file is created 0600); appends of one short
        line are atomic, so concurrent processes do not lose each other's.

        @return: True when a line was added.
        @raise FingerprintMismatch: when another key is recorded.
        """
        if self.check(peer_id, fingerprint):
            return False
        line = format_known_peer(peer_id, fingerprint)
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        self.reload()
        self.log.info(
            "recorded key {fingerprint} for {peer_id} in {path}",
            fingerprint=str(fingerprint),
            peer_id=peer_id,
            path=self.path,
        )
        return True


# --- allow list --------------------------------------------------------------


@dataclass(frozen=True)
class AllowList:
    """
    The keys we accept, each for any peer id or for one.

    C{allow_any} accepts every key (the C{--allow any} mode).
    """

    anywhere: frozenset[Fingerprint] = frozenset()
    bound: frozenset[tuple[str, Fingerprint]] = frozenset()
    allow_any: bool = False
    source: str = field(default="<allow>", compare=False)

    @classmethod
    def any(cls) -> AllowList:
        """Accept every key."""
        return cls(allow_any=True, source="allow-any")

    @classmethod
    def load(cls, path: str) -> AllowList:
        """
        Read an allow file.

        @raise TrustFileError: when it is missing or malformed.
        """
        text = _read(path)
        if text is None:
            raise TrustFileError(path, 0, "no such file")
        return parse_allow(text, path)

    def allows(self, peer_id: str, fingerprint: Fingerprint) -> bool:
        """May C{peer_id} use the key C{fingerprint}?"""
        return self.allow_any or fingerprint in self.anywhere or (peer_id, fingerprint) in self.bound

    def check(self, peer_id: str, fingerprint: Fingerprint) -> None:
        """@raise PeerRejected: when L{allows} says no."""
        if not self.allows(peer_id, fingerprint):
            raise PeerRejected(
                f"peer {peer_id!r} presented key {fingerprint}, which {self.source} does not allow; "
                f"add the line '{fingerprint} {peer_id}' to it to allow it"
            )

    def checker(self, peer_id: str) -> PeerCheck:
        """A L{PeerCheck} for C{peer_id}."""
        return lambda presented: self.check(peer_id, presented)


def parse_allow(text: str, source: str = "<allow>") -> AllowList:
    """
    Parse an allow file: C{FINGERPRINT [PEER_ID]} or C{PEER_ID FINGERPRINT}.

    @raise TrustFileError: on a malformed line.
    """
    anywhere: set[Fingerprint] = set()
    bound: set[tuple[str, Fingerprint]] = set()
    for number, tokens in _lines(text, source):
        if len(tokens) > 2:
            raise TrustFileError(source, number, "expected 'FINGERPRINT [PEER_ID]'")
        if len(tokens) == 1:
            anywhere.add(_fingerprint(tokens[0], source, number))
            continue
        try:
            fp, peer = Fingerprint.parse(tokens[0]), tokens[1]
        except FingerprintError:
            fp, peer = _fingerprint(tokens[1], source, number), tokens[0]
        bound.add((_peer_id(peer, source, number), fp))
    return AllowList(frozenset(anywhere), frozenset(bound), False, source)

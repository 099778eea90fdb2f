"""Tests for natbypass.trust."""

from __future__ import annotations

import os
import stat

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.identity import Fingerprint
from natbypass.trust import (
    MAX_ENTRIES,
    MAX_LINE,
    AllowList,
    FingerprintMismatch,
    KnownPeers,
    PeerRejected,
    TrustFileError,
    format_known_peer,
    parse_allow,
    parse_known_peers,
    pinned,
)

A = Fingerprint(bytes(range(20)))
B = Fingerprint(bytes(range(20, 40)))

fingerprints = st.binary(min_size=20, max_size=20).map(Fingerprint)
peer_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}\Z", fullmatch=True)
comments = st.sampled_from(["", " # a comment", "\t#x", "  #"])


class KnownPeersParseTests(SynchronousTestCase):
    def test_lines_and_comments(self) -> None:
        text = f"# header\n\nalice {A}   # since 2024\n  bob\t{str(B).upper()}\n"
        self.assertEqual(parse_known_peers(text), {"alice": (A, 3), "bob": (B, 4)})
        # '#' inside a word does not start a comment: the word stays whole.
        e = self.assertRaises(TrustFileError, parse_known_peers, f"x#y {A}\n")
        self.assertIn("'x#y' is not a peer id", str(e))

    def test_errors_name_line(self) -> None:
        for text, words in (
            (f"alice {A}\nalice {B}\n", "already listed"),
            ("alice\n", "PEER_ID FINGERPRINT"),
            (f"-bad {A}\n", "not a peer id"),
            ("alice nb1-zzzz\n", "has 4"),
            ("a" * (MAX_LINE + 1), "longer than"),
        ):
            e = self.assertRaises(TrustFileError, parse_known_peers, text, "kp")
            self.assertIn(words, str(e))
            self.assertTrue(str(e).startswith("kp:"))
        self.assertEqual(parse_known_peers(f"alice {A}\nalice {A}\n"), {"alice": (A, 1)})

    def test_entry_bound(self) -> None:
        text = "".join(f"p{i} {A}\n" for i in range(MAX_ENTRIES + 1))
        e = self.assertRaises(TrustFileError, parse_known_peers, text)
        self.assertIn("more than", str(e))

    @given(st.dictionaries(peer_ids, fingerprints, max_size=20), comments)
    def test_round_trip(self, entries: dict[str, Fingerprint], comment: str) -> None:
        text = "".join(format_known_peer(p, f).rstrip("\n") + comment + "\n" for p, f in entries.items())
        self.assertEqual({p: f for p, (f, _) in parse_known_peers(text).items()}, entries)

    @given(st.text(max_size=2000))
    def test_hostile_text_only_raises_trust_errors(self, text: str) -> None:
        try:
            parse_known_peers(text)
        except TrustFileError:
            pass


class KnownPeersFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "known_peers")

    def test_tofu(self) -> None:
        kp = KnownPeers(self.path)
        self.assertFalse(kp.check("alice", A))
        kp.checker("alice")(A)  # unknown: accepted, nothing written
        self.assertFalse(os.path.exists(self.path))
        self.assertTrue(kp.record("alice", A))
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertFalse(kp.record("alice", A))
        self.assertTrue(KnownPeers(self.path).check("alice", A))
        e = self.assertRaises(FingerprintMismatch, KnownPeers(self.path).check, "alice", B)
        self.assertIsInstance(e, PeerRejected)
        self.assertEqual((e.known, e.presented, e.line), (A, B, 1))
        for words in (str(A), str(B), f"delete line 1 of {self.path}"):
            self.assertIn(words, str(e))
        self.assertRaises(FingerprintMismatch, kp.record, "alice", B)

    def test_appends_after_missing_newline(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write(f"alice {A}")
        kp = KnownPeers(self.path)
        kp.record("bob", B)
        self.assertEqual(open(self.path).read(), f"alice {A}\nbob {B}\n")
        self.assertEqual(kp.get("bob"), B)


class AllowTests(SynchronousTestCase):
    def test_forms(self) -> None:
        allow = parse_allow(f"{A}\n{B} bob # only as bob\ncarol {B}\n", "allow")
        self.assertTrue(allow.allows("anyone", A))
        self.assertTrue(allow.allows("bob", B))
        self.assertTrue(allow.allows("carol", B))
        self.assertFalse(allow.allows("mallory", B))
        e = self.assertRaises(PeerRejected, allow.checker("mallory"), B)
        self.assertIn(f"'{B} mallory'", str(e))
        self.assertTrue(AllowList.any().allows("x", B))
        self.assertFalse(AllowList().allows("x", B))

    def test_known_peers_file_is_an_allow_file(self) -> None:
        text = format_known_peer("alice", A)
        self.assertTrue(parse_allow(text).allows("alice", A))

    def test_errors(self) -> None:
        for text in (f"{A} bob extra\n", "bob carol\n", f"{A} -x\n"):
            self.assertRaises(TrustFileError, parse_allow, text)
        path = os.path.join(self.mktemp())
        e = self.assertRaises(TrustFileError, AllowList.load, path)
        self.assertIn("no such file", str(e))
        with open(path, "wb") as f:
            f.write(b"\xff\xfe")
        self.assertRaises(TrustFileError, AllowList.load, path)

    @given(st.lists(st.tuples(fingerprints, st.one_of(st.none(), peer_ids)), max_size=20), comments)
    def test_round_trip(self, entries: list[tuple[Fingerprint, str | None]], comment: str) -> None:
        text = "".join(f"{f}{'' if p is None else ' ' + p}{comment}\n" for f, p in entries)
        allow = parse_allow(text)
        for f, p in entries:
            self.assertTrue(allow.allows(p or "whoever", f))

    @given(st.text(max_size=2000))
    def test_hostile_text_only_raises_trust_errors(self, text: str) -> None:
        try:
            parse_allow(text)
        except TrustFileError:
            pass


class PinnedTests(SynchronousTestCase):
    def test_pinned(self) -> None:
        pinned(A)(Fingerprint(A.digest))
        e = self.assertRaises(PeerRejected, pinned(A), B)
        self.assertIn(f"is {B}, expected {A}", str(e))

"""
Tests for natbypass.lab.matrix: the matrix's kinds, the expectations it
judges cells by, the verdicts, the results file and the markdown.  Pure: no
lab (the bench runs the lab; tests/test_lab_cgnat.py and
tests/test_lab_traversal.py cover real connects).
"""

from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.lab import matrix
from natbypass.lab.spec import parse_spec
from natbypass.nat import NatKind

NAMES = st.sampled_from(list(matrix.KINDS))


def run(a: str, b: str, protocol: str, k: int, ok: bool, ms: float = 300.0, reason: str = "") -> matrix.Run:
    if ok:
        return matrix.Run(a, b, protocol, k, True, won=protocol if protocol != "auto" else "udp", elapsed_ms=ms)
    attempts = [{"protocol": p, "result": "failed", "reason": reason} for p in ("udp", "tcp")]
    return matrix.Run(a, b, protocol, k, False, attempts=attempts, reason="every attempt failed")


def cell(a: str, b: str, protocol: str, runs: list[matrix.Run]) -> matrix.Cell:
    ka, kb = matrix.KINDS[a], matrix.KINDS[b]
    return matrix.Cell(ka, kb, protocol, tuple(runs), matrix.expectation(ka, kb, protocol))


class KindTests(SynchronousTestCase):
    def test_default_kinds(self) -> None:
        """The six classic types, two CGNATs, a port-mapping gateway, then two dual-stack kinds."""
        self.assertEqual(
            list(matrix.DEFAULT_KINDS),
            [
                "open",
                "full-cone",
                "restricted-cone",
                "port-restricted-cone",
                "symmetric-random",
                "symmetric-predictable",
                "cgnat",
                "cgnat-symmetric",
                "portmap",
                "dual-stack",
                "dual-symmetric",
            ],
        )
        self.assertEqual(
            [k.name for k in matrix.KINDS.values() if k.family != "ipv4"], ["dual-stack", "dual-symmetric"]
        )

    def test_dual_stack_kinds(self) -> None:
        """Dual-stack NAT sites whose peers punch IPv6 too; the mediator serves IPv6 only when one is in the lab."""
        dual = matrix.KINDS["dual-stack"]
        self.assertEqual(dual.summary.kind("udp"), NatKind.PORT_RESTRICTED)  # what IPv4 discovery sees
        self.assertEqual(dual.flags[0], "--stun6")
        spec = parse_spec(matrix.lab_spec(matrix.select_kinds("dual-stack,open"), 25))
        self.assertEqual([s.ip.value for s in spec.sites], ["v4", "v4", "dual", "dual"])
        self.assertTrue(spec.ipv6)
        self.assertIn("--stun6", matrix.mediator_flags(matrix.select_kinds("open,dual-stack")))
        self.assertEqual(matrix.mediator_flags(matrix.select_kinds("open,cgnat")), ())

    def test_cgnat_kinds_are_classified_composed(self) -> None:
        """CGNAT behind a cone carrier is a port-restricted cone; behind a symmetric carrier, symmetric."""
        self.assertEqual(matrix.KINDS["cgnat"].summary.kind("udp"), NatKind.PORT_RESTRICTED)
        self.assertFalse(matrix.KINDS["cgnat"].summary.port_preserving)
        self.assertEqual(matrix.KINDS["cgnat-symmetric"].summary.kind("udp"), NatKind.SYMMETRIC_RANDOM)

    def test_lab_spec_parses(self) -> None:
        """Two sites per kind with the delay on each, accepted by the lab's spec parser."""
        spec = parse_spec(matrix.lab_spec(list(matrix.KINDS.values()), 25))
        self.assertEqual(len(spec.sites), 2 * len(matrix.KINDS))
        self.assertTrue(all(s.link.delay_ms == 25 for s in spec.sites))
        self.assertIsNotNone(spec.site("cgn1").cgnat)
        self.assertTrue(spec.site("pmap2").nat.portmap)  # type: ignore[union-attr]

    def test_select(self) -> None:
        self.assertEqual([k.name for k in matrix.select_kinds("cgnat, open")], ["open", "cgnat"])
        self.assertEqual(len(matrix.select_kinds("all")), len(matrix.KINDS))
        e = self.assertRaises(ValueError, matrix.select_kinds, "open,ipv6-only")
        self.assertIn("ipv6-only", str(e))
        self.assertIn("known: open", str(e))

    def test_register_hook(self) -> None:
        """A branch registers its own kinds (an IPv6 site, say); stems stay unique and short."""
        extra = matrix.Kind("test-v6", "tsix", {"kind": "open"}, matrix.KINDS["open"].summary, family="ipv6")
        self.addCleanup(matrix.KINDS.pop, "test-v6")
        matrix.register(extra)
        self.assertEqual(matrix.select_kinds("test-v6"), [extra])
        self.assertRaises(ValueError, matrix.register, matrix.Kind("other", "tsix", "full-cone", extra.summary))
        self.assertRaises(ValueError, matrix.register, matrix.Kind("long", "toolongstem", "full-cone", extra.summary))

    def test_schedule_round_by_round(self) -> None:
        """An interrupted run has every cell measured about equally often."""
        kinds = matrix.select_kinds("open,cgnat")
        s = matrix.schedule(kinds, 2)
        self.assertEqual(len(s), 3 * 3 * 2)
        self.assertEqual({k for *_, k in s[:9]}, {0})


class ExpectationTests(SynchronousTestCase):
    def test_table(self) -> None:
        e = matrix.expectation(matrix.KINDS["symmetric-random"], matrix.KINDS["cgnat-symmetric"], "udp")
        self.assertEqual((e.table, e.effective), (False, False))
        self.assertIn("needs port prediction", e.reason)
        self.assertTrue(matrix.expectation(matrix.KINDS["cgnat"], matrix.KINDS["cgnat"], "tcp").table)

    def test_port_mapping_is_effective_full_cone(self) -> None:
        """The table says a symmetric NAT fails against a port-restricted cone; with a mapping it connects."""
        e = matrix.expectation(matrix.KINDS["portmap"], matrix.KINDS["cgnat-symmetric"], "auto")
        self.assertEqual((e.table, e.effective), (False, True))

    def test_ipv6_between_dual_stack_kinds(self) -> None:
        """
        Two random-port symmetric NATs fail over IPv4 (the table); both dual stack, IPv6 behind firewalls
        connects them.  A dual-stack kind against an IPv4-only one is judged by IPv4 alone.
        """
        kinds = matrix.KINDS
        e = matrix.expectation(kinds["dual-symmetric"], kinds["dual-symmetric"], "udp")
        self.assertEqual((e.table, e.effective, e.via), (False, True, "IPv6"))
        e = matrix.expectation(kinds["dual-symmetric"], kinds["symmetric-random"], "udp")
        self.assertEqual((e.table, e.effective, e.via), (False, False, ""))
        e = matrix.expectation(kinds["dual-stack"], kinds["dual-stack"], "auto")
        self.assertEqual((e.table, e.effective, e.via), (True, True, ""))

    def test_prediction(self) -> None:
        kinds = matrix.KINDS
        self.assertTrue(
            matrix.expectation(kinds["port-restricted-cone"], kinds["symmetric-predictable"], "udp").predicts
        )
        self.assertFalse(matrix.expectation(kinds["full-cone"], kinds["cgnat"], "udp").predicts)


class VerdictTests(SynchronousTestCase):
    def test_as_table_and_below(self) -> None:
        ok = [run("cgnat", "cgnat", "udp", k, True) for k in range(3)]
        self.assertEqual(cell("cgnat", "cgnat", "udp", ok).verdict, "as table")
        one_failed = ok[:2] + [run("cgnat", "cgnat", "udp", 2, False, reason="no verified UDP path within 4 s")]
        c = cell("cgnat", "cgnat", "udp", one_failed)
        self.assertEqual((c.verdict, c.successes), ("below table", 2))

    def test_expected_failure_needs_a_traversal_reason(self) -> None:
        traversal = [
            run("symmetric-random", "cgnat-symmetric", "udp", k, False, reason="no verified UDP path in 4 s")
            for k in (0, 1)
        ]
        self.assertEqual(cell("symmetric-random", "cgnat-symmetric", "udp", traversal).verdict, "as table")
        other = traversal[:1] + [run("symmetric-random", "cgnat-symmetric", "udp", 1, False, reason="mediator gone")]
        self.assertEqual(cell("symmetric-random", "cgnat-symmetric", "udp", other).verdict, "wrong reason")
        lucky = traversal[:1] + [run("symmetric-random", "cgnat-symmetric", "udp", 1, True)]
        self.assertEqual(cell("symmetric-random", "cgnat-symmetric", "udp", lucky).verdict, "beats table")

    def test_failing_at_once_with_the_tables_reason(self) -> None:
        """A hopeless pair fails before punching, with the table's own reason: that is the table's verdict."""
        from natbypass.selection import NO_PORT_MAPPING

        fast = [
            run(
                "symmetric-random", "cgnat-symmetric", "udp", k, False, reason="needs port prediction" + NO_PORT_MAPPING
            )
            for k in (0, 1)
        ]
        self.assertEqual(cell("symmetric-random", "cgnat-symmetric", "udp", fast).verdict, "as table")

    def test_port_mapping(self) -> None:
        ok = [run("portmap", "portmap", "tcp", 0, True)]
        self.assertEqual(cell("portmap", "portmap", "tcp", ok).verdict, "as expected (port mapping)")
        self.assertEqual(cell("portmap", "portmap", "tcp", []).verdict, "no runs")

    def test_ipv6_verdict_and_path(self) -> None:
        """A connect over IPv6 shows as C{udp(v6)}; the table's failure turned success is C{as expected (IPv6)}."""

        class Result:
            ok, wall_s = True, 1.0
            connected = {"protocol": "udp", "elapsed_ms": 210, "attempts": [], "remote_address": "[2001:2:0:3::2]:4000"}

            def event(self, name: str) -> None:
                return None

        r = matrix.run_from_result("dual-symmetric", "dual-symmetric", "udp", 0, Result())
        self.assertEqual((r.family, r.path), ("v6", "udp(v6)"))
        self.assertEqual(matrix.Run.from_json(r.to_json()), r)
        c = cell("dual-symmetric", "dual-symmetric", "udp", [r])
        self.assertEqual((c.verdict, c.text()), ("as expected (IPv6)", "1/1 udp(v6) 210/210 ms"))
        self.assertIn("fails (connects over IPv6)", matrix.matrix_markdown([c], ("udp",)))
        self.assertIn("| UDP punch over IPv6 | 1/1 |", matrix.times_markdown([c]))
        v4 = matrix.Run("dual-stack", "open", "udp", 0, True, won="udp", elapsed_ms=200, family="v4")
        self.assertEqual(v4.path, "udp")

    def test_text(self) -> None:
        runs = [run("open", "cgnat", "udp", k, True, ms) for k, ms in enumerate((300, 280, 500))]
        self.assertEqual(cell("open", "cgnat", "udp", runs).text(), "3/3 udp 300/500 ms")
        failed = [run("cgnat", "cgnat-symmetric", "tcp", 0, False, reason="no authenticated TCP connection | x")]
        text = cell("cgnat", "cgnat-symmetric", "tcp", failed).text()
        self.assertEqual(text, "0/1 (udp: no TCP connection: no errors; tcp: no TCP connection: no errors)")

    def test_gist(self) -> None:
        """What happened, without the addresses and counts."""
        udp = (
            "no verified UDP path within 4 s: nothing from the peer reached us; sent 23 probes to 1 candidate "
            "(198.18.1.10:9790), ignored 0 invalid packets"
        )
        self.assertEqual(matrix.gist(udp), "no UDP path: nothing from the peer reached us")
        tcp = (
            "no authenticated TCP connection within 4 s from local port 39485: connect tries 198.18.1.10:16713 x7; "
            "errors ETIMEDOUT x12; 0 connections failed the handshake"
        )
        self.assertEqual(matrix.gist(tcp), "no TCP connection: errors ETIMEDOUT x12")
        self.assertEqual(matrix.gist("mediator | gone\n"), "mediator / gone")

    def test_percentile(self) -> None:
        self.assertEqual(matrix.percentile([5, 1, 3], 90), 5)
        self.assertEqual(matrix.percentile(list(range(1, 11)), 90), 9)
        self.assertEqual(matrix.percentile([7], 50), 7)


class ResultsFileTests(SynchronousTestCase):
    @given(
        st.builds(
            matrix.Run,
            a=NAMES,
            b=NAMES,
            protocol=st.sampled_from(matrix.PROTOCOLS),
            k=st.integers(0, 20),
            ok=st.booleans(),
            won=st.none() | st.sampled_from(("udp", "tcp")),
            elapsed_ms=st.none() | st.integers(0, 100000).map(float),
            wall_s=st.floats(0, 100, allow_nan=False),
            attempts=st.lists(
                st.dictionaries(st.sampled_from(("protocol", "reason")), st.text(max_size=20)), max_size=3
            ),
            reason=st.text(max_size=40),
        ),
        st.integers(0, 200),
    )
    @settings(max_examples=200, deadline=None)
    def test_round_trip_and_torn_line(self, r: matrix.Run, cut: int) -> None:
        """Each run reads back as written; a torn last line (an interrupted write) is skipped, never raised."""
        line = r.to_json()
        self.assertEqual(matrix.read_runs([line + "\n"]), [r])
        torn = line[: cut % max(1, len(line))]
        got = matrix.read_runs([line + "\n", torn])
        self.assertEqual(got[0], r)
        self.assertLessEqual(len(got), 2)

    @given(st.lists(st.text(max_size=60), max_size=5))
    @settings(max_examples=200, deadline=None)
    def test_junk_lines(self, lines: list[str]) -> None:
        """Whatever the file holds, reading it gives runs or nothing, never an exception."""
        for r in matrix.read_runs(lines):
            self.assertIsInstance(r, matrix.Run)

    def test_run_writes_each_connect_and_resumes(self) -> None:
        """Each connect is appended as it ends; runs already done are not made again."""

        class Result:
            def __init__(self, ok: bool) -> None:
                self.ok, self.wall_s, self.events = ok, 1.0, []
                self.connected = {"protocol": "udp", "elapsed_ms": 290, "attempts": []} if ok else None

            def event(self, name: str) -> dict | None:
                failed = {"reason": "every attempt failed", "attempts": [{"protocol": "udp", "result": "failed"}]}
                return None if self.ok or name != "failed" else failed

            def summary(self) -> str:
                return "failed"

        class FakeScenario:
            def __init__(self) -> None:
                self.peers: dict[str, object] = {}
                self.connects: list[tuple[str, str, str, list[str]]] = []

            def start_peer(self, node: str, peer_id: str, *extra: str) -> None:
                self.peers[peer_id] = extra

            def connect(self, node: str, my_id: str, peer: str, protocol: str, timeout: float, extra: list[str]):
                self.connects.append((node, peer, protocol, extra))
                return Result(node != "pmap1")

        kinds = matrix.select_kinds("open,portmap")
        sc, out = FakeScenario(), io.StringIO()
        first = matrix.run(sc, kinds, 1, out, protocols=("udp",), progress=io.StringIO())
        self.assertEqual(sc.peers, {"open2": (), "pmap2": ("--port-mapping",)})
        self.assertEqual(
            [(c[0], c[1]) for c in sc.connects], [("open1", "open2"), ("open1", "pmap2"), ("pmap1", "pmap2")]
        )
        self.assertEqual(sc.connects[-1][3], ["--port-mapping"])
        self.assertEqual(matrix.read_runs(out.getvalue().splitlines()), first)
        self.assertEqual([r.ok for r in first], [True, True, False])
        again = matrix.run(
            FakeScenario(), kinds, 2, io.StringIO(), done=first, protocols=("udp",), progress=io.StringIO()
        )
        self.assertEqual([r.k for r in again], [1, 1, 1])


class MarkdownTests(SynchronousTestCase):
    def test_tables(self) -> None:
        kinds = matrix.select_kinds("open,cgnat-symmetric,portmap")
        runs = [
            run("open", "cgnat-symmetric", "udp", 0, True, 310),
            run(
                "cgnat-symmetric",
                "cgnat-symmetric",
                "udp",
                0,
                False,
                reason="no verified UDP path within 4 s: nothing from the peer reached us; sent 23 probes",
            ),
            run("portmap", "portmap", "udp", 0, True, 400),
        ]
        cells = matrix.cells(kinds, runs, ("udp",))
        text = matrix.matrix_markdown(cells, ("udp",))
        self.assertIn("| open x cgnat-symmetric | 1/1 udp 310/310 ms | connects, connects | as table |", text)
        self.assertIn("fails (connects with the mapping)", text)
        reasons = matrix.reasons_markdown(cells)
        self.assertIn("| cgnat-symmetric x cgnat-symmetric | udp | 1/1 | needs port prediction", reasons)
        gist = "no UDP path: nothing from the peer reached us"
        self.assertIn(f"| yes | udp: {gist}; tcp: {gist} |", reasons)
        times = matrix.times_markdown(cells)
        self.assertIn("| portmap x portmap | udp | UDP punch + port mapping | 1/1 | 400 | 400 | 400 | 400 |", times)
        self.assertIn("| cgnat-symmetric x cgnat-symmetric | udp | - | 0/1 |", times)
        self.assertEqual(json.loads(json.dumps(matrix.summary_counts(cells)))["as table"], 2)

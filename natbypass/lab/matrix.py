"""
The traversal matrix over repeated runs: which NAT kinds meet, how the
outcome is judged against the selection table, and the per-cell figures
(successes/runs, median and p90 time to connect).

Pure apart from L{run}: the kinds, the lab spec, the verdicts and the
markdown are computed from data, so they are unit-tested without a lab
(C{tests/test_lab_matrix.py}); L{run} drives a L{Scenario} in a real lab and
appends one JSON line per connect to a results file, which is what makes
C{bench/traversal_matrix.py} resumable.

Kinds are registered by name (L{register}); a branch that brings new kinds
registers them from its own module, and the bench loads it with C{--plugin
MODULE}.  The dual-stack kinds (C{family="dual"}) are NAT sites with IPv6
routed behind a firewall; their peers punch both families (happy eyeballs),
so two of them are judged by the better of the IPv4 and the IPv6 path
(L{Kind.summary6}), and the lab's mediator then needs IPv6 too
(L{mediator_flags}).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from natbypass.nat import NatSummary
from natbypass.selection import feasibility

from .spec import SITE_PRESETS, preset_summary
from .traversal import ipv6_mediator_args, ipv6_peer_args

PROTOCOLS = ("udp", "tcp", "auto")


def _no_requirement() -> str | None:
    return None


@dataclass(frozen=True)
class Kind:
    """
    One kind of site in the matrix: how the lab builds it, what the
    selection table sees of it, and what its peers need.
    """

    name: str
    #: Site names are C{stem + "1"} (connecting side) and C{stem + "2"} (listening side): at most 9 characters.
    stem: str
    #: The site object of the lab spec, without link fields (the matrix adds the delay).
    site: Any
    #: What discovery reports of it, so the row of the selection table it belongs to.
    summary: NatSummary
    #: Extra command-line flags for the peer and for C{natbypass connect} in such a site.
    flags: tuple[str, ...] = ()
    #: What the engines should achieve when it differs from the table's view (a port mapping
    #: makes a symmetric NAT reachable like a full cone, which the table does not model).
    effective: NatSummary | None = None
    note: str = ""
    #: Why this kind cannot be built here, or None.
    missing: Callable[[], str | None] = _no_requirement
    #: Run once per site after the mediator is up (e.g. start a port-mapping gateway).
    setup: Callable[[Any, str], Any] | None = None
    #: C{ipv4}, or C{dual}: the site has IPv6 as well and its peers use it (L{ipv6_peer_args} among C{flags}).
    family: str = "ipv4"
    #: For dual-stack kinds: what stands in the IPv6 path (a stateful firewall, never a NAT), in the
    #: table's terms.  Two such kinds connect when either family's row says so.
    summary6: NatSummary | None = None


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add C{kind} to the kinds the matrix knows (a later registration of the same name replaces it)."""
    if not 1 <= len(kind.stem) <= 9 or not kind.stem.isalnum() or not kind.stem[0].isalpha():
        raise ValueError(f"kind {kind.name}: stem {kind.stem!r} must be 1-9 letters/digits starting with a letter")
    clash = [k.name for k in KINDS.values() if k.stem == kind.stem and k.name != kind.name]
    if clash:
        raise ValueError(f"kind {kind.name}: stem {kind.stem!r} is taken by {clash[0]}")
    KINDS[kind.name] = kind
    return kind


def _preset(name: str, stem: str, note: str = "") -> Kind:
    """A kind built from a lab preset (a NAT preset or a whole-site one such as C{cgnat})."""
    site = {"kind": "open"} if name == "open" else dict(SITE_PRESETS.get(name, {"nat": name}))
    return register(Kind(name, stem, site, preset_summary(name), note=note))


def _portmap_missing() -> str | None:
    from natbypass.portmap.labgateway import missing_gateway_tools

    return missing_gateway_tools()


def _portmap_setup(lab: Any, site: str) -> Any:
    from natbypass.portmap.labgateway import start_gateway

    return start_gateway(lab, site)


for _name, _stem in (
    ("open", "open"),
    ("full-cone", "fc"),
    ("restricted-cone", "rc"),
    ("port-restricted-cone", "prc"),
    ("symmetric-random", "symr"),
    ("symmetric-predictable", "symp"),
):
    _preset(_name, _stem)
_preset("cgnat", "cgn", "port-restricted home NAT behind an endpoint-independent, port-rewriting carrier NAT")
_preset("cgnat-symmetric", "cgns", "port-restricted home NAT behind a random-port symmetric carrier NAT")
register(
    Kind(
        "portmap",
        "pmap",
        {"nat": {"preset": "symmetric-random", "portmap": True}},
        preset_summary("symmetric-random"),
        flags=("--port-mapping",),
        effective=preset_summary("full-cone"),
        note="random-port symmetric NAT with a port-mapping gateway (miniupnpd: PCP, NAT-PMP, UPnP-IGD); "
        "its peers map their ports (--port-mapping)",
        missing=_portmap_missing,
        setup=_portmap_setup,
    )
)


def _dual(name: str, stem: str, nat: str, note: str) -> Kind:
    """A dual-stack kind: C{nat} for IPv4, IPv6 routed behind the NAT's firewall; its peers use both."""
    return register(
        Kind(
            name,
            stem,
            {"nat": nat, "ip": "dual"},
            preset_summary(nat),
            flags=ipv6_peer_args(),
            note=note,
            family="dual",
            summary6=preset_summary("firewall"),
        )
    )


_dual(
    "dual-stack",
    "dual",
    "port-restricted-cone",
    "port-restricted NAT for IPv4, IPv6 routed behind a stateful firewall (a home router); "
    "peers with --ipv6 --stun6 (happy eyeballs, IPv6 first)",
)
_dual(
    "dual-symmetric",
    "dsym",
    "symmetric-random",
    "random-port symmetric NAT for IPv4 (as a mobile carrier's), IPv6 behind a stateful firewall; "
    "peers with --ipv6 --stun6",
)
DEFAULT_KINDS = tuple(KINDS)


def mediator_flags(kinds: Iterable[Kind]) -> tuple[str, ...]:
    """The lab mediator's extra options for C{kinds}: IPv6 STUN and signalling when a kind is dual stack."""
    return ipv6_mediator_args() if any(k.family == "dual" for k in kinds) else ()


def select_kinds(text: str) -> list[Kind]:
    """C{--kinds} (comma-separated names, or C{all}) -> the kinds, in registration order; unknown names raise."""
    if text.strip() == "all":
        return list(KINDS.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise ValueError(f"unknown kind(s) {', '.join(unknown) or '(none)'}; known: {', '.join(KINDS)}")
    return [KINDS[n] for n in KINDS if n in names]


def site_names(kind: Kind) -> tuple[str, str]:
    """(connecting site, listening site) of a kind."""
    return f"{kind.stem}1", f"{kind.stem}2"


def lab_spec(kinds: Sequence[Kind], delay_ms: float) -> dict[str, Any]:
    """Two sites of every kind (so a kind can meet itself), C{delay_ms} one way on every site link."""
    sites: dict[str, Any] = {}
    for kind in kinds:
        base = {"nat": kind.site} if isinstance(kind.site, str) else dict(kind.site)
        for name in site_names(kind):
            sites[name] = {**base, "delay_ms": delay_ms}
    return {"sites": sites}


def pairs(kinds: Sequence[Kind]) -> list[tuple[Kind, Kind]]:
    """Every unordered pair of kinds, a kind with itself included."""
    return [(a, b) for i, a in enumerate(kinds) for b in kinds[i:]]


# ----------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Expectation:
    """What the selection table says of a cell, and what the engines should achieve."""

    table: bool | None
    reason: str
    #: Differs from C{table} where a kind is L{Kind.effective} (port mapping).
    effective: bool | None
    #: The table asks for port prediction on one side.
    predicts: bool
    #: What makes C{effective} differ from C{table}: C{port mapping} or C{IPv6} ("" when they agree).
    via: str = ""


def _expect(a: NatSummary, b: NatSummary, protocol: str) -> tuple[bool | None, str, bool]:
    rows = [feasibility(a, b, p) for p in (("udp", "tcp") if protocol == "auto" else (protocol,))]
    predicts = any(r.predict_remote_delta for r in rows) or any(
        feasibility(b, a, r.protocol).predict_remote_delta for r in rows
    )
    if any(r.expected for r in rows):
        return True, next(r.reason for r in rows if r.expected), predicts
    if all(r.expected is False for r in rows):
        return False, rows[0].reason, predicts
    return None, rows[0].reason, predicts


def expectation(a: Kind, b: Kind, protocol: str) -> Expectation:
    """The table's view of C{a} x C{b} over C{protocol} (C{auto}: either protocol), and the effective one."""
    table, reason, predicts = _expect(a.summary, b.summary, protocol)
    effective, via = table, ""
    if a.effective is not None or b.effective is not None:
        effective, _, _ = _expect(a.effective or a.summary, b.effective or b.summary, protocol)
        via = "port mapping"
    if a.summary6 is not None and b.summary6 is not None and effective is not True:
        # Both peers punch IPv6 too (the IPv4 race goes on beside it): the better family counts.
        over6, _, _ = _expect(a.summary6, b.summary6, protocol)
        if over6 is not False:
            effective, via = over6, "IPv6"
    return Expectation(table, reason, effective, predicts, via if effective != table else "")


# ----------------------------------------------------------------------- results

#: What the punch engines say when traversal itself failed (as opposed to signalling, a crash or a timeout
#: elsewhere), and what a pair the table knows to be hopeless says when it fails at once, before punching
#: (L{natbypass.selection.NO_PORT_MAPPING}: the table's own reason).
TRAVERSAL_FAILURES = ("no verified UDP path", "no authenticated TCP connection", "fails at once")


@dataclass
class Run:
    """One C{natbypass connect} of the matrix, as stored in the results file (one JSON line)."""

    a: str
    b: str
    protocol: str
    k: int
    ok: bool
    won: str | None = None
    elapsed_ms: float | None = None
    wall_s: float = 0.0
    #: Each attempt's protocol, result and reason (from the C{connected}/C{failed} event).
    attempts: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    #: The address family of the connected path (C{v4}, C{v6}); None when it failed.
    family: str | None = None

    @property
    def path(self) -> str:
        """What won: C{udp}, C{tcp}, or C{udp(v6)}, C{tcp(v6)} over IPv6."""
        return f"{self.won}(v6)" if self.family == "v6" else str(self.won)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Run:
        obj = json.loads(line)
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__ if k in obj})

    @property
    def traversal_failure(self) -> bool:
        """Failed, and every attempt that ran failed in traversal (so the table's reason is the one that applies)."""
        ran = [x for x in self.attempts if x.get("result") == "failed"]
        return (
            not self.ok
            and bool(ran)
            and all(any(t in (x.get("reason") or "") for t in TRAVERSAL_FAILURES) for x in ran)
        )


def run_from_result(a: str, b: str, protocol: str, k: int, result: Any) -> Run:
    """A L{Run} from a L{natbypass.lab.traversal.ConnectResult}."""
    connected, failed = result.connected, result.event("failed")
    event = connected or failed or {}
    run = Run(
        a,
        b,
        protocol,
        k,
        ok=bool(result.ok),
        won=connected["protocol"] if connected else None,
        elapsed_ms=connected["elapsed_ms"] if connected else None,
        wall_s=round(result.wall_s, 3),
        family=("v6" if str(connected.get("remote_address", "")).startswith("[") else "v4") if connected else None,
        attempts=[
            {key: x.get(key) for key in ("protocol", "result", "started_ms", "ended_ms", "reason")}
            for x in event.get("attempts", [])
        ],
    )
    if not run.ok:
        run.reason = (failed or {}).get("reason") or result.summary()
    return run


def read_runs(lines: Iterable[str]) -> list[Run]:
    """The runs of a results file; a torn last line (an interrupted write) is skipped."""
    runs = []
    for line in lines:
        if line.strip():
            try:
                runs.append(Run.from_json(line))
            except (ValueError, TypeError, KeyError):
                continue
    return runs


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank C{p}-th percentile (0 < p <= 100) of C{values} (not empty)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Cell:
    """The runs of one pair and protocol, with the figures and the verdict."""

    a: Kind
    b: Kind
    protocol: str
    runs: tuple[Run, ...]
    expected: Expectation

    @property
    def successes(self) -> int:
        return sum(r.ok for r in self.runs)

    def times(self) -> list[float]:
        return [float(r.elapsed_ms) for r in self.runs if r.ok and r.elapsed_ms is not None]

    @property
    def verdict(self) -> str:
        """
        C{as table}, C{below table} (a run failed where the table expects a
        connection), C{beats table} (connected where the table expects a
        failure), C{wrong reason} (failed as expected, but not in
        traversal), C{as expected (port mapping)} (the table says fails, the
        mapping makes it connect, and it did), C{as expected (IPv6)} (the
        same for two dual-stack kinds over IPv6), C{measured} (the table does
        not know), or C{no runs}.
        """
        if not self.runs:
            return "no runs"
        exp = self.expected
        if exp.effective is None:
            return "measured"
        if exp.effective is False:
            if self.successes:
                return "beats table"
            return "as table" if all(r.traversal_failure for r in self.runs) else "wrong reason"
        if self.successes < len(self.runs):
            return "below table"
        return "as table" if exp.table else f"as expected ({exp.via})"

    def failure(self) -> str:
        """The gist of the first failed run's attempts (L{gist}), or of its reason."""
        first = next((r for r in self.runs if not r.ok), None)
        if first is None:
            return ""
        said = [f"{x.get('protocol')}: {gist(x['reason'])}" for x in first.attempts if x.get("reason")]
        return "; ".join(said) or _short(first.reason, 110)

    def text(self) -> str:
        """C{successes/runs won-by median/p90 ms}, or C{0/runs (}L{failure}C{)}."""
        n = len(self.runs)
        if not self.successes:
            return f"0/{n} ({self.failure()})"
        t = self.times()
        won = "/".join(sorted({r.path for r in self.runs if r.ok and r.won}))
        return f"{self.successes}/{n} {won} {statistics.median(t):.0f}/{percentile(t, 90):.0f} ms"


def gist(reason: str) -> str:
    """
    The part of a punch failure reason that says what happened (the rest
    lists addresses and counts): C{no UDP path: nothing from the peer reached
    us}, C{no TCP connection: errors ETIMEDOUT x8}; other reasons shortened.
    """
    if TRAVERSAL_FAILURES[0] in reason:
        why = reason.split(" s: ", 1)[-1].split(";", 1)[0]
        return _short(f"no UDP path: {why}", 110)
    if TRAVERSAL_FAILURES[1] in reason:
        errors = next((p.strip() for p in reason.split(";") if p.strip().startswith("errors ")), "no errors")
        return _short(f"no TCP connection: {errors}", 110)
    return _short(reason, 110)


def _short(text: str, limit: int) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cells(kinds: Sequence[Kind], runs: Sequence[Run], protocols: Sequence[str] = PROTOCOLS) -> list[Cell]:
    """Every pair x protocol of C{kinds}, with its runs (possibly none yet)."""
    by_key: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        by_key.setdefault((r.a, r.b, r.protocol), []).append(r)
    return [
        Cell(a, b, p, tuple(sorted(by_key.get((a.name, b.name, p), []), key=lambda r: r.k)), expectation(a, b, p))
        for a, b in pairs(kinds)
        for p in protocols
    ]


def technique(cell: Cell, won: str) -> str:
    """How a cell's connections were made: the protocol that won (a L{Run.path}), with prediction or a port mapping."""
    protocol, v6 = won.removesuffix("(v6)"), won.endswith("(v6)")
    base = {"udp": "UDP punch", "tcp": "TCP simultaneous open"}.get(protocol, protocol) + (" over IPv6" if v6 else "")
    extra = [
        "port prediction" if cell.expected.predicts else "",
        "port mapping" if "--port-mapping" in cell.a.flags + cell.b.flags else "",
    ]
    return " + ".join([base, *filter(None, extra)])


_EXPECTS = {True: "connects", False: "fails", None: "unknown"}
_VIA = {"port mapping": "with the mapping", "IPv6": "over IPv6", "": ""}


def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def matrix_markdown(all_cells: Sequence[Cell], protocols: Sequence[str] = PROTOCOLS) -> str:
    """The matrix: one row per pair, one column per protocol, the table's expectation and the verdicts."""
    by_pair: dict[tuple[str, str], dict[str, Cell]] = {}
    for c in all_cells:
        by_pair.setdefault((c.a.name, c.b.name), {})[c.protocol] = c
    rows = []
    for (a, b), row in by_pair.items():
        any_cell = next(iter(row.values()))
        exp = [expectation(any_cell.a, any_cell.b, p) for p in ("udp", "tcp")]
        expects = ", ".join(
            _EXPECTS[e.table] + (f" ({_EXPECTS[e.effective]} {_VIA[e.via]})" if e.effective != e.table else "")
            for e in exp
        )
        verdicts = ", ".join(sorted({c.verdict for c in row.values()}))
        cells_text = [row[p].text() if p in row and row[p].runs else "-" for p in protocols]
        rows.append([f"{a} x {b}", *cells_text, expects, verdicts])
    return _table(["pair", *protocols, "table expects (udp, tcp)", "verdict"], rows)


def reasons_markdown(all_cells: Sequence[Cell]) -> str:
    """For each pair expected to fail (port mappings counted): the table's reason, and what the attempts said."""
    rows = []
    for c in all_cells:
        if c.expected.effective is False and c.runs:
            failed = [r for r in c.runs if not r.ok]
            in_traversal = "yes" if failed and all(r.traversal_failure for r in failed) else "no" if failed else "-"
            runs = f"{len(failed)}/{len(c.runs)}"
            rows.append([f"{c.a.name} x {c.b.name}", c.protocol, runs, c.expected.reason, in_traversal, c.failure()])
    head = ["pair", "protocol", "runs failed", "table's reason", "all in traversal", "first failed run's attempts"]
    return _table(head, rows)


def times_markdown(all_cells: Sequence[Cell]) -> str:
    """Connect time per pair and technique (successful runs only): median, p90, min, max."""
    rows = []
    for c in all_cells:
        pair = f"{c.a.name} x {c.b.name}"
        by_won: dict[str, list[float]] = {}
        for r in c.runs:
            if r.ok and r.elapsed_ms is not None and r.won:
                by_won.setdefault(r.path, []).append(float(r.elapsed_ms))
        if not by_won and c.runs:
            rows.append([pair, c.protocol, "-", f"0/{len(c.runs)}", "-", "-", "-", "-"])
        for won, t in sorted(by_won.items()):
            figures = (statistics.median(t), percentile(t, 90), min(t), max(t))
            rows.append(
                [pair, c.protocol, technique(c, won), f"{len(t)}/{len(c.runs)}", *(f"{x:.0f}" for x in figures)]
            )
    head = ["pair", "asked", "technique", "connected", "median ms", "p90 ms", "min", "max"]
    return _table(head, rows)


def summary_counts(all_cells: Sequence[Cell]) -> dict[str, int]:
    """How many cells got each verdict."""
    out: dict[str, int] = {}
    for c in all_cells:
        out[c.verdict] = out.get(c.verdict, 0) + 1
    return out


# --------------------------------------------------------------------------- run


def schedule(
    kinds: Sequence[Kind], repeat: int, protocols: Sequence[str] = PROTOCOLS
) -> list[tuple[Kind, Kind, str, int]]:
    """
    Every connect to make, round by round (all cells once, then all again),
    so an interrupted run has every cell measured about equally often.
    """
    return [(a, b, p, k) for k in range(repeat) for a, b in pairs(kinds) for p in protocols]


def run(
    scenario: Any,
    kinds: Sequence[Kind],
    repeat: int,
    out: TextIO,
    done: Iterable[Run] = (),
    protocols: Sequence[str] = PROTOCOLS,
    timeout: float = 4.0,
    progress: TextIO = sys.stderr,
) -> list[Run]:
    """
    Start a listening peer in every kind's second site, then make every
    connect of L{schedule} not already in C{done}, appending each L{Run}
    to C{out} as it ends.  The mediator must be running (and each kind's
    L{Kind.setup} done).
    """
    for kind in kinds:
        listener = site_names(kind)[1]
        if listener not in scenario.peers:
            scenario.start_peer(listener, listener, *kind.flags)
    have = {(r.a, r.b, r.protocol, r.k) for r in done}
    todo = [s for s in schedule(kinds, repeat, protocols) if (s[0].name, s[1].name, s[2], s[3]) not in have]
    runs: list[Run] = []
    started = time.monotonic()
    for i, (a, b, protocol, k) in enumerate(todo, start=1):
        src, dst = site_names(a)[0], site_names(b)[1]
        result = scenario.connect(
            src, f"{src}-{dst}-{protocol}-{k}", dst, protocol, timeout=timeout, extra=list(a.flags)
        )
        r = run_from_result(a.name, b.name, protocol, k, result)
        out.write(r.to_json() + "\n")
        out.flush()
        runs.append(r)
        spent = time.monotonic() - started
        eta = spent / i * (len(todo) - i)
        what = f"ok {r.path} {r.elapsed_ms} ms" if r.ok else f"FAIL {_short(r.reason, 100)}"
        print(
            f"[{i}/{len(todo)}] round {k + 1}: {a.name} x {b.name} {protocol}: {what} (eta {eta / 60:.0f} min)",
            file=progress,
            flush=True,
        )
    return runs

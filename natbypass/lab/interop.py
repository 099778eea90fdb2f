"""
NAT detection in the lab: run C{natbypass detect} and coturn's
C{turnutils_natdiscovery} in every site against the mediator's RFC 5780
responder, next to the lab's own plain-socket probes (the ground truth), and
render the comparison as a markdown table.

Used by C{bench/lab_detect_table.py} (writes the table in docs/nat-lab.md)
and by C{tests/test_lab_detect.py}.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from natbypass.nat import Filtering, Mapping

from .lab import Lab
from .netns import LabError
from .spec import FilteringRule, SiteKind, SiteSpec, describe_site, expected_summary

STUN_PORT = 3478
STUN_ALT_PORT = 3479
REFLECTOR_PORTS = (4000, 4001)

#: The lab sites of the detection table: every behaviour the lab offers.
TABLE_SITES: dict[str, Any] = {
    "open": "open",
    "fw": "firewall",
    "fc": "full-cone",
    "rc": "restricted-cone",
    "prc": "port-restricted-cone",
    "symr": "symmetric-random",
    "symp": "symmetric-predictable",
    "fcr": "full-cone-rewrite",
    "rcr": "restricted-cone-rewrite",
    "prcr": "port-restricted-cone-rewrite",
    "adm": {"nat": {"mapping": "adm", "filtering": "apdf"}},
    "hairpin": {"nat": {"preset": "port-restricted-cone", "hairpin": True}},
}


@dataclass(frozen=True)
class Expected:
    """What correct RFC 5780 clients must report for a site."""

    #: C{natbypass detect}: RFC 5780 mapping and filtering, "none" where there is no NAT (or no filter).
    mapping: str
    filtering: str
    port_preserving: bool
    #: coturn's client has no "no NAT" answer for these tests: it says endpoint-independent.
    coturn_mapping: str
    coturn_filtering: str
    #: "yes"/"no" for NATs (hairpinning on or off), None where there is no NAT to hairpin through.
    hairpin: str | None = None


def expected(site: SiteSpec) -> Expected:
    """The ground truth of a site's spec (L{spec.expected_summary}), and what coturn says of it."""
    truth = expected_summary(site)
    m, f = truth.mapping.value, truth.filtering.value
    if site.kind is not SiteKind.NAT:
        # coturn's client has no "no NAT" answer: it says endpoint-independent.
        ei = Mapping.ENDPOINT_INDEPENDENT.value
        return Expected(m, f, bool(truth.port_preserving), ei, ei if f == Filtering.NONE else f)
    assert site.nat is not None
    coturn_m = m
    if truth.mapping is Mapping.ADDRESS_DEPENDENT:
        # coturn's test III goes to the OTHER-ADDRESS of test II's response.  An
        # RFC 5780 server (ours) answers test II, sent to (alt IP, primary port), with
        # OTHER-ADDRESS = (primary IP, alt port), so coturn compares mappings for two
        # different IPs and calls an address-dependent NAT address-and-port-dependent.
        # (coturn's own server names (alt IP, alt port) there, so coturn agrees with itself.)
        coturn_m = Mapping.ADDRESS_AND_PORT_DEPENDENT.value
    hairpin = site.nat.hairpin
    if site.cgnat is not None:
        # Hairpinned by the carrier, the packet reaches the home NAT from the carrier's
        # public address, which the home NAT lets in only when it filters nothing.
        hairpin = site.cgnat.hairpin and site.nat.filtering is FilteringRule.EIF
    return Expected(m, f, bool(truth.port_preserving), coturn_m, f, "yes" if hairpin else "no")


_NATDISCOVERY = re.compile(r"(Endpoint Independent|Address and Port Dependent|Address Dependent) (Mapping|Filtering)")
#: What coturn prints when its second socket's request reaches the first one via the NAT.
_HAIRPIN_OK = "Received a request (maybe a successful hairpinning)"


def parse_natdiscovery(text: str) -> dict[str, str | None]:
    """C{turnutils_natdiscovery} output -> {"mapping": ..., "filtering": ..., "hairpin": ...}, None when absent."""
    out: dict[str, str | None] = {"mapping": None, "filtering": None, "hairpin": None}
    for m in _NATDISCOVERY.finditer(text):
        out[m.group(2).lower()] = m.group(1).lower().replace(" ", "-")
    if "No NAT!" in text and out["mapping"] is None:
        out["mapping"] = "endpoint-independent"
    if "-= Hairpinning Behavior Discovery =-" in text:
        section = text.split("-= Hairpinning Behavior Discovery =-", 1)[1].split("-= ", 1)[0]
        out["hairpin"] = "yes" if _HAIRPIN_OK in section else "no"
    return out


def start_mediator(lab: Lab) -> subprocess.Popen[str]:
    """Run C{twistd natbypass-mediator} on the mediator host (both addresses) and wait for it."""
    a1, a2 = lab.mediator_addresses
    argv = [
        sys.executable,
        "-m",
        "twisted",
        "--log-format=text",
        "natbypass-mediator",
        "--stun",
        f"{a1}:{STUN_PORT}",
        "--stun-alternate",
        f"{a2}:{STUN_ALT_PORT}",
        "--signal",
        f"tcp:7000:interface={a1}",
    ]
    proc = lab.spawn("mediator", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return _wait_for(proc, "STUN responder on", "natbypass-mediator")


def shared_lab(cache: dict[str, Any], spec: Any) -> Lab:
    """
    One lab of C{spec} with the mediator (STUN and signalling) running, made
    on first use and kept in C{cache} (a test module's); removed by the lab's
    own atexit handler.
    """
    if "lab" not in cache:
        lab = Lab.start(spec)
        try:
            start_mediator(lab)
        except BaseException:
            lab.stop()
            raise
        cache["lab"] = lab
    return cache["lab"]


def start_reflector(lab: Lab) -> subprocess.Popen[str]:
    """
    Run the probe reflector (C{natbypass.lab.probe serve}) on the mediator
    host, on both its addresses and L{REFLECTOR_PORTS}, and wait until it is
    ready: L{run_probes} measures against it.  The caller stops it.
    """
    a1, a2 = lab.mediator_addresses
    argv = [
        sys.executable,
        "-m",
        "natbypass.lab.probe",
        "serve",
        a1,
        a2,
        "--ports",
        ",".join(map(str, REFLECTOR_PORTS)),
    ]
    proc = lab.spawn("mediator", argv, stdout=subprocess.PIPE, text=True)
    return _wait_for(proc, "ready", "probe reflector")


def _wait_for(proc: subprocess.Popen[str], marker: str, what: str) -> subprocess.Popen[str]:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            # keep draining in the background so the pipe never fills
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc
    raise RuntimeError(f"{what} did not start:\n{''.join(seen[-20:])}")


def run_detect(lab: Lab, node: str, tcp: bool = True) -> dict[str, Any]:
    """C{natbypass detect --json [--tcp]} in C{node}."""
    argv = [sys.executable, "-m", "natbypass", "detect", "--stun", f"{lab.mediator_addresses[0]}:{STUN_PORT}", "--json"]
    if tcp:
        argv.append("--tcp")
    r = lab.exec(node, argv, timeout=60)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stderr or r.stdout).strip()[-300:] or f"exit {r.returncode}"}


def run_natdiscovery(lab: Lab, node: str, hairpin: bool = False) -> dict[str, str | None]:
    """coturn's C{turnutils_natdiscovery -m -f [-H]} in C{node}."""
    flags = ["-m", "-f"] + (["-H"] if hairpin else [])
    r = lab.exec(node, ["turnutils_natdiscovery", *flags, "-p", str(STUN_PORT), lab.mediator_addresses[0]], timeout=90)
    return parse_natdiscovery(r.stdout + r.stderr)


def run_probes(lab: Lab, node: str) -> dict[str, Any]:
    """
    The lab's own plain-socket probes (L{natbypass.lab.probe}) from C{node}
    against the reflector (L{start_reflector}): UDP and TCP mapping and
    filtering, port preservation and sequence, the public IP.
    """
    a1, a2 = lab.mediator_addresses
    p1, p2 = REFLECTOR_PORTS

    def probe(*args: str) -> dict[str, Any]:
        r = lab.exec(node, [sys.executable, "-m", "natbypass.lab.probe", *args], timeout=60)
        try:
            return json.loads(r.stdout)
        except ValueError:
            raise LabError(f"probe {args[0]} in {node} failed: {(r.stderr or r.stdout).strip()[-400:]}") from None

    udp = probe("mapping", f"{a1}:{p1}", f"{a2}:{p2}")
    tcp = probe("mapping", f"{a1}:{p1}", f"{a2}:{p2}", "--tcp")
    filt = probe("filtering", f"{a1}:{p1}")
    tcp_filt = probe("filtering", f"{a1}:{p1}", "--tcp")
    return {
        "mapping": udp.get("mapping"),
        "tcp_mapping": tcp.get("mapping"),
        "filtering": filt.get("filtering"),
        "tcp_filtering": tcp_filt.get("filtering"),
        "port_preserving": udp.get("port_preserving"),
        "port_sequence": udp.get("port_sequence"),
        "public_ip": udp.get("public_ip"),
    }


@dataclass
class Row:
    """
    One site's line of the comparison table: the configured behaviour, the
    ground truth (L{Expected}) and what the probes, C{natbypass detect} and
    coturn each reported.
    """

    site: str
    configured: str
    expected: Expected
    probe: dict[str, Any] = field(default_factory=dict)
    detect: dict[str, Any] = field(default_factory=dict)
    coturn: dict[str, str | None] = field(default_factory=dict)

    @property
    def detect_ok(self) -> bool:
        d, e = self.detect, self.expected
        return (d.get("mapping"), d.get("filtering"), d.get("tcp_mapping"), d.get("port_preserving")) == (
            e.mapping,
            e.filtering,
            e.mapping,
            e.port_preserving,
        )

    @property
    def coturn_quirk(self) -> bool:
        """True where a correct coturn answer differs from the truth (see L{expected})."""
        return self.expected.coturn_mapping != self.expected.mapping and self.expected.mapping != "none"

    @property
    def coturn_ok(self) -> bool:
        got = (self.coturn.get("mapping"), self.coturn.get("filtering"), self.coturn.get("hairpin"))
        e = self.expected
        return got == (e.coturn_mapping, e.coturn_filtering, e.hairpin)


def collect(lab: Lab, with_coturn: bool = True, with_probes: bool = True, parallel: int = 1) -> list[Row]:
    """One row per site: spec, probes, detect and (optionally) coturn; C{parallel} sites at a time."""

    def one(site: SiteSpec) -> Row:
        row = Row(site.name, describe_site(site), expected(site))
        if with_probes:
            row.probe = run_probes(lab, site.name)
        row.detect = run_detect(lab, site.name)
        if with_coturn:
            row.coturn = run_natdiscovery(lab, site.name, hairpin=site.kind is SiteKind.NAT)
        return row

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(one, lab.spec.sites))


_SHORT = {
    "endpoint-independent": "EI",
    "address-dependent": "AD",
    "address-and-port-dependent": "APD",
    "none": "none",
    None: "-",
}


def _s(x: Any) -> str:
    return _SHORT.get(x, str(x))


def markdown(rows: list[Row], with_coturn: bool = True) -> str:
    """The comparison table (EI/AD/APD = endpoint-independent / address- / address-and-port-dependent)."""
    head = [
        "site",
        "lab behaviour",
        "probe UDP map/filter",
        "probe TCP map/filter",
        "detect type",
        "detect UDP map/filter",
        "detect TCP map",
        "detect port-pres.",
        "detect ok",
    ]
    if with_coturn:
        head += ["coturn map/filter", "coturn hairpin", "coturn ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p, d, c = r.probe, r.detect, r.coturn
        cells = [
            r.site,
            f"`{r.configured}`",
            f"{_s(p.get('mapping'))} / {_s(p.get('filtering'))}"
            + (f" {p['port_sequence']}" if p.get("port_sequence") else ""),
            f"{_s(p.get('tcp_mapping'))} / {_s(p.get('tcp_filtering'))}",
            d.get("nat_type", d.get("error", "?")),
            f"{_s(d.get('mapping'))} / {_s(d.get('filtering'))}",
            _s(d.get("tcp_mapping")),
            str(d.get("port_preserving")),
            "yes" if r.detect_ok else "**NO**",
        ]
        if with_coturn:
            cells += [
                f"{_s(c.get('mapping'))} / {_s(c.get('filtering'))}",
                c.get("hairpin") or "-",
                ("yes" + (" (1)" if r.coturn_quirk else "")) if r.coturn_ok else "**NO**",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def have_coturn() -> bool:
    """
    Whether coturn's C{turnutils_natdiscovery} is installed: the coturn
    columns and tests need it and are left out without it.
    """
    return shutil.which("turnutils_natdiscovery") is not None

"""
C{natbypass lab}: build the NAT lab and use it from a shell.

    natbypass lab up 'a=full-cone,b=symmetric-random'   # or JSON, or @spec.json
    natbypass lab list
    natbypass lab show [--lab ID]
    natbypass lab exec [--lab ID] a -- python3 my_p2p_app.py
    natbypass lab exec a                                  # a shell inside site a
    natbypass lab probe [--lab ID] a b
    natbypass lab down [ID ...] | --stale | --all
    natbypass lab presets

C{--lab} may be left out when exactly one lab is running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from .lab import Lab, owner_alive, remove_lab, running_labs
from .netns import LabError, python_env
from .spec import PRESETS, SITE_PRESETS, LabSpecError, SiteKind, describe, describe_site, parse_site


def _read_spec(text: str) -> str:
    if text.startswith("@"):
        with open(text[1:]) as f:
            return f.read()
    return text


def _pick_lab(lab_id: str | None) -> Lab:
    if lab_id:
        return Lab.attach(lab_id)
    labs = sorted(running_labs())
    if len(labs) != 1:
        listing = ", ".join(labs) or "none"
        raise LabError(f"{len(labs)} labs are running ({listing}); say which with --lab ID")
    return Lab.attach(labs[0])


def _table(lab: Lab) -> list[dict[str, Any]]:
    rows = []
    for site in lab.plan.sites:
        behaviour = describe_site(site.spec)
        link = site.spec.link
        impair = ", ".join(
            f"{k} {v:g}"
            for k, v in (("delay_ms", link.delay_ms), ("jitter_ms", link.jitter_ms), ("loss_pct", link.loss_pct))
            if v
        )
        nodes = [site.border, *(h.nat for h in site.homes)] + [h for h in site.hosts if h is not site.border]
        for node in nodes:
            rows.append(
                {
                    "node": node.name,
                    "site": site.spec.name,
                    "netns": node.netns,
                    "address": node.addresses[0].split("/")[0],
                    "public": site.public_ip,  # None: an IPv6-only site
                    "address6": node.addresses6[0] if node.addresses6 else None,  # public: IPv6 is not NATed
                    "behaviour": behaviour if node is site.border else "",
                    "link": impair if node is site.border else "",
                }
            )
    return rows


def cmd_up(args: argparse.Namespace) -> int:
    """
    C{lab up}: build a persistent lab, one that outlives this command until
    C{lab down}, and print how to reach its nodes.
    """
    lab = Lab.start(_read_spec(args.spec), persistent=True)
    if args.json:
        print(json.dumps({"lab_id": lab.lab_id, "mediator": list(lab.mediator_addresses), "nodes": _table(lab)}))
    else:
        print(f"lab {lab.lab_id} is up; mediator at {' and '.join(lab.mediator_addresses)}")
        _print_table(lab)
        print(f"\nnatbypass lab exec {lab.plan.sites[0].spec.name} -- CMD ...   |   natbypass lab down {lab.lab_id}")
    return 0


def _print_table(lab: Lab) -> None:
    print(f"  {'node':<12} {'address':<13} {'public':<13} {'netns':<22} behaviour / link")
    print(
        f"  {'mediator':<12} {lab.mediator_addresses[0]:<13} {'+ ' + lab.mediator_addresses[1]:<13} {lab.netns('mediator'):<22}"
    )
    if lab.spec.ipv6:
        print(f"  {'':<12} IPv6 {lab.mediator_addresses6[0]} + {lab.mediator_addresses6[1]}")
    for r in _table(lab):
        extra = " / ".join(x for x in (r["behaviour"], r["link"], r["address6"] and f"ipv6 {r['address6']}") if x)
        print(f"  {r['node']:<12} {r['address']:<13} {r['public'] or '-':<13} {r['netns']:<22} {extra}")


def cmd_list(args: argparse.Namespace) -> int:
    """
    C{lab list}: every lab on this machine, whether it is persistent or owned
    by a process, and which are stale (their owner is gone).
    """
    labs = running_labs()
    if not labs:
        print("no labs running")
    for lab_id, state in sorted(labs.items()):
        if not state:
            status = "no state file (remove with: natbypass lab down --stale)"
        elif state.get("owner_pid") is None:
            status = "persistent"
        else:
            status = f"owned by pid {state['owner_pid']}" + ("" if owner_alive(state) else " (gone: stale)")
        sites = ", ".join(state.get("spec", {}).get("sites", {})) if state else "?"
        print(f"{lab_id}  {state.get('created', '?') if state else '?'}  {status}  sites: {sites}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """C{lab show}: the nodes, namespaces, addresses and NAT behaviours of one running lab (C{--json} for scripts)."""
    lab = _pick_lab(args.lab)
    if args.json:
        print(json.dumps({"lab_id": lab.lab_id, "mediator": list(lab.mediator_addresses), "nodes": _table(lab)}))
    else:
        print(f"lab {lab.lab_id}")
        _print_table(lab)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    """
    C{lab exec}: run a command in a node's namespace (a shell when none is
    given) with this natbypass importable; returns the command's exit status.
    """
    lab = _pick_lab(args.lab)
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:  # a shell inside the node, for people
        argv = [os.environ.get("SHELL") or "/bin/sh", "-i"]
    return subprocess.call(["ip", "netns", "exec", lab.netns(args.node), *argv], env=python_env())


def cmd_probe(args: argparse.Namespace) -> int:
    """
    C{lab probe}: measure each site's mapping and filtering from outside with
    the independent plain-socket probes, next to what its spec configured, so
    a lab NAT can be checked against its spec.
    """
    from .interop import run_probes, start_reflector

    lab = _pick_lab(args.lab)
    try:
        reflector = start_reflector(lab)
    except RuntimeError as e:
        raise LabError(f"the probe reflector did not start on the mediator (ports in use?): {e}") from None
    try:
        results = {}
        for site in args.sites or lab.sites():
            spec = lab.spec.site(site.split(".")[0])
            p = run_probes(lab, site)
            results[site] = {
                "configured": describe_site(spec),
                "udp_mapping": p["mapping"],
                "tcp_mapping": p["tcp_mapping"],
                "port_preserving": p["port_preserving"],
                "port_sequence": p["port_sequence"],
                "filtering": p["filtering"],
                "tcp_filtering": p["tcp_filtering"],
                "public_ip": p["public_ip"],
            }
    finally:
        reflector.kill()
        reflector.wait()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    short = {"endpoint-independent": "EI", "address-dependent": "AD", "address-and-port-dependent": "APD"}

    def s(x: Any) -> str:
        return short.get(x, str(x))

    print("  (EI/AD/APD: endpoint-independent / address-dependent / address-and-port-dependent)")
    print(
        f"  {'site':<10} {'configured':<26} {'UDP map':<8} {'TCP map':<8} {'UDP filter':<11} {'TCP filter':<11} "
        f"{'port-pres.':<11} sequence"
    )
    for site, r in results.items():
        print(
            f"  {site:<10} {r['configured']:<26} {s(r['udp_mapping']):<8} {s(r['tcp_mapping']):<8} "
            f"{s(r['filtering']):<11} {s(r['tcp_filtering']):<11} {str(r['port_preserving']):<11} {r['port_sequence'] or ''}"
        )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """
    C{lab down}: remove the named labs, the stale ones, all of them, or the
    only one running; with several running and none named it refuses to guess.
    """
    labs = running_labs()
    if args.all:
        targets = list(labs)
    elif args.stale:
        targets = [lab_id for lab_id, state in labs.items() if not owner_alive(state)]
    elif args.ids:
        targets = args.ids
    elif len(labs) == 1:
        targets = list(labs)
    else:
        raise LabError(f"{len(labs)} labs are running; name them, or use --stale / --all")
    for lab_id in targets:
        if lab_id not in labs:
            print(f"no lab {lab_id}", file=sys.stderr)
            continue
        remove_lab(lab_id)
        print(f"removed {lab_id}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """C{lab presets}: the named NAT types a spec may use, and the NAT fields for building other ones."""
    for name, preset in PRESETS.items():
        what = preset.value if isinstance(preset, SiteKind) else describe(preset)
        print(f"  {name:<30} {what}")
    for name in SITE_PRESETS:
        print(f"  {name:<30} {describe_site(parse_site('x', name))}")
    print(
        "\nNAT fields: mapping "
        + "|".join(m for m in ("eim-pp", "eim", "adm", "apdm-random", "apdm-sequential"))
        + ", filtering eif|adf|apdf, inbound drop|reject, hairpin true|false, udp_timeout SECONDS;"
        + " site fields cgnat NAT (a carrier NAT in series), homes N (home NATs behind it)"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    """The C{natbypass lab} argument parser; each subcommand sets C{func} to its C{cmd_*} handler."""
    p = argparse.ArgumentParser(
        prog="natbypass lab", description="Build and use the NAT lab (network namespaces, nftables)."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab that stays up until 'down'")
    up.add_argument("spec", help="JSON spec, @FILE.json, or NAME=PRESET,... (see 'presets')")
    up.add_argument("--json", action="store_true")
    up.set_defaults(func=cmd_up)
    sub.add_parser("list", help="running labs").set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="nodes, namespaces and addresses of a lab")
    show.add_argument("--lab")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    ex = sub.add_parser("exec", help="run a command in a node: exec NODE -- CMD ... (no CMD: a shell)")
    ex.add_argument("--lab")
    ex.add_argument("node", help="mediator, SITE, SITE.K (host K), SITE.nat")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)
    pr = sub.add_parser("probe", help="measure each site's mapping and filtering from outside")
    pr.add_argument("--lab")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("sites", nargs="*")
    pr.set_defaults(func=cmd_probe)
    down = sub.add_parser("down", help="remove labs")
    down.add_argument("ids", nargs="*")
    g = down.add_mutually_exclusive_group()
    g.add_argument("--all", action="store_true", help="every lab on this machine, whoever started it")
    g.add_argument("--stale", action="store_true", help="labs whose owning process is gone")
    down.set_defaults(func=cmd_down)
    sub.add_parser("presets", help="named NAT types").set_defaults(func=cmd_presets)
    return p


def run(argv: list[str]) -> int:
    """
    Entry point of C{natbypass lab}: run the chosen subcommand; lab and spec
    errors become a one-line message and exit status 1, not a traceback.
    """
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (LabError, LabSpecError, KeyError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"natbypass lab: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))

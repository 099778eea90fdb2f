"""
The C{natbypass} command: a thin dispatcher to one module per subcommand.

Each subcommand is C{module} (which exposes C{run(argv: list[str]) -> int})
or C{module:function} (a function of that signature), only imported when
asked for, so C{natbypass --help} stays fast.  C{mediator} and C{peer} run
the twistd plugins' services in the foreground (L{natbypass.app.run}).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "detect": ("natbypass.app.detect", "detect the NAT's mapping and filtering behaviour"),
    "connect": ("natbypass.app.connect", "open a direct path to a peer and exchange echoes"),
    "forward": ("natbypass.app.forward", "forward local TCP ports to what a peer exposes (like ssh -L)"),
    "pipe": ("natbypass.app.pipe", "pipe stdin to a peer and its data to stdout (like nc)"),
    "id": ("natbypass.app.id", "print this peer's identity fingerprint (creating the key if needed)"),
    "lab": ("natbypass.lab.command", "build and use the NAT lab (network namespaces)"),
    "mediator": ("natbypass.app.run:mediator", "run the mediator (twistd natbypass-mediator) in the foreground"),
    "peer": ("natbypass.app.run:peer", "run an echoing peer (twistd natbypass-peer) in the foreground"),
}

USAGE = (
    "usage: natbypass {"
    + ",".join(SUBCOMMANDS)
    + "} [options]\n\n"
    + "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items())
    + "\n\nRun 'natbypass SUBCOMMAND --help' for the options of each."
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"natbypass: unknown subcommand {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "run")(rest))


if __name__ == "__main__":
    sys.exit(main())

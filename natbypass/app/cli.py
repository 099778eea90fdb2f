"""
The ``natbypass`` command: a thin dispatcher to one module per subcommand.

Each subcommand module exposes ``run(argv: list[str]) -> int`` and is only
imported when asked for, so ``natbypass --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "detect": ("natbypass.app.detect", "detect the NAT's mapping and filtering behaviour"),
    "connect": ("natbypass.app.connect", "open a direct path to a peer and exchange echoes"),
    "lab": ("natbypass.lab.command", "build and use the NAT lab (network namespaces)"),
}

USAGE = "usage: natbypass {" + ",".join(SUBCOMMANDS) + "} [options]\n\n" + "\n".join(
    f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()
) + "\n\nRun 'natbypass SUBCOMMAND --help' for the options of each."


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
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.run(rest))


if __name__ == "__main__":
    sys.exit(main())

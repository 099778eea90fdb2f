"""
The C{natbypass id} command: print this user's identity fingerprint.

    natbypass id [--identity PATH] [--json]

The key is made (0600, atomically) when the file does not exist yet, so the
first run shows the fingerprint to give to the peers that will pin it and to
the mediator operator who may bind a token to it.  Exit status 0, 1 when the
key file cannot be used (the message says why and what to do), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TextIO

from natbypass.identity import IdentityFileError, default_identity_path, load_or_create


def parse_options(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; a bad one exits with status 2."""
    parser = argparse.ArgumentParser(
        prog="natbypass id",
        description="Print the fingerprint of this peer's identity key, creating the key if needed.",
    )
    parser.add_argument(
        "--identity",
        metavar="PATH",
        default=None,
        help=f"identity key file (default: {default_identity_path()}); created 0600 if missing",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object: fingerprint, path, created")
    return parser.parse_args(argv)


def run(argv: list[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """
    Print the fingerprint of the key at C{--identity}.

    @param argv: the arguments after C{id}.
    @param out: where the fingerprint goes (default standard output).
    @param err: where errors go (default standard error).
    @return: the exit status.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args = parse_options(argv)
    path = args.identity or default_identity_path()
    existed = os.path.lexists(path)
    try:
        identity = load_or_create(path)
    except IdentityFileError as e:
        print(f"natbypass id: {e}", file=err)
        return 1
    fingerprint = str(identity.fingerprint)
    if args.json:
        print(json.dumps({"fingerprint": fingerprint, "path": path, "created": not existed}), file=out)
    else:
        print(fingerprint, file=out)
        if not existed:
            print(f"natbypass id: created a new identity key in {path}", file=err)
    return 0

#!/usr/bin/env python3
"""
The container image's HEALTHCHECK: GET /healthz on the C{--metrics} endpoint
of the running C{natbypass} process (mediator or peer).

The endpoint is read from the process's own command line (PID 1 under
C{docker run}; any process of the container under C{--init}), so the health
check follows whatever C{--metrics} the operator gave, and a container
without C{--metrics} (a peer run for a test, C{natbypass detect}) is healthy
while it runs.  Exit status: 0 healthy, 1 unhealthy (the reason on stdout,
which C{docker inspect} shows).  Standard library only, and quick: Docker
runs it every 15 s.

    natbypass-healthcheck                       check the natbypass process found in /proc
    natbypass-healthcheck ENDPOINT              check this Twisted server endpoint string
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 4.0
#: Listening on every address means the container's loopback answers too.
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class EndpointError(ValueError):
    """A C{--metrics} value this check cannot reach (it names why)."""


@dataclass(frozen=True)
class Target:
    """Where /healthz is: a TCP host and port (C{tls}: HTTPS) or a UNIX socket path."""

    host: str = ""
    port: int = 0
    tls: bool = False
    path: str = ""


def split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """
    A Twisted endpoint string's positional and keyword arguments, with its
    quoting: C{:} separates, the first C{=} of a field makes a keyword, and a
    backslash takes the next character literally (C{interface=\\:\\:1}).
    """
    fields: list[list[str]] = [[]]
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields[-1].append("".join(current))
            fields.append([])
            current = []
        elif char == "=" and len(fields[-1]) == 0:
            fields[-1].append("".join(current))
            current = []
        else:
            current.append(char)
    fields[-1].append("".join(current))
    args = [f[0] for f in fields if len(f) == 1]
    kwargs = {f[0]: f[1] for f in fields if len(f) == 2}
    return args, kwargs


def target(description: str) -> Target:
    """Where a C{--metrics} server endpoint string listens, as seen from inside its host."""
    args, kwargs = split_endpoint(description)
    kind = args[0] if args else ""
    if kind == "unix":
        path = kwargs.get("address", args[1] if len(args) > 1 else "")
        if not path:
            raise EndpointError(f"{description!r}: no socket path")
        return Target(path=path)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise EndpointError(f"{description!r}: cannot check a {kind!r} endpoint (tcp, tcp6, ssl or unix)")
    # Positional order of Twisted's parsers: tcp/tcp6 PORT:INTERFACE:BACKLOG, ssl PORT:KEY:CERT:...
    port = kwargs.get("port", args[1] if len(args) > 1 else "")
    interface = kwargs.get("interface", args[2] if len(args) > 2 and kind != "ssl" else "")
    if kind == "tcp6" and interface == "":
        interface = "::"
    try:
        number = int(port)
    except ValueError:
        raise EndpointError(f"{description!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise EndpointError(f"{description!r}: port {number} is out of range")
    return Target(host=_WILDCARDS.get(interface, interface), port=number, tls=kind == "ssl")


def metrics_option(argv: Sequence[str]) -> str | None:
    """The last C{--metrics} value of a command line (C{--metrics X} or C{--metrics=X}), or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--metrics" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith("--metrics="):
            found = arg.partition("=")[2]
    return found


def command_lines(proc: Path = Path("/proc")) -> Iterable[list[str]]:
    """The command lines of the processes we can see, PID 1 first."""
    pids = sorted((int(p.name) for p in proc.iterdir() if p.name.isdigit()), key=lambda pid: (pid != 1, pid))
    for pid in pids:
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield raw.rstrip(b"\0").decode("utf-8", "replace").split("\0")


def find_natbypass(lines: Iterable[list[str]]) -> list[str] | None:
    """The first natbypass mediator or peer command line (C{natbypass ...} or C{twistd ...}), or None."""
    for argv in lines:
        if any(Path(a).name in ("natbypass", "twistd") for a in argv[:2]) and (
            {"mediator", "peer", "natbypass-mediator", "natbypass-peer"} & set(argv)
        ):
            return argv
    return None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def check(where: Target, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """GET /healthz: (healthy, what to say)."""
    if where.path:
        connection: http.client.HTTPConnection = _UnixConnection(where.path, timeout)
    elif where.tls:
        # Our own listener on loopback: what matters is that it answers, not its certificate.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(where.host, where.port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(where.host, where.port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read(512).decode("utf-8", "replace").strip()
    except OSError as e:
        return False, f"/healthz at {where}: {e}"
    finally:
        connection.close()
    return response.status == 200, f"/healthz: {response.status} {body}"


def main(argv: list[str]) -> int:
    """Check the endpoint named on the command line, else the natbypass process's C{--metrics}."""
    if argv:
        description: str | None = argv[0]
    else:
        process = find_natbypass(command_lines())
        if process is None:
            print("no natbypass mediator or peer process in this container")
            return 1
        description = metrics_option(process)
        if description is None:
            print("natbypass runs without --metrics: healthy while it runs")
            return 0
    try:
        where = target(description)
    except EndpointError as e:
        print(f"--metrics {e}")
        return 1
    healthy, said = check(where)
    print(said)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

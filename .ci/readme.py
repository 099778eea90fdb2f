"""
The README's Quick start commands, as CI runs them.

    python3 .ci/readme.py command setup|tests     print the command, exactly as README.md has it
    python3 .ci/readme.py check-setup CHECKOUT     run the set-up command in CHECKOUT, then check the mediator

C{check-setup} runs the set-up command with C{bash -c} in CHECKOUT (a fresh
checkout: C{.ci/run} makes one), with PATH putting the distribution's
C{/usr/bin/python3} first, in a process group of its own.  Once the mediator
answers a STUN Binding request on UDP 127.0.0.1:3478 and sends its greeting
line on TCP 127.0.0.1:7000 (its default ports), twistd gets SIGTERM (by the pid
in C{twistd.pid}; the group gets SIGKILL after 20 s).  The check fails if the
mediator did not stop cleanly (exit status 0 or 143, C{twistd.pid} removed) or
if any process of the group is left.  It needs the two ports free, and at most
C{--timeout} seconds (default 600: the command installs from PyPI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))  # natbypass.stun.message: the STUN codec, standard library only
STUN, SIGNAL = ("127.0.0.1", 3478), ("127.0.0.1", 7000)


def commands(readme: str) -> dict[str, str]:
    """The two C{sh} blocks of the Quick start section: set-up, then tests."""
    match = re.search(r"^## Quick start.*?(?=^## )", readme, re.S | re.M)
    if match is None:
        raise SystemExit("README.md has no '## Quick start' section")
    blocks = re.findall(r"^```sh\n(.*?)\n```$", match.group(0), re.S | re.M)
    if len(blocks) != 2 or any("\n" in b for b in blocks):
        raise SystemExit(f"README.md's Quick start must have two one-line sh blocks, found {blocks!r}")
    return {"setup": blocks[0], "tests": blocks[1]}


def distribution_path() -> str:
    """PATH with the distribution's python3 first."""
    return os.pathsep.join(["/usr/bin", "/bin", "/usr/sbin", "/sbin", os.environ.get("PATH", "")])


def binding_answered(timeout: float = 1.0) -> bool:
    from natbypass.stun.message import Message, MessageClass, Method, XorMappedAddress, decode

    request = Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(request.encode(), STUN)
        try:
            data, _ = s.recvfrom(2048)
        except OSError:
            return False
    reply = decode(data)
    return (
        reply.transaction_id == request.transaction_id
        and reply.cls == MessageClass.SUCCESS
        and reply.get(XorMappedAddress) is not None
    )


def greeting(timeout: float = 2.0) -> dict | None:
    try:
        with socket.create_connection(SIGNAL, timeout=timeout) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def port_free(kind: int, address: tuple[str, int]) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("0.0.0.0", address[1]))
        except OSError:
            return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def check_setup(checkout: Path, timeout: float) -> int:
    command = commands((checkout / "README.md").read_text())["setup"]
    if not Path("/usr/bin/python3").exists():
        print("readme: no /usr/bin/python3 (the distribution's Python)", file=sys.stderr)
        return 1
    busy = [
        f"{n} {a[1]}"
        for n, k, a in (("UDP", socket.SOCK_DGRAM, STUN), ("TCP", socket.SOCK_STREAM, SIGNAL))
        if not port_free(k, a)
    ]
    if busy:
        print(f"readme: ports in use ({', '.join(busy)}): the mediator's defaults must be free", file=sys.stderr)
        return 1
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYENV_VERSION")}
    env["PATH"] = distribution_path()
    print(f"readme: in {checkout}, PATH={env['PATH']}\nreadme: $ {command}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(["bash", "-c", command], cwd=checkout, env=env, start_new_session=True)
    problems: list[str] = []
    try:
        stun_ok = hello = None
        while time.monotonic() - started < timeout and proc.poll() is None:
            stun_ok = stun_ok or binding_answered()
            hello = hello or (greeting() if stun_ok else None)
            if stun_ok and hello:
                break
            time.sleep(1)
        if proc.poll() is not None:
            problems.append(f"the command ended with status {proc.returncode} before the mediator answered")
        elif not (stun_ok and hello):
            problems.append(
                f"no STUN answer / greeting after {timeout:.0f} s (STUN: {bool(stun_ok)}, greeting: {hello})"
            )
        else:
            print(
                f"readme: after {time.monotonic() - started:.0f} s the mediator answered a STUN Binding request "
                f"on UDP 3478 and greeted on TCP 7000: {json.dumps(hello)}",
                flush=True,
            )
            if hello.get("op") != "hello":
                problems.append(f"unexpected greeting {hello}")
    finally:
        if proc.poll() is None:
            # twistd (the command's last step) wrote its pid to twistd.pid in the checkout: stop it as
            # an operator would; the shell then ends with twistd's status.  Else stop the whole group.
            pidfile = checkout / "twistd.pid"
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                problems.append("no twistd.pid to stop twistd by; stopping the process group")
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                status = proc.wait(20)
            except subprocess.TimeoutExpired:
                problems.append("the mediator did not stop within 20 s of SIGTERM")
                os.killpg(proc.pid, signal.SIGKILL)
                status = proc.wait()
            # 0, or 128 + SIGTERM: after a clean shutdown twistd ends itself with the signal that stopped it.
            if status not in (0, 128 + signal.SIGTERM) and not problems:
                problems.append(f"the mediator exited with status {status} on SIGTERM")
            if pidfile.exists() and not problems:
                problems.append("twistd left twistd.pid behind")
        deadline = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_alive(proc.pid):
            problems.append("processes of the set-up command were left; killing them")
            os.killpg(proc.pid, signal.SIGKILL)
    for p in problems:
        print(f"readme: {p}", file=sys.stderr)
    if not problems:
        print("readme: the set-up command works as written; the mediator stopped cleanly on SIGTERM")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=".ci/readme.py")
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("command").add_argument("name", choices=["setup", "tests"])
    check = sub.add_parser("check-setup")
    check.add_argument("checkout", type=Path)
    check.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.what == "command":
        print(commands((HERE / "README.md").read_text())[args.name])
        return 0
    return check_setup(args.checkout.resolve(), args.timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

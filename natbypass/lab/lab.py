"""
The NAT lab as a Python object: start it from a spec, run commands in its
sites, read their addresses, tear it down.

    with Lab.start({"sites": {"a": "full-cone", "b": "symmetric-random"}}) as lab:
        lab.exec("a", ["ping", "-c1", lab.mediator_addresses[0]])

Node names: C{mediator}, C{public} (the bridge), a site name (its first
host), C{SITE.K} (host K of a NAT site's LAN) and C{SITE.nat} (the NAT).

Cleanup: a lab removes itself on C{stop()}, on leaving the C{with} block,
at interpreter exit (atexit) and on SIGTERM/SIGHUP; a lab left behind by a
killed process is removed by C{natbypass lab down --stale} (its owner is
gone) or C{--all}.  A lab started with C{persistent=True} (C{natbypass lab
up}) outlives its process and is removed by C{natbypass lab down ID}.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from . import netns as _netns
from .interfaces import ILab
from .spec import LabSpec, loads, parse_spec, spec_to_json
from .topology import MEDIATOR_ADDRESSES, MEDIATOR_ADDRESSES6, LabPlan, new_lab_id, plan

#: Where each lab records what it needs to be found and removed by another process.
STATE_DIR = "/run/natbypass-lab"

_live: dict[str, Lab] = {}
_live_lock = threading.Lock()
_handlers_installed = False


def _as_spec(spec: LabSpec | dict[str, Any] | str) -> LabSpec:
    if isinstance(spec, LabSpec):
        return spec
    if isinstance(spec, str):
        return loads(spec)
    return parse_spec(spec)


def state_path(lab_id: str) -> str:
    """The state file of lab C{lab_id}: how another process (C{natbypass lab}) finds a lab it did not start."""
    return os.path.join(STATE_DIR, f"{lab_id}.json")


def read_state(lab_id: str) -> dict[str, Any] | None:
    """
    The recorded state of lab C{lab_id}, or None when its state file is
    missing, unreadable or not JSON, so such a lab can still be listed and
    removed.
    """
    try:
        with open(state_path(lab_id)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stop_all_live() -> None:
    with _live_lock:
        labs = list(_live.values())
    for lab in labs:
        if not lab.persistent:
            lab.stop()


def _install_handlers() -> None:
    """Tear labs down at exit and on SIGTERM/SIGHUP, then let the old handler run."""
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_stop_all_live)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)

        def handler(num: int, frame: Any, previous: Any = previous) -> None:
            _stop_all_live()
            if callable(previous):
                previous(num, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(num, signal.SIG_DFL)
                os.kill(os.getpid(), num)

        signal.signal(signum, handler)


@implementer(ILab)
class Lab:
    """A running lab; build one with L{start} (or L{attach} to a running one)."""

    log = Logger()

    def __init__(self, spec: LabSpec, lab_plan: LabPlan, persistent: bool = False) -> None:
        self.spec = spec
        self.plan = lab_plan
        self.lab_id = lab_plan.lab_id
        self.persistent = persistent
        self._procs: list[subprocess.Popen[Any]] = []
        self._wire_pids: list[int] = []
        self._stopped = False

    # -- life cycle ---------------------------------------------------------

    @classmethod
    def start(cls, spec: LabSpec | dict[str, Any] | str, *, lab_id: str | None = None, persistent: bool = False) -> Lab:
        """Build a lab from C{spec} (LabSpec, JSON-shaped dict, or JSON/preset text)."""
        why = _netns.missing_requirements()
        if why:
            raise _netns.LabError(why)
        parsed = _as_spec(spec)
        if lab_id is None:
            taken = set(_netns.lab_netns())
            lab_id = new_lab_id()
            while lab_id in taken or os.path.exists(state_path(lab_id)):
                lab_id = new_lab_id()
        lab = cls(parsed, plan(parsed, lab_id), persistent)
        os.makedirs(STATE_DIR, exist_ok=True)
        _install_handlers()
        with _live_lock:
            _live[lab.lab_id] = lab
        lab._write_state()  # before building: a crash mid-build still leaves a way to clean up
        try:
            wires = _netns.build(lab.plan, log_path=os.path.join(STATE_DIR, f"{lab.lab_id}.log"))
            lab._wire_pids = [w.pid for w in wires]
            lab._procs.extend(wires)
            lab._write_state()
        except BaseException:
            lab.stop()
            raise
        return lab

    @classmethod
    def attach(cls, lab_id: str) -> Lab:
        """The running lab C{lab_id} (started by another process), from its state file."""
        state = read_state(lab_id)
        if state is None:
            raise _netns.LabError(f"no lab {lab_id!r} (no {state_path(lab_id)}); see 'natbypass lab list'")
        spec = parse_spec(state["spec"])
        lab = cls(spec, plan(spec, lab_id), persistent=True)
        lab._wire_pids = list(state.get("wire_pids", []))
        return lab

    def _write_state(self) -> None:
        state = {
            "lab_id": self.lab_id,
            "spec": spec_to_json(self.spec),
            "owner_pid": None if self.persistent else os.getpid(),
            "wire_pids": self._wire_pids,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = state_path(self.lab_id) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, state_path(self.lab_id))

    def stop(self) -> None:
        """Kill everything in the lab and delete its namespaces; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + 1.0
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        names = sorted({n.netns for n in self.plan.nodes} | set(_netns.lab_netns(self.lab_id).get(self.lab_id, [])))
        _netns.destroy(names)  # wires end up in the public namespace: killed with it
        for suffix in (".json", ".log"):
            try:
                os.unlink(os.path.join(STATE_DIR, self.lab_id + suffix))
            except FileNotFoundError:
                pass
        with _live_lock:
            _live.pop(self.lab_id, None)
        self.log.info("lab {lab_id} removed", lab_id=self.lab_id)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ----------------------------------------------------------

    @property
    def mediator_addresses(self) -> tuple[str, str]:
        return MEDIATOR_ADDRESSES

    @property
    def mediator_addresses6(self) -> tuple[str, str]:
        """The mediator's two IPv6 addresses (present when a site of the spec has IPv6)."""
        if not self.spec.ipv6:
            raise _netns.LabError('this lab has no IPv6: give a site "ip": "v6" or "dual"')
        return MEDIATOR_ADDRESSES6

    def public_address(self, site: str) -> str | None:
        """The site's public IPv4 address (None: an IPv6-only site)."""
        return self.plan.site(site.split(".")[0]).public_ip

    def address(self, node: str) -> str:
        return self.plan.node(node).addresses[0].split("/")[0]

    def address6(self, node: str) -> str:
        """The IPv6 address of C{node} (public: IPv6 is never NATed); LabError when it has none."""
        found = self.plan.node(node).addresses6
        if not found:
            raise _netns.LabError(f"lab node {node!r} has no IPv6 address")
        return found[0]

    def netns(self, node: str) -> str:
        return self.plan.node(node).netns

    def sites(self) -> list[str]:
        return [s.spec.name for s in self.plan.sites]

    # -- running things -----------------------------------------------------

    def _argv(self, node: str, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv must be a list of strings, not one string")
        return ["ip", "netns", "exec", self.netns(node), *argv]

    def exec(
        self, node: str, argv: Sequence[str], timeout: float = 60, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._argv(node, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
            env=_netns.python_env(),
        )

    def spawn(self, node: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        popen_kwargs.setdefault("env", _netns.python_env())
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        popen_kwargs["start_new_session"] = True  # its own process group, killed as one at stop()
        proc = subprocess.Popen(self._argv(node, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc


def running_labs() -> dict[str, dict[str, Any]]:
    """Every lab with namespaces present, with its state (or {} when the state file is gone)."""
    return {lab_id: read_state(lab_id) or {} for lab_id in _netns.lab_netns()}


def owner_alive(state: dict[str, Any]) -> bool:
    """Whether the process that owns a (non-persistent) lab still runs."""
    pid = state.get("owner_pid")
    if state and pid is None:
        return True  # persistent: alive until 'lab down'
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_lab(lab_id: str) -> None:
    """Remove lab C{lab_id} whoever started it (for C{lab down})."""
    names = _netns.lab_netns(lab_id).get(lab_id, [])
    _netns.destroy(names)  # the wires live in the public namespace, so this kills them too
    for suffix in (".json", ".log"):
        try:
            os.unlink(os.path.join(STATE_DIR, lab_id + suffix))
        except FileNotFoundError:
            pass

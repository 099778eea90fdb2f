#!/usr/bin/env python3
"""
Stream benchmarks of issue 10, in the NAT lab: NATbypass streams (udp and tcp
paths) side by side with plain kernel TCP and C{ssh -L}, in one run.

    sudo python3 bench/stream_bench.py [--bytes 100000000] [--rounds 3] [--json OUT]

Two labs, one after the other, each with two full-cone NAT sites C{a} (the
sender) and C{b} (the receiver) and the lab's mediator:

  1. plain links (no delay: CPU is the limit):
     - throughput of one stream: natbypass udp, natbypass tcp, kernel TCP to a
       DNAT'd port on b, and the same bytes through C{ssh -L} (sshd on b's
       host behind a DNAT'd port, ssh in a) and through C{natbypass forward -L}
       on each path (to C{natbypass peer --expose} in b); MB/s and CPU s/MB;
     - 100 concurrent streams of 1 MB, and 100 concurrent kernel-TCP
       connections of 1 MB through C{natbypass forward}, every sha256 checked;
     - memory per idle stream: RSS of both peers with C{--idle} idle streams;
     - integrity: C{--fault-bytes} across 5% loss each way on b's link, on a
       stream and through C{natbypass forward}, on each path;
     - liveness: the serving peer SIGKILLed under an open stream, seconds
       until the opener's stream ends (bound: 3 keepalive intervals);
  2. b's link impaired: C{--delay} ms each way (the lab's wire), C{--rate}
     Mbit/s each way (tc tbf, L{labextra.set_rate}), 0/1/5% loss each way
     (counted per packet), TSO/GSO/GRO off on the link; goodput of natbypass
     udp/tcp and kernel TCP (C{--cc}, and BBR) sending for C{--seconds}, with
     the senders' TCP retransmits and, with C{--quic-stats}, qh3's own
     congestion window, bytes in flight, RTT and losses.

Needs root, the lab's tools, OpenSSH and ethtool (installed with apt if missing).
Every process runs in the lab's namespaces, which are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import labextra  # noqa: E402

from natbypass.lab import netns  # noqa: E402
from natbypass.lab.lab import Lab  # noqa: E402
from natbypass.lab.traversal import Scenario, mediator_endpoint, stun_address  # noqa: E402

PEER = [sys.executable, os.path.join(HERE, "stream_peer.py")]
TCP_PORT = 15201  # kernel TCP sink on b, DNAT'd
SSH_PORT = 2222  # sshd on b, DNAT'd
SSH_SINK = 15202  # the sink ssh -L forwards to, on b's loopback
SSH_LOCAL = 15203  # ssh -L's listening port on a's loopback
FWD_SINK = 15204  # the sink `natbypass peer --expose` forwards to, on b's loopback
FWD_LOCAL = {"udp": 15205, "tcp": 15206}  # `natbypass forward -L` listening ports on a's loopback, per path
NATBYPASS = [sys.executable, "-m", "natbypass"]
TICK = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def proc_cpu(pid: int) -> float:
    """User + system seconds of one process (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError):
        return 0.0


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def read_event(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next JSON line on C{proc}'s stdout, within C{timeout}."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"process {proc.args[4:6]} ended (exit {proc.wait()}); see its .err file")
            try:
                return json.loads(line)
            except ValueError:
                continue
        elif proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
    raise TimeoutError(f"no event within {timeout} s")


class Bench:
    """One lab with a mediator, a serving peer and (optionally) the baselines, and the runs in it."""

    def __init__(self, lab: Lab, workdir: str, keepalive: float) -> None:
        self.lab = lab
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.keepalive = keepalive
        self.scenario = Scenario(lab, workdir=workdir)
        self.scenario.start_mediator()
        self.runs = 0
        self.ssh_pid: int | None = None
        self.fwd_peer: subprocess.Popen[bytes] | None = None
        self.forwarders: dict[str, subprocess.Popen[bytes]] = {}

    def peer_argv(self, mode: str, peer_id: str, *extra: str) -> list[str]:
        return [
            *PEER,
            mode,
            "--mediator",
            mediator_endpoint(),
            "--stun",
            stun_address(),
            "--id",
            peer_id,
            "--identity",
            os.path.join(self.workdir, f"id-{peer_id}.pem"),
            "--keepalive",
            str(self.keepalive),
            *extra,
        ]

    def spawn(self, node: str, argv: list[str], name: str) -> subprocess.Popen[str]:
        err = open(os.path.join(self.workdir, f"{name}.err"), "ab")
        return self.lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=err, text=True)

    def spawn_logged(self, node: str, argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], str]:
        """Start a chatty process with stdout and stderr in one file (a pipe nobody drains would stall it)."""
        path = os.path.join(self.workdir, f"{name}.out")
        out = open(path, "ab")
        return self.lab.spawn(node, argv, stdout=out, stderr=subprocess.STDOUT), path

    def serve(self, peer_id: str, *extra: str) -> tuple[subprocess.Popen[str], int]:
        proc = self.spawn("b", self.peer_argv("serve", peer_id, *extra), f"serve-{peer_id}")
        event = read_event(proc, 60)
        return proc, int(event["pid"])

    def run(self, argv: list[str], timeout: float) -> dict[str, Any]:
        """Run a sender in a; its C{result} event (or C{{"error": ...}})."""
        done = self.lab.exec("a", argv, timeout=timeout)
        for line in reversed(done.stdout.splitlines()):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "result":
                return event
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}

    def send(self, server: str, protocol: str, timeout: float = 300, **opts: Any) -> dict[str, Any]:
        self.runs += 1
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if v is not None]
        argv = self.peer_argv("send", f"alice{self.runs}", "--peer", server, "--protocol", protocol, *extra)
        return self.run(argv + [f"--timeout={timeout}"], timeout + 60)

    # -- baselines --------------------------------------------------------------

    def start_tcp(self) -> str:
        """The kernel-TCP sink on b behind a DNAT'd port; returns the address a sends to."""
        public = labextra.forward_port(self.lab, "b", TCP_PORT)
        proc = self.spawn("b", [*PEER, "tcp-sink", "--listen", f"0.0.0.0:{TCP_PORT}"], "tcp-sink")
        read_event(proc, 20)
        return f"{public}:{TCP_PORT}"

    def start_ssh(self) -> str | None:
        """sshd on b (throwaway keys) behind a DNAT'd port, ssh -L in a; returns the local address to send to."""
        sshd, ssh, keygen = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh"), shutil.which("ssh-keygen")
        if not (os.path.exists(sshd) and ssh and keygen):
            return None
        d = os.path.join(self.workdir, "ssh")
        os.makedirs(d, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)
        for name in ("host", "user"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/{name}"], check=True)
        shutil.copy(f"{d}/user.pub", f"{d}/authorized_keys")
        with open(f"{d}/sshd_config", "w") as f:
            f.write(
                f"Port {SSH_PORT}\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nPidFile none\nAllowTcpForwarding yes\n"
            )
        public = labextra.forward_port(self.lab, "b", SSH_PORT)
        sink = self.spawn("b", [*PEER, "tcp-sink", "--listen", f"127.0.0.1:{SSH_SINK}"], "ssh-sink")
        read_event(sink, 20)
        err = open(os.path.join(self.workdir, "sshd.err"), "ab")
        self.lab.spawn("b", [sshd, "-D", "-e", "-f", f"{d}/sshd_config"], stderr=err)
        time.sleep(0.5)
        err = open(os.path.join(self.workdir, "ssh.err"), "ab")
        ssh_proc = self.lab.spawn(
            "a",
            [
                ssh, "-N", "-i", f"{d}/user", "-p", str(SSH_PORT),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{SSH_LOCAL}:127.0.0.1:{SSH_SINK}",
                f"root@{public}",
            ],
            stderr=err,
        )  # fmt: skip
        for _ in range(100):
            out = self.lab.exec("a", ["ss", "-Htln", f"sport = :{SSH_LOCAL}"]).stdout
            if out.strip():
                self.ssh_pid = ssh_proc.pid
                return f"127.0.0.1:{SSH_LOCAL}"
            if ssh_proc.poll() is not None:
                return None
            time.sleep(0.1)
        return None

    def start_exposing(self) -> None:
        """On b: a sink on loopback and C{natbypass peer --expose} of it (the far end of C{natbypass forward})."""
        sink = self.spawn("b", [*PEER, "tcp-sink", "--listen", f"127.0.0.1:{FWD_SINK}"], "fwd-sink")
        read_event(sink, 20)
        argv = [
            *NATBYPASS, "peer", "--mediator", mediator_endpoint(), "--stun", stun_address(), "--id", "fwdbob",
            "--identity", os.path.join(self.workdir, "id-fwdbob.pem"), "--keepalive", str(self.keepalive),
            "--expose", f"127.0.0.1:{FWD_SINK}", "--allow-any",
        ]  # fmt: skip
        self.fwd_peer, _ = self.spawn_logged("b", argv, "fwd-peer")

    def start_forward(self, protocol: str) -> str | None:
        """
        C{natbypass forward -L} in a over the C{protocol} path to b's exposed
        sink; returns the local address to send to once a 1 MB warm-up went
        through intact (the path is then open), or None.
        """
        port = FWD_LOCAL[protocol]
        argv = [
            *NATBYPASS, "forward", "--mediator", mediator_endpoint(), "--stun", stun_address(),
            "--id", f"fwd{protocol}", "--identity", os.path.join(self.workdir, f"id-fwd{protocol}.pem"),
            "--known-peers", os.path.join(self.workdir, f"known-{protocol}"), "--peer", "fwdbob",
            "--protocol", protocol, "--json", "-L", f"127.0.0.1:{port}:127.0.0.1:{FWD_SINK}",
        ]  # fmt: skip
        proc, out = self.spawn_logged("a", argv, f"forward-{protocol}")
        self.forwarders[protocol] = proc
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            with open(out) as f:
                if '"listening"' in f.read():
                    break
            time.sleep(0.2)
        else:
            return None
        target = f"127.0.0.1:{port}"
        for _ in range(5):
            warm = self.tcp_send(target, bytes=1_000_000, timeout=60)
            if warm.get("intact"):
                return target
            log(f"forward {protocol} warm-up: {json.dumps(warm)}")
            time.sleep(2)
        return None

    def forward_cpu(self, protocol: str) -> tuple[float, float]:
        """CPU seconds so far of C{natbypass forward} (in a) and of C{natbypass peer --expose} (in b)."""
        return proc_cpu(self.forwarders[protocol].pid), proc_cpu(self.fwd_peer.pid)

    def ssh_cpu(self) -> tuple[float, float]:
        """CPU seconds so far of ssh (in a) and of every sshd process (in b)."""
        a = proc_cpu(self.ssh_pid) if self.ssh_pid else 0.0
        b = 0.0
        for pid in netns.netns_pids(self.lab.netns("b")):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip().startswith("sshd"):
                        b += proc_cpu(pid)
            except OSError:
                pass
        return a, b

    def tcp_send(self, target: str, timeout: float = 300, **opts: Any) -> dict[str, Any]:
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if v is not None]
        return self.run([*PEER, "tcp-send", "--connect", target, f"--timeout={timeout}", *extra], timeout + 30)


def add_relay_cpu(res: dict[str, Any], near: str, near_s: float, far: str, far_s: float) -> None:
    """Count a relay's CPU (ssh/sshd, forward/peer) with its end's sender or sink, keeping each part."""
    res["app_cpu_s"], res["app_peer_cpu_s"] = res.get("cpu_s", 0), res.get("peer_cpu_s", 0)
    res[f"{near}_cpu_s"], res[f"{far}_cpu_s"] = round(near_s, 3), round(far_s, 3)
    if "cpu_s" in res:
        res["cpu_s"] += round(near_s, 3)
        res["peer_cpu_s"] += round(far_s, 3)


def forward_targets(bench: Bench) -> dict[str, str | None]:
    """Start (once) the exposing peer on b and a C{natbypass forward -L} per path in a; their local addresses."""
    if bench.fwd_peer is None:
        bench.start_exposing()
        time.sleep(2)  # its registration with the mediator
    targets = {}
    for protocol in ("udp", "tcp"):
        if protocol not in bench.forwarders:
            targets[protocol] = bench.start_forward(protocol)
            if targets[protocol] is None:
                log(f"natbypass forward over {protocol} could not be set up; see the workdir's forward-{protocol}.out")
        else:
            targets[protocol] = f"127.0.0.1:{FWD_LOCAL[protocol]}"
    return targets


def per_mb(cpu_s: float, nbytes: int) -> float:
    return cpu_s / (nbytes / 1e6) if nbytes else float("nan")


def throughput(bench: Bench, args: argparse.Namespace, results: dict[str, Any]) -> None:
    tcp_target = bench.start_tcp()
    ssh_target = None if args.no_ssh else bench.start_ssh()
    if not args.no_ssh and ssh_target is None:
        log("ssh -L could not be set up; see the workdir's ssh.err / sshd.err")
    fwd = forward_targets(bench)
    rows: dict[str, list[dict[str, Any]]] = {
        "natbypass-udp": [],
        "natbypass-tcp": [],
        "forward -L udp": [],
        "forward -L tcp": [],
        "ssh -L": [],
        "kernel-tcp": [],
    }
    for r in range(args.rounds):
        for method in rows:
            if method.startswith("natbypass"):
                res = bench.send("bob", method.split("-")[1], bytes=args.bytes)
            elif method == "kernel-tcp":
                res = bench.tcp_send(tcp_target, bytes=args.bytes)
            elif method.startswith("forward"):
                protocol = method.split()[-1]
                if fwd.get(protocol) is None:
                    continue
                a0, b0 = bench.forward_cpu(protocol)
                res = bench.tcp_send(fwd[protocol], bytes=args.bytes)
                a1, b1 = bench.forward_cpu(protocol)
                add_relay_cpu(res, "forward", a1 - a0, "expose", b1 - b0)
            else:
                if ssh_target is None:
                    continue
                a0, b0 = bench.ssh_cpu()
                res = bench.tcp_send(ssh_target, bytes=args.bytes)
                a1, b1 = bench.ssh_cpu()
                add_relay_cpu(res, "ssh", a1 - a0, "sshd", b1 - b0)
            res["round"] = r
            rows[method].append(res)
            log(f"throughput {method} round {r}: {json.dumps(res)}")
    results["throughput"] = rows


def summarize_throughput(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    out = [
        "| method | runs ok | MB/s median [min-max] | sender CPU s/MB | receiver CPU s/MB | sha256 intact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, runs in rows.items():
        ok = [r for r in runs if "mb_s" in r]
        if not runs:
            continue
        if not ok:
            out.append(f"| {method} | 0/{len(runs)} | - | - | - | {runs[0].get('error', '')[:200]} |")
            continue
        rates = [r["mb_s"] for r in ok]
        snd = statistics.median(per_mb(r["cpu_s"], r["bytes"]) for r in ok)
        rcv = statistics.median(per_mb(r["peer_cpu_s"], r["bytes"]) for r in ok)
        intact = sum(r["intact"] for r in ok)
        out.append(
            f"| {method} | {len(ok)}/{len(runs)} | {statistics.median(rates):.1f} [{min(rates):.1f}-{max(rates):.1f}] "
            f"| {snd:.4f} | {rcv:.4f} | {intact}/{len(ok)} |"
        )
    return out


def many_streams(bench: Bench, args: argparse.Namespace, results: dict[str, Any]) -> None:
    for path in ("udp", "tcp"):
        res = bench.send("bob", path, streams=100, bytes=1_000_000, timeout=180)
        log(f"many streams {path}: {json.dumps(res)}")
        results[f"many_{path}"] = res
    for path, target in forward_targets(bench).items():
        if target is None:
            continue
        # 100 kernel-TCP connections at once into natbypass forward, each its own stream, each 1 MB hashed.
        res = bench.tcp_send(target, streams=100, bytes=1_000_000, timeout=180)
        log(f"many forwarded connections {path}: {json.dumps(res)}")
        results[f"many_forward_{path}"] = res


def idle_memory(bench: Bench, args: argparse.Namespace, results: dict[str, Any], server_pid: int) -> None:
    for path in ("udp", "tcp"):
        bench.runs += 1
        argv = bench.peer_argv(
            "idle",
            f"alice{bench.runs}",
            "--peer",
            "bob",
            "--protocol",
            path,
            "--streams",
            str(args.idle),
            "--hold",
            "2",
        )
        proc = bench.spawn("a", argv, f"idle-{path}")
        try:
            base = read_event(proc, 60)
            server_before = proc_rss_kb(server_pid)
            opened = read_event(proc, 120)
            server_after = proc_rss_kb(server_pid)
            res = {
                "streams": opened["streams"],
                "limit": opened["error"],
                "opener_rss_before_kb": base["rss_kb"],
                "opener_rss_after_kb": opened["rss_kb"],
                "opener_bytes_per_stream": opened["per_stream_bytes"],
                "server_rss_before_kb": server_before,
                "server_rss_after_kb": server_after,
                "server_bytes_per_stream": round((server_after - server_before) * 1024 / max(1, opened["streams"])),
            }
            read_event(proc, 30)
        except (RuntimeError, TimeoutError) as e:
            res = {"error": str(e)}
        proc.wait(timeout=30)
        log(f"idle {path}: {json.dumps(res)}")
        results[f"idle_{path}"] = res


def integrity(bench: Bench, args: argparse.Namespace, results: dict[str, Any]) -> None:
    targets = forward_targets(bench)
    labextra.set_loss(bench.lab, "b", 5)
    try:
        for path in ("udp", "tcp"):
            res = bench.send("bob", path, bytes=args.fault_bytes, timeout=args.fault_timeout)
            log(f"integrity {path} 5% loss: {json.dumps(res)}")
            results[f"integrity_{path}"] = res
        for path, target in targets.items():
            if target is None:
                continue
            res = bench.tcp_send(target, bytes=args.fault_bytes, timeout=args.fault_timeout)
            res["link"] = labextra.loss_counters(bench.lab, "b")
            log(f"integrity forward {path} 5% loss: {json.dumps(res)}")
            results[f"integrity_forward_{path}"] = res
    finally:
        labextra.set_loss(bench.lab, "b", 0)


def liveness(bench: Bench, args: argparse.Namespace, results: dict[str, Any]) -> None:
    bound = 3 * bench.keepalive
    for path in ("udp", "tcp"):
        server, pid = bench.serve(f"victim{path}")
        bench.runs += 1
        argv = bench.peer_argv(
            "watch", f"alice{bench.runs}", "--peer", f"victim{path}", "--protocol", path, f"--timeout={bound + 30}"
        )
        watcher = bench.spawn("a", argv, f"watch-{path}")
        try:
            opened = read_event(watcher, 60)
            time.sleep(1.0)
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            lost = read_event(watcher, bound + 40)
            res = {
                "path": opened.get("path"),
                "seconds": round(lost["lost_at"] - killed, 2),
                "bound_s": bound,
                "reason": lost["reason"],
            }
        except (RuntimeError, TimeoutError) as e:
            res = {"error": str(e), "bound_s": bound}
        watcher.wait(timeout=30)
        server.wait(timeout=5)
        log(f"liveness {path}: {json.dumps(res)}")
        results[f"liveness_{path}"] = res


def tcp_snmp(lab: Lab, node: str) -> dict[str, int]:
    """The Tcp: line of /proc/net/snmp in C{node}'s namespace (OutSegs, RetransSegs, ...)."""
    lines = [line.split() for line in lab.exec(node, ["cat", "/proc/net/snmp"]).stdout.splitlines()]
    tcp = [x for x in lines if x and x[0] == "Tcp:"]
    if len(tcp) < 2:
        return {}
    return {k: int(v) for k, v in zip(tcp[0][1:], tcp[1][1:])}


def tcp_default_cc(lab: Lab, node: str) -> str:
    return lab.exec(node, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).stdout.strip()


def impaired(bench: Bench, args: argparse.Namespace, results: dict[str, Any]) -> None:
    tcp_target = bench.start_tcp()
    labextra.set_rate(bench.lab, "b", args.rate)
    # The namespaces' default (natbypass's TLS/TCP path): a child namespace may only pick an allowed one
    # (here reno or bbr), so cubic falls back to reno; the kernel-TCP sender sets its own with setsockopt.
    for node in ("a", "b"):
        for cc in (args.cc, "reno"):
            if bench.lab.exec(node, ["sysctl", "-qw", f"net.ipv4.tcp_congestion_control={cc}"]).returncode == 0:
                break
    results["cc"] = {node: tcp_default_cc(bench.lab, node) for node in ("a", "b")}
    log(f"impaired: congestion control kernel-tcp {args.cc}, namespaces {json.dumps(results['cc'])}")
    results["offloads"] = labextra.set_offloads(bench.lab, "b", args.offloads == "on")
    log(f"impaired link offloads: {json.dumps(results['offloads'])}")
    rows = []
    for loss in [0.0] + [float(x) for x in args.losses.split(",") if x]:
        for r in range(args.impaired_rounds):
            cell: dict[str, Any] = {"loss_pct": loss, "round": r}
            for method in args.impaired_methods.split(","):
                labextra.set_loss(bench.lab, "b", loss)  # fresh counters for each run
                before = tcp_snmp(bench.lab, "a")
                if method.startswith("kernel-tcp"):
                    cc = "bbr" if method.endswith("bbr") else args.cc
                    res = bench.tcp_send(tcp_target, seconds=args.seconds, timeout=args.seconds * 20, cc=cc)
                else:
                    stats = {"quic_stats": 0.5} if args.quic_stats and method == "natbypass-udp" else {}
                    res = bench.send(
                        "bob", method.split("-")[1], seconds=args.seconds, timeout=args.seconds * 20, **stats
                    )
                after = tcp_snmp(bench.lab, "a")
                res["link"] = labextra.loss_counters(bench.lab, "b")
                if method != "natbypass-udp" and before and after:
                    res["tcp_out_segs"] = after["OutSegs"] - before["OutSegs"]
                    res["tcp_retrans_segs"] = after["RetransSegs"] - before["RetransSegs"]
                cell[method] = res
                log(f"impaired loss {loss}% {method}: {json.dumps(res)}")
            rows.append(cell)
    labextra.set_loss(bench.lab, "b", 0)
    results["impaired"] = rows


def summarize_impaired(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| loss each way | packets dropped / seen (data way) | kernel TCP MB/s [range] | natbypass udp MB/s [range] "
        "| udp / kernel | natbypass tcp MB/s [range] | tcp / kernel | kernel TCP bbr MB/s | intact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for loss in sorted({c["loss_pct"] for c in rows}):
        cells = [c for c in rows if c["loss_pct"] == loss]

        methods = ("kernel-tcp", "natbypass-udp", "natbypass-tcp", "kernel-tcp-bbr")

        def med(method: str, cells: list[dict[str, Any]] = cells) -> float | None:
            xs = [c[method]["mb_s"] for c in cells if "mb_s" in c.get(method, {})]
            return statistics.median(xs) if xs else None

        def rng(method: str, cells: list[dict[str, Any]] = cells) -> str:
            xs = [c[method]["mb_s"] for c in cells if "mb_s" in c.get(method, {})]
            return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]" if xs else "-"

        k, u, t = med("kernel-tcp"), med("natbypass-udp"), med("natbypass-tcp")
        intact = sum(c.get(m, {}).get("intact", 0) for c in cells for m in methods)
        seen = sum(c[m].get("link", {}).get("in", {}).get("seen_packets", 0) for c in cells for m in methods if m in c)
        lost = sum(
            c[m].get("link", {}).get("in", {}).get("dropped_packets", 0) for c in cells for m in methods if m in c
        )
        drop = f"{lost}/{seen} = {100 * lost / seen:.2f}%" if seen else "-"

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"

        def ratio(x: float | None, k: float | None = k) -> str:
            return "-" if x is None or not k else f"{x / k:.2f}x"

        out.append(
            f"| {loss:g}% | {drop} | {rng('kernel-tcp')} | {rng('natbypass-udp')} | {ratio(u)} | {rng('natbypass-tcp')} "
            f"| {ratio(t)} | {fmt(med('kernel-tcp-bbr'))} | {intact}/{sum(m in c for c in cells for m in methods)} |"
        )
    return out


def profile_udp(bench: Bench, args: argparse.Namespace) -> None:
    """One udp transfer with both ends under cProfile; prints where the time goes."""
    import pstats

    prof_dir = os.path.join(bench.workdir, "profile")
    os.makedirs(prof_dir, exist_ok=True)
    server, _ = bench.serve("profbob", f"--profile={prof_dir}/receiver.prof")
    res = bench.send("profbob", "udp", bytes=args.bytes // 2, profile=f"{prof_dir}/sender.prof")
    log(f"profiled udp run: {json.dumps(res)}")
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=20)
    for side in ("sender", "receiver"):
        path = f"{prof_dir}/{side}.prof"
        if os.path.exists(path):
            print(f"\n### cProfile, udp {side} (top 25 by own time)\n", flush=True)
            pstats.Stats(path, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def ensure_ssh() -> None:
    if os.path.exists("/usr/sbin/sshd") and shutil.which("ssh"):
        return
    log("installing openssh-server and openssh-client with apt")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server", "openssh-client"], env=env, check=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=int, default=100_000_000, help="bytes per throughput run")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (each method once per round)")
    p.add_argument("--delay", type=float, default=25.0, help="impaired link: one-way delay, ms")
    p.add_argument("--rate", type=float, default=20.0, help="impaired link: Mbit/s each way")
    p.add_argument("--losses", default="1,5", help="impaired link: loss percentages each way (0 is always run)")
    p.add_argument("--seconds", type=float, default=10.0, help="impaired link: seconds each sender sends")
    p.add_argument("--impaired-rounds", type=int, default=3)
    p.add_argument("--impaired-methods", default="kernel-tcp,kernel-tcp-bbr,natbypass-udp,natbypass-tcp")
    p.add_argument(
        "--offloads",
        choices=["off", "on"],
        default="off",
        help="TSO/GSO/GRO on the impaired link's devices (off: every protocol loses MTU-sized packets)",
    )
    p.add_argument(
        "--cc",
        default="cubic",
        help="impaired link: TCP congestion control in both sites' hosts (Linux's default cubic; this "
        "machine's own default is bbr, which ignores random loss); kernel-tcp-bbr runs with bbr anyway",
    )
    p.add_argument("--quic-stats", action="store_true", help="debug: sample qh3's recovery state in udp runs")
    p.add_argument("--idle", type=int, default=250, help="idle streams for the memory figure")
    p.add_argument("--fault-bytes", type=int, default=100_000_000, help="bytes across the 5%% loss link")
    p.add_argument("--fault-timeout", type=float, default=600.0)
    p.add_argument("--keepalive", type=float, default=5.0, help="peers' keepalive interval (liveness bound 3x)")
    p.add_argument("--only", default="throughput,many,idle,integrity,liveness,impaired,profile")
    p.add_argument("--no-ssh", action="store_true")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    why = netns.missing_requirements(tun=True)
    if why:
        log(f"stream_bench: {why}")
        return 2
    if not args.no_ssh:
        ensure_ssh()
    only = set(args.only.split(","))
    results: dict[str, Any] = {"args": vars(args), "machine": f"{platform.platform()}, {os.cpu_count()} CPUs"}
    workdir = tempfile.mkdtemp(prefix="natbypass-streambench-")
    log(f"stream_bench: logs in {workdir}")
    started = time.monotonic()
    lab_ids: list[str] = []
    if only & {"throughput", "many", "idle", "integrity", "liveness", "profile"}:
        with Lab.start({"sites": {"a": "full-cone", "b": "full-cone"}}) as lab:
            lab_ids.append(lab.lab_id)
            bench = Bench(lab, os.path.join(workdir, "plain"), args.keepalive)
            _, server_pid = bench.serve("bob")
            if "throughput" in only:
                throughput(bench, args, results)
            if "many" in only:
                many_streams(bench, args, results)
            if "idle" in only:
                idle_memory(bench, args, results, server_pid)
            if "integrity" in only:
                integrity(bench, args, results)
            if "liveness" in only:
                liveness(bench, args, results)
            if "profile" in only:
                profile_udp(bench, args)
    if "impaired" in only:
        spec = {"sites": {"a": "full-cone", "b": {"nat": "full-cone", "delay_ms": args.delay}}}
        with Lab.start(spec) as lab:
            lab_ids.append(lab.lab_id)
            bench = Bench(lab, os.path.join(workdir, "impaired"), args.keepalive)
            bench.serve("bob")
            impaired(bench, args, results)
    left = {k: v for k, v in netns.lab_netns().items() if k in lab_ids}
    results["elapsed_s"] = round(time.monotonic() - started)
    print(f"\nMachine: {results['machine']}; Python {platform.python_version()}; {results['elapsed_s']} s in all.")
    if "throughput" in results:
        print(f"\n### Throughput of one stream, {args.bytes / 1e6:g} MB, no added delay, {args.rounds} rounds\n")
        print("\n".join(summarize_throughput(results["throughput"])))
    for key in (
        "many_udp",
        "many_tcp",
        "many_forward_udp",
        "many_forward_tcp",
        "idle_udp",
        "idle_tcp",
        "integrity_udp",
        "integrity_tcp",
        "integrity_forward_udp",
        "integrity_forward_tcp",
    ):
        if key in results:
            print(f"\n{key}: {json.dumps(results[key])}")
    for key in ("liveness_udp", "liveness_tcp"):
        if key in results:
            print(f"\n{key}: {json.dumps(results[key])}")
    if "impaired" in results:
        print(
            f"\n### Goodput, b's link: {args.delay:g} ms each way, {args.rate:g} Mbit/s each way, "
            f"{args.seconds:g} s of sending per run\n"
        )
        print("\n".join(summarize_impaired(results["impaired"])))
    print(f"\nnamespaces of this run's labs ({', '.join(lab_ids)}) left: {sum(len(v) for v in left.values())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

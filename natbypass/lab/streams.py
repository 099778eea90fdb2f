"""
Streams and their applications in the NAT lab: C{natbypass forward},
C{natbypass pipe} and a twisted.web page behind a C{natbypass:} endpoint
string, run as real processes in the lab's namespaces, every byte
sha256-checked.

Used by C{tests/test_lab_streams.py} and C{bench/streams_matrix.py}.  The
serving site runs C{twistd natbypass-peer --expose sink=127.0.0.1:PORT
--allow FILE} next to a tiny TCP server (L{SINK}: it answers each connection
with the sha256 of what it read, once the client half-closes); the other site
runs C{natbypass forward -L 0:sink} and, in the same namespace, L{CLIENT}
(connections at once through the forwarded port, each checking the digest it
gets back).  Everything the processes say is parsed from their output, as a
user would read it.

Also runnable, for the web-page proof (each in its own lab namespace)::

    python3 -m natbypass.lab.streams web-serve --mediator EP --id bob --identity PEM --allow FILE --size N
    python3 -m natbypass.lab.streams web-get --mediator EP --id alice --identity PEM --known-peers PATH --peer bob

C{web-serve} prints C{{"event": "ready", "sha256": ..., "size": ...}} once the
Site listens on the C{natbypass:web} server endpoint; C{web-get} fetches
C{http://PEER/} through a C{natbypass:PEER:web} client endpoint with Agent and
prints the status, the body's length and sha256 and the stream address the
server saw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .traversal import NATBYPASS, Scenario, _wait_for, mediator_endpoint

#: The TCP server on the serving side: one thread per connection reads until
#: EOF and answers the sha256 (hex) of what it read.  Binds once, prints its port.
SINK = r"""
import hashlib, socket, socketserver, sys
class H(socketserver.BaseRequestHandler):
    def handle(self):
        h = hashlib.sha256()
        while True:
            b = self.request.recv(262144)
            if not b:
                break
            h.update(b)
        self.request.sendall(h.hexdigest().encode())
        self.request.shutdown(socket.SHUT_WR)
class S(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128
s = S(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""

#: The client on the forwarding side: COUNT connections at once to
#: 127.0.0.1:PORT, SIZE random bytes each, half-close, read the answer.  Prints
#: one JSON object: every connection's sent digest, answer and seconds.
CLIENT = r"""
import hashlib, json, os, socket, sys, threading, time
port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
results = [None] * count
def one(i):
    t0 = time.monotonic()
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    answer = b""
    error = None
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while True:
            b = s.recv(65536)
            if not b:
                break
            answer += b
        s.close()
    except OSError as e:
        error = repr(e)
    results[i] = {"sha256": digest, "answer": answer.decode(errors="replace"), "error": error,
                  "seconds": time.monotonic() - t0}
t0 = time.monotonic()
threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"seconds": time.monotonic() - t0, "size": size, "results": results}))
"""


def sha256_file(path: str) -> str:
    """The sha256 (hex) of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Lines:
    """A process's output lines, read by a thread so a caller can wait for one with a timeout."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_json(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON line whose C{event} is C{event} (others are kept in L{lines})."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {event!r} event within {timeout} s; got {self.lines[-10:]}") from None
            if line is None:
                raise RuntimeError(f"the process ended before a {event!r} event; it said {self.lines[-10:]}")
            self.lines.append(line)
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict) and parsed.get("event") == event:
                return parsed

    def rest(self, timeout: float = 10) -> list[str]:
        """Every line until the end of the output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return self.lines

    def events(self) -> list[dict[str, Any]]:
        """The JSON objects among the lines read so far."""
        out = []
        for line in self.lines:
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                out.append(parsed)
        return out


@dataclass
class SendResult:
    """What L{CLIENT} reported: every connection's digest, answer and error; L{intact} when all match."""

    seconds: float
    size: int
    results: list[dict[str, Any]]

    @property
    def intact(self) -> int:
        """How many connections got back the digest of what they sent."""
        return sum(1 for r in self.results if r["error"] is None and r["answer"] == r["sha256"])

    @property
    def mb_per_s(self) -> float:
        return len(self.results) * self.size / 1e6 / self.seconds if self.seconds else 0.0


@dataclass
class Forward:
    """A running C{natbypass forward --json} in a lab node and its C{-L} ports."""

    scenario: StreamScenario
    node: str
    proc: subprocess.Popen[str]
    output: _Lines
    ports: list[int] = field(default_factory=list)

    def send(self, count: int, size: int, port_index: int = 0, timeout: float = 90) -> SendResult:
        """Run L{CLIENT} in the forwarding node: C{count} connections of C{size} bytes at once."""
        port = self.ports[port_index]
        done = self.scenario.lab.exec(
            self.node, [sys.executable, "-c", CLIENT, str(port), str(count), str(size)], timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"the client failed ({done.returncode}): {done.stderr[-2000:]}")
        report = json.loads(done.stdout)
        return SendResult(report["seconds"], report["size"], report["results"])

    def stop(self, timeout: float = 20) -> tuple[int, list[dict[str, Any]]]:
        """Ctrl-C it, as a user would; its exit status and every JSON event it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.output.rest()
        return code, self.output.events()


@dataclass
class PipeResult:
    """Both ends of one C{natbypass pipe} transfer: exit statuses, stderr, and whether each way arrived intact."""

    sender_code: int
    listener_code: int
    sender_err: str
    listener_err: str
    forward_intact: bool
    back_intact: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.sender_code == 0 and self.listener_code == 0 and self.forward_intact and self.back_intact

    def summary(self) -> str:
        """One line a person can read when it failed."""
        return (
            f"sender exit {self.sender_code}, listener exit {self.listener_code}, "
            f"to listener {'intact' if self.forward_intact else 'CORRUPT/MISSING'}, "
            f"back {'intact' if self.back_intact else 'CORRUPT/MISSING'} in {self.seconds:.1f} s; "
            f"sender stderr: {self.sender_err[-600:]!r}; listener stderr: {self.listener_err[-600:]!r}"
        )


class StreamScenario(Scenario):
    """
    A L{Scenario} for streams: per-site client keys the serving side allows
    (one allow file for all, written before any peer starts), sinks, serving
    peers that expose them, and the forward, pipe and web runs.
    """

    def client_identity(self, node: str) -> str:
        """The key every client process of C{node} uses (ids differ per run; the allow file lists the key)."""
        return os.path.join(self.workdir, f"client-{node.replace('.', '_')}.pem")

    def write_allow(self, nodes: Sequence[str]) -> str:
        """An allow file with the client keys of C{nodes} (made now if missing); its path."""
        from natbypass.identity import load_or_create

        path = os.path.join(self.workdir, "allow")
        with open(path, "w") as f:
            for node in nodes:
                f.write(f"{load_or_create(self.client_identity(node)).fingerprint}\n")
        return path

    def start_sink(self, node: str) -> int:
        """Start L{SINK} in C{node}; the port it listens on (127.0.0.1)."""
        proc = self.lab.spawn(node, [sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the sink in {node} did not start: {line!r}")
        return int(line)

    def start_server(self, node: str, peer_id: str, sink_port: int, allow: str) -> subprocess.Popen[Any]:
        """A C{natbypass-peer} in C{node} exposing the sink as C{sink}, to the keys in C{allow}."""
        return self.start_peer(node, peer_id, "--expose", f"sink=127.0.0.1:{sink_port}", "--allow", allow)

    def client_argv(self, command: str, node: str, my_id: str, *extra: str) -> list[str]:
        """A C{natbypass COMMAND} line of a client process in C{node}: its own id, the site's key."""
        return [
            *NATBYPASS,
            command,
            "--mediator",
            mediator_endpoint(),
            "--id",
            my_id,
            "--identity",
            self.client_identity(node),
            "--known-peers",
            os.path.join(self.workdir, f"known_peers-{my_id}"),
            *extra,
        ]

    def forward(
        self, node: str, my_id: str, peer_id: str, protocol: str, targets: Sequence[str] = ("sink",)
    ) -> Forward:
        """Start C{natbypass forward --json -L 0:TARGET...} in C{node}; returns once every -L listens."""
        argv = self.client_argv("forward", node, my_id, "--peer", peer_id, "--protocol", protocol, "--json")
        for target in targets:
            argv += ["-L", f"0:{target}"]
        proc = self.lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fwd = Forward(self, node, proc, _Lines(proc.stdout))
        try:
            for _ in targets:
                fwd.ports.append(int(fwd.output.wait_json("listening", 30)["address"].rsplit(":", 1)[1]))
        except BaseException:
            fwd.stop()
            raise
        return fwd

    def pipe(
        self,
        src: str,
        dst: str,
        tag: str,
        protocol: str,
        size: int,
        back: int = 0,
        timeout: float = 90,
        listener_grace: float = 10,
    ) -> PipeResult:
        """
        C{natbypass pipe --listen} in C{dst} (id C{TAG-dst}, only from C{TAG-src}),
        then C{natbypass pipe --peer} from C{src}: C{size} random bytes to the
        listener and C{back} bytes back at the same time; both sha256-checked.
        """
        ids = {node: f"{tag}-{node.replace('.', '_')}" for node in (src, dst)}
        files = {}
        for name, n in (("to", size), ("back", back)):
            path = os.path.join(self.workdir, f"{tag}.{name}.in")
            with open(path, "wb") as f:
                f.write(os.urandom(n))
            files[name] = path
        out_at_dst = os.path.join(self.workdir, f"{tag}.to.out")
        out_at_src = os.path.join(self.workdir, f"{tag}.back.out")
        err_dst = os.path.join(self.workdir, f"{tag}.listener.err")
        started = time.monotonic()
        listen_argv = self.client_argv(
            "pipe", dst, ids[dst], "--listen", "--peer", ids[src], "--no-progress", "--allow", self.allow_path
        )
        with open(files["back"], "rb") as fin, open(out_at_dst, "wb") as fout, open(err_dst, "wb") as ferr:
            listener = self.lab.spawn(dst, listen_argv, stdin=fin, stdout=fout, stderr=ferr)
        try:
            _wait_for(err_dst, "waiting for a peer", 30, listener)
            send_argv = self.client_argv(
                "pipe", src, ids[src], "--peer", ids[dst], "--protocol", protocol, "--no-progress"
            )
            with open(files["to"], "rb") as fin, open(out_at_src, "wb") as fout:
                sender = self.lab.spawn(src, send_argv, stdin=fin, stdout=fout, stderr=subprocess.PIPE, text=True)
                try:
                    _, sender_err = sender.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    sender.kill()
                    _, sender_err = sender.communicate()
            try:
                listener_code = listener.wait(timeout=listener_grace)
            except subprocess.TimeoutExpired:
                listener.kill()
                listener_code = listener.wait()
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
        with open(err_dst, errors="replace") as f:
            listener_err = f.read()
        return PipeResult(
            sender.returncode,
            listener_code,
            sender_err,
            listener_err,
            sha256_file(out_at_dst) == sha256_file(files["to"]),
            sha256_file(out_at_src) == sha256_file(files["back"]),
            time.monotonic() - started,
        )

    @property
    def allow_path(self) -> str:
        return os.path.join(self.workdir, "allow")

    def web_serve(self, node: str, peer_id: str, size: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        """Start L{web_serve} in C{node}; the process and its C{ready} event (the body's sha256)."""
        argv = [
            sys.executable,
            "-m",
            "natbypass.lab.streams",
            "web-serve",
            "--mediator",
            mediator_endpoint(),
            "--id",
            peer_id,
            "--identity",
            self.identity_path(peer_id),
            "--allow",
            self.allow_path,
            "--size",
            str(size),
        ]
        proc = self.lab.spawn(node, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = _Lines(proc.stdout)
        try:
            ready = lines.wait_json("ready", 30)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc, ready

    def web_get(self, node: str, my_id: str, peer_id: str, protocol: str, timeout: float = 60) -> dict[str, Any]:
        """Run L{web_get} in C{node}; its result event (or a C{failed} one)."""
        argv = [
            sys.executable,
            "-m",
            "natbypass.lab.streams",
            "web-get",
            "--mediator",
            mediator_endpoint(),
            "--id",
            my_id,
            "--identity",
            self.client_identity(node),
            "--known-peers",
            os.path.join(self.workdir, f"known_peers-{my_id}"),
            "--peer",
            peer_id,
            "--protocol",
            protocol,
        ]
        done = self.lab.exec(node, argv, timeout=timeout)
        for line in reversed(done.stdout.splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return {"event": "failed", "reason": f"exit {done.returncode}, stderr {done.stderr[-2000:]!r}"}


# ------------------------------------------------------------- web-serve / web-get


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mediator", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--identity", required=True)


def web_serve(args: argparse.Namespace) -> None:
    """Serve a Site of C{--size} random bytes on C{natbypass:web:...}; print C{ready} with its sha256."""
    from twisted.internet import defer, task
    from twisted.internet.endpoints import serverFromString
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from natbypass.endpoints import server_string

    body = os.urandom(args.size)

    class Body(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            peer = request.transport.getPeer()
            request.setHeader(b"x-peer", f"{peer.peer_id} {peer.service} {peer.path}".encode())
            return body

    async def main(reactor: Any) -> None:
        string = server_string("web", mediator=args.mediator, id=args.id, identity=args.identity, allow=args.allow)
        await serverFromString(reactor, string).listen(Site(Body()))
        ready = {"event": "ready", "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        print(json.dumps(ready), flush=True)
        await defer.Deferred()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def web_get(args: argparse.Namespace) -> None:
    """Fetch C{http://PEER/} through a C{natbypass:PEER:web} client endpoint; print what came back."""
    from twisted.internet import defer, task
    from twisted.internet.endpoints import clientFromString
    from twisted.web.client import Agent, readBody
    from twisted.web.iweb import IAgentEndpointFactory
    from zope.interface import implementer

    from natbypass.endpoints import client_string

    @implementer(IAgentEndpointFactory)
    class ToPeers:
        def __init__(self, reactor: Any) -> None:
            self.reactor = reactor

        def endpointForURI(self, uri: Any) -> Any:
            string = client_string(
                uri.host.decode(),
                "web",
                mediator=args.mediator,
                id=args.id,
                identity=args.identity,
                known_peers=args.known_peers,
                protocol=args.protocol,
            )
            return clientFromString(self.reactor, string)

    async def main(reactor: Any) -> None:
        started = reactor.seconds()
        try:
            agent = Agent.usingEndpointFactory(reactor, ToPeers(reactor))
            response = await agent.request(b"GET", f"http://{args.peer}/".encode()).addTimeout(45, reactor)
            body = await readBody(response)
        except Exception as e:
            print(json.dumps({"event": "failed", "reason": f"{type(e).__name__}: {e}"}), flush=True)
            return
        x_peer = response.headers.getRawHeaders(b"x-peer", [b""])[0].decode()
        result = {
            "event": "fetched",
            "code": response.code,
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "x_peer": x_peer,
            "seconds": round(reactor.seconds() - started, 3),
        }
        print(json.dumps(result), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def main(argv: Sequence[str] | None = None) -> None:
    """C{python3 -m natbypass.lab.streams web-serve|web-get ...} (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python3 -m natbypass.lab.streams")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("web-serve", help="serve a page of random bytes on natbypass:web")
    _common(serve)
    serve.add_argument("--allow", required=True)
    serve.add_argument("--size", type=int, default=200_000)
    get = sub.add_parser("web-get", help="fetch http://PEER/ through natbypass:PEER:web")
    _common(get)
    get.add_argument("--known-peers", required=True)
    get.add_argument("--peer", required=True)
    get.add_argument("--protocol", default="auto")
    args = p.parse_args(argv)
    if args.command == "web-serve":
        web_serve(args)
    else:
        web_get(args)


if __name__ == "__main__":
    main()

"""
Lab probes: measure a NAT's mapping and filtering from outside, with plain
sockets, independently of NATbypass's own STUN code.

A *reflector* runs on the mediator host on two addresses x two ports (UDP and
TCP) and answers each request with the source address:port it saw, from the
socket the request asks for (same, other port, other address, both), after an
optional delay.  Clients run inside a site:

    python3 -m natbypass.lab.probe serve 198.18.0.2 198.18.0.3 --ports 4000,4001
    python3 -m natbypass.lab.probe mapping 198.18.0.2:4000 198.18.0.3:4001 [--tcp]
    python3 -m natbypass.lab.probe filtering 198.18.0.2:4000 [--tcp]
    python3 -m natbypass.lab.probe listen 198.18.0.2:4000 --seconds 5   # learn mapping, answer anyone
    python3 -m natbypass.lab.probe send IP:PORT [--tcp]                # reply / timeout / refused
    python3 -m natbypass.lab.probe rtt 198.18.0.2:4000 --count 200      # RTT and loss

Each client prints one JSON object.  The wire format is one text line per
datagram (see L{encode} / L{decode}).

The classification here (mapping, filtering, port sequence) is deliberately
a second, independent implementation of what L{natbypass.nat} and
L{natbypass.stun.discovery} define: it is the ground truth the lab tests hold
the product to, so it must not share the product's code or vocabulary
module.  It speaks the same RFC 4787 terms as plain strings.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import secrets
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from twisted.logger import Logger

MAGIC = "NBP1"
REPLY_FROM = ("same", "port", "addr", "both")
MAX_DELAY_MS = 600_000


class ProbeDecodeError(ValueError):
    """A datagram is not a valid probe message."""


@dataclass(frozen=True)
class Request:
    """
    Ask the reflector for the source address it sees, answered from the socket
    C{reply_from} names (L{reply_socket}) after C{delay_ms}: the mapping,
    filtering and mapping-lifetime tests differ only in these fields.
    """

    txid: str  # 16 hex digits
    reply_from: str = "same"  # one of REPLY_FROM
    delay_ms: int = 0


@dataclass(frozen=True)
class Response:
    """
    The reflector's answer: the source address:port it saw (the mapping the
    NAT made), matched to its request by C{txid}.
    """

    txid: str
    ip: str  # the source address the reflector saw
    port: int


#: Where a knock comes from: the reflector's other address, or its own address with a new port.
KNOCK_FROM = ("port", "addr")


@dataclass(frozen=True)
class Knock:
    """Ask the reflector to open a TCP connection to C{ip:port} (a TCP filtering test)."""

    txid: str
    knock_from: str  # one of KNOCK_FROM
    ip: str
    port: int


Message = Request | Response | Knock


def encode(msg: Message) -> bytes:
    """One probe message as one ASCII line (the inverse of L{decode})."""
    if isinstance(msg, Request):
        return f"{MAGIC} REQ {msg.txid} {msg.reply_from} {msg.delay_ms}\n".encode()
    if isinstance(msg, Knock):
        return f"{MAGIC} KNK {msg.txid} {msg.knock_from} {msg.ip} {msg.port}\n".encode()
    return f"{MAGIC} RSP {msg.txid} {msg.ip} {msg.port}\n".encode()


def _txid(text: str) -> str:
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ProbeDecodeError(f"bad txid {text!r}")
    return text


def _int(text: str, low: int, high: int, what: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 7:
        raise ProbeDecodeError(f"bad {what} {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise ProbeDecodeError(f"{what} {value} out of range")
    return value


def _ipv4(text: str) -> str:
    try:
        ip = str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ProbeDecodeError(f"bad address {text!r}") from None
    if ip != text:
        raise ProbeDecodeError(f"non-canonical address {text!r}")
    return ip


def decode(data: bytes) -> Message:
    """Parse one probe message; raises ProbeDecodeError on anything else."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ProbeDecodeError("not ASCII") from None
    if text.endswith("\n"):
        text = text[:-1]
    parts = text.split(" ")
    if len(parts) not in (5, 6) or parts[0] != MAGIC:
        raise ProbeDecodeError("not a probe message")
    kind, txid = parts[1], _txid(parts[2])
    if (kind == "KNK") != (len(parts) == 6):
        raise ProbeDecodeError(f"wrong field count for {kind!r}")
    if kind == "KNK":
        if parts[3] not in KNOCK_FROM:
            raise ProbeDecodeError(f"bad knock_from {parts[3]!r}")
        return Knock(txid, parts[3], _ipv4(parts[4]), _int(parts[5], 1, 65535, "port"))
    if kind == "REQ":
        if parts[3] not in REPLY_FROM:
            raise ProbeDecodeError(f"bad reply_from {parts[3]!r}")
        return Request(txid, parts[3], _int(parts[4], 0, MAX_DELAY_MS, "delay"))
    if kind == "RSP":
        return Response(txid, _ipv4(parts[3]), _int(parts[4], 0, 65535, "port"))
    raise ProbeDecodeError(f"unknown kind {kind!r}")


def new_txid() -> str:
    """
    A random 16-hex-digit transaction id, so each answer is matched to its own
    request and late answers to earlier ones are told apart.
    """
    return secrets.token_hex(8)


def reply_socket(
    received_on: tuple[str, int], reply_from: str, addresses: Sequence[str], ports: Sequence[int]
) -> tuple[str, int]:
    """Which reflector socket answers a request that arrived on C{received_on}."""
    addr, port = received_on
    other_addr = addresses[1] if addr == addresses[0] else addresses[0]
    other_port = ports[1] if port == ports[0] else ports[0]
    return {
        "same": (addr, port),
        "port": (addr, other_port),
        "addr": (other_addr, port),
        "both": (other_addr, other_port),
    }[reply_from]


# -- classification (pure) -----------------------------------------------------


def classify_mapping(
    observed: dict[tuple[str, int], tuple[str, int]], primary: tuple[str, int], alternate: tuple[str, int]
) -> str:
    """RFC 5780 section 4.3: compare the mappings seen by the reflector's sockets."""
    a1, p1 = primary
    a2, p2 = alternate
    base = observed[(a1, p1)]
    if observed[(a2, p1)] == base and observed[(a2, p2)] == base:
        return "endpoint-independent"
    if observed[(a1, p2)] == base and observed[(a2, p1)] == observed[(a2, p2)]:
        return "address-dependent"
    return "address-and-port-dependent"


def port_sequence(ports: Sequence[int]) -> str:
    """C{sequential(+d)} if successive ports step by one small constant, else C{random}."""
    deltas = {(b - a) % 65536 for a, b in zip(ports, ports[1:])}
    if len(ports) >= 3 and len(deltas) == 1:
        (d,) = deltas
        if 0 < d <= 16:
            return f"sequential(+{d})"
    return "random"


def classify_filtering(arrived: set[str]) -> str:
    """RFC 5780 section 4.4 from which of the four replies came back."""
    if "same" not in arrived:
        return "blocked"
    if "both" in arrived or "addr" in arrived:
        return "endpoint-independent"
    if "port" in arrived:
        return "address-dependent"
    return "address-and-port-dependent"


# -- reflector (Twisted) ---------------------------------------------------------


class ReflectorUDP(DatagramProtocol):
    """One reflector socket: decode, pick the answering socket, answer after the asked delay."""

    log = Logger()

    def __init__(self, reflector: Reflector, local: tuple[str, int]) -> None:
        self.reflector = reflector
        self.local = local

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            req = decode(data)
        except ProbeDecodeError as e:
            self.log.debug("dropped datagram from {addr}: {error}", addr=addr, error=str(e))
            return
        if isinstance(req, Request):
            self.reflector.answer(self.local, req, addr)
        elif isinstance(req, Knock):
            self.reflector.knock(self.local, req)


class ReflectorTCP(Protocol):
    """Write the address the connection came from, then close (the reflector closes first)."""

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.transport.write(encode(Response("0" * 16, peer.host, peer.port)))
        self.transport.loseConnection()


class KnockTCP(Protocol):
    """A connect-back: say who we are (the prober sees it anyway), then close."""

    def __init__(self, txid: str) -> None:
        self.txid = txid

    def connectionMade(self) -> None:
        me = self.transport.getHost()
        self.transport.write(encode(Response(self.txid, me.host, me.port)))
        self.transport.loseConnection()


class Reflector:
    """The reflector's sockets (every address x port, UDP and TCP) and its answering rule."""

    def __init__(self, reactor: Any, addresses: Sequence[str], ports: Sequence[int]) -> None:
        if len(addresses) != 2 or len(ports) != 2 or addresses[0] == addresses[1] or ports[0] == ports[1]:
            raise ValueError("the reflector needs two different addresses and two different ports")
        self.reactor = reactor
        self.addresses = tuple(addresses)
        self.ports = tuple(ports)
        self.sockets: dict[tuple[str, int], ReflectorUDP] = {}

    def listen(self) -> None:
        factory = Factory.forProtocol(ReflectorTCP)
        for a in self.addresses:
            for p in self.ports:
                proto = ReflectorUDP(self, (a, p))
                self.reactor.listenUDP(p, proto, interface=a)
                self.sockets[(a, p)] = proto
                self.reactor.listenTCP(p, factory, interface=a)

    def knock(self, local: tuple[str, int], req: Knock) -> None:
        """Connect to C{req.ip:req.port} from the other address, or from this one on a new port."""
        source = local[0] if req.knock_from == "port" else reply_socket(local, "addr", self.addresses, self.ports)[0]
        factory = ClientFactory.forProtocol(lambda: KnockTCP(req.txid))
        self.reactor.connectTCP(req.ip, req.port, factory, timeout=3, bindAddress=(source, 0))

    def answer(self, local: tuple[str, int], req: Request, addr: tuple[str, int]) -> None:
        out = self.sockets[reply_socket(local, req.reply_from, self.addresses, self.ports)]
        payload = encode(Response(req.txid, addr[0], addr[1]))
        self.reactor.callLater(req.delay_ms / 1000, out.transport.write, payload, addr)


def serve(addresses: Sequence[str], ports: Sequence[int]) -> None:
    """Run the reflector until killed; prints C{ready} once listening."""
    from twisted.internet import reactor

    Reflector(reactor, addresses, ports).listen()
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()  # type: ignore[attr-defined]


# -- clients (plain sockets) -------------------------------------------------------


def _endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    try:
        return str(ipaddress.IPv4Address(host)), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}") from None


def _udp_socket(local_port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", local_port))
    return s


def messages_until(s: socket.socket, deadline: float) -> Iterator[tuple[Any, tuple[str, int]]]:
    """
    Decoded probe messages arriving on C{s} until C{deadline} (monotonic
    clock), with their source; ICMP errors and undecodable datagrams skipped.
    """
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(2048)
        except TimeoutError:
            return
        except ConnectionRefusedError:
            continue
        try:
            msg = decode(data)
        except ProbeDecodeError:
            continue
        yield msg, addr


def udp_ask(
    s: socket.socket, server: tuple[str, int], reply_from: str = "same", *, tries: int = 3, wait: float = 0.5
) -> Response | None:
    """Send one request (retransmitted C{tries} times) and return its response, or None."""
    req = Request(new_txid(), reply_from)
    for _ in range(tries):
        s.sendto(encode(req), server)
        deadline = time.monotonic() + wait
        for msg, _ in messages_until(s, deadline):
            if isinstance(msg, Response) and msg.txid == req.txid:
                return msg
    return None


def tcp_ask(server: tuple[str, int], local_port: int = 0, timeout: float = 2.0) -> tuple[Response | None, int]:
    """Connect from C{local_port} (0: any) and read the address the reflector saw."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    try:
        s.bind(("0.0.0.0", local_port))
        local_port = s.getsockname()[1]
        s.connect(server)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        msg = decode(data)
        return (msg if isinstance(msg, Response) else None), local_port
    except (OSError, ProbeDecodeError):
        return None, local_port
    finally:
        s.close()


def measure_mapping(primary: tuple[str, int], alternate: tuple[str, int], tcp: bool = False) -> dict[str, Any]:
    """Mapping seen from the reflector's four sockets, in a fixed order, from one local port."""
    a1, p1 = primary
    a2, p2 = alternate
    order = [(a1, p1), (a1, p2), (a2, p1), (a2, p2)]
    if tcp:
        # The first connection picks the port; the others reuse it (SO_REUSEADDR,
        # and the reflector closes first, so no TIME_WAIT is left on this side).
        first, local_port = tcp_ask(order[0])
        answers = {order[0]: first}
        answers.update({dst: tcp_ask(dst, local_port)[0] for dst in order[1:]})
    else:
        s = _udp_socket()
        local_port = s.getsockname()[1]
        answers = {dst: udp_ask(s, dst) for dst in order}
        s.close()
    result: dict[str, Any] = {"protocol": "tcp" if tcp else "udp", "local_port": local_port}
    result["observed"] = {f"{d[0]}:{d[1]}": (f"{r.ip}:{r.port}" if r else None) for d, r in answers.items()}
    if any(r is None for r in answers.values()):
        result["mapping"] = "no-answer"
        return result
    observed = {d: (r.ip, r.port) for d, r in answers.items() if r}
    result["mapping"] = classify_mapping(observed, primary, alternate)
    result["public_ip"] = observed[(a1, p1)][0]
    result["port_preserving"] = observed[(a1, p1)][1] == local_port
    result["ports"] = [observed[d][1] for d in order]
    # Only symmetric mappings open a new port per destination; their order is what predicts the next one.
    result["port_sequence"] = (
        port_sequence(result["ports"]) if result["mapping"] == "address-and-port-dependent" else None
    )
    return result


def measure_filtering(primary: tuple[str, int], settle: float = 1.0) -> dict[str, Any]:
    """Ask the reflector for replies from each of its sockets; see which get through."""
    s = _udp_socket()
    arrived: set[str] = set()
    for _ in range(3):  # rounds, for lossy links
        pending = {new_txid(): how for how in REPLY_FROM if how not in arrived}
        if not pending:
            break
        for txid, how in pending.items():
            s.sendto(encode(Request(txid, how)), primary)
        deadline = time.monotonic() + settle
        for msg, _ in messages_until(s, deadline):
            if isinstance(msg, Response) and msg.txid in pending:
                arrived.add(pending[msg.txid])
    s.close()
    return {"filtering": classify_filtering(arrived), "arrived": sorted(arrived)}


def _reusable_tcp(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", port))
    return s


def measure_tcp_filtering(primary: tuple[str, int], wait: float = 1.5) -> dict[str, Any]:
    """
    TCP filtering: open a mapping by connecting out from port P (which also
    listens), then ask the reflector to connect back to the mapped address
    from a new port of the same address, and from its other address.
    """
    listener = _reusable_tcp(0)
    port = listener.getsockname()[1]
    listener.listen(8)
    out = _reusable_tcp(port)  # same port: the mapping the knocks are aimed at
    out.settimeout(3)
    try:
        out.connect(primary)
        data = b""
        while not data.endswith(b"\n"):
            chunk = out.recv(256)
            if not chunk:
                break
            data += chunk
        mapped = decode(data)
    except (OSError, ProbeDecodeError) as e:
        return {"filtering": "no-answer", "error": str(e)}
    finally:
        out.close()
    if not isinstance(mapped, Response):
        return {"filtering": "no-answer"}
    udp = _udp_socket()
    arrived: set[str] = set()
    for how in KNOCK_FROM:
        txid = new_txid()
        udp.sendto(encode(Knock(txid, how, mapped.ip, mapped.port)), primary)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            listener.settimeout(left)
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                break
            conn.settimeout(1)
            try:
                msg = decode(conn.recv(256))
            except (OSError, ProbeDecodeError):
                msg = None
            conn.close()
            if isinstance(msg, Response) and msg.txid == txid:
                arrived.add(how)
                break
    udp.close()
    listener.close()
    arrived.add("same")  # the outbound connection itself worked
    return {
        "filtering": classify_filtering(arrived),
        "arrived": sorted(arrived - {"same"}),
        "mapped": f"{mapped.ip}:{mapped.port}",
        "local_port": port,
    }


def listen(server: tuple[str, int], seconds: float, local_port: int = 0) -> int:
    """Learn this socket's public mapping, print it, then answer anyone for C{seconds}."""
    s = _udp_socket(local_port)
    me = udp_ask(s, server)
    print(json.dumps({"local_port": s.getsockname()[1], "public": f"{me.ip}:{me.port}" if me else None}), flush=True)
    deadline = time.monotonic() + seconds
    for msg, addr in messages_until(s, deadline):
        if isinstance(msg, Request):
            s.sendto(encode(Response(msg.txid, addr[0], addr[1])), addr)
            print(json.dumps({"from": f"{addr[0]}:{addr[1]}"}), flush=True)
    return 0


def send(
    target: tuple[str, int], tcp: bool = False, wait: float = 1.0, local_port: int = 0, delay_ms: int = 0
) -> dict[str, Any]:
    """One request to C{target}: did it answer, time out, or refuse (ICMP / RST)?

    C{delay_ms} asks a reflector to answer that much later (mapping lifetime tests).
    """
    if tcp:
        s = socket.socket()
        s.settimeout(wait)
        try:
            s.connect(target)
            return {"result": "connected"}
        except ConnectionRefusedError:
            return {"result": "refused"}
        except TimeoutError:
            return {"result": "timeout"}
        except OSError as e:
            return {"result": "error", "error": errno.errorcode.get(e.errno or 0, str(e))}
        finally:
            s.close()
    s = _udp_socket(local_port)
    s.connect(target)  # a connected UDP socket reports ICMP port unreachable as ECONNREFUSED
    req = Request(new_txid(), delay_ms=delay_ms)
    s.send(encode(req))
    s.settimeout(wait + delay_ms / 1000)
    try:
        msg = decode(s.recv(2048))
        seen = f"{msg.ip}:{msg.port}" if isinstance(msg, Response) else None
        return {"result": "reply", "seen_as": seen}
    except ConnectionRefusedError:
        return {"result": "refused"}
    except TimeoutError:
        return {"result": "timeout"}
    except ProbeDecodeError:
        return {"result": "garbage"}
    finally:
        s.close()


def rtt(server: tuple[str, int], count: int, interval: float, wait: float = 2.0) -> dict[str, Any]:
    """Round trips to a reflector: C{count} requests C{interval} apart from one socket."""
    s = _udp_socket()
    udp_ask(s, server, tries=10)  # warm up: resolve ARP along the path before timing
    pending: dict[str, float] = {}
    rtts: list[float] = []
    n_sent = 0
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if n_sent < count and now >= next_send:
            req = Request(new_txid())
            pending[req.txid] = now
            s.settimeout(0)
            try:
                s.sendto(encode(req), server)
            except (BlockingIOError, ConnectionRefusedError):
                pass  # a full queue on the way out is loss, as on a real link
            n_sent += 1
            next_send += interval
            if n_sent == count:
                stop_at = now + wait
            continue
        if n_sent == count and (now >= stop_at or not pending):
            break
        s.settimeout(max(0.0005, (next_send if n_sent < count else stop_at) - now))
        try:
            data, _ = s.recvfrom(2048)
        except (TimeoutError, ConnectionRefusedError):
            continue
        at = time.monotonic()
        try:
            msg = decode(data)
        except ProbeDecodeError:
            continue
        if isinstance(msg, Response) and msg.txid in pending:
            rtts.append((at - pending.pop(msg.txid)) * 1000)
    s.close()
    return summarize_rtts(count, rtts)


def summarize_rtts(sent: int, rtts_ms: Sequence[float]) -> dict[str, Any]:
    """Loss and RTT statistics (milliseconds) of one run."""
    out: dict[str, Any] = {
        "sent": sent,
        "received": len(rtts_ms),
        "loss_pct": 100 * (sent - len(rtts_ms)) / sent if sent else 0.0,
    }
    if rtts_ms:
        ordered = sorted(rtts_ms)
        mean = sum(ordered) / len(ordered)
        out.update(
            min_ms=ordered[0],
            median_ms=ordered[len(ordered) // 2],
            mean_ms=mean,
            p95_ms=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            max_ms=ordered[-1],
            stdev_ms=(sum((x - mean) ** 2 for x in ordered) / len(ordered)) ** 0.5,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of C{python3 -m natbypass.lab.probe}: run the reflector, or
    run one client measurement and print its single JSON object.
    """
    p = argparse.ArgumentParser(prog="python3 -m natbypass.lab.probe", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve", help="run the reflector (on the mediator host)")
    sp.add_argument("addresses", nargs=2, help="the two public addresses")
    sp.add_argument("--ports", default="4000,4001", help="two ports, comma separated")
    mp = sub.add_parser("mapping", help="measure the mapping behaviour")
    mp.add_argument("primary", type=_endpoint)
    mp.add_argument("alternate", type=_endpoint)
    mp.add_argument("--tcp", action="store_true")
    fp = sub.add_parser("filtering", help="measure the filtering behaviour (UDP, or TCP connect-backs)")
    fp.add_argument("primary", type=_endpoint)
    fp.add_argument("--tcp", action="store_true")
    lp = sub.add_parser("listen", help="learn the public mapping, then answer anyone")
    lp.add_argument("server", type=_endpoint)
    lp.add_argument("--seconds", type=float, default=5.0)
    lp.add_argument("--port", type=int, default=0)
    np_ = sub.add_parser("send", help="send one request and report reply / timeout / refused")
    np_.add_argument("target", type=_endpoint)
    np_.add_argument("--tcp", action="store_true")
    np_.add_argument("--wait", type=float, default=1.0)
    np_.add_argument("--port", type=int, default=0)
    np_.add_argument("--delay-ms", type=int, default=0, help="ask a reflector to answer this much later")
    rp = sub.add_parser("rtt", help="round-trip times and loss to a reflector")
    rp.add_argument("server", type=_endpoint)
    rp.add_argument("--count", type=int, default=100)
    rp.add_argument("--interval", type=float, default=0.02, help="seconds between requests")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        ports = [int(x) for x in args.ports.split(",")]
        if len(ports) != 2:
            p.error("--ports needs two ports")
        serve(args.addresses, ports)
        return 0
    if args.cmd == "mapping":
        out = measure_mapping(args.primary, args.alternate, args.tcp)
    elif args.cmd == "filtering":
        out = measure_tcp_filtering(args.primary) if args.tcp else measure_filtering(args.primary)
    elif args.cmd == "listen":
        return listen(args.server, args.seconds, args.port)
    elif args.cmd == "rtt":
        out = rtt(args.server, args.count, args.interval)
    else:
        out = send(args.target, args.tcp, args.wait, args.port, args.delay_ms)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

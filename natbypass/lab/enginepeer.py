"""
An engine-only peer for NAT-lab tests of the traversal engines, without the
mediator's signalling: it learns its mappings by STUN, swaps them with the
other side through a shared directory (the lab's namespaces share one file
system), punches at an agreed wall-clock time, exchanges one echo and prints
one JSON line.  Each process makes a fresh identity key and publishes its
fingerprint with its mapping; the other side pins it, so a TCP path is TLS
1.3 and a UDP path QUIC between exactly these two processes.

Run inside a lab host::

    python -m natbypass.lab.enginepeer --name a --peer b --role 0 --dir DIR \\
        --stun 198.18.0.2:3478 --protocol udp --start-at EPOCH [--predict-delta 1]

The wall clock is only the test harness's rendezvous; the engines themselves
run on the reactor's clock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone

from natbypass.address import parse_host_port
from natbypass.identity import Fingerprint, Identity, load_or_create
from natbypass.punch.candidates import remote_addresses, reserve_tcp_port
from natbypass.punch.mux import PunchEndpoint, UDPMux
from natbypass.punch.session import PunchFailed, PunchSession
from natbypass.punch.tcp import punch_tcp
from natbypass.punch.udp import ProbeSchedule, punch_udp
from natbypass.secure import ChannelSecurity
from natbypass.trust import pinned


def parser() -> argparse.ArgumentParser:
    """
    The command line of one engine peer.  The defaults (a fixed session key, a
    fresh identity, pinning whatever key the other side published) suit a
    one-off lab run.
    """
    p = argparse.ArgumentParser(prog="python -m natbypass.lab.enginepeer")
    p.add_argument("--name", required=True)
    p.add_argument("--peer", required=True)
    p.add_argument("--role", type=int, choices=(0, 1), required=True)
    p.add_argument("--dir", required=True, help="shared rendezvous directory")
    p.add_argument("--stun", type=parse_host_port, required=True, help="STUN server HOST:PORT (in the lab)")
    p.add_argument("--protocol", choices=("udp", "tcp"), default="udp")
    p.add_argument("--start-at", type=float, required=True, help="wall-clock start (epoch seconds)")
    p.add_argument("--predict-delta", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--key", default="6b" * 32, help="session key, hex")
    p.add_argument("--identity", help="identity key file (default: a key made for this process)")
    p.add_argument("--pin", help="the fingerprint the peer must prove (default: the one it published)")
    p.add_argument("--message", default="echo?", help="what role 0 sends (role 1 echoes it)")
    return p


def argv(
    name: str,
    peer: str,
    role: int,
    directory: str,
    stun: str,
    protocol: str,
    start_at: float,
    *extra: str,
    module: str = "natbypass.lab.enginepeer",
) -> list[str]:
    """The command line of one engine peer (or of a program built on L{parser}, C{module})."""
    return [
        sys.executable,
        "-m",
        module,
        "--name",
        name,
        "--peer",
        peer,
        "--role",
        str(role),
        "--dir",
        directory,
        "--stun",
        stun,
        "--protocol",
        protocol,
        "--start-at",
        str(start_at),
        *extra,
    ]


def _publish(directory: str, name: str, info: dict) -> None:
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, os.path.join(directory, f"{name}.json"))


@defer.inlineCallbacks
def _wait_for_peer(reactor, directory: str, peer: str, timeout: float = 20.0):
    path = os.path.join(directory, f"{peer}.json")
    for _ in range(int(timeout / 0.05)):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        yield task.deferLater(reactor, 0.05, lambda: None)
    raise TimeoutError(f"{peer} did not publish its mapping within {timeout} s")


@defer.inlineCallbacks
def main(reactor, argv: list[str]):
    """
    One lab run: learn this side's mapping by STUN, swap it (and the key
    fingerprint) through C{--dir}, punch at C{--start-at}, exchange one echo
    (role 0 sends, role 1 echoes) and print the result as one JSON line.
    """
    args = parser().parse_args(argv)
    conn, result = yield connect(reactor, args)
    if conn is None:
        print(json.dumps(result), flush=True)
        return
    yield _echo(reactor, args, conn, result)


@defer.inlineCallbacks
def connect(reactor, args: argparse.Namespace, keepalive_interval: float = 15.0):
    """
    Learn this side's mapping by STUN, swap it (and the key fingerprint)
    through C{args.dir}, punch at C{args.start_at}: fires with (the
    connection, a result dict), or (None, the result with C{ok} False and
    the reason).
    """
    from natbypass.stun.client import StunUDPProtocol, binding_request, mapped_address, tcp_binding

    session = PunchSession("lab-session", bytes.fromhex(args.key), args.role, args.peer)
    # This process's key (or --identity's); its fingerprint goes out with the mapping.
    identity = load_or_create(args.identity) if args.identity else Identity.generate()
    endpoint = PunchEndpoint()
    listener = None
    if args.protocol == "udp":
        stun = StunUDPProtocol(reactor)
        reactor.listenUDP(0, UDPMux(stun, endpoint))
        response, _ = yield stun.request(binding_request(), args.stun)
        mapped = mapped_address(response)
    else:
        listener = reserve_tcp_port(None, "0.0.0.0")
        local = ("0.0.0.0", listener.getsockname()[1])
        binding = yield tcp_binding(reactor, args.stun, local, clock=reactor, timeout=5.0)
        mapped = binding.mapped
    _publish(args.dir, args.name, {"mapped": list(mapped), "fingerprint": str(identity.fingerprint)})
    peer = yield _wait_for_peer(reactor, args.dir, args.peer)
    security = ChannelSecurity(identity, pinned(Fingerprint.parse(args.pin or peer["fingerprint"])))
    targets = remote_addresses([tuple(peer["mapped"])], predict_delta=args.predict_delta)
    delay = max(0.0, args.start_at - time.time())
    started = reactor.seconds() + delay
    if args.protocol == "udp":
        d = punch_udp(
            endpoint,
            session,
            targets,
            reactor,
            start_delay=delay,
            schedule=ProbeSchedule(timeout=args.timeout),
            security=security,
            keepalive_interval=keepalive_interval,
        )
    else:
        d = punch_tcp(
            reactor,
            session,
            local,
            targets,
            start_delay=delay,
            window=args.timeout,
            listener=listener,
            security=security,
            keepalive_interval=keepalive_interval,
        )
    result = {"name": args.name, "mapped": list(mapped), "targets": [list(t) for t in targets]}
    try:
        conn = yield d
    except PunchFailed as e:
        result.update(ok=False, reason=e.reason)
        return None, result
    result.update(
        ok=True,
        connect_ms=round((reactor.seconds() - started) * 1000, 1),
        remote=[conn.remote_address.host, conn.remote_address.port],
    )
    if args.protocol == "udp":
        result.update(
            rtt_ms=None if conn.rtt is None else round(conn.rtt * 1000, 1),
            stats=conn.punch_stats.__dict__,
            cipher=conn.cipher,
            handshake_ms=round(conn.handshake_ms, 1),
            peer_fingerprint=str(conn.peer_fingerprint),
        )
    else:
        result.update(
            cipher=conn.cipher,
            handshake_ms=round(conn.handshake_ms, 1),
            peer_fingerprint=str(conn.peer_fingerprint),
        )
    return conn, result


#: Role 1 keeps the connection until role 0 closes it or has sent nothing for ECHO_LINGER s (role 0 resends until
#: echoed), at most ECHO_LINGER_MAX s after the first message.  Closing 1 s after the first message, as before,
#: reset a TCP connection whose echo was still being retransmitted under loss (issue 12).
ECHO_LINGER, ECHO_LINGER_MAX = 1.0, 10.0


@defer.inlineCallbacks
def _echo(reactor, args: argparse.Namespace, conn, result: dict):
    """Role 0 sends C{args.message} until it is echoed; role 1 echoes; print the result line."""
    got: defer.Deferred = defer.Deferred()
    quiet: defer.Deferred = defer.Deferred()
    linger = []

    def stop() -> None:
        if not quiet.called:
            quiet.callback(None)

    class Receiver:
        def dataReceived(self, data: bytes) -> None:
            if args.role == 1:
                conn.send(data)  # echo
                if linger:
                    linger[0].reset(ECHO_LINGER)
                else:
                    linger.append(reactor.callLater(ECHO_LINGER, stop))
                    linger.append(reactor.callLater(ECHO_LINGER_MAX, stop))
            if not got.called:
                got.callback(data)

        def connectionLost(self, reason) -> None:
            if not got.called and not reason.check(ConnectionDone):
                got.errback(reason)
            stop()

    conn.setReceiver(Receiver())
    if args.role == 0:
        sent = reactor.seconds()
        # Datagrams may be lost on the lab's links: resend until echoed.
        loop = task.LoopingCall(conn.send, args.message.encode())
        loop.start(0.2)
        data = yield got
        loop.stop()
        result.update(echo=data.decode(), echo_rtt_ms=round((reactor.seconds() - sent) * 1000, 1))
    else:
        data = yield got
        result.update(echo=data.decode())
        yield quiet  # keep echoing role 0's resends until it closes or goes quiet
        for call in linger:
            if call.active():
                call.cancel()
    print(json.dumps(result), flush=True)
    conn.close()


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))

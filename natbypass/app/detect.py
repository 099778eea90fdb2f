"""
C{natbypass detect}: ask an RFC 5780 STUN server what our NAT does.

    natbypass detect --stun 127.0.0.1:3478 [--tcp] [--json] [--port-mapping [--gateway IP]]
                     [--stun6 [2001:db8::1]:3478]

Exit status: 0 when the server answered, 1 when it could not be reached
(over UDP, and over TCP too with C{--tcp}), 2 on bad usage.  With
C{--port-mapping} it also asks the gateway for a mapping by PCP, NAT-PMP
and UPnP-IGD (each deleted at once) and reports which protocols answered
and the mapped address; without C{--stun} only that (status 1 when no
protocol mapped).  With C{--json}
one JSON object goes to stdout (see L{natbypass.stun.discovery.NATBehavior.to_json});
otherwise a short report.  Errors go to stderr.  With C{--stun6} it also
sends one Binding over IPv6 and reports IPv6 reachability: the mapped IPv6
address and whether it differs from ours (NAT66); an unanswered IPv6 check
is reported, not an error (many networks have no IPv6).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import TextIO

from twisted.internet import defer
from twisted.internet.error import CannotListenError, DNSLookupError
from twisted.logger import Logger

from natbypass.address import format_address, is_ip
from natbypass.address import parse_host_port as _parse_host_port
from natbypass.net import route_source_address
from natbypass.portmap import PortMapper, PortMapping
from natbypass.portmap.gateway import default_gateway
from natbypass.stun.client import (
    NETWORK_ERRORS,
    Address,
    RetransmitPolicy,
    StunUDPProtocol,
    binding_request,
    mapped_address,
    tcp_binding,
)
from natbypass.stun.discovery import NATBehavior, discover

log = Logger()

DEFAULT_PORT = 3478
EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2


def parse_host_port(text: str, default_port: int | None = DEFAULT_PORT, *, allow_zero: bool = False) -> Address:
    """A STUN server's C{HOST[:PORT]}: port 3478 unless given (see L{natbypass.address})."""
    return _parse_host_port(text, default_port, allow_zero=allow_zero)


def _arg(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0 or value > 600:
        raise ValueError(f"{text}: must be more than 0 and at most 600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of C{natbypass detect}.  Values are converted and
    checked here, so a bad address or timeout is a usage error (status 2) with
    a message, not a traceback.
    """
    p = argparse.ArgumentParser(
        prog="natbypass detect",
        description="Detect the NAT's mapping and filtering behaviour (RFC 5780) "
        "with the help of a STUN server that has two addresses.",
    )
    p.add_argument(
        "--stun",
        metavar="HOST[:PORT]",
        type=_arg(parse_host_port),
        help=f"the STUN server (port {DEFAULT_PORT} by default; IPv6 as [ADDR]:PORT)",
    )
    p.add_argument(
        "--stun6",
        metavar="[IPv6][:PORT]",
        type=_arg(_ipv6_server),
        help="also check IPv6 with this STUN server: the mapped IPv6 address and whether it is translated (NAT66)",
    )
    p.add_argument(
        "--tcp",
        action="store_true",
        help="also measure the TCP mapping behaviour (three connections from one local port)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    p.add_argument(
        "--timeout",
        type=_arg(_positive),
        default=3.0,
        metavar="SECONDS",
        help="give up on a Binding after this long (default 3; filtering tests, which expect silence, wait half of it)",
    )
    p.add_argument(
        "--rto",
        type=_arg(_positive),
        default=0.25,
        metavar="SECONDS",
        help="initial retransmission timeout (default 0.25, doubling)",
    )
    p.add_argument(
        "--local",
        type=_arg(functools.partial(parse_host_port, default_port=0, allow_zero=True)),
        metavar="HOST[:PORT]",
        help="local address to bind (default: the address that routes to the server, any port)",
    )
    p.add_argument(
        "--port-mapping",
        action="store_true",
        help="also ask the gateway for a UDP mapping by PCP, NAT-PMP and UPnP-IGD (deleted at once) and report "
        "which protocols answered and the mapped address; off by default: it sends to the gateway",
    )
    p.add_argument(
        "--gateway",
        type=_arg(_ipv4),
        metavar="IPV4",
        help="the gateway to ask with --port-mapping (default: the default route's gateway)",
    )
    return p


def _ipv6_server(text: str) -> Address:
    server = parse_host_port(text)
    if ":" not in server[0]:
        raise ValueError(f"{text!r}: --stun6 takes an IPv6 address, as [ADDR]:PORT")
    return server


def _ipv4(text: str) -> str:
    if not is_ip(text) or ":" in text:
        raise ValueError(f"{text!r} is not an IPv4 address")
    return text


# ---------------------------------------------------------------- output


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def format_report(behavior: NATBehavior) -> str:
    """The short human-readable report."""

    def addr(a: Address | None) -> str:
        return format_address(a) if a is not None else "unknown"

    lines = [
        f"NAT type:        {behavior.nat_type}",
        f"Mapping:         {behavior.mapping}",
        f"Filtering:       {behavior.filtering}",
        f"Public address:  {addr(behavior.public_address)}",
        f"Local address:   {addr(behavior.local_address)}",
        f"Port preserving: {_yes_no(behavior.port_preserving)}",
    ]
    if behavior.tcp is not None:
        lines += [
            f"TCP mapping:     {behavior.tcp.mapping}",
            f"TCP public:      {addr(behavior.tcp.public_address)} (from {addr(behavior.tcp.local_address)})",
        ]
    other = f" (alternate {addr(behavior.other_address)})" if behavior.other_address else ""
    lines.append(f"STUN server:     {addr(behavior.server)}{other}")
    if behavior.elapsed_ms is not None:
        lines.append(f"Elapsed:         {behavior.elapsed_ms:.0f} ms")
    notes = list(behavior.notes) + [
        f"TCP: {n}" for n in (behavior.tcp.notes if behavior.tcp else ()) if n not in behavior.notes
    ]
    lines += [f"Note: {n}" for n in notes]
    return "\n".join(lines)


def format_json(behavior: NATBehavior | None, port_mapping: dict | None = None, ipv6: dict | None = None) -> str:
    """
    The result for C{--json}: one JSON object (L{NATBehavior.to_json},
    C{port_mapping} from L{port_mapping_json}, C{ipv6} from
    L{ipv6_json}) with sorted keys, so scripts get stable output.
    """
    out = behavior.to_json() if behavior is not None else {}
    if port_mapping is not None:
        out["port_mapping"] = port_mapping
    if ipv6 is not None:
        out["ipv6"] = ipv6
    return json.dumps(out, sort_keys=True)


def ipv6_json(server: Address, local: Address | None, mapped: Address | None) -> dict:
    """
    What C{--stun6} found: whether the IPv6 server answered, our IPv6
    address and the one it saw, and whether they differ (NAT66; None when
    unknown).
    """
    return {
        "server": format_address(server),
        "reachable": mapped is not None,
        "local_address": format_address(local) if local is not None else None,
        "public_address": format_address(mapped) if mapped is not None else None,
        "translated": None if mapped is None or local is None else mapped != local,
    }


def format_ipv6(info: dict) -> str:
    """The C{--stun6} line of the report."""
    if not info["reachable"]:
        return f"IPv6:            no answer from {info['server']} (no IPv6 path, or it is blocked)"
    state = "translated (NAT66)" if info["translated"] else "not translated (no NAT66)"
    return f"IPv6:            reachable, {state}: {info['public_address']} (from {info['local_address']})"


def port_mapping_json(gateway: str | None, results: dict[str, PortMapping | str]) -> dict:
    """
    What C{--port-mapping} found: the gateway, the protocols that mapped
    (in the order tried), each protocol's mapping or error, and the mapped
    address of the first that answered.
    """
    mapped = [m for m in results.values() if isinstance(m, PortMapping)]
    return {
        "gateway": gateway,
        "protocols": [m.method for m in mapped],
        "mapped_address": format_address(mapped[0].external) if mapped else None,
        "results": {k: v.to_json() if isinstance(v, PortMapping) else {"error": v} for k, v in results.items()},
    }


def format_port_mapping(info: dict) -> str:
    """The C{--port-mapping} part of the report."""
    lines = [
        f"Gateway:         {info['gateway'] or 'none (no default route)'}",
        f"Port mapping:    {', '.join(info['protocols']) or 'none'}",
    ]
    if info["mapped_address"]:
        lines.append(f"Mapped address:  {info['mapped_address']}")
    for method, r in info["results"].items():
        if "error" in r:
            lines.append(f"  {method:<7} no: {r['error']}")
        else:
            lines.append(
                f"  {method:<7} {r['protocol']} port {r['internal_port']} -> {r['external']} ({r['lifetime']:g} s)"
            )
    return "\n".join(lines)


# ------------------------------------------------------------- the work


def _fail(err: TextIO, message: str) -> int:
    print(f"natbypass detect: {message}", file=err)
    return EXIT_UNREACHABLE


@defer.inlineCallbacks
def detect(reactor, args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None):
    """Run the detection the parsed C{args} ask for; fires with the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    mapping_info = None
    if args.stun is None:
        mapping_info = yield _port_mapping(reactor, args, None)
        if args.json:
            print(format_json(None, mapping_info), file=out)
        else:
            print(format_port_mapping(mapping_info), file=out)
        if not mapping_info["protocols"]:
            return _fail(err, "the gateway mapped no port by PCP, NAT-PMP or UPnP-IGD")
        return EXIT_OK
    host, port = args.stun
    if not is_ip(host):
        try:
            host = yield reactor.resolve(host)
        except DNSLookupError as e:  # not found, or no answer in time
            return _fail(err, f"cannot resolve STUN server name {host!r}: {e}")
    server = (host, port)
    if args.local is not None:
        local_host, local_port = args.local
    else:
        try:
            local_host, local_port = route_source_address(server), 0
        except OSError as e:
            return _fail(err, f"no route to the STUN server {format_address(server)}: {e}")
    proto = StunUDPProtocol(reactor)
    try:
        listening = reactor.listenUDP(local_port, proto, interface=local_host)
    except CannotListenError as e:
        return _fail(err, f"cannot bind UDP to {format_address((local_host, local_port))}: {e.socketError}")
    bound = listening.getHost()
    policy = RetransmitPolicy.within(args.timeout, rto=args.rto)
    filtering_policy = RetransmitPolicy.within(args.timeout / 2, rto=min(args.rto, args.timeout / 2))
    tcp_binder = None
    if args.tcp:
        tcp_binder = functools.partial(
            tcp_binding, reactor, timeout=args.timeout, policy=RetransmitPolicy(ti=args.timeout)
        )
    try:
        behavior = yield discover(
            proto.client,
            server,
            (bound.host, bound.port),
            reactor,
            tcp_binder=tcp_binder,
            policy=policy,
            filtering_policy=filtering_policy,
        )
        if args.port_mapping:
            mapping_info = yield _port_mapping(reactor, args, bound.port)
    finally:
        yield listening.stopListening()
    ipv6_info = None
    if args.stun6 is not None:
        ipv6_info = yield _check_ipv6(reactor, args.stun6, policy)
    reached = behavior.reachable or behavior.tcp_reachable
    if args.json:
        print(format_json(behavior, mapping_info, ipv6_info), file=out)
    else:
        print(format_report(behavior), file=out)
        if mapping_info is not None:
            print(format_port_mapping(mapping_info), file=out)
        if ipv6_info is not None:
            print(format_ipv6(ipv6_info), file=out)
    if not reached:
        via = "UDP or TCP" if args.tcp else "UDP"
        return _fail(
            err,
            f"the STUN server {format_address(server)} did not answer over {via} within "
            f"{args.timeout:g} s: check that it runs and that the address is right "
            "(a firewall that blocks UDP looks the same)",
        )
    return EXIT_OK


@defer.inlineCallbacks
def _check_ipv6(reactor, server: Address, policy: RetransmitPolicy):
    """One Binding to the IPv6 STUN server from the address that routes to it; fires with L{ipv6_json}."""
    try:
        local_host = route_source_address(server)
    except OSError:
        return ipv6_json(server, None, None)  # no IPv6 route at all
    proto = StunUDPProtocol(reactor)
    listening = reactor.listenUDP(0, proto, interface=local_host)
    local = (local_host, listening.getHost().port)
    try:
        response, _ = yield proto.client.request(binding_request(), server, policy)
        mapped = mapped_address(response)
    except NETWORK_ERRORS:
        mapped = None
    finally:
        yield listening.stopListening()
    return ipv6_json(server, local, mapped)


@defer.inlineCallbacks
def _port_mapping(reactor, args: argparse.Namespace, port: int | None, mapper: PortMapper | None = None):
    """
    Ask the gateway for a UDP mapping of C{port} (the STUN socket's; None:
    a port bound for the purpose) by every protocol; fires with
    L{port_mapping_json}.
    """
    gateway = args.gateway or default_gateway()
    if gateway is None and mapper is None:
        return port_mapping_json(None, {})
    listening = None
    if port is None:
        from twisted.internet.protocol import DatagramProtocol

        local = args.local[0] if args.local else route_source_address((gateway, 5351))
        listening = reactor.listenUDP(0, DatagramProtocol(), interface=local)
        port = listening.getHost().port
    mapper = mapper or PortMapper(reactor, gateway)
    try:
        results = yield defer.ensureDeferred(mapper.probe("udp", port))
    finally:
        if listening is not None:
            yield listening.stopListening()
    return port_mapping_json(mapper.gateway, results)


def run(argv: list[str]) -> int:
    """Entry point of C{natbypass detect}; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.stun is None and not args.port_mapping:
            parser.error("the following arguments are required: --stun (or --port-mapping)")
    except SystemExit as e:  # argparse: 0 for --help, 2 for bad usage
        return int(e.code or 0)
    from twisted.internet.task import react

    def main(reactor):
        d = detect(reactor, args)

        def exit_with(code: int) -> None:
            if code:
                raise SystemExit(code)

        return d.addCallback(exit_with)

    try:
        react(main)
    except SystemExit as e:
        return int(e.code or 0)
    return EXIT_OK

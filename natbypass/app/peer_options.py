"""
Options shared by everything that starts a peer: the C{natbypass-peer}
twistd plugin (C{usage.Options}) and C{natbypass connect}, C{forward} and
C{pipe} (C{argparse}; the options naming the peer to reach are
L{TARGET_OPTIONS}).

Each option is defined once, as an L{OptionSpec} in L{PEER_OPTIONS}; the two
front ends build their parsers from the table (L{usage_parameters},
L{add_arguments}), check the values with L{check_peer_options} and build the
peer with L{make_peer}.  Parsing only; no I/O.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from natbypass.address import parse_host_port
from natbypass.app.detect import DEFAULT_PORT
from natbypass.identity import (
    Fingerprint,
    FingerprintError,
    default_identity_path,
    default_known_peers_path,
    load_or_create,
)
from natbypass.peer import Peer, PeerConfig, parse_wish
from natbypass.punch.birthday import BIRTHDAY_PROBES, BIRTHDAY_RATE, BIRTHDAY_SOCKETS, BirthdayConfig
from natbypass.punch.candidates import PortRange
from natbypass.signaling.client import check_mediator_endpoint, client_endpoint
from natbypass.trust import AllowList, KnownPeers

Address = tuple[str, int]


@dataclass(frozen=True)
class OptionSpec:
    """
    One command-line option, for both parsers: C{--name} (and C{-short}),
    its default, how its text is converted (C{coerce}), its help; a C{flag}
    takes no value.  C{required} options are refused when missing.
    """

    name: str
    help: str
    default: Any = None
    coerce: Callable[[str], Any] | None = None
    metavar: str | None = None
    short: str | None = None
    flag: bool = False
    required: bool = False

    @property
    def dest(self) -> str:
        """The attribute C{argparse} stores the value under."""
        return self.name.replace("-", "_")


#: The options of every command that starts a peer.
PEER_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("mediator", "the mediator's signalling endpoint: tcp:HOST:7000 or tls:HOST:7443; several of one "
               "cluster separated by commas (the peer moves to the next when its mediator dies)",
               metavar="ENDPOINT", short="m", required=True),
    OptionSpec("id", "our peer id at the mediator", metavar="NAME", required=True),
    OptionSpec("stun", "STUN server HOST[:PORT] (default: port 3478 on the mediator's host)",
               metavar="HOST[:PORT]"),
    OptionSpec("stun6", "dual stack: the IPv6 STUN server [IPv6][:PORT] (implies --ipv6; maps our IPv6 ports)",
               metavar="[IPv6]:PORT"),
    OptionSpec("ipv6", "dual stack: punch over IPv6 too (IPv6 host candidates; happy eyeballs, IPv6 first)",
               flag=True),
    OptionSpec("token", "token for a mediator that requires one"),
    OptionSpec("ca", "CA certificate (PEM) to verify a tls: mediator with", metavar="PEM"),
    OptionSpec("protocol", "auto, udp, tcp, or an ordered list like tcp,udp", default="auto"),
    OptionSpec("port-range", "local ports to use, LOW-HIGH (for firewall rules)", metavar="LOW-HIGH"),
    OptionSpec("timeout", "seconds each protocol may try", default=5.0, coerce=float),
    OptionSpec("no-discovery", "skip RFC 5780 NAT behaviour discovery (only learn the mapped address)",
               flag=True),
    OptionSpec("no-host-candidates", "never publish our interface addresses (by default approved peers, "
               "and peers we connect to, get them, so two peers on one LAN meet directly)", flag=True),
    OptionSpec("port-mapping", "ask the gateway (the default route's) for inbound mappings of our ports by PCP, "
               "NAT-PMP or UPnP-IGD and publish them; off by default, as it sends to the gateway", flag=True),
    OptionSpec("birthday-sockets", "birthday punching (port-restricted cone x random symmetric NAT, UDP): extra "
               "sockets to open on the symmetric side; 0 turns it off", default=BIRTHDAY_SOCKETS, coerce=int,
               metavar="N"),
    OptionSpec("birthday-rate", "birthday punching: probes a second to spray on the cone side",
               default=BIRTHDAY_RATE, coerce=float, metavar="N"),
    OptionSpec("birthday-probes", "birthday punching: probes to spray at most in one attempt; 0 turns it off",
               default=BIRTHDAY_PROBES, coerce=int, metavar="N"),
    OptionSpec("identity", "identity key file, created (0600) if missing; the mediator binds --id to this key "
               "(default: $XDG_CONFIG_HOME/natbypass/identity.pem, else ~/.config/natbypass/identity.pem)",
               metavar="PATH"),
)  # fmt: skip


def _fingerprint(text: str) -> Fingerprint:
    try:
        return Fingerprint.parse(text)
    except FingerprintError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: The options of every command that reaches one peer (connect, forward, pipe).
TARGET_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("peer", "the id of the peer to connect to", required=True),
    OptionSpec("peer-fingerprint", "the key the peer must prove (pinned; see natbypass id)", metavar="FP",
               coerce=_fingerprint),
    OptionSpec("known-peers", "trust on first use: record a peer's key at first contact, refuse a different one "
               "later (default: $XDG_CONFIG_HOME/natbypass/known_peers, else ~/.config/natbypass/known_peers)",
               metavar="PATH"),
)  # fmt: skip


def check_target_options(options: dict[str, Any]) -> None:
    """
    Turn C{known-peers} into the L{KnownPeers} to trust on first use with,
    or None when C{--peer-fingerprint} pins the key (a pin needs no record).
    """
    if options["peer-fingerprint"] is None:
        options["known-peers"] = KnownPeers(options["known-peers"] or default_known_peers_path())
    else:
        options["known-peers"] = None


def usage_parameters(specs: Iterable[OptionSpec]) -> tuple[list[list[Any]], list[list[Any]]]:
    """C{(optParameters, optFlags)} of a C{twisted.python.usage.Options}."""
    specs = list(specs)
    parameters = [[s.name, s.short, s.default, s.help, s.coerce] for s in specs if not s.flag]
    flags = [[s.name, s.short, s.help] for s in specs if s.flag]
    return parameters, flags


def add_arguments(parser: argparse.ArgumentParser, specs: Iterable[OptionSpec]) -> None:
    """Add C{specs} to an C{argparse} parser (a missing required option exits with status 2)."""
    for s in specs:
        names = [f"--{s.name}"] + ([f"-{s.short}"] if s.short else [])
        if s.flag:
            parser.add_argument(*names, dest=s.dest, action="store_true", help=s.help)
            continue
        default = f" (default {s.default})" if s.default is not None else ""
        parser.add_argument(*names, dest=s.dest, default=s.default, type=s.coerce, metavar=s.metavar,
                            required=s.required, help=s.help + default)  # fmt: skip


def namespace_options(args: argparse.Namespace, specs: Iterable[OptionSpec]) -> dict[str, Any]:
    """The values C{argparse} parsed, by option name (as C{usage.Options} holds them)."""
    return {s.name: getattr(args, s.dest) for s in specs}


def check_peer_options(options: dict[str, Any]) -> None:
    """
    Check the shared options and convert them in place: C{port-range}
    becomes a L{PortRange} (or None), C{stun} the STUN server's address.
    Raises ValueError with a message a person can act on.
    """
    parse_wish(options["protocol"])
    check_mediator_endpoint(options["mediator"], options["ca"])
    options["port-range"] = PortRange.parse(options["port-range"]) if options["port-range"] else None
    options["stun"] = stun_server(options["stun"], options["mediator"])
    if options.get("stun6"):
        stun6 = parse_host_port(options["stun6"], DEFAULT_PORT)
        if ":" not in stun6[0]:
            raise ValueError(f"--stun6: needs an IPv6 address ([IPv6]:PORT), not {stun6[0]!r}")
        options["stun6"], options["ipv6"] = stun6, True
    BirthdayConfig(*_birthday(options))


def _birthday(options: Mapping[str, Any]) -> tuple[int, float, int]:
    """C{--birthday-sockets}, C{--birthday-rate}, C{--birthday-probes} (their defaults when a front end lacks them)."""
    return (
        options.get("birthday-sockets", BIRTHDAY_SOCKETS),
        options.get("birthday-rate", BIRTHDAY_RATE),
        options.get("birthday-probes", BIRTHDAY_PROBES),
    )


def make_peer(
    reactor: Any,
    options: Mapping[str, Any],
    *,
    known_peers: KnownPeers | None = None,
    allow: AllowList | None = None,
    **config: Any,
) -> Peer:
    """
    A L{natbypass.peer.Peer} (not started) from checked options; C{config}
    holds further L{natbypass.peer.PeerConfig} fields of one command.  The
    identity key is read from C{--identity} (default
    L{natbypass.identity.default_identity_path}), and made there first if
    missing, so a peer keeps its key, and its id, across restarts.

    @raise natbypass.identity.IdentityFileError: when the key file cannot be used.
    """
    identity = load_or_create(options.get("identity") or default_identity_path())
    return Peer(
        reactor,
        options["id"],
        client_endpoint(reactor, options["mediator"], options["ca"]),
        options["stun"],
        token=options["token"],
        identity=identity,
        known_peers=known_peers,
        allow=allow,
        protocol=options["protocol"],
        config=PeerConfig(
            port_range=options["port-range"],
            punch_timeout=options["timeout"],
            discover=not options["no-discovery"],
            reveal_host_candidates=not options.get("no-host-candidates", False),
            port_mapping=options.get("port-mapping", False),
            ipv6=bool(options.get("ipv6")),
            stun6=options.get("stun6"),
            **dict(zip(("birthday_sockets", "birthday_rate", "birthday_probes"), _birthday(options), strict=True)),
            **config,
        ),
    )


#: The host in a Twisted client endpoint string: positional (tcp:HOST:PORT)
#: or keyword (tcp:host=HOST:port=PORT); IPv6 hosts escape their colons.
_POSITIONAL = re.compile(r"^(?:tcp|tls|ssl):((?:\\:|[^:=])+):")
_KEYWORD = re.compile(r"(?:^|:)host=((?:\\:|[^:])+)")


def mediator_host(endpoint: str) -> str:
    """The mediator's host in a client endpoint string, for the default STUN server."""
    m = _KEYWORD.search(endpoint) or _POSITIONAL.match(endpoint)
    if m is None:
        raise ValueError(
            f"cannot find the host in {endpoint!r}; give --stun HOST:PORT or an endpoint like tcp:HOST:7000"
        )
    return m.group(1).replace("\\:", ":")


def stun_server(stun: str | None, mediator: str) -> Address:
    """C{--stun} or, without it, port 3478 on the mediator's host."""
    if stun:
        return parse_host_port(stun, DEFAULT_PORT)
    return (mediator_host(mediator), DEFAULT_PORT)

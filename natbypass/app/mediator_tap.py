"""
The C{natbypass-mediator} twistd plugin: options and C{makeService}.

The mediator is two services under one C{MultiService}: the STUN responder
(C{natbypass.stun.server.STUNService}, named C{"stun"}) and the signalling
service (C{natbypass.signaling.service}, named C{"signal"}).  Each half
owns its options: the STUN ones are below, the signalling ones come from
C{SIGNAL_OPT_PARAMETERS} and are checked by C{check_signaling_options}.

    twistd -n natbypass-mediator --stun 192.0.2.10:3478 --stun-alternate 192.0.2.11:3479

Dual stack: C{--stun6 [2001:db8::10]:3478 --stun6-alternate [2001:db8::11]}
adds a second responder on IPv6 (named C{"stun6"}; RFC 5780 needs two IPv6
addresses too).  Signalling listens on both families with an IPv6 wildcard
endpoint (C{--signal tcp6:7000:interface=\\:\\:}, which accepts IPv4 too).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from natbypass.address import is_ip, is_wildcard
from natbypass.address import parse_host_port as _parse_host_port
from natbypass.metrics import METRICS_OPT_PARAMETER, check_metrics_option, mediator_metrics
from natbypass.signaling.service import (
    SIGNAL_OPT_PARAMETERS,
    check_signaling_options,
    makeSignalingServiceFromOptions,
)
from natbypass.stun.server import (
    DEFAULT_BURST,
    DEFAULT_GLOBAL_RATE,
    DEFAULT_RATE,
    DEFAULT_SOFTWARE,
    DEFAULT_TCP_PER_SOURCE,
    MAX_SOFTWARE_BYTES,
    ResponderConfig,
    STUNService,
)
from natbypass.stun.worker import MAX_WORKERS, STUNWorkers

Address = tuple[str, int]

DEFAULT_STUN = "0.0.0.0:3478"


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """
    An address to listen on: C{IP:PORT} (C{[IPv6]:PORT}), IP literals only:
    the responder must bind, and name in RFC 5780 responses, exact addresses.
    """
    return _parse_host_port(text, default_port, ip_only=True)


class Options(usage.Options):
    """Options of C{twistd natbypass-mediator}."""

    synopsis = "[options]"
    longdesc = (
        "Runs the NATbypass mediator: a STUN responder (RFC 8489 over UDP and TCP; RFC 5780 NAT "
        "behaviour discovery when --stun-alternate gives a second IP) and the signalling service "
        "that introduces peers."
    )
    optParameters: list[list[Any]] = [
        ["stun", None, DEFAULT_STUN,
         "IP:PORT of the STUN responder, UDP and TCP ([IPv6]:PORT for IPv6)."],
        ["stun-alternate", None, None,
         "Second IP[:PORT] for RFC 5780 (port defaults to the --stun port + 1). Needs a "
         "specific --stun IP; the responder then listens on both IPs x both ports."],
        ["stun6", None, None,
         "[IPv6]:PORT of a second STUN responder on IPv6, beside --stun (dual stack; off by default)."],
        ["stun6-alternate", None, None,
         "Second [IPv6][:PORT] for RFC 5780 over IPv6 (port defaults to the --stun6 port + 1)."],
        ["stun-rate", None, DEFAULT_RATE,
         "Most STUN requests per second answered per source IP, IPv6 per /64 (0: no limit, "
         "which lets anyone reflect traffic at spoofed addresses). High enough for a NAT with "
         "many users behind one IP: one NAT detection takes about 20 requests.", int],
        ["stun-burst", None, DEFAULT_BURST,
         "Requests a source may send at once on top of --stun-rate (a token bucket's size).", int],
        ["stun-global-rate", None, DEFAULT_GLOBAL_RATE,
         "Most STUN requests per second answered from all sources together, bursts of one "
         "second's worth (0: no limit). Keeps a flood from many sources, each under "
         "--stun-rate, from starving the signalling service of the same process.", int],
        ["stun-tcp-per-source", None, DEFAULT_TCP_PER_SOURCE,
         "Most STUN/TCP connections open at once per source IP, IPv6 per /64.", int],
        ["stun-tcp-max", None, None,
         "Most STUN/TCP connections open at once in all (default: 1000, or half the open-file "
         "limit left after a reserve of 64 when that is less); at the cap a newcomer evicts the "
         "oldest connection of the address holding the most. A connection must have a request "
         "answered within 2 s of connecting, then within 30 s of the last answer.", int],
        ["stun-workers", None, 1,
         "Processes answering STUN over UDP, sharing the ports with SO_REUSEPORT (the kernel spreads "
         "flows among them; one per core). 1: this process answers. With more, this process starts "
         "and supervises them (restarting one that dies) and keeps STUN/TCP, signalling and metrics; "
         "--stun-rate applies per worker (a source's flows may reach several), --stun-global-rate is "
         "split among them.", int],
        ["software", None, DEFAULT_SOFTWARE,
         f"SOFTWARE attribute of STUN responses, for diagnostics (at most {MAX_SOFTWARE_BYTES} "
         "bytes of UTF-8, since it makes every response larger; empty: none)."],
    ] + SIGNAL_OPT_PARAMETERS + [METRICS_OPT_PARAMETER]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self["stun-advertise"] = []

    def opt_stun_advertise(self, value: str) -> None:
        """
        PUBLIC=LOCAL: behind a 1:1 NAT (a cloud VM's external IPs), the public IP the NAT maps onto
        the local IP LOCAL of --stun or --stun-alternate; RFC 5780 responses name PUBLIC. Repeat it
        for each address.
        """
        try:
            self["stun-advertise"].append(parse_advertise(value))
        except ValueError as e:
            raise usage.UsageError(f"--stun-advertise {value!r}: {e}") from None

    def _responder(self, name: str, example: str) -> tuple[Address, Address | None]:
        """The primary and alternate addresses of C{--NAME} and C{--NAME-alternate}."""
        try:
            primary = parse_host_port(self[name])
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None
        alternate = None
        if self[f"{name}-alternate"] is not None:
            if primary[1] == 65535:
                default_port = None
            else:
                default_port = primary[1] + 1
            try:
                alternate = parse_host_port(self[f"{name}-alternate"], default_port)
            except ValueError as e:
                raise usage.UsageError(f"--{name}-alternate: {e}") from None
            if is_wildcard(primary[0]):
                raise usage.UsageError(
                    f"--{name}-alternate needs --{name} with a specific IP (e.g. --{name} {example}), "
                    f"not {primary[0]}: RFC 5780 responses name the IP that answered"
                )
        return primary, alternate

    def postOptions(self) -> None:
        primary, alternate = self._responder("stun", "192.0.2.10:3478")
        primary6 = alternate6 = None
        if self["stun6"] is not None:
            primary6, alternate6 = self._responder("stun6", "[2001:db8::10]:3478")
            if ":" not in primary6[0]:
                raise usage.UsageError(f"--stun6: needs an IPv6 address ([IPv6]:PORT), not {primary6[0]}")
            if self["stun-workers"] > 1:
                raise usage.UsageError("--stun6 with --stun-workers above 1 is not supported yet: use one of them")
        elif self["stun6-alternate"] is not None:
            raise usage.UsageError("--stun6-alternate needs --stun6 (the IPv6 responder's primary address)")
        for name in ("stun-rate", "stun-global-rate"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be 0 (no limit) or a positive number")
        for name in ("stun-burst", "stun-tcp-per-source"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["stun-tcp-max"] is not None and self["stun-tcp-max"] < 1:
            raise usage.UsageError("--stun-tcp-max must be at least 1")
        software = len(self["software"].encode("utf-8", "surrogatepass"))
        if software > MAX_SOFTWARE_BYTES:
            raise usage.UsageError(
                f"--software: at most {MAX_SOFTWARE_BYTES} bytes of UTF-8, not {software}: every "
                "STUN response carries it, so a long one makes the responder a better amplifier"
            )
        if self["stun-workers"] < 1:
            raise usage.UsageError("--stun-workers must be at least 1 (1: no worker processes)")
        if self["stun-workers"] > MAX_WORKERS:
            raise usage.UsageError(f"--stun-workers: at most {MAX_WORKERS} (one per core is enough)")
        # Each responder names the advertised public IPs of its own family.
        advertise = tuple(p for p in self["stun-advertise"] if ":" not in p[0])
        advertise6 = tuple(p for p in self["stun-advertise"] if ":" in p[0]) if primary6 else ()
        if primary6 is None or ":" in primary[0]:
            advertise, advertise6 = tuple(self["stun-advertise"]), ()
        try:
            ResponderConfig(primary, alternate, self["software"], advertise)
            if primary6 is not None:
                ResponderConfig(primary6, alternate6, self["software"], advertise6)
        except ValueError as e:
            raise usage.UsageError(f"STUN options: {e}") from None
        self["stun-advertise"] = advertise
        self["stun6-advertise"] = advertise6
        self["stun-address"] = primary
        self["stun-alternate-address"] = alternate
        self["stun6-address"] = primary6
        self["stun6-alternate-address"] = alternate6
        check_signaling_options(self)
        check_metrics_option(self)


def parse_advertise(text: str) -> tuple[str, str]:
    """C{PUBLIC=LOCAL} (two IP literals) -> (public, local); ValueError otherwise."""
    public, sep, local = text.partition("=")
    if not sep:
        raise ValueError("expected PUBLIC=LOCAL, two IP addresses (e.g. 203.0.113.5=10.128.0.2)")
    addresses = []
    for part in (public, local):
        part = part.strip().removeprefix("[").removesuffix("]")
        if not is_ip(part):
            raise ValueError(f"{part!r} is not an IP address (PUBLIC=LOCAL takes IPs, no ports: a 1:1 NAT keeps them)")
        addresses.append(part)
    return addresses[0], addresses[1]


def makeSTUNService(options: usage.Options, reactor: Any) -> STUNService | STUNWorkers:
    """
    The STUN responder from checked options (nothing is bound until it
    starts): this process's own, or with C{--stun-workers} above 1 a
    L{STUNWorkers} that runs the UDP side in worker processes.
    """
    kwargs = _responder_options(options, "stun-advertise")
    if options["stun-workers"] > 1:
        return STUNWorkers(
            reactor, options["stun-address"], options["stun-alternate-address"], options["stun-workers"], **kwargs
        )
    return STUNService(reactor, options["stun-address"], options["stun-alternate-address"], **kwargs)


def makeSTUN6Service(options: usage.Options, reactor: Any) -> STUNService | None:
    """The IPv6 responder of C{--stun6} (same limits as the IPv4 one, counted apart), or None."""
    if options["stun6-address"] is None:
        return None
    kwargs = _responder_options(options, "stun6-advertise")
    return STUNService(reactor, options["stun6-address"], options["stun6-alternate-address"], **kwargs)


def _responder_options(options: usage.Options, advertise: str) -> dict[str, Any]:
    """The keyword arguments both responders take from the options (C{advertise}: which list)."""
    return dict(
        software=options["software"],
        rate=options["stun-rate"],
        burst=options["stun-burst"],
        tcp_per_source=options["stun-tcp-per-source"],
        tcp_max=options["stun-tcp-max"],
        global_rate=options["stun-global-rate"],
        advertise=options[advertise],
    )


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """The mediator: STUN responder (C{"stun"}), signalling (C{"signal"}), with C{--metrics} C{"metrics"}."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    top = MultiService()
    stun = makeSTUNService(options, reactor)
    stun.setName("stun")
    stun.setServiceParent(top)
    stun6 = makeSTUN6Service(options, reactor)
    if stun6 is not None:
        stun6.setName("stun6")
        stun6.setServiceParent(top)
    signal = makeSignalingServiceFromOptions(options, reactor)
    signal.setName("signal")
    signal.setServiceParent(top)
    if options["metrics"] is not None:
        metrics = mediator_metrics(options["metrics"], reactor, stun, signal)
        metrics.setName("metrics")
        metrics.setServiceParent(top)
    return top

"""
The C{natbypass-mediator} twistd plugin: options and C{makeService}.

The mediator is two services under one C{MultiService}: the STUN responder
(C{natbypass.stun.server.STUNService}, named C{"stun"}) and the signalling
service (C{natbypass.signaling.service}, named C{"signal"}).  Each half
owns its options: the STUN ones are below, the signalling ones come from
C{SIGNAL_OPT_PARAMETERS} and are checked by C{check_signaling_options}.

    twistd -n natbypass-mediator --stun 192.0.2.10:3478 --stun-alternate 192.0.2.11:3479
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from natbypass.address import is_wildcard
from natbypass.address import parse_host_port as _parse_host_port
from natbypass.signaling.service import (
    SIGNAL_OPT_PARAMETERS,
    check_signaling_options,
    makeSignalingServiceFromOptions,
)
from natbypass.stun.server import (
    DEFAULT_SOFTWARE,
    MAX_SOFTWARE_BYTES,
    ResponderConfig,
    STUNService,
)

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
        ["stun-rate", None, 0,
         "Most STUN requests per second answered per source IP (0: no limit).", int],
        ["software", None, DEFAULT_SOFTWARE,
         f"SOFTWARE attribute of STUN responses (at most {MAX_SOFTWARE_BYTES} bytes; empty: none)."],
    ] + SIGNAL_OPT_PARAMETERS  # fmt: skip

    def postOptions(self) -> None:
        try:
            primary = parse_host_port(self["stun"])
        except ValueError as e:
            raise usage.UsageError(f"--stun: {e}") from None
        alternate = None
        if self["stun-alternate"] is not None:
            if primary[1] == 65535:
                default_port = None
            else:
                default_port = primary[1] + 1
            try:
                alternate = parse_host_port(self["stun-alternate"], default_port)
            except ValueError as e:
                raise usage.UsageError(f"--stun-alternate: {e}") from None
            if is_wildcard(primary[0]):
                raise usage.UsageError(
                    "--stun-alternate needs --stun with a specific IP (e.g. --stun 192.0.2.10:3478), "
                    f"not {primary[0]}: RFC 5780 responses name the IP that answered"
                )
        if self["stun-rate"] < 0:
            raise usage.UsageError("--stun-rate must be 0 (no limit) or a positive number")
        try:
            ResponderConfig(primary, alternate, self["software"])
        except ValueError as e:
            raise usage.UsageError(f"STUN options: {e}") from None
        self["stun-address"] = primary
        self["stun-alternate-address"] = alternate
        check_signaling_options(self)


def makeSTUNService(options: usage.Options, reactor: Any) -> STUNService:
    """The STUN responder from checked options (nothing is bound until it starts)."""
    return STUNService(
        reactor,
        options["stun-address"],
        options["stun-alternate-address"],
        software=options["software"],
        rate=options["stun-rate"],
    )


def makeService(options: usage.Options, reactor: Any = None) -> IService:
    """The mediator: STUN responder (C{"stun"}) and signalling (C{"signal"})."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    top = MultiService()
    stun = makeSTUNService(options, reactor)
    stun.setName("stun")
    stun.setServiceParent(top)
    signal = makeSignalingServiceFromOptions(options, reactor)
    signal.setName("signal")
    signal.setServiceParent(top)
    return top

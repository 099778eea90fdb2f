"""
The ``natbypass-peer`` twistd plugin: register with a mediator and accept
direct connections, echoing what arrives so reachability can be tested.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from natbypass.app.echo import EchoHandler
from natbypass.peer import Peer, PeerConfig, parse_wish
from natbypass.app.peer_options import stun_server
from natbypass.punch.candidates import PortRange
from natbypass.signaling.wire import PEER_ID


class Options(usage.Options):
    synopsis = "--mediator ENDPOINT --id NAME [options]"
    longdesc = (
        "Register NAME with the mediator and accept direct connections from other peers, "
        "echoing what they send.  --stun defaults to port 3478 on the mediator's host."
    )
    optParameters = [
        ["mediator", "m", None, "the mediator's signalling endpoint: tcp:HOST:7000 or tls:HOST:7443"],
        ["id", None, None, "our peer id at the mediator"],
        ["stun", None, None, "STUN server HOST[:PORT] (default: port 3478 on the mediator's host)"],
        ["token", None, None, "token for a mediator that requires one"],
        ["ca", None, None, "CA certificate (PEM) to verify a tls: mediator with"],
        ["protocol", None, "auto", "auto, udp, tcp or an ordered list like tcp,udp"],
        ["port-range", None, None, "local ports to use, LOW-HIGH"],
        ["timeout", None, 5.0, "seconds each protocol may try", float],
        ["keepalive", None, 15.0, "seconds between UDP keepalives", float],
    ]
    optFlags = [["no-discovery", None, "skip RFC 5780 NAT behaviour discovery"]]

    def postOptions(self) -> None:
        if not self["mediator"]:
            raise usage.UsageError("--mediator ENDPOINT is required (e.g. tcp:mediator.example:7000)")
        if not self["id"] or not PEER_ID.match(self["id"]):
            raise usage.UsageError("--id NAME is required: 1-64 of A-Z a-z 0-9 . _ @ : + -, starting alphanumeric")
        try:
            parse_wish(self["protocol"])
            self["port-range"] = PortRange.parse(self["port-range"]) if self["port-range"] else None
            self["stun"] = stun_server(self["stun"], self["mediator"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: Any = None) -> Peer:
    from natbypass.signaling.client import client_endpoint

    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    peer = Peer(
        reactor,
        options["id"],
        client_endpoint(reactor, options["mediator"], options["ca"]),
        options["stun"],
        token=options["token"],
        protocol=options["protocol"],
        config=PeerConfig(
            port_range=options["port-range"],
            punch_timeout=options["timeout"],
            keepalive_interval=options["keepalive"],
            discover=not options["no-discovery"],
        ),
    )
    peer.listen(EchoHandler())
    return peer

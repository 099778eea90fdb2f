"""
The C{natbypass-peer} twistd plugin: register with a mediator and accept
direct connections, serving the stream service C{echo} (and echoing
datagrams) so reachability can be tested, and forwarding streams to the TCP
targets it C{--expose}s (the serving side of C{natbypass forward -L}), and
listening where it C{--allow-remote-listen}s for peers that ask (the serving
side of C{natbypass forward -R}).
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from natbypass.app.echo import ECHO_SERVICE, EchoHandler, echo_factory
from natbypass.app.forward import parse_allow_listen, parse_expose, serve_exposed
from natbypass.app.peer_options import PEER_OPTIONS, OptionSpec, check_peer_options, make_peer, usage_parameters
from natbypass.app.remote_forward import serve_remote_listen
from natbypass.metrics import check_metrics_option, peer_metrics
from natbypass.peer import Peer
from natbypass.signaling.client import check_mediator_endpoint
from natbypass.signaling.wire import PEER_ID
from natbypass.trust import AllowList, TrustFileError

#: natbypass-peer's own options, besides the shared ones.
TAP_OPTIONS = (
    OptionSpec("keepalive", "seconds between keepalives on a path (QUIC PING, TCP keepalive)", default=15.0,
               coerce=float),
    OptionSpec("allow", "only peers listed in FILE may connect: one fingerprint a line, optionally with the id "
               "(a known_peers file works)", metavar="FILE"),
    OptionSpec("metrics", "serve Prometheus metrics on /metrics and a health check on /healthz at this Twisted "
               "server endpoint (e.g. tcp:9101:interface=127.0.0.1; no authentication)", metavar="ENDPOINT"),
    OptionSpec("allow-any", "any peer may connect (the default; each still proves the key its id is bound to)",
               flag=True),
)  # fmt: skip

_PARAMETERS, _FLAGS = usage_parameters(PEER_OPTIONS + TAP_OPTIONS)


class Options(usage.Options):
    """
    Options of C{twistd natbypass-peer}: the shared peer options plus
    keepalive and who may connect.  C{postOptions} checks them and loads the
    C{--allow} file, so mistakes are usage errors before anything starts.
    """

    synopsis = "--mediator ENDPOINT --id NAME [options]"
    longdesc = (
        "Register NAME with the mediator and accept direct connections from other peers, "
        "echoing what they send.  --stun defaults to port 3478 on the mediator's host."
    )
    optParameters = _PARAMETERS
    optFlags = _FLAGS

    def __init__(self) -> None:
        super().__init__()
        self["expose"] = []
        self["allow-remote-listen"] = []

    def opt_expose(self, value: str) -> None:
        """
        forward streams to this TCP target, [NAME=]HOST:PORT (repeatable; needs --allow FILE or an explicit
        --allow-any); natbypass forward -L PORT:HOST:PORT (or -L PORT:NAME) reaches it
        """
        try:
            self["expose"].append(parse_expose(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_allow_remote_listen(self, value: str) -> None:
        """
        let peers make us listen on this TCP port, [BIND:]PORT or [BIND:]LOW-HIGH (default bind 127.0.0.1;
        repeatable; needs --allow FILE or an explicit --allow-any): natbypass forward -R PORT:HOST:HOSTPORT
        listens here while it runs and forwards each connection back to its side
        """
        try:
            self["allow-remote-listen"].append(parse_allow_listen(value))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if not self["mediator"]:
            raise usage.UsageError("--mediator ENDPOINT is required (e.g. tcp:mediator.example:7000)")
        if not self["id"] or not PEER_ID.match(self["id"]):
            raise usage.UsageError("--id NAME is required: 1-64 of A-Z a-z 0-9 . _ @ : + -, starting alphanumeric")
        if self["allow"] and self["allow-any"]:
            raise usage.UsageError("give --allow FILE or --allow-any, not both")
        if self["expose"] and not (self["allow"] or self["allow-any"]):
            raise usage.UsageError(
                "--expose forwards into your network: say who may use it with --allow FILE (or --allow-any)"
            )
        if self["allow-remote-listen"] and not (self["allow"] or self["allow-any"]):
            raise usage.UsageError(
                "--allow-remote-listen opens ports here for other peers: say who may use it with --allow FILE "
                "(or --allow-any)"
            )
        try:
            check_mediator_endpoint(self["mediator"], self["ca"])
            check_peer_options(self)
            check_metrics_option(self)
            self["allow"] = AllowList.load(self["allow"]) if self["allow"] else None
        except (ValueError, TrustFileError) as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options, reactor: Any = None) -> Peer:
    """
    The service twistd runs: a L{Peer} that serves the C{echo} stream
    service (and echoes the datagrams of every direct connection,
    L{EchoHandler}) so reachability can be tested end to end, and forwards
    streams to what C{--expose} names, and listens where
    C{--allow-remote-listen} allows for the peers that ask.  C{reactor} is for tests; by default
    the installed one.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    peer = make_peer(reactor, options, allow=options["allow"], keepalive_interval=options["keepalive"])
    peer.listen(EchoHandler())
    peer.serve(ECHO_SERVICE, echo_factory())
    serve_exposed(peer, options["expose"], reactor)
    serve_remote_listen(peer, options["allow-remote-listen"], reactor)
    if options["metrics"] is not None:
        peer_metrics(options["metrics"], reactor, peer).setServiceParent(peer)
    return peer

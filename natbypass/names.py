"""
Host names with several addresses: a mediator cluster behind one DNS name
(C{--mediator tcp:mediator.example:7000}, where the name has an A or AAAA
record per mediator) and a STUN server given by name.

Twisted's C{tcp:} client endpoint connects to the first address only, and
its C{HostnameEndpoint} starts from the first address again at every
connection.  L{NameFailoverEndpoint} resolves the name at every connection
(so a changed record set is followed) and tries the addresses the way
C{FailoverEndpoint} tries an explicit list: from the one after the address
the last connection went to, each once.  So a peer whose mediator died
re-registers at the next address, and one that cannot be reached costs only
its connect error.

Resolution goes through an C{IHostnameResolver}: the reactor's (the
system's getaddrinfo, in its order) by default; L{NamesResolver} asks a
C{twisted.names} resolver instead (a given DNS server, as in the tests).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

#: Most addresses taken from one name (a hostile or broken DNS answer may hold hundreds).
MAX_ADDRESSES = 16


def is_address(host: str) -> bool:
    """Is C{host} an IPv4 or IPv6 literal (nothing to resolve)?"""
    return isIPAddress(host) or isIPv6Address(host)


@implementer(IResolutionReceiver)
class _Collector:
    """Gathers one resolution's addresses (in the resolver's order, without repeats, at most L{MAX_ADDRESSES})."""

    def __init__(self, host: str, done: Deferred[list[str]]) -> None:
        self.host = host
        self.done = done
        self.addresses: list[str] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.addresses and len(self.addresses) < MAX_ADDRESSES:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if self.done.called:  # cancelled meanwhile
            return
        if self.addresses:
            self.done.callback(self.addresses)
        else:
            self.done.errback(DNSLookupError(f"{self.host} has no address"))


def resolve_all(
    resolver: IHostnameResolver, host: str, port: int = 0, address_types: Any = None
) -> Deferred[list[str]]:
    """
    Every address of C{host} (IP literals as strings, the resolver's order),
    or a failure with C{DNSLookupError}.  An IP literal is its own answer.
    """
    if is_address(host):
        return succeed([host])
    done: Deferred[list[str]] = Deferred()
    resolver.resolveHostName(_Collector(host, done), host, port, address_types)
    return done


def resolve_address(reactor: Any, address: tuple[str, int]) -> Deferred[tuple[str, int]]:
    """
    C{(host, port)} with the host resolved to one IP (an IPv4 one when it
    has both: the peer's UDP socket is IPv4 unless bound otherwise), for a
    STUN server given by name; unchanged when it is already an IP literal.
    """
    host, port = address
    if is_address(host):
        return succeed(address)

    def pick(addresses: list[str]) -> tuple[str, int]:
        v4 = [a for a in addresses if isIPAddress(a)]
        return (v4 or addresses)[0], port

    return resolve_all(reactor.nameResolver, host, port).addCallback(pick)


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """The lookups run to their end (DNS timeouts bound them); the answer is then ignored."""


def _record_address(payload: Any) -> str:
    """The address of an A or AAAA record's payload, as text (C{Record_AAAA} has no C{dottedQuad})."""
    if isinstance(payload.address, bytes) and len(payload.address) == 16:
        return socket.inet_ntop(socket.AF_INET6, payload.address)
    return payload.dottedQuad()


@implementer(IHostnameResolver)
class NamesResolver:
    """
    An C{IHostnameResolver} over a C{twisted.names} C{IResolver}: every A
    record, then every AAAA record, of the name (CNAMEs followed by the
    resolver).  For a mediator cluster's name served by a DNS server of
    one's own, without touching the system's resolver configuration.
    """

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        from twisted.names import dns

        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        types = addressTypes or [IPv4Address, IPv6Address]
        lookups = []
        if IPv4Address in types:
            lookups.append((self.resolver.lookupAddress(hostName), dns.A, IPv4Address))
        if IPv6Address in types:
            lookups.append((self.resolver.lookupIPV6Address(hostName), dns.AAAA, IPv6Address))

        def answered(results: list[tuple[bool, Any]]) -> None:
            try:
                for (ok, result), (_, rtype, kind) in zip(results, lookups):
                    if not ok:
                        continue  # no such record (NXDOMAIN, no AAAA): the other lookup may have some
                    for rr in result[0][:MAX_ADDRESSES]:
                        if rr.type == rtype:
                            resolutionReceiver.addressResolved(kind("TCP", _record_address(rr.payload), portNumber))
            finally:  # whatever the answer held, the connect waiting on it goes on
                resolutionReceiver.resolutionComplete()

        DeferredList([d for d, _, _ in lookups], consumeErrors=True).addCallback(answered)
        return resolution


@implementer(IStreamClientEndpoint)
class NameFailoverEndpoint:
    """
    C{HOST:PORT} where HOST may have several addresses (one mediator each):
    resolved at every connection, then tried from the address after the one
    the last connection went to, each once (C{FailoverEndpoint}'s order).
    C{wrap} turns each address's TCP endpoint into the real one (TLS that
    checks the certificate against HOST, not the address).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        *,
        timeout: float = 30.0,
        wrap: Callable[[IStreamClientEndpoint], IStreamClientEndpoint] | None = None,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        self.reactor = reactor
        self.host, self.port, self.timeout = host, port, timeout
        self.wrap = wrap
        self.resolver = resolver if resolver is not None else reactor.nameResolver
        #: The address the last connection went to (None: none yet).
        self.last: str | None = None

    def _endpoint(self, address: str) -> IStreamClientEndpoint:
        kind = TCP6ClientEndpoint if isIPv6Address(address) else TCP4ClientEndpoint
        ep = kind(self.reactor, address, self.port, timeout=self.timeout)
        return self.wrap(ep) if self.wrap is not None else ep

    def order(self, addresses: list[str]) -> list[str]:
        """C{addresses} starting after the last one used (when it is still among them)."""
        if self.last in addresses:
            i = addresses.index(self.last) + 1
            return addresses[i:] + addresses[:i]
        return list(addresses)

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        from natbypass.signaling.client import FailoverEndpoint

        inner: list[Deferred[Any]] = []

        def cancel(_: Any) -> None:
            if inner and not inner[-1].called:
                inner[-1].cancel()

        result: Deferred[Any] = Deferred(cancel)

        def give(value: Any) -> None:
            if result.called:
                return
            if isinstance(value, Failure):
                result.errback(value)
            else:
                result.callback(value)

        def resolved(addresses: list[str]) -> None:
            if result.called:  # cancelled while resolving
                return
            addresses = self.order(addresses)
            if len(addresses) > 1:
                self.log.debug("{host} has {n} addresses; trying {addresses}", host=self.host, n=len(addresses),
                               addresses=addresses)  # fmt: skip
            failover = FailoverEndpoint([self._endpoint(a) for a in addresses])
            d = failover.connect(protocolFactory)
            inner.append(d)

            def connected(proto: Any) -> Any:
                self.last = addresses[failover.current]
                return proto

            d.addCallback(connected).addBoth(give)

        resolving = resolve_all(self.resolver, self.host, self.port)
        inner.append(resolving)
        resolving.addCallbacks(resolved, give)
        return result

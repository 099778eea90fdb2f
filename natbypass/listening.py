"""
Listening on a Twisted server endpoint from inside a service, and telling
whoever waits (tests, the metrics' health check, the operator) when it is.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure


class EndpointListener:
    """
    One listener of a service: L{listen} in C{startService}, L{stop} in
    C{stopService}; L{whenListening} fires with the port once it is bound
    (at once when it already is), or fails with why it could not be.
    """

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, what: str) -> None:
        self.endpoint = endpoint
        self.what = what
        self._listening: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    @property
    def port(self) -> IListeningPort | None:
        """The bound port, or None before it is bound and after L{stop}."""
        return self._port

    def listen(self, factory: Any) -> None:
        """Start listening with C{factory}; a failure is logged and handed to the waiters."""
        self._listening = self.endpoint.listen(factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def _listened(self, port: IListeningPort) -> None:
        self._port = port
        self.log.info("{what} listening on {address}", what=self.what, address=port.getHost())
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(port)

    def _failed(self, f: Failure) -> None:
        self.log.failure("{what} cannot listen", f, what=self.what)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(f)

    def whenListening(self) -> Deferred[IListeningPort]:
        """The listening port, once bound (C{getHost()} tells the address)."""
        if self._port is not None:
            return succeed(self._port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    def stop(self) -> Deferred[None]:
        """Stop listening (or stop trying to); fires when the port is closed."""
        port, self._port = self._port, None
        if self._listening is not None and not self._listening.called:
            self._listening.cancel()
        self._listening = None
        return succeed(None) if port is None else maybeDeferred(port.stopListening)

"""An application's side of an L{natbypass.interfaces.IPeerConnection}, for tests."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from natbypass.interfaces import IPeerReceiver


@implementer(IPeerReceiver)
class RecordingReceiver:
    """
    Records what a connection delivers: C{data} is the bytes of a stream
    (or, with C{datagrams}, the list of datagrams), C{lost} the loss reasons,
    and C{got} fires at the first delivery.
    """

    def __init__(self, datagrams: bool = False) -> None:
        self.data: Any = [] if datagrams else b""
        self.lost: list[Any] = []
        self.got: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        """Keep C{data}; the first delivery fires C{got}."""
        if isinstance(self.data, list):
            self.data.append(data)
        else:
            self.data += data
        if not self.got.called:
            self.got.callback(None)

    def connectionLost(self, reason: Any) -> None:
        """Keep the reason."""
        self.lost.append(reason)

"""
Test doubles for port mapping (used by tests only): a gateway that answers
NAT-PMP and PCP on a memory network the way miniupnpd does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import DatagramProtocol

from . import natpmp, pcp

#: The external address the fake gateway hands out.
EXT = "198.51.100.7"


class FakeGateway(DatagramProtocol):
    """
    Answers NAT-PMP and PCP on port 5351 as miniupnpd does; C{pcp}/C{natpmp} False: silent for that one.
    C{requests}: every request decoded, in order.
    """

    def __init__(self, pcp_on: bool = True, natpmp_on: bool = True, pcp_result: int = 0) -> None:
        self.pcp_on, self.natpmp_on, self.pcp_result = pcp_on, natpmp_on, pcp_result
        self.requests: list[Any] = []
        self.next_port = 40000

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        if data[0] == pcp.VERSION:
            req = pcp.decode_map_request(data)
            self.requests.append(req)
            if not self.pcp_on:
                return
            if req.client != addr[0]:
                result = pcp.Result.ADDRESS_MISMATCH
            else:
                result = self.pcp_result
            port = req.external_port or self.next_port
            r = pcp.MapResponse(
                result, min(req.lifetime, 3600), 7, req.nonce, req.protocol, req.internal_port, port, EXT
            )
            self.transport.write(r.encode(), addr)
            return
        req = natpmp.decode_request(data)
        self.requests.append(req)
        if not self.natpmp_on:
            return
        if isinstance(req, natpmp.ExternalAddressRequest):
            self.transport.write(natpmp.ExternalAddressResponse(0, 7, EXT).encode(), addr)
        else:
            port = 0 if req.lifetime == 0 else self.next_port
            r = natpmp.MapResponse(req.protocol, 0, 7, req.internal_port, port, min(req.lifetime, 3600))
            self.transport.write(r.encode(), addr)

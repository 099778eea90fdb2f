"""The errors of the port-mapping layer: one for bytes that break a codec, one for a gateway that says no."""

from __future__ import annotations


class DecodeError(ValueError):
    """A NAT-PMP, PCP, SSDP or SOAP message that does not parse; the message says what is wrong."""


class MappingError(Exception):
    """
    A gateway answered but refused (C{code} is the protocol's result or
    UPnP error code), or did not answer at all (C{code} None).  C{method}
    names the protocol: C{pcp}, C{natpmp} or C{upnp}.
    """

    def __init__(self, method: str, reason: str, code: int | None = None) -> None:
        super().__init__(f"{method}: {reason}")
        self.method = method
        self.reason = reason
        self.code = code

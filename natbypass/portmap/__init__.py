"""
Port mapping on the gateway (PCP, NAT-PMP, UPnP-IGD): the codecs
(L{natpmp}, L{pcp}, L{upnp}), their Twisted clients and the L{PortMapper}
service.  Off unless asked for (C{PeerConfig.port_mapping}, C{--port-mapping}).
"""

from .errors import DecodeError, MappingError
from .interfaces import IPortMappingClient, PortMapping
from .mapper import PortMapper

__all__ = ["DecodeError", "IPortMappingClient", "MappingError", "PortMapper", "PortMapping"]

"""
UPnP-IGD: SSDP discovery, the device description and SOAP
AddPortMapping / DeletePortMapping / GetExternalIPAddress.

The parsers are pure; L{UpnpClient} does the I/O with Twisted: one SSDP
M-SEARCH sent by unicast to the gateway's port 1900 (never multicast, so
nothing but the gateway is asked), an HTTP GET of the description it
points to, and SOAP POSTs to the WAN connection service.  Every step is
bounded by the client's budget and every body by L{MAX_BODY}.

Why not the C{miniupnpc} binding (it installs from a wheel here): it
discovers by multicast on every interface, blocks (a thread per call that
cannot be cancelled), and would be a new compiled dependency, for three
HTTP requests this module makes in about 250 lines.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Any
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from natbypass.net import route_source_address

from .client import doubling_times, udp_request
from .errors import DecodeError, MappingError
from .interfaces import IPortMappingClient, PortMapping

SSDP_PORT = 1900
IGD = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WAN_SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
MAX_BODY = 64 * 1024
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
#: UPnP errors AddPortMapping may answer with that another port or lease may cure.
CONFLICT, ONLY_PERMANENT = 718, 725

HttpRequest = Callable[[bytes, str, Mapping[str, str], bytes], Deferred[tuple[int, bytes]]]


def search_request(target: str = IGD) -> bytes:
    """An SSDP M-SEARCH for C{target} (RFC-style HTTP over UDP)."""
    return (
        f'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 1\r\nST: {target}\r\n\r\n'
    ).encode("ascii")


def parse_search_response(data: bytes) -> dict[str, str]:
    """
    The headers of an SSDP answer (names lower-cased); it must be a 200 with
    an http LOCATION.

    @raise DecodeError: otherwise.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("an SSDP answer is not UTF-8") from None
    lines = text.split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/") or status[1] != "200":
        raise DecodeError(f"not an SSDP 200 answer: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise DecodeError(f"SSDP header line without a colon: {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    location = headers.get("location", "")
    parts = urlsplit(location)
    if parts.scheme != "http" or not parts.hostname:
        raise DecodeError(f"SSDP LOCATION is not an http URL: {location[:80]!r}")
    return headers


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_description(xml: bytes, location: str) -> tuple[str, str]:
    """
    The WAN connection service of a device description: C{(service type,
    absolute control URL)}, the first of L{WAN_SERVICES} found.

    @raise DecodeError: not XML, or no such service.
    """
    if len(xml) > MAX_BODY:
        raise DecodeError(f"device description over {MAX_BODY} bytes")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise DecodeError(f"device description is not XML: {e}") from None
    base = location
    found: dict[str, str] = {}
    for el in root.iter():
        name = _local(el.tag)
        if name == "URLBase" and el.text and el.text.strip():
            base = el.text.strip()
        elif name == "service":
            fields = {_local(c.tag): (c.text or "").strip() for c in el}
            kind, control = fields.get("serviceType", ""), fields.get("controlURL", "")
            if kind in WAN_SERVICES and control and kind not in found:
                found[kind] = control
    for kind in WAN_SERVICES:
        if kind in found:
            url = urljoin(base, found[kind])
            if urlsplit(url).scheme != "http":
                raise DecodeError(f"control URL is not http: {url[:80]!r}")
            return kind, url
    raise DecodeError("the device offers no WANIPConnection or WANPPPConnection service")


def soap_request(service: str, action: str, arguments: list[tuple[str, str]]) -> tuple[dict[str, str], bytes]:
    """The headers and body of a SOAP call of C{action}."""
    args = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in arguments)
    body = (
        '<?xml version="1.0"?>\r\n'
        f'<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{service}">{args}</u:{action}></s:Body></s:Envelope>\r\n'
    ).encode()
    headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service}#{action}"'}
    return headers, body


def parse_soap_response(status: int, body: bytes, action: str) -> dict[str, str]:
    """
    The output arguments of a SOAP answer to C{action}.

    @raise MappingError: a SOAP fault (its UPnP errorCode as C{code}).
    @raise DecodeError: anything that is neither an answer nor a fault.
    """
    if len(body) > MAX_BODY:
        raise DecodeError(f"SOAP answer over {MAX_BODY} bytes")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise DecodeError(f"SOAP answer (HTTP {status}) is not XML: {e}") from None
    for el in root.iter():
        name = _local(el.tag)
        if name == f"{action}Response" and status == 200:
            return {_local(c.tag): (c.text or "").strip() for c in el}
        if name == "UPnPError":
            fields = {_local(c.tag): (c.text or "").strip() for c in el}
            code = fields.get("errorCode", "")
            description = fields.get("errorDescription", "") or "no description"
            number = int(code) if code.isdigit() and len(code) < 6 else None
            raise MappingError("upnp", f"{action} refused: {number} {description[:100]}", number)
    raise DecodeError(f"HTTP {status} without a {action}Response or a UPnPError")


def agent_request(reactor: Any, timeout: float) -> HttpRequest:
    """An L{HttpRequest} over C{twisted.web.client.Agent}: C{timeout} to connect, bodies cut at L{MAX_BODY}."""
    from twisted.web.client import Agent, FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    agent = Agent(reactor, connectTimeout=timeout)

    async def request(method: bytes, url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        producer = FileBodyProducer(BytesIO(body)) if body else None
        h = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        response = await agent.request(method, url.encode(), h, producer)
        if response.length is not None and response.length != -1 and response.length > MAX_BODY:
            response.deliverBody(_Discard())
            raise DecodeError(f"HTTP body over {MAX_BODY} bytes")
        return response.code, await readBody(response)

    return lambda *a: defer.ensureDeferred(request(*a))


class _Discard:
    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        pass


@implementer(IPortMappingClient)
class UpnpClient:
    """
    UPnP-IGD against one gateway: discovered once (cached), then SOAP calls.
    C{http} makes the HTTP requests (tests inject a fake).
    """

    method = "upnp"

    def __init__(
        self,
        reactor: Any,
        gateway: str,
        *,
        clock: IReactorTime | None = None,
        budget: float = 3.0,
        local_host: str | None = None,
        http: HttpRequest | None = None,
        description: str = "natbypass",
        rand: Callable[[int, int], int] = random.randint,
    ) -> None:
        self.reactor = reactor
        self.clock = clock or reactor
        self.gateway = gateway
        self.budget = budget
        self.local_host = local_host
        self.http = http or agent_request(reactor, budget)
        self.description = description
        self.rand = rand
        self.service: tuple[str, str] | None = None

    def _local(self) -> str:
        return self.local_host if self.local_host is not None else route_source_address((self.gateway, SSDP_PORT))

    def _bounded(self, d: Deferred[Any], what: str) -> Deferred[Any]:
        def timed_out(f: Any) -> Any:
            f.trap(defer.TimeoutError)
            raise MappingError(self.method, f"{what}: no answer from {self.gateway} in {self.budget:g} s")

        return d.addTimeout(self.budget, self.clock).addErrback(timed_out)

    async def discover(self) -> tuple[str, str]:
        """The WAN connection service (type, control URL), found by unicast SSDP and the description."""
        if self.service is not None:
            return self.service
        answer = await udp_request(
            self.reactor,
            (self.gateway, SSDP_PORT),
            search_request(),
            parse_search_response,
            lambda headers: True,
            doubling_times(0.25, self.budget, limit=4),
            self.budget,
            self.method,
            clock=self.clock,
            local_host=self._local(),
            connect=False,  # the answer comes from another port than 1900
        )
        location = answer["location"]
        if urlsplit(location).hostname != self.gateway:
            raise MappingError(self.method, f"the gateway points elsewhere ({location[:80]!r}); not following")
        status, xml = await self._bounded(self.http(b"GET", location, {}, b""), "device description")
        if status != 200:
            raise MappingError(self.method, f"device description: HTTP {status}")
        self.service = parse_description(xml, location)
        return self.service

    async def _call(self, action: str, arguments: list[tuple[str, str]]) -> dict[str, str]:
        service, control = await self.discover()
        headers, body = soap_request(service, action, arguments)
        status, answer = await self._bounded(self.http(b"POST", control, headers, body), action)
        try:
            return parse_soap_response(status, answer, action)
        except DecodeError as e:
            raise MappingError(self.method, str(e)) from None

    async def externalAddress(self) -> str:
        """GetExternalIPAddress."""
        out = await self._call("GetExternalIPAddress", [])
        address = out.get("NewExternalIPAddress", "")
        if not address:
            raise MappingError(self.method, "the gateway has no external address")
        return address

    async def _map(self, protocol: str, internal_port: int, lifetime: int, previous: PortMapping | None) -> PortMapping:
        local = self._local()
        port = previous.external[1] if previous is not None else internal_port
        lease = int(lifetime)
        for _ in range(4):
            args = [
                ("NewRemoteHost", ""),
                ("NewExternalPort", str(port)),
                ("NewProtocol", protocol.upper()),
                ("NewInternalPort", str(internal_port)),
                ("NewInternalClient", local),
                ("NewEnabled", "1"),
                ("NewPortMappingDescription", self.description),
                ("NewLeaseDuration", str(lease)),
            ]
            try:
                await self._call("AddPortMapping", args)
                break
            except MappingError as e:
                if e.code == CONFLICT and previous is None:
                    port = self.rand(20000, 60000)
                elif e.code == ONLY_PERMANENT and lease:
                    lease = 0
                else:
                    raise
        else:
            raise MappingError(self.method, "every external port tried is taken", CONFLICT)
        address = await self.externalAddress()
        # A permanent lease (0) is still renewed, as if it were the one asked for.
        return PortMapping(
            self.method, protocol, internal_port, (address, port), lease or lifetime, self.clock.seconds()
        )

    def map(
        self, protocol: str, internal_port: int, lifetime: int, previous: PortMapping | None = None
    ) -> Deferred[PortMapping]:
        return defer.ensureDeferred(self._map(protocol, internal_port, lifetime, previous))

    def unmap(self, mapping: PortMapping) -> Deferred[None]:
        args = [
            ("NewRemoteHost", ""),
            ("NewExternalPort", str(mapping.external[1])),
            ("NewProtocol", mapping.protocol.upper()),
        ]
        return defer.ensureDeferred(self._call("DeletePortMapping", args)).addCallback(lambda _: None)

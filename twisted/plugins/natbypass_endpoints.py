# The natbypass: endpoint string parsers.  Importing this file must stay
# cheap (Twisted imports every plugin file to list plugins): the parsers load
# natbypass.endpoints only when a natbypass: string is parsed.
from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class NATbypassClientParser:
    """natbypass:PEER[:SERVICE]:mediator=...:id=...: a stream to a peer's service (docs/endpoints.md)."""

    prefix = "natbypass"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from natbypass.endpoints import clientFromArgs

        return clientFromArgs(reactor, args, kwargs)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class NATbypassServerParser:
    """natbypass:SERVICE:mediator=...:id=...:allow=FILE: serve a service to approved peers (docs/endpoints.md)."""

    prefix = "natbypass"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from natbypass.endpoints import serverFromArgs

        return serverFromArgs(reactor, args, kwargs)


natbypassClientParser = NATbypassClientParser()
natbypassServerParser = NATbypassServerParser()

# Only ServiceMaker lines: importing this file must stay cheap.
from twisted.application.service import ServiceMaker

natbypassMediator = ServiceMaker(
    "NATbypass mediator",
    "natbypass.app.mediator_tap",
    "STUN responder (RFC 8489/5780) and signalling service for NAT traversal",
    "natbypass-mediator",
)
natbypassPeer = ServiceMaker(
    "NATbypass peer",
    "natbypass.app.peer_tap",
    "A peer that registers with a mediator and accepts direct connections",
    "natbypass-peer",
)

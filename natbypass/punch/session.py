"""
What both traversal engines need to know about a mediated session.

The signalling client builds one L{PunchSession} from what the mediator
sent; the UDP and TCP engines only read it.
"""

from __future__ import annotations

from dataclasses import dataclass


def decide_role(local_peer_id: str, remote_peer_id: str) -> int:
    """
    Our role in the session: 0 when our id sorts lower, else 1.

    Both sides compute it from the same two ids, so they agree without a round
    trip; role 0 plays "client" on the TCP path and the role bit keeps each
    side's packets from being reflected back to it as the peer's.
    """
    if local_peer_id == remote_peer_id:
        raise ValueError(f"both peers have the id {local_peer_id!r}; roles need distinct ids")
    return 0 if local_peer_id < remote_peer_id else 1


@dataclass(frozen=True)
class PunchSession:
    """The shared facts of one session (both peers hold the same, except C{role})."""

    session_id: str
    #: The 32-byte session key from the mediator; authenticates every packet.
    key: bytes
    #: 0 or 1, see L{decide_role}.
    role: int
    #: The remote peer's id, for the connection object and logs.
    peer_id: str = ""

    def __post_init__(self) -> None:
        if self.role not in (0, 1):
            raise ValueError(f"role must be 0 or 1, not {self.role!r}")
        if len(self.key) < 16:
            raise ValueError(f"session key is {len(self.key)} bytes; need at least 16")
        if not 1 <= len(self.session_id.encode()) <= 64:
            raise ValueError("session id must be 1..64 bytes of UTF-8")

    @property
    def sid(self) -> bytes:
        """The session id as it appears on the wire."""
        return self.session_id.encode()

    @property
    def peer_role(self) -> int:
        return 1 - self.role


class PunchFailed(Exception):
    """
    A traversal attempt gave up; C{reason} says why in words a person can act on.

    C{protocol} is C{"udp"} or C{"tcp"}, so an outcome can say which failed.
    """

    def __init__(self, protocol: str, reason: str) -> None:
        super().__init__(f"{protocol}: {reason}")
        self.protocol = protocol
        self.reason = reason

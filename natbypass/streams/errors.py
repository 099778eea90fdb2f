"""Why a stream failed, as exceptions a protocol's C{connectionLost} or an opener's Deferred carries."""

from __future__ import annotations

from twisted.internet.error import ConnectionDone, ConnectionLost


class StreamError(ConnectionLost):
    """A stream ended abnormally (a C{ConnectionLost}, so Twisted code treats it as one)."""

    def __str__(self) -> str:
        return " ".join(str(a) for a in self.args) or "the stream ended abnormally"


def plain(error: BaseException) -> str:
    """An error's own words, without the boilerplate Twisted's connection errors put first."""
    if isinstance(error, ConnectionLost | ConnectionDone) and error.args:
        return " ".join(str(a) for a in error.args)
    return str(error)


class StreamRefused(StreamError):
    """
    The peer refused to open the stream: no such service, not exposed to us,
    or the service's own refusal.  C{reason} is the peer's words.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"stream refused by the peer: {self.reason}"


class StreamReset(StreamError):
    """The stream was reset (aborted) by the peer or by a protocol error; C{code} says which."""

    def __init__(self, reason: str, code: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def __str__(self) -> str:
        return self.reason

"""
The UDP path's carrier: QUIC's own streams (no head-of-line blocking
between them), with the stream layer's credit travelling on a control
stream of each side (4 for role 0, 5 for role 1: each side's first stream
after its authentication stream).

QUIC's own flow control cannot be tied to what the application consumed
(the engines grant credit as data arrives), so the stream layer's credit is
what bounds a paused stream; QUIC's is left generous.  A stream counts as
writable while the engine holds less than L{QUIC_HIGH_WATER} of it unsent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from natbypass.streams import frames
from natbypass.streams.session import StreamSession

#: The first byte of each control stream: the stream layer's version.
CONTROL_PREFACE = b"\x01"
#: Unsent bytes of one stream the engine may hold before the stream waits.
QUIC_HIGH_WATER = 256 * 1024


class QuicCarrier:
    """
    Streams over a ready L{natbypass.secure.quic.QuicChannel}.

    @param on_dead: called with a reason when the peer broke the stream
        layer's rules on the control stream (the connection must end).
    """

    path = "udp"

    def __init__(self, channel: Any, role: int, on_dead: Callable[[str], None]) -> None:
        self._channel = channel
        self._control = 4 + role
        self._peer_control = 4 + (1 - role)
        self._on_dead = on_dead
        self._decoder = frames.FrameDecoder(allowed=frozenset({frames.WINDOW_UPDATE, frames.GO_AWAY}))
        self._preface_seen = False
        self._flushing = False
        self._blocked = False
        self.session: StreamSession | None = None
        # Opening the control stream first keeps QUIC's stream numbering in step with ours.
        channel.sendStream(self._control, CONTROL_PREFACE)

    # --- Carrier --------------------------------------------------------------------

    def openStream(self) -> int:
        return int(self._channel.openStream())

    def writeStream(self, stream_id: int, data: bytes, fin: bool) -> None:
        self._channel.sendStream(stream_id, data, fin)

    def resetStream(self, stream_id: int, code: int) -> None:
        self._channel.resetStream(stream_id, code)

    def writeControl(self, frame: bytes) -> None:
        self._channel.sendStream(self._control, frame)

    def writable(self, stream_id: int) -> bool:
        if self._channel.sendBuffer(stream_id) < QUIC_HIGH_WATER:
            return True
        self._blocked = True
        return False

    def canOpen(self) -> bool:
        if self._channel.canOpenStream():
            return True
        self._blocked = True  # look again after the next packets (the peer raises the limit as streams end)
        return False

    # --- from the channel -----------------------------------------------------------

    def streamReceived(self, stream_id: int, data: bytes, fin: bool) -> None:
        session = self.session
        if session is None:
            return
        if stream_id == self._peer_control:
            self._controlReceived(data, fin)
        elif stream_id == self._control:
            self._on_dead("the peer wrote on our control stream")
        else:
            session.streamData(stream_id, data, fin)

    def _controlReceived(self, data: bytes, fin: bool) -> None:
        if not self._preface_seen and data:
            if data[:1] != CONTROL_PREFACE:
                self._on_dead(f"the peer's stream layer is not version {CONTROL_PREFACE[0]}")
                return
            self._preface_seen = True
            data = data[1:]
        try:
            decoded = self._decoder.feed(data)
        except frames.FrameError as e:
            self._on_dead(f"the peer broke the control stream: {e}")
            return
        if fin:
            self._on_dead("the peer closed its control stream")
            return
        assert self.session is not None
        for frame in decoded:
            self.session.control(frame)

    def streamReset(self, stream_id: int, code: int) -> None:
        if self.session is not None and stream_id not in (self._control, self._peer_control):
            self.session.streamReset(stream_id, code)

    def pumped(self) -> None:
        """The engine sent what it could: streams that waited for room may go on."""
        if not self._blocked or self._flushing or self.session is None:
            return
        self._blocked = False
        self._flushing = True
        try:
            self.session.writable()
        finally:
            self._flushing = False

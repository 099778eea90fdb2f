"""
QUIC over the punched UDP path, both sides authenticated by pinned keys.

L{QuicChannel} drives a sans-I/O QUIC engine (aioquic or its fork qh3) the
Twisted way: it is fed datagrams (L{QuicChannel.datagramReceived}), sends
through a callable (so it sits on the punch mux's socket, demultiplexed with
L{is_quic}), feeds the engine C{clock.seconds()} and keeps exactly one timer
from the engine's C{get_timer()}.

Authentication.  Both sides present the self-signed certificate of their
identity key in the QUIC handshake, but neither engine lets a server ask for
and check a client certificate through a public API, and aioquic does not
show the client the server's certificate either.  So each side proves its key
I{inside} the channel, bound to it:

  1. Each side derives a channel binding from the connection's server 1-RTT
     traffic secret (read from the engine's C{secrets_log_file} hook, held in
     memory only)::

       binding = HMAC-SHA256(server_ap_secret,
                             "natbypass quic channel binding v2" 0x00 || client_random)

     The secret comes from the (EC)DHE key schedule over the transcript up to
     the server's Finished: only the two endpoints of this one QUIC connection
     know it.  The server has it as soon as it sends its first flight, the
     client once it reads that flight.
  2. The server sends, as 0.5-RTT data on its first bidirectional stream
     (1), an AUTH message: its raw Ed25519 public key and a signature over
     C{"natbypass quic auth v2" 0x00 || role || binding}.
  3. The client, when its handshake completes, checks the server's AUTH
     (signature against I{its} binding, the fingerprint with its
     L{PeerCheck}, and with qh3 that the TLS certificate carries the same
     key); only if it passes does it send its own AUTH on stream 0 (with its
     Finished) and is ready: one round trip.  A client never shows its proof
     to a server it refused.
  4. The server checks the client's AUTH the same way and is ready: one and
     a half round trips.

A relay in the middle holds two connections with two different bindings, so
it can neither forward one side's proof to the other nor make its own without
the key.  Nothing is delivered to the application, and it cannot send, until
L{QuicChannel.ready} fired.  See C{docs/security.md}.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from typing import Protocol as TypingProtocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from natbypass.identity import BadSignature, Fingerprint, Identity, load_public_key, verify
from natbypass.trust import PeerCheck, PeerRejected, as_check

__all__ = [
    "ALPN",
    "ENGINES",
    "QuicChannel",
    "QuicClosed",
    "QuicEngine",
    "QuicReceiver",
    "get_engine",
    "is_quic",
    "long_header_cids",
    "warm_up",
]

Address = tuple[str, int]

#: The ALPN protocol both sides offer.
ALPN = "natbypass/2"
#: Engines in order of preference (measured: see C{bench/quic_bench.py}).
ENGINES = ("qh3", "aioquic")
#: The streams that carry the AUTH messages (the client's first bidirectional
#: stream, the server's first); never shown to the application.
AUTH_STREAM = 0
SERVER_AUTH_STREAM = 1
AUTH_STREAMS = (AUTH_STREAM, SERVER_AUTH_STREAM)
AUTH_MAGIC = b"NBQA"
AUTH_VERSION = 2
AUTH = struct.Struct("!4sBB32s64s")
BINDING_CONTEXT = b"natbypass quic channel binding v2\x00"
PROOF_CONTEXT = b"natbypass quic auth v2\x00"
#: Application error code of a close because the peer failed authentication.
AUTH_FAILED = 0x4E42
#: An upper bound on the DATAGRAM frame payload of a channel; each channel's
#: own C{max_datagram_size} (what one packet of its engine's configuration
#: holds, see L{QuicEngine.max_datagram_payload}) is the one that counts.
MAX_DATAGRAM = 1168
#: What may arrive before the channel is ready (bytes of stream data, datagrams).
MAX_EARLY_BYTES = 256 * 1024
MAX_EARLY_DATAGRAMS = 64

#: The one QUIC version we speak (RFC 9000), so C{cipher} can name it.
QUIC_V1 = 0x00000001
_QUIC_VERSIONS = (b"\x00\x00\x00\x00", b"\x00\x00\x00\x01", b"\x6b\x33\x43\xcf")


def is_quic(data: bytes) -> bool:
    """
    Is C{data} a QUIC packet (RFC 9443), as opposed to STUN or a punch packet?

    Short headers start 0b01; long headers 0b11 and then a version.  Punch
    packets (C{0xCE 0x02 ...}) also start 0b11, but their second byte is
    their version (2; 1 before), never the first byte of a QUIC version (0,
    v1, v2), so no QUIC version matches them.
    """
    if len(data) < 5:
        return False
    first = data[0]
    if first & 0xC0 == 0x40:
        return True
    return first & 0xC0 == 0xC0 and data[1:5] in _QUIC_VERSIONS


def long_header_cids(data: bytes) -> tuple[bytes, bytes] | None:
    """
    The destination and source connection ids of a QUIC long-header packet
    (RFC 9000 section 17.2: first byte, version, then each id after its
    one-byte length, at most 20 bytes each), or None for anything else.
    """
    if len(data) < 7 or data[0] & 0x80 == 0:
        return None
    dcid_len = data[5]
    scid_at = 6 + dcid_len
    if dcid_len > 20 or len(data) <= scid_at:
        return None
    scid_len = data[scid_at]
    if scid_len > 20 or len(data) < scid_at + 1 + scid_len:
        return None
    return bytes(data[6:scid_at]), bytes(data[scid_at + 1 : scid_at + 1 + scid_len])


#: The least round trip a channel's engine is told to assume (one fast probe is not the whole story).
MIN_INITIAL_RTT = 0.02

#: The longest a clean close waits for written stream data to be acknowledged.
DRAIN_TIMEOUT = 5.0

#: What the engines raise for a write on a connection the peer has just closed (qh3, aioquic).
_CLOSED_ERRORS = frozenset({"QuicConnectionError"})


class QuicClosed(Exception):
    """
    The QUIC connection ended; C{code} and C{reason} say how (the peer's
    close, an idle timeout, ...); C{local} is True when we closed it.
    """

    def __init__(self, code: int, reason: str, local: bool) -> None:
        who = "closed by us" if local else "closed"
        super().__init__(f"QUIC connection {who}: {reason or 'no reason'} (code {code:#x})")
        self.code = code
        self.reason = reason
        self.local = local


class QuicReceiver(TypingProtocol):
    """What the application gives L{QuicChannel.setReceiver}."""

    def streamReceived(self, stream_id: int, data: bytes, fin: bool) -> None: ...

    def datagramFrameReceived(self, data: bytes) -> None: ...

    def streamReset(self, stream_id: int, code: int) -> None: ...

    def pumped(self) -> None: ...

    def connectionLost(self, reason: Failure) -> None: ...


class _KeyLog:
    """A C{secrets_log_file} that keeps the server's 1-RTT traffic secret in memory."""

    WANTED = ("SERVER_TRAFFIC_SECRET_0",)

    def __init__(self) -> None:
        self.secrets: dict[str, bytes] = {}
        self.client_random = b""
        #: The labels of every secret the engine derived so far (no secrets).
        self.labels: set[str] = set()

    def write(self, line: str) -> None:
        parts = line.split()
        if parts:
            self.labels.add(parts[0])
        if len(parts) == 3 and parts[0] in self.WANTED and parts[0] not in self.secrets:
            self.client_random = bytes.fromhex(parts[1])
            self.secrets[parts[0]] = bytes.fromhex(parts[2])

    def flush(self) -> None:
        pass

    def binding(self) -> bytes | None:
        """The channel binding, or None while the server's 1-RTT secret is unknown."""
        key = self.secrets.get("SERVER_TRAFFIC_SECRET_0")
        if key is None:
            return None
        return hmac.new(key, BINDING_CONTEXT + self.client_random, hashlib.sha256).digest()


def proof_message(role: int, binding: bytes) -> bytes:
    """What a side signs: the context, its role (0 client, 1 server), the binding."""
    return PROOF_CONTEXT + bytes([role]) + binding


@dataclass(frozen=True)
class QuicEngine:
    """One sans-I/O QUIC library, behind the few calls L{QuicChannel} makes."""

    name: str
    configuration: Any
    connection: Any
    events: ModuleType
    _packet: ModuleType
    _buffer: Any
    _tls: ModuleType

    def config(
        self,
        is_client: bool,
        identity: Identity,
        certificate: x509.Certificate,
        idle_timeout: float,
        keylog: _KeyLog,
        initial_rtt: float | None = None,
    ) -> Any:
        """
        A configuration with our certificate, no CA checks, DATAGRAM frames on;
        C{initial_rtt}: the path's round trip when the punch measured it (the
        engines otherwise assume 100-333 ms, which makes a lost handshake packet
        wait that long for its first retransmission).
        """
        cfg = self.configuration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=idle_timeout,
            max_datagram_frame_size=65536,
            supported_versions=[QUIC_V1],
            verify_mode=ssl.CERT_NONE,
            secrets_log_file=keylog,
        )
        if initial_rtt is not None:
            cfg.initial_rtt = max(MIN_INITIAL_RTT, initial_rtt)
        if self.name == "qh3":
            cfg.verify_hostname = False
            cfg.certificate = self._tls.load_pem_x509_certificates(
                certificate.public_bytes(serialization.Encoding.PEM)
            )[0]
            cfg.private_key = self._tls.load_pem_private_key(identity.private_pem())
            sa = self._tls.SignatureAlgorithm
            cfg.signature_algorithms = [sa.ED25519, sa.ECDSA_SECP256R1_SHA256, sa.RSA_PSS_RSAE_SHA256]
        else:
            cfg.certificate = certificate
            cfg.private_key = identity.private_key
        return cfg

    def destination_cid(self, data: bytes, cid_length: int) -> bytes | None:
        """The destination connection id of a client's Initial packet, or None."""
        try:
            header = self._packet.pull_quic_header(self._buffer(data=data), host_cid_length=cid_length)
        except ValueError:
            return None
        if header.version is None or header.packet_type != self._packet.QuicPacketType.INITIAL:
            return None
        return header.destination_cid

    def cipher_name(self, connection: Any) -> str | None:
        """The negotiated TLS cipher suite (e.g. C{"TLS_AES_128_GCM_SHA256"}), or None before the handshake."""
        if self.name == "qh3":
            suite = connection.get_cipher()
        else:
            schedule = getattr(getattr(connection, "tls", None), "key_schedule", None)
            suite = getattr(schedule, "cipher_suite", None)
        if suite is None:
            return None
        name = getattr(suite, "name", None) or f"0x{int(suite):04x}"
        return name if name.startswith("TLS_") else f"TLS_{name}"

    def max_datagram_payload(self, configuration: Any) -> int:
        """
        The largest DATAGRAM frame payload that fits one QUIC packet of the
        configuration's C{max_datagram_size} (1200 by default, the RFC 9000
        minimum every path carries): that size less a short header (1 + the
        connection id + a 4-byte packet number), the AEAD tag (16) and the
        frame's type and length (1 + 2).
        """
        return configuration.max_datagram_size - (1 + configuration.connection_id_length + 4) - 16 - 3

    def send_buffer(self, connection: Any, stream_id: int | None) -> int:
        """Bytes of a stream (None: of all) the engine holds unsent (0 where the engine cannot say: aioquic)."""
        size = getattr(connection, "get_send_buffer_size", None)
        return 0 if size is None else int(size(stream_id))

    def in_flight(self, connection: Any) -> int:
        """Bytes sent and not yet acknowledged (the engines keep it privately: read where each keeps it)."""
        core = getattr(connection, "_core", None)  # qh3
        if core is not None:
            return int(core.bytes_in_flight)
        loss = getattr(connection, "_loss", None)  # aioquic
        return int(getattr(loss, "bytes_in_flight", 0))

    def smoothed_rtt(self, connection: Any) -> float | None:
        """The engine's smoothed round trip in seconds (None before a sample)."""
        core = getattr(connection, "_core", None)  # qh3
        if core is not None:
            return core.smoothed_rtt
        loss = getattr(connection, "_loss", None)  # aioquic
        if loss is None or not getattr(loss, "_rtt_initialized", False):
            return None
        return float(loss._rtt_smoothed)

    def active_remote(self, connection: Any) -> Address | None:
        """
        The peer address the engine sends to now (it moves there when an
        authenticated packet arrives from a new address: connection
        migration, RFC 9000 section 9), or None before it has one.  The
        engines keep it privately: read where each keeps it.
        """
        core = getattr(connection, "_core", None)  # qh3: (path id, local, remote, ...)
        if core is not None:
            remote = core.active_path[2]
            return (remote[0], remote[1])
        paths = getattr(connection, "_network_paths", None)  # aioquic
        if paths:
            return (paths[0].addr[0], paths[0].addr[1])
        return None

    def peer_certificate_der(self, connection: Any) -> bytes | None:
        """The peer's TLS certificate where the engine shows it publicly (qh3), else None."""
        getter = getattr(connection, "get_peercert", None)
        cert = getter() if getter is not None else None
        return None if cert is None else cert.public_bytes()


def get_engine(name: str | None = None) -> QuicEngine:
    """
    The QUIC engine called C{name} ("aioquic" or "qh3"), or the first of
    L{ENGINES} that imports.

    @raise ImportError: when it (or every one) is missing.
    """
    names = ENGINES if name is None else (name,)
    errors = []
    for n in names:
        if n not in ("aioquic", "qh3"):
            raise ValueError(f"unknown QUIC engine {n!r}; choose aioquic or qh3")
        try:
            configuration = importlib.import_module(f"{n}.quic.configuration")
            connection = importlib.import_module(f"{n}.quic.connection")
            events = importlib.import_module(f"{n}.quic.events")
            packet = importlib.import_module(f"{n}.quic.packet")
            tls = importlib.import_module(f"{n}.tls")
            buffer = importlib.import_module("qh3._hazmat" if n == "qh3" else "aioquic.buffer").Buffer
        except ImportError as e:
            errors.append(f"{n}: {e}")
            continue
        return QuicEngine(n, configuration.QuicConfiguration, connection.QuicConnection, events, packet, buffer, tls)
    raise ImportError("no QUIC engine: pip install qh3 (or aioquic); " + "; ".join(errors))


_warm: set[str] = set()


def warm_up(engine: str | QuicEngine | None = None) -> QuicEngine:
    """
    Make the engine ready for a fast first handshake, and return it.

    The first connection of a process pays for the engine's lazy set-up
    (imports, and in qh3 the first key-share generation: about 40 ms on a
    2-vCPU VM, against 3 ms for a whole in-memory handshake afterwards).  Call
    this before the handshake is on the clock (when a punch starts, or when a
    peer starts); later calls do nothing.  It builds one throwaway client
    connection with a throwaway key and sends nothing.
    """
    quic = engine if isinstance(engine, QuicEngine) else get_engine(engine)
    if quic.name in _warm:
        return quic
    _warm.add(quic.name)
    throwaway = Identity.generate()
    config = quic.config(True, throwaway, throwaway.certificate(_EPOCH), 1.0, _KeyLog())
    connection = quic.connection(configuration=config)
    connection.connect(("192.0.2.1", 9), now=0.0)
    connection.datagrams_to_send(now=0.0)
    return quic


class _Epoch:
    """An C{IReactorTime.seconds} at the epoch, for the throwaway certificate of L{warm_up}."""

    @staticmethod
    def seconds() -> float:
        return 0.0


_EPOCH: Any = _Epoch()


class QuicChannel:
    """
    One QUIC connection over a punched UDP path, mutually authenticated.

    @param identity: our key.
    @param expected: the peer's pinned fingerprint, or a L{PeerCheck}.
    @param role: 0 is the QUIC client (it connects at L{start}), 1 the server
        (it waits for the client's first packet).
    @param remote: the peer's address on the punched path.
    @param send: C{send(data, addr)}: write one datagram on the shared socket.
    @param clock: the reactor's clock.
    @param idle_timeout: seconds without a packet before the connection dies.
    @param engine: "aioquic", "qh3" or None (the preferred one installed).
    @param certificate: our certificate, if already made (else a new one).
    @param initial_rtt: the path's round trip if known (the punch's probes), for the engine's first timers.

    @ivar ready: fires with the peer's L{Fingerprint} once both sides are
        authenticated, or fails with L{PeerRejected} (we refused the peer) or
        L{QuicClosed}.
    @ivar lost: fires (never fails) with the reason, an exception instance
        (L{QuicClosed} or L{PeerRejected}), once the connection ended.
    @ivar max_datagram_size: the largest payload L{sendDatagram} takes.
    """

    log = Logger()

    def __init__(
        self,
        identity: Identity,
        expected: Fingerprint | PeerCheck,
        role: int,
        remote: Address,
        send: Callable[[bytes, Address], object],
        clock: IReactorTime,
        idle_timeout: float = 30.0,
        engine: str | QuicEngine | None = None,
        certificate: x509.Certificate | None = None,
        initial_rtt: float | None = None,
    ) -> None:
        if role not in (0, 1):
            raise ValueError("role is 0 (QUIC client) or 1 (QUIC server)")
        self._identity = identity
        self._check = as_check(expected)
        self.role = role
        self.remote = remote
        self._send = send
        self._clock = clock
        self.engine = engine if isinstance(engine, QuicEngine) else get_engine(engine)
        self._keylog = _KeyLog()
        cert = certificate if certificate is not None else identity.certificate(clock)
        self._config = self.engine.config(role == 0, identity, cert, idle_timeout, self._keylog, initial_rtt)
        self.max_datagram_size = min(MAX_DATAGRAM, self.engine.max_datagram_payload(self._config))
        self._conn: Any = None
        self._peer_cid: bytes | None = None
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._auth_buffer = b""
        self._pings = 0
        self._handshake_done = False
        self._proof_sent = False
        self._receiver: QuicReceiver | None = None
        self._early: list[tuple[str, int, bytes, bool]] = []
        self._early_bytes = 0
        self._ended: Failure | None = None
        self.peer_fingerprint: Fingerprint | None = None
        self.ready: Deferred[Fingerprint] = Deferred()
        self.lost: Deferred[Exception] = Deferred()
        self._closing_reason: Exception | None = None
        self._pumping = False
        self._repump = False
        #: A clean close waiting for the streams' data to be delivered: (code, reason).
        self._draining: tuple[int, str] | None = None
        self._drain_until = 0.0
        #: Datagrams were fed since the last pump: the timer fires now, to pump once.
        self._pump_soon = False
        #: When the engine's own timer is due.
        self._due: float | None = None
        #: When the peer last showed it is there (an event out of its packets:
        #: data, a datagram, the ACK of our PING), and when application data
        #: last went either way (never yet: -inf): what L{natbypass.punch.migration.PathWatch} reads.
        self.heard_at = clock.seconds()
        self.data_at = float("-inf")
        #: The connection ids the peer addresses us by (ours, issued by the
        #: engine), so a packet from a new address can be recognised as ours.
        self.host_cids: set[bytes] = set()
        #: Called with (old, new) when the engine moved the path to a new
        #: peer address (connection migration); set by whoever follows it.
        self.onMove: Callable[[Address, Address], object] | None = None
        #: Called with no argument when L{host_cids} changed.
        self.onCids: Callable[[], object] | None = None

    def __repr__(self) -> str:
        return f"<QuicChannel role={self.role} {self.remote} {self.engine.name}>"

    # --- driving the engine ------------------------------------------------------

    def start(self) -> None:
        """Client: send the first flight.  Server: nothing to do (it waits)."""
        if self.role == 0 and self._conn is None:
            self._conn = self.engine.connection(configuration=self._config)
            self.host_cids.add(self._conn.host_cid)
            self._conn.connect(self.remote, now=self._clock.seconds())
            self._pump()

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        """Feed one datagram from the shared socket (never raises)."""
        if self._ended is not None:
            return
        if self._conn is None:
            if self.role == 0:
                return
            cid = self.engine.destination_cid(data, self._config.connection_id_length)
            cids = long_header_cids(data)
            if cid is None or cids is None:
                self.log.debug("dropped a non-Initial packet before the QUIC handshake from {addr}", addr=addr)
                return
            self._peer_cid = cids[1]
            self._conn = self.engine.connection(configuration=self._config, original_destination_connection_id=cid)
            self.host_cids.add(self._conn.host_cid)
        try:
            self._conn.receive_datagram(data, addr, now=self._clock.seconds())
        except Exception:
            self.log.failure("QUIC engine failed on a datagram from {addr}", addr=addr)
            return
        if self.peer_fingerprint is None:
            self._pump()  # the handshake: answer at once
        elif not self._pump_soon:
            # Established: the reactor reads a burst of datagrams in one go; handle
            # them with one pump after the burst (one send), by pulling the one
            # timer forward to now rather than pumping for each datagram.
            self._pump_soon = True
            self._rearm(self._due)

    @property
    def answered(self) -> bool:
        """
        Client: did the server answer our first flight?  True once the engine
        derived the handshake keys from a ServerHello, sealed with the Initial
        keys of I{our} random connection id, which a host that never saw our
        Initial cannot make.  (A server: once it read the client's hello.)
        """
        return "SERVER_HANDSHAKE_TRAFFIC_SECRET" in self._keylog.labels

    def isNewConnection(self, data: bytes) -> bool:
        """
        Server: is C{data} a client's Initial of another connection than the
        one this channel answers (its source connection id differs: the
        client gave up that connection and started a new one)?  False for
        anything that is not a long-header packet, and before the first one.
        """
        cids = long_header_cids(data)
        return self.role == 1 and self._peer_cid is not None and cids is not None and cids[1] != self._peer_cid

    def abandon(self) -> None:
        """
        End the connection without telling the peer (no packet is sent):
        for a client connection whose first flight went to an address that
        never answered.  Its timer is cancelled; C{ready} fails and C{lost}
        fires with a local L{QuicClosed}.  Idempotent.
        """
        if self._ended is not None:
            return
        self._end(QuicClosed(0, "abandoned", local=True))
        self._rearm(None)

    def _onTimer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._conn is not None and self._ended is None:
            now = self._clock.seconds()
            if self._due is not None and now >= self._due:
                self._conn.handle_timer(now=now)
            self._pump()

    def _pump(self) -> None:
        """
        Handle the engine's events, send what it wants sent, rearm the one timer.

        Not re-entrant: an application that writes from inside an event (an
        echo) only asks for another pass, which the running pump makes once
        the event is handled; events stay in order and the stack flat however
        many a burst of datagrams queued.
        """
        if self._pumping:
            # Written from inside an event: send it now, handle further events later.
            self._repump = True
            if self._conn is not None:
                self._transmit()  # also a CONNECTION_CLOSE just made, and the timer's end
            return
        self._pumping = True
        try:
            while True:
                self._repump = False
                self._pumpOnce()
                if not self._repump or self._ended is not None:
                    break
        finally:
            self._pumping = False

    def _pumpOnce(self) -> None:
        self._pump_soon = False
        conn = self._conn
        while self._ended is None:
            event = conn.next_event()
            if event is None:
                break
            self._event(event)
        if self.role == 1 and self._ended is None:
            # 0.5-RTT: the server knows the binding once it has answered the
            # client's first flight, so its proof leaves with that answer.
            self._sendProof()
        if self.peer_fingerprint is not None and self._ended is None:
            self._followPath()
        self._transmit()
        if self._draining is not None:
            self._checkDrained()
            return
        if self._receiver is not None and self._ended is None:
            self._receiver.pumped()

    def _transmit(self) -> None:
        """Send what the engine has to send; rearm the one timer."""
        conn = self._conn
        for data, addr in conn.datagrams_to_send(now=self._clock.seconds()):
            try:
                self._send(data, addr)
            except Exception:
                self.log.failure("sending a QUIC datagram to {addr} failed", addr=addr)
        self._rearm(None if self._ended is not None else conn.get_timer())

    def _rearm(self, when: float | None) -> None:
        """Keep the one timer: at the engine's due time C{when}, or now when a pump is owed."""
        self._due = when
        if self._pump_soon and self._ended is None:
            when = self._clock.seconds()
        elif self._draining is not None and self._ended is None and (when is None or when > self._drain_until):
            when = self._drain_until
        if when == self._timer_at and self._timer is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._onTimer)

    # --- events ------------------------------------------------------------------

    def _event(self, event: Any) -> None:
        ev = self.engine.events
        now = self._clock.seconds()
        if isinstance(event, (ev.StreamDataReceived, ev.DatagramFrameReceived, ev.PingAcknowledged)):
            self.heard_at = now
            if not isinstance(event, ev.PingAcknowledged):
                self.data_at = now
        if isinstance(event, ev.HandshakeCompleted):
            self._handshake_done = True
            self._tryAuth()
        elif isinstance(event, ev.StreamDataReceived):
            if event.stream_id in AUTH_STREAMS:
                if event.stream_id != self._peerAuthStream():
                    self._fail(PeerRejected(f"the peer wrote on our AUTH stream {event.stream_id}"))
                    return
                self._auth_buffer += event.data
                if len(self._auth_buffer) > AUTH.size:
                    self._fail(PeerRejected("the peer's AUTH message is too long"))
                    return
                self._tryAuth()
            else:
                self._deliver("stream", event.stream_id, event.data, event.end_stream)
        elif isinstance(event, (ev.StreamReset, ev.StopSendingReceived)):
            if event.stream_id not in AUTH_STREAMS and self._receiver is not None and self.peer_fingerprint is not None:
                if isinstance(event, ev.StopSendingReceived):
                    self._resetQuietly(event.stream_id, event.error_code)
                self._receiver.streamReset(event.stream_id, event.error_code)
        elif isinstance(event, ev.DatagramFrameReceived):
            self._deliver("datagram", 0, event.data, False)
        elif isinstance(event, (ev.ConnectionIdIssued, ev.ConnectionIdRetired)):
            if isinstance(event, ev.ConnectionIdIssued):
                self.host_cids.add(event.connection_id)
            else:
                self.host_cids.discard(event.connection_id)
            if self.onCids is not None:
                self.onCids()
        elif isinstance(event, ev.ConnectionTerminated):
            if self._closing_reason is not None:
                reason: Exception = self._closing_reason
            else:
                reason = QuicClosed(event.error_code, event.reason_phrase, local=False)
            self._end(reason)

    def _followPath(self) -> None:
        """Has the engine moved the path (an authenticated packet from a new address)?  Then say so."""
        remote = self.engine.active_remote(self._conn)
        if remote is None or remote == self.remote:
            return
        old, self.remote = self.remote, remote
        self.log.info("QUIC path moved from {old} to {new}", old=old, new=remote)
        if self.onMove is not None:
            self.onMove(old, remote)

    def _peerAuthStream(self) -> int:
        return SERVER_AUTH_STREAM if self.role == 0 else AUTH_STREAM

    def _sendProof(self) -> None:
        """Send our AUTH on our first bidirectional stream, once the binding is known (once)."""
        if self._proof_sent:
            return
        binding = self._keylog.binding()
        if binding is None:
            return
        signature = self._identity.sign(proof_message(self.role, binding))
        message = AUTH.pack(AUTH_MAGIC, AUTH_VERSION, self.role, self._identity.public_bytes(), signature)
        ours = AUTH_STREAMS[self.role]
        stream = self._conn.get_next_available_stream_id()
        if stream != ours:
            self._fail(PeerRejected(f"internal: the AUTH stream is {stream}, not {ours}"))
            return
        self._conn.send_stream_data(ours, message, end_stream=True)
        self._proof_sent = True

    def _tryAuth(self) -> None:
        if not self._handshake_done or len(self._auth_buffer) < AUTH.size or self.peer_fingerprint is not None:
            return
        binding = self._keylog.binding()
        if binding is None:
            self._fail(PeerRejected("the QUIC engine did not reveal the traffic secrets; cannot bind the proof"))
            return
        try:
            fingerprint = self._verifyProof(self._auth_buffer, binding)
            self._check(fingerprint)
        except PeerRejected as e:
            self._fail(e)
            return
        except Exception as e:
            self._fail(PeerRejected(f"the key check failed: {e!r}"))
            return
        self.peer_fingerprint = fingerprint
        # The client proves its key only to a server that proved the expected one.
        self._sendProof()
        self.log.info("QUIC peer authenticated as {fingerprint}", fingerprint=str(fingerprint))
        self.ready.callback(fingerprint)
        self._flushEarly()

    def _verifyProof(self, data: bytes, binding: bytes) -> Fingerprint:
        magic, version, role, public, signature = AUTH.unpack(data)
        peer_role = 1 - self.role
        if magic != AUTH_MAGIC or version != AUTH_VERSION or role != peer_role:
            raise PeerRejected("the peer's AUTH message is malformed")
        try:
            key = load_public_key(public)
            verify(key, signature, proof_message(peer_role, binding))
        except (ValueError, BadSignature):
            raise PeerRejected(
                "the peer's key proof was not made for this connection (a relay in the middle?)"
            ) from None
        fingerprint = Fingerprint.of_public_key(key)
        cert = self.engine.peer_certificate_der(self._conn)
        if cert is not None and not Fingerprint.of_certificate(cert).matches(fingerprint):
            raise PeerRejected(
                f"the peer's TLS certificate is for {Fingerprint.of_certificate(cert)}, its proof for {fingerprint}"
            )
        return fingerprint

    def _deliver(self, kind: str, stream_id: int, data: bytes, fin: bool) -> None:
        if self.peer_fingerprint is None or self._receiver is None:
            self._early_bytes += len(data)
            datagrams = sum(1 for e in self._early if e[0] == "datagram")
            if kind == "datagram" and datagrams >= MAX_EARLY_DATAGRAMS:
                return  # datagrams may be lost: drop rather than buffer more
            if self._early_bytes > MAX_EARLY_BYTES:
                self._fail(PeerRejected("too much data before the channel was ready"))
                return
            self._early.append((kind, stream_id, data, fin))
            return
        if kind == "datagram":
            self._receiver.datagramFrameReceived(data)
        else:
            self._receiver.streamReceived(stream_id, data, fin)

    def _flushEarly(self) -> None:
        if self.peer_fingerprint is None or self._receiver is None:
            return
        early, self._early, self._early_bytes = self._early, [], 0
        for item in early:
            if self._ended is not None:
                return
            self._deliver(*item)

    def _fail(self, reason: PeerRejected) -> None:
        self.log.warn("QUIC peer refused: {reason}", reason=str(reason))
        self._closing_reason = reason
        self._conn.close(error_code=AUTH_FAILED, reason_phrase="peer authentication failed")
        self._end(reason)
        if not self._pumping:
            self._pump()

    def _end(self, reason: Exception) -> None:
        if self._ended is not None:
            return
        self._ended = Failure(reason)
        self._early = []
        self._draining = None

        if not self.ready.called:
            self.ready.errback(self._ended)
        if self._receiver is not None:
            self._receiver.connectionLost(self._ended)
        self.lost.callback(self._ended.value)

    # --- the application's side --------------------------------------------------

    def setReceiver(self, receiver: QuicReceiver) -> None:
        """Give stream data and datagrams to C{receiver} (what came early first)."""
        self._receiver = receiver
        self._flushEarly()

    def _checkOpen(self) -> None:
        if self._ended is not None:
            raise QuicClosed(0, "the channel is closed", local=True)
        if self.peer_fingerprint is None:
            raise RuntimeError("the channel is not ready yet: wait for .ready")

    def openStream(self) -> int:
        """A new bidirectional stream's id."""
        self._checkOpen()
        return self._conn.get_next_available_stream_id()

    def sendStream(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        """Send C{data} on a stream, with C{fin} to end our side of it."""
        self._checkOpen()
        if stream_id in AUTH_STREAMS:
            raise ValueError(f"stream {stream_id} carries authentication; use openStream()")
        self.data_at = self._clock.seconds()
        try:
            self._conn.send_stream_data(stream_id, data, end_stream=fin)
        except Exception as e:
            if type(e).__name__ not in _CLOSED_ERRORS:
                raise
            # The peer closed the connection in the burst being handled: its
            # ConnectionTerminated event, still queued, ends the channel and its streams.
            return
        self._pump()

    def resetStream(self, stream_id: int, code: int) -> None:
        """Abort a stream both ways (RESET_STREAM and STOP_SENDING with C{code})."""
        if self._ended is not None or self._conn is None:
            return
        self._resetQuietly(stream_id, code)
        try:
            self._conn.stop_stream(stream_id, code)
        except Exception:
            pass  # the peer already finished sending
        self._pump()

    def _resetQuietly(self, stream_id: int, code: int) -> None:
        try:
            self._conn.reset_stream(stream_id, code)
        except Exception:
            pass  # already finished or reset: nothing left to abort

    def canOpenStream(self) -> bool:
        """May another bidirectional stream be opened now (QUIC's cumulative stream limit from the peer)?"""
        if self._ended is not None or self._conn is None:
            return False
        limit = getattr(self._conn, "max_concurrent_bidi_streams", None)  # qh3; aioquic raises when over
        return limit is None or self._conn.get_next_available_stream_id() // 4 < limit

    def sendBuffer(self, stream_id: int) -> int:
        """Bytes of C{stream_id} the engine holds unsent (backpressure for the stream layer)."""
        if self._ended is not None or self._conn is None:
            return 0
        return self.engine.send_buffer(self._conn, stream_id)

    def closeStream(self, stream_id: int) -> None:
        """End our side of a stream (a FIN with no more data)."""
        self.sendStream(stream_id, b"", fin=True)

    def sendDatagram(self, data: bytes) -> None:
        """
        Send one unreliable DATAGRAM frame (RFC 9221).

        @raise ValueError: when C{data} is longer than L{max_datagram_size}.
        """
        self._checkOpen()
        if len(data) > self.max_datagram_size:
            raise ValueError(f"a datagram holds at most {self.max_datagram_size} bytes, not {len(data)}")
        self.data_at = self._clock.seconds()
        self._conn.send_datagram_frame(data)
        self._pump()

    @property
    def cipher(self) -> str | None:
        """What protects the channel, e.g. C{"QUICv1 TLS_AES_128_GCM_SHA256"}; None before the handshake."""
        if self._conn is None:
            return None
        suite = self.engine.cipher_name(self._conn)
        return None if suite is None else f"QUICv1 {suite}"

    @property
    def rtt(self) -> float | None:
        """The engine's smoothed round trip on the path (None before it measured one)."""
        if self._conn is None or self._ended is not None:
            return None
        return self.engine.smoothed_rtt(self._conn)

    def ping(self) -> None:
        """
        Send a PING (ack-eliciting): the peer's ACK proves the path is alive and
        refreshes the idle timeout on both sides, and the traffic keeps NAT
        mappings open.  Ignored once the channel has ended.
        """
        if self._ended is not None or self._conn is None:
            return
        self._pings += 1
        try:
            self._conn.send_ping(self._pings)
        except Exception as e:
            if type(e).__name__ not in _CLOSED_ERRORS:
                raise
            return  # closing: its end is on the way
        self._pump()

    def close(self, error_code: int = 0, reason: str = "", drain: bool = False) -> None:
        """
        Close the connection (tell the peer); idempotent.

        With C{drain}, a clean close (C{error_code} 0) of a ready channel first
        lets what the streams wrote reach the peer: QUIC's CONNECTION_CLOSE
        would discard it, unlike a TCP close.  The channel drains until nothing
        is unsent or unacknowledged, for at most L{DRAIN_TIMEOUT} seconds, then
        closes; C{lost} fires then.
        """
        if self._ended is not None or self._draining is not None:
            return
        if self._conn is None:
            self._end(QuicClosed(error_code, reason or "closed before it started", local=True))
            return
        if drain and error_code == 0 and self.peer_fingerprint is not None and self._unfinished():
            self._draining = (error_code, reason)
            self._drain_until = self._clock.seconds() + DRAIN_TIMEOUT
            self._rearm(self._due)
            return
        self._closeNow(error_code, reason)

    def _closeNow(self, error_code: int, reason: str) -> None:
        self._draining = None
        self._closing_reason = QuicClosed(error_code, reason, local=True)
        self._conn.close(error_code=error_code, reason_phrase=reason)
        self._end(self._closing_reason)
        self._pump()

    def _unfinished(self) -> bool:
        """Is stream data still unsent or unacknowledged?"""
        try:
            return self.engine.send_buffer(self._conn, None) > 0 or self.engine.in_flight(self._conn) > 0
        except Exception:
            return False

    def _checkDrained(self) -> None:
        if self._draining is not None and (not self._unfinished() or self._clock.seconds() >= self._drain_until):
            self._closeNow(*self._draining)

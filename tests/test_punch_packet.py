"""Tests for natbypass.punch.packet, the punch packet codec."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.punch import packet
from natbypass.punch.packet import (
    MAGIC,
    PacketType,
    PunchDecodeError,
    decode,
    encode,
    verify,
)
from natbypass.secure.quic import is_quic  # the mux's other test
from natbypass.stun.message import is_stun  # the mux's test, the one both codecs are built around

KEY = bytes(range(32))

types = st.sampled_from(list(PacketType))
session_ids = st.binary(min_size=1, max_size=packet.MAX_SESSION_ID)
u64 = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def packets(draw):
    return dict(
        type_=draw(types),
        role=draw(st.integers(0, 1)),
        session_id=draw(session_ids),
        nonce=draw(u64),
        echo=draw(u64),
    )


class LayoutTests(SynchronousTestCase):
    def test_known_bytes(self) -> None:
        """One PROBE, byte by byte, so the layout in the docstring is pinned."""
        data = encode(PacketType.PROBE, 1, b"s1", 0x0102030405060708, KEY)
        self.assertEqual(
            data[:-16],
            bytes([0xCE, 2, 1, 1, 2])  # magic, version 2, PROBE, role 1, sid length 2
            + b"s1"
            + bytes.fromhex("0102030405060708")  # nonce
            + bytes(8),  # echo
        )
        self.assertEqual(len(data), 5 + 2 + 16 + 16)

    def test_first_byte_never_stun(self) -> None:
        """The demux rule: STUN's first two bits are 00, ours are 11."""
        self.assertEqual(MAGIC & 0xC0, 0xC0)
        self.assertFalse(is_stun(encode(PacketType.PROBE, 0, b"x" * 4, 0x2112A442, KEY, echo=0x2112A442)))

    def test_is_stun(self) -> None:
        binding = bytes.fromhex("0001 0000 2112a442") + bytes(12)
        self.assertTrue(is_stun(binding))
        self.assertFalse(is_stun(binding[:19]))
        self.assertFalse(is_stun(bytes.fromhex("0001 0000 2112a443") + bytes(12)))

    def test_only_probe_and_ack(self) -> None:
        """Types 3..6 (keepalives, data, close) are gone: QUIC carries them now."""
        self.assertEqual(list(PacketType), [PacketType.PROBE, PacketType.ACK])
        data = bytearray(encode(PacketType.PROBE, 0, b"s", 1, KEY))
        for old in (3, 4, 5, 6):
            data[2] = old
            self.assertRaises(PunchDecodeError, decode, bytes(data))

    def test_version_1_rejected(self) -> None:
        data = bytearray(encode(PacketType.PROBE, 0, b"s", 1, KEY))
        data[1] = 1
        self.assertRaises(PunchDecodeError, decode, bytes(data))

    def test_nonce_range(self) -> None:
        self.assertRaises(ValueError, encode, PacketType.PROBE, 0, b"s", 2**64, KEY)
        self.assertRaises(ValueError, encode, PacketType.ACK, 0, b"s", 1, KEY, echo=-1)

    def test_bad_role_and_session(self) -> None:
        self.assertRaises(ValueError, encode, PacketType.PROBE, 2, b"s", 1, KEY)
        self.assertRaises(ValueError, encode, PacketType.PROBE, 0, b"", 1, KEY)
        self.assertRaises(ValueError, encode, PacketType.PROBE, 0, b"s" * 65, 1, KEY)

    def test_reserved_flags_rejected(self) -> None:
        data = bytearray(encode(PacketType.PROBE, 0, b"s", 1, KEY))
        data[3] |= 0x80
        self.assertRaises(PunchDecodeError, decode, bytes(data))

    def test_trailing_bytes_rejected(self) -> None:
        data = encode(PacketType.PROBE, 0, b"s", 1, KEY)
        self.assertRaises(PunchDecodeError, decode, data[:-16] + b"x" + data[-16:])
        self.assertRaises(PunchDecodeError, decode, data + b"x")
        self.assertRaises(PunchDecodeError, decode, data[:-1])


class PropertyTests(SynchronousTestCase):
    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(packets())
    def test_round_trip(self, fields) -> None:
        data = encode(key=KEY, **fields)
        p = decode(data)
        self.assertEqual(
            (p.type, p.role, p.session_id, p.nonce, p.echo),
            (fields["type_"], fields["role"], fields["session_id"], fields["nonce"], fields["echo"]),
        )
        self.assertTrue(verify(p, KEY))
        self.assertFalse(is_quic(data), "the mux must never take a punch packet for QUIC")
        self.assertFalse(is_stun(data))

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(packets(), st.binary(min_size=16, max_size=64))
    def test_wrong_key_fails(self, fields, other) -> None:
        if other == KEY:
            return
        self.assertFalse(verify(decode(encode(key=KEY, **fields)), other))

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(packets(), st.data())
    def test_any_bit_flip_fails_or_is_rejected(self, fields, data) -> None:
        raw = bytearray(encode(key=KEY, **fields))
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= 1 << data.draw(st.integers(0, 7))
        try:
            p = decode(bytes(raw))
        except PunchDecodeError:
            return
        self.assertFalse(verify(p, KEY))

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes_one_error_type(self, raw) -> None:
        try:
            p = decode(raw)
        except PunchDecodeError:
            return
        self.assertIsInstance(p.type, PacketType)

    @settings(deadline=None)  # shared CPUs: timing is not what is tested
    @given(st.binary(max_size=300))
    def test_stun_never_decodes(self, tail) -> None:
        """Anything the mux calls STUN is not a punch packet."""
        raw = bytes.fromhex("0001 0000 2112a442") + tail
        if is_stun(raw):
            self.assertRaises(PunchDecodeError, decode, raw)

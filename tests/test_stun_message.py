"""
Tests for natbypass.stun.message: RFC 5769 vectors, byte by byte, and
property tests of the codec.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.stun import message as m


def h(text: str) -> bytes:
    """Hex dump (whitespace and comments after '#' ignored) to bytes."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()).replace(" ", ""))


TXID = h("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")

# RFC 5769 2.1: short-term credentials, password "VOkJxbRl1RmTxUk/WvJxBt".
SAMPLE_REQUEST = h(
    """
    00 01 00 58   # Binding request, length 88
    21 12 a4 42   # magic cookie
    b7 e7 a7 01 bc 34 d6 86 fa 87 df ae   # transaction id
    80 22 00 10   # SOFTWARE, 16 bytes
    53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74   # "STUN test client"
    00 24 00 04   # PRIORITY (unknown to us, comprehension-required)
    6e 00 01 ff
    80 29 00 08   # ICE-CONTROLLED (unknown, comprehension-optional)
    93 2f f9 b1 51 26 3b 36
    00 06 00 09   # USERNAME, 9 bytes + 3 bytes padding
    65 76 74 6a 3a 68 36 76 59 20 20 20   # "evtj:h6vY"
    00 08 00 14   # MESSAGE-INTEGRITY
    9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04   # FINGERPRINT
    e5 7a 3b cf
    """
)
SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 2.2: IPv4 response, mapped address 192.0.2.1:32853.
SAMPLE_IPV4_RESPONSE = h(
    """
    01 01 00 3c   # Binding success response, length 60
    21 12 a4 42
    b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b   # SOFTWARE "test vector" + one padding byte 0x20
    74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08   # XOR-MAPPED-ADDRESS
    00 01 a1 47   # IPv4, port 32853 ^ 0x2112
    e1 12 a6 43   # 192.0.2.1 ^ magic cookie
    00 08 00 14   # MESSAGE-INTEGRITY
    2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04   # FINGERPRINT
    c0 7d 4c 96
    """
)

# RFC 5769 2.3: IPv6 response, 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
SAMPLE_IPV6_RESPONSE = h(
    """
    01 01 00 48
    21 12 a4 42
    b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b
    74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14   # XOR-MAPPED-ADDRESS, IPv6
    00 02 a1 47
    01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14
    a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04
    c8 fb 0b 4c
    """
)

# RFC 5769 2.4: long-term credentials (username in katakana, SASLprep'd
# password "TheMatrIX", realm example.org), no FINGERPRINT.
SAMPLE_LONG_TERM_REQUEST = h(
    """
    00 01 00 60
    21 12 a4 42
    78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12   # USERNAME, 18 bytes of UTF-8 + 2 bytes padding
    e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c   # NONCE
    66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b   # REALM "example.org" + padding
    65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14
    f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)


class RFC5769Tests(SynchronousTestCase):
    def test_sample_request(self) -> None:
        msg = m.decode(SAMPLE_REQUEST)
        self.assertEqual((msg.method, msg.cls), (m.Method.BINDING, m.MessageClass.REQUEST))
        self.assertEqual(msg.transaction_id, TXID)
        self.assertEqual(msg.get(m.Software), m.Software("STUN test client"))
        self.assertEqual(msg.get(m.Username), m.Username("evtj:h6vY"))
        self.assertEqual(msg.unknown_required(), (0x0024,))
        self.assertIsNotNone(msg.get(m.Fingerprint))
        self.assertTrue(msg.check_integrity(SHORT_TERM_PASSWORD))
        self.assertFalse(msg.check_integrity(b"wrong password"))

    def test_sample_request_reencodes_identically(self) -> None:
        """
        Re-encoding without the received MESSAGE-INTEGRITY, with the key,
        reproduces the vector bit for bit (padding bytes aside: the vector
        pads USERNAME with spaces, we pad with zeros, so compare MACs only
        over our own encoding).
        """
        msg = m.decode(SAMPLE_REQUEST)
        attrs = tuple(a for a in msg.attributes if not isinstance(a, (m.MessageIntegrity, m.Fingerprint)))
        ours = m.Message(msg.method, msg.cls, msg.transaction_id, attrs).encode(
            integrity_key=SHORT_TERM_PASSWORD, fingerprint=True
        )
        again = m.decode(ours)
        self.assertTrue(again.check_integrity(SHORT_TERM_PASSWORD))
        self.assertEqual(len(ours), len(SAMPLE_REQUEST))
        self.assertEqual(ours[:60], SAMPLE_REQUEST[:60])

    def test_ipv4_response(self) -> None:
        msg = m.decode(SAMPLE_IPV4_RESPONSE)
        self.assertEqual(msg.cls, m.MessageClass.SUCCESS)
        self.assertEqual(msg.get(m.XorMappedAddress), m.XorMappedAddress("192.0.2.1", 32853))
        self.assertEqual(msg.get(m.Software), m.Software("test vector"))
        self.assertTrue(msg.check_integrity(SHORT_TERM_PASSWORD))

    def test_ipv4_response_encodes_identically(self) -> None:
        """Our encoder pads with zeros; the vector pads SOFTWARE with 0x20."""
        msg = m.Message(
            m.Method.BINDING,
            m.MessageClass.SUCCESS,
            TXID,
            (m.Software("test vector"), m.XorMappedAddress("192.0.2.1", 32853)),
        )
        vector = bytearray(SAMPLE_IPV4_RESPONSE)
        encoded = msg.encode(integrity_key=SHORT_TERM_PASSWORD, fingerprint=True)
        self.assertEqual(encoded[:35], bytes(vector[:35]))
        self.assertEqual(encoded[35], 0)  # our padding byte
        self.assertEqual(encoded[36:48], bytes(vector[36:48]))  # XOR-MAPPED-ADDRESS
        self.assertTrue(m.decode(encoded).check_integrity(SHORT_TERM_PASSWORD))

    def test_ipv6_response(self) -> None:
        msg = m.decode(SAMPLE_IPV6_RESPONSE)
        self.assertEqual(
            msg.get(m.XorMappedAddress),
            m.XorMappedAddress("2001:db8:1234:5678:11:2233:4455:6677", 32853),
        )
        self.assertTrue(msg.check_integrity(SHORT_TERM_PASSWORD))
        encoded = m.XorMappedAddress("2001:db8:1234:5678:11:2233:4455:6677", 32853).encode_value(TXID, m.MAGIC_COOKIE)
        self.assertEqual(encoded, SAMPLE_IPV6_RESPONSE[40:60])

    def test_long_term_request(self) -> None:
        msg = m.decode(SAMPLE_LONG_TERM_REQUEST)
        self.assertEqual(msg.get(m.Username), m.Username("\u30de\u30c8\u30ea\u30c3\u30af\u30b9"))
        self.assertEqual(msg.get(m.Realm), m.Realm("example.org"))
        self.assertEqual(msg.get(m.Nonce), m.Nonce("f//499k954d6OL34oL9FSTvy64sA"))
        self.assertIsNone(msg.get(m.Fingerprint))
        key = m.long_term_key(msg.get(m.Username).text, "example.org", "TheMatrIX")
        self.assertTrue(msg.check_integrity(key))
        self.assertFalse(msg.check_integrity(m.long_term_key("x", "example.org", "TheMatrIX")))

    def test_fingerprint_mismatch_rejected(self) -> None:
        bad = bytearray(SAMPLE_IPV4_RESPONSE)
        bad[-1] ^= 1
        self.assertRaises(m.StunDecodeError, m.decode, bytes(bad))

    def test_corrupted_body_fails_fingerprint(self) -> None:
        bad = bytearray(SAMPLE_REQUEST)
        bad[30] ^= 0x40  # inside SOFTWARE
        self.assertRaises(m.StunDecodeError, m.decode, bytes(bad))


class MessageTypeTests(SynchronousTestCase):
    def test_known_types(self) -> None:
        self.assertEqual(m.message_type(m.Method.BINDING, m.MessageClass.REQUEST), 0x0001)
        self.assertEqual(m.message_type(m.Method.BINDING, m.MessageClass.INDICATION), 0x0011)
        self.assertEqual(m.message_type(m.Method.BINDING, m.MessageClass.SUCCESS), 0x0101)
        self.assertEqual(m.message_type(m.Method.BINDING, m.MessageClass.ERROR), 0x0111)

    @given(st.integers(0, 0xFFF), st.integers(0, 3))
    def test_split_inverts(self, method: int, cls: int) -> None:
        self.assertEqual(m.split_message_type(m.message_type(method, cls)), (method, cls))


class StrictDecodeTests(SynchronousTestCase):
    def header(self, length: int, mtype: int = 1) -> bytes:
        return m.HEADER.pack(mtype, length, m.MAGIC_COOKIE, TXID)

    def test_short(self) -> None:
        self.assertRaises(m.StunDecodeError, m.decode, b"\x00\x01\x00")

    def test_length_mismatch(self) -> None:
        self.assertRaises(m.StunDecodeError, m.decode, self.header(4))

    def test_top_bits(self) -> None:
        self.assertRaises(m.StunDecodeError, m.decode, self.header(0, 0x4001))

    def test_truncated_attribute(self) -> None:
        data = self.header(8) + struct.pack("!HH", 0x8022, 8) + b"abcd"
        self.assertRaises(m.StunDecodeError, m.decode, data)

    def test_fingerprint_not_last(self) -> None:
        msg = m.Message(1, 0, TXID).encode(fingerprint=True)
        data = self.header(16) + msg[20:] + struct.pack("!HH", 0x8022, 4) + b"abcd"
        self.assertRaises(m.StunDecodeError, m.decode, data)

    def test_bad_family(self) -> None:
        value = struct.pack("!BBH", 0, 3, 1) + b"\0" * 4
        data = self.header(12) + struct.pack("!HH", 0x0020, 8) + value
        self.assertRaises(m.StunDecodeError, m.decode, data)

    def test_bad_error_class(self) -> None:
        value = struct.pack("!HBB", 0, 7, 0)
        data = self.header(8) + struct.pack("!HH", 0x0009, 4) + value
        self.assertRaises(m.StunDecodeError, m.decode, data)

    def test_invalid_utf8(self) -> None:
        data = self.header(8) + struct.pack("!HH", 0x8022, 2) + b"\xff\xfe\0\0"
        self.assertRaises(m.StunDecodeError, m.decode, data)

    def test_attributes_after_integrity_ignored(self) -> None:
        plain = m.Message(1, 0, TXID, (m.Username("u"),)).encode(integrity_key=b"k")
        extra = struct.pack("!HH", 0x8022, 4) + b"abcd"
        data = bytearray(plain + extra)
        struct.pack_into("!H", data, 2, len(data) - 20)
        msg = m.decode(bytes(data))
        self.assertIsNone(msg.get(m.Software))
        self.assertTrue(msg.check_integrity(b"k"))

    def test_rfc3489_message(self) -> None:
        data = m.HEADER.pack(1, 0, 0xDEADBEEF, TXID)
        msg = m.decode(data)
        self.assertTrue(msg.is_rfc3489)
        self.assertFalse(m.is_stun(data))

    def test_is_stun(self) -> None:
        self.assertTrue(m.is_stun(SAMPLE_REQUEST))
        self.assertFalse(m.is_stun(b"\x80" + SAMPLE_REQUEST[1:]))
        self.assertFalse(m.is_stun(SAMPLE_REQUEST[:19]))

    def test_is_stun_classifies_decode_validates(self) -> None:
        """
        Demultiplexing (RFC 7983 first byte, RFC 8489 magic cookie) does not
        check lengths: a truncated STUN message is still STUN, and the
        decoder is what refuses it.
        """
        truncated = SAMPLE_REQUEST[:-4]
        self.assertTrue(m.is_stun(truncated))
        self.assertRaises(m.StunDecodeError, m.decode, truncated)

    def test_sha256_integrity(self) -> None:
        data = m.Message(1, 0, TXID, (m.Username("u"),)).encode(
            integrity_key=b"k", integrity_sha256_key=b"k", fingerprint=True
        )
        msg = m.decode(data)
        self.assertIsNotNone(msg.get(m.MessageIntegritySha256))
        self.assertTrue(msg.check_integrity(b"k"))
        self.assertFalse(msg.check_integrity(b"other"))


# ------------------------------------------------------------ properties

hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    # inet_ntop's spelling, which is what decoding yields.
    st.ip_addresses(v=6).map(lambda a: socket.inet_ntop(socket.AF_INET6, a.packed)),
)
ports = st.integers(0, 65535)
text = st.text(max_size=60)


def address(kind: type) -> st.SearchStrategy:
    return st.builds(kind, hosts, ports)


attributes = st.one_of(
    *(
        address(k)
        for k in (
            m.MappedAddress,
            m.XorMappedAddress,
            m.ResponseOrigin,
            m.OtherAddress,
            m.AlternateServer,
            m.ChangedAddress,
            m.SourceAddress,
            m.ResponseAddress,
        )
    ),
    st.builds(m.Username, text),
    st.builds(m.Software, text),
    st.builds(m.Realm, text),
    st.builds(m.Nonce, text),
    st.builds(m.ErrorCode, st.integers(300, 699), text),
    st.builds(m.UnknownAttributes, st.lists(st.integers(0, 0xFFFF), max_size=6).map(tuple)),
    st.builds(m.ChangeRequest, st.booleans(), st.booleans()),
    st.builds(m.ResponsePort, ports),
    st.builds(m.Padding, st.integers(0, 64)),
    st.builds(
        m.UnknownAttribute,
        st.integers(0, 0xFFFF).filter(lambda t: t not in m.KNOWN_TYPES),
        st.binary(max_size=40),
    ),
)

messages = st.builds(
    m.Message,
    st.integers(0, 0xFFF),
    st.integers(0, 3),
    st.binary(min_size=12, max_size=12),
    st.lists(attributes, max_size=8).map(tuple),
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(messages, st.booleans())
    def test_round_trip(self, msg: m.Message, fingerprint: bool) -> None:
        data = msg.encode(fingerprint=fingerprint)
        back = m.decode(data)
        expected = msg.attributes + ((m.Fingerprint(),) if fingerprint else ())
        self.assertEqual(back.attributes, expected)
        self.assertEqual((back.method, back.cls, back.transaction_id), (msg.method, msg.cls, msg.transaction_id))
        self.assertEqual(back.encode(), data)
        self.assertTrue(m.is_stun(data))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=200))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        try:
            m.decode(data)
        except m.StunDecodeError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(messages, st.data())
    def test_mutations(self, msg: m.Message, data: st.DataObject) -> None:
        """Flipped bytes, truncation and the header kept consistent still only raise StunDecodeError."""
        raw = bytearray(msg.encode(fingerprint=data.draw(st.booleans())))
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(20, len(raw)))
        raw = raw[:cut]
        if data.draw(st.booleans()):
            struct.pack_into("!H", raw, 2, len(raw) - 20)
        try:
            m.decode(bytes(raw))
        except m.StunDecodeError:
            pass

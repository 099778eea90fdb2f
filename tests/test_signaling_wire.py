"""
Tests of the signalling line codec: documented examples, strictness, and
hypothesis round trips and fuzzing (any bytes -> a message or WireError).
"""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.nat import MAX_PORT_DELTA, Mapping, NatSummary
from natbypass.signaling import wire
from natbypass.signaling.wire import (
    Accept,
    Bye,
    Cancel,
    Candidate,
    Connect,
    Description,
    Error,
    Greeting,
    Hello,
    Offer,
    Ok,
    Ping,
    Pong,
    Register,
    Registered,
    Reject,
    Report,
    Session,
    SessionReply,
    WireError,
    decode_from_client,
    decode_from_server,
    encode,
)

# -- strategies

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
candidates = st.builds(Candidate, st.sampled_from(sorted(wire.CANDIDATE_KINDS)), ipv4 | ipv6, st.integers(1, 65535))
behaviours = st.sampled_from([b.value for b in Mapping])
nats = st.builds(
    NatSummary,
    behaviours,
    behaviours,
    st.sampled_from([True, False, None]),
    st.one_of(st.none(), st.integers(1, MAX_PORT_DELTA), st.integers(-MAX_PORT_DELTA, -1)),
    st.one_of(st.none(), behaviours),
)
wishes = st.sampled_from([(), ("udp",), ("tcp",), ("udp", "tcp"), ("tcp", "udp")])
fingerprints = st.none() | st.from_regex(wire.FINGERPRINT, fullmatch=True)
descriptions = st.builds(Description, st.lists(candidates, max_size=4).map(tuple), nats, wishes, fingerprints)
rids = st.integers(0, wire.MAX_RID)
peer_ids = st.from_regex(wire.PEER_ID, fullmatch=True)
server_ids = st.from_regex(wire.SERVER_ID, fullmatch=True)
texts = st.text(max_size=60)
orders = st.sampled_from([(), ("udp",), ("tcp",), ("udp", "tcp"), ("tcp", "udp")])
sessions = st.builds(
    Session,
    server_ids,
    st.binary(min_size=32, max_size=32),
    peer_ids,
    st.sampled_from(wire.ROLES),
    descriptions,
    orders,
    st.integers(0, 600_000),
    st.none() | st.integers(0, 600_000),
)
reports = st.one_of(
    st.builds(Report, rids, server_ids, st.just("connected"), st.sampled_from(wire.PROTOCOLS), st.none() | texts),
    st.builds(
        Report, rids, server_ids, st.sampled_from(["failed", "timeout", "cancelled"]), st.none(), st.none() | texts
    ),
)
client_messages = st.one_of(
    st.builds(Hello, rids, st.integers(0, 1000), st.none() | st.text(max_size=20)),
    st.builds(
        Register,
        rids,
        peer_ids,
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=64, max_size=64),
        st.none() | st.from_regex(wire.TOKEN, fullmatch=True),
        st.booleans(),
    ),
    st.builds(Connect, rids, peer_ids, descriptions),
    st.builds(Accept, rids, server_ids, descriptions),
    st.builds(Reject, rids, server_ids, st.none() | texts),
    st.builds(Ping, rids),
    st.builds(Pong, rids),
    reports,
    st.builds(Bye, rids),
)
server_messages = st.one_of(
    st.builds(
        Greeting,
        st.lists(st.integers(0, 100), min_size=1, max_size=4).map(tuple),
        st.booleans(),
        st.integers(256, 1 << 20),
        st.none() | st.text(max_size=20),
        st.none() | st.binary(min_size=16, max_size=64),
    ),
    st.builds(Ok, rids),
    st.builds(Registered, rids, peer_ids, st.from_regex(wire.FINGERPRINT, fullmatch=True)),
    st.builds(SessionReply, rids, sessions),
    st.builds(Error, st.none() | rids, st.sampled_from(sorted(wire.ERROR_CODES)), texts),
    st.builds(Offer, server_ids, peer_ids, descriptions, st.integers(0, 3_600_000)),
    st.builds(Cancel, server_ids, texts),
    st.builds(Ping, rids),
    st.builds(Pong, rids),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "op",
        "rid",
        "id",
        "peer",
        "offer",
        "v",
        "token",
        "key",
        "sig",
        "nonce",
        "replace",
        "candidates",
        "nat",
        "wish",
        "fingerprint",
        "session",
        "outcome",
        "protocol",
        "kind",
        "host",
        "port",
        "proto",
    ]
)
ops = st.sampled_from(sorted(set(wire.CLIENT_MESSAGES) | set(wire.SERVER_MESSAGES) | {"nope"}))
near_messages = st.builds(
    lambda op, d: {**d, "op": op},
    ops,
    st.dictionaries(field_names, json_values | rids | peer_ids, max_size=8),
)


def raises_only_wire_error(decoder, line: bytes) -> None:
    try:
        decoder(line)
    except WireError as e:
        assert e.code == wire.ERROR_CODES[e.error]
        assert e.rid is None or 0 <= e.rid <= wire.MAX_RID


class ExampleTests(SynchronousTestCase):
    """The examples of docs/protocol.md decode to what the document says."""

    def test_register_example(self) -> None:
        key = "A" * 42 + "E"  # 32 bytes: 0x00 * 31 then 0x01
        sig = "B" * 85 + "A"  # 64 bytes
        msg = decode_from_client(
            b'{"op":"register","rid":2,"id":"alice","key":"' + key.encode() + b'","sig":"' + sig.encode() + b'"}'
        )
        self.assertEqual(msg, Register(2, "alice", bytes(31) + b"\x01", wire.b64url_decode(sig, "sig", 64)))
        self.assertEqual(json.loads(encode(msg)), {"op": "register", "rid": 2, "id": "alice", "key": key, "sig": sig})

    def test_connect_example(self) -> None:
        line = (
            b'{"op":"connect","rid":3,"peer":"bob","candidates":['
            b'{"kind":"host","proto":"udp","host":"192.168.1.20","port":40000},'
            b'{"kind":"srflx","proto":"udp","host":"203.0.113.7","port":61000},'
            b'{"kind":"tcp-srflx","proto":"tcp","host":"203.0.113.7","port":61001}],'
            b'"nat":{"mapping":"endpoint-independent","filtering":"address-and-port-dependent","port_preserving":false},'
            b'"wish":"auto","fingerprint":"sha256:q83vEjRWeJA"}'
        )
        msg = decode_from_client(line)
        self.assertIsInstance(msg, Connect)
        self.assertEqual(msg.peer, "bob")
        self.assertEqual([c.kind for c in msg.description.candidates], ["host", "srflx", "tcp-srflx"])
        self.assertEqual(msg.description.candidates[2].protocol, "tcp")
        self.assertEqual(msg.description.nat.filtering, "address-and-port-dependent")
        self.assertIs(msg.description.nat.port_preserving, False)
        self.assertEqual(msg.description.wish, ())
        self.assertEqual(msg.description.fingerprint, "sha256:q83vEjRWeJA")

    def test_defaults_for_missing_description(self) -> None:
        msg = decode_from_client(b'{"op":"connect","rid":1,"peer":"bob"}')
        self.assertEqual(msg.description, Description())

    def test_session_key_base64(self) -> None:
        s = Session("s1", bytes(range(32)), "bob", "controlling", Description(), ("udp", "tcp"), 40, 12)
        obj = json.loads(encode(SessionReply(9, s)))
        self.assertEqual(obj["key"], "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        self.assertEqual(obj["order"], ["udp", "tcp"])
        self.assertEqual(obj["start_in_ms"], 40)

    def test_greeting(self) -> None:
        obj = json.loads(encode(Greeting((2,), True, 8192, "natbypass/0.1.0", bytes(range(24)))))
        self.assertEqual(
            obj,
            {
                "op": "hello",
                "proto": "natbypass-signal",
                "versions": [2],
                "auth": True,
                "max_line": 8192,
                "server": "natbypass/0.1.0",
                "nonce": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYX",
            },
        )

    def test_old_greeting_still_readable(self) -> None:
        """A version-1 greeting (no nonce) decodes, so a client can say that the versions do not meet."""
        msg = decode_from_server(
            b'{"op":"hello","proto":"natbypass-signal","versions":[1],"auth":false,"max_line":8192}'
        )
        self.assertEqual((msg.versions, msg.nonce), ((1,), None))

    def test_error_has_code_and_null_rid(self) -> None:
        obj = json.loads(encode(Error(None, "line-too-long", "too long")))
        self.assertEqual(obj, {"op": "error", "rid": None, "code": 413, "error": "line-too-long", "reason": "too long"})

    def test_ipv6_normalised(self) -> None:
        self.assertEqual(Candidate("host", "2001:DB8:0:0::1", 5).host, "2001:db8::1")

    def test_one_line(self) -> None:
        """Encoded messages never contain the delimiter, whatever the text."""
        line = encode(Reject(1, "o1", "a\nb\r\n"))
        self.assertNotIn(b"\n", line)
        self.assertEqual(decode_from_client(line).reason, "a\nb\r\n")


class StrictnessTests(SynchronousTestCase):
    def assertWireError(self, line: bytes, error: str, rid: int | None = None, decoder=decode_from_client) -> WireError:
        with self.assertRaises(WireError) as cm:
            decoder(line)
        self.assertEqual(cm.exception.error, error)
        self.assertEqual(cm.exception.rid, rid)
        return cm.exception

    def test_not_json(self) -> None:
        self.assertWireError(b"hello", "bad-request")

    def test_not_utf8(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":1,"x":"\xff"}', "bad-request")

    def test_lone_surrogate(self) -> None:
        """JSON escapes can smuggle in text that cannot be encoded again; refuse it."""
        self.assertWireError(b'{"op":"reject","rid":3,"offer":"o","reason":"\\ud800"}', "bad-request", 3)

    def test_not_object(self) -> None:
        self.assertWireError(b"[1,2]", "bad-request")

    def test_unknown_op_keeps_rid(self) -> None:
        e = self.assertWireError(b'{"op":"teleport","rid":7}', "unknown-op", 7)
        self.assertEqual(e.code, 400)

    def test_direction_matters(self) -> None:
        self.assertWireError(b'{"op":"offer","offer":"o","peer":"a","expires_in_ms":1}', "unknown-op")
        self.assertWireError(b'{"op":"register","rid":1,"id":"a"}', "unknown-op", 1, decode_from_server)

    def test_bool_is_not_int(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":true}', "bad-request")

    def test_float_is_not_int(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":1.0}', "bad-request")

    def test_rid_range(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":-1}', "bad-request")
        self.assertWireError(b'{"op":"ping","rid":9007199254740992}', "bad-request")

    def test_duplicate_keys(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":1,"rid":2}', "bad-request")

    def test_nan(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":NaN}', "bad-request")

    def test_unknown_field(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":4,"extra":1}', "bad-request", 4)

    def test_unknown_field_in_candidate(self) -> None:
        self.assertWireError(
            b'{"op":"connect","rid":4,"peer":"b","candidates":[{"kind":"host","proto":"udp","host":"10.0.0.1","port":1,"x":0}]}',
            "bad-request",
            4,
        )

    def test_candidate_kind_protocol_mismatch(self) -> None:
        self.assertWireError(
            b'{"op":"connect","rid":4,"peer":"b","candidates":[{"kind":"srflx","proto":"tcp","host":"10.0.0.1","port":1}]}',
            "bad-request",
            4,
        )

    def test_candidate_hostname_refused(self) -> None:
        self.assertWireError(
            b'{"op":"connect","rid":4,"peer":"b","candidates":[{"kind":"host","proto":"udp","host":"example.com","port":1}]}',
            "bad-request",
            4,
        )

    def test_candidate_port_zero(self) -> None:
        self.assertRaises(ValueError, Candidate, "host", "10.0.0.1", 0)

    def test_too_many_candidates(self) -> None:
        c = {"kind": "host", "proto": "udp", "host": "10.0.0.1", "port": 1}
        line = json.dumps({"op": "connect", "rid": 1, "peer": "b", "candidates": [c] * 33}).encode()
        self.assertWireError(line, "bad-request", 1)

    def test_bad_wish(self) -> None:
        for wish in ['"sctp"', '["udp","udp"]', "[]", "1"]:
            self.assertWireError(b'{"op":"connect","rid":1,"peer":"b","wish":' + wish.encode() + b"}", "bad-request", 1)

    def test_bad_peer_id(self) -> None:
        for pid in ['""', '"a b"', '"-x"', '"' + "a" * 65 + '"', "5"]:
            self.assertWireError(b'{"op":"register","rid":1,"id":' + pid.encode() + b"}", "bad-request", 1)

    def test_report_protocol_only_when_connected(self) -> None:
        self.assertWireError(
            b'{"op":"report","rid":1,"session":"s","outcome":"failed","protocol":"udp"}', "bad-request", 1
        )
        self.assertWireError(b'{"op":"report","rid":1,"session":"s","outcome":"connected"}', "bad-request", 1)

    def test_deep_nesting(self) -> None:
        self.assertWireError(b"[" * 100_000 + b"]" * 100_000, "bad-request")

    def test_huge_integer(self) -> None:
        self.assertWireError(b'{"op":"ping","rid":' + b"9" * 5000 + b"}", "bad-request")

    def test_session_key_length(self) -> None:
        self.assertRaises(ValueError, Session, "s", b"short", "b", "controlled", Description(), (), 0)

    def test_error_name_and_code_agree(self) -> None:
        self.assertWireError(
            b'{"op":"error","rid":1,"code":404,"error":"duplicate-id","reason":""}',
            "bad-request",
            1,
            decode_from_server,
        )


KEY = wire.b64url_encode(bytes(range(32)))
SIG = wire.b64url_encode(bytes(range(64)))


def register_line(**fields) -> bytes:
    obj = {"op": "register", "rid": 5, "id": "alice", "key": KEY, "sig": SIG, **fields}
    return json.dumps({k: v for k, v in obj.items() if v is not None}).encode()


class HostileRegistrationTests(SynchronousTestCase):
    """Every new field of version 2, attacked: all are 400 bad-request with the rid kept."""

    def assertRefused(self, line: bytes, why: str, decoder=decode_from_client) -> None:
        with self.assertRaises(WireError) as cm:
            decoder(line)
        self.assertEqual(cm.exception.error, "bad-request")
        self.assertIn(why, cm.exception.reason)

    def test_good_line(self) -> None:
        msg = decode_from_client(register_line())
        self.assertEqual((msg.key, msg.sig), (bytes(range(32)), bytes(range(64))))

    def test_missing_proof(self) -> None:
        self.assertRefused(register_line(key=None), "needs 'key'")
        self.assertRefused(register_line(sig=None), "needs 'sig'")

    def test_bad_base64(self) -> None:
        for bad in ("!" * 43, KEY[:-1] + "*", KEY[:-1] + "=", KEY[:40] + "+/A", " " + KEY[1:], KEY + "\n"):
            self.assertRefused(register_line(key=bad), "key")

    def test_padding_refused(self) -> None:
        self.assertRefused(register_line(key=KEY + "="), "base64url")

    def test_non_canonical_refused(self) -> None:
        """The last character's unused bits must be zero: one key, one spelling."""
        tweaked = KEY[:-1] + chr(ord(KEY[-1]) + 1)  # same 32 bytes, a low unused bit set
        self.assertEqual(base64.urlsafe_b64decode(tweaked + "="), bytes(range(32)))
        self.assertRefused(register_line(key=tweaked), "not canonical")

    def test_wrong_lengths(self) -> None:
        self.assertRefused(register_line(key=wire.b64url_encode(bytes(31))), "must encode 32 bytes, not 31")
        self.assertRefused(register_line(key=wire.b64url_encode(bytes(33))), "must encode 32 bytes")
        self.assertRefused(register_line(sig=wire.b64url_encode(bytes(63))), "must encode 64 bytes")
        self.assertRefused(register_line(sig=""), "sig")

    def test_huge_fields(self) -> None:
        """Bounded before decoding: a field limit, then the line limit of the mediator."""
        self.assertRefused(register_line(key="A" * 5000), "longer than 64")
        self.assertRefused(register_line(sig="A" * 5000), "longer than 128")

    def test_wrong_types(self) -> None:
        for bad in (32, ["A"], {"k": 1}, True):
            self.assertRefused(register_line(key=bad), "'key' must be a string")

    def test_old_fields_refused(self) -> None:
        """Version 1's secret is gone: an unknown field, like any other."""
        self.assertRefused(register_line(secret="0" * 32), "unknown field")

    def test_rid_kept(self) -> None:
        with self.assertRaises(WireError) as cm:
            decode_from_client(register_line(key="x"))
        self.assertEqual(cm.exception.rid, 5)

    def test_greeting_nonce(self) -> None:
        base = {"op": "hello", "proto": "natbypass-signal", "versions": [2], "max_line": 8192}
        for bad in ("", "A" * 20, "A" * 200, "AB=", 7):
            self.assertRefused(json.dumps({**base, "nonce": bad}).encode(), "nonce", decode_from_server)

    def test_constructor_checks_lengths(self) -> None:
        self.assertRaises(ValueError, Register, 1, "a", bytes(31), bytes(64))
        self.assertRaises(ValueError, Register, 1, "a", bytes(32), bytes(65))
        self.assertRaises(ValueError, Greeting, (2,), False, 8192, None, bytes(8))

    @given(st.binary(max_size=100))
    def test_b64url_round_trip(self, data: bytes) -> None:
        text = wire.b64url_encode(data)
        self.assertNotIn("=", text)
        if data:
            self.assertEqual(wire.b64url_decode(text, "x", 0, 100), data)

    @given(st.text(max_size=100))
    def test_b64url_any_text(self, text: str) -> None:
        """Any text decodes to bytes that encode back to exactly it, or is refused with ValueError."""
        try:
            data = wire.b64url_decode(text, "x", 0, 100)
        except ValueError:
            return
        self.assertEqual(wire.b64url_encode(data), text)


class PropertyTests(SynchronousTestCase):
    @given(client_messages)
    def test_client_round_trip(self, msg) -> None:
        line = encode(msg)
        self.assertNotIn(b"\n", line)
        self.assertEqual(decode_from_client(line), msg)

    @given(server_messages)
    def test_server_round_trip(self, msg) -> None:
        line = encode(msg)
        self.assertNotIn(b"\n", line)
        self.assertEqual(decode_from_server(line), msg)

    @given(st.binary(max_size=300))
    def test_any_bytes(self, line: bytes) -> None:
        raises_only_wire_error(decode_from_client, line)
        raises_only_wire_error(decode_from_server, line)

    @settings(max_examples=300)
    @given(near_messages)
    def test_near_messages(self, obj) -> None:
        line = json.dumps(obj).encode()
        raises_only_wire_error(decode_from_client, line)
        raises_only_wire_error(decode_from_server, line)

    @given(client_messages, st.integers(0, 400), st.binary(min_size=1, max_size=3))
    def test_mutated_lines(self, msg, at: int, junk: bytes) -> None:
        line = encode(msg)
        at = at % (len(line) + 1)
        raises_only_wire_error(decode_from_client, line[:at] + junk + line[at:])
        raises_only_wire_error(decode_from_client, line[:at])

    @given(client_messages)
    def test_rid_survives_errors(self, msg) -> None:
        """A request with an extra field is refused but its rid comes back."""
        obj = json.loads(encode(msg))
        obj["zzz"] = 1
        with self.assertRaises(WireError) as cm:
            decode_from_client(json.dumps(obj).encode())
        self.assertEqual(cm.exception.rid, obj["rid"])

"""
Fuzzing campaign against the real processes on loopback.

    python3 bench/fuzz_campaign.py --stun-udp 1000000 --stun-tcp 200000 --signal-lines 1000000 --punch 200000 \
        --json /tmp/fuzz.json

Starts `twistd natbypass-mediator` (STUN with RFC 5780 on 127.0.0.1 and
127.0.0.2, signalling, metrics) and one `twistd natbypass-peer` registered
at it, then, one phase after the other:

1. STUN/UDP: --stun-udp mutated and random datagrams, structure-aware (valid
   Binding requests with RFC 5780 CHANGE-REQUEST, RESPONSE-PORT, PADDING,
   long-term MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, FINGERPRINT,
   RFC 3489 requests, other methods and classes, then header fields,
   lengths, attribute types/lengths, truncation, duplicates, bit flips;
   FINGERPRINT/integrity recomputed half the time so the mutation reaches
   the deeper checks), from --sources source addresses 127.1.x.y (so the
   default 50/s per-source limit is not what answers them) to all four
   responder sockets.  Sending is closed-loop: after every --window
   datagrams a valid Binding is sent and its answer awaited, so the
   responder's socket buffer does not overflow (kernel drops are read from
   /proc/net/udp and reported).
2. STUN/TCP: --stun-tcp mutated messages over connections of 1-60 messages
   each, from rotating sources, each connection half-closed after sending and
   read until the mediator closes it.
3. Signalling: --signal-lines mutated lines (from valid hello, register,
   connect, accept, reject, report, ping, pong, bye lines of
   docs/protocol.md: JSON structure, types, lengths, unicode, lone
   surrogates, deep nesting, huge numbers, duplicate keys, NaN, invalid
   UTF-8, over-long lines), over many connections (--signal-concurrency
   open at once), 70% of them registered first; each connection ends with a
   ping whose pong shows every line before it was handled.
4. Punch: --punch PROBE/ACK-shaped packets (natbypass/punch/packet.py's
   layout, mutated), QUIC-looking long/short header packets, STUN
   responses, random bytes, aimed at the peer's UDP socket, paced.

Meanwhile a well-behaved client (bench/relcommon.py probe, its own process)
sends a STUN Binding (UDP and TCP) and a signalling connect + hello +
register + ping every second.  At the end: the mediator's counters, the
probe's p50/p99/failures, each process's RSS, and every log line with
"Traceback", "Unhandled", "failed on", "internal-error".

--profile throughput (the default) starts the mediator with `--rate 0
--max-per-source 0 --accept-rate 0` (signalling lines all processed) and the STUN limit at
its default; --profile defaults keeps every default (then most signalling
lines are refused 429, which is the point: the defaults stay healthy).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import random
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import relcommon as rc  # noqa: E402

COOKIE = 0x2112A442
FP_XOR = 0x5354554E

# ---------------------------------------------------------------------------------------------- STUN mutator


def attr(t: int, v: bytes, pad: bool = True) -> bytes:
    return struct.pack("!HH", t, len(v)) + v + (b"\0" * (-len(v) % 4) if pad else b"")


def header(mtype: int, length: int, tid: bytes, cookie: int = COOKIE) -> bytes:
    return struct.pack("!HHI12s", mtype, length, cookie, tid)


def with_integrity(mtype: int, tid: bytes, attrs: bytes, key: bytes, sha256: bool = False) -> bytes:
    t, size = (0x001C, 32) if sha256 else (0x0008, 20)
    msg = header(mtype, len(attrs) + 4 + size, tid) + attrs
    mac = hmac.new(key, msg, hashlib.sha256 if sha256 else hashlib.sha1).digest()[:size]
    return msg + attr(t, mac)


def with_fingerprint(msg: bytes) -> bytes:
    body = msg[:2] + struct.pack("!H", len(msg) - 20 + 8) + msg[4:]
    crc = (zlib.crc32(body) & 0xFFFFFFFF) ^ FP_XOR
    return body + attr(0x8028, struct.pack("!I", crc))


def fix_length(msg: bytes) -> bytes:
    return msg[:2] + struct.pack("!H", max(0, len(msg) - 20) & 0xFFFF) + msg[4:]


LT_KEY = hashlib.md5(b"user:example.org:pass").digest()


def seeds(rng: random.Random) -> list[bytes]:
    tid = rng.randbytes(12)
    out = [
        header(0x0001, 0, tid),
        with_fingerprint(header(0x0001, 0, tid)),
        with_fingerprint(header(0x0001, 8, tid) + attr(0x0003, struct.pack("!I", rng.choice((0, 2, 4, 6))))),
        header(0x0001, 8, tid) + attr(0x0003, struct.pack("!I", 6)),
        with_fingerprint(header(0x0001, 8, tid) + attr(0x0027, struct.pack("!HH", rng.randrange(65536), 0))),
        header(0x0001, 0, tid) + attr(0x0026, b"\0" * rng.choice((4, 64, 500))),
        header(0x0001, 0, tid, cookie=rng.getrandbits(32)),  # RFC 3489
        header(0x0001, 8, tid, cookie=rng.getrandbits(32)) + attr(0x0003, struct.pack("!I", 4)),
        header(0x0001, 12, tid) + attr(0x0002, struct.pack("!BBH4s", 0, 1, 9, socket.inet_aton("192.0.2.1"))),
        header(0x0011, 0, tid),  # indication
        header(0x0101, 12, tid) + attr(0x0020, struct.pack("!BBH4s", 0, 1, 1234, b"\1\2\3\4")),  # response
        header(0x0003, 0, tid),  # Allocate
        header(0x0001, 0, tid) + attr(0x8022, "fuzz ☃".encode()),
        header(0x0001, 0, tid) + attr(rng.randrange(0x0000, 0x8000), rng.randbytes(rng.randrange(0, 12))),
        header(0x0001, 0, tid) + attr(rng.randrange(0x8000, 0x10000), rng.randbytes(rng.randrange(0, 12))),
    ]
    lt = (
        attr(0x0006, b"user") + attr(0x0014, b"example.org") + attr(0x0015, b"nonce-" + rng.randbytes(8).hex().encode())
    )
    out.append(with_fingerprint(with_integrity(0x0001, tid, lt, LT_KEY)))
    out.append(with_fingerprint(with_integrity(0x0001, tid, lt + attr(0x0003, b"\0\0\0\6"), LT_KEY, sha256=True)))
    out.append(with_integrity(0x0001, tid, attr(0x0006, b"user"), b"short-term-pass"))
    out.append(with_fingerprint(header(0x0001, 0, tid) + attr(0x8000, rng.randbytes(8))))  # ICE-ish optional attr
    out = [fix_length(m) for m in out]
    return out


def split_attrs(msg: bytes) -> list[tuple[int, bytes]]:
    attrs, i = [], 20
    while i + 4 <= len(msg):
        t, n = struct.unpack_from("!HH", msg, i)
        attrs.append((t, msg[i + 4 : i + 4 + n]))
        i += 4 + n + (-n % 4)
    return attrs


INTERESTING_TYPES = (
    0x0001,
    0x0002,
    0x0003,
    0x0006,
    0x0008,
    0x0009,
    0x000A,
    0x0014,
    0x0015,
    0x001C,
    0x001D,
    0x0020,
    0x0026,
    0x0027,
    0x8022,
    0x8023,
    0x8028,
    0x802B,
    0x802C,
    0x0000,
    0xFFFF,
    0x7FFF,
)


def mutate_stun(rng: random.Random, base: list[bytes], max_size: int = 1400) -> bytes:
    r = rng.random()
    if r < 0.03:
        return rng.randbytes(rng.choice((0, 1, 4, 19, 20, 21, 28, 64, 548, rng.randrange(0, max_size))))
    msg = bytearray(rng.choice(base))
    tid = rng.randbytes(12)
    msg[8:20] = tid
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        kind = rng.randrange(14)
        if len(msg) < 20 and kind in (0, 1, 2, 11):
            kind = 4
        if kind == 0:  # message type
            struct.pack_into(
                "!H",
                msg,
                0,
                rng.choice((0x0001, 0x0011, 0x0101, 0x0111, 0x0002, 0x0004, 0x3FFF, 0xC001, rng.randrange(65536))),
            )
        elif kind == 1:  # length field
            struct.pack_into(
                "!H",
                msg,
                2,
                rng.choice((0, 1, 3, 4, len(msg), len(msg) - 16, len(msg) + 4, 0xFFFF, rng.randrange(65536))) & 0xFFFF,
            )
        elif kind == 2:  # cookie
            struct.pack_into("!I", msg, 4, rng.choice((0, COOKIE ^ 1, rng.getrandbits(32))))
        elif kind == 3 and len(msg) > 20:  # truncate
            del msg[rng.randrange(1, len(msg)) :]
        elif kind == 4:  # flip bits
            for _ in range(rng.randrange(1, 9)):
                i = rng.randrange(len(msg)) if msg else 0
                if msg:
                    msg[i] ^= 1 << rng.randrange(8)
        elif kind in (5, 6, 7, 8, 9, 10) and len(msg) >= 20:
            attrs = split_attrs(bytes(msg))
            if kind == 5 and attrs:  # duplicate an attribute
                j = rng.randrange(len(attrs))
                attrs.insert(rng.randrange(len(attrs) + 1), attrs[j])
            elif kind == 6 and attrs:  # change a type
                j = rng.randrange(len(attrs))
                attrs[j] = (rng.choice(INTERESTING_TYPES + (rng.randrange(65536),)), attrs[j][1])
            elif kind == 7 and attrs:  # change a value's length
                j = rng.randrange(len(attrs))
                t, v = attrs[j]
                attrs[j] = (
                    t,
                    v[: rng.randrange(len(v) + 1)] if rng.random() < 0.5 else v + rng.randbytes(rng.randrange(1, 40)),
                )
            elif kind == 8:  # add an attribute
                t = rng.choice(INTERESTING_TYPES + (rng.randrange(65536),))
                attrs.insert(
                    rng.randrange(len(attrs) + 1), (t, rng.randbytes(rng.choice((0, 1, 2, 4, 8, 20, 32, 64, 300))))
                )
            elif kind == 9 and attrs:  # drop or reorder
                if rng.random() < 0.5:
                    attrs.pop(rng.randrange(len(attrs)))
                else:
                    rng.shuffle(attrs)
            elif kind == 10:  # many attributes
                attrs += [(rng.randrange(0x8000, 0x10000), b"") for _ in range(rng.randrange(10, 300))]
            body = b"".join(attr(t, v, pad=rng.random() > 0.05) for t, v in attrs)
            msg = bytearray(
                header(struct.unpack_from("!H", msg, 0)[0], len(body), tid, struct.unpack_from("!I", msg, 4)[0]) + body
            )
        elif kind == 11 and len(msg) > 28:  # lie in an attribute length field in place
            attrs_at = 20
            struct.pack_into("!H", msg, attrs_at + 2, rng.randrange(65536))
        elif kind == 12:  # append junk
            msg += rng.randbytes(rng.randrange(1, 64))
        elif kind == 13 and len(msg) >= 20:  # address family / port games in an XOR-ish value
            msg += attr(
                rng.choice((0x0020, 0x0001, 0x0002, 0x802B, 0x802C)),
                bytes([0, rng.choice((0, 1, 2, 3, 255))]) + rng.randbytes(rng.choice((2, 6, 18, 3))),
            )
    if len(msg) >= 20:
        if rng.random() < 0.5:
            msg = bytearray(fix_length(bytes(msg)))
        if rng.random() < 0.3:
            msg = bytearray(with_fingerprint(bytes(msg)))
        elif rng.random() < 0.1:
            msg = bytearray(
                with_integrity(
                    struct.unpack_from("!H", msg, 0)[0], tid, bytes(msg[20:]), LT_KEY, sha256=rng.random() < 0.5
                )
            )
    return bytes(msg[:max_size])


# ---------------------------------------------------------------------------------------------- signalling mutator

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def signal_seeds(rng: random.Random) -> list[dict]:
    desc = {
        "candidates": [
            {"kind": "host", "proto": "udp", "host": "192.168.1.20", "port": 40000},
            {"kind": "srflx", "proto": "udp", "host": "203.0.113.7", "port": 61000},
            {"kind": "tcp-srflx", "proto": "tcp", "host": "2001:db8::1", "port": 61001},
        ],
        "nat": {
            "mapping": "endpoint-independent",
            "filtering": "address-and-port-dependent",
            "port_preserving": False,
            "port_delta": 2,
            "tcp_mapping": "address-dependent",
        },
        "wish": rng.choice(("auto", "udp", ["udp", "tcp"])),
        "fingerprint": "nb1-a3r7-3d62-fg5w-bk2z-kv66-mhw3-blwn-wiyr",
    }
    rid = rng.randrange(1, 1 << 20)
    return [
        {"op": "hello", "rid": rid, "v": 2, "agent": "natbypass/0.1.0"},
        {
            "op": "register",
            "rid": rid,
            "id": "alice",
            "key": "".join(rng.choice(B64) for _ in range(43)),
            "sig": "".join(rng.choice(B64) for _ in range(86)),
            "token": "s3cret",
            "replace": True,
        },
        {
            "op": "register",
            "rid": rid,
            "id": "bob",
            "key": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
            "sig": "x" * 86,
            "time": int(time.time() * 1000),
            "cnonce": "A" * 22,
        },
        {"op": "connect", "rid": rid, "peer": rng.choice(("bob", "fuzzpeer", "carol")), **desc},
        {"op": "accept", "rid": rid, "offer": "Wm9vLWJhci1iYXox", **desc},
        {"op": "reject", "rid": rid, "offer": "Wm9vLWJhci1iYXox", "reason": "busy"},
        {"op": "report", "rid": rid, "session": "c2Vzc2lvbi1pZC0x", "outcome": "connected", "protocol": "udp"},
        {"op": "report", "rid": rid, "session": "c2Vzc2lvbi1pZC0x", "outcome": "failed", "detail": "no probe"},
        {"op": "ping", "rid": rid},
        {"op": "pong", "rid": rid},
    ]  # no bye: it closes the connection (the campaign ends some connections with one instead)


WEIRD_STRINGS = [
    "",
    " ",
    "\u0000",
    "\u202e\u2066evil",
    "\U0001f600" * 50,
    "a" * 300,
    "x" * 9000,
    "é",
    "\u2028",
    "\r\n",
    "\\",
    '"',
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\ufeff",
    "nb1-" + "a" * 40,
    "203.0.113.7",
    "::ffff:1.2.3.4",
    "auto",
    "udp",
    "tcp",
    "controlling",
    "connected",
    "endpoint-independent",
    "hello",
]


def weird_value(rng: random.Random, depth: int = 0):
    k = rng.randrange(12)
    if k == 0:
        return rng.choice((0, -1, 1, 2**53 - 1, 2**53, 2**63, 2**64 + 1, -(2**63), 65535, 65536, 10**30))
    if k == 1:
        return rng.choice((0.0, -0.0, 1.5, 1e308, -1e-308, 3.0))
    if k == 2:
        return rng.choice(WEIRD_STRINGS)
    if k == 3:
        return "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(1, 30))).replace("\ud800", "")
    if k == 4:
        return rng.choice((True, False, None))
    if k == 5 and depth < 4:
        return [weird_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if k == 6 and depth < 4:
        return {
            rng.choice(("op", "rid", "x", "host", "port", "kind", "proto")): weird_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))
        }
    if k == 7:
        return [{"kind": "host", "proto": "udp", "host": "10.0.0.1", "port": 1}] * rng.choice((0, 32, 33, 200))
    if k == 8:
        return "".join(rng.choice(B64) for _ in range(rng.choice((0, 21, 22, 23, 42, 43, 44, 85, 86, 87))))
    if k == 9:
        return rng.choice(
            (
                "hello",
                "register",
                "connect",
                "accept",
                "reject",
                "report",
                "ping",
                "pong",
                "bye",
                "offer",
                "session",
                "error",
                "ok",
                "registered",
                "HELLO",
                "",
            )
        )
    return rng.randrange(-(2**70), 2**70)


def all_paths(obj, prefix=()):
    yield prefix
    if len(prefix) > 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from all_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from all_paths(v, prefix + (i,))


def set_path(obj, path, value):
    if not path:
        return value
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


def del_path(obj, path):
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    del cur[path[-1]]


def mutate_line(rng: random.Random, seeds_: list[dict]) -> bytes:
    obj = json.loads(json.dumps(rng.choice(seeds_)))
    for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
        try:
            obj = json.loads(json.dumps(obj))  # no shared or circular parts between steps
        except (ValueError, RecursionError):
            obj = json.loads(json.dumps(seeds_[0]))
        paths = list(all_paths(obj))
        path = rng.choice(paths)
        k = rng.randrange(6)
        if k <= 2:
            obj = set_path(obj, path, weird_value(rng))
        elif k == 3 and path:
            with contextlib.suppress(Exception):
                del_path(obj, path)
        elif k == 4 and isinstance(obj, dict):
            obj[rng.choice(("extra", "op2", "rid ", "Op", "candidates", "nat"))] = weird_value(rng)
        elif k == 5 and path and isinstance(obj, dict):
            obj = set_path(obj, path, json.loads(json.dumps(obj)) if rng.random() < 0.3 else [obj.get("op")])
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
    except (ValueError, RecursionError):  # a mutation made the object refer to itself
        text = json.dumps(seeds_[0])
    t = rng.randrange(24)
    if t == 0:  # duplicate key
        text = text[:-1] + ',"op":"ping"}' if text.endswith("}") else text
    elif t == 1:
        text = text[: rng.randrange(len(text) + 1)]
    elif t == 2:  # deep nesting
        d = rng.choice((50, 999, 1000, 1001, 3000, 4090))
        text = (
            text.replace('"rid":', '"rid":' + "[" * d + "1" + "]" * d, 1) if rng.random() < 0.5 else "[" * d + "]" * d
        )
    elif t == 3:  # huge numbers
        text = text.replace('"rid":', '"rid":' + "9" * rng.choice((17, 300, 4300, 4301, 8000)) + ',"x":', 1)
    elif t == 4:
        text = text.replace(
            '"rid":',
            '"rid":'
            + rng.choice(("NaN", "Infinity", "-Infinity", "1e999", "-0", "1.0", "1E2", "0x10", "01", "+1", "true"))
            + ',"y":',
            1,
        )
    elif t == 5:  # lone surrogates and escapes
        text = text.replace('"op":"', '"op":"\\ud800' if rng.random() < 0.5 else '"op":"\\udfff\\u0000', 1)
    elif t == 6:
        raw = bytearray(text.encode("utf-8", "surrogatepass"))
        for _ in range(rng.randrange(1, 4)):
            if raw:
                raw[rng.randrange(len(raw))] = rng.choice((0xFF, 0xC0, 0x80, 0x00, 0xED, rng.randrange(256)))
        return bytes(raw).replace(b"\n", b" ")
    elif t == 7:
        text = text + rng.choice((" ", "garbage", "{}", "\r", "\t"))
    elif t == 8:
        text = rng.choice(("", " ", "null", "[]", "1", '"op"', "{", "}", "{}", '{"op":null}', "\ufeff{}", "\r"))
    elif t == 10:
        text = text.replace(",", ", ").replace(":", " : ")
    out = text.encode("utf-8", "surrogatepass").replace(b"\n", b"\\n")
    if len(out) > 8000 and rng.random() < 0.995:  # over-long lines end the connection (413): keep them rare
        out = out[:8000]
    return out


# ---------------------------------------------------------------------------------------------- punch/QUIC mutator


def mutate_punch(rng: random.Random) -> bytes:
    k = rng.randrange(8)
    if k <= 2:  # PROBE / ACK shapes
        sid = rng.randbytes(rng.choice((1, 16, 64, rng.randrange(0, 80))))
        head = struct.pack(
            "!BBBBB",
            rng.choice((0xCE, 0xCE, 0xCE, 0xCF, rng.randrange(256))),
            rng.choice((2, 2, 2, 1, 3, 0)),
            rng.choice((1, 2, 1, 2, 0, 3, 7, 255)),
            rng.choice((0, 1, 0, 1, 2, 0xFE)),
            rng.choice((len(sid), len(sid), 0, 65, 255, rng.randrange(256))),
        )
        pkt = head + sid + rng.randbytes(16) + rng.randbytes(16)
        if rng.random() < 0.3:
            pkt = pkt[: rng.randrange(len(pkt) + 1)]
        elif rng.random() < 0.2:
            pkt += rng.randbytes(rng.randrange(1, 40))
        return pkt
    if k == 3:  # QUIC long header (Initial/0-RTT/Handshake/Retry), version 1 / draft / negotiation
        first = 0xC0 | (rng.randrange(4) << 4) | rng.randrange(16)
        version = rng.choice((1, 0, 0x6B3343CF, 0xFF00001D, rng.getrandbits(32)))
        dcid = rng.randbytes(rng.choice((0, 8, 20, 21)))
        scid = rng.randbytes(rng.choice((0, 8, 20)))
        body = struct.pack("!BI", first, version) + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
        body += bytes([rng.choice((0, 0x40, 0x7F))]) + rng.randbytes(rng.choice((2, 20, 100, 1200 - len(body))))
        return body[:1500]
    if k == 4:  # QUIC short header
        return bytes([0x40 | rng.randrange(64)]) + rng.randbytes(rng.choice((8, 20, 40, 1200)))
    if k == 5:  # STUN responses with unknown transaction ids (the peer's STUN client shares the socket)
        return fix_length(
            header(rng.choice((0x0101, 0x0111, 0x0001)), 0, rng.randbytes(12))
            + attr(0x0020, struct.pack("!BBH4s", 0, rng.choice((1, 2)), rng.randrange(65536), rng.randbytes(4)))
        )
    if k == 6:
        return mutate_stun(rng, STUN_SEEDS)
    return rng.randbytes(rng.randrange(0, 1400))


STUN_SEEDS = seeds(random.Random(1))

# ---------------------------------------------------------------------------------------------- phases


def source_addr(block: int, i: int) -> str:
    return f"127.{block}.{(i >> 8) & 255}.{(i & 255) or 1}"


def phase_stun_udp(med: rc.Mediator, count: int, nsources: int, window: int, rng: random.Random) -> dict:
    socks = []
    for i in range(nsources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.bind((source_addr(1, i + 1), 0))
        s.setblocking(False)
        socks.append(s)
    targets = med.stun_addrs
    drops0 = sum(rc.udp_drops(p) for p in {p for _, p in targets})
    base_pool = [seeds(rng) for _ in range(32)]
    sent = markers = marker_lost = 0
    t0 = time.time()
    try:
        while sent < count:
            for _ in range(window):
                s = socks[rng.randrange(nsources)]
                with contextlib.suppress(BlockingIOError, OSError):
                    s.sendto(mutate_stun(rng, base_pool[sent & 31]), targets[rng.randrange(len(targets))])
                sent += 1
            # the closed loop: one valid Binding from a random source to the primary socket, and wait for it
            s = socks[rng.randrange(nsources)]
            tid = os.urandom(12)
            s.sendto(rc.binding(tid), targets[0])
            markers += 1
            deadline = time.time() + 1.0
            got = False
            while time.time() < deadline and not got:
                try:
                    data = s.recv(2048)
                    got = rc.parse_mapped(data, tid)
                except BlockingIOError:
                    time.sleep(0.0002)
            marker_lost += not got
            if markers % 200 == 0:
                for x in socks:  # drain answers to mutated requests so the senders' buffers do not fill
                    with contextlib.suppress(BlockingIOError, OSError):
                        while True:
                            x.recv(2048)
    finally:
        for s in socks:
            s.close()
    elapsed = time.time() - t0
    drops = sum(rc.udp_drops(p) for p in {p for _, p in targets}) - drops0
    return {
        "sent": sent,
        "markers": markers,
        "markers_unanswered": marker_lost,
        "seconds": round(elapsed, 1),
        "rate_per_s": round(sent / elapsed),
        "kernel_drops": drops,
        "sources": nsources,
    }


def phase_stun_tcp(med: rc.Mediator, count: int, rng: random.Random) -> dict:
    sent = conns = closed_by_server = refused = 0
    base_pool = [seeds(rng) for _ in range(32)]
    t0 = time.time()
    i = 0
    while sent < count:
        i += 1
        n = rng.choice((1, 2, 5, 20, 60))
        frames = [mutate_stun(rng, base_pool[i & 31], max_size=600) for _ in range(n)]
        if rng.random() < 0.5:  # keep most frames well framed, so the stream reaches the later ones
            frames = [fix_length(f) if len(f) >= 20 else f for f in frames]
        data = b"".join(frames)
        target = med.stun_addrs[rng.randrange(len(med.stun_addrs))]
        try:
            s = socket.create_connection(target, timeout=3, source_address=(source_addr(3, i % 4000 + 1), 0))
        except OSError:
            refused += 1
            continue
        conns += 1
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
            closed_by_server += 1
        except OSError:
            pass
        finally:
            s.close()
        sent += n
    elapsed = time.time() - t0
    return {
        "sent": sent,
        "connections": conns,
        "connect_failed": refused,
        "seconds": round(elapsed, 1),
        "rate_per_s": round(sent / elapsed),
    }


class SigConn:
    def __init__(self, sock: socket.socket, lines: list[bytes], register: bool, peer_id: str) -> None:
        self.sock, self.lines, self.register, self.peer_id = sock, lines, register, peer_id
        self.out = b""
        self.inbuf = b""
        self.greeted = False
        self.done = False
        self.lines_sent = 0
        self.started = time.time()
        self.pong = False
        self.closed_by_server = False


def phase_signal(med: rc.Mediator, count: int, concurrency: int, rng: random.Random, identity) -> dict:
    sel = selectors.DefaultSelector()
    lines_total = conns = pongs = server_closed = timeouts = connect_failed = replies = 0
    errors_by_code: dict[str, int] = {}
    seeds_ = signal_seeds(rng)
    t0 = time.time()
    active: set[SigConn] = set()
    n = 0

    def open_one() -> int:
        nonlocal n, conns, connect_failed
        n += 1
        k = rng.choice((1, 5, 50, 200, 500))
        lines = [mutate_line(rng, seeds_) for _ in range(k)]
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((source_addr(4, n % 3000 + 1), 0))
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", med.signal_port))
        except OSError:
            connect_failed += 1
            return 0
        c = SigConn(s, lines, rng.random() < 0.7, f"fz{n}")
        conns += 1
        active.add(c)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        return k

    def finish(c: SigConn) -> None:
        active.discard(c)
        with contextlib.suppress(Exception):
            sel.unregister(c.sock)
        c.sock.close()

    while lines_total < count or active:
        while lines_total < count and len(active) < concurrency:
            lines_total += open_one()
        for key, ev in sel.select(timeout=0.5):
            c: SigConn = key.data
            if ev & selectors.EVENT_READ:
                try:
                    chunk = c.sock.recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk == b"":
                    c.closed_by_server = True
                    server_closed += not c.pong
                    finish(c)
                    continue
                if chunk:
                    c.inbuf += chunk
                    *complete, c.inbuf = c.inbuf.split(b"\n")
                    for line in complete:
                        replies += 1
                        try:
                            msg = json.loads(line)
                        except ValueError:
                            continue
                        op = msg.get("op")
                        if op == "hello" and not c.greeted:
                            c.greeted = True
                            head = []
                            if c.register:
                                nonce = rc.base64.urlsafe_b64decode(msg["nonce"] + "=" * (-len(msg["nonce"]) % 4))
                                head = [
                                    b'{"op":"hello","rid":1,"v":2}',
                                    json.dumps(
                                        {
                                            "op": "register",
                                            "rid": 2,
                                            "id": c.peer_id,
                                            "key": rc.b64u(identity.public_bytes()),
                                            "sig": rc.b64u(identity.sign_registration(nonce, c.peer_id)),
                                            "replace": True,
                                        }
                                    ).encode(),
                                ]
                            end = [b'{"op":"ping","rid":4503599627370495}']
                            r = rng.random()
                            if r < 0.03:  # an over-long line: 413 and closed (so no pong)
                                end = [b'{"op":"ping","rid":1,"x":"' + b"a" * rng.choice((8170, 9000, 70000)) + b'"}']
                            elif r < 0.06:
                                end = [b'{"op":"bye","rid":3}']
                            c.out = b"\n".join(head + c.lines + end) + b"\n"
                            c.lines_sent = len(c.lines)
                        elif op == "pong" and msg.get("rid") == 4503599627370495:
                            c.pong = True
                            pongs += 1
                            finish(c)
                            break
                        elif op == "ping":
                            c.out += b'{"op":"pong","rid":%d}\n' % msg.get("rid", 0)
                        elif op == "error":
                            key_ = f"{msg.get('code')} {msg.get('error')}"
                            errors_by_code[key_] = errors_by_code.get(key_, 0) + 1
            if c in active and ev & selectors.EVENT_WRITE and c.out:
                try:
                    k = c.sock.send(c.out[:65536])
                    c.out = c.out[k:]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    server_closed += 1
                    finish(c)
        now = time.time()
        for c in list(active):
            if now - c.started > 60:
                timeouts += 1
                finish(c)
    elapsed = time.time() - t0
    return {
        "lines": lines_total,
        "connections": conns,
        "completed_with_pong": pongs,
        "ended_by_413_or_bye_on_purpose": "about 6% of connections",
        "closed_by_mediator_before_pong": server_closed,
        "timed_out": timeouts,
        "connect_failed": connect_failed,
        "replies": replies,
        "seconds": round(elapsed, 1),
        "lines_per_s": round(lines_total / elapsed),
        "errors": dict(sorted(errors_by_code.items(), key=lambda kv: -kv[1])[:20]),
    }


def phase_punch(peer: rc.Peer, count: int, rate: float, rng: random.Random) -> dict:
    socks = []
    for i in range(64):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source_addr(5, i + 1), 0))
        s.setblocking(False)
        socks.append(s)
    ports = peer.udp_ports
    drops0 = sum(rc.udp_drops(p) for p in ports)
    t0 = time.time()
    sent = 0
    try:
        while sent < count:
            due = int((time.time() - t0) * rate)
            if sent >= due:
                time.sleep(0.001)
                continue
            for _ in range(min(256, due - sent, count - sent)):
                with contextlib.suppress(BlockingIOError, OSError):
                    socks[rng.randrange(64)].sendto(mutate_punch(rng), ("127.0.0.1", rng.choice(ports)))
                sent += 1
    finally:
        for s in socks:
            s.close()
    elapsed = time.time() - t0
    return {
        "sent": sent,
        "seconds": round(elapsed, 1),
        "rate_per_s": round(sent / elapsed),
        "ports": ports,
        "kernel_drops": sum(rc.udp_drops(p) for p in ports) - drops0,
        "peer_alive": peer.alive(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stun-udp", type=int, default=1_000_000)
    p.add_argument("--stun-tcp", type=int, default=200_000)
    p.add_argument("--signal-lines", type=int, default=1_000_000)
    p.add_argument("--punch", type=int, default=200_000)
    p.add_argument("--punch-rate", type=float, default=10_000)
    p.add_argument("--sources", type=int, default=4000)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--signal-concurrency", type=int, default=64)
    p.add_argument("--profile", choices=("throughput", "defaults"), default="throughput")
    p.add_argument("--seed", type=int, default=20261130)
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop what we started
    rc.raise_nofile()
    rng = random.Random(a.seed)
    from natbypass.identity import Identity

    identity = Identity.generate()
    tmp = tempfile.mkdtemp(prefix="nb-fuzz-")
    extra = ["--rate", "0", "--max-per-source", "0", "--accept-rate", "0"] if a.profile == "throughput" else []
    result: dict = {
        "machine": rc.machine(),
        "profile": a.profile,
        "argv": sys.argv,
        "seed": a.seed,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    med = peer = probe = None
    rss: list[tuple[float, int, int]] = []
    try:
        med = rc.Mediator(tmp, extra)
        result["mediator_cmd"] = " ".join(med.cmd)
        peer = rc.Peer(tmp, med, "fuzzpeer")
        result["peer_cmd"] = " ".join(peer.cmd)
        probe = rc.Probe(tmp, med, stun_tcp=True)
        time.sleep(2)
        t_start = time.time()
        phases = {}
        for name, fn in (
            ("stun_udp", lambda: phase_stun_udp(med, a.stun_udp, a.sources, a.window, rng)),
            ("stun_tcp", lambda: phase_stun_tcp(med, a.stun_tcp, rng)),
            ("signal", lambda: phase_signal(med, a.signal_lines, a.signal_concurrency, rng, identity)),
            ("punch", lambda: phase_punch(peer, a.punch, a.punch_rate, rng)),
        ):
            rss.append((round(time.time() - t_start, 1), rc.rss_kib(med.pid), rc.rss_kib(peer.pid)))
            phases[name] = fn()
            phases[name]["mediator_alive"] = med.alive()
            print(name, json.dumps(phases[name]), flush=True)
        rss.append((round(time.time() - t_start, 1), rc.rss_kib(med.pid), rc.rss_kib(peer.pid)))
        time.sleep(3)
        result["phases"] = phases
        result["probe"] = probe.finish()
        probe = None
        met = med.metrics()
        result["stun_counters"] = {
            k.replace("natbypass_stun_", ""): v for k, v in met.items() if k.startswith("natbypass_stun_")
        }
        result["mediator_refusals"] = {k: v for k, v in met.items() if "refusals_total" in k}
        result["mediator_gauges"] = {
            k: v
            for k, v in met.items()
            if k
            in (
                "natbypass_mediator_peers",
                "natbypass_mediator_open_connections",
                "natbypass_mediator_pending_offers",
                "natbypass_mediator_open_sessions",
            )
        }
        result["healthz_after"] = rc.healthy(med.metrics_port)
        result["rss_kib"] = rss
        result["mediator_cpu_s"] = rc.cpu_seconds(med.pid)
    finally:
        if probe is not None:
            result["probe"] = probe.finish()
        for proc in (peer, med):
            if proc is not None:
                result[f"{proc.name}_exit"] = proc.stop()
                bad = proc.problems()
                result[f"{proc.name}_problem_lines"] = len(bad)
                result[f"{proc.name}_problem_sample"] = bad[:20]
        result["tmp"] = tmp
        print(json.dumps(result, indent=1, default=str))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1, default=str)
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"machine: {result['machine']}; profile {a.profile}")
    print("probe:", rc.fmt_probe(result.get("probe", {})))
    for proc in ("mediator", "fuzzpeer"):
        print(f"{proc}: {result.get(proc + '_problem_lines')} problem log lines, exit {result.get(proc + '_exit')}")


if __name__ == "__main__":
    main()

"""
Tests for the NAT-PMP (RFC 6886) and PCP (RFC 6887) codecs and the
/proc/net/route reader: byte layouts annotated from the RFCs, hypothesis
round trips, and every malformed input a DecodeError.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from natbypass.portmap import natpmp, pcp
from natbypass.portmap.errors import DecodeError
from natbypass.portmap.gateway import default_gateway, parse_route_table

ports = st.integers(1, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
protocols = st.sampled_from(["udp", "tcp"])
ipv4 = st.ip_addresses(v=4).map(str)
ips = st.one_of(ipv4, st.ip_addresses(v=6).map(str).filter(lambda a: not a.startswith("::ffff:")))


class NatPmpLayoutTests(SynchronousTestCase):
    def test_external_address_request(self) -> None:
        # RFC 6886 3.2: version 0, opcode 0.
        self.assertEqual(natpmp.ExternalAddressRequest().encode(), b"\x00\x00")

    def test_map_request(self) -> None:
        # RFC 6886 3.3: version 0, opcode 1 (UDP), reserved 0, internal 4000, suggested 5000, lifetime 7200.
        wire = bytes.fromhex("00 01 0000 0fa0 1388 00001c20")
        self.assertEqual(natpmp.MapRequest("udp", 4000, 5000, 7200).encode(), wire)
        self.assertEqual(natpmp.decode_request(wire), natpmp.MapRequest("udp", 4000, 5000, 7200))
        # Opcode 2 is TCP; lifetime 0 and external port 0 delete.
        self.assertEqual(natpmp.MapRequest("tcp", 4000, 0, 0).encode(), bytes.fromhex("00 02 0000 0fa0 0000 00000000"))

    def test_external_address_response(self) -> None:
        # Version 0, opcode 128, result 0, epoch 1000, address 198.51.100.7.
        wire = bytes.fromhex("00 80 0000 000003e8 c6336407")
        self.assertEqual(natpmp.decode_response(wire), natpmp.ExternalAddressResponse(0, 1000, "198.51.100.7"))

    def test_map_response(self) -> None:
        # Version 0, opcode 129 (UDP), result 0, epoch 5, internal 4000, external 40000, lifetime 3600.
        wire = bytes.fromhex("00 81 0000 00000005 0fa0 9c40 00000e10")
        self.assertEqual(natpmp.decode_response(wire), natpmp.MapResponse("udp", 0, 5, 4000, 40000, 3600))

    def test_short_error_response(self) -> None:
        # RFC 6886 3.5: an error may come as the 8-byte header only.
        r = natpmp.decode_response(bytes.fromhex("00 82 0005 00000009"))
        self.assertEqual(r, natpmp.MapResponse("tcp", natpmp.Result.UNSUPPORTED_OPCODE, 9, 0, 0, 0))
        self.assertEqual(natpmp.result_name(r.result), "unsupported-opcode")
        self.assertEqual(natpmp.result_name(77), "result-77")

    def test_malformed(self) -> None:
        for bad in (
            b"",
            b"\x00\x80\x00",
            bytes.fromhex("01 80 0000 00000000 01020304"),  # version 1
            bytes.fromhex("00 00 0000 00000000 01020304"),  # a request
            bytes.fromhex("00 80 0000 00000000 010203"),  # truncated address
            bytes.fromhex("00 80 0000 00000000"),  # success without the address
            bytes.fromhex("00 81 0000 00000005 0fa0 9c40 00000e10 00"),  # one byte too many
            bytes.fromhex("00 83 0000 00000005 0fa0 9c40 00000e10"),  # unknown opcode
        ):
            self.assertRaises(DecodeError, natpmp.decode_response, bad)

    def test_bad_values_refused(self) -> None:
        self.assertRaises(ValueError, natpmp.MapRequest, "sctp", 1)
        self.assertRaises(ValueError, natpmp.MapRequest, "udp", 0)
        self.assertRaises(ValueError, natpmp.MapRequest, "udp", 1, 70000)
        self.assertRaises(ValueError, natpmp.MapRequest, "udp", 1, 1, -1)


class NatPmpPropertyTests(SynchronousTestCase):
    @given(protocols, ports, st.integers(0, 0xFFFF), u32)
    def test_request_round_trip(self, protocol: str, internal: int, external: int, lifetime: int) -> None:
        r = natpmp.MapRequest(protocol, internal, external, lifetime)
        self.assertEqual(natpmp.decode_request(r.encode()), r)

    @given(protocols, st.integers(0, 0xFFFF), u32, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), u32)
    def test_map_response_round_trip(self, protocol, result, epoch, internal, external, lifetime) -> None:
        r = natpmp.MapResponse(protocol, result, epoch, internal, external, lifetime)
        self.assertEqual(natpmp.decode_response(r.encode()), r)

    @given(st.integers(0, 0xFFFF), u32, ipv4)
    def test_address_response_round_trip(self, result: int, epoch: int, address: str) -> None:
        r = natpmp.ExternalAddressResponse(result, epoch, address)
        self.assertEqual(natpmp.decode_response(r.encode()), r)

    @given(st.binary(max_size=40))
    def test_anything_decodes_or_raises_decode_error(self, data: bytes) -> None:
        for decode in (natpmp.decode_response, natpmp.decode_request):
            try:
                decode(data)
            except DecodeError:
                pass


NONCE = bytes(range(1, 13))


class PcpLayoutTests(SynchronousTestCase):
    def test_map_request(self) -> None:
        r = pcp.MapRequest("10.1.0.2", NONCE, "udp", 4000, 7200, 4000)
        wire = r.encode()
        self.assertEqual(len(wire), 60)
        # Common header (RFC 6887 7.1): version 2, R=0 opcode 1, reserved, lifetime, client as ::ffff:10.1.0.2.
        self.assertEqual(wire[:8], bytes.fromhex("02 01 0000 00001c20"))
        self.assertEqual(wire[8:24], bytes.fromhex("00000000000000000000ffff0a010002"))
        # MAP body (11.1): nonce, protocol 17, reserved, internal 4000, suggested 4000, suggested ::ffff:0.0.0.0.
        self.assertEqual(wire[24:36], NONCE)
        self.assertEqual(wire[36:44], bytes.fromhex("11 000000 0fa0 0fa0"))
        self.assertEqual(wire[44:60], bytes.fromhex("00000000000000000000ffff00000000"))
        self.assertEqual(pcp.decode_map_request(wire), r)

    def test_map_response(self) -> None:
        wire = (
            bytes.fromhex("02 81 00 00 00000e10 0000002a") + bytes(12)  # R=1 MAP, result 0, lifetime 3600, epoch 42
            + NONCE + bytes.fromhex("06 000000 0fa0 9c40")  # TCP, internal 4000, external 40000
            + bytes.fromhex("00000000000000000000ffffc6336407")  # 198.51.100.7
        )  # fmt: skip
        r = pcp.decode_response(wire)
        self.assertEqual(r, pcp.MapResponse(0, 3600, 42, NONCE, "tcp", 4000, 40000, "198.51.100.7"))

    def test_error_responses(self) -> None:
        # A header-only refusal: NOT_AUTHORIZED.
        r = pcp.decode_response(bytes.fromhex("02 81 00 02 00000000 00000001") + bytes(12))
        self.assertEqual(r, pcp.ErrorResponse(2, 1, pcp.Result.NOT_AUTHORIZED, 0, 1))
        self.assertEqual(pcp.result_name(r.result), "not-authorized")
        # A NAT-PMP-only server answers version 0, result 1 (RFC 6887 9).
        r = pcp.decode_response(bytes.fromhex("00 81 0001 00000005"))
        self.assertEqual((r.version, r.result), (0, 1))

    def test_options(self) -> None:
        opt = pcp.Option(0x80, b"abcde")
        self.assertEqual(opt.encode(), bytes.fromhex("80 00 0005") + b"abcde\0\0\0")
        r = pcp.MapResponse(0, 60, 1, NONCE, "udp", 1, 2, "192.0.2.1", (opt, pcp.Option(1)))
        self.assertEqual(pcp.decode_response(r.encode()), r)

    def test_malformed(self) -> None:
        good = pcp.MapResponse(0, 60, 1, NONCE, "udp", 1, 2, "192.0.2.1").encode()
        for bad in (
            b"",
            b"\x02\x81",
            b"\x03" + good[1:],  # version 3
            good[:1] + b"\x01" + good[2:],  # R bit clear
            good[:-4],  # a successful MAP without all of its body
            good[:24],  # success, header only
            good + b"\x00",  # not a multiple of 4
            good + bytes.fromhex("01 00 0008 00000000"),  # option longer than what is left
            good[:36] + b"\x2f" + good[37:],  # protocol 47
            good + bytes(1200),
        ):
            self.assertRaises(DecodeError, pcp.decode_response, bad)

    def test_bad_values_refused(self) -> None:
        self.assertRaises(ValueError, pcp.MapRequest, "10.0.0.1", b"short", "udp", 1, 1)
        self.assertRaises(ValueError, pcp.MapRequest, "10.0.0.1", NONCE, "udp", 0, 1)
        self.assertRaises(ValueError, pcp.MapRequest, "10.0.0.1", NONCE, "gre", 1, 1)


options = st.lists(st.builds(pcp.Option, st.integers(0, 255), st.binary(max_size=20)), max_size=3).map(tuple)


class PcpPropertyTests(SynchronousTestCase):
    @given(ips, st.binary(min_size=12, max_size=12), protocols, ports, u32, st.integers(0, 0xFFFF), ips, options)
    def test_request_round_trip(self, client, nonce, protocol, internal, lifetime, external, ext_addr, opts) -> None:
        r = pcp.MapRequest(client, nonce, protocol, internal, lifetime, external, ext_addr, opts)
        self.assertEqual(pcp.decode_map_request(r.encode()), r)

    @given(
        st.integers(0, 255), u32, u32, st.binary(min_size=12, max_size=12), protocols,
        st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), ips, options,
    )  # fmt: skip
    def test_response_round_trip(
        self, result, lifetime, epoch, nonce, protocol, internal, external, addr, opts
    ) -> None:
        r = pcp.MapResponse(result, lifetime, epoch, nonce, protocol, internal, external, addr, opts)
        self.assertEqual(pcp.decode_response(r.encode()), r)

    @given(st.binary(max_size=120))
    def test_anything_decodes_or_raises_decode_error(self, data: bytes) -> None:
        for decode in (pcp.decode_response, pcp.decode_map_request):
            try:
                decode(data)
            except DecodeError:
                pass


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0100010A\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


class GatewayTests(SynchronousTestCase):
    def test_default_route(self) -> None:
        self.assertEqual(parse_route_table(ROUTES), "10.1.0.1")

    def test_no_default_route(self) -> None:
        self.assertIsNone(parse_route_table(ROUTES.splitlines()[0] + "\n" + ROUTES.splitlines()[1]))
        self.assertIsNone(parse_route_table(""))
        self.assertIsNone(default_gateway("/nonexistent/route"))

    def test_from_a_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(ROUTES)
        self.assertEqual(default_gateway(path), "10.1.0.1")

    @given(st.text(max_size=300))
    def test_anything_parses_to_none_or_an_address(self, text: str) -> None:
        result = parse_route_table(text)
        self.assertTrue(result is None or result.count(".") == 3)

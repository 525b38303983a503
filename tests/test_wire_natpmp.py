"""NAT-PMP (RFC 6886) and PCP (RFC 6887) MAP: golden bytes, round trips, hostile input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from homeport.wire import natpmp
from homeport.wire.errors import WireError

NONCE = bytes(range(1, 13))


def test_natpmp_requests_golden() -> None:
    assert natpmp.natpmp_public_address_request() == b"\x00\x00"
    # version 0, op 2 (TCP), reserved, internal 41641 (0xa2a9), external 41641, lifetime 7200
    assert natpmp.natpmp_map_request(41641, 41641, 7200) == bytes.fromhex(
        "00020000a2a9a2a900001c20"
    )
    assert natpmp.natpmp_map_request(5000, 0, 0, tcp=False)[:2] == b"\x00\x01"
    with pytest.raises(ValueError):
        natpmp.natpmp_map_request(0, 1, 1)


def test_natpmp_responses_golden_and_parse() -> None:
    pub = bytes.fromhex("008000000000002acb00711b")
    assert natpmp.natpmp_public_address_response(0, 42, "203.0.113.27") == pub
    assert natpmp.natpmp_parse_public_address_untrusted(pub) == natpmp.NatPmpPublicAddress(
        0, 42, "203.0.113.27"
    )
    # miniupnpd 2.3.1's answer on a TEST-NET WAN address (captured in the lab): result 3.
    refused = bytes.fromhex("008000030000000100000000")
    assert natpmp.natpmp_parse_public_address_untrusted(refused).result == 3
    m = bytes.fromhex("0082000000000007a2a9a2aa00000e10")
    assert natpmp.natpmp_map_response(0, 7, 2, internal=41641, external=41642, lifetime=3600) == m
    got = natpmp.natpmp_parse_map_untrusted(m)
    assert (got.result, got.internal_port, got.external_port, got.lifetime) == (
        0,
        41641,
        41642,
        3600,
    )
    short_error = bytes.fromhex("0082000200000007")
    assert natpmp.natpmp_parse_map_untrusted(short_error).result == natpmp.NatPmpResult.REFUSED
    with pytest.raises(WireError):
        natpmp.natpmp_parse_map_untrusted(m[:12])  # success must carry the whole body
    with pytest.raises(WireError):
        natpmp.natpmp_parse_map_untrusted(pub)  # wrong opcode


def test_natpmp_gateway_side_parse() -> None:
    assert natpmp.natpmp_parse_request_untrusted(b"\x00\x00") is None
    assert natpmp.natpmp_parse_request_untrusted(natpmp.natpmp_map_request(1, 2, 3)) == (2, 1, 2, 3)
    for bad in (b"", b"\x01\x00", b"\x00\x07" + bytes(10), b"\x00\x02\x00"):
        with pytest.raises(WireError):
            natpmp.natpmp_parse_request_untrusted(bad)


def test_pcp_map_request_golden() -> None:
    req = natpmp.pcp_map_request(
        client_ip="10.20.7.2", nonce=NONCE, internal_port=41641, lifetime=7200, suggested_port=41641
    )
    expect = bytes.fromhex(
        "02"
        "01"
        "0000"
        "00001c20"  # version 2, MAP, reserved, lifetime
        "00000000000000000000ffff0a140702"  # client IP, IPv4-mapped
        "0102030405060708090a0b0c"  # nonce
        "06"
        "000000"
        "a2a9"
        "a2a9"  # TCP, reserved, internal, suggested external
        "00000000000000000000ffff00000000"  # suggested external IP ::ffff:0.0.0.0
    )
    assert req == expect and len(req) == 60
    assert natpmp.pcp_parse_map_request_untrusted(req) == (NONCE, 6, 41641, 41641, 7200)


def test_pcp_map_response_round_trip_and_errors() -> None:
    resp = natpmp.pcp_map_response(
        result=0,
        lifetime=7200,
        epoch=9,
        nonce=NONCE,
        protocol=6,
        internal_port=41641,
        external_port=50000,
        external_ip="203.0.113.27",
    )
    assert resp[:4] == b"\x02\x81\x00\x00" and len(resp) == 60
    got = natpmp.pcp_parse_map_untrusted(resp)
    assert got == natpmp.PcpMapResponse(0, 7200, 9, NONCE, 6, 41641, 50000, "203.0.113.27")
    header_only = bytes.fromhex("028100070000000000000001") + bytes(12)
    assert natpmp.pcp_parse_map_untrusted(header_only).result == natpmp.PcpResult.NETWORK_FAILURE
    with pytest.raises(WireError):
        natpmp.pcp_parse_map_untrusted(b"\x02\x81\x00\x00" + bytes(20))  # success, no body
    with pytest.raises(WireError):
        natpmp.pcp_parse_map_untrusted(resp[:-1])  # not a multiple of 4
    with pytest.raises(WireError):
        natpmp.pcp_parse_map_untrusted(b"\x02\x82" + resp[2:])  # not a MAP answer
    assert natpmp.is_natpmp_answer(b"\x00\x81\x00\x01") and not natpmp.is_natpmp_answer(resp)
    assert natpmp.result_text("pcp", 7) == "network-failure"
    assert natpmp.result_text("natpmp", 3) == "network-failure"
    assert natpmp.result_text("pcp", 99) == "result 99"


@given(st.binary(max_size=1200))
def test_untrusted_parsers_raise_only_wire_error(data: bytes) -> None:
    for parse in (
        natpmp.natpmp_parse_public_address_untrusted,
        natpmp.natpmp_parse_map_untrusted,
        natpmp.natpmp_parse_request_untrusted,
        natpmp.pcp_parse_map_untrusted,
        natpmp.pcp_parse_map_request_untrusted,
    ):
        with contextlib.suppress(WireError):
            parse(data)

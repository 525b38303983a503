from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from homeport.wire import data, probe
from homeport.wire.errors import WireError

NONCE = bytes(range(16))


def test_request_golden_and_same_length_as_data_preamble() -> None:
    req = probe.encode_request(NONCE)
    assert req == b"HPW\x01" + NONCE
    assert len(req) == data.PREAMBLE_LEN
    assert probe.is_probe(req) and not probe.is_probe(data.encode_preamble(NONCE))
    assert probe.parse_request_untrusted(req) == NONCE


def test_answer_golden_round_trip() -> None:
    ans = probe.encode_answer(NONCE, "203.0.113.7", 41641)
    assert ans == b"HPW\x01" + NONCE + bytes([17]) + b"203.0.113.7:41641"
    assert probe.answer_complete(ans) and not probe.answer_complete(ans[:-1])
    assert probe.parse_answer_untrusted(ans, NONCE) == ("203.0.113.7", 41641)
    six = probe.encode_answer(NONCE, "2001:db8::1", 22)
    assert probe.parse_answer_untrusted(six, NONCE) == ("2001:db8::1", 22)


@pytest.mark.parametrize(
    "text",
    [
        "host:22",
        "203.0.113.7",
        "203.0.113.7:0",
        "203.0.113.7:70000",
        "2001:db8::1:22",
        "[203.0.113.7]:22",
        "203.0.113.7:+22",
        "[2001:db8::1]22",
        "",
        ":22",
    ],
)
def test_bad_addresses_are_wire_errors(text: str) -> None:
    with pytest.raises(WireError):
        probe.parse_addr_untrusted(text)


def test_answer_for_another_nonce_is_refused() -> None:
    ans = probe.encode_answer(NONCE, "203.0.113.7", 1)
    with pytest.raises(WireError):
        probe.parse_answer_untrusted(ans, bytes(16))


@given(st.binary(max_size=100))
def test_parsers_raise_only_wire_errors(blob: bytes) -> None:
    for fn in (
        lambda: probe.parse_answer_untrusted(blob, NONCE),
        lambda: probe.parse_request_untrusted(blob),
    ):
        with contextlib.suppress(WireError):
            fn()

"""Data preamble, auth keys, backoff and the service allow-list decision."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from homeport.policy.services import Service, parse_expose, resolve
from homeport.proto.backoff import Backoff
from homeport.wire import authkey, data
from homeport.wire.errors import BadVersion, WireError


def test_preamble_golden() -> None:
    token = bytes(range(16))
    assert data.encode_preamble(token).hex() == "48504401" + token.hex()
    assert data.parse_preamble_untrusted(data.encode_preamble(token)) == token


@pytest.mark.parametrize(
    ("raw", "exc"),
    [
        (b"HPD\x02" + bytes(16), BadVersion),
        (b"\x16\x03\x01" + bytes(17), WireError),
        (b"HPD\x01" + bytes(15), WireError),
    ],
)
def test_preamble_malformed(raw: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        data.parse_preamble_untrusted(raw)


@given(st.binary(max_size=40))
def test_preamble_fuzz(raw: bytes) -> None:
    with contextlib.suppress(WireError):
        data.parse_preamble_untrusted(raw)


def test_first_byte_distinguishes_tls_from_data() -> None:
    assert data.encode_preamble(bytes(16))[0] != data.TLS_HANDSHAKE_BYTE


def test_authkey_round_trip_and_redaction() -> None:
    key = authkey.AuthKey(key_id="0123456789ab", secret="f" * 32, server_pin="sha256:" + "a" * 64)
    text = str(key)
    assert text == "hpk1_0123456789ab_" + "f" * 32 + "_" + "a" * 64
    assert authkey.parse_untrusted(text + "\n") == key
    assert "f" * 32 not in repr(key)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hpk1_",
        "hpk2_0123456789ab_" + "f" * 32 + "_" + "a" * 64,
        "hpk1_0123456789AB_" + "f" * 32 + "_" + "a" * 64,
    ],
)
def test_authkey_malformed(text: str) -> None:
    with pytest.raises(WireError):
        authkey.parse_untrusted(text)


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(base=0.5, cap=8.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    ceilings = [min(8.0, 0.5 * 2**i) for i in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    b.connected_for(60)
    assert b.next_delay() <= 0.5


SVC = (Service("ssh", 22, "127.0.0.1", 2222), Service("jupyter", 8888, "127.0.0.1", 8888))


@pytest.mark.parametrize(
    ("requested", "allowed", "name"),
    [
        ("ssh", True, "ssh"),
        ("22", True, "ssh"),
        ("8888", True, "jupyter"),
        ("2222", False, None),
        ("80", False, None),
    ],
)
def test_resolve_table(requested: str, allowed: bool, name: str | None) -> None:
    v = resolve(SVC, requested)
    assert v.allowed is allowed
    assert (v.service.name if v.service else None) == name
    assert v.reason  # every verdict explains itself


def test_resolve_reason_lists_exposed_services() -> None:
    assert "ssh/22" in resolve(SVC, "80").reason


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ssh=127.0.0.1:2222", Service("ssh", 22, "127.0.0.1", 2222)),
        ("web=localhost:8080", Service("web", 8080, "localhost", 8080)),
        ("v6=[::1]:9000", Service("v6", 9000, "::1", 9000)),
    ],
)
def test_parse_expose(spec: str, expected: Service) -> None:
    assert parse_expose(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "ssh",
        "=1.2.3.4:5",
        "a=b",
        "a=h:0",
        "a=h:x",
        "a b=h:1",
        "22=h:1",
        "a=h h:1",  # target host with a space
        "a=-h:1",
        "a=[::g]:1",  # not an IPv6 address
        "a=h:99999999999999999999",
        "x" * 64 + "=h:1",
    ],
)
def test_parse_expose_errors(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_expose(spec)


def test_parse_expose_long_spec_gives_a_short_message() -> None:
    with pytest.raises(ValueError) as err:
        parse_expose("n" * 10_000 + "=127.0.0.1:22")
    assert "10000 characters, the limit is 63" in str(err.value) and len(str(err.value)) < 300

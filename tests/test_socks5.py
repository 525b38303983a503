"""The SOCKS5 server machine (wire.socks5): RFC 1928 CONNECT, untrusted bytes, named limits."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.client.socks import parse_listen, reply_for
from homeport.wire import socks5 as s5
from homeport.wire.errors import TooLarge, WireError


def _connect(host: str, port: int) -> tuple[s5.Socks5Server, s5.ConnectRequest]:
    mach = s5.Socks5Server()
    assert mach.receive_untrusted(s5.encode_greeting()) is None
    assert mach.data_to_send() == b"\x05\x00"
    ev = mach.receive_untrusted(s5.encode_request(host, port))
    assert isinstance(ev, s5.ConnectRequest)
    return mach, ev


def test_a_domain_name_is_passed_on_unresolved() -> None:
    mach, req = _connect("printer.lab", 631)
    assert (req.host, req.port, req.atyp) == ("printer.lab", 631, s5.ATYP_DOMAIN)
    assert req.destination == "printer.lab:631"
    assert mach.phase is s5.Phase.WAITING


def test_ipv4_and_ipv6_destinations() -> None:
    _, v4 = _connect("192.168.1.50", 80)
    assert v4.destination == "192.168.1.50:80" and v4.atyp == s5.ATYP_IPV4
    _, v6 = _connect("2001:db8::5", 443)
    assert v6.destination == "[2001:db8::5]:443" and v6.atyp == s5.ATYP_IPV6


def test_success_hands_over_early_data_and_failure_closes() -> None:
    mach = s5.Socks5Server()
    ev = mach.receive_untrusted(
        s5.encode_greeting() + s5.encode_request("192.0.2.1", 80) + b"GET / HTTP/1.0\r\n"
    )
    assert isinstance(ev, s5.ConnectRequest)
    assert mach.data_to_send() == b"\x05\x00"
    mach.reply(s5.REP_SUCCEEDED)
    assert mach.data_to_send() == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert mach.phase is s5.Phase.OPEN and mach.leftover == b"GET / HTTP/1.0\r\n"
    other, _ = _connect("192.0.2.1", 80)
    other.reply(s5.REP_CONNECTION_REFUSED)
    assert other.data_to_send()[1] == s5.REP_CONNECTION_REFUSED
    assert other.phase is s5.Phase.CLOSED
    with pytest.raises(ValueError, match="reply in phase"):
        other.reply(s5.REP_SUCCEEDED)


def test_byte_by_byte_is_the_same_as_all_at_once() -> None:
    mach = s5.Socks5Server()
    events = [
        mach.receive_untrusted(bytes((b,)))
        for b in s5.encode_greeting() + s5.encode_request("lab.example", 8080)
    ]
    assert events[:-1] == [None] * (len(events) - 1)
    assert events[-1] == s5.ConnectRequest("lab.example", 8080, s5.ATYP_DOMAIN)


def test_a_client_that_wants_a_password_is_told_no_method() -> None:
    mach = s5.Socks5Server()
    ev = mach.receive_untrusted(s5.encode_greeting(bytes((0x02,))))
    assert isinstance(ev, s5.Refused) and ev.rep == s5.METHOD_NO_ACCEPTABLE
    assert mach.data_to_send() == b"\x05\xff" and mach.phase is s5.Phase.CLOSED


@pytest.mark.parametrize(
    ("cmd", "rep"),
    [
        (s5.CMD_BIND, s5.REP_COMMAND_NOT_SUPPORTED),
        (s5.CMD_UDP_ASSOCIATE, s5.REP_COMMAND_NOT_SUPPORTED),
    ],
)
def test_bind_and_udp_are_answered_not_supported(cmd: int, rep: int) -> None:
    mach = s5.Socks5Server()
    mach.receive_untrusted(s5.encode_greeting())
    mach.data_to_send()
    ev = mach.receive_untrusted(s5.encode_request("192.0.2.1", 80, cmd))
    assert isinstance(ev, s5.Refused) and ev.rep == rep
    assert mach.data_to_send()[1] == rep


def test_an_unknown_address_type_is_answered() -> None:
    mach = s5.Socks5Server()
    mach.receive_untrusted(s5.encode_greeting())
    ev = mach.receive_untrusted(b"\x05\x01\x00\x09\x00\x00\x00\x00")
    assert isinstance(ev, s5.Refused) and ev.rep == s5.REP_ADDRESS_NOT_SUPPORTED


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x01\x00\x50",  # SOCKS4
        b"\x05\x00",  # no methods
        b"GET / HTTP/1.1\r\n",
    ],
)
def test_garbage_is_a_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        s5.Socks5Server().receive_untrusted(data)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"\x04\x01\x00\x01\xc0\x00\x02\x01\x00\x50",  # wrong version in the request
        b"\x05\x01\x01\x01\xc0\x00\x02\x01\x00\x50",  # reserved byte set
        b"\x05\x01\x00\x03\x00\x00\x50",  # empty name
        b"\x05\x01\x00\x03\x03a b\x00\x50",  # a space in the name
        b"\x05\x01\x00\x03\x02\xc3\xa9\x00\x50",  # not ASCII
        b"\x05\x01\x00\x03\x03[::\x00\x50",  # brackets would break host:port
    ],
)
def test_bad_requests_are_wire_errors(request_bytes: bytes) -> None:
    mach = s5.Socks5Server()
    mach.receive_untrusted(s5.encode_greeting())
    with pytest.raises(WireError):
        mach.receive_untrusted(request_bytes)


def test_port_zero_is_refused() -> None:
    mach = s5.Socks5Server()
    mach.receive_untrusted(s5.encode_greeting())
    ev = mach.receive_untrusted(s5.encode_request("192.0.2.1", 0))
    assert isinstance(ev, s5.Refused) and ev.rep == s5.REP_GENERAL_FAILURE


def test_the_buffer_limit_holds() -> None:
    mach, _ = _connect("192.0.2.1", 80)
    with pytest.raises(TooLarge):
        mach.receive_untrusted(b"x" * (s5.MAX_BUFFER + 1))


def test_input_after_the_reply_is_refused() -> None:
    mach, _ = _connect("192.0.2.1", 80)
    mach.reply(s5.REP_SUCCEEDED)
    with pytest.raises(WireError):
        mach.receive_untrusted(b"late")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_any_bytes_end_in_an_event_none_or_a_wire_error(chunks: list[bytes]) -> None:
    mach = s5.Socks5Server()
    for chunk in chunks:
        try:
            ev = mach.receive_untrusted(chunk)
        except WireError:
            return
        if isinstance(ev, s5.ConnectRequest):
            assert 0 < ev.port < 65536 and ev.host
            assert ev.atyp in (s5.ATYP_IPV4, s5.ATYP_IPV6, s5.ATYP_DOMAIN)
            return
        if isinstance(ev, s5.Refused):
            return


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z0-9][a-z0-9.-]{0,60}", fullmatch=True),
    ),
    st.integers(1, 65535),
    st.integers(1, 16),
)
def test_requests_round_trip_in_any_split(host: str, port: int, cut: int) -> None:
    data = s5.encode_greeting() + s5.encode_request(host, port)
    mach = s5.Socks5Server()
    events = [mach.receive_untrusted(data[i : i + cut]) for i in range(0, len(data), cut)]
    req = events[-1]
    assert isinstance(req, s5.ConnectRequest) and req.port == port
    try:
        assert ipaddress.ip_address(req.host) == ipaddress.ip_address(host)
    except ValueError:
        assert req.host == host


def test_failure_codes_map_to_socks_replies() -> None:
    assert reply_for("not-allowed") == s5.REP_NOT_ALLOWED
    assert reply_for("policy") == s5.REP_NOT_ALLOWED
    assert reply_for("refused") == s5.REP_CONNECTION_REFUSED
    assert reply_for("unreachable") == s5.REP_HOST_UNREACHABLE
    assert reply_for("something-new") == s5.REP_GENERAL_FAILURE


def test_the_proxy_listens_on_loopback_unless_told_otherwise() -> None:
    assert parse_listen("127.0.0.1:1080") == ("127.0.0.1", 1080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:9050") == ("localhost", 9050)
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0"):
        parse_listen("0.0.0.0:1080")
    with pytest.raises(ValueError, match=r"refusing to listen on 192\.0\.2\.7"):
        parse_listen("192.0.2.7:1080")
    assert parse_listen("0.0.0.0:1080", allow_remote=True) == ("0.0.0.0", 1080)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen("1080")

"""Proxy support without a lab: the CONNECT codec, the ClientHello peek, routes, dialing errors.

The real proxy (tinyproxy) and the middlebox are in tests/test_proxy_lab.py; the
TLS-wrapped data path end to end on loopback is in tests/test_proxy_e2e.py.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homeport.crypto.tls import ALPN_CONTROL, control_client_policy, stream_policy
from homeport.io import dial, tlsctx
from homeport.io.dial import DialError
from homeport.node import settings as ns
from homeport.node.settings import NetworkSettings, TlsData, choose_route
from homeport.wire import httpconnect as hc
from homeport.wire import tlshello
from homeport.wire.data import ALPN_DATA, is_wrapped_data
from homeport.wire.errors import WireError
from tests.harness import serve_in_threads

# -- the CONNECT request and the proxy URL ---------------------------------------------


def test_connect_request_with_basic_auth() -> None:
    proxy = hc.parse_proxy_url("http://al%40ice:p%3Ass@proxy.corp:3128")
    assert (proxy.user, proxy.password) == ("al@ice", "p:ss")
    req = hc.encode_connect("vps.example.org", 443, proxy).decode()
    lines = req.split("\r\n")
    assert lines[0] == "CONNECT vps.example.org:443 HTTP/1.1"
    assert "Host: vps.example.org:443" in lines
    cred = base64.b64encode(b"al@ice:p:ss").decode()
    assert f"Proxy-Authorization: Basic {cred}" in lines
    assert req.endswith("\r\n\r\n")
    assert "Proxy-Authorization" not in hc.encode_connect("::1", 8443).decode()
    assert hc.encode_connect("::1", 8443).startswith(b"CONNECT [::1]:8443 HTTP/1.1\r\n")


@pytest.mark.parametrize("bad", ["bad host", "", "x" * 300, "a\r\nX-Evil: 1"])
def test_connect_refuses_hosts_that_would_break_the_request(bad: str) -> None:
    with pytest.raises(ValueError):
        hc.encode_connect(bad, 443)


@pytest.mark.parametrize(
    ("text", "host", "port", "user"),
    [
        ("http://proxy:8080", "proxy", 8080, None),
        ("proxy.corp:3128", "proxy.corp", 3128, None),
        ("http://proxy", "proxy", hc.DEFAULT_PROXY_PORT, None),
        ("HTTP://u:p@10.0.0.1:8888/", "10.0.0.1", 8888, "u"),
        ("http://[2001:db8::1]:3128", "2001:db8::1", 3128, None),
    ],
)
def test_proxy_urls(text: str, host: str, port: int, user: str | None) -> None:
    url = hc.parse_proxy_url(text)
    assert (url.host, url.port, url.user) == (host, port, user)
    assert hc.parse_proxy_url(url.url()) == url  # what up --proxy saves reads back the same


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("https://proxy:443", "only http://"),
        ("socks5://proxy:1080", "only http://"),
        ("http://:8080", "no usable host"),
        ("http://proxy:99999", "not a port"),
        ("http://proxy:abc", "not a port"),
        ("http://:pw@proxy:1", "credentials"),
        ("http://[::1:3128", "IPv6"),
    ],
)
def test_bad_proxy_urls_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        hc.parse_proxy_url(text)


def test_str_of_a_proxy_hides_the_password() -> None:
    url = hc.parse_proxy_url("http://alice:s3cret@p:1")
    assert "s3cret" not in str(url) and "alice" in str(url)
    assert "s3cret" in url.url()


@pytest.mark.parametrize(
    ("no_proxy", "host", "hit"),
    [
        ("", "vps.example.org", False),
        ("*", "vps.example.org", True),
        ("example.org", "vps.example.org", True),
        (".example.org", "vps.example.org", True),
        ("example.org", "example.org", True),
        ("ample.org", "vps.example.org", False),
        ("localhost, 127.0.0.1", "127.0.0.1", True),
        ("localhost 10.0.0.1:8443", "10.0.0.1", True),
        ("[::1]", "::1", True),
        ("other.org,example.com", "vps.example.org", False),
    ],
)
def test_no_proxy(no_proxy: str, host: str, hit: bool) -> None:
    assert hc.no_proxy_matches(no_proxy, host) is hit


# -- the proxy's answer ---------------------------------------------------------------


def test_reply_parser_byte_by_byte() -> None:
    raw = b"HTTP/1.1 200 Connection established\r\nVia: tinyproxy\r\n\r\n"
    parser = hc.ReplyParser()
    for b in raw[:-1]:
        assert parser.feed(bytes([b])) is None
    reply = parser.feed(raw[-1:])
    assert reply is not None
    assert (reply.status, reply.reason, reply.header("via"), reply.rest) == (
        200,
        "Connection established",
        "tinyproxy",
        b"",
    )
    with pytest.raises(WireError):
        parser.feed(b"x")


def test_reply_parser_keeps_what_follows_the_head() -> None:
    reply = hc.ReplyParser().feed(b"HTTP/1.0 200 OK\r\n\r\nEXTRA")
    assert reply is not None and reply.rest == b"EXTRA"


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n",  # something that is not a proxy
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad: name\r\n\r\n",
    ],
)
def test_reply_parser_refuses_garbage(raw: bytes) -> None:
    with pytest.raises(WireError):
        hc.ReplyParser().feed(raw)


def test_reply_head_is_bounded() -> None:
    parser = hc.ReplyParser()
    with pytest.raises(WireError, match="over"):
        parser.feed(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * hc.MAX_HEAD)
    many = b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (hc.MAX_HEADERS + 1) + b"\r\n"
    with pytest.raises(WireError, match="header lines"):
        hc.ReplyParser().feed(many)


@given(st.lists(st.binary(max_size=64), max_size=40))
@settings(max_examples=300, deadline=None)
def test_reply_parser_fuzz_raises_only_wire_errors(chunks: list[bytes]) -> None:
    parser = hc.ReplyParser()
    try:
        for chunk in chunks:
            if parser.feed(chunk) is not None:
                break
    except WireError:
        pass


@given(
    st.integers(100, 599),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.lists(
        st.tuples(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
                    min_size=1, max_size=10),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
        ),
        max_size=5,
    ),
    st.integers(1, 7),
)  # fmt: skip
@settings(max_examples=200, deadline=None)
def test_reply_parser_reads_any_valid_head(
    status: int, reason: str, headers: list[tuple[str, str]], step: int
) -> None:
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    raw = head.encode() + b"\r\n"
    parser = hc.ReplyParser()
    reply = None
    for i in range(0, len(raw), step):
        assert reply is None
        reply = parser.feed(raw[i : i + step])
    assert reply is not None and reply.status == status
    assert [k for k, _ in reply.headers] == [k for k, _ in headers]


PROXY = hc.parse_proxy_url("http://p:3128")
AUTHED = hc.parse_proxy_url("http://alice:pw@p:3128")


@pytest.mark.parametrize(
    ("status", "proxy", "refusal", "words"),
    [
        (200, PROXY, None, "opened a tunnel"),
        (407, PROXY, hc.Refusal.AUTH_REQUIRED, "proxy needs authentication: give --proxy"),
        (407, AUTHED, hc.Refusal.AUTH_REQUIRED, "refused the credentials for 'alice'"),
        (401, AUTHED, hc.Refusal.AUTH_REQUIRED, "proxy needs authentication"),
        (403, PROXY, hc.Refusal.FORBIDDEN, "forbids a tunnel to server s:8443"),
        (502, PROXY, hc.Refusal.UPSTREAM, "could not reach server s:8443"),
        (504, PROXY, hc.Refusal.UPSTREAM, "could not reach"),
        (500, PROXY, hc.Refusal.OTHER, "refused the tunnel"),
    ],
)
def test_verdicts(status: int, proxy: hc.ProxyURL, refusal: hc.Refusal | None, words: str) -> None:
    v = hc.verdict(hc.ConnectReply(status, "Reason", ()), "server s:8443", proxy)
    assert v.refusal is refusal
    assert words in v.reason and "\n" not in v.reason and "pw" not in v.reason


# -- the ClientHello peek -----------------------------------------------------------------


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_side=False)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_real_client_hellos_are_told_apart() -> None:
    data = _client_hello(tlsctx.data_client_context())
    control = _client_hello(control_client_policy())
    stream = _client_hello(stream_policy(server_side=False))
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname, bare.verify_mode = False, ssl.CERT_NONE
    assert tlshello.offered_alpn_untrusted(data) == (ALPN_DATA,)
    assert tlshello.offered_alpn_untrusted(control) == (ALPN_CONTROL,)
    assert is_wrapped_data(tlshello.offered_alpn_untrusted(data) or ())
    assert not is_wrapped_data(tlshello.offered_alpn_untrusted(control) or ())
    assert not is_wrapped_data(tlshello.offered_alpn_untrusted(stream) or ())
    assert tlshello.offered_alpn_untrusted(_client_hello(bare)) == ()
    for cut in range(len(data)):  # a ClientHello still arriving: wait, never guess
        assert tlshello.offered_alpn_untrusted(data[:cut]) is None
    assert tlshello.offered_alpn_untrusted(data + b"trailing") == (ALPN_DATA,)


@pytest.mark.parametrize(
    "raw",
    [
        b"H",
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x40\x01",  # longer than any record may be
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03",  # ClientHello cut short inside
    ],
)
def test_malformed_hellos_are_wire_errors(raw: bytes) -> None:
    with pytest.raises(WireError):
        tlshello.offered_alpn_untrusted(raw)


REAL_HELLO = _client_hello(tlsctx.data_client_context())


@given(st.data())
@settings(max_examples=400, deadline=None)
def test_hello_peek_fuzz(data: st.DataObject) -> None:
    """Mutations of a real ClientHello (and random bytes): a tuple, None, or a WireError."""
    raw = bytearray(REAL_HELLO)
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = bytearray(data.draw(st.binary(max_size=300)))
    try:
        out = tlshello.offered_alpn_untrusted(bytes(raw))
    except WireError:
        return
    assert out is None or (isinstance(out, tuple) and len(out) <= tlshello.MAX_ALPN_NAMES)


# -- routes ---------------------------------------------------------------------------------

SAVED = NetworkSettings(proxy="http://saved:3128")


@pytest.mark.parametrize(
    ("saved", "env", "proxy_host", "wrapped"),
    [
        (NetworkSettings(), {}, None, False),
        (NetworkSettings(), {"HTTPS_PROXY": "http://envp:8080"}, "envp", True),
        (NetworkSettings(), {"https_proxy": "envl:8080"}, "envl", True),
        (NetworkSettings(), {"HTTPS_PROXY": "http://e:1", "NO_PROXY": "example.org"}, None, False),
        (NetworkSettings(), {"HTTPS_PROXY": "http://e:1", "no_proxy": "*"}, None, False),
        (SAVED, {"HTTPS_PROXY": "http://envp:8080"}, "saved", True),
        (NetworkSettings(), {"HTTPS_PROXY": "http://e:1"}, "e", True),
        (SAVED, {"NO_PROXY": "*"}, "saved", True),  # explicit beats NO_PROXY
        (SAVED, {"HOMEPORT_PROXY": "http://hp:1"}, "hp", True),
        (SAVED, {"HOMEPORT_PROXY": "off"}, None, False),
        (NetworkSettings(proxy="off"), {"HTTPS_PROXY": "http://e:1"}, None, False),
        (NetworkSettings(tls_data=TlsData.ON), {}, None, True),
        (NetworkSettings(proxy="http://p:1", tls_data=TlsData.OFF), {}, "p", False),
        (SAVED, {"HOMEPORT_TLS_DATA": "off"}, "saved", False),
        (NetworkSettings(), {"HOMEPORT_TLS_DATA": "on"}, None, True),
    ],
)
def test_choose_route(
    saved: NetworkSettings, env: dict[str, str], proxy_host: str | None, wrapped: bool
) -> None:
    route = choose_route(saved, env, "vps.example.org")
    assert (route.proxy.host if route.proxy else None) == proxy_host
    assert route.tls_data is wrapped
    assert route.reason


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]"])
def test_the_environments_proxy_never_carries_a_loopback_server(host: str) -> None:
    env = {"HTTPS_PROXY": "http://e:1"}
    assert choose_route(NetworkSettings(), env, host).proxy is None
    assert choose_route(SAVED, env, host).proxy is not None  # explicit: the user said so


def test_bad_route_settings_name_their_source() -> None:
    with pytest.raises(ValueError, match=r"HTTPS_PROXY: proxy .*only http://"):
        choose_route(NetworkSettings(), {"HTTPS_PROXY": "socks5://x:1"}, "h")
    with pytest.raises(ValueError, match="HOMEPORT_TLS_DATA"):
        choose_route(NetworkSettings(), {"HOMEPORT_TLS_DATA": "maybe"}, "h")


def test_network_file_round_trip(tmp_path: Path) -> None:
    assert ns.load_network(tmp_path) == NetworkSettings()
    saved = NetworkSettings(proxy="http://a:b@p:1", tls_data=TlsData.ON)
    ns.save_network(tmp_path, saved)
    assert (tmp_path / ns.NETWORK_FILE).stat().st_mode & 0o777 == 0o600
    assert ns.load_network(tmp_path) == saved
    ns.save_network(tmp_path, NetworkSettings())
    assert not (tmp_path / ns.NETWORK_FILE).exists()
    for bad in (b"[]", b"{", b'{"proxy": 1}', b'{"tls_data": "x"}'):
        with pytest.raises(ValueError):
            ns.parse_network_untrusted(bad)


# -- dialing through stub proxies (loopback) ------------------------------------------------


@pytest.fixture
def stub_proxy() -> Iterator[Callable[[Callable[[socket.socket], None]], hc.ProxyURL]]:
    listeners: list[socket.socket] = []

    def start(handle: Callable[[socket.socket], None]) -> hc.ProxyURL:
        lst = socket.create_server(("127.0.0.1", 0))
        listeners.append(lst)
        serve_in_threads(lst, handle)
        return hc.ProxyURL("127.0.0.1", lst.getsockname()[1])

    yield start
    for lst in listeners:
        lst.close()


def _answer(raw: bytes) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            if not raw:
                return
            conn.sendall(raw)
            conn.recv(1)  # hold until the client hangs up

    return handle


def _tunnel(proxy: hc.ProxyURL, timeout: float = 30.0) -> socket.socket:
    # generous: only test_connect_timeout waits it out, and a loaded machine is slow
    return dial.proxy_tunnel(proxy, "203.0.113.10", 8443, time.monotonic() + timeout, "server")


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "proxy-upstream", "could not reach server"),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", "proxy-forbidden", "forbids a tunnel"),
        (b"HTTP/1.1 407 Proxy Auth\r\n\r\n", "proxy-auth", "proxy needs authentication"),
        (b"SSH-2.0-OpenSSH\r\n", "proxy-protocol", "did not answer with HTTP"),
        (b"HTTP/1.1 200 OK\r\n\r\nSURPRISE", "proxy-protocol", "bytes the server cannot"),
        (b"", "proxy-refused", "closed the connection"),
    ],
)
def test_proxy_refusals_are_one_line_dial_errors(
    stub_proxy: Callable[[Callable[[socket.socket], None]], hc.ProxyURL],
    raw: bytes,
    code: str,
    words: str,
) -> None:
    proxy = stub_proxy(_answer(raw))
    with pytest.raises(DialError) as exc:
        _tunnel(proxy)
    assert exc.value.code == code
    assert words in exc.value.message and "\n" not in exc.value.message
    assert exc.value.retriable is (code == "proxy-upstream")


def test_connect_timeout(
    stub_proxy: Callable[[Callable[[socket.socket], None]], hc.ProxyURL],
) -> None:
    silent = threading.Event()

    def mute(conn: socket.socket) -> None:
        silent.wait(10)
        conn.close()

    proxy = stub_proxy(mute)
    started = time.monotonic()
    with pytest.raises(DialError) as exc:
        _tunnel(proxy, timeout=0.5)
    silent.set()
    assert exc.value.code == "proxy-timeout" and exc.value.retriable
    assert "did not answer the CONNECT to server 203.0.113.10:8443 in time" in exc.value.message
    assert time.monotonic() - started < 5


def test_proxy_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
    with pytest.raises(DialError) as exc:
        _tunnel(hc.ProxyURL("127.0.0.1", port))
    assert exc.value.code == "proxy-unreachable" and exc.value.retriable
    assert f"cannot reach proxy http://127.0.0.1:{port}" in exc.value.message


def test_a_tunnel_carries_bytes_both_ways(
    stub_proxy: Callable[[Callable[[socket.socket], None]], hc.ProxyURL],
) -> None:
    seen: list[bytes] = []

    def echo_proxy(conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096)
            seen.append(buf)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            while data := conn.recv(4096):
                conn.sendall(data[::-1])

    proxy = stub_proxy(echo_proxy)
    proxy = hc.ProxyURL(proxy.host, proxy.port, "u", "p")
    with _tunnel(proxy) as sock:
        sock.sendall(b"abc")
        assert sock.recv(3) == b"cba"
    assert seen[0].startswith(b"CONNECT 203.0.113.10:8443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization: Basic dTpw\r\n" in seen[0]


def test_up_refuses_a_bad_proxy_url_in_one_line(tmp_path: Path) -> None:
    import subprocess

    from tests.harness import HOMEPORT

    res = subprocess.run(
        [*HOMEPORT, "up", "--state", str(tmp_path / "s"), "--proxy", "socks5://p:1080"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "only http:// proxies" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "s" / ns.NETWORK_FILE).exists()


def test_a_user_without_a_password_reads_as_no_password() -> None:
    # a new user saw "http://u:@..." saved and "u:***" logged though no password was given
    url = hc.parse_proxy_url("http://u@127.0.0.1:3128")
    assert not url.password
    assert url.url() == "http://u@127.0.0.1:3128" and str(url) == "http://u@127.0.0.1:3128"
    assert str(hc.parse_proxy_url("http://u:pw@127.0.0.1:3128")) == "http://u:***@127.0.0.1:3128"

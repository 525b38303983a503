"""HTTP CONNECT through a proxy (RFC 9110 §9.3.6), sans-I/O: our request, the proxy's answer.

A node or client behind a corporate proxy opens a TCP connection to the proxy,
sends ``CONNECT host:port HTTP/1.1`` (with ``Proxy-Authorization: Basic …``
when the proxy URL carries credentials), and reads the proxy's answer head up
to the blank line. A 2xx answer turns the connection into a byte tunnel to the
server; everything else is the proxy refusing, and :func:`verdict` says why in
one line fit for a user (407 → "proxy needs authentication").

Untrusted input: the answer head is bounded by :data:`MAX_HEAD` and parsed
strictly enough to refuse garbage (a non-HTTP answer, a bad status line) with
:class:`~homeport.wire.errors.WireError` and nothing else. Nothing after the
head is ours: a proxy must not send tunnel bytes before the server does (and
a homeport server never speaks first), so :attr:`ConnectReply.rest` is kept
for the caller to refuse.

Pure and standard library only (``homeport nc`` uses it on its direct path).
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass

from homeport.wire.errors import WireError

#: Longest answer head (status line + headers + blank line) we accept from a proxy.
MAX_HEAD = 16 * 1024
#: Most header lines we keep from the answer (beyond it: refused as garbage).
MAX_HEADERS = 64
#: Longest host name we put in a CONNECT request (DNS limit).
MAX_HOST = 253
#: Longest user name or password in a proxy URL.
MAX_CREDENTIAL = 256
#: Default proxy port when the URL names none (squid's; tinyproxy's is 8888).
DEFAULT_PROXY_PORT = 3128


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """``http://[user:pass@]host:port`` parsed. ``str()`` hides the password."""

    host: str
    port: int
    user: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        auth = ""
        if self.user is not None:  # "***" only where there is a password to hide
            auth = f"{self.user}:***@" if self.password else f"{self.user}@"
        return f"http://{auth}{_bracket(self.host)}:{self.port}"

    def url(self) -> str:
        """The full URL, credentials included (what is saved in the node's settings)."""
        auth = ""
        if self.user is not None:  # no ":" without a password: "u:@" read as one given
            pw = f":{_pct(self.password)}" if self.password else ""
            auth = f"{_pct(self.user)}{pw}@"
        return f"http://{auth}{_bracket(self.host)}:{self.port}"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _pct(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def parse_proxy_url(text: str) -> ProxyURL:
    """Parse ``http://[user:pass@]host[:port]`` (a bare ``host:port`` means http).

    Percent-escapes in the credentials are decoded (``p%40ss`` → ``p@ss``).

    Raises:
        ValueError: with a one-line reason (an ``https://`` proxy, a missing host …).
    """
    from urllib.parse import unquote

    raw = text.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    if scheme.lower() != "http":
        raise ValueError(
            f"proxy {raw[:80]!r}: only http:// proxies are supported (CONNECT over plain HTTP; "
            "the tunnel itself carries TLS)"
        )
    rest = rest.split("/", 1)[0]
    userinfo, at, hostport = rest.rpartition("@")
    user = password = None
    if at:
        u, _, p = userinfo.partition(":")
        user, password = unquote(u), unquote(p)
        if not user or len(user) > MAX_CREDENTIAL or len(password) > MAX_CREDENTIAL:
            raise ValueError("proxy credentials must be user:password, each 1-256 characters")
    if hostport.startswith("["):
        host, close, tail = hostport[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ValueError(f"proxy {hostport[:80]!r}: malformed [IPv6] address")
        port_text = tail[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if not host or len(host) > MAX_HOST or any(c.isspace() or c in "\"'<>\\" for c in host):
        raise ValueError(f"proxy {raw[:80]!r}: no usable host name")
    port = DEFAULT_PROXY_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"proxy port {port_text[:20]!r} is not a port number")
        port = int(port_text)
    return ProxyURL(host=host, port=port, user=user, password=password)


def no_proxy_matches(no_proxy: str, host: str) -> bool:
    """Whether ``host`` is excluded by a ``NO_PROXY`` list (curl's rules, simplified).

    Entries are separated by commas or spaces; ``*`` matches everything; an
    entry matches the host itself and its subdomains (a leading dot is
    optional); an entry ``host:port`` is treated as ``host``. IP addresses match
    literally (no CIDR ranges).
    """
    name = host.lower().strip("[]").rstrip(".")
    entries = [word for part in no_proxy.split(",") for word in part.split()]
    for entry in entries:
        e = entry.lower().strip()
        if e == "*":
            return True
        if e.startswith("[") and "]" in e:
            e = e[1 : e.index("]")]
        elif e.count(":") == 1:
            e = e.partition(":")[0]
        e = e.lstrip(".").rstrip(".")
        if e and (name == e or name.endswith("." + e)):
            return True
    return False


def encode_connect(host: str, port: int, proxy: ProxyURL | None = None) -> bytes:
    """The CONNECT request for ``host:port`` (with Basic credentials from ``proxy``)."""
    if not host or len(host) > MAX_HOST or any(c.isspace() or ord(c) < 0x21 for c in host):
        raise ValueError(f"cannot CONNECT to host {host[:80]!r}")
    if not 0 < port < 65536:
        raise ValueError(f"cannot CONNECT to port {port}")
    authority = f"{_bracket(host)}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy is not None and proxy.user is not None:
        cred = f"{proxy.user}:{proxy.password or ''}".encode()
        lines.append("Proxy-Authorization: Basic " + base64.b64encode(cred).decode("ascii"))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@dataclass(frozen=True, slots=True)
class ConnectReply:
    """The proxy's answer head. ``rest`` holds any bytes that came after it."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    rest: bytes = b""

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), or None."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None


class ReplyParser:
    """Feed the proxy's bytes; :meth:`feed` returns the reply once its head is complete.

    Why incremental: a proxy may answer in several segments; the caller reads
    with a deadline and stops at the blank line (it must not read the tunnel).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False

    def feed(self, data: bytes) -> ConnectReply | None:
        """Add ``data``; None while the head is incomplete.

        Raises:
            WireError: over :data:`MAX_HEAD`, not an HTTP answer, or fed after the end.
        """
        if self._done:
            raise WireError("CONNECT answer already complete")
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise WireError(f"proxy answer head over {MAX_HEAD} bytes")
            if not self._buf[:5].startswith(b"HTTP/"[: len(self._buf)]):
                raise WireError("the proxy did not answer with HTTP")
            return None
        if end + 4 > MAX_HEAD:
            raise WireError(f"proxy answer head over {MAX_HEAD} bytes")
        self._done = True
        head = bytes(self._buf[:end])
        rest = bytes(self._buf[end + 4 :])
        self._buf.clear()
        return parse_head_untrusted(head, rest)


def parse_head_untrusted(head: bytes, rest: bytes = b"") -> ConnectReply:
    """Parse a complete answer head (without the final blank line).

    Raises:
        WireError: not ``HTTP/1.x NNN reason`` followed by ``name: value`` lines.
    """
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes any byte
        raise WireError("undecodable proxy answer") from exc
    lines = text.split("\r\n")
    status_line = lines[0]
    version, _, tail = status_line.partition(" ")
    code_text, _, reason = tail.partition(" ")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise WireError(f"the proxy did not answer with HTTP/1.x ({_show(status_line)})")
    if len(code_text) != 3 or not code_text.isdigit():
        raise WireError(f"malformed proxy status line ({_show(status_line)})")
    if len(lines) - 1 > MAX_HEADERS:
        raise WireError(f"proxy answer has over {MAX_HEADERS} header lines")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or any(ord(c) < 0x21 for c in name):
            raise WireError(f"malformed proxy header line ({_show(line)})")
        headers.append((name, value.strip()))
    return ConnectReply(int(code_text), _printable(reason), tuple(headers), rest)


def _printable(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)[:200]


def _show(text: str) -> str:
    return repr(_printable(text)[:60])


class Refusal(enum.Enum):
    """Why a proxy did not open the tunnel (stable codes for tests and scripts)."""

    AUTH_REQUIRED = "proxy-auth"
    FORBIDDEN = "proxy-forbidden"
    UPSTREAM = "proxy-upstream"
    OTHER = "proxy-refused"


@dataclass(frozen=True, slots=True)
class Verdict:
    """:func:`verdict`'s answer: ``refusal`` is None when the tunnel is open."""

    refusal: Refusal | None
    reason: str


def verdict(reply: ConnectReply, target: str, proxy: ProxyURL) -> Verdict:
    """What the proxy's answer means, as one line naming the proxy and the target."""
    if 200 <= reply.status < 300:
        return Verdict(None, f"proxy {proxy} opened a tunnel to {target}")
    said = f"{reply.status} {reply.reason}".strip()
    if reply.status in (401, 407):  # 407 per RFC 9110; tinyproxy answers a CONNECT with 401
        if proxy.user is None:
            why = (
                "proxy needs authentication: give --proxy http://USER@HOST:PORT with "
                "--proxy-password-file FILE (or $HOMEPORT_PROXY_PASSWORD)"
            )
        else:
            why = f"proxy needs authentication: it refused the credentials for {proxy.user!r}"
        return Verdict(Refusal.AUTH_REQUIRED, f"{why} (proxy {proxy} said {said})")
    if reply.status == 403:
        return Verdict(
            Refusal.FORBIDDEN,
            f"proxy {proxy} forbids a tunnel to {target} ({said}); ask its operator to allow "
            "CONNECT to that port (443 is allowed almost everywhere)",
        )
    if reply.status in (502, 503, 504):
        return Verdict(Refusal.UPSTREAM, f"proxy {proxy} could not reach {target} ({said})")
    return Verdict(Refusal.OTHER, f"proxy {proxy} refused the tunnel to {target} ({said})")

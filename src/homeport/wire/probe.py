"""Whoami probe, protocol version 1: which address and port does the server see?

A node learns how its NAT maps its direct port by connecting *from that port*
to the server's main port and to its probe port and asking each "what source
address do you see?" (the TCP analogue of a STUN binding request, RFC 8489).
The same observed port towards both means the NAT maps endpoint-independently
(hole punching can work); different ports mean endpoint-dependent ("symmetric")
mapping.

Request (client → server), 20 bytes, the same length as a data preamble so the
server's one port can read 20 bytes and then tell them apart by magic::

    0       1       2       3       4                               20
   +-------+-------+-------+-------+-------------- … --------------+
   |  'H'  |  'P'  |  'W'  | ver=1 |   nonce (16 random bytes)     |
   +-------+-------+-------+-------+-------------- … --------------+

Answer (server → client), then the server closes::

    0       1       2       3       4              20      21          21+n
   +-------+-------+-------+-------+------ … ------+-------+---- … ----+
   |  'H'  |  'P'  |  'W'  | ver=1 | nonce (echo)  |   n   | "ip:port" |
   +-------+-------+-------+-------+------ … ------+-------+---- … ----+

``ip:port`` is ASCII; IPv6 is written ``[ip]:port``. The nonce ties an answer
to its request (a stale or spoofed answer is refused). Nothing here is secret:
the observed address is what any on-path observer sees anyway.
"""

from __future__ import annotations

import ipaddress
import os

from homeport.wire.errors import BadVersion, WireError

MAGIC = b"HPW"
VERSION = 1
NONCE_LEN = 16
REQUEST_LEN = len(MAGIC) + 1 + NONCE_LEN
#: Longest ``ip:port`` text ("[" + 45-character IPv6 + "]:65535").
MAX_ADDR_TEXT = 54
#: Longest complete answer.
MAX_ANSWER_LEN = REQUEST_LEN + 1 + MAX_ADDR_TEXT


def new_nonce() -> bytes:
    return os.urandom(NONCE_LEN)


def encode_request(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 16 bytes")
    return MAGIC + bytes([VERSION]) + nonce


def is_probe(first: bytes) -> bool:
    """Whether a 20-byte preamble read by the server is a whoami request."""
    return first[:3] == MAGIC


def parse_request_untrusted(data: bytes) -> bytes:
    """The nonce of a complete 20-byte request. Raises WireError / BadVersion."""
    if len(data) != REQUEST_LEN:
        raise WireError(f"whoami request must be {REQUEST_LEN} bytes, got {len(data)}")
    if data[:3] != MAGIC:
        raise WireError("not a homeport whoami request")
    if data[3] != VERSION:
        raise BadVersion(f"whoami version {data[3]} (this server speaks {VERSION})")
    return bytes(data[4:])


def format_addr(host: str, port: int) -> str:
    """``ip:port``, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr_untrusted(text: str) -> tuple[str, int]:
    """Split ``ip:port`` / ``[ip6]:port`` into a literal IP address and a port.

    Raises WireError for anything that is not a literal address and a port
    1-65535 (no host names: these come from the network and are dialled).
    """
    if len(text) > MAX_ADDR_TEXT:
        raise WireError("address too long")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or len(port_text) > 5:
        raise WireError(f"not ip:port: {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise WireError(f"port out of range: {text!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise WireError(f"not an IP address: {text!r}") from None
    if text.startswith("[") != (ip.version == 6):
        raise WireError(f"IPv6 addresses need brackets, IPv4 must not have them: {text!r}")
    return str(ip), port


def encode_answer(nonce: bytes, host: str, port: int) -> bytes:
    text = format_addr(host, port).encode("ascii")
    if len(nonce) != NONCE_LEN or len(text) > MAX_ADDR_TEXT:
        raise ValueError("bad nonce or address")
    return MAGIC + bytes([VERSION]) + nonce + bytes([len(text)]) + text


def answer_complete(data: bytes) -> bool:
    """Whether ``data`` (bytes read so far) holds a whole answer (or is already invalid)."""
    return len(data) > REQUEST_LEN and len(data) >= REQUEST_LEN + 1 + data[REQUEST_LEN]


def parse_answer_untrusted(data: bytes, nonce: bytes) -> tuple[str, int]:
    """The observed ``(ip, port)`` of a complete answer to the request with ``nonce``."""
    if len(data) < REQUEST_LEN + 1 or len(data) > MAX_ANSWER_LEN:
        raise WireError(f"whoami answer of {len(data)} bytes")
    if data[:3] != MAGIC:
        raise WireError("not a homeport whoami answer")
    if data[3] != VERSION:
        raise BadVersion(f"whoami version {data[3]}")
    if data[4:REQUEST_LEN] != nonce:
        raise WireError("whoami answer does not match our request")
    n = data[REQUEST_LEN]
    if len(data) != REQUEST_LEN + 1 + n:
        raise WireError("whoami answer length mismatch")
    try:
        text = bytes(data[REQUEST_LEN + 1 :]).decode("ascii")
    except UnicodeDecodeError:
        raise WireError("whoami address is not ASCII") from None
    return parse_addr_untrusted(text)

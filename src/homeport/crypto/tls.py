"""TLS 1.3 contexts and certificate pinning, with the standard library only.

Two kinds of TLS run in homeport (see docs/architecture.md):

* **control TLS** — node or CLI ↔ server. The node pins the server certificate
  by the SHA-256 fingerprint it learned from its auth key (no trust on first
  use). The server asks for a client certificate chained to the network CA and
  then looks its fingerprint up in the node table.
* **end-to-end TLS** — node ↔ node, through the relay. Both ends require a
  certificate chained to the network CA *and* pin the exact fingerprint the
  server announced for that one stream. The relay forwards these records
  untouched and holds no key that could decrypt or forge them.

This module is pure: it builds contexts with homeport's TLS policy (``*_policy``)
and checks pins, but loads no file. Loading a node's or the server's key and
certificates into a context is :mod:`homeport.io.tlsctx`.

This module must stay import-light: ``homeport nc`` imports it on every ``ssh``.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl

#: ALPN names keep a control connection from being mistaken for a stream.
ALPN_CONTROL = "homeport-control/1"
ALPN_STREAM = "homeport-stream/1"
#: A direct (punched) connection between two nodes carrying the stream mux: its own name, so
#: a mux connection is never taken for a relayed stream or the other way round.
ALPN_MUX = "homeport-mux/1"
#: The stream record layer (:mod:`homeport.proto.records`): TLS 1.3 handshake, own records.
ALPN_STREAM_RECORDS = "homeport-stream/2"


class PinMismatch(ssl.SSLError):
    """The peer's certificate is valid but is not the one we were told to expect."""

    def __str__(self) -> str:  # SSLError would print the args tuple: ('peer …',)
        return str(self.args[0]) if self.args else "certificate pin mismatch"


def fingerprint(der: bytes) -> str:
    """Return the pin form of a DER certificate: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def check_pin(der: bytes | None, expected: str) -> None:
    """Raise :class:`PinMismatch` unless ``der`` has fingerprint ``expected``.

    The comparison is constant-time so a network observer learns nothing from
    timing about how close a forged certificate came.
    """
    if der is None:
        raise PinMismatch("peer presented no certificate")
    got = fingerprint(der)
    if not hmac.compare_digest(got.encode(), expected.encode()):
        raise PinMismatch(f"peer certificate {got[:23]}… is not the pinned {expected[:23]}…")


def base_context(*, server_side: bool) -> ssl.SSLContext:
    """A TLS 1.3-only context with homeport's options and no credentials yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # A TCP FIN without close_notify is a truncation, i.e. an integrity failure,
    # never a clean end of stream. CPython up to 3.11.3 (Debian 12 ships 3.11.2)
    # sets OP_IGNORE_UNEXPECTED_EOF by default with OpenSSL 3, which would make a
    # relay that cuts a stream look like the peer closing it: clear it.
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    # Session tickets would be useless (every stream is a fresh pair of
    # sockets) and their post-handshake messages only cost round trips.
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def control_client_policy() -> ssl.SSLContext:
    """Context for dialing the server, before any credential is loaded.

    Chain verification is off because the trust anchor is the pinned
    fingerprint, checked with :func:`check_pin` right after the handshake and
    before any secret (an auth key) is sent. TLS 1.3 still verifies the
    server's CertificateVerify signature, so the peer must hold the key.
    """
    ctx = base_context(server_side=False)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN_CONTROL])
    return ctx


def control_server_policy() -> ssl.SSLContext:
    """Context for the server's listener: a node certificate is optional (enrollment)."""
    ctx = base_context(server_side=True)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols([ALPN_CONTROL])
    # No TLS 1.3 tickets: with OP_NO_TICKET they are stateful, i.e. OpenSSL keeps two
    # sessions (with the peer's certificate) per handshake in the context's cache (up to
    # 20,480, for 7,200 s), which no agent ever resumes: 1.5 KiB of server RSS per idle
    # agent at 1,000-2,000 agents, and more with every reconnect (bench.fleet_memory).
    ctx.num_tickets = 0
    return ctx


def stream_policy(*, server_side: bool, records: bool = True) -> ssl.SSLContext:
    """Context for an end-to-end stream: mutual auth, both chained to the network CA.

    The per-stream pin (:func:`check_pin`) is applied after the handshake by the
    caller, since one context serves every stream of a node. With ``records``
    the context offers (client) or prefers (server: OpenSSL picks in the
    server's order) ``homeport-stream/2`` — the same handshake, then homeport's
    record layer (:mod:`homeport.io.recstream`) — and still speaks
    ``homeport-stream/1`` (TLS records) with a peer that does not offer it.
    ALPN is inside the authenticated handshake, so an attacker cannot strip it.
    """
    ctx = base_context(server_side=server_side)
    if not server_side:
        ctx.check_hostname = False
    else:
        # No NewSessionTicket after the handshake (OP_NO_TICKET alone still sends
        # stateful TLS 1.3 tickets): with homeport-stream/2 the TLS session must
        # send nothing after the key exchange, the socket then carries records.
        ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN_STREAM_RECORDS, ALPN_STREAM] if records else [ALPN_STREAM])
    return ctx

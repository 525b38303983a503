"""End-to-end TLS over a socket, driven through memory BIOs (``ssl.SSLObject``).

Why not ``ssl.SSLSocket``: TLS 1.3 half-close. To send our ``close_notify``
while the peer keeps sending, Python's ``unwrap()`` calls ``SSL_shutdown``
twice; the second call *reads* from the transport to look for the peer's
close_notify, and when it meets application data there OpenSSL fails with
"application data after close notify" (the bytes are lost). With an
``SSLSocket`` the kernel buffer is almost never empty under load, so a bulk
transfer that closes one direction early breaks. With memory BIOs the pump
decides what OpenSSL can see: it calls ``unwrap()`` only when the incoming BIO
is empty and no decrypted bytes are pending, so the second ``SSL_shutdown``
finds nothing to read, returns WANT_READ, and later ``read()`` calls keep
delivering the peer's data until its own close_notify.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

#: Bytes read from the socket per ``recv`` during the handshake.
HANDSHAKE_READ_SIZE = 64 * 1024


class TlsStream:
    """A TLS session (``obj``) whose records travel over ``sock`` via two memory BIOs.

    The pump owns it after the handshake; ``close()`` closes the socket (no
    close_notify — that is the pump's job, and an abort must not send one).
    """

    __slots__ = ("incoming", "obj", "outgoing", "sock")

    def __init__(
        self,
        sock: socket.socket,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.sock = sock
        self.obj = obj
        self.incoming = incoming
        self.outgoing = outgoing

    def peer_cert_der(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    def close(self) -> None:
        self.sock.close()

    def send_blocking(self, data: bytes, timeout: float = 10.0) -> None:
        """Encrypt ``data`` and send it (tests and one-off messages; not the hot path)."""
        self.obj.write(data)
        self.sock.settimeout(timeout)
        self.sock.sendall(self.outgoing.read())


def begin_client(sock: socket.socket, ctx: ssl.SSLContext) -> tuple[TlsStream, bytes]:
    """Start a client handshake without touching the socket: return the session
    and its first flight (the ClientHello) for the caller to send.

    Why: the opener of a stream can send its ClientHello right behind the data
    preamble, before the server has even answered OPEN; the relay holds it in the
    socket until the peer's data connection is spliced on. That saves a round
    trip per ``ssh`` — the pin is still checked before any application byte.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=None)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return TlsStream(sock, obj, incoming, outgoing), outgoing.read()


def handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    timeout: float,
    started: TlsStream | None = None,
) -> TlsStream:
    """Run (or, given ``started`` from :func:`begin_client`, finish) a blocking TLS
    handshake over ``sock``; the caller checks the peer's pin.

    Raises:
        ssl.SSLError: the handshake failed (bad certificate, alert, truncation).
        TimeoutError, OSError: the transport failed or was too slow.
    """
    deadline = time.monotonic() + timeout
    if started is not None:
        obj, incoming, outgoing = started.obj, started.incoming, started.outgoing
    else:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=None)
    while True:
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        pending = outgoing.read()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS handshake timed out")
        sock.settimeout(left)
        if pending:
            sock.sendall(pending)
        if done:
            break
        chunk = sock.recv(HANDSHAKE_READ_SIZE)
        if chunk:
            incoming.write(chunk)
        else:
            incoming.write_eof()
    sock.settimeout(None)
    return TlsStream(sock, obj, incoming, outgoing)

"""The server's end of TLS-wrapped data connections: terminate the outer TLS, relay the inside.

A node behind a middlebox that lets only TLS through (``--tls-data``, docs/proxy.md)
wraps each data connection in TLS to the server, offering ALPN
``homeport-data/1`` (the detection rule: :mod:`homeport.wire.data`). For each
one, a thread of this module runs the TLS handshake (the server's own
certificate, which the node pins), reads the 20-byte preamble inside, and
gives the relay one end of a socketpair in place of the TCP socket; the thread
then pumps between the outer session and the other end
(:func:`homeport.io.pump.pump`, half-close included) until either side ends.

Why a socketpair and not a relay that speaks TLS: the relay's splice engine
stays exactly as it is (kernel-to-kernel copies for plain data connections),
and only wrapped connections pay for decryption, one thread each, bounded by
:data:`MAX_TLS_DATA`. The relay still never sees the streams' plaintext: what is
inside the outer TLS is the nodes' end-to-end TLS. The cost (the server now
decrypts and re-encrypts that side's bytes once) is measured by
``bench/proxy_cost.py``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from homeport.io import tlsstream
from homeport.io.pump import pump, set_keepalive, tune_socket
from homeport.io.tlsstream import TlsStream
from homeport.wire.data import ALPN_DATA, PREAMBLE_LEN, parse_preamble_untrusted
from homeport.wire.errors import WireError

log = logging.getLogger("homeport.server.tlsdata")

#: Wrapped data connections the server terminates at once (one thread each); more are closed.
MAX_TLS_DATA = 1024
#: Bytes read from the socket per recv while waiting for the preamble inside the TLS.
PREAMBLE_READ_SIZE = 4 * 1024


class TlsDataTerminator:
    """Runs wrapped data connections: handshake + preamble, then hand the inside to ``attach``.

    ``attach(token, sock)`` is :meth:`homeport.relay.Relay.attach` (thread-safe);
    ``released()`` is called (from the worker thread) once the handshake phase is
    over, whatever its outcome, so the caller can give back the connection's
    unauthenticated slot.
    """

    def __init__(
        self,
        ctx: ssl.SSLContext,
        attach: Callable[[bytes, socket.socket], None],
        *,
        handshake_timeout: float,
        limit: int = MAX_TLS_DATA,
    ) -> None:
        self.ctx = ctx
        self.attach = attach
        self.handshake_timeout = handshake_timeout
        self.limit = limit
        self._lock = threading.Lock()
        self._active = 0
        #: Wrapped data connections handed to the relay since start (tests, stats).
        self.accepted = 0

    @property
    def active(self) -> int:
        return self._active

    def start(self, sock: socket.socket, address: str, released: Callable[[], None]) -> bool:
        """Take ``sock`` (a TLS ClientHello offering homeport-data/1 waits in it).

        Returns False (and closes nothing) when at :data:`MAX_TLS_DATA`.
        """
        with self._lock:
            if self._active >= self.limit:
                return False
            self._active += 1
        t = threading.Thread(
            target=self._run, args=(sock, address, released), name="homeport-tlsdata", daemon=True
        )
        try:
            t.start()
        except RuntimeError:
            with self._lock:
                self._active -= 1
            return False
        return True

    def _run(self, sock: socket.socket, address: str, released: Callable[[], None]) -> None:
        inner: socket.socket | None = None
        outer: TlsStream | None = None
        try:
            try:
                sock.setblocking(True)
                outer, token = self._accept(sock)
            except (OSError, ssl.SSLError, WireError) as exc:  # TimeoutError is an OSError
                log.info("closing TLS-wrapped data connection %s: %s", address, exc)
                sock.close()
                return
            finally:
                released()
            inner, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            tune_socket(inner)
            tune_socket(mine)
            set_keepalive(sock)  # a vanished peer must not hold a relay slot forever
            with self._lock:
                self.accepted += 1
            self.attach(token, inner)  # the relay owns ``inner`` now (closes it when done)
            inner = None
            try:
                res = pump(outer, mine.fileno(), mine.fileno(), local_tuned=True)
                log.debug("TLS-wrapped data connection %s ended: %s", address, res.reason)
            finally:
                mine.close()
        except Exception:
            log.exception("TLS-wrapped data connection %s failed", address)
            if outer is not None:
                outer.close()
            sock.close()
        finally:
            if inner is not None:
                inner.close()
            with self._lock:
                self._active -= 1

    def _accept(self, sock: socket.socket) -> tuple[TlsStream, bytes]:
        """TLS handshake, the ALPN check, and the preamble read inside (all within the timeout)."""
        deadline = time.monotonic() + self.handshake_timeout
        outer = tlsstream.handshake(
            sock, self.ctx, server_side=True, timeout=self.handshake_timeout
        )
        if outer.obj.selected_alpn_protocol() != ALPN_DATA:
            raise WireError("the TLS handshake did not select homeport-data/1")
        buf = bytearray()
        while len(buf) < PREAMBLE_LEN:
            try:
                got = outer.obj.read(PREAMBLE_LEN - len(buf))  # never more: the rest is the relay's
            except ssl.SSLWantReadError:
                got = None
            if got:
                buf += got
                continue
            if got is not None:  # b"": the peer's close_notify
                raise ConnectionError(f"closed after {len(buf)} of {PREAMBLE_LEN} preamble bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no preamble within {self.handshake_timeout:g}s")
            sock.settimeout(left)
            chunk = sock.recv(PREAMBLE_READ_SIZE)
            if not chunk:
                raise ConnectionError(f"closed after {len(buf)} of {PREAMBLE_LEN} preamble bytes")
            outer.incoming.write(chunk)
        sock.settimeout(None)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return outer, parse_preamble_untrusted(bytes(buf))

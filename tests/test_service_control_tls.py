"""The server's control path with ControlLink doing TLS itself: what a failed or stalled
handshake leaves behind (a log line, a refusal event, the slot and the link given back)."""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import pytest

from homeport.io import tlsctx
from homeport.server.app import ServerHandle, start_server_thread
from homeport.server.service import ConnectionRefused, Refusal, ServiceConfig
from homeport.testing.deadline import wait_for

DEADLINE = 15.0


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.name == "homeport.server")


def _closed(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass  # the server's first flight, then EOF
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _stalled_client_hello(srv: ServerHandle) -> socket.socket:
    """A real ClientHello (so the ALPN peek passes), then silence."""
    tls = tlsctx.control_client_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
    sock.sendall(out.read())
    return sock


@pytest.mark.parametrize("how", ["stalled", "garbage"])
def test_a_failed_or_stalled_handshake_is_logged_refused_and_forgotten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="homeport.server")
    events: list[object] = []
    cfg = ServiceConfig(handshake_timeout=0.5, idle_timeout=60.0)
    with start_server_thread(tmp_path / "srv", config=cfg) as srv:
        service = srv.service
        assert service is not None
        service.observe = events.append
        if how == "stalled":
            sock = _stalled_client_hello(srv)
            reason = "TLS handshake not done within 0.5s"
        else:
            sock = socket.create_connection((srv.host, srv.port), timeout=DEADLINE)
            sock.sendall(b"\x16\x03\x01\x00\x05garbage-that-is-no-tls-handshake")
            reason = "UNEXPECTED_MESSAGE"
        assert _closed(sock)
        sock.close()
        wait_for(
            lambda: _logged(caplog, "TLS handshake with") and _logged(caplog, reason),
            DEADLINE,
            "the server to log the failed handshake",
        )
        assert ConnectionRefused(Refusal.TLS_FAILED) in events
        wait_for(lambda: service.unauthenticated == 0, DEADLINE, "the slot back")
        assert not service._links and not service._sids and not service._slots  # no leak

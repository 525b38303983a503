"""The exit node's dialer (agent.exit) on loopback: checks run on resolved addresses."""

from __future__ import annotations

import asyncio
import socket

import pytest

from homeport.agent.exit import ExitFailed, connect_exit


def _run(host: str, port: int, nets: tuple[str, ...]) -> socket.socket:
    return asyncio.run(connect_exit(host, port, nets))


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def test_a_name_that_resolves_outside_the_networks_is_refused() -> None:
    """``localhost`` is 127.0.0.1: outside 192.0.2.0/24, so nothing is dialed."""
    with _listener() as srv, pytest.raises(ExitFailed) as info:
        _run("localhost", srv.getsockname()[1], ("192.0.2.0/24",))
    assert info.value.code == "not-allowed"
    assert info.value.reason.startswith("localhost resolves to: not allowed: 127.0.0.1")


def test_loopback_is_refused_even_when_everything_is_advertised() -> None:
    with _listener() as srv, pytest.raises(ExitFailed) as info:
        _run("127.0.0.1", srv.getsockname()[1], ("0.0.0.0/0", "::/0"))
    assert info.value.code == "not-allowed" and "loopback" in info.value.reason


def test_an_explicitly_advertised_loopback_network_is_dialed() -> None:
    with _listener() as srv:
        sock = _run("localhost", srv.getsockname()[1], ("127.0.0.0/8",))
        try:
            conn, _ = srv.accept()
            conn.close()
        finally:
            sock.close()


def test_a_closed_port_is_one_line_connection_refused() -> None:
    with _listener() as srv:
        port = srv.getsockname()[1]
    with pytest.raises(ExitFailed) as info:
        _run("127.0.0.1", port, ("127.0.0.0/8",))
    assert info.value.code == "refused"
    assert str(info.value) == f"connection refused by 127.0.0.1:{port}"

"""The agent's direct-path driver, in memory and on loopback sockets (no processes)."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

from homeport.agent.direct import DirectPaths, _is_loopback_host
from homeport.io.punch import PunchSuccess


def _paths(server: str = "127.0.0.1:8443") -> DirectPaths:
    host, port = server.rsplit(":", 1)
    state = SimpleNamespace(server=server, server_address=lambda: (host, int(port)))
    agent: Any = SimpleNamespace(state=state)
    return DirectPaths(agent, port=0)


def test_no_router_asked_for_a_loopback_server() -> None:
    assert _is_loopback_host("127.0.0.1") and _is_loopback_host("::1")
    assert _is_loopback_host("localhost")
    assert not _is_loopback_host("203.0.113.10") and not _is_loopback_host("hp.example")
    d = _paths()
    try:
        assert d.portmap is False
    finally:
        d.close()
    d = _paths("203.0.113.10:8443")
    try:
        assert d.portmap is True
    finally:
        d.close()


def _win(sock: socket.socket) -> PunchSuccess:
    return PunchSuccess(sock, "direct", "127.0.0.1:1", "connect", None, 0.0)


def test_settle_takes_the_connection_the_tls_client_speaks_on() -> None:
    """Two winners: ours is idle, the client's hello arrives on one queued on P: that one wins."""
    d = _paths()
    ours, ours_peer = socket.socketpair()
    client = socket.create_connection(("127.0.0.1", d.port.port))  # queued on P's listener
    try:
        client.sendall(b"\x16\x03\x01")  # what a ClientHello starts with
        chosen = d._settle(_win(ours))
        assert chosen is not ours and ours.fileno() == -1  # our winner was closed
        assert chosen.recv(3) == b"\x16\x03\x01"
        chosen.close()
    finally:
        client.close()
        ours_peer.close()
        d.close()


def test_settle_keeps_our_winner_when_the_hello_comes_there() -> None:
    d = _paths()
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b"\x16")
        assert d._settle(_win(ours)) is ours
    finally:
        ours.close()
        theirs.close()
        d.close()

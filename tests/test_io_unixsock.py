"""The shared unix-socket rules (agent.sock, admin.sock): mode, stale files, peer uids."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from homeport.io import unixsock
from homeport.io.localapi import LocalApiServer
from homeport.server.admin import AdminError, AdminOps, start_admin_server

DEADLINE = 10.0


def test_decide_peer_refuses_an_unreadable_uid() -> None:
    me = os.geteuid()
    assert unixsock.decide_peer(me, {me}) is None
    assert unixsock.decide_peer(None, {me}) is not None
    assert unixsock.decide_peer(me + 1, {me}) is not None


def test_peer_uid_of_a_real_connection_and_of_a_non_unix_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert unixsock.peer_uid(a) == os.geteuid()
        assert unixsock.peer_refusal(a, {os.geteuid()}) is None
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp, pytest.raises(OSError):
        unixsock.peer_uid(udp)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp2:
        assert unixsock.peer_refusal(udp2, {os.geteuid()}) is not None  # unreadable: refused


def test_bind_is_0600_and_close_removes_only_our_file(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    old = os.umask(0)  # even with a wide-open umask
    try:
        lst = unixsock.bind_listener(path, 4)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    lst.close()
    assert not path.exists()
    second = unixsock.bind_listener(path, 4)
    os.unlink(path)
    third = unixsock.bind_listener(path, 4)  # a successor took the path over
    second.close()
    assert path.exists(), "closing the old listener must not remove the successor's socket"
    third.close()


def test_stale_live_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    dead = unixsock.bind_listener(path, 4)
    dead.sock.close()  # the process died: its file stays, nobody accepts
    fresh = unixsock.bind_listener(path, 4)  # the stale file is replaced
    with pytest.raises(OSError) as live:
        unixsock.bind_listener(path, 4)
    assert live.value.errno == errno.EADDRINUSE
    fresh.close()
    path.write_text("not a socket")
    with pytest.raises(OSError) as foreign:
        unixsock.bind_listener(path, 4)
    assert foreign.value.errno == errno.EEXIST and path.read_text() == "not a socket"


def test_long_paths_are_reached_through_proc(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "x.sock"
    assert len(str(path)) > unixsock.SUN_PATH_MAX
    lst = unixsock.bind_listener(path, 4)
    try:
        with unixsock.connect(path, DEADLINE) as c:
            conn, _ = lst.sock.accept()
            with conn:
                c.sendall(b"hi")
                assert conn.recv(2) == b"hi"
    finally:
        lst.close()
    assert not path.exists()


def _unreadable(_conn: socket.socket) -> int:
    raise OSError(errno.ENOTSUP, "pretend SO_PEERCRED cannot be read")


def test_local_api_refuses_a_peer_whose_uid_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handled: list[object] = []
    server = LocalApiServer(tmp_path / "agent.sock", lambda c, r: handled.append(r))
    server.start()
    try:
        monkeypatch.setattr(unixsock, "peer_uid", _unreadable)
        with unixsock.connect(server.path, DEADLINE) as c, c.makefile("rb") as f:
            reply = json.loads(f.readline())
        assert reply["ok"] is False and reply["code"] == "forbidden"
        assert handled == []
    finally:
        server.close()


class _Ops(AdminOps):
    def __init__(self) -> None:
        self.requests: list[object] = []

    def handle(self, request: object) -> dict[str, object]:
        self.requests.append(request)
        return {"ok": True}


def test_admin_socket_refuses_a_peer_whose_uid_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "admin.sock"
    ops = _Ops()

    def ask() -> bytes:
        with unixsock.connect(path, DEADLINE) as c, c.makefile("rb") as f:
            c.sendall(b'{"op": "ping"}\n')
            try:
                return f.readline()
            except ConnectionResetError:  # closed with our request unread
                return b""

    async def main() -> tuple[bytes, bytes]:
        server = await start_admin_server(path, ops)
        try:
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            admitted = await asyncio.to_thread(ask)
            with pytest.raises(AdminError, match="already running"):
                await start_admin_server(path, ops)
            monkeypatch.setattr(unixsock, "peer_uid", _unreadable)
            # last: its handler closes at once, so when ask() returns, every
            # connection made so far (the probe above too) has been handled
            refused = await asyncio.to_thread(ask)
        finally:
            server.close()
        return admitted, refused

    admitted, refused = asyncio.run(main())
    assert json.loads(admitted) == {"ok": True}
    assert refused == b""  # closed without an answer
    assert ops.requests == [{"op": "ping"}]  # the refused peer's request was never read
    assert not path.exists()

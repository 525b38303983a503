"""The admin API of a real server: uvicorn on the server's loop, real agents, a relayed stream.

The server runs with ``admin_listen="127.0.0.1:0"`` (the same code path as
``homeport server --admin-listen``); agents and ``homeport nc`` are real processes; the
API is called over real HTTP with ``urllib`` (nothing in-process).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homeport.server.admin import admin_request
from homeport.server.app import ServerHandle, start_server_thread
from homeport.server.service import ServiceConfig
from homeport.testing.deadline import wait_for
from tests.harness import HOMEPORT, Homeport, serve_in_threads

pytestmark = pytest.mark.integration


def call(
    url: str,
    token: str | None,
    method: str = "GET",
    body: Any = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, decoded JSON or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as res:
            status, raw, ctype = res.status, res.read(), res.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, json.loads(raw) if "json" in ctype else raw.decode()


def _echo() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    serve_in_threads(sock, handle)
    return sock, int(sock.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    with start_server_thread(
        tmp_path / "srv",
        admin_listen="127.0.0.1:0",
        config=ServiceConfig(relay_only=True),  # the stream below goes through the relay
    ) as srv:
        yield srv


def test_real_server_api_with_agents_streams_and_removal(
    server: ServerHandle, tmp_path: Path
) -> None:
    assert server.admin_url.startswith("http://127.0.0.1:")
    api = server.admin_url + "/api/v1"
    # tokens are made through admin.sock of the running server, like `homeport apikeys create`
    admin = admin_request(
        server.data_dir, {"op": "apikeys.create", "name": "ops", "scope": "admin"}
    )["token"]
    read = admin_request(
        server.data_dir, {"op": "apikeys.create", "name": "grafana", "scope": "read"}
    )["token"]
    assert call(f"{api}/status", None)[0] == 401
    status, info = call(f"{api}/status", read)
    assert status == 200 and info["live"] is True and info["server_pin"] == server.pin
    assert info["listen"] == server.address and info["admin_listen"] == server.admin_url
    # /metrics on a loopback listener needs no token; this server keeps none yet
    assert call(server.admin_url + "/metrics", None)[0] == 404

    echo_sock, echo_port = _echo()
    hp = Homeport(tmp_path)
    hp.server_addr = server.address
    hp.data_dir = server.data_dir
    nc: subprocess.Popen[bytes] | None = None
    try:
        key = call(f"{api}/keys", admin, "POST", {"reusable": True})[1]["key"]
        lab = hp.up("labpc", "--expose", f"echo=127.0.0.1:{echo_port}", key=key)
        laptop = hp.up("laptop", key=key)

        def online() -> set[str]:
            return {n["name"] for n in call(f"{api}/status/nodes", read)[1]["nodes"]}

        def announced() -> bool:  # online, and its ANNOUNCE (services) arrived
            nodes = {n["name"]: n for n in call(f"{api}/nodes", read)[1]["nodes"]}
            return "labpc" in nodes and bool(nodes["labpc"]["services"])

        wait_for(lambda: online() == {"labpc", "laptop"}, 30, "both agents online")
        wait_for(announced, 30, "labpc's services")
        nodes = {n["name"]: n for n in call(f"{api}/nodes", read)[1]["nodes"]}
        assert nodes["labpc"]["online"] and nodes["labpc"]["services"] == [
            {"name": "echo", "port": echo_port}
        ]

        nc = subprocess.Popen(
            [*HOMEPORT, "nc", "--state", str(hp.state("laptop")), "labpc", "echo"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=hp.env,
        )
        assert nc.stdin is not None and nc.stdout is not None
        nc.stdin.write(b"ping\n")
        nc.stdin.flush()
        assert nc.stdout.readline() == b"ping\n"  # the stream is up, through the relay
        [stream] = call(f"{api}/streams", read)[1]["streams"]
        assert (stream["src"], stream["dst"], stream["path"]) == ("laptop", "labpc", "relay")
        assert stream["bytes_up"] >= 0 and call(f"{api}/status", read)[1]["streams_relayed"] == 1

        # a read token may not remove; an admin token may, and the stream is cut at once
        assert call(f"{api}/nodes/laptop", read, "DELETE")[0] == 403
        status, gone = call(f"{api}/nodes/laptop", admin, "DELETE")
        assert status == 200 and gone["name"] == "laptop"
        nc.wait(timeout=10)
        assert laptop.wait(timeout=10) != 0
        wait_for(lambda: online() == {"labpc"}, 10, "laptop gone")
        wait_for(
            lambda: any(
                e["node"] == "laptop"
                for e in call(f"{api}/audit?kind=node-remove", read)[1]["events"]
            ),
            10,
            "node-remove in the audit log",
        )
        assert call(f"{api}/streams", read)[1]["streams"] == []
        assert lab.poll() is None
    finally:
        if nc is not None and nc.poll() is None:
            nc.kill()
            nc.wait()
        hp.close()
        echo_sock.close()

    # revoking a token through the API takes effect on the next request
    key_id = read.split("_")[1]
    assert call(f"{api}/apikeys/{key_id}", admin, "DELETE")[0] == 200
    assert call(f"{api}/status", read)[0] == 401


def test_the_listener_stops_with_the_server_and_runs_no_thread(tmp_path: Path) -> None:
    srv = start_server_thread(tmp_path / "srv", admin_listen="127.0.0.1:0")
    host, port = srv.admin_url.removeprefix("http://").rsplit(":", 1)
    try:
        # uvicorn's Server.serve is a task on the server's own loop (not a thread of its own)
        tasks = srv.call(
            lambda: [getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks()]
        )
        assert "Server.serve" in tasks, tasks
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    finally:
        srv.stop()
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=5):
        pass


def test_a_listener_beyond_loopback_is_tls_and_metrics_need_a_token(tmp_path: Path) -> None:
    """Bound to the wildcard (reached here over loopback only): HTTPS with the server
    certificate, and /metrics is no longer open."""
    with start_server_thread(tmp_path / "srv", admin_listen="0.0.0.0:0") as srv:
        assert srv.admin_url.startswith("https://0.0.0.0:")
        port = int(srv.admin_url.rsplit(":", 1)[1])
        ctx = ssl.create_default_context(cafile=str(srv.data_dir / "ca.crt"))
        ctx.check_hostname = False  # the self-made certificate names no address
        read = admin_request(srv.data_dir, {"op": "apikeys.create", "name": "r", "scope": "read"})[
            "token"
        ]
        base = f"https://127.0.0.1:{port}"
        assert call(f"{base}/metrics", None, context=ctx)[0] == 401
        assert call(f"{base}/metrics", read, context=ctx)[0] == 404  # authorized; no metrics
        assert call(f"{base}/api/v1/status", read, context=ctx)[0] == 200
        with pytest.raises(OSError):  # plain HTTP is not spoken there (URLError or a reset)
            call(f"http://127.0.0.1:{port}/api/v1/status", read)

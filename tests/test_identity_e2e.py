"""Identity against a real server: racing one single-use key, and auth keys kept out of ``ps``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from homeport.io.dial import DialError, enroll
from homeport.server.admin import admin_request
from homeport.server.app import ServerHandle, start_server_thread
from homeport.testing.deadline import wait_for

HOMEPORT = [sys.executable, "-m", "homeport"]


def _key(data: Path, **kw: Any) -> str:
    answer = admin_request(data, {"op": "keys.create", "expiry_seconds": 3600, **kw})
    assert answer["ok"], answer
    return str(answer["key"])


def _online(data: Path, name: str) -> bool:
    nodes = admin_request(data, {"op": "nodes.list"})["nodes"]
    return any(n["name"] == name and n["online"] for n in nodes)


def test_one_single_use_key_raced_by_many_enrollments_enrolls_exactly_one(tmp_path: Path) -> None:
    data = tmp_path / "srv"
    with start_server_thread(data) as srv:
        key = _key(data)
        server = f"{srv.host}:{srv.port}"
        results: dict[int, str] = {}
        gate = threading.Barrier(8)

        def attempt(i: int) -> None:
            gate.wait()
            try:
                enroll(server, key, f"racer{i}", tmp_path / f"state{i}", timeout=20)
                results[i] = "ok"
            except DialError as exc:
                results[i] = exc.code

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results.values()) == ["auth-key-used"] * 7 + ["ok"], results
        nodes = admin_request(data, {"op": "nodes.list"})["nodes"]
        [winner] = [i for i, r in results.items() if r == "ok"]
        assert len(nodes) == 1 and nodes[0]["name"] == f"racer{winner}"


def _spawn_up(
    srv: ServerHandle, tmp_path: Path, name: str, key_args: list[str], **kw: Any
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEPORT_")}
    env.update(kw.pop("env", {}))
    return subprocess.Popen(
        [
            *HOMEPORT,
            "up",
            "--server",
            f"{srv.host}:{srv.port}",
            "--name",
            name,
            "--state",
            str(tmp_path / f"state-{name}"),
            "--expose",
            "web=127.0.0.1:9",
            *key_args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / f"{name}.log", "wb"),
        **kw,
    )


@pytest.mark.parametrize("how", ["literal", "env", "stdin", "file"])
def test_the_auth_key_is_not_in_the_running_agents_cmdline(tmp_path: Path, how: str) -> None:
    data = tmp_path / "srv"
    with start_server_thread(data) as srv:
        key = _key(data)
        name = f"box-{how}"
        kw: dict[str, Any] = {}
        args: list[str] = []
        if how == "literal":
            args = ["--authkey", key]
        elif how == "env":
            kw["env"] = {"HOMEPORT_AUTHKEY": key}
        elif how == "stdin":
            args = ["--authkey", "-"]
            kw["stdin"] = subprocess.PIPE
        else:
            (tmp_path / "key").write_text(key + "\n")
            (tmp_path / "key").chmod(0o600)
            args = ["--authkey-file", str(tmp_path / "key")]
        proc = _spawn_up(srv, tmp_path, name, args, **kw)
        try:
            if how == "stdin":
                assert proc.stdin is not None
                proc.stdin.write(key.encode() + b"\n")
                proc.stdin.close()

            def online() -> bool:
                if proc.poll() is not None:
                    log = (tmp_path / f"{name}.log").read_text()
                    raise AssertionError(f"agent exited {proc.returncode}: {log}")
                return _online(data, name)

            wait_for(online, 30, f"{name} online")
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
            secret = key.encode()
            assert secret not in cmdline and secret not in environ
            assert b"up" in cmdline.split(b"\0")  # the same process (PID), still our agent
            if how == "literal":
                assert b"--authkey-file\0/dev/fd/" in cmdline  # re-executed through a pipe
        finally:
            proc.terminate()
            proc.wait(10)


def test_two_key_sources_at_once_are_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEPORT_")}
    env["HOMEPORT_AUTHKEY"] = "hpk1_x"
    res = subprocess.run(
        [*HOMEPORT, "up", "--authkey", "hpk1_y", "--state", str(tmp_path / "s")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2
    assert "one way only" in res.stderr and "hpk1_y" not in res.stderr


def test_a_running_agent_renews_its_key_and_is_never_cut_off(tmp_path: Path) -> None:
    """Real server and agent, 4.5-second node keys: it renews every ~3 s and stays online."""
    data = tmp_path / "srv"
    with start_server_thread(data, key_expiry=4.5) as srv:
        key = _key(data)
        proc = _spawn_up(srv, tmp_path, "labpc", ["--authkey", key])
        cert = tmp_path / "state-labpc" / "node.crt"
        try:
            wait_for(lambda: _online(data, "labpc"), 30, "labpc online")
            seen = {cert.read_bytes()}
            sessions_before = _sessions(srv)

            def renewed_twice() -> bool:
                assert proc.poll() is None, (tmp_path / "labpc.log").read_text()
                assert _online(data, "labpc"), "the node went offline"
                seen.add(cert.read_bytes())
                return len(seen) >= 3

            wait_for(renewed_twice, 30, "two renewals", interval=0.05)
            assert _sessions(srv) == sessions_before  # the same control session throughout
            log = (tmp_path / "labpc.log").read_text()
            assert "node key renewed" in log and "expired" not in log
            assert oct((tmp_path / "state-labpc" / "node.key").stat().st_mode & 0o777) == "0o600"
        finally:
            proc.terminate()
            proc.wait(10)
        # a restarted agent authenticates with the renewed key (the first one is forgotten)
        proc = _spawn_up(srv, tmp_path, "labpc", [])
        try:
            wait_for(lambda: _online(data, "labpc"), 30, "labpc online again")
        finally:
            proc.terminate()
            proc.wait(10)


def _sessions(srv: ServerHandle) -> int | None:
    service = srv.service
    assert service is not None

    def session() -> int | None:
        node = service.core.node_by_name("labpc")
        return None if node is None else service.core.agent_session(node.node_id)

    answer: int | None = srv.call(session)
    return answer


def test_an_expired_agent_is_refused_then_readmitted_by_extend(tmp_path: Path) -> None:
    """The headless-box story: its key expires, the admin extends it, it is back on its own."""
    data = tmp_path / "srv"
    with start_server_thread(data) as srv:
        key = _key(data)
        proc = _spawn_up(srv, tmp_path, "headless", ["--authkey", key])
        try:
            wait_for(lambda: _online(data, "headless"), 30, "online")
            assert admin_request(data, {"op": "nodes.expire", "name": "headless"})["ok"]
            wait_for(lambda: not _online(data, "headless"), 10, "cut off at expiry")
            log = tmp_path / "headless.log"
            wait_for(lambda: "homeport nodes extend headless" in log.read_text(), 10, "told why")
            assert proc.poll() is None  # not fatal: it keeps trying
            assert admin_request(data, {"op": "nodes.extend", "name": "headless"})["ok"]
            wait_for(lambda: _online(data, "headless"), 40, "back without touching the node")
        finally:
            proc.terminate()
            proc.wait(10)

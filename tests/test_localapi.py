"""The agent's local API without a network: request parsing, the server's guards, and nc's
side of the protocol (reply parser, fallback rules, descriptor hand-off) against a fake agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from homeport.client import nc
from homeport.io import localapi
from homeport.io.localapi import LocalApiServer, OpenRequest, RequestError, parse_request
from homeport.node import state as node_state

SRC = Path(__file__).resolve().parents[1] / "src"
NCFAST = SRC / "homeport" / "ncfast.py"
NC = [sys.executable, "-I", "-S", str(NCFAST)]  # nc exactly as ssh starts it
DEADLINE = 20.0

# -- request parsing -------------------------------------------------------------------


def test_parse_request_accepts_the_open_request_nc_sends() -> None:
    for host, service in (("labpc", "22"), ("lab-pc.home_1", "ssh"), ("a", "65535")):
        line = nc.open_request(host, service, 2.5).rstrip(b"\n")
        assert parse_request(line) == OpenRequest(host, service, 2.5, ack=True)
    assert parse_request(b'{"op":"open","dst":"x","service":"echo"}') == OpenRequest("x", "echo")


@pytest.mark.parametrize(
    ("line", "code", "why"),
    [
        (b"x" * (localapi.MAX_REQUEST + 1), "bad-request", "longer than"),
        (b"garbage", "bad-request", "not JSON"),
        (b"\xff\xfe", "bad-request", "not JSON"),
        (b"[1, 2]", "bad-request", "not a JSON object"),
        (b'{"op": "close"}', "unknown-op", "unknown op"),
        (b"{}", "unknown-op", "unknown op"),
        (b'{"op": "open", "dst": "labpc"}', "bad-request", "dst and service"),
        (b'{"op": "open", "dst": 1, "service": "22"}', "bad-request", "dst and service"),
        (b'{"op": "open", "dst": "../etc", "service": "22"}', "bad-request", "bad host name"),
        (b'{"op": "open", "dst": "a/b", "service": "22"}', "bad-request", "bad host name"),
        (b'{"op": "open", "dst": ".hidden", "service": "22"}', "bad-request", "bad host name"),
        (b'{"op": "open", "dst": "", "service": "22"}', "bad-request", "bad host name"),
        (b'{"op": "open", "dst": "h", "service": "a b"}', "bad-request", "bad PORT"),
        (b'{"op": "open", "dst": "h", "service": "0"}', "bad-request", "out of range"),
        (b'{"op": "open", "dst": "h", "service": "70000"}', "bad-request", "out of range"),
        (b'{"op": "open", "dst": "h", "service": "22", "timeout": "1"}', "bad-request", "number"),
        (b'{"op": "open", "dst": "h", "service": "22", "timeout": true}', "bad-request", "number"),
        (b'{"op": "open", "dst": "h", "service": "22", "timeout": 0}', "bad-request", "between"),
        (b'{"op": "open", "dst": "h", "service": "22", "timeout": 1e9}', "bad-request", "between"),
    ],
)
def test_parse_request_refuses(line: bytes, code: str, why: str) -> None:
    with pytest.raises(RequestError, match=why) as info:
        parse_request(line)
    assert info.value.code == code


def test_error_reply_is_one_bounded_line() -> None:
    reply = localapi.error_reply("x", "two\nlines  " + "m" * 5000, fallback=True)
    assert reply["message"].startswith("two lines m")
    assert len(reply["message"]) == localapi.MAX_MESSAGE
    line = localapi.encode(reply)
    assert line.count(b"\n") == 1 and len(line) < localapi.MAX_REPLY


# -- nc's side: constants, state dir, reply parser ------------------------------------------


def test_nc_mirrors_the_constants_it_cannot_import() -> None:
    assert nc.AGENT_SOCKET == localapi.SOCKET_NAME
    assert nc.MAX_REPLY == localapi.MAX_REPLY
    assert nc.ENV_STATE == node_state.ENV_STATE
    assert nc.DEFAULT_STATE == node_state.DEFAULT_STATE


def test_nc_state_dir_matches_node_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(node_state.ENV_STATE, raising=False)
    assert nc.state_dir(None) == str(node_state.resolve_dir(None))
    assert nc.state_dir("~/x") == str(node_state.resolve_dir("~/x"))
    monkeypatch.setenv(node_state.ENV_STATE, str(tmp_path))
    assert nc.state_dir(None) == str(node_state.resolve_dir(None))
    monkeypatch.chdir(tmp_path)
    assert nc.state_dir("rel") == str(node_state.resolve_dir("rel"))


@pytest.mark.parametrize(
    "text",
    [
        '{"ok":true,"peer":"labpc","port":22,"stream":"s1"}',
        '{"ok":false,"code":"offline","message":"labpc is \\"offline\\" \\u00e9\\ud83d\\ude00",'
        '"fallback":false}',
        ' { "end" : "clean" , "ok" : true , "reason" : "closed", "n": null, "f": -1.5e3 } ',
        "{}",
        localapi.encode(localapi.error_reply("c", 'tab\there ünïcode \\ / "q"')).decode(),
    ],
)
def test_nc_reply_parser_agrees_with_json(text: str) -> None:
    assert nc.parse_reply(text) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    ["", "[]", '{"a":1', '{"a":1,}', '{"a" 1}', '{"a":{"b":1}}', '{"a":[1]}', '{"a":1} x',
     '{"a":"unterminated}', "{a:1}", '{"a":tru}'],
)  # fmt: skip
def test_nc_reply_parser_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        nc.parse_reply(text)


def test_nc_parse_args_fdpass() -> None:
    assert nc.parse_args(["--fdpass", "h", "22"]).fdpass is True
    assert nc.parse_args(["h", "22"]).fdpass is False


# -- the server's guards ------------------------------------------------------------------


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    s.connect(str(path))
    return s


def _ask(path: Path, payload: bytes, *, shut: bool = False) -> dict[str, object]:
    with _connect(path) as s:
        s.sendall(payload)
        if shut:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return dict(json.loads(data))


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[LocalApiServer, list[OpenRequest]]]:
    seen: list[OpenRequest] = []

    def handler(conn: socket.socket, req: OpenRequest) -> None:
        seen.append(req)
        if req.dst == "crash":
            raise RuntimeError("boom")
        a, b = socket.socketpair()
        with a, b:
            localapi.send_reply(conn, {"ok": True, "peer": req.dst, "port": 7}, b.fileno())
            a.sendall(b"through the passed socket")

    server = LocalApiServer(localapi.socket_path(tmp_path), handler)
    server.start()
    try:
        yield server, seen
    finally:
        server.close()


def test_socket_is_0600_and_removed_on_close(tmp_path: Path) -> None:
    server = LocalApiServer(tmp_path / "agent.sock", lambda c, r: None)
    server.start()
    mode = os.stat(tmp_path / "agent.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    server.close()
    assert not (tmp_path / "agent.sock").exists()


def test_stale_socket_is_replaced_live_one_and_other_files_are_not(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays: what a killed agent leaves behind
    first = LocalApiServer(path, lambda c, r: None)
    first.start()
    try:
        second = LocalApiServer(path, lambda c, r: None)
        with pytest.raises(OSError, match="in use"):
            second.start()
    finally:
        first.close()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        LocalApiServer(path, lambda c, r: None).start()
    assert path.read_text() == "not a socket"


def test_open_reply_carries_one_descriptor(
    api: tuple[LocalApiServer, list[OpenRequest]],
) -> None:
    server, seen = api
    with _connect(server.path) as s:
        s.sendall(nc.open_request("labpc", "22", 3.0))
        fds: list[int] = []
        line, rest = nc._recv_line(s, fds)  # the code nc runs
    assert nc.parse_reply(line.decode()) == {"ok": True, "peer": "labpc", "port": 7}
    assert rest == b"" and len(fds) == 1
    with socket.socket(fileno=fds[0]) as passed:
        passed.settimeout(DEADLINE)
        assert passed.recv(100) == b"through the passed socket"
    assert seen == [OpenRequest("labpc", "22", 3.0, ack=True)]


@pytest.mark.parametrize(
    ("payload", "shut", "code"),
    [
        (b"garbage\n", False, "bad-request"),
        (b"{}\n", False, "unknown-op"),
        (b'{"op":"open","dst":"../x","service":"22"}\n', False, "bad-request"),
        (b"x" * (localapi.MAX_REQUEST + 10), False, "bad-request"),
        (b'{"op":"open"', True, "bad-request"),  # no newline, then EOF
        (b'{"op":"open","dst":"crash","service":"22"}\n', False, "internal"),
    ],
)
def test_malformed_requests_get_an_error_and_the_server_keeps_serving(
    api: tuple[LocalApiServer, list[OpenRequest]], payload: bytes, shut: bool, code: str
) -> None:
    server, _ = api
    reply = _ask(server.path, payload, shut=shut)
    assert reply["ok"] is False and reply["code"] == code and reply["fallback"] is False
    assert _ask(server.path, nc.open_request("labpc", "22", 1.0))["ok"] is True


def test_silent_client_times_out(
    api: tuple[LocalApiServer, list[OpenRequest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = api
    monkeypatch.setattr(localapi, "REQUEST_TIMEOUT", 0.2)
    with _connect(server.path) as s:
        reply = json.loads(s.makefile("rb").readline())
    assert reply["code"] == "bad-request" and "no request line" in reply["message"]


def _as_nobody(action: Callable[[], str]) -> str:
    """Run ``action`` in a forked child under uid/gid 65534; return what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        out = "child failed"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = action()
        except BaseException as exc:
            out = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(w, out.encode()[:4000])
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_another_uid_is_refused() -> None:
    """Even with the file system opened up, SO_PEERCRED keeps other users out."""
    opened: list[OpenRequest] = []
    # Not under pytest's tmp_path: its parents are 0700 and must stay so.
    top = Path(tempfile.mkdtemp(prefix="hp-uid-"))
    server = LocalApiServer(top / "agent.sock", lambda c, r: opened.append(r))
    server.start()
    try:

        def try_open() -> str:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(DEADLINE)
                s.connect(str(server.path))
                # The refusal comes at accept, before any request: read it first. (Sending
                # first races the server's close: EPIPE instead of the reply.)
                return s.makefile("rb").readline().decode()

        # the default: the directory is 0700 (like the state dir) and the socket 0600
        assert "PermissionError" in _as_nobody(try_open)
        # deliberately opened up: the peer uid check still refuses
        os.chmod(top, 0o755)
        os.chmod(server.path, 0o666)
        reply = json.loads(_as_nobody(try_open))
        assert reply["ok"] is False and reply["code"] == "forbidden"
        assert opened == []
    finally:
        server.close()
        shutil.rmtree(top)


# -- nc against a fake agent (real nc processes) -----------------------------------------------


class FakeAgent:
    """Answers nc's open request with ``reply``; on success passes one end of a socketpair
    and runs ``serve`` on the other, then writes ``end`` as the end line."""

    def __init__(
        self,
        state: Path,
        reply: dict[str, object] | None,
        serve: Callable[[socket.socket], None] | None = None,
        end: dict[str, object] | None = None,
    ) -> None:
        self.requests: list[bytes] = []
        self.reply, self.serve, self.end = reply, serve, end
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(state / nc.AGENT_SOCKET))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                self.requests.append(conn.makefile("rb").readline())
                if self.reply is None:
                    return  # hang up without answering
                if self.reply.get("ok") is not True:
                    conn.sendall(localapi.encode(self.reply))
                    return
                mine, theirs = socket.socketpair()
                with mine:
                    with theirs:
                        socket.send_fds(conn, [localapi.encode(self.reply)], [theirs.fileno()])
                    if self.serve is not None:
                        self.serve(mine)
                    if self.end is not None:
                        conn.sendall(localapi.encode(self.end))

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=DEADLINE)


def run_nc(
    state: Path, *args: str, input: bytes | None = None, stdin: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    argv = [*NC, "--state", str(state), *args]
    if input is not None:
        return subprocess.run(argv, input=input, capture_output=True, timeout=DEADLINE)
    return subprocess.run(argv, stdin=stdin, capture_output=True, timeout=DEADLINE)


def echo(sock: socket.socket) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


NOT_ENROLLED = b"homeport nc: labpc: not enrolled"


def test_agent_error_is_final_and_one_line(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path, localapi.error_reply("offline", "labpc is offline"))
    try:
        res = run_nc(tmp_path, "labpc", "22")
    finally:
        agent.close()
    assert res.returncode == 1
    assert res.stderr == b"homeport nc: labpc is offline\n"  # no direct dial after it
    assert json.loads(agent.requests[0]) == {
        "op": "open",
        "dst": "labpc",
        "service": "22",
        "timeout": 10.0,
        "ack": True,
    }


class _NoFdAgent(FakeAgent):
    """Says ok but passes no descriptor (a broken or foreign agent)."""

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            with conn:
                conn.makefile("rb").readline()
                assert self.reply is not None
                conn.sendall(localapi.encode(self.reply))


@pytest.mark.parametrize(
    "reply",
    [
        localapi.error_reply("not-connected", "not connected", fallback=True),
        None,  # the agent hangs up without a word
        {"ok": True, "peer": "labpc", "port": 22},  # but no descriptor: a confused agent
    ],
)
def test_nc_dials_by_itself_when_the_agent_cannot_help(
    tmp_path: Path, reply: dict[str, object] | None
) -> None:
    agent: FakeAgent
    if reply is not None and reply.get("ok") is True:
        agent = _NoFdAgent(tmp_path, reply)
    else:
        agent = FakeAgent(tmp_path, reply)
    try:
        res = run_nc(tmp_path, "labpc", "22")
    finally:
        agent.close()
    assert res.returncode == 1 and res.stderr.startswith(NOT_ENROLLED), res.stderr  # direct path


def test_stale_socket_file_means_direct_dial(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / nc.AGENT_SOCKET))
    stale.close()
    res = run_nc(tmp_path, "labpc", "22")
    assert res.returncode == 1 and res.stderr.startswith(NOT_ENROLLED), res.stderr


def test_plain_copy_round_trip_and_half_close(tmp_path: Path) -> None:
    ok = {"end": "clean", "ok": True, "reason": "closed"}
    agent = FakeAgent(tmp_path, {"ok": True, "peer": "labpc", "port": 22}, echo, ok)
    payload = os.urandom(1_000_000)
    try:
        res = run_nc(tmp_path, "labpc", "echo", input=payload)
    finally:
        agent.close()
    assert res.returncode == 0, res.stderr
    assert res.stdout == payload  # all of it came back after our EOF


@pytest.mark.parametrize(
    ("end", "line"),
    [
        (
            {"end": "tls-error", "ok": False, "reason": "stream integrity/TLS failure: bad mac"},
            "stream integrity/TLS failure: bad mac",
        ),
        (
            {"end": "cancelled", "ok": False, "reason": "cancelled"},
            "the local homeport agent stopped",
        ),
        (None, "the local homeport agent closed the stream"),  # it died: no end line at all
    ],
)
def test_plain_copy_reports_how_the_agent_stream_ended(
    tmp_path: Path, end: dict[str, object] | None, line: str
) -> None:
    agent = FakeAgent(tmp_path, {"ok": True, "peer": "labpc", "port": 22}, None, end)
    try:
        res = run_nc(tmp_path, "labpc", "22", stdin=subprocess.PIPE)
    finally:
        agent.close()
    assert res.returncode == 1
    assert res.stderr == f"homeport nc: labpc: {line}\n".encode()


def test_fdpass_hands_ssh_the_agents_socket(tmp_path: Path) -> None:
    """What ssh does with ProxyUseFdpass: stdio is a socketpair, it wants 1 byte + 1 fd."""
    agent = FakeAgent(tmp_path, {"ok": True, "peer": "labpc", "port": 22}, echo)
    ssh_end, nc_end = socket.socketpair()
    try:
        with nc_end:
            proc = subprocess.Popen(
                [*NC, "--state", str(tmp_path), "--fdpass", "labpc", "22"],
                stdin=nc_end.fileno(),
                stdout=nc_end.fileno(),
                stderr=subprocess.PIPE,
            )
        ssh_end.settimeout(DEADLINE)
        data, fds, _flags, _addr = socket.recv_fds(ssh_end, 1, 1)  # OpenSSH's mm_receive_fd
        assert proc.wait(timeout=DEADLINE) == 0  # nc is gone before the stream is used
        assert data == b"\0" and len(fds) == 1
        with socket.socket(fileno=fds[0]) as stream:
            stream.settimeout(DEADLINE)
            stream.sendall(b"straight to the agent")
            stream.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := stream.recv(4096):
                got += chunk
        assert got == b"straight to the agent"
    finally:
        ssh_end.close()
        agent.close()


def test_fdpass_flag_with_a_pipe_just_copies(tmp_path: Path) -> None:
    ok = {"end": "clean", "ok": True, "reason": "closed"}
    agent = FakeAgent(tmp_path, {"ok": True, "peer": "labpc", "port": 22}, echo, ok)
    try:
        res = run_nc(tmp_path, "--fdpass", "labpc", "22", input=b"piped")
    finally:
        agent.close()
    assert res.returncode == 0 and res.stdout == b"piped", res.stderr

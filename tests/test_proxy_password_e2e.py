"""``homeport up --proxy`` without the password in ``ps``: a real server and agents on
loopback, reaching the server only through a Basic-auth CONNECT proxy (a small one here, in
threads: tinyproxy in the NAT lab is tests/test_proxy_lab.py's).

The password comes from ``--proxy-password-file`` or ``$HOMEPORT_PROXY_PASSWORD``; the
proxy must see it (the node comes online only through it), the agent's command line must
not hold it, and network.json (which keeps it for the next start) must be 0600. A password
in the ``--proxy`` URL still works and gets a one-line warning pointing to the safe way.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import HOMEPORT, Homeport, serve_in_threads

pytestmark = pytest.mark.integration

PASSWORD = "s3cret word"  # a space: only the file's final line break is taken off
#: Longest CONNECT request head the proxy reads.
MAX_HEAD = 8 * 1024


class AuthProxy:
    """A CONNECT proxy on loopback that wants ``alice:PASSWORD`` and splices to the target."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[str] = []  # the credentials of every CONNECT, decoded
        self.lock = threading.Lock()
        serve_in_threads(self.listener, self._handle)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            target = lines[0].split()[1]
            cred = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "proxy-authorization":
                    cred = base64.b64decode(value.split()[-1]).decode()
            with self.lock:
                self.seen.append(cred)
            if cred != f"alice:{PASSWORD}":
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            with socket.create_connection((host, int(port))) as up:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head.split(b"\r\n\r\n", 1)[1]
                if rest:
                    up.sendall(rest)
                t = threading.Thread(target=_copy, args=(up, conn), daemon=True)
                t.start()
                _copy(conn, up)
                t.join(timeout=30)

    def url(self, auth: str) -> str:
        return f"http://{auth}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Homeport, AuthProxy]]:
    hp = Homeport(tmp_path_factory.mktemp("proxypw"))
    for var in ("HTTPS_PROXY", "https_proxy", "HOMEPORT_PROXY", "HOMEPORT_TLS_DATA"):
        hp.env.pop(var, None)
    proxy = AuthProxy()
    try:
        hp.start_server()
        yield hp, proxy
    finally:
        hp.close()
        proxy.close()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _check_saved(hp: Homeport, name: str) -> None:
    net_file = hp.state(name) / "network.json"
    assert net_file.stat().st_mode & 0o777 == 0o600
    assert "alice:s3cret%20word@" in net_file.read_text()


def test_password_file_keeps_it_out_of_ps(net: tuple[Homeport, AuthProxy], tmp_path: Path) -> None:
    hp, proxy = net
    pw = tmp_path / "proxy-password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    proc = hp.up("pwfile", "--proxy", proxy.url("alice"), "--proxy-password-file", str(pw))
    hp.wait_online("pwfile", proc)
    assert "s3cret" not in _cmdline(proc.pid)
    assert f"alice:{PASSWORD}" in proxy.seen  # it really went through the proxy, with it
    _check_saved(hp, "pwfile")
    log = hp.log("agent-pwfile")
    assert "s3cret" not in log and "visible to every user" not in log


def test_password_from_the_environment(net: tuple[Homeport, AuthProxy]) -> None:
    hp, proxy = net
    hp.env["HOMEPORT_PROXY_PASSWORD"] = PASSWORD
    try:
        proc = hp.up("pwenv", "--proxy", proxy.url("alice"))
    finally:
        del hp.env["HOMEPORT_PROXY_PASSWORD"]
    hp.wait_online("pwenv", proc)
    assert "s3cret" not in _cmdline(proc.pid)
    _check_saved(hp, "pwenv")


def test_password_in_the_url_works_and_warns_once(net: tuple[Homeport, AuthProxy]) -> None:
    hp, proxy = net
    proc = hp.up("pwurl", "--proxy", proxy.url("alice:s3cret%20word"))
    hp.wait_online("pwurl", proc)
    warnings = [ln for ln in hp.log("agent-pwurl").splitlines() if "visible to every user" in ln]
    assert len(warnings) == 1, hp.log("agent-pwurl")
    assert "--proxy-password-file FILE or $HOMEPORT_PROXY_PASSWORD" in warnings[0]
    assert "s3cret" not in warnings[0]


@pytest.mark.parametrize(
    ("args", "env", "why"),
    [
        (["--proxy", "http://127.0.0.1:3128"], {"HOMEPORT_PROXY_PASSWORD": "x"}, "needs the user"),
        (["--proxy", "http://a:b@127.0.0.1:3128"], {"HOMEPORT_PROXY_PASSWORD": "x"}, "twice"),
        ([], {"HOMEPORT_PROXY_PASSWORD": "x"}, "needs a proxy: --proxy http://USER@HOST:PORT"),
        (["--proxy-password-file", "/nonexistent"], {}, "cannot read the proxy password file"),
        (["--proxy-password-file", "/dev/null"], {"HOMEPORT_PROXY_PASSWORD": "x"}, "one way"),
        (["--proxy-password-file", "/dev/null", "--proxy", "http://a@h"], {}, "1-256 characters"),
    ],
)
def test_password_mistakes_are_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], why: str
) -> None:
    hp = Homeport(tmp_path)
    res = subprocess.run(
        [*HOMEPORT, "up", "--state", str(tmp_path / "s"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**hp.env, **env},
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], res.stderr
    assert not (tmp_path / "s" / "network.json").exists()


def test_a_new_password_for_the_saved_proxy(tmp_path: Path) -> None:
    """The password changed: ``up --proxy-password-file FILE`` alone updates the saved URL."""
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    (state / "network.json").write_text('{"proxy": "http://alice:old@127.0.0.1:3128"}')
    pw = tmp_path / "pw"
    pw.write_text("new\n")
    res = subprocess.run(
        [*HOMEPORT, "up", "--state", str(state), "--proxy-password-file", str(pw)],
        capture_output=True,
        text=True,
        timeout=30,
        env=Homeport(tmp_path).env,
        stdin=subprocess.DEVNULL,
    )
    assert "not enrolled" in res.stderr  # saved first, then up stops: no node here
    saved = (state / "network.json").read_text()
    assert "alice:new@127.0.0.1:3128" in saved and "old" not in saved
    assert (state / "network.json").stat().st_mode & 0o777 == 0o600

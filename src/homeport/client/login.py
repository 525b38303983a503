"""Keyless SSH on the client: fresh key + short-lived certificate, and login checks.

``homeport ssh NAME`` (and ``ssh-config``'s ``Match exec`` line) call
:func:`fetch_certificate` just before ssh runs: a new Ed25519 key is made in the
state directory (0600), the server signs it for the requested account if the
policy's ``ssh`` rules allow, and ssh is pointed at both with ``IdentityFile`` /
``CertificateFile``. The key is single-use in spirit (a new one for every
login) and the certificate lives minutes, so nothing needs revoking and nobody
edits ``authorized_keys``.

``homeport login`` starts a login check (for ``check`` rules) and waits until an
admin or another approved device of the same user approves its code.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from homeport.io.dial import ControlClient, DialError, connect_control
from homeport.node.files import write_private, write_public
from homeport.node.state import NodeState
from homeport.wire import control as m

#: Where fresh keys and certificates go, under the state directory (0700).
SSH_KEYS_DIR = "ssh-certs"
#: How often ``homeport login`` asks whether its code was approved (seconds).
LOGIN_POLL = 1.0
#: How long one control request waits for the server (seconds).
REQUEST_TIMEOUT = 15.0
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class CertRefused(Exception):
    """The server signed nothing: ``code`` and ``reason`` say why (naming the rule)."""

    def __init__(self, code: str, reason: str, rule: str = "") -> None:
        super().__init__(f"{reason} ({code})" if reason else code)
        self.code = code
        self.reason = reason
        self.rule = rule


@dataclass(frozen=True, slots=True)
class CertFiles:
    """The key and certificate written for one login, and the certificate's terms."""

    key: Path
    cert: Path
    principals: tuple[str, ...]
    valid_before: float
    rule: str


def key_paths(state_dir: Path, dst: str, account: str) -> tuple[Path, Path]:
    """Fixed paths per (node, account), so a static ssh config can name them."""
    stem = f"{_SAFE.sub('_', dst)}_{_SAFE.sub('_', account)}"
    base = state_dir / SSH_KEYS_DIR
    return base / stem, base / f"{stem}-cert.pub"


def _new_key() -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return private, public


def fetch_certificate(
    state: NodeState, dst: str, account: str, *, timeout: float = REQUEST_TIMEOUT
) -> CertFiles:
    """A fresh key and a certificate to log in to ``dst`` as ``account``.

    Raises:
        CertRefused: the server refused (policy, check-required, no CA …).
        DialError: the server could not be reached.
    """
    private, public = _new_key()
    deadline = time.monotonic() + timeout
    with connect_control(state, "client", timeout=timeout) as client:
        if client.welcome is None or m.CAP_SSHCERT not in client.welcome.caps:
            raise CertRefused("no-ssh-ca", "the server does not issue SSH certificates")
        client.send(m.SshCertReq(req_id=1, dst=dst, user=account, public_key=public))
        while True:
            msg = client.recv(deadline)
            if isinstance(msg, m.SshCert) and msg.req_id == 1:
                break
    if not msg.cert:
        raise CertRefused(msg.code, msg.reason, msg.rule)
    key_path, cert_path = key_paths(state.dir, dst, account)
    key_path.parent.mkdir(mode=0o700, exist_ok=True)
    write_private(key_path, private)
    write_private(cert_path, (msg.cert + "\n").encode())
    write_public(Path(f"{key_path}.pub"), (public + "\n").encode())
    return CertFiles(key_path, cert_path, msg.principals, msg.valid_before, msg.rule)


def ssh_cert_options(files: CertFiles) -> list[tuple[str, str]]:
    """The ssh options that make it log in with this key and certificate."""
    return [("IdentityFile", str(files.key)), ("CertificateFile", str(files.cert))]


# -- login checks ----------------------------------------------------------------


def login(
    state: NodeState,
    show: Callable[[m.LoginState], None],
    *,
    wait: float = 600.0,
    poll: float = LOGIN_POLL,
    sleep: Callable[[float], None] = time.sleep,
) -> m.LoginState:
    """Start a login check, show its code, and wait (up to ``wait`` s) for the answer.

    Polling is this command's job (a person is approving it elsewhere): it asks
    the server once per ``poll`` seconds on one connection.
    """
    deadline = time.monotonic() + wait
    with connect_control(state, "client", timeout=REQUEST_TIMEOUT) as client:
        if client.welcome is None or m.CAP_SSHCERT not in client.welcome.caps:
            return m.LoginState(state="refused", message="the server has no login checks")
        st = _ask(client, m.Login(action="start"))
        show(st)
        code = st.code
        while st.state == "pending" and time.monotonic() < deadline:
            sleep(poll)
            st = _ask(client, m.Login(action="poll", code=code))
        if st.state == "pending":
            return m.LoginState(state="expired", code=code, message="nobody approved it in time")
        return st


def approve_from_device(state: NodeState, code: str) -> m.LoginState:
    """Approve another device's login ``code`` from this (approved) device."""
    with connect_control(state, "client", timeout=REQUEST_TIMEOUT) as client:
        return _ask(client, m.Login(action="approve", code=code.strip().upper()))


def _ask(client: ControlClient, msg: m.Login) -> m.LoginState:
    client.send(msg)
    deadline = time.monotonic() + REQUEST_TIMEOUT
    while True:
        reply = client.recv(deadline)
        if isinstance(reply, m.LoginState):
            return reply


__all__ = [
    "CertFiles",
    "CertRefused",
    "DialError",
    "approve_from_device",
    "fetch_certificate",
    "key_paths",
    "login",
    "ssh_cert_options",
]

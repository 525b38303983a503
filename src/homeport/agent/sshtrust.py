"""The host side of keyless SSH: make the local sshd trust the server's SSH user CA.

The agent learns the CA public key from WELCOME (``ssh_ca``; the coordinator is
trusted for identity anyway) and keeps it in the state directory
(:data:`CA_STATE_FILE`). ``homeport ssh-trust`` then installs the trust:

* as root: an sshd drop-in (:data:`DROPIN`) with ``TrustedUserCAKeys`` naming a
  copy of the key in ``/etc/ssh``. Principals are checked the way sshd does by
  default with ``TrustedUserCAKeys`` and no ``AuthorizedPrincipalsFile``: a
  certificate logs in as an account only if it names that account. That *is*
  "the principals of each local user are its own name", without a file per user,
  and without overriding an ``AuthorizedPrincipalsFile`` the admin set for
  another CA (single-valued sshd keywords: the first one read wins);
* without root: one ``cert-authority,principals="USER"`` line in the user's own
  ``~/.ssh/authorized_keys`` (only certificates naming that user), marked with
  :data:`MARK`; existing lines are never changed, our own line is replaced when
  the CA key changes, and running it twice changes nothing.

Rendering and merging are pure functions; :func:`install_root` and
:func:`install_user` do the file work (atomic writes, modes 0644/0600).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from homeport.crypto.sshca import valid_account
from homeport.node.files import atomic_write
from homeport.wire.errors import WireError
from homeport.wire.hostkey import ED25519, parse_host_key_untrusted

#: Where the agent keeps the CA key it learnt from the server (state directory).
CA_STATE_FILE = "ssh_user_ca.pub"
#: The comment that marks homeport's own lines (authorized_keys, the CA copy).
MARK = "homeport-ssh-ca"
#: sshd drop-in and the CA key copy it names (root install).
DROPIN = Path("/etc/ssh/sshd_config.d/50-homeport.conf")
CA_COPY = Path("/etc/ssh/homeport_user_ca.pub")
#: Largest authorized_keys file merged (bigger files are left alone).
MAX_AUTHORIZED_KEYS = 1 << 20


class TrustError(Exception):
    """The trust could not be installed (with a sentence saying why)."""


def ca_line_untrusted(text: str) -> str:
    """The CA key as ``ssh-ed25519 BASE64`` (strictly checked: it goes into sshd's files)."""
    try:
        key = parse_host_key_untrusted(text.strip())
    except WireError as exc:
        raise TrustError(f"not an SSH CA key: {exc}") from None
    if key.key_type != ED25519:
        raise TrustError("the homeport SSH CA key is Ed25519")
    return key.line()


def authorized_keys_line(ca_line: str, account: str) -> str:
    """``cert-authority,principals="ACCOUNT" ssh-ed25519 … homeport-ssh-ca``."""
    if not valid_account(account):
        raise TrustError(f"{account!r} is not a local account name")
    return f'cert-authority,principals="{account}" {ca_line_untrusted(ca_line)} {MARK}'


def merge_authorized_keys(text: str, line: str) -> str | None:
    """``text`` with our line added (or our old line replaced); None if already there."""
    lines = text.splitlines()
    if line in lines:
        return None
    kept = [ln for ln in lines if not ln.rstrip().endswith(" " + MARK)]
    return "\n".join([*kept, line]) + "\n"


def sshd_dropin(ca_copy: Path = CA_COPY) -> str:
    """The sshd drop-in (root install)."""
    return (
        "# homeport: trust short-lived SSH user certificates from the homeport server's CA.\n"
        "# A certificate logs in as an account only if it names it (sshd's default\n"
        "# principal check). Remove this file and reload sshd to stop.\n"
        f"TrustedUserCAKeys {ca_copy}\n"
    )


def install_root(ca_line: str, dropin: Path = DROPIN, ca_copy: Path = CA_COPY) -> list[Path]:
    """Write the CA copy and the drop-in; return the files changed (reload sshd after)."""
    changed: list[Path] = []
    for path, data in (
        (ca_copy, f"{ca_line_untrusted(ca_line)} {MARK}\n"),
        (dropin, sshd_dropin(ca_copy)),
    ):
        if path.exists() and path.read_text() == data:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data.encode(), mode=0o644)
        changed.append(path)
    return changed


def install_user(ca_line: str, account: str | None = None, home: Path | None = None) -> Path | None:
    """Add the ``cert-authority`` line to ``~/.ssh/authorized_keys``; None if it was there."""
    account = account or pwd.getpwuid(os.getuid()).pw_name
    home = home or Path(pwd.getpwnam(account).pw_dir)
    line = authorized_keys_line(ca_line, account)
    ssh_dir = home / ".ssh"
    path = ssh_dir / "authorized_keys"
    try:
        if path.stat().st_size > MAX_AUTHORIZED_KEYS:
            raise TrustError(f"{path} is larger than {MAX_AUTHORIZED_KEYS} bytes; not touched")
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise TrustError(f"cannot read {path}: {exc}") from None
    merged = merge_authorized_keys(text, line)
    if merged is None:
        return None
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    atomic_write(path, merged.encode(), mode=0o600)
    return path

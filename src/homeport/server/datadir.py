"""The server's data directory: its CA, its TLS identity, and the state of a stopped server.

Kept apart from :mod:`homeport.server.app` (which runs the server) so that
:mod:`homeport.server.admin` can open the state of a server that is not
running without importing the module that starts one: ``app`` imports
``admin`` to serve ``admin.sock``, and nothing here imports either of them.

Files (see docs/architecture.md): ``ca.key`` (0600) and ``ca.crt``, the
network CA; ``server.key`` (0600) and ``server.crt`` unless ``--tls-cert`` /
``--tls-key`` name others; ``server.pin``, the SHA-256 pin nodes check;
``policy.hujson`` (0600), the ACL policy, when one was set (``homeport policy
set``; it stays a file with PostgreSQL too, see docs/postgresql.md);
``database.url`` (0600), the ``--db`` URL the server last started with when it
is not the embedded SQLite, so admin commands and the next start use the same
database.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from homeport.crypto import identity
from homeport.crypto.tls import fingerprint
from homeport.node.files import atomic_write, safe_dir, write_private, write_public
from homeport.policy.acl import CompiledPolicy, PolicyError, compile_policy
from homeport.store.registry import Registry, database_url, open_registry

log = logging.getLogger("homeport.server")

#: The ACL policy's file in the data directory (absent: no policy, the documented default).
POLICY_FILE = "policy.hujson"
#: The ``--db`` URL a server in this data directory uses (absent: SQLite in the directory).
DB_URL_FILE = "database.url"


def recorded_db_url(data_dir: Path) -> str | None:
    """The database URL recorded by the last ``homeport server --db URL`` (None: SQLite here)."""
    try:
        text = (data_dir / DB_URL_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def resolve_db_url(data_dir: Path, db_url: str | None) -> str:
    """Which database a server in ``data_dir`` uses: ``--db``, else the recorded one, else
    the embedded SQLite file. Why remember: admin commands run while the server is stopped
    (and a restart without ``--db``) must not open an empty SQLite file next to the real
    PostgreSQL state."""
    return db_url or recorded_db_url(data_dir) or database_url(str(data_dir))


def remember_db_url(data_dir: Path, db_url: str | None) -> None:
    """Record an explicit ``--db`` (0600: it may carry a password); the embedded default
    (or the SQLite file in ``data_dir`` named explicitly) clears the record."""
    if db_url is None:
        return
    if db_url in (database_url(str(data_dir)), f"sqlite:///{data_dir / 'homeport.db'}"):
        (data_dir / DB_URL_FILE).unlink(missing_ok=True)
        return
    if recorded_db_url(data_dir) != db_url:
        write_private(data_dir / DB_URL_FILE, (db_url + "\n").encode("utf-8"))


class PolicyFileError(Exception):
    """``policy.hujson`` in the data directory cannot be used: the server must not start."""


def load_policy(data_dir: Path) -> CompiledPolicy | None:
    """The policy in force at start (None: no policy file).

    Raises:
        PolicyFileError: the file is unreadable or invalid, with every problem
            located (``policy.hujson:12:5: acls[2].dst[0]: …``). A server that
            silently ran without its policy would grant what the admin denied.
    """
    path = data_dir / POLICY_FILE
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"cannot read {path}: {exc}") from None
    try:
        return compile_policy(text)
    except PolicyError as exc:
        lines = "\n".join(f"  {path}:{p}" for p in exc.problems)
        raise PolicyFileError(
            f"{path} is not a valid policy:\n{lines}\n"
            f"fix it, or move it away to run without a policy"
        ) from None


def save_policy(data_dir: Path, text: str) -> None:
    """Store ``text`` (already compiled successfully) as the policy: atomic, 0600."""
    atomic_write(data_dir / POLICY_FILE, text.encode("utf-8"))


def remove_policy(data_dir: Path) -> bool:
    """Stop storing a policy (back to the default); whether one was stored."""
    try:
        (data_dir / POLICY_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def read_policy_text(data_dir: Path) -> str | None:
    """The stored policy text, or None when no policy is set."""
    try:
        return (data_dir / POLICY_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """The server's identity files inside (or next to) its data directory."""

    data_dir: Path
    ca: identity.KeyPair
    ca_cert: Path
    tls_cert: Path
    tls_key: Path
    pin: str


def ensure_dir(data_dir: Path) -> None:
    """Create the data directory (0700) or check an existing one (:func:`safe_dir`: refused
    when another user owns it or group/others may write it; never chmodded then)."""
    safe_dir(data_dir)


def prepare_data_dir(
    data_dir: Path, tls_cert: Path | None = None, tls_key: Path | None = None
) -> ServerFiles:
    """Create (first start) or load the CA and the server certificate; write ``server.pin``."""
    ensure_dir(data_dir)
    ca_key, ca_crt = data_dir / "ca.key", data_dir / "ca.crt"
    if not ca_key.exists():
        ca = identity.create_ca()
        write_private(ca_key, ca.key_pem)
        write_public(ca_crt, ca.cert_pem)
        log.info("created network CA in %s", data_dir)
    ca = identity.KeyPair(key_pem=ca_key.read_bytes(), cert_pem=ca_crt.read_bytes())
    if tls_cert is None or tls_key is None:
        tls_cert, tls_key = data_dir / "server.crt", data_dir / "server.key"
        if not tls_key.exists():
            server = identity.create_server_identity(ca)
            write_private(tls_key, server.key_pem)
            write_public(tls_cert, server.cert_pem)
    pin = fingerprint(identity.cert_der_from_pem(tls_cert.read_bytes()))
    write_public(data_dir / "server.pin", (pin + "\n").encode())
    return ServerFiles(data_dir, ca, ca_crt, tls_cert, tls_key, pin)


def load_server_files(data_dir: Path) -> ServerFiles:
    """Load an existing data directory without creating anything (offline admin)."""
    ca_key, ca_crt = data_dir / "ca.key", data_dir / "ca.crt"
    ca = identity.KeyPair(key_pem=ca_key.read_bytes(), cert_pem=ca_crt.read_bytes())
    tls_cert, tls_key = data_dir / "server.crt", data_dir / "server.key"
    pin_file = data_dir / "server.pin"
    if pin_file.exists():
        pin = pin_file.read_text().strip()
    else:
        pin = fingerprint(identity.cert_der_from_pem(tls_cert.read_bytes()))
    return ServerFiles(data_dir, ca, ca_crt, tls_cert, tls_key, pin)


def has_server_data(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds a server (its CA): false on every other host."""
    return (data_dir / "ca.key").is_file() and (data_dir / "ca.crt").is_file()


def open_offline_registry(data_dir: Path, *, db_url: str | None = None) -> Registry:
    """The records of a server that is not running (admin commands on the server host)."""
    files = load_server_files(data_dir)
    return open_registry(resolve_db_url(data_dir, db_url), server_pin=files.pin)

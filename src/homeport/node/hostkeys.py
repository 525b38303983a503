"""The sshd host keys an agent reports to the server (and peers pin via known_hosts).

Why ``ssh-keyscan`` against the ssh service's target first: that is what the sshd
clients will reach really serves (it may run in a container, on another port,
or with keys outside /etc/ssh). The ``/etc/ssh/ssh_host_*_key.pub`` files are
the fallback when no sshd answers right now (the agent re-collects on every
reconnect).
"""

from __future__ import annotations

import glob
import logging
import subprocess
from collections.abc import Iterable

from homeport.wire.hostkey import sanitize_host_keys

log = logging.getLogger(__name__)

#: ssh-keyscan's own per-host timeout (seconds) and our hard cap on the process.
KEYSCAN_TIMEOUT = 3
KEYSCAN_PROCESS_TIMEOUT = 10.0
HOST_KEY_GLOB = "/etc/ssh/ssh_host_*_key.pub"


def parse_keys(lines: Iterable[str], *, with_host: bool) -> tuple[str, ...]:
    """Keep valid ``type base64`` keys, dropping comments, junk and duplicates.

    ``with_host``: lines are ssh-keyscan output (``host type key``).
    """
    keys: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if with_host:
            parts = parts[1:]
        keys.append(" ".join(parts[:2]))
    return sanitize_host_keys(keys)


def keyscan(host: str, port: int) -> tuple[str, ...]:
    """Host keys the sshd at ``host:port`` serves (empty when it does not answer)."""
    try:
        proc = subprocess.run(
            ["ssh-keyscan", "-T", str(KEYSCAN_TIMEOUT), "-p", str(port), host],
            capture_output=True,
            text=True,
            timeout=KEYSCAN_PROCESS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("ssh-keyscan %s:%d failed: %s", host, port, exc)
        return ()
    return parse_keys(proc.stdout.splitlines(), with_host=True)


def from_files(pattern: str = HOST_KEY_GLOB) -> tuple[str, ...]:
    """Host keys from the local sshd's public key files."""
    lines: list[str] = []
    for path in sorted(glob.glob(pattern)):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                lines.append(f.readline())
        except OSError:
            continue
    return parse_keys(lines, with_host=False)


def collect(target: tuple[str, int] | None, *, pattern: str = HOST_KEY_GLOB) -> tuple[str, ...]:
    """Host keys for the ssh service whose local target is ``target`` (None: not exposed)."""
    if target is None:
        return ()
    keys = keyscan(*target)
    if keys:
        return keys
    keys = from_files(pattern)
    if keys:
        log.info("sshd at %s:%d did not answer ssh-keyscan; using %s", *target, pattern)
    else:
        log.warning("no sshd host keys found for %s:%d; peers cannot pin them", *target)
    return keys

"""The one way homeport writes a file that must never be seen half-written.

Why one writer: node state (``node.json``, ``known_hosts/<peer>``), keys
(``node.key``, the server's ``ca.key``/``server.key``) and certificates are all
replaced while other processes may read them (``ssh`` reads known_hosts while
``nc`` rewrites it). Each write therefore goes to a fresh temporary file in the
same directory and is renamed over the target with :func:`os.replace`, which is
atomic on POSIX: a reader sees the old file or the new one, never a mix.

The temporary file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a name
planted in advance, e.g. a symlink to ``~/.ssh/authorized_keys``, makes the write
fail instead of following it), gets its final mode with ``fchmod`` before any
byte is written (a secret is never readable by others, whatever the umask), and
is ``fsync``-ed before the rename so a crash cannot leave an empty key file.

Standard library only, and only ``os``: ``homeport nc`` writes known_hosts on
its hot start-up path.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Mode of files only the owner may read (private keys, node state).
PRIVATE_MODE = 0o600
#: Mode of files anyone may read (certificates, systemd units).
PUBLIC_MODE = 0o644
#: Attempts at a fresh temporary name before giving up (a name clash is ~impossible).
MAX_TEMP_ATTEMPTS = 8


def _open_temp(path: Path, mode: int) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(MAX_TEMP_ATTEMPTS):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def atomic_write(path: Path, data: bytes, *, mode: int = PRIVATE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically; the file ends up with exactly ``mode``.

    Raises:
        OSError: the directory is missing or not writable, the disk is full, …
        (the temporary file is removed; ``path`` is left as it was).
    """
    fd, tmp = _open_temp(path, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it, never widened it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:  # noqa: SIM105 - contextlib is one more import on nc's hot path
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (a private key, node state) readable by the owner only (0600)."""
    atomic_write(path, data, mode=PRIVATE_MODE)


def write_public(path: Path, data: bytes) -> None:
    """Write a non-secret file (certificate, CA, unit file) readable by all (0644)."""
    atomic_write(path, data, mode=PUBLIC_MODE)

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

Directories (:func:`safe_dir`): a file is only as safe as the directory it is
renamed into. A directory owned by another user, or writable by group or others
(``/tmp``, a shared ``/srv``), lets someone else plant or swap names in it, so it
is refused, never chmodded (chmodding ``/tmp`` to 0700 would break the machine);
our own directory that others may merely read is tightened to 0700.

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


#: Mode of the directories homeport keeps keys and state in.
DIR_MODE = 0o700


class UnsafeDirectory(PermissionError):
    """A data/state directory another user could write into or owns (one line for the user)."""


def safe_dir(path: Path) -> Path:
    """Create ``path`` (0700, parents as needed) or check an existing one; returns ``path``.

    Raises:
        UnsafeDirectory: ``path`` is owned by another user or writable by group/others
            (nothing is changed), or is not a directory.
    """
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = os.stat(path)
    uid = os.geteuid()
    if st.st_uid != uid:
        raise UnsafeDirectory(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid}): refusing to "
            "keep keys there; use a directory of your own"
        )
    if st.st_mode & 0o022:
        raise UnsafeDirectory(
            f"{path} is writable by {'others' if st.st_mode & 0o002 else 'its group'} "
            f"(mode {st.st_mode & 0o7777:04o}): refusing to keep keys there; "
            "use a directory of your own (it is created 0700)"
        )
    if st.st_mode & 0o077:  # ours, only readable by others: tightening is safe
        os.chmod(path, DIR_MODE)
    return path


def create_private(path: Path) -> None:
    """Create an empty 0600 file at ``path`` if there is none (never through a symlink)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(path, flags, PRIVATE_MODE))
    except FileExistsError:
        if os.path.islink(path):
            raise UnsafeDirectory(f"{path} is a symlink: refusing to follow it") from None


def open_append(path: Path, mode: int = PRIVATE_MODE) -> int:
    """Open ``path`` for appending (an fd), creating it with ``mode``; never through a symlink,
    and an existing file with a wider mode is narrowed to ``mode``."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        if os.fstat(fd).st_mode & 0o777 != mode:
            os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        raise
    return fd


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

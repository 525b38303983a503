"""Local unix-socket servers: safe binding, stale sockets, and who may connect.

Two homeport processes serve JSON lines on a unix socket: the agent's local API
(``<state>/agent.sock``, :mod:`homeport.io.localapi`) and the server's admin
socket (``<data>/admin.sock``, :mod:`homeport.server.admin`). Whoever can talk
to either acts with the node's identity or as the network's admin, so both
share these rules, written once here:

* **Bind** with the socket file 0600 from the first instant: the socket's mode
  is set with ``fchmod`` before ``bind`` (Linux creates the file with it), so
  there is no window with wider access and no process-wide ``umask`` change
  racing other threads; the directory around it is 0700 as well.
* **Stale sockets**: a leftover file from a crashed process is removed only
  when nothing accepts on it (``ECONNREFUSED``); a live listener means another
  process serves this directory (``EADDRINUSE``); a path that is not a socket is
  never deleted (``EEXIST``). On close a server removes the file only if it is
  still the inode it bound (a successor may have replaced it).
* **Long paths**: ``sun_path`` holds 108 bytes; a longer path is reached
  through ``/proc/self/fd/<dirfd>/<name>``.
* **Peers**: every accepted connection's peer uid is read with ``SO_PEERCRED``
  and must be in the server's allowed set. A peer whose uid cannot be read is
  **refused**, never admitted (:func:`peer_refusal`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

#: Longest path (bytes) bound or connected directly; sun_path is 108 bytes on Linux.
SUN_PATH_MAX = 100
#: Seconds to wait when probing whether a leftover socket file still has a listener.
STALE_PROBE_TIMEOUT = 1.0
#: The mode of every socket file homeport serves on.
SOCKET_MODE = 0o600

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


@contextlib.contextmanager
def addressable(path: Path) -> Iterator[str]:
    """A name for ``bind``/``connect`` of ``path``, even when it exceeds ``sun_path``."""
    if len(os.fsencode(str(path))) < SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process that connected ``conn`` (Linux ``SO_PEERCRED``).

    Raises:
        OSError: the credentials cannot be read (not a unix socket, no
        ``SO_PEERCRED`` on this platform, the peer is gone).
    """
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        raise OSError(errno.ENOTSUP, "no SO_PEERCRED on this platform")
    raw = conn.getsockopt(socket.SOL_SOCKET, opt, _UCRED.size)
    if len(raw) != _UCRED.size:
        raise OSError(errno.EPROTO, f"SO_PEERCRED returned {len(raw)} bytes")
    _pid, uid, _gid = _UCRED.unpack(raw)
    if uid < 0:  # (uid_t)-1: the kernel has no credentials for this peer
        raise OSError(errno.ENOTCONN, "the peer has no credentials")
    return int(uid)


def decide_peer(uid: int | None, allowed: Collection[int]) -> str | None:
    """Why a peer with ``uid`` (None: unreadable) may not connect, or None to admit it. Pure."""
    if uid is None:
        return "refused a peer whose uid cannot be read"
    if uid not in allowed:
        return f"refused a connection from uid {uid}"
    return None


def peer_refusal(conn: socket.socket, allowed: Collection[int]) -> str | None:
    """:func:`decide_peer` for the peer of ``conn``: None admits, a reason refuses."""
    try:
        uid: int | None = peer_uid(conn)
    except OSError:
        uid = None
    return decide_peer(uid, allowed)


def remove_stale(path: Path) -> None:
    """Remove a socket file nothing listens on; refuse to take over a live one.

    Raises:
        OSError: ``EADDRINUSE`` when a process accepts on ``path``, or ``EEXIST``
        when ``path`` is not a socket (never delete what we did not make).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(STALE_PROBE_TIMEOUT)
        with addressable(path) as name:
            probe.connect(name)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError:
        pass  # timeout (a live but busy listener) or EACCES: do not steal it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")


@dataclass(frozen=True, slots=True)
class UnixListener:
    """A listening unix socket and the inode of the file it bound."""

    sock: socket.socket
    path: Path
    ino: int

    def close(self) -> None:
        """Close the socket and remove its file if it is still the one we bound."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.ino:
                os.unlink(self.path)
        self.sock.close()


def bind_listener(path: Path, backlog: int) -> UnixListener:
    """Bind and listen on ``path`` (mode 0600 from the start), replacing a stale socket.

    Blocks up to :data:`STALE_PROBE_TIMEOUT` probing a leftover file.

    Raises:
        OSError: ``EADDRINUSE`` (a live process serves ``path``), ``EEXIST`` (not a
        socket), permissions, or a missing directory.
    """
    remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the file with the socket inode's mode (less the umask).
        os.fchmod(sock.fileno(), SOCKET_MODE)
        with addressable(path) as name:
            sock.bind(name)
        st = os.lstat(path)
        if stat.S_IMODE(st.st_mode) & ~SOCKET_MODE:
            os.chmod(path, SOCKET_MODE)  # a kernel that ignored fchmod; dir is 0700 anyway
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return UnixListener(sock, path, st.st_ino)


def connect(path: Path, timeout: float) -> socket.socket:
    """A blocking client connection to ``path`` with ``timeout`` on every operation.

    Raises:
        OSError: ``FileNotFoundError``/``ConnectionRefusedError`` (nobody serves
        ``path``), ``PermissionError``, or a timeout.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        with addressable(path) as name:
            sock.connect(name)
    except BaseException:
        sock.close()
        raise
    return sock

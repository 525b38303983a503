"""The direct port and TCP hole punching (simultaneous open), as blocking primitives.

Every socket of a node's direct path is bound to the same local port P (the
*direct port*): the listener, the discovery probes and every punch attempt.
That way the mapping a NAT created for discovery is the one a peer dials, and a
NAT that maps endpoint-independently keeps ``P -> public:port`` for every
destination. Two nodes that send SYNs to each other's mapped address at about
the same time each open a hole in their own NAT for the other's SYN; the kernel
turns the crossing SYNs into one connection (TCP simultaneous open, RFC 793
§3.4; RFC 5382 REQ-2 asks NATs to allow it, Linux conntrack does).

:func:`punch` dials every candidate from P with a small stagger while also
accepting on P's listener; the first connection to complete wins and every
other attempt is closed. Who is on the other end is *not* checked here: the
caller runs mutual TLS with the pinned peer fingerprint on the winner and drops
it if that fails, which is why accepting anything on P is safe.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from homeport.proto.natcheck import Candidate, path_kind

#: Listen backlog of the direct port (punches and LAN peers; not a server).
LISTEN_BACKLOG = 16
#: Seconds between starting the dials of two successive candidates.
DEFAULT_STAGGER = 0.02
#: Seconds to wait before dialling a candidate again after its dial failed
#: (a refused or unreachable dial can turn into a hole once the peer's SYN went out).
REDIAL_AFTER = 0.25
#: Default bound of one punch (the design's 5 s "punch timed out").
DEFAULT_DEADLINE = 5.0
#: Most dial sockets open at once in one punch (candidates ≤ 16).
MAX_ATTEMPTS = 16

#: Dial errors that retrying cannot fix (no route of ours, tuple in use): no redial.
_FATAL_DIAL_ERRORS = {
    errno.EADDRINUSE,
    errno.EADDRNOTAVAIL,
    errno.EAFNOSUPPORT,
    errno.ENETUNREACH,
}


def _reuse(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


class DirectPort:
    """Local TCP port P: a listener plus a factory of sockets bound to P.

    ``port`` 0 picks an ephemeral port (kept for the life of the object);
    ``host`` "" binds all IPv4 addresses.
    """

    def __init__(self, port: int = 0, host: str = "") -> None:
        self.host = host
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            _reuse(listener)
            listener.bind((host, port))
            listener.listen(LISTEN_BACKLOG)
        except BaseException:
            listener.close()
            raise
        self.listener = listener
        self.port: int = listener.getsockname()[1]

    def bound_socket(self) -> socket.socket:
        """A fresh TCP socket bound to ``(host, P)``, not yet connected."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            _reuse(sock)
            sock.bind((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def connect_from(self, addr: tuple[str, int], timeout: float) -> socket.socket:
        """A blocking connect from P to ``addr``; raises OSError (TimeoutError) on failure."""
        sock = self.bound_socket()
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> DirectPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PunchSuccess:
    """The connection that won: how it came about and what kind of path it is."""

    sock: socket.socket
    kind: str  # "local" | "mapped" | "direct" (a public candidate or an accepted connection)
    endpoint: str  # the peer's address as this side sees it, ``ip:port``
    via: str  # "connect" | "accept"
    candidate: Candidate | None  # the candidate dialled (None when accepted)
    elapsed: float  # seconds from the start of the punch


@dataclass(frozen=True)
class PunchFailure:
    code: str  # "punch-timeout" | "no-candidates"
    reason: str
    errors: tuple[str, ...]  # last error per candidate, for logs


def ended_quietly(conn: socket.socket) -> bool:
    """Whether an accepted ``conn`` already ended without a byte; then it is closed.

    Why: the server's reachability probe of a forwarded direct port (one connect, nothing
    sent, closed) waits in the listener's backlog until the next punch accepts it; it must
    not win that punch. A real peer's connection is never at EOF before its ClientHello.
    """
    try:
        data = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        data = b""  # reset: as dead as an EOF
    if data:
        return False
    conn.close()
    return True


def _kind_of(cand: Candidate) -> str:
    return "direct" if cand.kind == "public" else cand.kind


def punch(
    port: DirectPort,
    candidates: Sequence[Candidate],
    deadline: float = DEFAULT_DEADLINE,
    *,
    peer_local: Sequence[Candidate] = (),
    stagger: float = DEFAULT_STAGGER,
    accept: bool = True,
) -> PunchSuccess | PunchFailure:
    """Dial every candidate from P (in order, ``stagger`` apart) and accept on P; first wins.

    A simultaneous open yields *one* connection both sides see as theirs. When two
    different connections complete at once (A's dial accepted by B while B's dial is
    accepted by A, e.g. both public), each side may keep a different one; the caller
    settles that (e.g. the TLS client's choice wins) -- the lab matrix never saw it.

    ``deadline`` is in seconds. ``peer_local`` (defaults to ``candidates``) tells an
    accepted connection from a LAN peer (``local``) from one through NATs
    (``direct``). The returned socket is blocking; every other attempt is closed.
    """
    start = time.monotonic()
    end = start + deadline
    cands = list(candidates)[:MAX_ATTEMPTS]
    if not cands and not accept:
        return PunchFailure("no-candidates", "the peer offered no candidates", ())
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, Candidate] = {}
    next_dial = [start + i * stagger for i in range(len(cands))]
    errors: dict[str, str] = {}
    local_peers = list(peer_local) or cands

    def close_all() -> None:
        for sock in list(pending):
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
            sock.close()
        pending.clear()
        sel.close()

    if accept:
        port.listener.setblocking(False)
        sel.register(port.listener, selectors.EVENT_READ, None)
    try:
        while True:
            now = time.monotonic()
            for i, cand in enumerate(cands):
                if next_dial[i] <= now:
                    next_dial[i] = float("inf")
                    try:
                        sock = port.bound_socket()
                    except OSError as exc:
                        errors[cand.addr] = errno.errorcode.get(exc.errno or 0, str(exc))
                        continue
                    sock.setblocking(False)
                    try:
                        rc = sock.connect_ex((cand.host, cand.port))
                    except OSError as exc:  # e.g. an IPv6 candidate for our IPv4 port
                        errors[cand.addr] = str(exc)
                        sock.close()
                        continue
                    if rc not in (0, errno.EINPROGRESS):
                        errors[cand.addr] = errno.errorcode.get(rc, str(rc))
                        sock.close()
                        if rc not in _FATAL_DIAL_ERRORS:
                            next_dial[i] = now + REDIAL_AFTER
                        continue
                    pending[sock] = cand
                    sel.register(sock, selectors.EVENT_WRITE, i)
            if now >= end:
                reason = "punch timed out"
                if errors:
                    reason += " (" + ", ".join(f"{a}: {e}" for a, e in errors.items()) + ")"
                return PunchFailure(
                    "punch-timeout", reason, tuple(f"{a}: {e}" for a, e in errors.items())
                )
            wake = min([end, *(t for t in next_dial if t != float("inf"))])
            for key, _mask in sel.select(max(0.0, wake - now)):
                if key.fileobj is port.listener:
                    try:
                        conn, peer = port.listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    if ended_quietly(conn):
                        continue
                    conn.setblocking(True)
                    return PunchSuccess(
                        conn,
                        path_kind(peer[0], local_peers),
                        f"{peer[0]}:{peer[1]}",
                        "accept",
                        None,
                        time.monotonic() - start,
                    )
                dial = key.fileobj
                assert isinstance(dial, socket.socket)
                sock = dial
                i = key.data
                cand = pending.pop(sock)
                sel.unregister(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err == 0:
                    sock.setblocking(True)
                    return PunchSuccess(
                        sock, _kind_of(cand), cand.addr, "connect", cand, time.monotonic() - start
                    )
                errors[cand.addr] = errno.errorcode.get(err, str(err))
                sock.close()
                if err not in _FATAL_DIAL_ERRORS:
                    next_dial[i] = time.monotonic() + REDIAL_AFTER
    finally:
        close_all()
        if accept:
            port.listener.setblocking(True)

"""The agent's local API: ``<state>/agent.sock``, the warm path for ``homeport nc``.

Why it exists: ``ssh`` starts its ProxyCommand for every connection, and a cold
``homeport nc`` pays for importing ``ssl``, building a control TLS session and
loading its identity before the first byte moves. The agent (``homeport up``)
already holds all of that, warm: a READY control connection, the node's TLS
contexts and an event loop. So nc asks it, over a unix socket, to open the
stream, and gets back a connected file descriptor that carries the stream's
plain bytes; the agent keeps the end-to-end TLS and pumps in a worker thread.

Protocol (version 1), one request per connection:

* request: one line of JSON, at most :data:`MAX_REQUEST` bytes with its ``\\n``::

      {"op": "open", "dst": "labpc", "service": "22", "timeout": 10}

* reply: one line of JSON, at most :data:`MAX_REPLY` bytes. On success it comes
  with exactly one file descriptor (``SCM_RIGHTS``), an ``AF_UNIX`` stream
  socket whose peer the agent pumps to and from the stream::

      {"ok": true, "peer": "labpc", "port": 22}
      {"ok": false, "code": "offline", "message": "labpc is offline", "fallback": false}

  ``fallback: true`` means "the agent cannot help right now" (not connected to
  the server, too many streams): nc then dials by itself. Any other failure is
  the answer nc would have got itself, and nc prints it.
* end: when the stream is over the agent writes one more line on the same
  connection, ``{"end": "clean", "ok": true, "reason": "closed"}`` (``end`` is a
  :class:`~homeport.io.pump.PumpEnd` value), so a client that still listens (nc
  pumping stdin/stdout) can tell a clean end from an integrity failure. A client
  that handed the descriptor on (ssh's ``ProxyUseFdpass``) has left; the write
  then fails quietly.
* ``"ack": true`` in an open request asks the agent to send ``{"accepted":true}``
  at once when its event loop has admitted the open, before the stream is set up:
  nc waits at most 1 s for that line, so a hung agent costs at most 1 s before nc
  dials by itself (the reply proper can take as long as the stream setup).
* ``{"op": "reload"}`` (``homeport set``): the agent re-reads the services saved in
  node.json, announces them and answers ``{"ok": true, "services": [...]}``; an
  agent that cannot reload answers ``unknown-op`` and ``set`` says to restart it.

Security (shared with the admin socket, :mod:`homeport.io.unixsock`): the socket
file is created 0600 inside the state directory
(0700), and every connection's peer uid (``SO_PEERCRED``) must equal the
agent's own, because whoever can talk to this socket can open streams with this
node's identity. Requests are untrusted bytes: bounded, parsed strictly, and a
malformed one gets an error reply and a close, never an exception that reaches
the accept loop.

The client side lives in :mod:`homeport.client.nc`, written against ``_socket``
and ``_json`` because it runs on every ``ssh`` and must not import this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homeport.errors import CodedError
from homeport.io import unixsock
from homeport.wire import names

log = logging.getLogger("homeport.agent.localapi")

#: File name of the socket inside the state directory.
SOCKET_NAME = "agent.sock"
#: Longest request line we read, newline included (a real one is ~70 bytes).
MAX_REQUEST = 4 * 1024
#: Longest reply line a client must accept (error messages are cut to fit).
MAX_REPLY = 4 * 1024
#: Seconds a connected client has to send its request line.
REQUEST_TIMEOUT = 5.0
#: Seconds a reply may block on a client that does not read.
REPLY_TIMEOUT = 5.0
#: Local API connections being served at once (each is a thread; a stream's
#: thread also counts against the agent's stream limit).
MAX_CONNECTIONS = 512
#: Stream setup timeout bounds a request may ask for (seconds).
MIN_TIMEOUT, MAX_TIMEOUT = 0.1, 3600.0
#: Longest error message we put in a reply.
MAX_MESSAGE = 1024
#: ``listen()`` backlog: bursts of ssh start-ups (e.g. a parallel rsync) queue here.
BACKLOG = 128


class RequestError(CodedError):
    """A request we refuse; ``code`` and ``message`` go into the error reply."""


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """``open``: a stream to ``dst``'s ``service`` (a port number or a service name)."""

    dst: str
    service: str
    timeout: float | None = None
    ack: bool = False  # send ACCEPTED as soon as the open is admitted


@dataclass(frozen=True, slots=True)
class ReloadRequest:
    """``reload``: re-read this node's saved settings (``homeport set``)."""


#: Operations other than ``open``: questions about the agent's paths, answered with one
#: JSON line and no descriptor (``homeport status`` / ``ping`` / ``netcheck``).
QUERY_OPS = frozenset({"status", "ping", "netcheck", "drop-direct", "check"})
#: Longest query reply a client reads (a status of many peers is larger than an open's).
MAX_QUERY_REPLY = 1024 * 1024


@dataclass(frozen=True, slots=True)
class QueryRequest:
    """A query: ``op`` in :data:`QUERY_OPS`, ``dst`` (a peer name, or "") and ``timeout``."""

    op: str
    dst: str = ""
    timeout: float = 5.0


def socket_path(state_dir: Path) -> Path:
    """Where the agent of ``state_dir`` listens."""
    return state_dir / SOCKET_NAME


# -- requests and replies ------------------------------------------------------------


def _check_dst(dst: str) -> str:
    # dst becomes a file name under known_hosts/: the peer host name rule.
    problem = names.host_name_problem(dst)
    if problem is not None:
        raise RequestError("bad-request", problem)
    return dst


def _check_service(service: str) -> str:
    problem = names.service_ref_problem(service)
    if problem is not None:
        raise RequestError("bad-request", problem)
    return service


def parse_request(line: bytes) -> OpenRequest | ReloadRequest:
    """Parse one request line (untrusted bytes from a local client).

    Raises:
        RequestError: ``bad-request`` (too long, not JSON, missing or malformed
        fields) or ``unknown-op``.
    """
    if len(line) > MAX_REQUEST:
        raise RequestError("bad-request", f"request longer than {MAX_REQUEST} bytes")
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError("bad-request", f"request is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("bad-request", "request is not a JSON object")
    op = obj.get("op")
    if op == "reload":
        return ReloadRequest()
    if op != "open":
        raise RequestError("unknown-op", f"unknown op {str(op)[:32]!r}")
    dst, service, timeout = obj.get("dst"), obj.get("service"), obj.get("timeout")
    if not isinstance(dst, str) or not isinstance(service, str):
        raise RequestError("bad-request", "open needs string fields dst and service")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise RequestError("bad-request", "timeout must be a number")
        if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
            raise RequestError(
                "bad-request", f"timeout must be between {MIN_TIMEOUT} and {MAX_TIMEOUT:g} s"
            )
        timeout = float(timeout)
    return OpenRequest(_check_dst(dst), _check_service(service), timeout, obj.get("ack") is True)


#: The early line an ``ack`` request gets once the agent admitted the open.
ACCEPTED: dict[str, Any] = {"accepted": True}


def parse_any(line: bytes) -> OpenRequest | ReloadRequest | QueryRequest:
    """Parse an ``open`` (:func:`parse_request`) or a query (:data:`QUERY_OPS`).

    Raises:
        RequestError: as :func:`parse_request`.
    """
    if len(line) > MAX_REQUEST:
        raise RequestError("bad-request", f"request longer than {MAX_REQUEST} bytes")
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError("bad-request", f"request is not JSON: {exc}") from None
    if not isinstance(obj, dict) or obj.get("op") not in QUERY_OPS:
        return parse_request(line)
    dst = obj.get("dst", "")
    if not isinstance(dst, str):
        raise RequestError("bad-request", "dst must be a string")
    if dst:
        _check_dst(dst)
    timeout = obj.get("timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise RequestError("bad-request", "timeout must be a number")
    if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
        raise RequestError(
            "bad-request", f"timeout must be between {MIN_TIMEOUT} and {MAX_TIMEOUT:g} s"
        )
    return QueryRequest(str(obj["op"]), dst, float(timeout))


def query(state_dir: Path, op: str, dst: str = "", timeout: float = 5.0) -> dict[str, Any] | None:
    """Client side of a query: the agent's one-line answer, or None when no agent runs here.

    Raises:
        OSError: the agent went away or did not answer within ``timeout`` + 5 s.
        ValueError: the answer is not a JSON object of at most :data:`MAX_QUERY_REPLY` bytes.
    """
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.settimeout(timeout + 5.0)
        sock.sendall(encode({"op": op, "dst": dst, "timeout": timeout}))
        buf = bytearray()
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_QUERY_REPLY:
                raise ValueError(f"agent reply longer than {MAX_QUERY_REPLY} bytes")
    finally:
        sock.close()
    obj = json.loads(bytes(buf).split(b"\n", 1)[0].decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("agent reply is not a JSON object")
    return obj


def encode(obj: dict[str, Any]) -> bytes:
    """One reply line (compact JSON, ASCII only, newline-terminated)."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_reply(code: str, message: str, *, fallback: bool = False) -> dict[str, Any]:
    """An error reply; ``message`` is made one line and cut to :data:`MAX_MESSAGE`."""
    text = " ".join(message.split())[:MAX_MESSAGE]
    return {"ok": False, "code": code[:64], "message": text, "fallback": fallback}


def send_reply(conn: socket.socket, obj: dict[str, Any], fd: int | None = None) -> None:
    """Send one reply line, with ``fd`` attached when given (bounded by :data:`REPLY_TIMEOUT`).

    Raises:
        OSError: the client went away or did not read in time.
    """
    data = encode(obj)
    conn.settimeout(REPLY_TIMEOUT)
    if fd is None:
        conn.sendall(data)
        return
    sent = socket.send_fds(conn, [data], [fd])
    if sent < len(data):
        conn.sendall(data[sent:])


def read_request(conn: socket.socket, timeout: float = REQUEST_TIMEOUT) -> bytes:
    """Read one request line (without its newline).

    Raises:
        RequestError: too long, or the client closed or stalled before the newline.
    """
    conn.settimeout(timeout)
    buf = bytearray()
    while True:
        try:
            chunk = conn.recv(MAX_REQUEST + 1 - len(buf))
        except TimeoutError:
            raise RequestError("bad-request", f"no request line within {timeout:g}s") from None
        if not chunk:
            raise RequestError("bad-request", "connection closed before the request line ended")
        buf += chunk
        end = buf.find(b"\n")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > MAX_REQUEST:
            raise RequestError("bad-request", f"request longer than {MAX_REQUEST} bytes")


# -- server ------------------------------------------------------------------------


Handler = Callable[[socket.socket, OpenRequest], None]
#: ``reload``: returns the reply object (``{"ok": true, ...}`` or an error reply).
Reloader = Callable[[], dict[str, Any]]
#: Answers a query with one JSON object (runs in the connection's thread; may block).
QueryHandler = Callable[[QueryRequest], dict[str, Any]]


class LocalApiServer:
    """Accepts on ``<state>/agent.sock`` and runs ``handler(conn, request)`` per connection.

    One accept thread (``poll`` on the listener and a wake-up pipe, so
    :meth:`close` is prompt) and one thread per connection: the handler may block
    for the whole life of a stream. The connection is closed when the handler
    returns. Only connections from this process's uid get that far.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        reload: Reloader | None = None,
        query: QueryHandler | None = None,
    ) -> None:
        self.path = path
        self.handler = handler
        self.reload = reload
        self.query = query
        self._sock: socket.socket | None = None
        self._listener: unixsock.UnixListener | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = False

    def start(self) -> None:
        """Bind (0600, see :mod:`homeport.io.unixsock`) and start accepting.

        Raises:
            OSError: cannot bind (permissions, a missing directory), or another
            live agent already serves this state directory (``EADDRINUSE``).
        """
        listener = unixsock.bind_listener(self.path, BACKLOG)
        self._listener = listener
        self._sock = listener.sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept_loop, name="localapi", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and remove the socket file (if it is still ours)."""
        if self._closed:
            return
        self._closed = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:  # EMFILE and friends: keep serving, do not spin
                log.warning("local API: accept failed: %s", exc)
                poller.poll(100)
                continue
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        refusal = unixsock.peer_refusal(conn, (os.geteuid(),))
        if refusal is not None:
            log.warning("local API: %s", refusal)
            self._refuse(conn, "forbidden", f"the agent serves only uid {os.geteuid()}")
            return
        if not self._slots.acquire(blocking=False):
            self._refuse(conn, "busy", f"{MAX_CONNECTIONS} local connections already open")
            return
        try:
            threading.Thread(
                target=self._serve, args=(conn,), name="localapi-conn", daemon=True
            ).start()
        except RuntimeError:  # cannot start a thread: resource exhaustion
            self._slots.release()
            conn.close()

    def _reload(self, conn: socket.socket) -> None:
        if self.reload is None:
            reply = error_reply("unknown-op", "this agent cannot reload its settings")
        else:
            reply = self.reload()
        with contextlib.suppress(OSError):
            send_reply(conn, reply)

    @staticmethod
    def _refuse(conn: socket.socket, code: str, message: str) -> None:
        with conn:
            conn.setblocking(False)  # never let the accept thread wait on a client
            with contextlib.suppress(OSError):
                conn.send(encode(error_reply(code, message, fallback=code == "busy")))

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    req = parse_any(read_request(conn, REQUEST_TIMEOUT))
                    if isinstance(req, QueryRequest) and self.query is None:
                        raise RequestError("unknown-op", f"unknown op {req.op!r}")
                except RequestError as exc:
                    log.info("local API: bad request: %s", exc.message)
                    with contextlib.suppress(OSError):
                        send_reply(conn, error_reply(exc.code, exc.message))
                    return
                except OSError as exc:
                    log.info("local API: client went away: %s", exc)
                    return
                try:
                    if isinstance(req, ReloadRequest):
                        self._reload(conn)
                    elif isinstance(req, QueryRequest):
                        assert self.query is not None
                        send_reply(conn, self.query(req))
                    else:
                        self.handler(conn, req)
                except Exception:
                    log.exception("local API: handler crashed")
                    with contextlib.suppress(OSError):
                        send_reply(conn, error_reply("internal", "local agent error"))
        finally:
            self._slots.release()

"""``homeport forward [--bind ADDR] LOCALPORT NODE:PORT|NODE:SERVICE|NODE:HOST:PORT``.

A local port, tunneled: to a service NODE exposes, or (``NODE:HOST:PORT``)
through NODE as an exit node to a host behind it (docs/exit-nodes.md).

Each accepted local connection opens its own end-to-end stream (so one slow
connection never stalls another) and is pumped in its own thread, at most
:data:`MAX_CONNECTIONS` at once. One line per connection is printed (or one
JSON object per line with ``--json``). Ctrl-C stops accepting and cancels the
pumps.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from homeport.io.dial import DialError, open_stream
from homeport.io.pump import pump
from homeport.node.state import NodeState
from homeport.policy import exitnet
from homeport.wire import names
from homeport.wire.control import NetMap

#: Concurrent forwarded connections; beyond this, new ones are closed at once.
MAX_CONNECTIONS = 256
#: listen(2) backlog.
LISTEN_BACKLOG = 128
#: Seconds ``stop()`` waits for running pumps after cancelling them.
STOP_GRACE = 2.0


@dataclass(frozen=True, slots=True)
class ForwardSpec:
    node: str
    service: str  # a port number as text, or a service name ("" for an exit target)
    exit: str = ""  # "HOST:PORT" behind NODE, an exit node ("" for a service)

    @property
    def shown(self) -> str:
        return f"{self.node}:{self.exit or self.service}"


def parse_target(text: str) -> ForwardSpec:
    """Parse ``NODE:PORT``, ``NODE:SERVICE`` or ``NODE:HOST:PORT`` (``NODE:[V6]:PORT``).

    Raises:
        ValueError: with a user-facing message.
    """
    first, sep0, rest = text.partition(":")
    if sep0 and (":" in rest or rest.startswith("[")):  # NODE:HOST:PORT: through an exit node
        problem = names.host_name_problem(first)
        if problem is not None:
            raise ValueError(problem)
        exitnet.split_destination(rest)  # raises ValueError with the reason
        return ForwardSpec(first, "", exit=rest)
    node, sep, service = text.rpartition(":")
    if not sep or not node or not service:
        raise ValueError(
            f"{text[:80]!r}: expected NODE:PORT, NODE:SERVICE or NODE:HOST:PORT, e.g. labpc:8888"
        )
    problem = names.host_name_problem(node) or names.service_ref_problem(service)
    if problem is not None:
        raise ValueError(problem)
    return ForwardSpec(node, service)


def target_problem(netmap: NetMap, spec: ForwardSpec) -> tuple[bool, str] | None:
    """Why connections to ``spec`` cannot work now: (fatal, one line with the fix), or None.

    Why at start: the forwarder used to listen happily and fail only per
    connection, so ``homeport forward 8888 labpc:8888`` to a node that never
    exposed 8888 looked fine until the browser got a reset.
    """
    node = next((n for n in netmap.nodes if n.name == spec.node), None)
    if node is None:
        return True, f"no node named {spec.node!r} in this network (see: homeport status)"
    if spec.exit:  # whether it is an exit (and lets us use it) is known only per connection
        if node.node_id == netmap.self_id:  # exit streams to itself fail, per connection
            return True, f"{spec.node} is this node; name another node as the exit"
        if not node.online:  # a proxy whose every connection fails is no use to start
            return True, f"{spec.node} is offline now; start it (homeport up there), then retry"
        return None
    if not any(spec.service in (s.name, str(s.port)) for s in node.services):
        exposed = ", ".join(f"{s.name}/{s.port}" for s in node.services) or "nothing"
        port = spec.service if spec.service.isdigit() else "PORT"
        return True, (
            f"{spec.node} does not expose {spec.service} (it exposes {exposed}); "
            f"on {spec.node} run: homeport set --expose NAME=127.0.0.1:{port}"
        )
    if not node.online:
        return False, f"{spec.node} is offline now; connections will work once it is back"
    return None


class Forwarder:
    """A listening socket whose connections are tunneled to one node's service."""

    def __init__(
        self,
        state: NodeState,
        spec: ForwardSpec,
        bind: str,
        port: int,
        *,
        report: Callable[[dict[str, object]], None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.state = state
        self.spec = spec
        self.timeout = timeout
        self.report = report or (lambda event: None)
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(addr)
        self.listener.listen(LISTEN_BACKLOG)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._cancel_r, self._cancel_w = os.pipe()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        """Accept until :meth:`stop` (or KeyboardInterrupt in the caller)."""
        while not self._stopped.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self._stopped.is_set():
                    return
                raise
            with self._lock:
                busy = len(self._threads) >= MAX_CONNECTIONS
                if not busy:
                    t = threading.Thread(
                        target=self._handle, args=(conn, peer), name="forward", daemon=True
                    )
                    self._threads.add(t)
            if busy:
                self.report({"event": "refused", "from": _addr(peer), "reason": "too many"})
                conn.close()
            else:
                t.start()

    def _handle(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        src = _addr(peer)
        dst = self.spec.shown
        try:
            try:
                stream = open_stream(
                    self.state,
                    self.spec.node,
                    self.spec.service,
                    timeout=self.timeout,
                    exit=self.spec.exit,
                )
            except DialError as exc:
                self.report({"event": "failed", "from": src, "to": dst, "reason": exc.message})
                return
            self.report({"event": "open", "from": src, "to": dst, "peer": stream.opened.peer.name})
            res = pump(stream.tls, conn.fileno(), conn.fileno(), cancel_fd=self._cancel_r)
            self.report(
                {
                    "event": "closed",
                    "from": src,
                    "to": dst,
                    "ok": res.ok,
                    "reason": res.reason,
                    "sent": res.sent,
                    "received": res.received,
                }
            )
        finally:
            conn.close()
            self._forget()

    def _forget(self) -> None:
        """The calling connection thread is done (frees its slot)."""
        with self._lock:
            self._threads.discard(threading.current_thread())

    def stop(self) -> None:
        """Stop accepting, cancel running pumps, wait briefly for them."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        os.write(self._cancel_w, b"x")
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(STOP_GRACE)
        os.close(self._cancel_r)
        os.close(self._cancel_w)


def _addr(peer: tuple[str, int]) -> str:
    return f"{peer[0]}:{peer[1]}"


def format_event(event: dict[str, object]) -> str:
    """One human line per connection event."""
    kind = event.get("event")
    src, dst = event.get("from"), event.get("to")
    if kind == "listening":
        return f"forwarding {event.get('listen')} → {dst} (Ctrl-C to stop)"
    if kind == "open":
        return f"{src} → {dst}: connected to {event.get('peer')}"
    if kind == "closed":
        verdict = "closed" if event.get("ok") else f"failed: {event.get('reason')}"
        return (
            f"{src} → {dst}: {verdict} ({event.get('sent')} bytes up, {event.get('received')} down)"
        )
    if kind == "failed":
        return f"{src} → {dst}: failed: {event.get('reason')}"
    return f"{src}: {kind}: {event.get('reason', '')}"


def printer(as_json: bool) -> Callable[[dict[str, object]], None]:
    lock = threading.Lock()

    def report(event: dict[str, object]) -> None:
        line = json.dumps(event) if as_json else format_event(event)
        with lock:
            print(line, file=sys.stdout, flush=True)

    return report

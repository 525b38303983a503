"""The admin listener: uvicorn serving :func:`build_app` on the server's own event loop.

Why uvicorn as a task and not ``uvicorn.run``: the server already owns the
event loop and its signals (SIGTERM drains, SIGINT stops). ``Server.serve()``
runs as one more task on that loop — no second thread, no second loop — and
:class:`_QuietServer` keeps uvicorn's hands off the signal handlers; the server
stops it with :meth:`AdminListener.close` when it shuts down or drains.

Why we bind the socket ourselves: the bound address decides the security
rules before anything is served. A listener bound to loopback only serves plain
HTTP and ``/metrics`` without a token; any other address (``0.0.0.0``, a LAN
address) is served over TLS with the server's own certificate (``--tls-cert``
or the self-made one whose CA is ``ca.pem`` in the data directory), and every
route, ``/metrics`` included, needs a token. There is no plain-HTTP mode off
loopback: bearer tokens must not cross a network in clear text.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Generator, Sequence
from dataclasses import replace
from pathlib import Path

import uvicorn
from starlette.routing import BaseRoute

from homeport.server.admin import AdminError, AdminOps
from homeport.server.web.app import AdminContext, build_app

log = logging.getLogger("homeport.server.web")

#: ``homeport server`` serves the admin API here unless ``--admin-listen`` says otherwise
#: (the main port's default is 8443 and its probe port 8444).
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8445"
#: listen(2) backlog of the admin listener (a few operators, a scraper, a browser).
ADMIN_HTTP_BACKLOG = 64
#: Connections served at once; more get HTTP 503 (uvicorn's limit_concurrency).
MAX_ADMIN_CONNECTIONS = 64
#: Seconds an idle keep-alive connection stays open.
KEEPALIVE_TIMEOUT = 5
#: Seconds open requests get to finish when the listener closes.
CLOSE_GRACE = 2.0


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the homeport server owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def parse_admin_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` / ``[V6]:PORT`` → (host, port); ``off`` → None. Raises ValueError."""
    if text.strip().lower() in ("off", "none", "no", ""):
        return None
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ValueError(
            f"--admin-listen {text!r}: expected HOST:PORT (e.g. 127.0.0.1:8445) or off"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--admin-listen {text!r}: {port_text!r} is not a port") from None
    if not 0 <= port < 65536:
        raise ValueError(f"--admin-listen {text!r}: port out of range")
    return host, port


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (the first address ``host`` resolves to)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(ADMIN_HTTP_BACKLOG)  # connections queue from now on
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def is_loopback(sock: socket.socket) -> bool:
    """Is the socket bound to a loopback address only (not the wildcard, not a LAN address)?"""
    try:
        return ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except ValueError:
        return False


class AdminListener:
    """uvicorn serving the admin app as a task on this loop; :meth:`close` stops it."""

    def __init__(
        self, server: uvicorn.Server, task: asyncio.Task[None], host: str, port: int, tls: bool
    ) -> None:
        self.server = server
        self.task = task
        self.host = host
        self.port = port
        self.tls = tls

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop accepting, let open requests finish for ``grace`` seconds, then cut them."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace + 1.0)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        except Exception as exc:  # it failed earlier; _done logged it
            log.debug("admin listener ended with %r", exc)


def _done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("admin listener failed: %s", task.exception())


async def start_admin_listener(
    listen: str,
    ops: AdminOps,
    *,
    tls_cert: Path,
    tls_key: Path,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    ui: Callable[[AdminContext], Sequence[BaseRoute]] | None = None,
) -> AdminListener | None:
    """Serve the admin API on ``listen`` (``off``: None).

    ``metrics`` is the Prometheus exposition (``ServerMetrics.exposition``); ``ui``
    returns the web UI's routes for the context (``homeport.server.webui.routes``).

    Raises:
        AdminError: ``listen`` is malformed or cannot be bound.
    """
    try:
        parsed = parse_admin_listen(listen)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    if parsed is None:
        return None
    host, port = parsed
    try:
        sock = await asyncio.to_thread(bind_socket, host, port)
    except OSError as exc:
        raise AdminError(f"cannot serve the admin API on {listen}: {exc.strerror or exc}") from None
    loopback = is_loopback(sock)
    ctx = AdminContext(
        ops=ops, verify_token=ops.verify_api_token, metrics=metrics, loopback=loopback
    )
    if ui is not None:
        ctx = replace(ctx, extra_routes=tuple(ui(ctx)))
    config = uvicorn.Config(
        build_app(ctx),
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,
        http="h11",
        ws="none",
        interface="asgi3",
        limit_concurrency=MAX_ADMIN_CONNECTIONS,
        timeout_keep_alive=KEEPALIVE_TIMEOUT,
        timeout_graceful_shutdown=int(CLOSE_GRACE),
        ssl_certfile=None if loopback else str(tls_cert),
        ssl_keyfile=None if loopback else str(tls_key),
    )
    try:
        config.load()  # a bad certificate fails here, before anything is served
    except Exception as exc:
        sock.close()
        raise AdminError(f"cannot serve the admin API on {listen}: {exc}") from None
    server = _QuietServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    task.add_done_callback(_done)
    bound_host, bound_port = sock.getsockname()[:2]
    listener = AdminListener(server, task, str(bound_host), int(bound_port), not loopback)
    if loopback:
        log.info("admin API on %s/api/v1 (loopback only)", listener.url)
    else:
        log.warning(
            "admin API on %s/api/v1 is reachable beyond this host: served over TLS with the "
            "server certificate, every request (also /metrics) needs an API token",
            listener.url,
        )
    return listener

"""Composition root of the server: data directory, identities, store, service, admin.

``run_server`` is the ``homeport server`` command; :func:`start_server_thread`
runs the same server on a background thread and returns a
:class:`ServerHandle` (integration tests, benchmarks, embedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from homeport.io.loop import new_event_loop
from homeport.io.tlsctx import control_server_context
from homeport.proto.coord import DEFAULT_KEY_EXPIRY, Coordinator
from homeport.relay import InProcessRelay, RelayEvent
from homeport.server.admin import ADMIN_SOCKET, AdminOps, start_admin_server
from homeport.server.audit import AuditSink, audit_path
from homeport.server.datadir import (
    PolicyFileError,
    ServerFiles,
    load_policy,
    prepare_data_dir,
    remember_db_url,
    resolve_db_url,
)
from homeport.server.liveview import ServiceView
from homeport.server.metrics import ServerMetrics
from homeport.server.service import DRAIN_GRACE, Service, ServiceConfig
from homeport.server.sshca import load_or_create_ssh_ca
from homeport.store.registry import StoreError, WriteBehind, check_url, open_registry

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from homeport.server.web.app import AdminContext
    from homeport.server.web.listener import AdminListener

log = logging.getLogger("homeport.server")

DEFAULT_LISTEN = "0.0.0.0:8443"
#: File descriptors we ask for: each relayed stream holds 2 sockets (pipes are pooled).
WANT_NOFILE = 65536
#: How long ServerHandle waits for the server thread to come up / go down.
THREAD_START_TIMEOUT = 30.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` → (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--listen {text!r}: {port_text!r} is not a port") from None
    if not 0 <= port < 65536:
        raise ValueError(f"--listen {text!r}: port out of range")
    return host, port


def _raise_nofile() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = WANT_NOFILE if hard == resource.RLIM_INFINITY else min(hard, WANT_NOFILE)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


@dataclass(frozen=True, slots=True)
class Running:
    """What ``serve`` reports once it accepts connections."""

    host: str
    port: int
    pin: str
    data_dir: Path
    service: Service
    probe_port: int = 0
    admin_url: str = ""  # the admin API's base URL ("" when --admin-listen off)
    metrics: ServerMetrics | None = None


async def serve(
    data_dir: Path,
    listen: str,
    stop: asyncio.Event,
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    db_url: str | None = None,
    config: ServiceConfig | None = None,
    started: Callable[[Running], None] | None = None,
    key_expiry: float | None = DEFAULT_KEY_EXPIRY,
    drain_grace: Callable[[], float] | None = None,
    admin_listen: str | None = None,
    admin_optional: bool = False,
) -> None:
    """Run the server until ``stop`` is set; then, if ``drain_grace`` says a number of
    seconds (SIGTERM), open streams get that long to finish (:meth:`Service.drain`).

    ``admin_listen`` (``HOST:PORT``) serves the REST API there (:mod:`homeport.server.web`);
    with ``admin_optional`` (the default address, not one the operator chose) a failure
    to bind it is a warning, not a failed start."""
    url = resolve_db_url(data_dir, db_url)  # --db, else the one recorded, else SQLite here
    if db_url is not None or data_dir.is_dir():  # before any file is made (the default
        try:  # SQLite file's directory is the data dir, made just below)
            check_url(url)
        except StoreError as exc:
            raise StoreError(f"--db: {exc}") from None
    files = prepare_data_dir(data_dir, tls_cert, tls_key)
    policy = load_policy(data_dir)  # a bad policy file stops the start (PolicyFileError)
    ssh_ca = load_or_create_ssh_ca(data_dir)
    registry = open_registry(url, server_pin=files.pin)
    remember_db_url(data_dir, db_url)
    log.info("database: %s (schema %d)", registry.store.url, registry.store.schema_version())
    cfg = config or ServiceConfig()
    core = Coordinator(
        ca=files.ca,
        server_pin=files.pin,
        nodes=await asyncio.to_thread(registry.load_nodes),
        open_timeout=cfg.open_timeout,
        unpaired_timeout=cfg.unpaired_timeout,
        ping_interval=cfg.ping_interval,
        relay_only=cfg.relay_only,
        key_expiry=key_expiry,
        policy=policy,
        ssh_ca=ssh_ca,
    )
    writer = WriteBehind(registry)
    services: list[Service] = []  # the relay reports to the service built right after it
    metrics = ServerMetrics()  # served as GET /metrics by the admin listener

    def relay_event(ev: RelayEvent) -> None:
        metrics.relay_event(ev)
        for svc in services:
            svc.relay_event(ev)

    relay = InProcessRelay(unpaired_timeout=cfg.unpaired_timeout, on_event=relay_event)
    ctx = control_server_context(files.tls_cert, files.tls_key, files.ca_cert)
    audit = AuditSink(audit_path(data_dir))
    service = Service(core, registry, writer, relay, ctx, config=cfg, audit=audit.submit)
    services.append(service)
    service.observe = metrics.observe
    metrics.bind(core, service, relay)
    admin = None
    admin_http = None
    view = ServiceView(service, listen=listen, pin=files.pin)
    ops = AdminOps(
        registry,
        nodes=service.node_list,
        remove_node=service.remove_node,
        live=True,
        node_action=service.node_action,
        rename_node=service.rename_node,
        audit=service.admin_audit,
        data_dir=data_dir,
        set_policy=service.set_policy,
        policy_refused=service.policy_refused,
        node_by_name=core.node_by_name,
        approve_login=service.approve_login,
        live_view=view,
    )
    try:
        admin = await start_admin_server(data_dir / ADMIN_SOCKET, ops)
        host, port = parse_listen(listen)
        bound_host, bound_port = await service.start(host, port)
        view.listen = f"{bound_host}:{bound_port}"
        if admin_listen:
            from homeport.server.webui import routes as webui_routes

            admin_http = await _start_admin_http(
                admin_listen,
                admin_optional,
                ops,
                files,
                metrics=metrics.exposition,
                ui=webui_routes,
            )
            view.admin_listen = "" if admin_http is None else admin_http.url
        if started is not None:
            started(
                Running(
                    bound_host,
                    bound_port,
                    files.pin,
                    data_dir,
                    service,
                    service.probe_port,
                    "" if admin_http is None else admin_http.url,
                    metrics=metrics,
                )
            )
        await stop.wait()
    finally:
        log.info("shutting down")
        if admin_http is not None:
            await admin_http.close()
        grace = drain_grace() if drain_grace is not None else 0.0
        if grace > 0:
            await service.drain(grace)
        if admin is not None:
            admin.close()  # and removes admin.sock if it is still the one it bound
        await service.stop()
        writer.close()
        registry.close()
        await asyncio.to_thread(audit.close)


async def _start_admin_http(
    listen: str,
    optional: bool,
    ops: AdminOps,
    files: ServerFiles,
    *,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    ui: Callable[[AdminContext], Sequence[BaseRoute]] | None = None,
) -> AdminListener | None:
    """The admin listener (REST API, ``/metrics`` from ``metrics``, the web UI's routes from
    ``ui``); None if ``optional`` and it cannot bind."""
    from homeport.server.admin import AdminError
    from homeport.server.web.listener import start_admin_listener

    try:
        listener = await start_admin_listener(
            listen, ops, tls_cert=files.tls_cert, tls_key=files.tls_key, metrics=metrics, ui=ui
        )
        ops.ui_url = None if listener is None else listener.url  # for homeport admin-link
        return listener
    except AdminError as exc:
        if not optional:
            raise
        log.warning("%s; running without the admin API (--admin-listen ADDR:PORT or off)", exc)
        return None


def _banner(running: Running, listen_host: str) -> str:
    shown = listen_host if listen_host not in ("0.0.0.0", "::", "") else "<this-host>"
    addr = f"{shown}:{running.port}"
    data = running.data_dir
    return "\n".join(
        [
            f"homeport server listening on {running.host}:{running.port}",
            f"  server pin: {running.pin}",
            f"  data:       {data}",
            "  add a node:",
            f"    1. here:          homeport keys create --data {data}",
            f"    2. on the node:   HOMEPORT_AUTHKEY=KEY homeport up --server {addr} --name NAME",
            f"  probe port: {running.probe_port or 'none (nodes cannot measure their NAT)'}",
            f"  admin API:  {running.admin_url + '/api/v1' if running.admin_url else 'off'}",
            *(
                [
                    f"    token:  homeport apikeys create --data {data} --name NAME --scope admin"
                    "  (web UI and API writes; the default --scope read may only look)",
                ]
                if running.admin_url
                else []
            ),
        ]
    )


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def run_server(
    data_dir: Path | str,
    listen: str = DEFAULT_LISTEN,
    tls_cert: Path | str | None = None,
    tls_key: Path | str | None = None,
    db_url: str | None = None,
    *,
    idle_timeout: float | None = None,
    probe_port: int | None = None,
    relay_only: bool = False,
    key_expiry: float | None = DEFAULT_KEY_EXPIRY,
    admin_listen: str | None = None,
    admin_optional: bool = False,
    tls_data: bool = True,
) -> int:
    """``homeport server``: run in the foreground until SIGINT/SIGTERM. Returns an exit code."""
    setup_logging()
    _raise_nofile()
    data = Path(data_dir).expanduser().resolve()
    host, _port = parse_listen(listen)
    cfg = ServiceConfig() if idle_timeout is None else ServiceConfig(idle_timeout=idle_timeout)
    cfg = replace(
        cfg,
        probe_port=cfg.probe_port if probe_port is None else probe_port,
        relay_only=relay_only,
        tls_data=tls_data,
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        grace = [0.0]  # SIGTERM (systemd, docker stop) drains; SIGINT (Ctrl-C) stops at once

        def terminate() -> None:
            if not stop.is_set():
                grace[0] = DRAIN_GRACE
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, terminate)
        loop.add_signal_handler(signal.SIGINT, stop.set)

        def started(running: Running) -> None:
            print(_banner(running, host), flush=True)

        await serve(
            data,
            listen,
            stop,
            tls_cert=None if tls_cert is None else Path(tls_cert),
            tls_key=None if tls_key is None else Path(tls_key),
            db_url=db_url,
            config=cfg,
            started=started,
            key_expiry=key_expiry,
            drain_grace=lambda: grace[0],
            admin_listen=admin_listen,
            admin_optional=admin_optional,
        )

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            runner.run(main())
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                log.error("cannot start (--listen %s): %s", listen, exc)
            else:
                log.error("cannot start: %s", exc)
            return 1
        except Exception as exc:
            from homeport.server.admin import AdminError
            from homeport.store.registry import StoreError

            if isinstance(exc, AdminError | StoreError | PolicyFileError):
                log.error("cannot start: %s", exc)
                return 1
            raise
    return 0


class ServerHandle:
    """A server running on a background thread (own event loop). Use as a context manager.

    Example::

        with start_server_thread(tmp_path / "srv") as srv:
            key = admin_request(srv.data_dir, {"op": "keys.create"})["key"]
            ... dial srv.host, srv.port; pin srv.pin ...
    """

    def __init__(self) -> None:
        self.host = ""
        self.port = 0
        self.pin = ""
        self.data_dir = Path()
        self.service: Service | None = None
        self.metrics: ServerMetrics | None = None
        self.admin_url = ""  # base URL of the admin API ("" when not started with admin_listen)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result (state access)."""
        assert self._loop is not None
        result: list[Any] = []
        done = threading.Event()

        def run() -> None:
            try:
                result.append(fn())
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(THREAD_START_TIMEOUT):
            raise TimeoutError("server loop did not run the call")
        return result[0] if result else None

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(THREAD_START_TIMEOUT)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server_thread(
    data_dir: Path,
    listen: str = "127.0.0.1:0",
    *,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    db_url: str | None = None,
    config: ServiceConfig | None = None,
    key_expiry: float | None = DEFAULT_KEY_EXPIRY,
    admin_listen: str | None = None,
) -> ServerHandle:
    """Start a server on a thread; returns once it accepts connections (and, with
    ``admin_listen`` such as ``127.0.0.1:0``, serves the admin API at ``handle.admin_url``)."""
    handle = ServerHandle()

    def started(running: Running) -> None:
        handle.host, handle.port, handle.pin = running.host, running.port, running.pin
        handle.data_dir = running.data_dir
        handle.service = running.service
        handle.metrics = running.metrics
        handle.admin_url = running.admin_url
        handle._ready.set()

    async def main() -> None:
        handle._loop = asyncio.get_running_loop()
        handle._stop = asyncio.Event()
        await serve(
            data_dir,
            listen,
            handle._stop,
            tls_cert=tls_cert,
            tls_key=tls_key,
            db_url=db_url,
            config=config,
            started=started,
            key_expiry=key_expiry,
            admin_listen=admin_listen,
        )

    def thread_main() -> None:
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(main())
        except BaseException as exc:
            handle._error = exc
            handle._ready.set()

    handle._thread = threading.Thread(target=thread_main, name="homeport-server", daemon=True)
    handle._thread.start()
    if not handle._ready.wait(THREAD_START_TIMEOUT):
        raise TimeoutError("server did not start")
    if handle._error is not None:
        raise RuntimeError(f"server failed to start: {handle._error}") from handle._error
    return handle

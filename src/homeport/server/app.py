"""Composition root of the server: data directory, identities, store, service, admin.

``run_server`` is the ``homeport server`` command; :func:`start_server_thread`
runs the same server on a background thread and returns a
:class:`ServerHandle` (integration tests, benchmarks, embedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homeport.crypto import identity
from homeport.crypto.tls import control_server_context, fingerprint
from homeport.relay import InProcessRelay
from homeport.server.admin import ADMIN_SOCKET, AdminOps, start_admin_server
from homeport.server.service import ControlSession, Service, ServiceConfig
from homeport.server.state import ServerState
from homeport.store.db import default_url, open_store

log = logging.getLogger("homeport.server")

DEFAULT_LISTEN = "0.0.0.0:8443"
#: File descriptors we ask for: each relayed stream holds 6 (2 sockets, 2 pipes).
WANT_NOFILE = 65536
#: How long ServerHandle waits for the server thread to come up / go down.
THREAD_START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ServerFiles:
    """The server's identity files inside (or next to) its data directory."""

    data_dir: Path
    ca: identity.KeyPair
    ca_cert: Path
    tls_cert: Path
    tls_key: Path
    pin: str


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


def _ensure_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
    os.chmod(data_dir, 0o700)


def prepare_data_dir(
    data_dir: Path, tls_cert: Path | None = None, tls_key: Path | None = None
) -> ServerFiles:
    """Create (first start) or load the CA and the server certificate; write ``server.pin``."""
    _ensure_dir(data_dir)
    ca_key, ca_crt = data_dir / "ca.key", data_dir / "ca.crt"
    if not ca_key.exists():
        ca = identity.create_ca()
        identity.write_private(ca_key, ca.key_pem)
        ca_crt.write_bytes(ca.cert_pem)
        log.info("created network CA in %s", data_dir)
    ca = identity.KeyPair(key_pem=ca_key.read_bytes(), cert_pem=ca_crt.read_bytes())
    if tls_cert is None or tls_key is None:
        tls_cert, tls_key = data_dir / "server.crt", data_dir / "server.key"
        if not tls_key.exists():
            server = identity.create_server_identity(ca)
            identity.write_private(tls_key, server.key_pem)
            tls_cert.write_bytes(server.cert_pem)
    pin = fingerprint(identity.cert_der_from_pem(tls_cert.read_bytes()))
    (data_dir / "server.pin").write_text(pin + "\n")
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


def open_offline_state(data_dir: Path, *, db_url: str | None = None) -> ServerState[Any]:
    """The state of a server that is not running (admin commands on the server host)."""
    files = load_server_files(data_dir)
    store = open_store(db_url or default_url(str(data_dir)))
    return ServerState(store, ca=files.ca, server_pin=files.pin)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


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
) -> None:
    """Run the server until ``stop`` is set."""
    files = prepare_data_dir(data_dir, tls_cert, tls_key)
    store = open_store(db_url or default_url(str(data_dir)))
    state: ServerState[ControlSession] = ServerState(store, ca=files.ca, server_pin=files.pin)
    cfg = config or ServiceConfig()
    relay = InProcessRelay(unpaired_timeout=cfg.unpaired_timeout)
    ctx = control_server_context(files.tls_cert, files.tls_key, files.ca_cert)
    service = Service(state, relay, ctx, cfg)
    admin = None
    try:
        admin = await start_admin_server(
            data_dir / ADMIN_SOCKET, AdminOps(state, remove_node=service.remove_node, live=True)
        )
        host, port = parse_listen(listen)
        bound_host, bound_port = await service.start(host, port)
        if started is not None:
            started(Running(bound_host, bound_port, files.pin, data_dir, service))
        await stop.wait()
    finally:
        log.info("shutting down")
        if admin is not None:
            admin.close()
            with contextlib.suppress(OSError):
                (data_dir / ADMIN_SOCKET).unlink()
        await service.stop()
        store.close()


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
            f"    2. on the node:   homeport up --server {addr} --authkey KEY --name NAME",
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
) -> int:
    """``homeport server``: run in the foreground until SIGINT/SIGTERM. Returns an exit code."""
    setup_logging()
    _raise_nofile()
    data = Path(data_dir).expanduser().resolve()
    host, _port = parse_listen(listen)
    cfg = ServiceConfig() if idle_timeout is None else ServiceConfig(idle_timeout=idle_timeout)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

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
        )

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        try:
            runner.run(main())
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return 1
        except Exception as exc:
            from homeport.server.admin import AdminError
            from homeport.store.db import StoreError

            if isinstance(exc, AdminError | StoreError):
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
) -> ServerHandle:
    """Start a server on a thread; returns once it accepts connections."""
    handle = ServerHandle()

    def started(running: Running) -> None:
        handle.host, handle.port, handle.pin = running.host, running.port, running.pin
        handle.data_dir = running.data_dir
        handle.service = running.service
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
        )

    def thread_main() -> None:
        try:
            with asyncio.Runner(loop_factory=_new_loop) as runner:
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

"""Blocking dialer: control connections, stream opening and enrollment.

Used by the short-lived commands (``nc``, ``status``, ``forward``, ``up``'s
enrollment) and by the agent's per-stream worker threads. Standard library only
and import-light: ``homeport nc`` runs this on every ``ssh`` and must add at most
a few tens of milliseconds over plain ``nc`` (no asyncio, click or cryptography
— enrollment imports :mod:`homeport.node.keys` lazily).

Security order, everywhere: TLS handshake → :func:`~homeport.crypto.tls.check_pin`
on the server certificate → only then the first byte of ours (HELLO, or ENROLL
with the auth key secret).

Every failure is a :class:`DialError` with a stable ``code`` (for tests and
scripts) and a ``message`` fit for a one-line error.

Every TCP connection to the server goes through :func:`server_tcp`, which
follows the node's :class:`~homeport.node.settings.Route`: direct, or through
an HTTP CONNECT proxy (``--proxy``, ``HOMEPORT_PROXY``, ``HTTPS_PROXY``;
:mod:`homeport.wire.httpconnect`). With TLS-wrapped data
(:func:`wrap_data`) a data connection carries an outer TLS session to the
server, pinned like the control link, and the stream's own bytes ride inside
it through a local socketpair (docs/proxy.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from homeport import __version__
from homeport.crypto import tls as hptls
from homeport.errors import CodedError
from homeport.io import recstream, tlsctx, tlsstream
from homeport.io.pump import tune_socket
from homeport.io.tlsstream import TlsStream
from homeport.node import settings as node_settings
from homeport.node import state as node_state
from homeport.node.files import write_private
from homeport.node.settings import Route
from homeport.node.state import NodeState
from homeport.proto.control import ConnectionClosed, ControlConnection, MessageReceived, Role
from homeport.wire import control as m
from homeport.wire import httpconnect
from homeport.wire.data import ALPN_DATA, encode_preamble, new_token
from homeport.wire.errors import WireError

#: Default seconds for one dial (TCP connect + TLS + answer).
DEFAULT_TIMEOUT = 10.0
#: Bytes read from the control connection per recv.
CONTROL_READ_SIZE = 64 * 1024
SOFTWARE = f"homeport/{__version__}"
log = logging.getLogger("homeport.dial")

#: Codes meaning "try again later" (network, server restarting), as opposed to
#: answers that will not change by retrying (bad auth key, unknown node).
RETRIABLE_CODES = frozenset(
    {"unreachable", "timeout", "eof", "tls", "server-busy", "proxy-unreachable", "proxy-timeout"}
    | {"proxy-upstream"}
)
#: Bytes read per recv while waiting for the proxy's CONNECT answer.
PROXY_READ_SIZE = 4 * 1024
#: The route of a dial that must not use a proxy (tests, and the default of helpers).
DIRECT = Route(None, False, "direct")


class DialError(CodedError):
    """A dial failed; ``code`` is stable, ``message`` is user-facing."""

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE_CODES


# -- sockets ---------------------------------------------------------------------


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The first address of ``host:port`` (resolved once, shared by control and data)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DialError("unreachable", f"cannot resolve server {host}: {exc.strerror}") from exc
    family, _, _, _, addr = infos[0]
    return family, (str(addr[0]), int(addr[1]))


def _tcp_connect(
    family: socket.AddressFamily,
    addr: Any,
    deadline: float,
    *,
    code: str,
    timed_out: str,
    unreachable: str,
) -> socket.socket:
    """A blocking TCP connection by ``deadline``; failures are DialError(``code``) with
    ``timed_out`` or ``unreachable: <reason>`` as the one-line message."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        sock.connect(addr)
    except TimeoutError as exc:
        sock.close()
        raise DialError(code, timed_out) from exc
    except OSError as exc:
        sock.close()
        raise DialError(code, f"{unreachable}: {exc.strerror or exc}") from exc
    return sock


def _connect(
    family: socket.AddressFamily, addr: tuple[str, int], deadline: float, what: str
) -> socket.socket:
    where = f"{what} {addr[0]}:{addr[1]}"
    sock = _tcp_connect(
        family,
        addr,
        deadline,
        code="unreachable",
        timed_out=f"{where} timed out",
        unreachable=f"cannot reach {where}",
    )
    tune_socket(sock)
    return sock


def route_of(state: NodeState) -> Route:
    """How ``state``'s node reaches its server (its saved settings and the environment)."""
    return route_to(state.dir, state.server_address()[0])


def route_to(state_dir: Path | None, host: str) -> Route:
    """:func:`homeport.node.settings.route_for` with a bad setting as a :class:`DialError`."""
    try:
        return node_settings.route_for(state_dir, host)
    except ValueError as exc:
        raise DialError("bad-proxy", str(exc)) from exc


def server_tcp(host: str, port: int, route: Route, deadline: float, what: str) -> socket.socket:
    """A TCP connection to the server ``host:port``, direct or through ``route``'s proxy."""
    if route.proxy is None:
        family, addr = resolve(host, port)
        return _connect(family, addr, deadline, what)
    return proxy_tunnel(route.proxy, host, port, deadline, what)


def proxy_tunnel(
    proxy: httpconnect.ProxyURL, host: str, port: int, deadline: float, what: str
) -> socket.socket:
    """Connect to ``proxy``, CONNECT to ``host:port``, return the tunnel (blocking, no timeout).

    Raises:
        DialError: ``proxy-unreachable``, ``proxy-timeout``, ``proxy-auth`` (407),
        ``proxy-forbidden`` (403), ``proxy-upstream`` (502/503/504),
        ``proxy-refused`` (other), ``proxy-protocol`` (not an HTTP answer).
    """
    try:
        infos = socket.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DialError(
            "proxy-unreachable", f"cannot resolve proxy {proxy}: {exc.strerror}"
        ) from exc
    family, _, _, _, addr = infos[0]
    sock = _tcp_connect(
        family,
        addr,
        deadline,
        code="proxy-unreachable",
        timed_out=f"proxy {proxy} did not accept a connection",
        unreachable=f"cannot reach proxy {proxy}",
    )
    target = f"{what} {host}:{port}"
    try:
        sock.sendall(httpconnect.encode_connect(host, port, proxy))
        parser = httpconnect.ReplyParser()
        reply = None
        while reply is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(PROXY_READ_SIZE)
            if not chunk:
                raise DialError("proxy-refused", f"proxy {proxy} closed the connection")
            reply = parser.feed(chunk)
    except TimeoutError as exc:
        sock.close()
        raise DialError(
            "proxy-timeout", f"proxy {proxy} did not answer the CONNECT to {target} in time"
        ) from exc
    except WireError as exc:
        sock.close()
        raise DialError("proxy-protocol", f"proxy {proxy}: {exc}") from exc
    except ValueError as exc:  # encode_connect: a host name we cannot put in a request
        sock.close()
        raise DialError("bad-server", str(exc)) from exc
    except OSError as exc:
        sock.close()
        raise DialError("proxy-unreachable", f"proxy {proxy} failed: {exc}") from exc
    except DialError:
        sock.close()
        raise
    verdict = httpconnect.verdict(reply, target, proxy)
    if verdict.refusal is not None:
        sock.close()
        raise DialError(verdict.refusal.value, verdict.reason)
    if reply.rest:  # a homeport server never speaks first: the proxy made it up
        sock.close()
        raise DialError("proxy-protocol", f"proxy {proxy} sent bytes the server cannot have sent")
    log.debug("%s", verdict.reason)
    sock.settimeout(None)
    tune_socket(sock)
    return sock


def wrap_data(
    sock: socket.socket, pin: str, preamble: bytes, deadline: float, what: str
) -> socket.socket:
    """Wrap a data connection in TLS to the server; return the local end carrying its inside.

    The outer TLS offers only ``homeport-data/1`` and pins the server exactly like
    the control link; the preamble goes inside it. A thread pumps between the
    outer session and one end of a socketpair (:func:`homeport.io.pump.pump`,
    half-close included); the caller gets the other end and runs the end-to-end
    TLS over it as over a plain data connection. Closes ``sock`` on failure.
    """
    from homeport.io.pump import pump

    ctx = tlsctx.data_client_context()
    try:
        outer = tlsstream.handshake(
            sock, ctx, server_side=False, timeout=max(0.01, deadline - time.monotonic())
        )
    except OSError as exc:
        raise _handshake_failed(sock, exc, f"{what} (data)", "eof") from exc
    try:
        hptls.check_pin(outer.peer_cert_der(), pin)
    except hptls.PinMismatch as exc:
        sock.close()
        raise DialError("pin-mismatch", f"{what} is not the expected one ({exc})") from exc
    if outer.obj.selected_alpn_protocol() != ALPN_DATA:
        sock.close()
        raise DialError(
            "tls-data-refused",
            f"{what} does not accept TLS-wrapped data connections (an older server, or one "
            "run with --no-tls-data): upgrade it, or use --tls-data off",
        )
    try:
        outer.send_blocking(preamble, timeout=max(0.01, deadline - time.monotonic()))
    except OSError as exc:
        sock.close()
        raise DialError("eof", f"data connection to {what} closed: {exc}") from exc
    inner, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tune_socket(inner)
    tune_socket(mine)

    def run() -> None:
        try:
            res = pump(outer, mine.fileno(), mine.fileno(), local_tuned=True)
            log.debug("TLS-wrapped data connection ended: %s", res.reason)
        finally:
            mine.close()

    import threading

    threading.Thread(target=run, name="homeport-tlsdata", daemon=True).start()
    return inner


def data_connection(state: NodeState, route: Route, token: bytes, deadline: float) -> socket.socket:
    """A data connection presenting ``token``: plain, or TLS-wrapped when ``route`` says so.

    The preamble is sent; the caller's next bytes are the end-to-end TLS.
    """
    host, port = state.server_address()
    what = _server_what(state)
    sock = server_tcp(host, port, route, deadline, what)
    if route.tls_data:
        return wrap_data(sock, state.server_pin, encode_preamble(token), deadline, what)
    try:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        sock.sendall(encode_preamble(token))
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise DialError("eof", f"data connection closed: {exc}") from exc
    return sock


def _handshake_failed(sock: socket.socket, exc: OSError, what: str, os_code: str) -> DialError:
    """Close ``sock``; the one-line error for a failed TLS client handshake with ``what``.

    ``os_code``: the code of a plain socket error (the connection broke under the handshake).
    """
    sock.close()
    if isinstance(exc, TimeoutError):
        return DialError("timeout", f"TLS handshake with {what} timed out")
    if isinstance(exc, ssl.SSLError):
        return DialError("tls", f"TLS handshake with {what} failed: {exc.reason or exc}")
    return DialError(os_code, f"TLS handshake with {what} failed: {exc}")


def _tls_client(
    sock: socket.socket, ctx: ssl.SSLContext, deadline: float, pin: str, what: str
) -> ssl.SSLSocket:
    """TLS client handshake + pin check, closing ``sock`` on failure."""
    try:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        tls = ctx.wrap_socket(sock, server_hostname=None, suppress_ragged_eofs=False)
    except OSError as exc:
        raise _handshake_failed(sock, exc, what, "unreachable") from exc
    try:
        hptls.check_pin(tls.getpeercert(binary_form=True), pin)
    except hptls.PinMismatch as exc:
        tls.close()
        raise DialError("pin-mismatch", f"{what} is not the expected one ({exc})") from exc
    return tls


def e2e_handshake(
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    expected_pin: str,
    peer_name: str,
    timeout: float = DEFAULT_TIMEOUT,
    started: TlsStream | None = None,
) -> TlsStream:
    """Run the end-to-end TLS handshake through the relay and pin the peer.

    Both sides require a certificate chained to the network CA (the context)
    *and* exactly the fingerprint the server named for this stream, so a
    compromised relay can neither read nor impersonate. Closes ``sock`` on failure.
    """
    try:
        stream = tlsstream.handshake(
            sock, ctx, server_side=server_side, timeout=timeout, started=started
        )
    except TimeoutError as exc:
        sock.close()
        raise DialError("timeout", f"secure handshake with {peer_name} timed out") from exc
    except ssl.SSLError as exc:
        sock.close()
        raise DialError(
            "e2e-tls", f"secure handshake with {peer_name} failed: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        sock.close()
        raise DialError("eof", f"stream to {peer_name} closed during handshake: {exc}") from exc
    try:
        hptls.check_pin(stream.peer_cert_der(), expected_pin)
    except hptls.PinMismatch as exc:
        stream.close()
        raise DialError(
            "pin-mismatch", f"{peer_name} presented a certificate the server did not name"
        ) from exc
    try:  # homeport-stream/2: switch to the record layer (a no-op for stream/1)
        return recstream.negotiate(stream, server_side=server_side, timeout=timeout)
    except (OSError, ssl.SSLError) as exc:  # TimeoutError is an OSError
        stream.close()
        raise DialError("e2e-tls", f"record-layer setup with {peer_name} failed: {exc}") from exc


# -- control connection -----------------------------------------------------------


class ControlClient:
    """A blocking control connection driven by the sans-I/O :class:`ControlConnection`."""

    def __init__(self, tls: ssl.SSLSocket, conn: ControlConnection, what: str) -> None:
        self.tls = tls
        self.conn = conn
        self.what = what
        self.welcome: m.Welcome | None = None

    def send(self, *msgs: m.Message) -> None:
        for msg in msgs:
            self.conn.send(msg)
        data = self.conn.data_to_send()
        try:
            self.tls.sendall(data)
        except OSError as exc:
            raise DialError("eof", f"{self.what} closed the connection: {exc}") from exc

    def recv(self, deadline: float) -> m.Message:
        """Next message (PINGs are answered inside); raises DialError on close/timeout."""
        while True:
            ev = self.conn.next_event()
            if isinstance(ev, MessageReceived):
                if isinstance(ev.message, m.Error):
                    raise DialError(ev.message.code, ev.message.message or ev.message.code)
                return ev.message
            if isinstance(ev, ConnectionClosed):
                raise DialError(_closed_code(ev), _closed_message(ev, self.what))
            now = time.monotonic()
            if now >= deadline:
                raise DialError("timeout", f"no answer from {self.what}")
            self.tls.settimeout(deadline - now)
            try:
                data = self.tls.recv(CONTROL_READ_SIZE)
            except TimeoutError:
                continue
            except ssl.SSLZeroReturnError:
                data = b""
            except OSError as exc:
                raise DialError("eof", f"{self.what} closed the connection: {exc}") from exc
            self.conn.receive_data(data, time.monotonic())
            out = self.conn.data_to_send()
            if out:
                self.tls.sendall(out)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.tls.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _closed_code(ev: ConnectionClosed) -> str:
    return ev.code.removeprefix("remote:") if ev.code.startswith("remote:") else ev.code


def _closed_message(ev: ConnectionClosed, what: str) -> str:
    if ev.code.startswith("remote:"):
        return ev.reason
    if ev.code == "eof":
        return f"{what} closed the connection"
    return f"{what}: {ev.reason}"


def _server_what(state: NodeState) -> str:
    return f"server {state.server}"


def _control_tls(state: NodeState, route: Route, deadline: float) -> ssl.SSLSocket:
    ctx = tlsctx.control_client_context(state.cert_path, state.key_path)
    host, port = state.server_address()
    sock = server_tcp(host, port, route, deadline, "server")
    try:
        return _tls_client(sock, ctx, deadline, state.server_pin, _server_what(state))
    except DialError as exc:
        renewed = renewed_pin(state) if exc.code == "pin-mismatch" else None
        if renewed is None:
            raise
    sock = server_tcp(host, port, route, deadline, "server")
    return _tls_client(sock, ctx, deadline, renewed.server_pin, _server_what(renewed))


# -- a renewed, publicly trusted server certificate -----------------------------------

#: File in the state directory naming the host the server's certificate was publicly
#: valid for when this node joined. Only then is a renewed certificate followed.
WEBPKI_FILE = "server-webpki"
#: Longest host name we read from it.
MAX_WEBPKI_NAME = 256
#: Seconds for the check's own TLS connection.
WEBPKI_TIMEOUT = 5.0


def webpki_fingerprint(
    host: str, port: int, timeout: float = WEBPKI_TIMEOUT, route: Route = DIRECT
) -> str | None:
    """The pin of the certificate ``host:port`` serves if it is publicly valid for ``host``."""
    try:
        ctx = tlsctx.webpki_client_context()
        raw_sock = server_tcp(host, port, route, time.monotonic() + timeout, "server")
    except (DialError, OSError, ValueError):
        return None
    try:
        with raw_sock as raw:
            raw.settimeout(timeout)
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return None
    return None if der is None else hptls.fingerprint(der)


def record_webpki(state: NodeState) -> bool:
    """At enrollment: remember the server's name if its pinned certificate is publicly valid.

    Why: an operator who serves a public CA's certificate (``--tls-cert``, the
    usual way on 443) renews it every 60-90 days, which changes the pin every
    node holds. Such a node may follow a renewal, because the new certificate
    proves continuity the same way the old one did (a public CA vouches for the
    name); a self-signed server's nodes never accept another certificate.
    """
    host, port = state.server_address()
    try:
        route = route_of(state)
    except DialError:
        return False
    if webpki_fingerprint(host, port, route=route) != state.server_pin:
        return False
    write_private(state.dir / WEBPKI_FILE, host.encode() + b"\n")
    return True


def renewed_pin(state: NodeState) -> NodeState | None:
    """After a pin mismatch: the state with the renewed certificate's pin, or None.

    Accepted only when the node joined a server whose certificate was publicly
    valid for the same host name it dials now, and the certificate served now
    is publicly valid for that name. node.json is updated (the next dial pins it).
    """
    try:
        with open(state.dir / WEBPKI_FILE, "rb") as f:
            name = f.read(MAX_WEBPKI_NAME).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    host, port = state.server_address()
    if not name or name != host:
        return None
    try:
        route = route_of(state)
    except DialError:
        return None
    pin = webpki_fingerprint(host, port, route=route)
    if pin is None or pin == state.server_pin:
        return None
    renewed = replace(state, server_pin=pin)
    node_state.save(renewed)
    log.warning(
        "the server's certificate was renewed (publicly valid for %s): now pinning %s…",
        host,
        pin[:23],
    )
    return renewed


def connect_control(
    state: NodeState, role: str, *, timeout: float = DEFAULT_TIMEOUT
) -> ControlClient:
    """TLS + pin + HELLO/WELCOME; the returned client is READY."""
    deadline = time.monotonic() + timeout
    tls = _control_tls(state, route_of(state), deadline)
    client = ControlClient(
        tls, ControlConnection(Role.CLIENT, time.monotonic()), _server_what(state)
    )
    try:
        client.send(
            m.Hello(
                proto=m.PROTOCOL_VERSION,
                role=role,
                software=SOFTWARE,
                capver=m.CAPVER,
                caps=m.OUR_CAPS,
            )
        )
        msg = client.recv(deadline)
        if not isinstance(msg, m.Welcome):
            raise DialError("protocol", f"unexpected {msg.TYPE.name} from the server")
        client.welcome = msg
    except BaseException:
        client.close()
        raise
    return client


def request_netmap(
    state: NodeState,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    welcome: list[m.Welcome] | None = None,
) -> m.NetMap:
    """This node's peer map, as a NETMAP table, over a client-role connection (``status``).

    A capver-2 server answers with PEERS frames (a full map, possibly split over
    several frames); a first-release server with one NETMAP.
    """
    from homeport.proto.netmap import PeerView

    deadline = time.monotonic() + timeout
    with connect_control(state, "client", timeout=timeout) as client:
        client.send(m.NetMapRequest())
        if welcome is not None and client.welcome is not None:
            welcome.append(client.welcome)  # approval and key expiry, for ``status``
        view = PeerView()
        while True:
            msg = client.recv(deadline)
            if isinstance(msg, m.NetMap):
                return msg
            if isinstance(msg, m.Peers) and view.apply(msg):
                self_id = client.welcome.node_id if client.welcome is not None else ""
                return m.NetMap(
                    self_id=self_id,
                    nodes=tuple(m.node_info(p) for p in view.peers.values()),
                )


# -- streams -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenStream:
    """An end-to-end TLS stream to a peer; ``opened`` says who it is (pin, host keys)."""

    tls: TlsStream
    opened: m.Opened


def _finish_connect(sock: socket.socket, addr: tuple[str, int], deadline: float) -> None:
    """Wait for a non-blocking connect started earlier."""
    left = deadline - time.monotonic()
    _, writable, _ = select.select([], [sock], [], max(0.0, left))
    if not writable:
        raise DialError("unreachable", f"data connection to {addr[0]}:{addr[1]} timed out")
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise DialError(
            "unreachable", f"data connection to {addr[0]}:{addr[1]} failed: {os.strerror(err)}"
        )


def open_stream(
    state: NodeState,
    dst: str,
    service: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    exit: str = "",
) -> OpenStream:
    """Open an end-to-end TLS stream to ``dst``'s ``service`` (a name or a port).

    Pipelined to cost about two round trips to the server: the data connection's
    TCP handshake runs while the control TLS handshake does, HELLO+OPEN go out
    in one write without waiting for WELCOME, and the end-to-end ClientHello
    goes out with the data preamble without waiting for OPENED.

    Raises:
        DialError: ``code`` is the server's OPEN_FAILED code (unknown node,
        offline, not-exposed, service-down …), or a local one (unreachable,
        timeout, pin-mismatch, e2e-tls …).

    ``exit``: leave ``dst`` (an exit node) to this ``host:port`` instead of
    reaching a service of ``dst`` (``service`` is then ignored; docs/exit-nodes.md).
    """
    deadline = time.monotonic() + timeout
    route = route_of(state)
    if route.proxy is not None or route.tls_data:
        return _open_stream_routed(state, route, dst, service, deadline, exit=exit)
    family, addr = resolve(*state.server_address())
    token = new_token()
    data = socket.socket(family, socket.SOCK_STREAM)
    control: ControlClient | None = None
    try:
        data.setblocking(False)
        rc = data.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            raise DialError(
                "unreachable", f"cannot reach server {addr[0]}:{addr[1]}: {os.strerror(rc)}"
            )
        tls = _control_tls(state, route, deadline)
        control = ControlClient(
            tls, ControlConnection(Role.CLIENT, time.monotonic()), _server_what(state)
        )
        control.send(
            m.Hello(proto=m.PROTOCOL_VERSION, role="client", software=SOFTWARE),
            m.Open(
                dst=dst, service=m.EXIT_SERVICE if exit else service, token=token.hex(), exit=exit
            ),
        )
        _finish_connect(data, addr, deadline)
        data.setblocking(True)
        tune_socket(data)
        # The ClientHello rides behind the preamble (see tlsstream.begin_client).
        ctx = tlsctx.stream_context(
            server_side=False, cert=state.cert_path, key=state.key_path, ca_cert=state.ca_path
        )
        started, client_hello = tlsstream.begin_client(data, ctx)
        data.sendall(encode_preamble(token) + client_hello)
        stream_tls, opened = _finish_open(
            control, data, ctx, started, token=token, dst=dst, deadline=deadline, exit=exit
        )
    except BaseException:
        data.close()
        raise
    finally:
        if control is not None:
            control.close()
    return OpenStream(stream_tls, opened)


def _finish_open(
    control: ControlClient,
    data: socket.socket,
    ctx: ssl.SSLContext,
    started: TlsStream,
    *,
    token: bytes,
    dst: str,
    deadline: float,
    exit: str = "",
) -> tuple[TlsStream, m.Opened]:
    """Wait for OPENED (or OPEN_FAILED), then finish the end-to-end handshake over ``data``."""
    opened: m.Opened | None = None
    while opened is None:
        msg = control.recv(deadline)
        if isinstance(msg, m.Opened) and msg.token == token.hex():
            opened = msg
        elif isinstance(msg, m.OpenFailed) and msg.token == token.hex():
            raise DialError(msg.code, msg.message or msg.code)
        elif isinstance(msg, m.Welcome) and exit and m.CAP_EXIT not in msg.caps:
            raise DialError("upgrade", f"{control.what} predates exit nodes; upgrade it")
        # WELCOME, NETMAP and anything else: not what we wait for.
    stream_tls = e2e_handshake(
        data,
        ctx,
        server_side=False,
        expected_pin=opened.peer.fingerprint,
        peer_name=opened.peer.name or dst,
        timeout=max(0.01, deadline - time.monotonic()),
        started=started,
    )
    return stream_tls, opened


def _open_stream_routed(
    state: NodeState, route: Route, dst: str, service: str, deadline: float, *, exit: str = ""
) -> OpenStream:
    """:func:`open_stream` through a proxy and/or with a TLS-wrapped data connection.

    Less pipelined than the direct path (the proxy's CONNECT answers come one
    after the other): control TLS, HELLO+OPEN, then the data connection while
    the server works on the OPEN.
    """
    token = new_token()
    control = ControlClient(
        _control_tls(state, route, deadline),
        ControlConnection(Role.CLIENT, time.monotonic()),
        _server_what(state),
    )
    try:
        control.send(
            m.Hello(proto=m.PROTOCOL_VERSION, role="client", software=SOFTWARE),
            m.Open(
                dst=dst, service=m.EXIT_SERVICE if exit else service, token=token.hex(), exit=exit
            ),
        )
        data = data_connection(state, route, token, deadline)
        try:
            ctx = tlsctx.stream_context(
                server_side=False, cert=state.cert_path, key=state.key_path, ca_cert=state.ca_path
            )
            started, client_hello = tlsstream.begin_client(data, ctx)
            data.sendall(client_hello)
            stream_tls, opened = _finish_open(
                control, data, ctx, started, token=token, dst=dst, deadline=deadline, exit=exit
            )
        except BaseException:
            data.close()
            raise
    finally:
        control.close()
    return OpenStream(stream_tls, opened)


def dial_data(state: NodeState, token: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """A data connection presenting ``token`` (the agent's side of a stream)."""
    return data_connection(state, route_of(state), token, time.monotonic() + timeout)


# -- enrollment --------------------------------------------------------------------


#: OpenSSL reasons meaning "what answered does not speak TLS" (plain HTTP, ssh, …).
NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "UNEXPECTED_RECORD", "HTTP_REQUEST", "RECORD_LAYER_FAILURE",
     "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)  # fmt: skip


def first_join_error(exc: DialError, server: str) -> DialError:
    """``exc`` as first join sees it: an answer that is clearly no homeport server is final.

    Why: at first join the node has no reason to believe the address is right,
    so retrying forever on "not TLS" or "another certificate" only hides a typo
    (``https://…``, a web server's port). Once enrolled, the same errors are
    retried forever (the server may be restarting behind a proxy).
    """
    if exc.code == "tls" and any(r in exc.message for r in NOT_TLS_REASONS):
        return DialError(
            "not-homeport",
            f"{server} answered, but not with TLS ({exc.message.rpartition(': ')[2]}): "
            "it is not a homeport server; check the host and the port (homeport server "
            "prints its address; the default port is 8443)",
        )
    if exc.code == "pin-mismatch":  # already final; the message says what it likely means
        return DialError(
            "pin-mismatch",
            f"{server} answered with a certificate that is not the one the auth key names: "
            "another service answers on that port, or the key is from another homeport server",
        )
    return exc


def enroll(
    server: str,
    auth_key_text: str,
    name: str,
    state_dir: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    route: Route | None = None,
) -> NodeState:
    """Join the network: pin the server from the auth key, send ENROLL, store the identity.

    The auth key's secret is sent only after the server proved it holds the
    certificate whose fingerprint the auth key carries (no trust on first use).

    Raises:
        DialError: ``bad-auth-key`` (unparsable), the server's codes
        (``auth-key-invalid``, ``auth-key-used``, ``auth-key-expired``,
        ``name-taken``, ``bad-name``), or retriable network codes.
    """
    from homeport.node import keys
    from homeport.wire.authkey import parse_untrusted
    from homeport.wire.errors import WireError

    try:
        auth_key = parse_untrusted(auth_key_text)
    except WireError as exc:
        raise DialError("bad-auth-key", str(exc)) from exc
    if "://" in server:
        raise DialError(
            "bad-server",
            f"--server {server[:80]!r}: give HOST:PORT (no https://), e.g. vps.example.org:8443",
        )
    try:
        host, port = node_state.parse_server(server)
    except ValueError as exc:
        raise DialError("bad-server", str(exc)) from exc
    deadline = time.monotonic() + timeout
    what = f"server {server}"
    if route is None:
        route = route_to(state_dir, host)
    sock = server_tcp(host, port, route, deadline, "server")
    try:
        tls = _tls_client(
            sock, tlsctx.control_client_context(), deadline, auth_key.server_pin, what
        )
    except DialError as exc:
        raise first_join_error(exc, server) from exc
    with ControlClient(tls, ControlConnection(Role.CLIENT, time.monotonic()), what) as client:
        csr = keys.new_key_and_csr(state_dir, name)
        client.send(
            m.Enroll(
                proto=m.PROTOCOL_VERSION,
                auth_key=str(auth_key),
                name=name,
                csr_pem=csr.decode(),
                software=SOFTWARE,
                capver=m.CAPVER,
                caps=m.OUR_CAPS,
            )
        )
        msg = client.recv(deadline)
        if not isinstance(msg, m.Enrolled):
            raise DialError("protocol", f"unexpected {msg.TYPE.name} from the server")
    keys.store_certificates(state_dir, msg.cert_pem.encode(), msg.ca_pem.encode())
    old_services = node_state.load_services(state_dir)
    new = NodeState(
        dir=state_dir,
        server=server,
        server_pin=auth_key.server_pin,
        node_id=msg.node_id,
        name=msg.name,
        services=old_services,
    )
    node_state.save(new)
    record_webpki(new)
    return new

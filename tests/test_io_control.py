"""ControlLink: TLS over memory BIOs on a plain TCP transport, over real loopback pairs.

The server side is a ``ControlLink`` behind ``loop.create_server``; the client side is
either a ``ControlLink`` (:func:`open_link`, the agent's path) or a blocking
``ssl.SSLSocket`` in a thread, which tells a TLS close_notify (``recv`` returns ``b""``)
from a bare TCP FIN (``SSLEOFError``: OP_IGNORE_UNEXPECTED_EOF is off). No sleeps: every
wait is on a future or a condition, bounded by :data:`DEADLINE`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from homeport.crypto import identity
from homeport.crypto.tls import ALPN_CONTROL
from homeport.io import control as ioc
from homeport.io import tlsctx
from homeport.io.control import ControlLink, connect_control, open_link
from homeport.io.loop import new_event_loop
from homeport.proto.control import ConnectionClosed, Role
from homeport.wire import control as m
from homeport.wire.frame import HEADER

DEADLINE = 10.0
HELLO = m.Hello(proto=m.PROTOCOL_VERSION, role="agent")


@dataclass
class Handler:
    """Records what a link reports; futures to await the first message and the close."""

    messages: list[m.Message] = field(default_factory=list)
    closed: list[ConnectionClosed] = field(default_factory=list)
    got: asyncio.Future[m.Message] | None = None

    def control_message(self, link: ControlLink, msg: m.Message) -> None:
        self.messages.append(msg)
        if self.got is not None and not self.got.done():
            self.got.set_result(msg)

    def control_closed(self, link: ControlLink, ev: ConnectionClosed) -> None:
        self.closed.append(ev)


@dataclass(frozen=True)
class Pki:
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    stranger_ctx: ssl.SSLContext  # a node certificate of another network's CA
    server_cert_pem: bytes
    node_cert_pem: bytes


def _write(root: Path, name: str, pair: identity.KeyPair) -> tuple[Path, Path]:
    cert, key = root / f"{name}.crt", root / f"{name}.key"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return cert, key


def _node(root: Path, ca: identity.KeyPair, name: str) -> tuple[Path, Path, bytes]:
    key_pem = identity.new_private_key_pem()
    cert_pem = identity.sign_node_csr(ca, identity.make_csr(key_pem, name), f"id-{name}")
    cert, key = _write(root, name, identity.KeyPair(key_pem=key_pem, cert_pem=cert_pem))
    return cert, key, cert_pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = identity.create_ca()
    (root / "ca.crt").write_bytes(ca.cert_pem)
    srv = identity.create_server_identity(ca)
    scert, skey = _write(root, "server", srv)
    ncert, nkey, npem = _node(root, ca, "node")
    xcert, xkey, _ = _node(root, identity.create_ca("another network"), "stranger")
    return Pki(
        server_ctx=tlsctx.control_server_context(scert, skey, root / "ca.crt"),
        client_ctx=tlsctx.control_client_context(ncert, nkey),
        stranger_ctx=tlsctx.control_client_context(xcert, xkey),
        server_cert_pem=srv.cert_pem,
        node_cert_pem=npem,
    )


class Server:
    """Server-side links of one listener, in accept order."""

    def __init__(self, pki: Pki, **kw: Any) -> None:
        self.pki = pki
        self.kw = kw
        self.links: list[tuple[ControlLink, Handler]] = []
        self.port = 0
        self.accepted: asyncio.Queue[tuple[ControlLink, Handler]] = asyncio.Queue()

    def make(self) -> ControlLink:
        handler = Handler(got=asyncio.get_running_loop().create_future())
        kw: dict[str, Any] = {"handshake_timeout": DEADLINE, "answer_timeout": DEADLINE}
        kw.update(self.kw)
        link = ControlLink(Role.SERVER, handler, ssl_context=self.pki.server_ctx, **kw)
        self.links.append((link, handler))
        self.accepted.put_nowait((link, handler))
        return link

    async def start(self) -> asyncio.AbstractServer:
        srv = await asyncio.get_running_loop().create_server(self.make, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        return srv

    async def next(self) -> tuple[ControlLink, Handler]:
        async with asyncio.timeout(DEADLINE):
            return await self.accepted.get()


def run(test: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(asyncio.wait_for(test(), 3 * DEADLINE))


async def client(
    pki: Pki, port: int, ctx: ssl.SSLContext | None = None
) -> tuple[ControlLink, Handler]:
    handler = Handler(got=asyncio.get_running_loop().create_future())
    link = await connect_control(
        "127.0.0.1", port, ctx or pki.client_ctx, handler, connect_timeout=DEADLINE
    )
    return link, handler


async def closed(link: ControlLink) -> ConnectionClosed:
    async with asyncio.timeout(DEADLINE):
        return await link.wait_closed()


async def got(handler: Handler) -> m.Message:
    assert handler.got is not None
    async with asyncio.timeout(DEADLINE):
        return await handler.got


def blocking_tls(pki: Pki, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    return pki.client_ctx.wrap_socket(raw, suppress_ragged_eofs=False)


async def said_hello(server: Server, pki: Pki) -> tuple[ssl.SSLSocket, ControlLink, Handler]:
    """A blocking TLS client on ``server`` that sent HELLO, and the server's link to it."""
    s = await asyncio.to_thread(blocking_tls, pki, server.port)
    slink, shandler = await server.next()
    await asyncio.to_thread(s.sendall, m.encode(HELLO))
    assert await got(shandler) == HELLO
    return s, slink, shandler


def how_it_ended(s: ssl.SSLSocket) -> str:
    """Read until the end: "close_notify", "eof without close_notify" or "reset"."""
    try:
        while s.recv(65536):
            pass
    except ssl.SSLEOFError:
        return "eof without close_notify"
    except ConnectionResetError:
        return "reset"
    finally:
        s.close()
    return "close_notify"


# -- handshake ------------------------------------------------------------------------------


def test_handshake_certificates_and_a_message_each_way(pki: Pki) -> None:
    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            link, handler = await client(pki, server.port)
            slink, shandler = await server.next()
            assert not link.ended
            assert link.peer_cert_der() == identity.cert_der_from_pem(pki.server_cert_pem)
            link.send(HELLO)
            assert await got(shandler) == HELLO
            assert slink.peer_cert_der() == identity.cert_der_from_pem(pki.node_cert_pem)
            welcome = m.Welcome(proto=1, node_id="id-node", name="node", ping_interval=30.0)
            slink.send(welcome)
            assert await got(handler) == welcome
            # one read buffer for every link of the loop, none of their own
            assert link.get_buffer(-1) is slink.get_buffer(-1)
            # no TLS 1.3 tickets: the server context caches no session per handshake
            assert pki.server_ctx.session_stats()["number"] == 0
            link.abort("test over")
            assert (await closed(slink)).code == "eof"
        assert [ev.code for ev in handler.closed] == ["abort"]
        assert len(shandler.closed) == 1

    run(main)


def test_alpn_mismatch_ends_both_links_with_the_reason(pki: Pki) -> None:
    async def main() -> None:
        ctx = tlsctx.control_client_context()
        ctx.set_alpn_protocols(["h2"])
        server = Server(pki)
        async with await server.start():
            link, handler = await client(pki, server.port, ctx)
            assert link.ended  # connect_control returns it: the agent reads the reason
            assert handler.closed[0].reason == f"ALPN is None, not {ALPN_CONTROL!r}"
            slink, shandler = await server.next()
            ev = await closed(slink)
            assert ev.code == "abort" and ev.reason == f"ALPN is None, not {ALPN_CONTROL!r}"
            assert shandler.messages == [] and len(shandler.closed) == 1

    run(main)


def test_a_certificate_of_another_ca_fails_the_handshake_on_both_sides(pki: Pki) -> None:
    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            # TLS 1.3: the client's side of the handshake is done before the server
            # checks its certificate; the server then drops it (no alert, as asyncio's TLS)
            link, _ = await client(pki, server.port, pki.stranger_ctx)
            assert (await closed(link)).code == "eof"
            slink, shandler = await server.next()
            with pytest.raises(ssl.SSLCertVerificationError):
                await slink.handshake()
            ev = await closed(slink)
            assert ev.code == "tls" and "certificate verify failed" in ev.reason
            assert len(shandler.closed) == 1 and slink.peer_cert_der() is None

    run(main)


def test_a_slow_handshake_is_cut_by_its_deadline(pki: Pki) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = Server(pki, handshake_timeout=0.2)
        async with await server.start():
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\x16\x03\x01\x00\x80")  # a ClientHello's record header, no more
            slink, shandler = await server.next()
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await slink.handshake()
            assert 0.1 < loop.time() - t0 < DEADLINE
            ev = await closed(slink)
            assert ev.code == "tls" and "not done within 0.2s" in ev.reason
            async with asyncio.timeout(DEADLINE):
                assert await reader.read() == b""  # the server dropped it
            writer.close()
            assert len(shandler.closed) == 1

    run(main)


def test_no_opener_after_the_handshake_is_cut_by_the_answer_deadline(pki: Pki) -> None:
    async def main() -> None:
        server = Server(pki, answer_timeout=0.2)
        async with await server.start():
            link, _ = await client(pki, server.port)
            slink, _ = await server.next()
            assert (await closed(slink)).reason == "no HELLO or ENROLL within 0.2s"
            assert (await closed(link)).code == "eof"

    run(main)


def test_connect_over_a_given_socket(pki: Pki) -> None:
    """The agent's proxy path: TLS over an already connected TCP socket."""

    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setblocking(False)
            handler = Handler(got=asyncio.get_running_loop().create_future())
            link = await connect_control(
                "proxied", 1, pki.client_ctx, handler, sock=sock, connect_timeout=DEADLINE
            )
            _, shandler = await server.next()
            link.send(HELLO)
            assert await got(shandler) == HELLO
            link.abort("test over")

    run(main)


# -- writing --------------------------------------------------------------------------------


def test_shared_frames_are_paced_in_order_and_never_copied_whole(pki: Pki) -> None:
    """A full map shared by every session goes out in slices while the peer is slow, held
    as a view of the one shared object, before what is sent after it; the outgoing memory
    BIO (which never shrinks) is empty after every write."""

    async def main() -> None:
        count = 20_000
        shared = (
            m.encode(m.Reject(stream_id="s", code="c", message="m")) * count
        )  # a few hundred KiB of complete frames
        server = Server(pki)
        async with await server.start():
            link, handler = await client(pki, server.port)
            slink, shandler = await server.next()
            link.send(HELLO)
            assert await got(shandler) == HELLO
            welcome = m.Welcome(proto=1, node_id="id-node", name="node", ping_interval=30.0)
            slink.send(welcome)
            assert await got(handler) == welcome
            assert link.transport is not None and slink.transport is not None
            link.transport.pause_reading()  # a slow reader: the kernel's buffers fill up
            slink.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024
            )
            slink.send_encoded(shared)
            slink.send_encoded(shared)
            views = list(slink._held or ())
            assert views, "the peer is not reading: something must be held"
            assert all(v.obj is shared for v in views)  # views of the one copy
            assert slink.transport.get_write_buffer_size() <= ioc.ENCODED_HIGH_WATER + (
                ioc.ENCODED_CHUNK + 1024  # one slice's records over the high-water mark
            )
            assert slink._outgoing is not None and slink._outgoing.pending == 0
            bye = m.Reject(stream_id="last", code="c", message="m")
            slink.send(bye)  # queued behind the maps, not before them
            assert slink._outgoing.pending == 0
            handler.got = asyncio.get_running_loop().create_future()
            link.transport.resume_reading()
            while len(handler.messages) < 2 * count + 2:
                assert slink._outgoing.pending == 0
                handler.got = asyncio.get_running_loop().create_future()
                await got(handler)
            pings = handler.messages[1:-1]
            assert len(pings) == 2 * count and set(pings) == {
                m.Reject(stream_id="s", code="c", message="m")
            }
            assert handler.messages[-1] == bye
            assert slink._held is None  # created lazily, dropped once drained
            link.abort("test over")

    run(main)


def test_a_peer_that_stops_reading_is_dropped_at_the_write_limit(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ioc, "MAX_WRITE_BUFFER", 1024 * 1024)

    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            link, _ = await client(pki, server.port)
            slink, shandler = await server.next()
            link.send(HELLO)
            assert await got(shandler) == HELLO
            assert link.transport is not None
            link.transport.pause_reading()  # the peer stops reading
            chunk = bytes(64 * 1024)
            sent = 0
            while not slink.ended:
                slink.send_encoded(chunk)  # held, paced into the kernel's buffers
                sent += len(chunk)
                assert sent < 64 * ioc.MAX_WRITE_BUFFER, "never dropped"
                await asyncio.sleep(0)  # let the transport write what it can
            assert [ev.reason for ev in shandler.closed] == [
                "peer is not reading (write buffer over its limit)"
            ]
            assert slink._held is None and slink._held_bytes == 0  # nothing kept
            link.abort("test over")

    run(main)


# -- ending ---------------------------------------------------------------------------------


def test_finish_sends_close_notify_and_ends_once(pki: Pki) -> None:
    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            s, slink, shandler = await said_hello(server, pki)
            ended = asyncio.create_task(asyncio.to_thread(how_it_ended, s))
            slink.finish()
            assert await ended == "close_notify"
            assert (await closed(slink)).code == "eof"
            assert len(shandler.closed) == 1

    run(main)


def test_finish_closes_after_the_shutdown_timeout_when_the_peer_never_answers(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ioc, "SSL_SHUTDOWN_TIMEOUT", 0.2)

    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            s, slink, shandler = await said_hello(server, pki)
            slink.finish()
            assert (await closed(slink)).code == "eof"  # the transport was dropped
            assert len(shandler.closed) == 1
            s.close()

    run(main)


def test_abort_sends_no_close_notify(pki: Pki) -> None:
    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            s, slink, shandler = await said_hello(server, pki)
            ended = asyncio.create_task(asyncio.to_thread(how_it_ended, s))
            slink.abort("test")
            assert await ended in ("eof without close_notify", "reset")
            assert [ev.code for ev in shandler.closed] == ["abort"]

    run(main)


@pytest.mark.parametrize("how", ["close_notify", "tcp-fin"])
def test_eof_mid_frame_ends_the_link_once(pki: Pki, how: str) -> None:
    async def main() -> None:
        server = Server(pki)
        async with await server.start():
            s = await asyncio.to_thread(blocking_tls, pki, server.port)
            slink, shandler = await server.next()
            frame = m.encode(HELLO)
            await asyncio.to_thread(s.sendall, frame + HEADER.pack(100, m.MsgType.PING)[:3])
            assert await got(shandler) == HELLO
            if how == "close_notify":
                raw = await asyncio.to_thread(s.unwrap)
                raw.close()
            else:
                s.close()
            ev = await closed(slink)
            assert ev.code == "eof"
            assert shandler.messages == [HELLO] and len(shandler.closed) == 1

    run(main)


def test_open_link_gives_up_within_its_timeout(pki: Pki) -> None:
    """A server that accepts TCP but never answers TLS: open_link raises TimeoutError and
    leaves no link behind."""

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        made: list[ControlLink] = []

        def make() -> ControlLink:
            made.append(ControlLink(Role.CLIENT, Handler(), ssl_context=pki.client_ctx))
            return made[-1]

        try:
            with pytest.raises(TimeoutError):
                await open_link(make, "127.0.0.1", port, timeout=0.2)
            assert len(made) == 1 and made[0].ended
        finally:
            listener.close()

    run(main)

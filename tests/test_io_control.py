"""ControlLink's paced writes of shared encoded frames (peer maps), with a fake transport."""

from __future__ import annotations

import asyncio

from homeport.io import control as ioc
from homeport.io.control import ControlLink
from homeport.proto.control import ConnectionClosed, Role
from homeport.wire import control as m


class _Handler:
    def __init__(self) -> None:
        self.closed: list[ConnectionClosed] = []

    def control_message(self, link: ControlLink, msg: m.Message) -> None:
        pass

    def control_closed(self, link: ControlLink, ev: ConnectionClosed) -> None:
        self.closed.append(ev)


class _Transport:
    """Counts what waits in it until the test drains it (a peer that reads slowly)."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.waiting = 0
        self.aborted = False

    def write(self, data: bytes | memoryview) -> None:
        self.written += data
        self.waiting += len(data)

    def get_write_buffer_size(self) -> int:
        return self.waiting

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


def _link() -> tuple[ControlLink, _Transport, _Handler]:
    handler = _Handler()
    link = ControlLink(Role.CLIENT, handler)
    transport = _Transport()
    link.transport = transport  # type: ignore[assignment]
    return link, transport, handler


def test_shared_frames_are_paced_in_order_and_never_copied_whole() -> None:
    async def main() -> None:
        shared = bytes(range(256)) * 4096  # 1 MiB, "a full map" shared by every session
        a, ta, _ = _link()
        b, tb, _ = _link()
        for link in (a, b):
            link.send_encoded(shared)
        hello = m.Hello(proto=m.PROTOCOL_VERSION, role="agent")
        a.send(hello)  # queued behind the map, not before it
        for t in (ta, tb):
            assert t.waiting <= ioc.ENCODED_HIGH_WATER + ioc.ENCODED_CHUNK
        # what may wait in TLS's outgoing memory BIO, which never shrinks, stays small
        assert ioc.ENCODED_HIGH_WATER + ioc.ENCODED_CHUNK <= 32 * 1024
        # what waits is a view of the one shared object, not a per-session copy
        assert all(v.obj is shared for v in b._held)
        rounds = 0
        while a._held:
            ta.waiting = 0  # the peer read everything; the transport says so
            a.resume_writing()
            rounds += 1
        assert rounds >= len(shared) // (ioc.ENCODED_HIGH_WATER + ioc.ENCODED_CHUNK)
        assert bytes(ta.written) == shared + m.encode(hello)
        assert not ta.aborted

    asyncio.run(main())


def test_a_peer_that_does_not_read_is_dropped_counting_held_bytes() -> None:
    async def main() -> None:
        link, transport, handler = _link()
        shared = bytes(ioc.MAX_WRITE_BUFFER // 3)
        for _ in range(4):
            link.send_encoded(shared)
        assert transport.aborted and link.ended
        assert handler.closed and "not reading" in handler.closed[0].reason
        assert not link._held  # nothing kept for a dropped peer

    asyncio.run(main())

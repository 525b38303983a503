"""The mux's copy-free paths (issue 6 performance): frames laid out in place by the
driver, and DATA payloads borrowed from the decrypt buffer. Same bytes on the wire."""

from __future__ import annotations

import pytest

from homeport.proto import mux as pm
from homeport.proto.mux import DataReceived, MuxConnection, StreamRequested
from homeport.wire import mux as w
from homeport.wire.mux import MuxDecoder, MuxType

KiB = 1024


def opened() -> tuple[MuxConnection, MuxConnection, int]:
    a = MuxConnection(client=True, now=0.0)
    b = MuxConnection(client=False, now=0.0)
    sid = a.open_stream({"service": "ssh"})
    b.receive_data(a.data_to_send(), 0.0)
    req = b.next_event()
    assert isinstance(req, StreamRequested)
    b.accept_stream(sid, {})
    a.receive_data(b.data_to_send(), 0.0)
    while a.next_event() is not None:
        pass
    return a, b, sid


@pytest.mark.parametrize("n", [1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 200 * KiB, 256 * KiB])
def test_frame_data_into_is_send_data_on_the_wire(n: int) -> None:
    payload = bytes(i % 251 for i in range(n))
    a1, _, sid = opened()
    a2, _, _ = opened()
    assert a1.send_data(sid, payload) == n
    expected = bytes(a1.data_to_send())
    buf = bytearray(-(-n // w.MAX_MUX_PAYLOAD) * w.DATA_SLOT)
    off = 0
    for slot in w.data_payload_slots(memoryview(buf), n):  # what recvmsg_into does
        slot[:] = payload[off : off + len(slot)]
        off += len(slot)
    assert off == n
    end = a2.frame_data_into(sid, buf, n)
    assert bytes(buf[:end]) == expected
    assert a2.send_window(sid) == a1.send_window(sid)


def test_frame_data_into_refuses_more_than_the_window() -> None:
    a, _, sid = opened()
    buf = bytearray(w.DATA_SLOT * 5)
    with pytest.raises(pm.MuxUsageError):
        a.frame_data_into(sid, buf, pm.INITIAL_WINDOW + 1)
    with pytest.raises(pm.MuxUsageError):
        a.frame_data_into(sid, buf, 0)


def test_borrowing_decoder_returns_views_of_whole_frames_and_copies_split_ones() -> None:
    blob = w.encode(MuxType.DATA, 1, b"abc") + w.encode(MuxType.WINDOW, 1, b"\0\0\1\0")
    blob += w.encode(MuxType.DATA, 1, b"xyz")
    buf = bytearray(blob)
    d = MuxDecoder(borrow_data=True)
    cut = len(blob) - 2  # the last DATA frame straddles two feeds
    frames = d.feed_untrusted(memoryview(buf)[:cut])
    assert [f.type for f in frames] == [MuxType.DATA, MuxType.WINDOW]
    assert isinstance(frames[0].payload, memoryview) and frames[0].payload.readonly
    assert bytes(frames[0].payload) == b"abc"
    assert isinstance(frames[1].payload, bytes)  # control frames are always copied
    [last] = d.feed_untrusted(memoryview(buf)[cut:])
    assert isinstance(last.payload, bytes) and last.payload == b"xyz"
    buf[w.HEADER_LEN] = ord("Z")  # a view sees its buffer change: valid only until then
    assert bytes(frames[0].payload) == b"Zbc"
    plain = MuxDecoder().feed_untrusted(blob)
    assert all(isinstance(f.payload, bytes) for f in plain)


def test_borrowing_connection_delivers_the_same_data() -> None:
    a = MuxConnection(client=True, now=0.0)
    b = MuxConnection(client=False, now=0.0, borrow_data=True)
    sid = a.open_stream({})
    b.receive_data(a.data_to_send(), 0.0)
    assert isinstance(b.next_event(), StreamRequested)
    b.accept_stream(sid, {})
    a.receive_data(b.data_to_send(), 0.0)
    a.send_data(sid, b"hello")
    b.receive_data(bytearray(a.data_to_send()), 0.0)
    ev = b.next_event()
    assert isinstance(ev, DataReceived) and ev.data == b"hello"

"""homeport-stream/2 over real TLS 1.3 handshakes: negotiation, fallback, attacks on records.

The pump and the direct-path mux run their whole test files over both record
layers (the ``layer`` fixture in tests/test_io_pump.py and tests/test_io_muxlink.py:
bulk, half-close, a flipped bit through a relay, truncation); this file covers
what only the record layer has.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl

import pytest

from homeport.io import recstream
from homeport.io.pump import PumpEnd, pump
from homeport.io.recstream import RecordSession, RecStream
from homeport.io.tlsstream import TlsStream
from homeport.proto import records as r
from tests.test_io_pump import Pki, Threads, closing, pki, read_to_eof, send_all_and_shut, tls_pair

__all__ = ["closing", "pki"]  # fixtures used by name


def negotiated(
    pki: Pki, closing: list[socket.socket], monkeypatch: pytest.MonkeyPatch, a: str, b: str
) -> tuple[TlsStream, TlsStream]:
    """Handshake with HOMEPORT_RECORDS=a on the client and =b on the server."""
    ta, tb = socket.socketpair()
    closing += [ta, tb]
    monkeypatch.setenv(recstream.ENV_SWITCH, a)
    ctx_a = pki.ctx("a")
    monkeypatch.setenv(recstream.ENV_SWITCH, b)
    ctx_b = pki.ctx("b")
    monkeypatch.setattr(Pki, "ctx", lambda self, side: ctx_a if side == "a" else ctx_b)
    return tls_pair(pki, ta, tb)


def pump_both_ways(sa: TlsStream, sb: TlsStream, closing: list[socket.socket]) -> None:
    pa, app_a = socket.socketpair()
    pb, app_b = socket.socketpair()
    closing += [pa, app_a, pb, app_b]
    ab, ba = os.urandom(3 << 20), os.urandom(1 << 20)
    th = Threads()
    th.start("pump-a", lambda: pump(sa, pa.fileno(), pa.fileno()))
    th.start("pump-b", lambda: pump(sb, pb.fileno(), pb.fileno()))
    th.start("send-ab", lambda: send_all_and_shut(app_a, ab))
    th.start("send-ba", lambda: send_all_and_shut(app_b, ba))
    th.start("recv-b", lambda: read_to_eof(app_b))
    th.start("recv-a", lambda: read_to_eof(app_a))
    th.join_all()
    assert th.results["recv-b"] == ab and th.results["recv-a"] == ba
    for side in ("pump-a", "pump-b"):
        res = th.results[side]
        assert getattr(res, "end", None) is PumpEnd.CLEAN, res


@pytest.mark.parametrize(
    ("a", "b", "layer"),
    [("1", "1", RecStream), ("1", "0", TlsStream), ("0", "1", TlsStream), ("0", "0", TlsStream)],
)
def test_negotiation_and_fallback_to_tls_records(
    pki: Pki,
    closing: list[socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    a: str,
    b: str,
    layer: type,
) -> None:
    sa, sb = negotiated(pki, closing, monkeypatch, a, b)
    for s in (sa, sb):
        assert type(s) is layer
        assert s.peer_cert_der() is not None
    want = recstream.ALPN_RECORDS if layer is RecStream else "homeport-stream/1"
    assert sa.obj.selected_alpn_protocol() == want
    pump_both_ways(sa, sb, closing)


def test_each_stream_and_direction_has_its_own_keys(
    pki: Pki, closing: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    s1a, s1b = negotiated(pki, closing, monkeypatch, "1", "1")
    s2a, _ = negotiated(pki, closing, monkeypatch, "1", "1")
    sess = [s.obj for s in (s1a, s1b, s2a)]
    assert all(isinstance(x, RecordSession) for x in sess)
    s1a.obj.write(b"same bytes")
    s2a.obj.write(b"same bytes")
    rec1, rec2 = bytes(s1a.outgoing.read()), bytes(s2a.outgoing.read())
    assert rec1[4:] != rec2[4:]  # fresh X25519 and randoms per stream
    # Stream 2's record spliced into stream 1 fails; so does stream 1's a-side record
    # reflected back at its own a side; the genuine one opens.
    s1a.incoming.write(rec2)
    with pytest.raises(ssl.SSLError):
        s1a.obj.read(100, bytearray(100))
    s1b.incoming.write(rec1)
    buf = bytearray(100)
    n = s1b.obj.read(100, buf)
    assert isinstance(n, int) and buf[:n] == b"same bytes"


def session_pair() -> tuple[RecordSession, RecordSession]:
    """Two ends of one record stream without sockets (a → b only)."""
    c2s, s2c = r.derive_keys(
        os.urandom(32), os.urandom(32), os.urandom(32), client_fp=bytes(32), server_fp=bytes(32)
    )
    a = RecordSession(
        r.Sealer(c2s), r.Opener(s2c), recstream._Incoming(), recstream._Outgoing(), None
    )
    b = RecordSession(
        r.Sealer(s2c), r.Opener(c2s), recstream._Incoming(), recstream._Outgoing(), None
    )
    return a, b


def wire_of(s: RecordSession) -> bytes:
    return bytes(s._out.read())


def deliver(s: RecordSession, data: bytes) -> bytes:
    s._in.write(data)
    out = bytearray()
    buf = bytearray(1 << 20)
    while True:
        try:
            n = s.read(len(buf), buf)
        except ssl.SSLWantReadError:
            return bytes(out)
        out += buf[:n]


def test_partial_records_and_small_reads() -> None:
    a, b = session_pair()
    payload = os.urandom(200_000)  # 4 records
    a.write(payload)
    wire = wire_of(a)
    got = b""
    for i in range(0, len(wire), 7777):  # records split anywhere
        got += deliver(b, wire[i : i + 7777])
    assert got == payload
    a.write(b"abcdef")
    b._in.write(wire_of(a))
    assert b.read(2) == b"ab" and b.pending() == 4 and b.read(10) == b"cdef"


def test_half_close_semantics() -> None:
    a, b = session_pair()
    with pytest.raises(ssl.SSLWantReadError):
        a.unwrap()  # END queued, the peer's not here yet
    with pytest.raises(recstream.RecordError):
        a.write(b"after END")
    b._in.write(wire_of(a))
    with pytest.raises(ssl.SSLZeroReturnError):
        b.read(10, bytearray(10))
    b.write(b"the other direction still works")
    a._in.write(wire_of(b))
    assert a.read(100) == b"the other direction still works"
    b.unwrap()  # b's END goes out; a's had already come: returns
    a._in.write(wire_of(b))
    with pytest.raises(ssl.SSLZeroReturnError):
        a.read(10)
    a.unwrap()  # both ENDs done: returns


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 50, "boundary"])
def test_truncation_is_an_error_never_eof(cut: int | str) -> None:
    a, b = session_pair()
    a.write(b"x" * 100)
    first = wire_of(a)
    a.write(b"y" * 100)
    second = wire_of(a)
    b._in.write(first + (second[: int(cut)] if cut != "boundary" else b""))
    b._in.write_eof()
    assert b.read(1000) == b"x" * 100
    with pytest.raises(ssl.SSLEOFError):
        b.read(1000)


def test_tampering_replay_reorder_injection_deliver_nothing() -> None:
    for attack in ("flip", "replay", "reorder", "inject-end", "reflect", "after-end"):
        a, b = session_pair()
        a.write(b"one")
        r1 = wire_of(a)
        a.write(b"two")
        r2 = wire_of(a)
        if attack == "flip":
            bad = bytearray(r2)
            bad[10] ^= 0x40
            stream = r1 + bytes(bad)
        elif attack == "replay":
            stream = r1 + r1
        elif attack == "reorder":
            stream = r2 + r1
        elif attack == "inject-end":
            stream = r1 + bytes([r.KIND_END, 0, 0, 16]) + os.urandom(16)
        elif attack == "reflect":
            b.write(b"echo")
            stream = wire_of(b)  # b's own record sent back at b
        else:
            with pytest.raises(ssl.SSLWantReadError):
                a.unwrap()
            stream = r1 + r2 + wire_of(a) + r1  # bytes after the END record
        b._in.write(stream)
        got = bytearray()
        with pytest.raises(ssl.SSLError) as info:
            while True:
                got += b.read(1000)
        assert not isinstance(info.value, ssl.SSLWantReadError), attack
        assert not isinstance(info.value, ssl.SSLZeroReturnError), attack
        assert bytes(got) in (b"", b"one", b"onetwo"), attack  # an authentic prefix at most


def test_tls_leaves_the_records_behind_the_key_exchange_untouched(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch relies on OpenSSL reading exactly one TLS record (no read-ahead):
    records the peer sends right behind its key-exchange message stay in the BIO."""
    monkeypatch.setenv(recstream.ENV_SWITCH, "1")
    ca, cb = pki.ctx("a"), pki.ctx("b")
    ia, oa, ib, ob = (ssl.MemoryBIO() for _ in range(4))
    a = ca.wrap_bio(ia, oa, server_side=False)
    b = cb.wrap_bio(ib, ob, server_side=True)
    for _ in range(10):
        for obj in (a, b):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        ib.write(oa.read())
        ia.write(ob.read())
    assert a.selected_alpn_protocol() == b.selected_alpn_protocol() == recstream.ALPN_RECORDS
    b.write(b"K" * recstream.KEX_LEN)
    behind = os.urandom(70_000)
    ia.write(ob.read() + behind)
    assert a.read(recstream.KEX_LEN) == b"K" * recstream.KEX_LEN
    assert a.pending() == 0 and ia.read() == behind

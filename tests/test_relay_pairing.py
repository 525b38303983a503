"""The relay's pairing tables, without a socket: handles are plain strings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from homeport.relay import pairing
from homeport.relay.pairing import Paired, Pairing, Parked, Rejected, RelayFull, TokenInUse

TC, TA = b"c" * 16, b"a" * 16


def table(**kw: int) -> Pairing[str]:
    return Pairing(unpaired_timeout=10.0, **kw)


def test_pairs_in_either_order_and_tokens_are_single_use() -> None:
    p = table()
    assert isinstance(p.attach(TC, "opener", now=0.0), Parked)  # data connection first
    assert p.expect("s1", src_node="n1", dst_node="n2", src_token=TC, dst_token=TA, now=1.0) is None
    got = p.attach(TA, "dest", now=2.0)
    assert got == Paired("s1", "n1", "n2", "opener", "dest")
    assert p.streams["s1"].state is pairing.StreamState.SPLICING
    # a late duplicate of a used token parks as unknown, never joins the stream
    assert isinstance(p.attach(TC, "late", now=3.0), Parked)
    assert p.sweep(now=13.0) == ["late"]
    p.ended("s1")
    assert not p.streams
    # both ends parked before the OPEN: expect pairs at once
    p.attach(b"x" * 16, "x", now=20.0)
    p.attach(b"y" * 16, "y", now=20.0)
    paired = p.expect(
        "s2", src_node="a", dst_node="b", src_token=b"x" * 16, dst_token=b"y" * 16, now=21.0
    )
    assert paired == Paired("s2", "a", "b", "x", "y")


def test_deadlines_extend_and_sweep() -> None:
    p = table()
    p.expect("s1", src_node="a", dst_node="b", src_token=TC, dst_token=TA, now=0.0, timeout=20.0)
    assert isinstance(p.attach(TC, "h", now=1.0), Parked)
    p.extend("s1", 10.0, now=15.0)
    assert p.sweep(now=24.9) == []
    assert p.sweep(now=25.0) == ["h"]
    assert not p.streams


def test_cancel_refuse_and_late_arrivals() -> None:
    p = table()
    p.attach(TC, "opener", now=0.0)
    p.expect("s1", src_node="a", dst_node="b", src_token=TC, dst_token=TA, now=0.0)
    assert p.cancel("s1", now=1.0) == ["opener"]
    assert p.attach(TA, "late dest", now=2.0) == Rejected("its stream was refused or cancelled")
    assert p.refuse_token(b"r" * 16, now=2.0) is None  # remembered ...
    assert isinstance(p.attach(b"r" * 16, "late", now=3.0), Rejected)  # ... closed on arrival
    p.attach(b"q" * 16, "parked", now=3.0)
    assert p.refuse_token(b"q" * 16, now=3.0) == "parked"
    # refusals are forgotten after the timeout
    p.refuse_token(b"z" * 16, now=4.0)
    p.sweep(now=14.0)
    assert isinstance(p.attach(b"z" * 16, "new", now=15.0), Parked)


def test_limits_duplicates_and_cut_node() -> None:
    p = table(max_unpaired=2, max_streams=2)
    p.attach(b"1" * 16, "one", now=0.0)
    assert p.attach(b"1" * 16, "dup", now=0.0) == Rejected("duplicate data connection for a token")
    p.attach(b"2" * 16, "two", now=0.0)
    assert isinstance(p.attach(b"3" * 16, "three", now=0.0), Rejected)  # over max_unpaired
    with pytest.raises(TokenInUse):
        p.expect("s0", src_node="a", dst_node="b", src_token=TC, dst_token=TC, now=0.0)
    p.expect("s1", src_node="n", dst_node="m", src_token=b"1" * 16, dst_token=b"9" * 16, now=0.0)
    with pytest.raises(TokenInUse):
        p.expect("s2", src_node="a", dst_node="b", src_token=b"9" * 16, dst_token=TA, now=0.0)
    assert isinstance(p.attach(b"9" * 16, "nine", now=0.0), Paired)
    p.expect("s3", src_node="x", dst_node="n", src_token=TC, dst_token=TA, now=0.0)
    with pytest.raises(RelayFull):
        p.expect("s4", src_node="a", dst_node="b", src_token=b"5" * 16, dst_token=b"6" * 16, now=0)
    p.attach(TC, "s3 opener", now=0.0)
    cut = p.cut_node("n")
    assert (cut.close, cut.splicing, cut.count) == (["s3 opener"], ["s1"], 2)
    closing = p.close()
    assert sorted(closing.close) == ["two"] and closing.splicing == ["s1"]
    assert isinstance(p.attach(b"8" * 16, "after", now=1.0), Rejected)
    with pytest.raises(RelayFull):
        p.expect("s5", src_node="a", dst_node="b", src_token=b"7" * 16, dst_token=TA, now=1.0)


def test_pairing_is_pure() -> None:
    tree = ast.parse(Path(pairing.__file__).read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert not imported & {"socket", "threading", "select", "time", "asyncio", "os"}
